"""``distillation``: defensive distillation (Papernot et al. 2016) with Hinton et al. (2015)'s loss.

The stage's incoming model is always the **teacher**:

1. Teacher. If the incoming model is fresh (``ctx.incoming_trained`` false: distillation is the
   first stage), it is trained for ``epochs`` epochs on the hard labels at temperature T, loss
   CE(y, softmax(z/T)). If it comes from a previous stage, that stage's model, as trained, is
   the teacher (its logits are softened at the same T). ``train_teacher`` overrides the choice.

   So by default "X → distillation" is **distillation from a T = 1 teacher**: X's model was
   trained at T = 1 and its logits are only softened at T for the soft labels. That is not
   Papernot et al.'s defensive distillation, whose teacher is itself trained at T (which is what
   makes the student's logits large and its softmax saturate at T = 1); such rows are a
   knowledge transfer from X into a fresh student, and show little saturation. With
   ``train_teacher: true`` the incoming model is first trained ``epochs`` more epochs at T
   (from X's weights, on clean data) and then distilled: Papernot's procedure with X as the
   teacher's starting point. The default is kept so the paper study's cached stages stay valid.
2. Soft labels p_t = softmax(z_t/T), computed once for the whole training set (inference mode).
3. Student, trained for ``epochs`` epochs on
   ``(1-α)·T²·CE(p_t, softmax(z_s/T)) + α·CE(y, softmax(z_s))`` (the soft CE is computed as a
   KL divergence: same gradients, a readable loss; see :func:`distillation_loss`).
   The T² keeps the soft term's gradient on the scale of the hard term's (Hinton et al.); with
   α = 0 it is Papernot's pure soft-label training, which is what ART's ``DefensiveDistillation``
   does (tests/test_defenses.py checks that the two agree).
4. Deployment at T = 1: the returned model is the student's plain logits network (the paper's
   architecture, same layer names as :func:`art_study.models.build_cnn`), compiled with
   :func:`art_study.models.compile_model`, so it saves, loads and wraps in ART like any model.
   The student is always that plain network: the masking layers of a gradient-masked teacher
   are not carried over.

Epochs. The stage occupies ``epochs`` steps of the run's epoch axis like any other stage. Epoch
i's record holds the student's ``loss`` and ``accuracy`` (hard-label accuracy at T = 1), the
teacher's epoch i as ``teacher/loss``, ``teacher/accuracy``, ``teacher/epoch_time_s``, and an
``epoch_time_s`` that is the wall time of both, because one distillation epoch costs a teacher
epoch and a student epoch. Without teacher training, ``epoch_time_s`` is the student's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import keras
import numpy as np
from pydantic import ConfigDict, Field
from tqdm.keras import TqdmCallback

from art_study.defenses.base import DefenseSettings, StageContext
from art_study.models import build_cnn, compile_model, input_shape_of, make_optimizer, n_classes_of
from art_study.tracking import EpochRecorder, RaiseOnNaN


class Settings(DefenseSettings):
    """Temperature, soft/hard balance, and where the teacher and student come from."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    temperature: float = Field(20.0, ge=1.0, le=1000.0)
    """T for the teacher's training, the soft labels and the student's soft term. 20 lies in
    the range Papernot et al. (2016) swept on MNIST (T = 1 … 100), past the low temperatures
    where their defence is still weak; it is the brief's default and strong enough to show the
    defence's signature here (at T = 20 a student trained on 2000 images has a fifth or more of
    test images with an exactly-zero loss gradient, tests/test_defenses.py). T = 1 is no
    defence."""

    alpha: float = Field(0.1, ge=0.0, le=1.0)
    """Weight of the hard-label term; 1-α weighs the T²-scaled soft term. The paper has the
    student seek "a balance between hard and softened probability output", which is Hinton et
    al.'s combined loss; they found a considerably lower weight on the hard term works best, and
    0.1 is the weight of Keras' own distillation example. α = 0 is Papernot's pure soft labels."""

    student_init: Literal["fresh", "teacher"] = "fresh"
    """``fresh``: a new network of the same architecture, as in Papernot et al. ``teacher``: start
    from the teacher's weights, matched by layer name (the paper's own sequential setup, where
    the second stage continues from the first's file)."""

    train_teacher: bool | None = None
    """Train the incoming model at T as the teacher (``epochs`` epochs) before distilling.
    Unset: train it exactly when it is a fresh network (``ctx.incoming_trained`` false), so
    distillation first trains its own teacher and, after another stage, distils that stage's
    model as it is: a T = 1 teacher, which is not Papernot's defensive distillation. ``true``
    after another stage trains that model further at T first (Papernot's teacher, started from
    the stage's weights); the stage then costs a teacher and a student epoch per epoch, like a
    first-stage distillation. False on a fresh network distils an untrained one."""


