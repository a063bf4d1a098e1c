"""The cache of stage outputs: each distinct stage's model (the ``.h5`` hand-off file) and record.

Entries are written to a temporary directory and renamed into place, so a study killed at any
moment (SIGKILL included) leaves either a complete entry or none, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from art_study.errors import TrackingError


@dataclass(frozen=True)
class StageRecord:
    """What a stage produced besides its model: per-epoch history and timing."""

    key: str
    defense: str
    epochs: int
    history: list[dict[str, float]]
    train_time_s: float
    extra: dict[str, Any]


class StageCache:
    """Stage outputs under ``root/<key[:2]>/<key>/`` as ``model.h5`` + ``stage.json``."""

    MODEL = "model.h5"
    RECORD = "stage.json"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"stage cache not writable: {self.root} ({exc.strerror or exc})"
            ) from None

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def model_path(self, key: str) -> Path:
        return self._dir(key) / self.MODEL

    def has(self, key: str) -> bool:
        return (self._dir(key) / self.RECORD).is_file()

    def record(self, key: str) -> StageRecord:
        return StageRecord(**json.loads((self._dir(key) / self.RECORD).read_text()))

    def load_model(self, key: str) -> keras.Model:
        """The stage's model, loaded back from its ``.h5`` file (uncompiled)."""
        return keras.models.load_model(self.model_path(key), compile=False)

    def save(self, model: keras.Model, record: StageRecord) -> Path:
        """Write the model as ``.h5`` and the record, atomically; return the model path."""
        final = self._dir(record.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{record.key[:8]}-", dir=self.root))
        try:
            model.save(tmp / self.MODEL)
            (tmp / self.RECORD).write_text(json.dumps(record.__dict__, indent=1))
            if final.exists():  # a concurrent writer finished first: identical content
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / self.MODEL
