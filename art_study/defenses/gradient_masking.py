"""``gradient_masking``: the paper's third defense, in both of its readings.

Kim (2025) describes gradient masking twice, and the two descriptions are different methods:

- *nullify* (Methodology): "feature extraction, where unused nodes were changed to 0 to obscure
  the correct direction of perturbation". After plain training, the mean ReLU activation of every
  unit of the hidden Dense layer (and, optionally, of every conv channel) is measured on a fixed
  slice of the training set; units that are (almost) never active are masked to 0 for good. The
  mask is a :class:`UnitMask` layer right after the masked layer, holding a fixed non-trainable
  0/1 weight, so it is saved with the model (``.h5`` and ``.keras``) and no gradient flows
  through a masked unit. A conv channel is masked at the conv's ReLU output, before its
  BatchNorm, so what the block passes on for it is a constant: no information, no gradient.
- *noise* (Background, Results, Conclusion): "injecting gradient noise ... perturbing the
  gradients used by the model". A :class:`GradientNoise` layer at the input is the identity in
  the forward pass (predictions are unchanged) and adds Gaussian noise to the gradient that flows
  back to the image, so a gradient attacker such as FGSM reads a perturbed direction.

The stage trains the incoming model on clean data for ``epochs`` epochs (exactly like ``none``),
then applies the mask and/or the noise layer. Masking layers already in the incoming model (GM
after GM) are stripped first and the mask is recomputed, so layers never stack. The returned
model is a ``keras.Sequential`` of the incoming layers (trained weights kept) with the masking
layers inserted, compiled with :func:`art_study.models.compile_model`.

Both are gradient masking in the sense of Athalye et al. (2018): they make the gradient less
useful to the attacker without making the model more robust, which is what the study measures.
"""

from __future__ import annotations

from typing import Literal

import keras
import mlflow
import numpy as np
import tensorflow as tf
from pydantic import ConfigDict, Field

from art_study.defenses.base import DefenseSettings, StageContext, fit
from art_study.models import compile_model, input_shape_of


