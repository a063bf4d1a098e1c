"""The paper's FGSM: one signed gradient step on the categorical cross-entropy.

Written by hand on purpose (the paper's attack is a ``tf.GradientTape`` function), compiled with
``tf.function`` and batched. Like Foolbox's FGSM it is one instance of a signed-gradient step, so
iterative attacks and the in-graph adversarial-training step reuse :func:`signed_gradient`.
``tests/test_attacks.py`` cross-checks it against ART's ``FastGradientMethod`` (max |Δ| ≤ 1e-6).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from art_study.models import input_shape_of, n_classes_of


def input_gradient(model: keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """∇ₓ loss(y, model(x)) with the model in inference mode.

    The loss is unreduced (one value per image) and the tape sums it, so each image's gradient is
    its own loss gradient, the same quantity ART's ``loss_gradient`` computes.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = loss_fn(y, model(x, training=False))
    return tape.gradient(loss, x)


def signed_gradient(model: keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """sign(∇ₓ loss(y, model(x))) with the model in inference mode (:func:`input_gradient`)."""
    return tf.sign(input_gradient(model, loss_fn, x, y))


class FGSM:
    """Untargeted L∞ FGSM against a Keras model that outputs logits.

    ``x_adv = clip(x + ε · sign(∇ₓ CE(y, f(x))), 0, 1)``. The step is traced once per model
    (fixed input signature, ε a tensor), so sweeping ε or batch sizes never retraces.
    """

    def __init__(self, model: keras.Model, *, batch_size: int = 500, progress: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        self._shapes = (None, *input_shape_of(model)), (None, n_classes_of(model))
        x_shape, y_shape = self._shapes

        @tf.function(
            input_signature=[
                tf.TensorSpec(x_shape, tf.float32),
                tf.TensorSpec(y_shape, tf.float32),
                tf.TensorSpec((), tf.float32),
            ]
        )
        def step(x: tf.Tensor, y: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            return tf.clip_by_value(x + eps * signed_gradient(model, loss_fn, x, y), 0.0, 1.0)

        @tf.function(input_signature=[
            tf.TensorSpec(x_shape, tf.float32),
            tf.TensorSpec(y_shape, tf.float32),
        ])
        def gradient(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            return input_gradient(model, loss_fn, x, y)

        self._step, self._gradient = step, gradient

    def warm_up(self, *, sweep: bool = False) -> None:
        """Trace the compiled step now (and, with ``sweep``, :meth:`sweep`'s gradient), so later
        timings measure throughput only. Each trace is a call: on a model with gradient noise
        it draws noise, so trace the sweep only where it will be used."""
        x, y = (tf.zeros((1, *shape[1:])) for shape in self._shapes)
        self._step(x, y, tf.constant(0.0))
        if sweep:
            self._gradient(x, y)

    def gradient_repeats(self, x: np.ndarray, y_onehot: np.ndarray) -> bool:
        """Whether two input gradients of the same images agree bit for bit: the test, beside
        :func:`draws_randomness_in_inference`, that :meth:`sweep` gives :meth:`generate`'s
        images. It catches randomness no layer declares (``tf.random`` inside a ``Lambda`` or a
        custom layer); on a model it finds random, its two calls have drawn noise."""
        xb, yb = tf.constant(x), tf.constant(y_onehot)
        return bool(tf.reduce_all(self._gradient(xb, yb) == self._gradient(xb, yb)))

    def sweep(self, x: np.ndarray, y_onehot: np.ndarray, eps_values: list[float]
              ) -> dict[float, np.ndarray]:
        """:meth:`generate` at every ε of ``eps_values`` from one gradient per image.

        FGSM's direction does not depend on ε, so one signed gradient serves the whole sweep:
        a sixth of the gradients for the study's six ε, and bit for bit the images of
        :meth:`generate` (``tests/test_attacks.py``), as long as the model's gradient is a
        function of its input. Use it only then (:func:`draws_randomness_in_inference` and
        :meth:`gradient_repeats`): a model that draws noise in its gradients gets fresh noise per
        ε from :meth:`generate`.
        """
        out = {eps: np.empty_like(x, dtype=np.float32) for eps in eps_values}
        eps_t = [tf.constant(eps, tf.float32) for eps in eps_values]
        starts = range(0, len(x), self.batch_size)
        for s in tqdm(starts, desc="FGSM (ours), one gradient for every ε",
                      disable=not self.progress, leave=False):
            e = s + self.batch_size
            xb = tf.constant(x[s:e])
            direction = tf.sign(self._gradient(xb, tf.constant(y_onehot[s:e])))
            for eps, et in zip(eps_values, eps_t, strict=True):
                out[eps][s:e] = tf.clip_by_value(xb + et * direction, 0.0, 1.0).numpy()
        return out

    def generate(self, x: np.ndarray, y_onehot: np.ndarray, eps: float) -> np.ndarray:
        """Adversarial images for ``x`` with one-hot true labels ``y_onehot`` at budget ``eps``."""
        eps_t = tf.constant(eps, tf.float32)
        out = np.empty_like(x, dtype=np.float32)
        starts = range(0, len(x), self.batch_size)
        for s in tqdm(starts, desc=f"FGSM (ours) ε={eps:g}", disable=not self.progress,
                      leave=False):
            e = s + self.batch_size
            out[s:e] = self._step(tf.constant(x[s:e]), tf.constant(y_onehot[s:e]), eps_t).numpy()
        return out


# Keras layers that draw random numbers in training only: the identity in inference.
_TRAINING_ONLY_RANDOMNESS = (keras.layers.Dropout, keras.layers.GaussianNoise,
                             keras.layers.GaussianDropout, keras.layers.AlphaDropout)


def draws_randomness_in_inference(model: keras.Model) -> bool:
    """Whether a layer of ``model`` (nested models included) may draw random numbers in an
    inference-mode forward or backward pass: any layer holding a Keras ``SeedGenerator`` other
    than the training-only ones above (dropout, Gaussian noise), e.g. gradient masking's
    ``GradientNoise`` or a user's randomised defense. Conservative: an unknown random layer
    counts as random, which costs speed (:meth:`FGSM.sweep` is not used), never correctness;
    so does every model if Keras no longer keeps a layer's generators in ``_seed_generators``."""
    if not hasattr(model, "_seed_generators"):
        return True
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        if getattr(layer, "_seed_generators", None) and not isinstance(
                layer, _TRAINING_ONLY_RANDOMNESS):
            return True
    return False
