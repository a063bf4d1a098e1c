"""``trades``: a TRADES variant (Zhang et al. 2019) in TensorFlow, compiled into the training step.

TRADES trades clean accuracy for robustness explicitly: it minimises

    CE(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x'))

where x' maximises the KL term within the ε-ball: a start at x + 0.001·N(0, 1), then ``steps``
signed-gradient steps of size α on KL(p(x) ‖ p(x')) with p(x) held fixed, each projected onto the
ε-ball around x and onto [0, 1] (the authors' ``trades_loss``). The attack needs no label, so
it pushes x' away from the model's own prediction rather than from y. KL is summed over classes
and averaged over the batch (PyTorch's ``KLDivLoss(reduction='sum') / batch_size``).

ART's ``AdversarialTrainerTRADES`` exists for PyTorch only, so this is written by hand;
``tests/test_robust_defenses.py`` checks :func:`trades_loss` against the loss written out in
NumPy. As in the authors' code, the attack runs in inference mode (BatchNorm's moving
statistics, no dropout) and the loss on two training-mode passes, on x and on x'. What differs
is ``kl_mode``, the dropout masks of those two passes:

- ``shared`` (the default, and why this is a variant rather than the authors' TRADES): the pass
  on x' rewinds the seed generators of the network's random layers and so reuses the masks of
  the pass on x (and the noise of any noise layer a previous defense added). The KL of an image
  with itself is zero, β·KL penalises only what the attack moved, and dropout still
  regularises both terms.
- ``independent`` (the authors' ``trades_loss``): each pass draws its own masks, so the KL is
  not zero even for x' = x, and β·KL also penalises the disagreement of two dropout masks,
  which the network can lower by flattening its outputs towards uniform. The paper's CNN, with
  dropout 0.5 right before the logits, does so (``tests/test_robust_defenses.py``); the
  authors' MNIST network has two more layers after its dropout.

Figures from either mode are this variant's on this network and budget, not comparable with the
published TRADES numbers. The recipes tried and what each measured: ``docs/robust.md``.

ε, steps, step size (default 2.5·ε/steps), the ε warm-up, the learning-rate schedule and the
BatchNorm momentum are the settings of ``pgd_adversarial_training`` (:class:`RobustSettings`)
and mean the same (the start noise is not scaled by the ε warm-up: 0.001 is not a budget). The
stage's ``loss`` is the TRADES objective and its ``accuracy`` the clean-batch accuracy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import keras
import numpy as np
import tensorflow as tf
from pydantic import Field

from art_study.defenses.base import StageContext
from art_study.defenses.pgd_adversarial_training import (
    RobustSettings,
    RobustTrainer,
    _all_layers,
    fit_trainer,
    stage_optimizer,
    steps_per_epoch,
)


class Settings(RobustSettings):
    """TRADES: the robust budget and schedules, plus β."""

    beta: float = Field(6.0, ge=0.0, le=1000.0)
    """Weight of the KL (robustness) term, 1/λ in the paper; larger is more robust and less
    accurate. The authors suggest β in [1, 10]; their MNIST script (``train_trades_mnist.py``)
    defaults to 1. 0 is plain training on clean images."""

    start_noise: float = Field(0.001, ge=0.0, le=1.0)
    """Standard deviation of the Gaussian start of the inner maximisation (the authors' 0.001:
    x' = x gives a zero KL gradient)."""

    kl_mode: Literal["shared", "independent"] = "shared"
    """The dropout masks of the loss's two training-mode passes (x and x'): ``shared`` (the
    same masks, so the KL of an image with itself is zero) or ``independent`` (the authors':
    each pass draws its own, and β·KL also penalises dropout noise); see the module
    docstring."""

    key_defaults: ClassVar[dict[str, object]] = {**RobustSettings.key_defaults,
                                                 "kl_mode": "independent"}


def kl_per_image(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """KL(softmax p ‖ softmax q) summed over classes, one value per image (log-space, stable)."""
    log_p = tf.nn.log_softmax(p_logits, axis=-1)
    log_q = tf.nn.log_softmax(q_logits, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def noise_generators(net: keras.Model) -> list[keras.random.SeedGenerator]:
    """The seed generators of ``net``'s random layers (dropout, and any noise layer a previous
    defense added): what draws a training-mode pass's masks and noise."""
    generators = [getattr(la, "seed_generator", None) for la in _all_layers(net)]
    return [g for g in generators if isinstance(g, keras.random.SeedGenerator)]


def trades_terms(net: keras.Model, x: tf.Tensor, x_adv: tf.Tensor, y_onehot: tf.Tensor,
                 training: bool = True, kl_mode: str = "independent"
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(CE(f(x), y), KL(p(x) ‖ p(x')), clean logits), both terms averaged over the batch, from
    two passes in mode ``training``. ``kl_mode`` ``shared``: the pass on x' reuses the random
    draws of the pass on x (the seed generators rewound), so both see the same dropout masks;
    ``independent``: each pass draws its own (the authors')."""
    generators = noise_generators(net) if kl_mode == "shared" else []
    states = [tf.identity(g.state.value) for g in generators]
    logits = net(x, training=training)
    for g, state in zip(generators, states, strict=True):
        g.state.assign(state)
    logits_adv = net(x_adv, training=training)
    ce = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y_onehot, logits))
    return ce, tf.reduce_mean(kl_per_image(logits, logits_adv)), logits


def trades_loss(net: keras.Model, x: tf.Tensor, x_adv: tf.Tensor, y_onehot: tf.Tensor,
                beta: float, training: bool = True,
                kl_mode: str = "independent") -> tuple[tf.Tensor, tf.Tensor]:
    """(TRADES objective averaged over the batch, clean logits): CE(f(x), y) + β·KL."""
    ce, kl, logits = trades_terms(net, x, x_adv, y_onehot, training, kl_mode)
    return ce + beta * kl, logits


class TRADESTrainer(RobustTrainer):
    """Trains ``net`` on the TRADES objective, attack and step in one ``tf.function``."""

    def __init__(self, net: keras.Model, settings: Settings, seed: int, total_steps: int,
                 **kwargs):
        super().__init__(net, settings, seed, total_steps, **kwargs)
        self.beta = float(settings.beta)
        self.start_noise = float(settings.start_noise)
        self.kl_mode = settings.kl_mode
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def adversarial(self, x: tf.Tensor) -> tf.Tensor:
        """x' maximising KL(p(x) ‖ p(x')) in the ε-ball, at the current ε and steps."""
        eps, n, alpha = self.budget()
        p_logits = tf.stop_gradient(self.net(x, training=False))
        start = x + self.start_noise * keras.random.normal(tf.shape(x), seed=self.seed_generator)
        start = tf.clip_by_value(tf.clip_by_value(start, x - eps, x + eps), 0.0, 1.0)
        return self.pgd(x, start, lambda logits: kl_per_image(p_logits, logits), eps, n, alpha)

    def train_step(self, data):
        x, y = data
        x_adv = self.adversarial(x)
        variables = self.net.trainable_variables
        with tf.GradientTape() as tape:
            loss, logits = trades_loss(self.net, x, x_adv, y, self.beta, training=True,
                                       kl_mode=self.kl_mode)
            if self.net.losses:
                loss = loss + tf.add_n(self.net.losses)
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.update_averages()
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}


def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """TRADES-train ``model`` for ``epochs`` epochs; returns the same Keras model."""
    seed = int(np.random.randint(2**31 - 1))  # from the caller-seeded global RNG
    total = steps_per_epoch(ctx) * epochs
    trainer = TRADESTrainer(model, settings, seed=seed, total_steps=total, name="trades_trainer")
    return fit_trainer(trainer, model, ctx, epochs, settings,
                       stage_optimizer(settings, ctx, total),
                       f"{ctx.metric_prefix} (TRADES, compiled)")
