"""The attack protocol: settings in the constructor, data in the call (as in Foolbox 3).

An :class:`Attack` is built once with its settings (keyword-only) on a model and called with
images, their integer labels and a budget ε; it says per image whether it fooled the model and
returns the adversarial images (:class:`Outcome`). art-study's hand-written attacks
(:mod:`.apgd`, :mod:`.square`, :mod:`.autoattack`) implement it directly; ART's evasion attacks
come through one adapter (:mod:`.art_attacks`). The registry (:mod:`.registry`) maps a name to a
factory of either kind (:class:`AttackFactory`): a hand-written attack enters it as
``HandWritten(TheClass)``, its settings are its constructor's keyword arguments.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

#: A forward pass as a share of a forward-and-backward pass, the unit of :class:`Passes`
#: (215 / 466 µs CPU per image at batch 500 on the 2-conv CNN: docs/benchmarks.md, "AutoAttack
#: against its floor").
FORWARD = 0.46
#: A query of art-study's Square (a forward pass at its batch of 1 000 images, with its own
#: bookkeeping) in the same unit: 359 s for 5 000 queries on the ≈ 900 images still robust of a
#: PGD-AT model, at 267 µs wall per forward-and-backward pass (docs/robust.md, the recipe
#: comparison).
QUERY = 0.3

#: Arguments art-study sets itself; a config must not.
RESERVED = frozenset({"estimator", "classifier", "eps", "eps_step", "verbose", "attacks",
                      "batch_size"})


@dataclass(frozen=True)
class Outcome:
    """What an attack did to a batch: ``x_adv``, the adversarial images; ``fooled``, the images
    it knows it fooled (any iterate counts, not only the returned one: an attack that only
    returns a point reports none and is scored on ``x_adv``); ``after``, for a cascade, the
    cumulative ``fooled`` after each component, in the order they ran; ``seconds``, the wall
    time each component computed (a part resumed from a checkpoint counts the time it took
    when it was computed); ``computed_by``, for an attack that checkpoints, how many of its
    chunks each numerics fingerprint computed (:mod:`art_study.numerics`: a chunk resumed
    from a checkpoint may come from another machine's run)."""

    x_adv: np.ndarray
    fooled: np.ndarray
    after: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    computed_by: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Passes:
    """What an attack costs per image at one ε, in forward-and-backward passes of the model,
    counted from its settings (an estimate for planning: :mod:`art_study.study.schedule`):
    ``every``, the passes every attacked image gets; ``robust``, those an image gets only while
    the attack has not broken it (a cascade's later components, further targets or restarts, a
    black-box attack's queries: on an undefended model almost none of them run)."""

    every: float
    robust: float = 0.0

    def per_image(self, robust_share: float) -> float:
        """Passes per image when ``robust_share`` of the images survive the first passes."""
        return self.every + robust_share * self.robust


def iterations(settings: dict[str, Any]) -> float:
    """``max_iter`` × restarts (``nb_random_init`` or ``num_random_init``, at least one): the
    cost of a gradient attack that runs every iteration on every image."""
    restarts = settings.get("nb_random_init", settings.get("num_random_init", 1)) or 1
    return float(settings.get("max_iter", 1)) * max(1, int(restarts))


class Attack(ABC):
    """An L∞ attack with its settings fixed at construction; ``attack(x, y, eps)`` runs it.

    The class attributes tell the evaluation how to read the attack: ``bounded`` (it stays in
    the ε-ball; else it is a minimal-perturbation attack called with ``eps=None`` and scored by
    the size of its perturbation), ``blackbox`` (it never asks for a gradient), ``iterative``
    (it iterates within the ball: what must do at least as well as FGSM) and ``note`` (what the
    logged budget should say beyond its numbers); :meth:`budget`, figures logged with it.
    """

    bounded: ClassVar[bool] = True
    blackbox: ClassVar[bool] = False
    iterative: ClassVar[bool] = True
    note: ClassVar[str] = ""

    @classmethod
    def budget(cls, settings: dict[str, Any]) -> dict[str, float]:
        """Figures logged with the attack's budget beyond its numeric settings (none here)."""
        return {}

    @classmethod
    def passes(cls, settings: dict[str, Any]) -> Passes:
        """Its cost per image (:class:`Passes`); here every iteration of every restart on every
        image: an attack that stops on broken images says so by overriding this."""
        return Passes(iterations(settings))

    @abstractmethod
    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        """Attack images ``x`` with integer labels ``y`` at budget ``eps``."""

    def resume_from(self, checkpoints) -> None:
        """Save progress in ``checkpoints`` (:class:`~.checkpoints.Checkpoints`) and resume
        from what is there. Only an attack long enough to need it does (the AutoAttack
        cascade); the others ignore it."""
        return None


@dataclass(frozen=True)
class AtEpsilon:
    """An attack at one ε with ART's ``generate(x, y)``, for callers written against ART's API
    (crafting transfer examples)."""

    attack: Attack
    eps: float | None

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        if y is None:
            raise ValueError("art-study's attacks need the true labels")
        y = np.asarray(y)
        labels = y.argmax(axis=1) if y.ndim == 2 else y
        return self.attack(np.asarray(x, np.float32), labels, self.eps).x_adv


class AttackFactory(Protocol):
    """What the registry maps a name to: the attack's settings, how it is read, and how to
    build it on an ART estimator (:class:`HandWritten`, or ART's through
    :class:`~art_study.attacks.art_attacks.ArtAttack`)."""

    cls: type
    defaults: dict[str, Any]
    step: float | None
    estimator: str
    what: str
    bounded: bool
    blackbox: bool
    iterative: bool
    note: str

    def parameters(self) -> list[str]:
        """The settings a config may give."""

    def budget(self, settings: dict[str, Any]) -> dict[str, float]:
        """Figures logged with the attack beyond its numeric settings."""

    def passes(self, settings: dict[str, Any]) -> Passes:
        """Its cost per image at one ε (:class:`Passes`)."""

    def attack(self, estimator, batch_size: int, settings: dict[str, Any]) -> Attack:
        """The attack on ``estimator`` with ``settings``."""

    def build(self, estimator, eps: float | None, batch_size: int,
              settings: dict[str, Any]) -> Any:
        """An object with ART's ``generate`` at budget ``eps``: ART's own attack object for an
        ART class (its parameter checks run here)."""


def settable(signature: inspect.Signature) -> list[str]:
    """The arguments of a constructor a config may set: neither the model nor what art-study
    sets itself, nor ``**kwargs``."""
    params = signature.parameters
    return sorted(p for p in params if p not in {"self", "model", *RESERVED}
                  and params[p].kind is not inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True)
class HandWritten:
    """A registry entry for one of art-study's own attacks: ``cls`` is built on the Keras model
    of the estimator it is given, with the batch size and the configured settings."""

    cls: type[Attack]
    estimator: str = "keras"
    #: no ``eps_step`` to derive: the attack sets its own steps
    step = None
    what = "art-study's compiled version"

    @property
    def defaults(self) -> dict[str, Any]:
        """The constructor's defaults of every setting (logged with the budget)."""
        params = inspect.signature(self.cls).parameters
        return {p: params[p].default for p in self.parameters()
                if params[p].default is not inspect.Parameter.empty}

    @property
    def bounded(self) -> bool:
        return self.cls.bounded

    @property
    def blackbox(self) -> bool:
        return self.cls.blackbox

    @property
    def iterative(self) -> bool:
        return self.cls.iterative

    @property
    def note(self) -> str:
        return self.cls.note

    def parameters(self) -> list[str]:
        return settable(inspect.signature(self.cls))

    def budget(self, settings: dict[str, Any]) -> dict[str, float]:
        return self.cls.budget(settings)

    def passes(self, settings: dict[str, Any]) -> Passes:
        return self.cls.passes({**self.defaults, **settings})

    def attack(self, estimator, batch_size: int, settings: dict[str, Any]) -> Attack:
        return self.cls(estimator.model, batch_size=batch_size, **settings)

    def build(self, estimator, eps: float | None, batch_size: int,
              settings: dict[str, Any]) -> AtEpsilon:
        return AtEpsilon(self.attack(estimator, batch_size, settings), eps)