def distillation_loss(temperature: float, alpha: float):
    """Loss on ``y_true = [p_teacher (10) | one-hot y (10)]`` and the student's logits ``z``.

    The soft term is written as T²·KL(p_t ‖ softmax(z/T)): it differs from T²·CE(p_t,
    softmax(z/T)) only by the teacher's entropy, a constant, so the gradients and the training
    are the same; but the logged loss reads 0 at a perfect match instead of carrying T² times
    the soft labels' entropy (≈ 900 at T = 20 with nearly flat soft labels).
    """
    t = float(temperature)
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)

    def loss(y_true, z):
        p_teacher, y_hard = keras.ops.split(y_true, 2, axis=-1)
        entropy = -keras.ops.sum(p_teacher * keras.ops.log(keras.ops.clip(p_teacher, 1e-12, 1.0)),
                                 axis=-1)
        soft = (ce(p_teacher, z / t) - entropy) * (t * t)
        hard = ce(y_hard, z)
        return (1.0 - alpha) * soft + alpha * hard

    return loss


def _hard_accuracy(y_true, z):
    """Top-1 accuracy on the one-hot half of the packed targets (T does not change argmax)."""
    return keras.metrics.categorical_accuracy(keras.ops.split(y_true, 2, axis=-1)[1], z)


def soft_labels(teacher: keras.Model, x: np.ndarray, temperature: float,
                batch_size: int = 1000) -> np.ndarray:
    """softmax(z/T) of the teacher, in inference mode, computed stably in float64."""
    z = teacher.predict(x, batch_size=batch_size, verbose=0).astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, ctx: StageContext,
         sink: Callable[[dict[str, float]], None], desc: str) -> None:
    """``model.fit`` as :func:`art_study.defenses.base.fit` does, with each epoch's figures
    handed to ``sink`` (teacher and student epochs are merged before they are logged)."""
    callbacks: list[keras.callbacks.Callback] = [EpochRecorder(sink), RaiseOnNaN()]
    if ctx.progress:
        callbacks.append(TqdmCallback(verbose=0, desc=desc))
    model.fit(x, y, batch_size=ctx.train.batch_size, epochs=epochs, shuffle=True, verbose=0,
              callbacks=callbacks)


def train_at_temperature(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int,
                         temperature: float, ctx: StageContext,
                         sink: Callable[[dict[str, float]], None] | None = None) -> keras.Model:
    """Train ``model`` (logits z) with CE(y, softmax(z/T)): fit a wrapper that divides by T.

    The wrapper shares ``model``'s layers, so ``model`` itself is what gets trained. Each
    epoch's figures go to ``sink`` (default: logged as the stage's epochs).
    """
    hot = keras.Sequential([model, keras.layers.Rescaling(1.0 / temperature)], name="at_T")
    hot.compile(optimizer=make_optimizer(ctx.train),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"], steps_per_execution=ctx.train.steps_per_execution)
    _fit(hot, x, y, epochs, ctx, sink or ctx.log_epoch,
         f"{ctx.metric_prefix} teacher T={temperature:g}")
    return model


def _copy_weights_by_name(source: keras.Model, target: keras.Model) -> None:
    """Copy each layer's weights from ``source`` to ``target``'s layer of the same name."""
    by_name = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        if layer.weights and layer.name in by_name:
            layer.set_weights(by_name[layer.name].get_weights())


def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """Distil the incoming model (the teacher) into a student deployed at T = 1."""
    t = settings.temperature
    teacher = model
    train_teacher = (not ctx.incoming_trained if settings.train_teacher is None
                     else settings.train_teacher)
    teacher_epochs: list[dict[str, float]] = []
    if train_teacher:
        train_at_temperature(teacher, ctx.x_train, ctx.y_train_onehot, epochs, t, ctx,
                             sink=teacher_epochs.append)

    def log_student_epoch(metrics: dict[str, float]) -> None:
        merged = dict(metrics)
        if teacher_epochs:
            teacher_epoch = teacher_epochs.pop(0)
            merged.update({f"teacher/{k}": v for k, v in teacher_epoch.items()})
            merged["epoch_time_s"] += teacher_epoch["epoch_time_s"]
        ctx.log_epoch(merged)

    targets = np.concatenate([soft_labels(teacher, ctx.x_train, t), ctx.y_train_onehot], axis=1)
    student = build_cnn(ctx.model_cfg, name=f"{teacher.name}_student",
                        input_shape=input_shape_of(teacher), n_classes=n_classes_of(teacher))
    if settings.student_init == "teacher":
        _copy_weights_by_name(teacher, student)
    student.compile(optimizer=make_optimizer(ctx.train),
                    loss=distillation_loss(t, settings.alpha),
                    metrics=[keras.metrics.MeanMetricWrapper(_hard_accuracy, name="accuracy")],
                    steps_per_execution=ctx.train.steps_per_execution)
    _fit(student, ctx.x_train, targets, epochs, ctx, log_student_epoch,
         f"{ctx.metric_prefix} student")

    student = compile_model(student, ctx.train)
    # Build the fresh optimizer's state now: a saved model then loads back without Keras'
    # "skipping optimizer variables" warning.
    student.optimizer.build(student.trainable_variables)
    return student
