"""npz files: Keras' ``mnist.npz`` (trusted only when its hash is Keras' own, else validated and
flagged) and the reading of any npz with the four arrays ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from art_study.data.idx import is_canonical
from art_study.data.raw import RawArrays, file_sha256, one_line, validated_arrays
from art_study.errors import DataError

logger = logging.getLogger(__name__)

# sha256 of the mnist.npz that keras.datasets.mnist.load_data() downloads (published in
# /work/shared/data/mnist/README.md; it is also the file_hash Keras itself checks). It holds
# the same arrays as the IDX files.
KERAS_NPZ_NAME = "mnist.npz"
KERAS_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path) -> dict[str, Any]:
    """The four arrays of an npz file (no pickles), by key.

    Raises:
        DataError: the file is corrupt or lacks one of :data:`NPZ_KEYS`.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"npz file {path} lacks key(s) {', '.join(missing)}: "
                    f"expected {', '.join(NPZ_KEYS)}"
                )
            return {key: npz[key] for key in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"corrupt npz file {path}: {one_line(exc)}") from exc


def load_npz(path: Path) -> RawArrays:
    """Load a Keras-style mnist.npz; trust Keras' file, validate (and flag) any other."""
    file_hash = file_sha256(path)
    raw = validated_arrays(read_npz(path), str(path))
    if file_hash != KERAS_NPZ_SHA256 and not is_canonical(raw):
        logger.warning(
            "%s is not the canonical MNIST (sha256 %s, Keras' is %s); using it because its "
            "shapes and labels are valid",
            path,
            file_hash,
            KERAS_NPZ_SHA256,
        )
    return raw
