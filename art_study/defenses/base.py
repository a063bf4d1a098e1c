"""What every defense stage receives, and the one training loop they share.

A defense is a training stage: it takes a compiled model (fresh, or loaded from the previous
stage), the training data, a number of epochs and its own validated settings, and returns the
trained model. Plain training (``none``) is a stage too, so the control and a defended model go
through one path. A defense module exposes two things, registered in ``defenses/__init__.py``:

- ``Settings``: a pydantic model of its own options (unknown keys refused);
- ``train(model, ctx, epochs, settings) -> keras.Model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import keras
import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm.keras import TqdmCallback

from art_study.config import ModelConfig, TrainConfig
from art_study.tracking import MLflowEpochLogger, RaiseOnNaN


class DefenseSettings(BaseModel):
    """Base of every defense's ``Settings``: unknown keys are refused, values validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class StageContext:
    """Everything a stage needs besides the incoming model and its own settings.

    ``model_cfg`` lets a stage build a fresh network of the same architecture (the student of
    defensive distillation). ``metric_prefix`` and ``step_offset`` place the stage's per-epoch
    metrics in the run (``stage1/loss`` at steps 0..3, ``stage2/loss`` at 4..6).
    """

    x_train: np.ndarray
    y_train: np.ndarray  # integer labels
    model_cfg: ModelConfig
    train: TrainConfig
    seed: int
    metric_prefix: str = "train"
    step_offset: int = 0
    progress: bool = True
    epoch_times: list[float] = field(default_factory=list)

    @property
    def y_train_onehot(self) -> np.ndarray:
        return np.eye(10, dtype=np.float32)[self.y_train]

    def callbacks(self, desc: str | None = None) -> list[keras.callbacks.Callback]:
        """Per-epoch MLflow logging, NaN guard and a tqdm progress bar, for ``model.fit``."""
        self._logger = MLflowEpochLogger(self.metric_prefix, self.step_offset)
        cbs: list[keras.callbacks.Callback] = [self._logger, RaiseOnNaN()]
        if self.progress:
            cbs.append(TqdmCallback(verbose=0, desc=desc or self.metric_prefix))
        return cbs

    def record_epochs(self) -> None:
        """Keep the epoch wall times measured by the last ``fit``."""
        self.epoch_times.extend(self._logger.epoch_times)


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int,
        ctx: StageContext) -> keras.Model:
    """``model.fit`` with the stage's callbacks; data order is fixed by the seeded global RNG."""
    model.fit(x, y, batch_size=ctx.train.batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=ctx.callbacks())
    ctx.record_epochs()
    return model


class Defense(NamedTuple):
    """A registry entry: the settings model and the training function of one defense."""

    settings: type[DefenseSettings]
    train: Callable[[keras.Model, StageContext, int, DefenseSettings], keras.Model]
