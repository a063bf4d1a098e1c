"""Verified raw arrays: the uint8 images and labels of a dataset before subsetting, the checks
that admit arrays from any source (shapes, dtypes, label range) and the hashes that pin files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from art_study.datasets import MNIST, DatasetSpec
from art_study.errors import DataError


@dataclass(frozen=True)
class RawArrays:
    """Verified uint8 arrays (a local dataset's float images stay float), before subsetting
    and float conversion, with where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def validated_arrays(arrays: dict[str, Any], source: str, spec: DatasetSpec = MNIST
                     ) -> RawArrays:
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
    return RawArrays(
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


def check_sha256(data: bytes, expected: str, path: Path) -> None:
    """Reject anything but the canonical bytes, naming both hashes so the user can compare."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed so a large npz is not held twice in memory."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {one_line(exc)}") from exc
    return digest.hexdigest()


def one_line(exc: BaseException) -> str:
    """An exception as one line (messages must fit the CLI's one-line error format)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
