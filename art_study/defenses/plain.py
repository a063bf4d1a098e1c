"""``none``: plain training, the paper's control model."""

from __future__ import annotations

import keras

from art_study.defenses.base import DefenseSettings, StageContext, fit


class Settings(DefenseSettings):
    """Plain training has no settings of its own."""


def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """Train on clean data only."""
    return fit(model, ctx.x_train, ctx.y_train_onehot, epochs, ctx)
