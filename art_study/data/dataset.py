"""The dataset as the models consume it, the loading of one by name (or from a local path),
class-stratified subsets and the fingerprint that says whether two runs saw the same data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from art_study.data.local import load_local
from art_study.data.locations import find_cifar, find_fashion, find_mnist
from art_study.datasets import CIFAR10, DATASETS, FASHION_MNIST, MNIST, DatasetSpec
from art_study.errors import DataError

N_CLASSES = 10


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
    fingerprint: str  # sha256 over the uint8 images and labels actually used (see data_fingerprint)
    spec: DatasetSpec = MNIST  # which dataset: input shape, classes, ε budgets


#: Any dataset as the models consume it (the class kept its first name: MNIST came first).
Dataset = MnistData


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

    Where each named dataset is looked for, in order, and how it is checked: see
    :mod:`art_study.data.locations`.

    - ``path``: an npz with ``x_train, y_train, x_test, y_test`` (uint8 pixels 0..255, or
      floats in [0, 1]; images (N, H, W) or (N, H, W, C)) or a directory of the four IDX files;
      classes 0..max(y_train). Nothing to check it against: its fingerprint identifies it.

    Raises:
        DataError: unknown name, missing or corrupt data, labels outside the classes.
    """
    if path is not None:
        raw, spec = load_local(Path(path).expanduser())
    elif name == MNIST.name:
        raw, spec = find_mnist(data_dir, download=download), MNIST
    elif name == FASHION_MNIST.name:
        raw, spec = find_fashion(data_dir, download=download), FASHION_MNIST
    elif name == CIFAR10.name:
        raw, spec = find_cifar(data_dir, download=download), CIFAR10
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
        fingerprint=data_fingerprint(x_train, y_train, x_test, y_test, label=label),
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


def data_fingerprint(*arrays: np.ndarray, label: tuple[str, ...] = ()) -> str:
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