class Settings(DefenseSettings):
    """Which reading of the paper to apply, and how strongly."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    mode: Literal["nullify", "noise", "both"] = "both"
    """Which reading: ``nullify`` (zero unused units), ``noise`` (noisy input gradient) or
    ``both``. Default ``both``: the paper describes both mechanisms for one method and gives no
    ablation, so the stage applies everything it describes; each alone is one setting away."""

    threshold: float = Field(0.01, ge=0.0, le=1.0)
    """A unit (channel) is masked when its mean activation is ≤ ``threshold`` × the mean
    activation of its layer. Relative, so one value fits every layer and every training length
    (activation scales differ by layer and grow with training). 0.01 masks the dead ReLU units
    (mean exactly 0) and the nearly dead ones, i.e. the paper's "unused nodes", without changing
    what the model predicts, where 0.1 does (docs/choices.md). 0 masks only units that never
    fire on the slice."""

    mask_conv_channels: bool = True
    """Also mask unused channels of every conv layer, not only the Dense-256 units. Default on:
    the paper's "unused nodes" is not limited to the dense layer, and dead conv channels are the
    same phenomenon one level down."""

    n_activation_samples: int = Field(5000, ge=100, le=60_000)
    """Training images (the first n, a fixed slice) whose activations decide the mask. 5000
    estimates each unit's mean activation to well under the 1 % threshold for any unit that
    fires on more than a few images, at a tenth of the cost of a pass over all 60 000."""

    noise_scale: float = Field(1.0, ge=0.0, le=100.0)
    """Standard deviation of the gradient noise, relative to the per-image RMS of the true input
    gradient. 1.0 puts noise and signal at equal energy (0 dB): the sign of every small
    gradient component, which is what FGSM uses, becomes a coin flip, while the largest
    components keep their sign, so the attack is degraded, not replaced by a random one."""

    noise_seed: int | None = Field(None, ge=0, lt=2**31)
    """Seed of the noise generator; unset → the run's seed (``ctx.seed``), so runs reproduce."""


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="art_study")
class UnitMask(keras.layers.Layer):
    """Multiply the last axis (units or channels) by a fixed 0/1 mask.

    The mask is a non-trainable weight, so it is saved and loaded with the model and no
    optimizer ever changes it. Built with all ones (no masking) until :meth:`set_mask`.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.unit_mask = self.add_weight(name="mask", shape=(self.units,), initializer="ones",
                                    trainable=False)

    def set_mask(self, keep: np.ndarray) -> None:
        """``keep[i]`` False → unit ``i`` is zeroed."""
        self.unit_mask.assign(np.asarray(keep, dtype=np.float32).reshape(self.units))

    @property
    def n_masked(self) -> int:
        return int(np.sum(keras.ops.convert_to_numpy(self.unit_mask) == 0.0))

    def call(self, x):
        return x * keras.ops.cast(self.unit_mask, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="art_study")
class GradientNoise(keras.layers.Layer):
    """Identity forward; backward adds N(0, (scale · RMS(g))²) noise to the incoming gradient.

    RMS is taken per image over all its pixels, so the noise follows the gradient's own scale
    (which changes by orders of magnitude between a confident and an uncertain prediction). The
    noise comes from a seeded Keras ``SeedGenerator``: successive gradient calls draw fresh
    noise, and a run with the same seed draws the same sequence.
    """

    def __init__(self, scale: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def call(self, x):
        scale, seed_generator = self.scale, self.seed_generator

        @tf.custom_gradient
        def noisy_identity(t):
            def grad(g):
                axes = list(range(1, len(g.shape)))
                rms = tf.sqrt(tf.reduce_mean(tf.square(g), axis=axes, keepdims=True))
                noise = keras.random.normal(tf.shape(g), dtype=g.dtype, seed=seed_generator)
                return g + scale * rms * noise

            return tf.identity(t), grad

        return noisy_identity(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "seed": self.seed}


_GM_LAYERS = (UnitMask, GradientNoise)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def train(model: keras.Model, ctx: StageContext, epochs: int, settings: Settings) -> keras.Model:
    """Train on clean data, then mask unused units and/or add gradient noise (see module doc)."""
    base = strip_masking(model)
    if base is not model:  # GM after GM: train the bare network, masks are recomputed below
        model = compile_model(base, ctx.train)
    fit(model, ctx.x_train, ctx.y_train_onehot, epochs, ctx)
    return mask(model, ctx, settings)


def mask(model: keras.Model, ctx: StageContext, settings: Settings) -> keras.Model:
    """The stage after its plain training: mask unused units and/or add the gradient noise.

    Deterministic given the trained model (the noise layer seeds its own generator), so a first
    stage applies it to the control's first stage, which is the same plain training
    (``Defense.after_plain``)."""
    keep: dict[str, np.ndarray] = {}
    if settings.mode in ("nullify", "both"):
        keep = unit_usage(model, ctx.x_train[: settings.n_activation_samples],
                          settings.threshold, settings.mask_conv_channels,
                          batch_size=max(ctx.train.batch_size, 256))
    noise = None
    if settings.mode in ("noise", "both"):
        seed = ctx.seed if settings.noise_seed is None else settings.noise_seed
        noise = GradientNoise(settings.noise_scale, seed, name="gradient_noise")

    masked = compile_model(insert_masking(model, keep, noise), ctx.train)
    # Build the (unused) optimizer state now: a saved model then loads back without Keras'
    # "skipping optimizer variables" warning.
    masked.optimizer.build(masked.trainable_variables)
    _record_counts(ctx, masked_counts(masked))
    return masked


def _record_counts(ctx: StageContext, counts: dict[str, int]) -> None:
    """Add ``gm/masked_units`` and ``gm/masked_channels`` to the stage's last epoch record (so a
    cached stage replays them too) and log them at that epoch's step."""
    figures = {f"gm/{k}": float(v) for k, v in counts.items()}
    if not ctx.history:  # no epoch trained: the counts are the stage's only record
        ctx.log_epoch(figures)
        return
    ctx.history[-1].update(figures)
    mlflow.log_metrics({f"{ctx.metric_prefix}/{k}": v for k, v in figures.items()},
                       step=ctx.step_offset + len(ctx.history) - 1)


