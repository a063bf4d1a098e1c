"""``pgd_adversarial_training``: Madry et al. (2018) PGD adversarial training.

Every batch is replaced by PGD images crafted against the current weights with the true labels
(a random start in the ε-ball, then ``steps`` signed-gradient steps of size α on the
cross-entropy, each projected back onto the ε-ball and [0, 1]), and the model takes one optimizer
step on them: min_θ E max_{‖δ‖∞≤ε} CE(f_θ(x + δ), y). Unlike the paper's FGSM training this holds
against strong attacks (88.4 % under AutoAttack at ε = 0.3 on MNIST, Croce & Hein 2020), at the
price of ``steps`` extra forward/backward passes per batch.

Two implementations, chosen by ``backend``, with the same ε, steps, step size and random start:

- ``compiled`` (what the study uses): the attack and the step are one ``tf.function``, a
  :class:`PGDTrainer` wrapper driven by Keras' own ``fit`` with the stage's callbacks, as
  ``adversarial_training_fast`` does for FGSM. It also offers what makes the recipe cheap and
  stable (the schedule knobs below): an ε warm-up with fewer inner steps while ε is small, a
  learning-rate schedule within the stage, the BatchNorm momentum of the stage, and an average
  of the weights over its steps.
- ``art`` (the reference): ART's ``AdversarialTrainerMadryPGD`` through
  :class:`~art_study.estimator.CompiledKerasClassifier`. It has none of the schedule knobs, so
  those must stay at their defaults with it (refused at config load otherwise).

A setting rather than a second registry entry: the two are one defense with one set of settings,
and a study switches between them by one key (``tests/test_robust_defenses.py`` checks they reach
comparable PGD robustness on a small slice).

Schedules are given in shares of the stage (``eps_warmup: 0.25`` is the first quarter of the
stage's optimizer steps), so they fit any number of epochs by construction; a share outside its
range fails at config load naming the key.

The attack runs the network in inference mode (BatchNorm's moving statistics, no dropout), as
ART's ``loss_gradient`` and the FGSM trainer do; the training step then runs in training mode on
the adversarial batch. The stage builds its own optimizer (the training config's kind, Adam or
SGD with momentum 0.9) around its learning-rate schedule: the stage reloads its parent's ``.h5``
anyway, and a schedule needs a fresh step count. The wrapper owns no weights: the stage returns
the incoming network (with its gradient-masking layers, if any), so it saves as ``.h5`` like
every stage. Randomness: a ``SeedGenerator`` seeded from NumPy's caller-seeded RNG, and Keras'
shuffling.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import ClassVar, Literal

import keras
import numpy as np
import tensorflow as tf
from pydantic import ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from art_study.datasets import Eps
from art_study.defenses.base import DefenseSettings, StageContext
from art_study.estimator import CompiledKerasClassifier
from art_study.tracking import RaiseOnNaN


class RobustSettings(DefenseSettings):
    """The inner maximisation's budget and the stage's schedules, shared with ``trades``."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    eps: Eps = Field(0.3, gt=0.0, le=1.0)
    """ε, the L∞ training budget on the [0, 1] pixel scale (0.3: the standard MNIST budget, the
    top of the evaluation sweep)."""

    steps: int = Field(10, ge=1, le=1000)
    """Inner PGD iterations per batch (after the ε warm-up)."""

    step_size: float | None = Field(None, gt=0.0, le=2.0)
    """α at full ε (pixel scale). Unset: 2.5·ε/steps, so the walk can cross the ball and back
    (Madry et al. 2018). During the ε warm-up α scales with the current ε and the steps used."""

    eps_warmup: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the stage's optimizer steps over which ε ramps linearly from ~0 to ε. A network
    attacked at full ε from its first step can stall at chance; the reference recipe ramps over
    the first quarter (0.25)."""

    warmup_steps: int | None = Field(None, ge=1, le=1000)
    """Inner iterations while ε is still ramping (cheaper early epochs); unset: ``steps``."""

    lr_schedule: Literal["constant", "onecycle", "cosine"] = "constant"
    """``constant``: the training config's learning rate. ``onecycle``: linear rise from
    peak/25 to ``peak_lr`` over ``lr_warmup`` of the stage, then cosine decay to 0 (Keras'
    ``CosineDecay`` with warm-up). ``cosine``: cosine decay from ``peak_lr`` to 0."""

    peak_lr: float | None = Field(None, gt=0.0, le=10.0)
    """Peak learning rate of the schedule; unset: the training config's learning rate."""

    lr_warmup: float = Field(0.3, ge=0.0, lt=1.0)
    """Share of the stage over which ``onecycle`` rises to its peak (0.3, PyTorch's default)."""

    bn_momentum: float | None = Field(None, gt=0.0, lt=1.0)
    """BatchNorm moving-statistics momentum during this stage (Keras convention: 0.9 is
    PyTorch's 0.1); unset: the network's own (Keras' 0.99). Faster statistics follow the
    shifting adversarial distribution, which the attack (inference mode) relies on."""

    weight_average: float | None = Field(None, gt=0.0, lt=1.0)
    """Decay m of an exponential moving average, over the stage's optimizer steps, of the
    weights *and* of BatchNorm's moving statistics, which the stage ends on; unset: the last
    ones. TensorFlow's ``ExponentialMovingAverage`` rule with ``num_updates`` = the step count
    t: average ← d·average + (1 − d)·current with d = min(m, (1 + t)/(10 + t)), from the
    stage's starting values. The attacks during training use the current weights, as in
    Gowal et al. (2020) and Rebuffi et al. (2021), who report the average as more robust.
    Two simpler forms failed (docs/robust.md): Keras' optimizer EMA (weights only, the last
    weights' batch statistics, a constant d = 0.999 from the first step) lost 6 points of
    validation AutoAttack, the two causes not separated; averaging the statistics too with
    that constant d kept 3 % of BatchNorm's initial variance (1, where the trained one is
    ~4e-4) and broke the network. Over a stage of a few thousand steps, d stays below m."""

    key_defaults: ClassVar[dict[str, object]] = {"weight_average": None}

    def alpha_ratio(self) -> float:
        """α·steps/ε: the step size relative to ε per step count (2.5 unless set)."""
        if self.step_size is None:
            return 2.5
        return self.step_size * self.steps / self.eps

    def schedule_is_default(self) -> bool:
        """True when none of the compiled-only schedule knobs is set."""
        return (self.eps_warmup == 0.0 and self.warmup_steps is None
                and self.lr_schedule == "constant" and self.peak_lr is None
                and self.weight_average is None)


