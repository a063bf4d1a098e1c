"""Croce & Hein (2020)'s APGD (L∞), compiled: the reference's schedule and its bookkeeping.

Why not ART's ``AutoProjectedGradientDescent`` for the aliases: it differs from the reference
(``autoattack/autopgd_base.py``) in the two ways that matter for a robustness claim.

- Its ``eps_step`` is the *initial* step; the reference starts every image at 2·ε and only
  halves it at the checkpoints (ART's by-class use gets ``eps_step = 2·ε`` from the registry).
- It returns the last iterate and scores that point only; the reference keeps ``x_best_adv``,
  the point of *any* iterate that was misclassified. An image that an intermediate iterate
  broke but the last one did not is counted robust by ART, broken by the reference.

:class:`APGD` follows the reference line by line — random start ``x + ε·t/‖t‖∞``, the first
step without momentum then momentum 0.75, checkpoints at ``p_j`` (0.22 of the budget, then
shrinking by 0.03 down to 0.06), halving on oscillation (ρ = 0.75) or on no improvement since
the last checkpoint, restarting from the best point — and keeps, per image, whether any iterate
was misclassified and that iterate. The whole iteration loop runs in one ``tf.function`` (one
forward and backward pass per iteration, no Python per step). Restarts run on the images still
robust after the previous ones (as the reference does), so an image broken by any restart is
broken.

Losses: ``ce`` (APGD-CE), ``dlr`` (APGD-DLR) and ``dlr-targeted`` (APGD-T's
``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)``, target ``t`` the k-th most likely class on the
clean image). Success is always untargeted: the prediction differs from the true label.
``tests/test_apgd.py`` checks it is never weaker than ART's APGD on the same images.
"""

from __future__ import annotations

from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from art_study.attacks.base import Attack, Outcome, Passes
from art_study.models import input_shape_of, n_classes_of

LOSSES = ("ce", "dlr", "dlr-targeted")

#: The reference's schedule constants (``APGDAttack.__init__``): first checkpoint after 22 % of
#: the iterations, checkpoint spacing shrinking by 3 % to at least 6 %, oscillation threshold ρ.
P_FIRST, P_DECREASE, P_MIN, RHO, MOMENTUM = 0.22, 0.03, 0.06, 0.75, 0.75


def checkpoints(n_iter: int) -> list[tuple[int, int]]:
    """``(iteration, window)`` of every step-size check, as the reference's counters give them:
    the first after ``⌊0.22·n⌋`` iterations, each window ``⌊0.03·n⌋`` shorter, down to
    ``⌊0.06·n⌋`` (each at least 1)."""
    k = max(int(P_FIRST * n_iter), 1)
    decrease, k_min = max(int(P_DECREASE * n_iter), 1), max(int(P_MIN * n_iter), 1)
    out, i = [], k - 1
    while i < n_iter:
        out.append((i, k))
        k = max(k - decrease, k_min)
        i += k
    return out


def _ce(logits, y, target):
    del target
    return keras.losses.categorical_crossentropy(y, logits, from_logits=True)


def _dlr(logits, y, target):
    del target
    z_y = tf.reduce_sum(y * logits, axis=1)
    z_other = tf.reduce_max(logits - 1e9 * y, axis=1)
    top = tf.math.top_k(logits, k=3).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def _dlr_targeted(logits, y, target):
    z_y = tf.reduce_sum(y * logits, axis=1)
    z_t = tf.reduce_sum(target * logits, axis=1)
    top = tf.math.top_k(logits, k=4).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


_LOSS_FNS = {"ce": _ce, "dlr": _dlr, "dlr-targeted": _dlr_targeted}


