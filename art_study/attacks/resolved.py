"""A configured attack checked against its registry entry: settings, ε, budget, and its run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from art_study.attacks import scoring
from art_study.attacks.base import Attack, AttackFactory, Passes
from art_study.attacks.checkpoints import Checkpoints
from art_study.config import AttackConfig

#: Settings logged with the budget when an attack has them.
BUDGET_SETTINGS = ("max_iter", "nb_random_init", "num_random_init", "nb_restarts", "max_eval",
                   "nb_grads", "n_target_classes", "n_queries", "p_init")


@dataclass(frozen=True)
class ResolvedAttack:
    """One configured attack: its registry entry (``factory``), its settings (the entry's
    defaults overridden by the config's ``args``), the estimator kind it runs on and its ε."""

    cfg: AttackConfig
    factory: AttackFactory
    kwargs: dict[str, Any]
    estimator: str
    eps: tuple[float, ...]

    @property
    def key(self) -> str:
        return self.cfg.key

    @property
    def cls(self) -> type:
        """The class that runs it (ART's, or art-study's own)."""
        return self.factory.cls

    @property
    def bounded(self) -> bool:
        return self.factory.bounded

    @property
    def step(self) -> float | None:
        return self.factory.step

    @property
    def note(self) -> str:
        return self.factory.note

    @property
    def blackbox(self) -> bool:
        """The attack never asks for a gradient."""
        return self.factory.blackbox

    @property
    def iterative(self) -> bool:
        """A white-box attack that iterates within the ε-ball (not single-step FGSM, not a
        minimal-perturbation attack): what must do at least as well as FGSM."""
        return self.bounded and not self.blackbox and self.factory.iterative

    def budget(self) -> dict[str, float]:
        """The evaluation budget: images, iterations, restarts, queries (whatever applies)."""
        out = {"n_images": float(self.cfg.n_images), **self.factory.budget(self.kwargs)}
        for name in BUDGET_SETTINGS:
            if isinstance(self.kwargs.get(name), int | float):
                out[name] = float(self.kwargs[name])
        return out

    def passes(self) -> Passes:
        """Its cost per image at one ε, counted from its settings (for planning)."""
        return self.factory.passes(self.kwargs)

    def attack(self, estimator, batch_size: int) -> Attack:
        """The attack on ``estimator``, ready to call with images, labels and ε."""
        return self.factory.attack(estimator, batch_size, self.kwargs)

    def build(self, estimator, eps: float | None, batch_size: int):
        """The attack at budget ``eps`` with ART's ``generate``: ART's own attack object for an
        ART class, an :class:`~art_study.attacks.base.AtEpsilon` for art-study's own."""
        return self.factory.build(estimator, eps, batch_size, self.kwargs)

    def run(self, estimator, x: np.ndarray, y: np.ndarray, batch_size: int,
            components: dict[str, scoring.Verdicts] | None = None,
            checkpoints: Checkpoints | None = None,
            component_seconds: dict[str, dict[float, float]] | None = None,
            computed_by: dict[str, int] | None = None) -> scoring.Verdicts:
        """Which of ``x`` (labels ``y``) are robust, per ε of this attack: classified correctly
        clean **and** not fooled (:mod:`art_study.attacks.scoring`). ``components``, if given,
        receives a cascade's cumulative verdict after each of its components (and
        ``component_seconds`` the wall time each computed); ``checkpoints``, if given, lets an
        attack that checkpoints resume there (and ``computed_by`` how many of its chunks each
        numerics fingerprint computed)."""

        def predict(images: np.ndarray) -> np.ndarray:
            return np.argmax(estimator.predict(images.astype(np.float32),
                                               batch_size=batch_size), axis=1)

        y = np.asarray(y)
        attack = self.attack(estimator, batch_size)
        if checkpoints is not None:
            attack.resume_from(checkpoints)  # the attack scopes them by its model and settings
        if self.bounded:
            return scoring.bounded(attack, predict, x, y, self.eps, components,
                                   component_seconds, computed_by)
        return scoring.minimal(attack, predict, x, y, self.eps)
