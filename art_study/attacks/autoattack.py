"""AutoAttack's standard version as a cascade: APGD-CE → APGD-T → Square.

Croce & Hein (2020) run APGD-CE, targeted APGD-DLR (9 target classes), FAB-T (9 targets) and
Square (5 000 queries), each on the images still robust after the previous ones; an image is
robust only if it survives all of them. ART has no FAB, so this cascade has three components;
FAB-T rarely breaks an image the other three leave (Croce & Hein 2020, table 7), and the logged
budget says it is missing. The components are art-study's compiled implementations
(:mod:`art_study.attacks.apgd`, :mod:`art_study.attacks.square`), each cross-checked against
ART's version of the same attack.

ART's ``AutoAttack`` class is no substitute: it scores each component by its returned point
only, and its APGD starts at the configured ``eps_step`` rather than 2·ε.
"""

from __future__ import annotations

import time
from typing import ClassVar

import keras
import numpy as np

from art_study.attacks.apgd import APGD, _predict, apgd_targeted
from art_study.attacks.base import Attack, Outcome
from art_study.attacks.square import Square

#: The components in the order they run (the names in metric keys).
COMPONENTS = ("apgd-ce", "apgd-t", "square")


class AutoAttackStandard(Attack):
    """The cascade with the reference's budgets by default: 100 APGD iterations, 9 target
    classes, 5 000 Square queries with ``p_init`` 0.8, one restart each."""

    note: ClassVar[str] = "APGD-CE, APGD-T, Square as a cascade; no FAB-T (ART has no FAB)"

    @classmethod
    def budget(cls, settings: dict) -> dict[str, float]:
        return {"fab_target_classes": 0.0}  # ART has no FAB

    def __init__(self, model: keras.Model, *, max_iter: int = 100, n_target_classes: int = 9,
                 n_queries: int = 5000, p_init: float = 0.8, batch_size: int = 500):
        self.model, self.max_iter, self.n_target_classes = model, max_iter, n_target_classes
        self.batch_size = batch_size
        self.apgd_ce = APGD(model, loss="ce", n_iter=max_iter, batch_size=batch_size)
        self.apgd_t = APGD(model, loss="dlr-targeted", n_iter=max_iter, batch_size=batch_size)
        self.square = Square(model, n_queries=n_queries, p_init=p_init,
                             batch_size=max(batch_size, 1000))
        #: per component of the last cascade: (wall s, process CPU s, images it attacked)
        self.costs: dict[str, tuple[float, float, int]] = {}
        if not isinstance(n_target_classes, int) or not 1 <= n_target_classes <= 9:
            raise ValueError(f"n_target_classes must be an integer in 1..9, "
                             f"got {n_target_classes!r}")

    def cascade(self, x: np.ndarray, y: np.ndarray, eps: float
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(fooled, x_adv, fooled_after)``: ``fooled_after[c]`` is the cumulative verdict after
        component ``c`` (so ``1 - mean`` is the robust accuracy after it). Images the model
        misclassifies clean count as fooled from the start."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y)
        x_adv = x.copy()
        fooled = _predict(self.model, x, self.batch_size) != y
        after: dict[str, np.ndarray] = {}
        for name in COMPONENTS:
            todo = np.flatnonzero(~fooled)
            t0, c0 = time.perf_counter(), time.process_time()
            if len(todo):
                f, xa = self._component(name, x[todo], y[todo], eps)
                fooled[todo[f]] = True
                x_adv[todo[f]] = xa[f]
            after[name] = fooled.copy()
            self.costs[name] = (time.perf_counter() - t0, time.process_time() - c0, len(todo))
        return fooled, x_adv, after

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        fooled, x_adv, after = self.cascade(x, y, eps)
        return Outcome(x_adv, fooled, after)

    def _component(self, name: str, x: np.ndarray, y: np.ndarray, eps: float):
        if name == "apgd-ce":
            return self.apgd_ce.attack(x, y, eps)
        if name == "apgd-t":
            return apgd_targeted(self.apgd_t, x, y, eps, n_target_classes=self.n_target_classes)
        return self.square.attack(x, y, eps)
