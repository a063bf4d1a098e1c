"""A dataset of the user's own (``data.path``): an npz with the four arrays or a directory of
the four IDX files, its input shape and classes taken from the data itself. There is nothing to
check it against: its fingerprint is what identifies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from art_study.data.idx import find_idx_files, load_idx_set
from art_study.data.npz import read_npz
from art_study.data.raw import RawArrays, validated_arrays
from art_study.datasets import DatasetSpec, local_spec
from art_study.errors import DataError


def load_local(path: Path) -> tuple[RawArrays, DatasetSpec]:
    """The arrays at ``path`` (npz file or IDX directory) and the spec they imply."""
    if path.is_dir():
        present, missing = find_idx_files(path)
        if missing:
            raise DataError(f"data.path {path} lacks the IDX file(s) {', '.join(missing)}")
        raw = load_idx_set(present, None, None, f"dataset {path}")
        arrays = {"x_train": raw.x_train, "y_train": raw.y_train, "x_test": raw.x_test,
                  "y_test": raw.y_test}
    elif path.is_file():
        arrays = read_npz(path)
    else:
        raise DataError(f"data.path does not exist: {path}")
    return _local_arrays(arrays, str(path))


def _local_arrays(arrays: dict[str, Any], source: str) -> tuple[RawArrays, DatasetSpec]:
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
        # labels only, through validated_arrays on a uint8 stand-in of the same shape).
        for key, x in floats.items():
            if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
                raise DataError(f"bad array {key} in {source}: float pixels must be in [0, 1]")
        stand_in = {**arrays, **{k: np.zeros(x.shape, np.uint8) for k, x in floats.items()}}
        raw = validated_arrays(stand_in, source, spec)
        raw = RawArrays(floats["x_train"].astype(np.float32), raw.y_train,
                        floats["x_test"].astype(np.float32), raw.y_test, source)
    else:
        raw = validated_arrays(arrays, source, spec)
    return raw, spec
