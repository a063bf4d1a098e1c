"""Checkpoints of a long attack, so an evaluation stopped midway resumes where it stopped.

AutoAttack on all 10 000 test images of a robust model takes hours on a CPU; a study stopped
then (a session ends, a node is lost) would redo it all. An attack that checkpoints
(:class:`~art_study.attacks.autoattack.AutoAttackStandard`) cuts its work into chunks of images,
seeds each chunk by itself, and saves each chunk's verdicts here under a name made of everything
that decides them (the model's weights, the images, ε, the settings, the seed, the code
version). A resumed run loads the chunks it finds and computes the rest: its verdicts are those
of an uninterrupted run, bit for bit.

The store is a directory of ``.npz`` files, each written to a temporary name and renamed into
place, so a reader never sees half a checkpoint; a damaged file is ignored and recomputed. It
lives beside the stage cache (``<cache>/checkpoints/``), in a bucket too when the cache is one;
``art-study cache --prune`` removes the local ones untouched for a week (a finished run no
longer needs them; an interrupted one resumed within the week keeps its progress).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np

#: Bumped when what a checkpoint holds, or how a chunk is computed, changes.
VERSION = 1


def digest(*parts: object) -> str:
    """sha256 of ``parts``: arrays by their dtype, shape and bytes, anything else by ``repr``."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


def model_digest(model) -> str:
    """sha256 of a Keras model's weights (trainable and not), in layer order."""
    return digest(*[np.asarray(w) for w in model.get_weights()])


class Checkpoints:
    """Named arrays under ``root``, in a scope (:meth:`scoped`) that names the work they belong
    to. Files in a directory here; :meth:`_read` and :meth:`_write` are what another store
    (an object store: ``study/object_cache.py``) replaces."""

    def __init__(self, root: str | os.PathLike[str], scope: str = ""):
        self.root = Path(root)
        self.scope = scope

    def scoped(self, *parts: object) -> Checkpoints:
        """The checkpoints of a narrower piece of work: ``parts`` are hashed into the scope."""
        child = copy.copy(self)
        child.scope = digest(VERSION, self.scope, *parts)
        return child

    def _name(self, name: str) -> str:
        key = digest(self.scope, name)
        return f"{key[:2]}/{key}.npz"

    def _path(self, name: str) -> Path:
        return self.root / self._name(name)

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays saved as ``name`` in this scope, or None (absent or unreadable)."""
        blob = self._read(self._name(name))
        if blob is None:
            return None
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # damaged: recomputed
            return None

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Write ``arrays`` as ``name``, whole or not at all; a store that cannot be written
        is skipped (the attack goes on, it only cannot resume)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._write(self._name(name), buffer.getvalue())

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except OSError:
            return None

    def _write(self, name: str, blob: bytes) -> None:
        """To a temporary name, then renamed into place: a reader never sees half a file."""
        path = self.root / name
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(blob)
            os.replace(part, path)
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)


#: Age after which ``art-study cache --prune`` removes a checkpoint.
MAX_AGE_S = 7 * 24 * 3600.0


def prune(root: str | os.PathLike[str], min_age_s: float = MAX_AGE_S) -> tuple[int, int]:
    """Remove checkpoint files under ``root`` untouched for ``min_age_s``; (files, bytes)."""
    import time

    removed = freed = 0
    now = time.time()
    for path in Path(root).glob("*/*.npz"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            if now - stat.st_mtime > min_age_s:
                path.unlink()
                removed, freed = removed + 1, freed + stat.st_size
    return removed, freed
