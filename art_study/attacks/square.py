"""Andriushchenko et al. (2020)'s Square attack (L∞), compiled: the AutoAttack component.

ART's ``SquareAttack`` implements the same algorithm (vertical-stripe start, one random square
per iteration shared by the batch with a random sign per channel, margin loss, the ``p``
schedule), but calls ``predict`` three times per iteration from Python; at the 5 000 queries of
AutoAttack's standard version on a robust model, where no image falls early, that is hours on a
CPU. :class:`Square` runs ``chunk`` iterations at a time inside one ``tf.function``, one forward
pass per iteration, and drops the images already broken between chunks.

Faithful to the reference (``autoattack/square.py``, ``resc_schedule=False`` as AutoAttack
runs it): the schedule halves ``p`` after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
queries; a candidate replaces the current point when it lowers the margin or misclassifies;
a misclassified image is frozen. ``tests/test_square.py`` checks it against ART's
``SquareAttack`` on the same images (never weaker beyond sampling noise).
"""

from __future__ import annotations

import math
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from art_study.attacks.base import Attack, Outcome
from art_study.models import INPUT_SHAPE, input_shape_of, n_classes_of

#: Iteration thresholds after which ``p`` halves (the reference's ``p_selection``).
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_at(i: int, p_init: float, n_queries: int | None = None) -> float:
    """The share of pixels the square covers at iteration ``i`` (0-based); with ``n_queries``
    the schedule is stretched to that budget (the reference's ``resc_schedule``, and what ART's
    ``SquareAttack`` does for any ``max_iter``)."""
    if n_queries is not None:
        i = int(i / n_queries * 10000)
    return p_init / 2 ** sum(i > t for t in P_HALVINGS)


def square_sizes(n_queries: int, p_init: float, rescale: bool = False,
                 image_shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    """The square's side per iteration: ``max(round(sqrt(p·h·w)), 1)`` for images (h, w, c)."""
    h, w, _ = image_shape
    scale = n_queries if rescale else None
    return np.array([max(round(math.sqrt(p_at(i, p_init, scale) * h * w)), 1)
                     for i in range(n_queries)], np.int32)


class Square(Attack):
    """L∞ Square attack with ``n_queries`` iterations (one model query each, plus the start).

    ``rescale_schedule``: stretch the ``p`` schedule to ``n_queries`` (AutoAttack keeps it off;
    on, it is ART's schedule, which the cross-check test uses).
    """

    blackbox: ClassVar[bool] = True
    iterative: ClassVar[bool] = False

    def __init__(self, model: keras.Model, *, n_queries: int = 5000, p_init: float = 0.8,
                 rescale_schedule: bool = False, batch_size: int = 1000, chunk: int = 250):
        if not isinstance(n_queries, int) or isinstance(n_queries, bool) or n_queries < 1:
            raise ValueError(f"n_queries must be an integer ≥ 1, got {n_queries!r}")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.model, self.n_queries, self.p_init = model, n_queries, p_init
        self.batch_size, self.chunk = batch_size, chunk
        self._sizes = tf.constant(square_sizes(n_queries, p_init, rescale_schedule,
                                               input_shape_of(model)))
        self._run = self._build()

    def _build(self):
        model = self.model
        h, w, c = input_shape_of(model)
        sizes = self._sizes

        def margin(x, y):
            logits = model(x, training=False)
            z_y = tf.reduce_sum(y * logits, axis=1)
            return z_y - tf.reduce_max(logits - 1e9 * y, axis=1)

        spec = tf.TensorSpec((None, *input_shape_of(model)), tf.float32)
        labels = tf.TensorSpec((None, n_classes_of(model)), tf.float32)

        @tf.function(input_signature=[spec, labels, spec,
                                      tf.TensorSpec((None,), tf.float32),
                                      tf.TensorSpec((), tf.float32), tf.TensorSpec((), tf.int32),
                                      tf.TensorSpec((), tf.int32), tf.TensorSpec((2,), tf.int32)])
        def run(x, y, x_best, margin_min, eps, first, last, seed):
            """Iterations ``first … last-1`` from ``(x_best, margin_min)``."""
            lo, hi = tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)
            rows = tf.range(h)[:, None, None]
            cols = tf.range(w)[None, :, None]
            for i in tf.range(first, last):
                s = sizes[i]
                r = tf.random.stateless_uniform([2 + c], tf.stack([seed[0], seed[1] + i]),
                                                dtype=tf.float32)
                vh = tf.cast(r[0] * tf.cast(h - s, tf.float32), tf.int32)
                vw = tf.cast(r[1] * tf.cast(w - s, tf.float32), tf.int32)
                sign = tf.where(r[2:] < 0.5, -1.0, 1.0)  # one per channel
                inside = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s))
                delta = tf.where(inside, 2.0 * eps * sign, 0.0)  # (h, w, c)
                x_new = tf.clip_by_value(x_best + delta, lo, hi)
                m = margin(x_new, y)
                active = margin_min > 0.0
                take = active & (m < margin_min)  # lower margin, or misclassified (m ≤ 0 < min)
                x_best = tf.where(tf.reshape(take, [-1, 1, 1, 1]), x_new, x_best)
                margin_min = tf.where(take, m, margin_min)
            return x_best, margin_min

        return run

    def attack(self, x: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """``(fooled, x_adv)`` for images ``x`` with integer labels ``y`` at budget ``eps``.

        Random numbers come from NumPy's global RNG (seeded by the caller), as in ART."""
        x = np.asarray(x, np.float32)
        y1h = np.eye(n_classes_of(self.model), dtype=np.float32)[np.asarray(y, np.int64)]
        _, w, c = input_shape_of(self.model)
        stripes = np.random.choice([-1.0, 1.0], size=(len(x), 1, w, c))
        x_best = np.clip(x + eps * stripes, 0.0, 1.0).astype(np.float32)
        margin_min = np.concatenate(
            [self._margin(x_best[s: s + self.batch_size], y1h[s: s + self.batch_size])
             for s in range(0, len(x), self.batch_size)]) if len(x) else np.zeros(0, np.float32)
        seed = tf.constant(np.random.randint(0, 2**31 - 1, size=2), tf.int32)
        eps_t = tf.constant(eps, tf.float32)
        for first in range(0, self.n_queries, self.chunk):
            last = min(first + self.chunk, self.n_queries)
            todo = np.flatnonzero(margin_min > 0.0)
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s: s + self.batch_size]
                xb, mm = self._run(tf.constant(x[idx]), tf.constant(y1h[idx]),
                                   tf.constant(x_best[idx]), tf.constant(margin_min[idx]),
                                   eps_t, tf.constant(first), tf.constant(last), seed)
                x_best[idx], margin_min[idx] = xb.numpy(), mm.numpy()
        return margin_min <= 0.0, x_best

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        fooled, x_adv = self.attack(x, y, eps)
        return Outcome(x_adv, fooled)

    def _margin(self, x: np.ndarray, y1h: np.ndarray) -> np.ndarray:
        logits = self.model(x, training=False).numpy()
        return (logits * y1h).sum(1) - (logits - 1e9 * y1h).max(1)