class Settings(RobustSettings):
    """PGD adversarial training: the shared budget and schedules, plus the implementation."""

    random_start: bool = True
    """Start PGD from x + U(-ε, ε) (Madry et al. 2018); off: from x itself."""

    backend: Literal["compiled", "art"] = "compiled"
    """``compiled``: the in-graph train step (the study's). ``art``: ART's
    ``AdversarialTrainerMadryPGD``, the reference (no schedule knobs)."""

    @model_validator(mode="after")
    def _art_has_no_schedule(self) -> Settings:
        if self.backend == "art" and not self.schedule_is_default():
            raise ValueError("backend 'art' (ART's AdversarialTrainerMadryPGD) has no ε warm-up, "
                             "learning-rate schedule or weight average: unset eps_warmup, "
                             "warmup_steps, lr_schedule, peak_lr and weight_average, or use "
                             "backend 'compiled'")
        return self


# --- shared by the compiled PGD and TRADES trainers -------------------------------------------

def learning_rate(settings: RobustSettings, base_lr: float, total_steps: int
                  ) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The stage's learning rate: a constant, or a schedule over its ``total_steps``."""
    peak = settings.peak_lr or base_lr
    if settings.lr_schedule == "onecycle":
        warm = round(settings.lr_warmup * total_steps)
        return keras.optimizers.schedules.CosineDecay(
            peak / 25.0, decay_steps=max(total_steps - warm, 1), alpha=0.0,
            warmup_target=peak, warmup_steps=warm)
    if settings.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(total_steps, 1))
    return peak


def stage_optimizer(settings: RobustSettings, ctx: StageContext,
                    total_steps: int) -> keras.optimizers.Optimizer:
    """A fresh optimizer of the training config's kind, on the stage's learning rate."""
    lr = learning_rate(settings, ctx.train.learning_rate, total_steps)
    if ctx.train.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    return keras.optimizers.Adam(lr)


