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
from typing import ClassVar, NamedTuple

import keras
import mlflow
import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm.keras import TqdmCallback

from art_study.config import ModelConfig, TrainConfig
from art_study.tracking import EpochRecorder, RaiseOnNaN


class DefenseSettings(BaseModel):
    """Base of every defense's ``Settings``: unknown keys are refused, values validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    implementation: ClassVar[int] = 1
    """Version of the stage's training code. Bumped when a change alters what the same settings
    train (e.g. a different order of random draws), so cached stages of the old code are not
    reused as if the new code had made them. Part of the stage key from 2 on."""

    key_defaults: ClassVar[dict[str, object]] = {}
    """Settings added after stage keys existed, with the value that trains as before the option:
    left out of the stage key at that value, so cached stages stay valid."""


@dataclass
class StageContext:
    """Everything a stage needs besides the incoming model and its own settings.

    ``model_cfg`` lets a stage build a fresh network of the same architecture (the student of
    defensive distillation). ``metric_prefix`` and ``step_offset`` place the stage's per-epoch
    metrics in the run: every stage logs under ``train/`` (``train/loss``, …), the first at steps
    0..3, the second at 4..6 (the paper's 4 + 3 epochs).
    """

    x_train: np.ndarray
    y_train: np.ndarray  # integer labels
    model_cfg: ModelConfig
    train: TrainConfig
    seed: int
    incoming_trained: bool = False  # False: a fresh network; True: the previous stage's model
    metric_prefix: str = "train"
    step_offset: int = 0
    progress: bool = True
    n_classes: int = 10  # the dataset's classes (the width of the one-hot labels)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def y_train_onehot(self) -> np.ndarray:
        return np.eye(self.n_classes, dtype=np.float32)[self.y_train]

    @property
    def epoch_times(self) -> list[float]:
        return [h["epoch_time_s"] for h in self.history if "epoch_time_s" in h]

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """Record one epoch's figures (``loss``, ``accuracy``, ``epoch_time_s``, ...) and log them
        live to the active MLflow run as ``<prefix>/<name>`` at the run's global epoch step.

        The record is kept so a stage restored from the cache can be logged to a later run too.
        """
        step = self.step_offset + len(self.history)
        self.history.append(dict(metrics))
        mlflow.log_metrics({f"{self.metric_prefix}/{k}": float(v) for k, v in metrics.items()},
                           step=step)

    def callbacks(self, desc: str | None = None) -> list[keras.callbacks.Callback]:
        """Per-epoch logging (via :meth:`log_epoch`), NaN guard and a progress bar, for ``fit``."""
        cbs: list[keras.callbacks.Callback] = [EpochRecorder(self.log_epoch), RaiseOnNaN()]
        if self.progress:
            cbs.append(TqdmCallback(verbose=0, desc=desc or self.metric_prefix))
        return cbs


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int,
        ctx: StageContext) -> keras.Model:
    """``model.fit`` with the stage's callbacks; data order is fixed by the seeded global RNG."""
    model.fit(x, y, batch_size=ctx.train.batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=ctx.callbacks())
    return model


class Defense(NamedTuple):
    """A registry entry: the settings model and the training function of one defense.

    ``after_plain``, for a defense whose ``train`` is plain training (exactly the ``none``
    stage's) followed by a transformation of the trained model: that transformation alone. A
    study then starts such a first stage from the control's first stage, trained already, and
    applies it (``study/stages.py``): the same model, bit for bit, without training it twice.
    """

    settings: type[DefenseSettings]
    train: Callable[[keras.Model, StageContext, int, DefenseSettings], keras.Model]
    after_plain: Callable[[keras.Model, StageContext, DefenseSettings], keras.Model] | None = None