def _maskable(layer: keras.layers.Layer, last: bool, conv: bool) -> bool:
    """Hidden Dense layers always; Conv2D layers when ``conv``; never the logits layer."""
    if last:
        return False
    return isinstance(layer, keras.layers.Dense) or (
        conv and isinstance(layer, keras.layers.Conv2D))


def unit_usage(model: keras.Model, x: np.ndarray, threshold: float, conv: bool,
               batch_size: int = 256) -> dict[str, np.ndarray]:
    """``layer name → keep`` (bool per unit/channel) for every maskable layer of ``model``.

    A unit is kept when its mean activation over ``x`` (and over positions, for a conv channel)
    is above ``threshold`` × the mean over all units of that layer. Inference mode.
    """
    last = len(model.layers) - 1
    names = [layer.name for i, layer in enumerate(model.layers)
             if _maskable(layer, i == last, conv)]
    sums = {name: 0.0 for name in names}
    for s in range(0, len(x), batch_size):
        h = keras.ops.convert_to_tensor(x[s:s + batch_size])
        for layer in model.layers:
            h = layer(h, training=False)
            if layer.name in names:
                a = keras.ops.convert_to_numpy(h)
                per_image = a.reshape(len(a), -1, a.shape[-1]).mean(axis=1)  # over positions
                sums[layer.name] = sums[layer.name] + per_image.sum(axis=0, dtype=np.float64)
    keep = {}
    for name in names:
        mean = sums[name] / len(x)
        keep[name] = mean > threshold * mean.mean()
    return keep


def strip_masking(model: keras.Model) -> keras.Sequential:
    """The incoming network without any :class:`UnitMask` / :class:`GradientNoise` layer."""
    layers = [layer for layer in model.layers
              if not isinstance(layer, (*_GM_LAYERS, keras.layers.InputLayer))]
    if len(layers) == len(model.layers) and isinstance(model, keras.Sequential):
        return model
    return keras.Sequential([keras.Input(input_shape_of(model), name="image"), *layers],
                            name=model.name)


def insert_masking(model: keras.Model, keep: dict[str, np.ndarray],
                   noise: GradientNoise | None) -> keras.Sequential:
    """Rebuild ``model`` (same trained layer objects) with the noise layer at the input and a
    :class:`UnitMask` after each layer named in ``keep``."""
    layers: list[keras.layers.Layer] = [noise] if noise is not None else []
    masks: list[tuple[UnitMask, np.ndarray]] = []
    for layer in model.layers:
        layers.append(layer)
        if layer.name in keep:
            mask = UnitMask(len(keep[layer.name]), name=f"{layer.name}_mask")
            masks.append((mask, keep[layer.name]))
            layers.append(mask)
    rebuilt = keras.Sequential([keras.Input(input_shape_of(model), name="image"), *layers],
                               name=model.name)
    for mask, k in masks:
        mask.set_mask(k)
    return rebuilt


def masked_counts(model: keras.Model) -> dict[str, int]:
    """How many Dense units and conv channels ``model``'s masks zero."""
    units = channels = 0
    previous = None
    for layer in model.layers:
        if isinstance(layer, UnitMask):
            if isinstance(previous, keras.layers.Conv2D):
                channels += layer.n_masked
            else:
                units += layer.n_masked
        previous = layer
    return {"masked_units": units, "masked_channels": channels}