@contextlib.contextmanager
def bn_momentum(model: keras.Model, momentum: float | None) -> Iterator[None]:
    """Set every BatchNormalization layer's momentum for the stage, restoring it afterwards."""
    layers = [la for la in _all_layers(model) if isinstance(la, keras.layers.BatchNormalization)]
    before = [la.momentum for la in layers]
    if momentum is not None:
        for la in layers:
            la.momentum = momentum
    try:
        yield
    finally:
        for la, m in zip(layers, before, strict=True):
            la.momentum = m


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out: list[keras.layers.Layer] = []
    for la in model.layers:
        out.append(la)
        if isinstance(la, keras.Model):
            out += _all_layers(la)
    return out


class RobustTrainer(keras.Model):
    """Base of the in-graph trainers: the current ε and inner step count from the step counter.

    Only a training wrapper around ``net`` (``fit`` it, keep ``net``). The schedule is computed
    in the graph from the optimizer's step count, so ``steps_per_execution`` and the
    callbacks cannot shift it.
    """

    def __init__(self, net: keras.Model, settings: RobustSettings, seed: int,
                 total_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.eps = float(settings.eps)
        self.steps = int(settings.steps)
        self.warmup_inner = int(settings.warmup_steps or settings.steps)
        self.alpha_ratio = float(settings.alpha_ratio())
        self.warmup_total = float(round(settings.eps_warmup * total_steps))
        self.seed_generator = keras.random.SeedGenerator(seed)
        # the weight average (weight_average): the weights and BatchNorm's statistics
        self.decay = settings.weight_average
        self.averaged = [] if self.decay is None else [
            *net.trainable_variables,
            *(v for la in _all_layers(net) if isinstance(la, keras.layers.BatchNormalization)
              for v in (la.moving_mean, la.moving_variance))]
        # copies: a Keras Variable made from another's ``value`` shares its storage
        self.averages = [keras.Variable(np.array(v.numpy()), trainable=False,
                                        name=f"average_{i}")
                         for i, v in enumerate(self.averaged)]

    def call(self, x, training=False):
        return self.net(x, training=training)

    def update_averages(self) -> None:
        """After an optimizer step: fold the weights and BatchNorm's statistics into their
        average (:attr:`RobustSettings.weight_average`'s rule, t = steps taken)."""
        if not self.averages:
            return
        t = tf.cast(self.optimizer.iterations, tf.float32)
        d = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
        for average, v in zip(self.averages, self.averaged, strict=True):
            average.assign(d * average + (1.0 - d) * v)

    def end_on_averages(self) -> None:
        """The stage ends on the averages (a no-op without ``weight_average``)."""
        for average, v in zip(self.averages, self.averaged, strict=True):
            v.assign(average)

    def budget(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(ε_t, inner steps n_t, α_t) at the current optimizer step."""
        step = tf.cast(self.optimizer.iterations, tf.float32)
        if self.warmup_total > 0:
            ramp = tf.minimum((step + 1.0) / self.warmup_total, 1.0)
            in_warmup = step < self.warmup_total
        else:
            ramp, in_warmup = tf.constant(1.0), tf.constant(False)
        eps = self.eps * ramp
        n = tf.where(in_warmup, self.warmup_inner, self.steps)
        alpha = self.alpha_ratio * eps / tf.cast(n, tf.float32)
        return eps, n, alpha

    def pgd(self, x: tf.Tensor, start: tf.Tensor, loss_of_logits, eps: tf.Tensor,
            n: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
        """``n`` signed-gradient ascent steps on ``loss_of_logits`` from ``start``, each
        projected onto the ε-ball around ``x`` and onto [0, 1] (inference mode)."""

        def body(i, x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = loss_of_logits(self.net(x_adv, training=False))
            x_adv = x_adv + alpha * tf.sign(tape.gradient(loss, x_adv))
            x_adv = tf.clip_by_value(x_adv, x - eps, x + eps)
            return i + 1, tf.stop_gradient(tf.clip_by_value(x_adv, 0.0, 1.0))

        _, x_adv = tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), start))
        return x_adv


class PGDTrainer(RobustTrainer):
    """Trains ``net`` on PGD images of every batch (Madry et al. 2018), in-graph."""

    def __init__(self, net: keras.Model, settings: Settings, seed: int, total_steps: int,
                 **kwargs):
        super().__init__(net, settings, seed, total_steps, **kwargs)
        self.random_start = bool(settings.random_start)
        self.attack_loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                reduction=None)

    def adversarial(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """PGD images for ``x`` (true one-hot labels ``y``) at the current ε and steps."""
        eps, n, alpha = self.budget()
        start = x
        if self.random_start:
            start = x + keras.random.uniform(tf.shape(x), -1.0, 1.0,
                                             seed=self.seed_generator) * eps
            start = tf.clip_by_value(start, 0.0, 1.0)
        return self.pgd(x, start, lambda logits: self.attack_loss(y, logits), eps, n, alpha)

    def train_step(self, data):
        """Keras' own training step (loss, optimizer, metrics), on the PGD batch."""
        x, y = data
        logs = super().train_step((self.adversarial(x, y), y))
        self.update_averages()
        return logs


def steps_per_epoch(ctx: StageContext) -> int:
    return math.ceil(len(ctx.x_train) / ctx.train.batch_size)


def fit_trainer(trainer: RobustTrainer, model: keras.Model, ctx: StageContext, epochs: int,
                settings: RobustSettings, optimizer: keras.optimizers.Optimizer,
                desc: str, **compile_kwargs) -> keras.Model:
    """Compile and ``fit`` an in-graph trainer with the stage's callbacks; returns ``model``."""
    trainer.compile(optimizer=optimizer, steps_per_execution=ctx.train.steps_per_execution,
                    **compile_kwargs)
    with bn_momentum(model, settings.bn_momentum):
        trainer.fit(ctx.x_train, ctx.y_train_onehot, batch_size=ctx.train.batch_size,
                    epochs=epochs, shuffle=True, verbose=0, callbacks=ctx.callbacks(desc))
    trainer.end_on_averages()
    return model


def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """PGD-adversarially train ``model`` for ``epochs`` epochs; returns the same Keras model."""
    if settings.backend == "art":
        return _train_art(model, ctx, epochs, settings)
    seed = int(np.random.randint(2**31 - 1))  # from the caller-seeded global RNG
    total = steps_per_epoch(ctx) * epochs
    trainer = PGDTrainer(model, settings, seed=seed, total_steps=total, name="pgd_trainer")
    return fit_trainer(trainer, model, ctx, epochs, settings,
                       stage_optimizer(settings, ctx, total),
                       f"{ctx.metric_prefix} (PGD-AT, compiled)",
                       loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])


def _train_art(model: keras.Model, ctx: StageContext, epochs: int,
               settings: Settings) -> keras.Model:
    """The reference: ART's ``AdversarialTrainerMadryPGD``, one logged epoch at a time."""
    from art.defences.trainer import AdversarialTrainerMadryPGD

    from art_study.defenses.adversarial_training import _BatchMeans, _quiet_art

    model.compile(optimizer=stage_optimizer(settings, ctx, steps_per_epoch(ctx) * epochs),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    classifier = CompiledKerasClassifier(model)
    trainer = AdversarialTrainerMadryPGD(
        classifier, nb_epochs=1, batch_size=ctx.train.batch_size, eps=settings.eps,
        eps_step=settings.alpha_ratio() * settings.eps / settings.steps,
        max_iter=settings.steps, num_random_init=int(settings.random_start))
    # ART's PGD would split each training batch into its own default batches of 32 and show
    # a progress bar per batch: one batch of the training size, silent.
    trainer.attack.set_params(batch_size=ctx.train.batch_size, verbose=False)
    means = _BatchMeans()
    with bn_momentum(model, settings.bn_momentum):
        for _ in tqdm(range(epochs), desc=f"{ctx.metric_prefix} (PGD-AT, ART)",
                      disable=not ctx.progress):
            means.reset()
            t0 = time.perf_counter()
            with _quiet_art():
                trainer.fit(ctx.x_train, ctx.y_train_onehot, nb_epochs=1,
                            batch_size=ctx.train.batch_size, callbacks=[means, RaiseOnNaN()])
            ctx.log_epoch({**means.means(), "epoch_time_s": time.perf_counter() - t0})
    return model
