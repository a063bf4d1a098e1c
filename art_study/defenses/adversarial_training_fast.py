"""``adversarial_training_fast``: FGSM adversarial training compiled into the training step.

The same training as ``adversarial_training`` (ART's ``AdversarialTrainer`` with its FGSM): in
every batch a share ``ratio`` of the images, chosen at random, is replaced by FGSM images
crafted against the current weights (inference mode, as ART's ``loss_gradient``), with the true
labels by default or the model's own predictions (``labels``, see ``adversarial_training`` on
label leaking), and the model takes one optimizer step on the mixed batch. The difference
is where it runs: ART crafts the images in NumPy batches and calls ``model.fit`` once per
batch (about 0.1 s of Keras overhead per call on a CPU); here the attack and the step are one
``tf.function``, driven by an ordinary Keras ``fit``. Only the adversarial share is attacked,
so with ``ratio`` 0.5 an epoch costs the plain epoch plus about half a forward/backward pass.

Optionally the FGSM starts from a random point (Wong et al. 2020, "Fast is better than free"):
δ ~ U(-ε, ε), then one signed-gradient step of size α from ``x + δ``, and the result is
projected back onto the ε-ball around ``x`` and onto [0, 1]. Without the random start the step
is the plain FGSM of ε, the images ART's ``FastGradientMethod`` makes.

The training loop is Keras' own: a thin :class:`FGSMTrainer` wrapper whose ``train_step``
makes the mixed batch, fitted with the stage's callbacks (per-epoch ``loss``, ``accuracy``,
``epoch_time_s`` via ``ctx.log_epoch``, the NaN guard, the progress bar). ``loss`` and
``accuracy`` are those of the mixed batches, as in ``adversarial_training``. The wrapper owns
no weights: the stage returns the incoming network itself (the plain CNN, or the CNN with its
gradient-masking layers), compiled as before, so it saves and loads as ``.h5`` like every
stage. Randomness comes from the global RNGs the caller seeds (``keras.utils.set_random_seed``,
as the executor does per stage): Keras' shuffling, and a ``SeedGenerator`` for the adversarial
share and the random start whose seed is drawn from NumPy's RNG. The same seed gives the same
weights (with TF op determinism, also on; tests/test_adversarial_training_fast.py).
"""

from __future__ import annotations

from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf
from pydantic import ConfigDict, Field

from art_study.attacks.fgsm import signed_gradient
from art_study.datasets import Eps
from art_study.defenses.adversarial_training import LabelSource
from art_study.defenses.base import DefenseSettings, StageContext


class Settings(DefenseSettings):
    """FGSM budget, adversarial share of each batch, and the optional random start."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    eps: Eps = Field(0.3, gt=0.0, le=1.0)
    """ε_train, the L∞ budget on the [0, 1] pixel scale; the default 0.3 is that of
    ``adversarial_training`` (the standard MNIST budget, the top of the evaluation sweep)."""

    ratio: float = Field(0.5, gt=0.0, le=1.0)
    """Share of each batch replaced by adversarial images (rounded up, as ART's
    ``AdversarialTrainer``); 0.5 is Goodfellow et al. (2015)'s equal weighting and ART's
    default."""

    random_start: bool = False
    """Start the FGSM step from ``x + U(-ε, ε)`` (Wong et al. 2020). Off by default: then the
    adversarial images are exactly the paper's FGSM and ART's, as in ``adversarial_training``."""

    step_size: float | None = Field(None, gt=0.0, le=2.0)
    """α, the size of the signed-gradient step (pixel scale). Unset: ε without a random start
    (plain FGSM), 1.25·ε with one, the value Wong et al. (2020) recommend (α = 1.25 ε). The
    result is always projected onto the ε-ball, so α > ε only matters after a random start."""

    labels: LabelSource = "true"
    """Labels the training FGSM is crafted with: ``true`` (ART's ``AdversarialTrainer``, the
    paper; prone to label leaking, Kurakin et al. 2017) or ``predicted`` (the model's own
    argmax in inference mode, as ART's ``FastGradientMethod`` recommends)."""

    # Added after stage keys existed: left out of the key at this value (same training).
    key_defaults: ClassVar[dict[str, object]] = {"labels": "true"}

    def alpha(self) -> float:
        """The step size in use (see ``step_size``)."""
        if self.step_size is not None:
            return self.step_size
        return 1.25 * self.eps if self.random_start else self.eps


class FGSMTrainer(keras.Model):
    """Trains ``net`` on batches whose share ``ratio`` is replaced by FGSM images, in-graph.

    Only a training wrapper: ``fit`` it, then keep ``net``. Its variables are ``net``'s plus the
    ``SeedGenerator`` state of the adversarial share and the random start.
    """

    def __init__(self, net: keras.Model, settings: Settings, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.eps = float(settings.eps)
        self.alpha = float(settings.alpha())
        self.ratio = float(settings.ratio)
        self.random_start = bool(settings.random_start)
        self.predicted_labels = settings.labels == "predicted"
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.attack_loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                reduction=None)

    def call(self, x, training=False):
        return self.net(x, training=training)

    def adversarial(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """FGSM images for ``x`` with the optional random start, crafted with the one-hot true
        labels ``y`` or, with ``labels: predicted``, the model's argmax on the clean ``x``."""
        if self.predicted_labels:
            logits = self.net(x, training=False)
            y = tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(y)[-1], dtype=y.dtype)
        start = x
        if self.random_start:
            start = x + keras.random.uniform(tf.shape(x), -self.eps, self.eps,
                                             seed=self.seed_generator)
            start = tf.clip_by_value(start, 0.0, 1.0)
        x_adv = start + self.alpha * signed_gradient(self.net, self.attack_loss, start, y)
        x_adv = tf.clip_by_value(x_adv, x - self.eps, x + self.eps)
        return tf.clip_by_value(x_adv, 0.0, 1.0)

    def mixed_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The batch with ceil(ratio · n) randomly chosen images made adversarial.

        The batch is permuted and its first ``n_adv`` images attacked: the loss is a mean and
        BatchNorm's statistics do not depend on the order, so this is ART's replacement at
        random positions without a scatter.
        """
        n = tf.shape(x)[0]
        n_adv = tf.cast(tf.math.ceil(self.ratio * tf.cast(n, tf.float32)), tf.int32)
        order = tf.argsort(keras.random.uniform((n,), seed=self.seed_generator))
        x, y = tf.gather(x, order), tf.gather(y, order)
        x_adv = self.adversarial(x[:n_adv], y[:n_adv])
        return tf.concat([x_adv, x[n_adv:]], axis=0), y

    def train_step(self, data):
        """Keras' own training step (loss, optimizer, metrics), on the mixed batch."""
        x, y = data
        return super().train_step(self.mixed_batch(x, y))

def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """Adversarially train ``model`` for ``epochs`` epochs; returns the same Keras model."""
    seed = int(np.random.randint(2**31 - 1))  # from the caller-seeded global RNG
    trainer = FGSMTrainer(model, settings, seed=seed, name="fgsm_trainer")
    # The incoming model's own compile choices (optimizer, logits cross-entropy, accuracy).
    trainer.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"],
                    steps_per_execution=ctx.train.steps_per_execution)
    trainer.fit(ctx.x_train, ctx.y_train_onehot, batch_size=ctx.train.batch_size,
                epochs=epochs, shuffle=True, verbose=0,
                callbacks=ctx.callbacks(f"{ctx.metric_prefix} (adversarial, compiled)"))
    return model
