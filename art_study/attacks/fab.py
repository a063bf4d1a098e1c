"""Croce & Hein (2020)'s FAB-T (targeted Fast Adaptive Boundary attack, L∞), compiled.

FAB looks for the *smallest* L∞ perturbation that changes the prediction. At the current point
``x_k`` it linearises the decision boundary between the true class ``y`` and the target ``t``
(``f = z_t - z_y``, the hyperplane ``f(x_k) + ∇f·(z - x_k) = 0``), projects both ``x_k`` and
the clean image ``x`` onto that hyperplane inside the box ``[0, 1]`` (the minimal-L∞ step onto
it, :func:`project_linf`), and moves to a convex combination of the two projections,
overshooting by ``η``:

    x_{k+1} = clip((x_k + η·d_k)(1 - α) + (x + η·d_0)·α),   α = min(‖d_k‖/(‖d_k‖ + ‖d_0‖), α_max)

so the iterate is pulled towards the clean image (the *adaptive* part). Whenever the iterate is
misclassified (any wrong class, not only ``t``) it is recorded if closer than the best so far
and pulled back towards ``x`` by ``β`` (``x + β·(x_{k+1} - x)``). No random start: AutoAttack's
standard version runs FAB-T with one restart, and the reference draws a random start only
from the second restart on.

Defaults are the reference's (``autoattack/fab_base.py`` as AutoAttack sets it for FAB-T):
100 iterations, ``α_max`` 0.1, ``η`` 1.05, ``β`` 0.9, the 9 most likely wrong classes of the
clean image as targets, in turn, each on the images still robust. FAB never looks at ε; at a
budget ε an image counts as broken when the point found is misclassified **and** its L∞
distance to the clean image is at most ε (how AutoAttack scores it), so one search serves every
ε (:meth:`FABT.minimal`).

Cost per iteration: one forward and backward pass (the gradient of ``z_t - z_y``) and one
forward pass (is the new point misclassified?), as in the reference. The iteration loop runs in
one ``tf.function``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from art_study.attacks.apgd import _logits, check_target_classes
from art_study.models import input_shape_of, n_classes_of

#: The reference's step constants: largest weight of the clean image's projection (``α_max``),
#: overshoot (``η``), backward step after a success (``β``).
ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
#: Floor of a projection's norm in ``α`` (the reference's), so ``α`` is defined at the boundary.
MIN_NORM = 1e-8


def project_linf(t: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """The smallest-L∞ step ``d`` (rows of ``t``, flattened) with ``w·(t + d) = b`` and
    ``0 ≤ t + d ≤ 1``; where the box cannot reach the hyperplane, the box corner that gets
    closest (every coordinate moved as far as it can in the direction of ``w``).

    With ``c = b - w·t`` made non-negative (``w`` flipped with it), a step of L∞ radius ``λ``
    gains at most ``h(λ) = Σ |w_i|·min(λ, r_i)``, ``r_i`` the room coordinate ``i`` has in the
    direction of ``w_i``. ``h`` is piecewise linear and increasing between the sorted ``r_i``:
    the answer is the ``λ`` with ``h(λ) = c``, found on the segment where ``h`` crosses ``c``,
    and ``d_i = sign(w_i)·min(λ, r_i)``.
    """
    c = tf.reduce_sum(w * t, axis=1) - b
    sign = tf.where(c > 0.0, -1.0, 1.0)  # so that w·d must gain |c| ≥ 0
    w = w * sign[:, None]
    c = tf.abs(c)
    direction = tf.sign(w)
    room = tf.where(w > 0.0, 1.0 - t, tf.where(w < 0.0, t, 0.0))
    order = tf.argsort(room, axis=1)
    r = tf.gather(room, order, batch_dims=1)
    aw = tf.gather(tf.abs(w), order, batch_dims=1)
    total = tf.reduce_sum(aw, axis=1, keepdims=True)
    below = tf.cumsum(aw * r, axis=1)  # Σ_{j ≤ k} |w_j| r_j
    above = total - tf.cumsum(aw, axis=1)  # Σ_{j > k} |w_j|
    h = below + r * above  # h at each breakpoint, non-decreasing
    k = tf.reduce_sum(tf.cast(h < c[:, None], tf.int32), axis=1)
    zero = tf.zeros_like(total)
    below_k = tf.gather(tf.concat([zero, below], 1), k, batch_dims=1)
    above_k = tf.gather(tf.concat([total, above], 1), k, batch_dims=1)
    lam = (c - below_k) / tf.maximum(above_k, 1e-30)
    feasible = h[:, -1] >= c
    d = direction * tf.minimum(lam[:, None], room)
    return tf.where(feasible[:, None], d, direction * room)


class FABT:
    """Targeted L∞ FAB against a Keras model with logits, after Croce & Hein (2020).

    Settings go to the constructor, data to :meth:`attack` (as :class:`~.apgd.APGD`). The
    iteration loop is traced once per instance.
    """

    def __init__(self, model: keras.Model, *, n_iter: int = 100, n_target_classes: int = 9,
                 alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
                 batch_size: int = 500):
        for name, v in (("max_iter", n_iter), ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")
        check_target_classes(n_target_classes, model)
        if not (0.0 <= alpha_max <= 1.0 and eta >= 1.0 and 0.0 < beta < 1.0):
            raise ValueError(f"need 0 ≤ alpha_max ≤ 1, eta ≥ 1, 0 < beta < 1; got "
                             f"{alpha_max!r}, {eta!r}, {beta!r}")
        self.model, self.n_iter, self.n_target_classes = model, n_iter, n_target_classes
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        self.batch_size = batch_size
        self._run = self._build()

    def _build(self):
        model, n_iter = self.model, self.n_iter
        alpha_max, eta, beta = self.alpha_max, self.eta, self.beta
        spec = tf.TensorSpec((None, *input_shape_of(model)), tf.float32)
        lab = tf.TensorSpec((None, n_classes_of(model)), tf.float32)

        def flat(v):
            return tf.reshape(v, [tf.shape(v)[0], -1])

        def per_image(v):
            return tf.reshape(v, [-1, 1, 1, 1])

        @tf.function(input_signature=[spec, lab, lab])
        def run(x, y, target):
            """(L∞ distance of the closest misclassified iterate, or +inf; that iterate)."""
            label = tf.argmax(y, axis=1)
            n = tf.shape(x)[0]
            x0 = flat(x)
            x_k, x_best = x, x
            best = tf.fill([n], np.inf)
            for _ in tf.range(n_iter):
                with tf.GradientTape() as tape:
                    tape.watch(x_k)
                    logits = model(x_k, training=False)
                    f = tf.reduce_sum((target - y) * logits, axis=1)  # z_t - z_y
                    total = tf.reduce_sum(f)
                w = flat(tape.gradient(total, x_k))
                b = tf.reduce_sum(w * flat(x_k), axis=1) - f  # the linearised f = 0
                d = project_linf(tf.concat([flat(x_k), x0], 0), tf.concat([w, w], 0),
                                 tf.concat([b, b], 0))
                norms = tf.maximum(tf.reduce_max(tf.abs(d), axis=1), MIN_NORM)
                a1, a2 = norms[:n], norms[n:]
                alpha = per_image(tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max))
                d1 = tf.reshape(d[:n], tf.shape(x))
                d2 = tf.reshape(d[n:], tf.shape(x))
                x_k = tf.clip_by_value((x_k + eta * d1) * (1.0 - alpha)
                                       + (x + eta * d2) * alpha, 0.0, 1.0)
                wrong = tf.argmax(model(x_k, training=False), axis=1) != label
                dist = tf.reduce_max(tf.abs(flat(x_k) - x0), axis=1)
                closer = wrong & (dist < best)
                x_best = tf.where(per_image(closer), x_k, x_best)
                best = tf.where(closer, dist, best)
                x_k = tf.where(per_image(wrong), x + beta * (x_k - x), x_k)
            return best, x_best

        return run

    def _target(self, x: np.ndarray, y1h: np.ndarray, t1h: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """One target class per image, in batches: (distance found or inf, that point)."""
        dist = np.full(len(x), np.inf, np.float32)
        x_adv = x.copy()
        for s in range(0, len(x), self.batch_size):
            sl = slice(s, s + self.batch_size)
            d, xa = self._run(tf.constant(x[sl]), tf.constant(y1h[sl]), tf.constant(t1h[sl]))
            dist[sl], x_adv[sl] = d.numpy(), xa.numpy()
        return dist, x_adv

    def _prepare(self, x, y):
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        ranked = np.argsort(_logits(self.model, x, self.batch_size), axis=1)  # ascending
        return x, y, np.eye(n_classes_of(self.model), dtype=np.float32)[y], ranked

    def attack(self, x: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """``(fooled, x_adv)`` for images ``x`` with integer labels ``y`` at budget ``eps``.

        The targets in turn (the 2nd most likely class of the clean image first), each on the
        images still robust; ``fooled[i]`` when a point within ε was misclassified, ``x_adv[i]``
        that point (else the clean image). Images already misclassified are left as they are.
        """
        x, y, y1h, ranked = self._prepare(x, y)
        fooled = ranked[:, -1] != y
        x_adv = x.copy()
        eye = np.eye(n_classes_of(self.model), dtype=np.float32)
        for k in range(2, self.n_target_classes + 2):
            todo = np.flatnonzero(~fooled)
            if not len(todo):
                break
            dist, xa = self._target(x[todo], y1h[todo], eye[ranked[todo, -k]])
            hit = dist <= eps
            fooled[todo[hit]] = True
            x_adv[todo[hit]] = xa[hit]
        return fooled, x_adv

    def minimal(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(distance, x_adv)``: the smallest L∞ distance at which any target's search found a
        misclassified point (0 for images misclassified clean, inf where none), and that point.
        Runs every target on every image: the whole ε curve in one go."""
        x, y, y1h, ranked = self._prepare(x, y)
        best = np.where(ranked[:, -1] != y, 0.0, np.inf).astype(np.float32)
        x_adv = x.copy()
        eye = np.eye(n_classes_of(self.model), dtype=np.float32)
        todo = np.flatnonzero(np.isinf(best))
        for k in range(2, self.n_target_classes + 2):
            if not len(todo):
                break
            dist, xa = self._target(x[todo], y1h[todo], eye[ranked[todo, -k]])
            closer = dist < best[todo]
            best[todo[closer]] = dist[closer]
            x_adv[todo[closer]] = xa[closer]
        return best, x_adv
