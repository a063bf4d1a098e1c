"""CIFAR-10's python archive (``cifar-10-python.tar.gz``, the file Keras downloads): its
batches read straight from the tarball, with an unpickler that can build nothing but arrays.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from art_study.data.raw import RawArrays, file_sha256, one_line, validated_arrays
from art_study.datasets import CIFAR10
from art_study.errors import DataError

logger = logging.getLogger(__name__)

# The tarball Keras downloads (its file_hash): five training batches and a test batch of
# 10 000 pickled images each (3072 bytes, channel-first), labels 0..9.
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


def load_cifar_archive(path: Path, expected_sha256: str = CIFAR_SHA256) -> RawArrays:
    """The arrays of a ``cifar-10-python.tar.gz``, read without extracting it to disk.

    The batches are pickles: they are read with :class:`_ArrayUnpickler`, which builds only
    dicts, lists, bytes and numpy arrays, so a foreign archive cannot run code. An archive
    whose sha256 is not ``expected_sha256`` is used when its structure is valid, with a warning.
    """
    file_hash = file_sha256(path)
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
    raw = validated_arrays(arrays, str(path), CIFAR10)
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