class APGD:
    """L∞ APGD against a Keras model with logits, after Croce & Hein (2020).

    Settings go to the constructor, data to :meth:`attack` (as in Foolbox). The iteration loop
    is traced once per instance (``n_iter`` fixes the checkpoints); ε is a tensor, so any ε
    reuses it.

    ``record=True`` keeps, per run of the loop, the step size and the iterate of every iteration
    (after the checkpoint's halving and restore) in :attr:`history`, for checking the schedule;
    off (the default), nothing is written: two empty arrays ride along in the loop.
    """

    def __init__(self, model: keras.Model, *, loss: str = "ce", n_iter: int = 100,
                 n_restarts: int = 1, batch_size: int = 500, record: bool = False):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        for name, v in (("max_iter", n_iter), ("nb_random_init", n_restarts),
                        ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")
        self.model, self.loss, self.n_iter = model, loss, n_iter
        self.n_restarts, self.batch_size = n_restarts, batch_size
        self.record = record
        #: ``(steps, iterates)`` per loop run when ``record``: shapes ``(n_iter, n)`` and
        #: ``(n_iter, n, *image shape)``.
        self.history: list[tuple[np.ndarray, np.ndarray]] = []
        self._run = self._build()

    def _build(self):
        model, n_iter, loss_fn = self.model, self.n_iter, _LOSS_FNS[self.loss]
        record = self.record
        checks = checkpoints(n_iter)
        is_check = np.zeros(n_iter, bool)
        window = np.ones(n_iter, np.int32)
        for i, k in checks:
            is_check[i], window[i] = True, k
        is_check_t, window_t = tf.constant(is_check), tf.constant(window)

        def value_and_grad(x, y, target):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = model(x, training=False)
                loss = loss_fn(logits, y, target)
                total = tf.reduce_sum(loss)
            return logits, loss, tape.gradient(total, x)

        def per_image(mask, like):
            return tf.reshape(mask, [-1, 1, 1, 1]) if like.shape.rank == 4 else mask

        def where(mask, a, b):
            return tf.where(per_image(mask, a), a, b)

        spec = tf.TensorSpec((None, *input_shape_of(model)), tf.float32)
        lab = tf.TensorSpec((None, n_classes_of(model)), tf.float32)

        @tf.function(input_signature=[spec, lab, lab, tf.TensorSpec((), tf.float32), spec])
        def run(x, y, target, eps, x_adv):
            """(any iterate misclassified, the misclassified iterate or the best-loss one)."""
            label = tf.argmax(y, axis=1)
            lo, hi = tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)
            logits, loss, grad = value_and_grad(x_adv, y, target)
            fooled = tf.argmax(logits, axis=1) != label
            x_best_adv = x_adv
            x_best, grad_best, loss_best = x_adv, grad, loss
            n = tf.shape(x)[0]
            step = tf.fill([n], 2.0 * eps)
            x_old = x_adv
            loss_steps = tf.zeros([n_iter, n])
            last_check_best = loss_best
            reduced_last = tf.ones([n], tf.bool)
            # empty and never written when not recording (a loop variable must exist either way)
            steps_seen = tf.TensorArray(tf.float32, size=n_iter if record else 0)
            points_seen = tf.TensorArray(tf.float32, size=n_iter if record else 0)
            for i in tf.range(n_iter):
                grad2 = x_adv - x_old
                x_old = x_adv
                a = tf.where(i > 0, MOMENTUM, 1.0)
                z = tf.clip_by_value(
                    x_adv + tf.reshape(step, [-1, 1, 1, 1]) * tf.sign(grad), lo, hi)
                x_adv = tf.clip_by_value(x_adv + (z - x_adv) * a + grad2 * (1.0 - a), lo, hi)

                logits, loss, grad = value_and_grad(x_adv, y, target)
                wrong = tf.argmax(logits, axis=1) != label
                x_best_adv = where(wrong & ~fooled, x_adv, x_best_adv)
                fooled = fooled | wrong
                loss_steps = tf.tensor_scatter_nd_update(loss_steps, [[i]], loss[None])
                better = loss > loss_best
                x_best, grad_best = where(better, x_adv, x_best), where(better, grad, grad_best)
                loss_best = tf.where(better, loss, loss_best)

                if is_check_t[i]:
                    k = window_t[i]
                    rows = i - tf.range(k)
                    now = tf.gather(loss_steps, rows)
                    before = tf.gather(loss_steps, tf.math.floormod(rows - 1, n_iter))
                    increases = tf.reduce_sum(tf.cast(now > before, tf.float32), axis=0)
                    oscillating = increases <= tf.cast(k, tf.float32) * RHO
                    stalled = ~reduced_last & (last_check_best >= loss_best)
                    halve = oscillating | stalled
                    reduced_last, last_check_best = halve, loss_best
                    step = tf.where(halve, step / 2.0, step)
                    x_adv, grad = where(halve, x_best, x_adv), where(halve, grad_best, grad)
                if record:
                    steps_seen = steps_seen.write(i, step)
                    points_seen = points_seen.write(i, x_adv)
            out = fooled, where(fooled, x_best_adv, x_best)
            return (*out, steps_seen.stack(), points_seen.stack()) if record else out

        return run

    def _random_start(self, x: np.ndarray, eps: float) -> np.ndarray:
        """The reference's L∞ start ``clip(x + ε·t/max|t|)`` with ``t ~ U(-1, 1)`` per pixel,
        drawn from NumPy's global RNG (seeded by the caller, as ART's attacks are)."""
        t = np.random.uniform(-1.0, 1.0, x.shape).astype(np.float32)
        t /= np.abs(t.reshape(len(t), -1)).max(axis=1).reshape(-1, 1, 1, 1) + 1e-12
        return np.clip(x + eps * t, 0.0, 1.0).astype(np.float32)

    def attack(self, x: np.ndarray, y: np.ndarray, eps: float,
               target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(fooled, x_adv)`` for images ``x`` with integer labels ``y`` at budget ``eps``.

        ``fooled[i]`` is true when any iterate of any restart was misclassified; ``x_adv[i]`` is
        then such an iterate (else the best-loss point). ``target`` (integer classes) is needed
        for ``dlr-targeted`` only. Images already misclassified are left as they are.
        """
        x = np.asarray(x, np.float32)
        n_classes = n_classes_of(self.model)
        y1h = np.eye(n_classes, dtype=np.float32)[np.asarray(y, np.int64)]
        if self.loss == "dlr-targeted":
            if target is None:
                raise ValueError("the targeted DLR loss needs target classes")
            t1h = np.eye(n_classes, dtype=np.float32)[np.asarray(target, np.int64)]
        else:
            t1h = np.zeros_like(y1h)
        x_adv = x.copy()
        fooled = _predict(self.model, x, self.batch_size) != np.asarray(y)
        eps_t = tf.constant(eps, tf.float32)
        for _ in range(self.n_restarts):
            todo = np.flatnonzero(~fooled)
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s: s + self.batch_size]
                start = self._random_start(x[idx], eps)
                f, xa, *seen = self._run(tf.constant(x[idx]), tf.constant(y1h[idx]),
                                         tf.constant(t1h[idx]), eps_t, tf.constant(start))
                if seen:
                    self.history.append((seen[0].numpy(), seen[1].numpy()))
                f = f.numpy()
                fooled[idx[f]] = True
                x_adv[idx[f]] = xa.numpy()[f]
        return fooled, x_adv


def check_target_classes(n_target_classes: int, model: keras.Model) -> None:
    """Refuse a number of target classes (APGD-T's, FAB-T's) that is not an integer in
    ``1..n_classes - 1``: the model's wrong classes are all there is to target."""
    n_wrong = n_classes_of(model) - 1
    if not isinstance(n_target_classes, int) or not 1 <= n_target_classes <= n_wrong:
        raise ValueError(f"n_target_classes must be an integer in 1..{n_wrong}, "
                         f"got {n_target_classes!r}")


def apgd_targeted(attack: APGD, x: np.ndarray, y: np.ndarray, eps: float, *,
                  n_target_classes: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """APGD-T: ``attack`` (an :class:`APGD` on the ``dlr-targeted`` loss) towards each of the
    ``n_target_classes`` most likely wrong classes of the clean image in turn (the 2nd most
    likely first), each on the images still robust. Returns ``(fooled, x_adv)`` like
    :meth:`APGD.attack`."""
    if attack.loss != "dlr-targeted":
        raise ValueError(f"APGD-T needs the dlr-targeted loss, got {attack.loss!r}")
    check_target_classes(n_target_classes, attack.model)
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    ranked = np.argsort(_logits(attack.model, x, attack.batch_size), axis=1)  # ascending
    fooled = ranked[:, -1] != y
    x_adv = x.copy()
    for k in range(2, n_target_classes + 2):
        todo = np.flatnonzero(~fooled)
        if not len(todo):
            break
        f, xa = attack.attack(x[todo], y[todo], eps, target=ranked[todo, -k])
        fooled[todo[f]] = True
        x_adv[todo[f]] = xa[f]
    return fooled, x_adv


def _logits(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([model(x[s: s + batch_size], training=False).numpy()
                           for s in range(0, len(x), batch_size)]) if len(x) else \
        np.zeros((0, n_classes_of(model)), np.float32)


def _predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.argmax(_logits(model, x, batch_size), axis=1)




class APGDCE(Attack):
    """APGD-CE as an :class:`~art_study.attacks.base.Attack`, with the settings' names of ART's
    ``AutoProjectedGradientDescent`` (the class it is cross-checked against). L∞ only."""

    loss: ClassVar[str] = "ce"

    def __init__(self, model: keras.Model, *, max_iter: int = 100, nb_random_init: int = 1,
                 norm=np.inf, batch_size: int = 500):
        if norm not in (np.inf, "inf"):
            raise ValueError(f"art-study's APGD is L∞ only, got norm={norm!r}")
        self.apgd = APGD(model, loss=self.loss, n_iter=max_iter, n_restarts=nb_random_init,
                         batch_size=batch_size)

    @classmethod
    def passes(cls, settings: dict) -> Passes:
        """The first restart on every image, the others on the images it left robust (APGD-T:
        the first target, then the others)."""
        restarts = settings["nb_random_init"] * settings.get("n_target_classes", 1)
        return Passes(float(settings["max_iter"]), float((restarts - 1) * settings["max_iter"]))

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        fooled, x_adv = self.apgd.attack(x, y, eps)
        return Outcome(x_adv, fooled)


class APGDDLR(APGDCE):
    """APGD on the DLR loss (untargeted)."""

    loss: ClassVar[str] = "dlr"


class APGDT(APGDCE):
    """APGD-T: targeted DLR towards the ``n_target_classes`` most likely wrong classes."""

    loss: ClassVar[str] = "dlr-targeted"

    def __init__(self, model: keras.Model, *, max_iter: int = 100, nb_random_init: int = 1,
                 norm=np.inf, n_target_classes: int = 9, batch_size: int = 500):
        check_target_classes(n_target_classes, model)
        super().__init__(model, max_iter=max_iter, nb_random_init=nb_random_init, norm=norm,
                         batch_size=batch_size)
        self.n_target_classes = n_target_classes

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        fooled, x_adv = apgd_targeted(self.apgd, x, y, eps,
                                      n_target_classes=self.n_target_classes)
        return Outcome(x_adv, fooled)
