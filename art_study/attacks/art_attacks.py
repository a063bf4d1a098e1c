"""ART's evasion attacks behind art-study's protocol: one adapter for every class.

:class:`ArtAttack` is a registry entry for an ART class: its name, the defaults an alias gives
it and ``eps_step`` as a multiple of ε. It builds ART's own attack object (ART's parameter
checks run there) and, through :class:`ArtEvasion`, an :class:`~art_study.attacks.base.Attack`
scored on the point ART returns. What art-study must know about particular ART classes is data
here (:data:`CLASS_STEPS`, :data:`BLACKBOX_CLASSES`, :data:`ITERATES_WITHOUT_MAX_ITER`,
:data:`SUB_ATTACKS`, :data:`CLASS_PASSES`), never a test of a class's name in the code that
runs attacks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from art_study.attacks.base import FORWARD, Attack, Outcome, Passes, iterations, settable

#: ``eps_step`` as a multiple of ε for ART classes used by name (the reference's initial step
#: for APGD-style attacks; 0.1 ε otherwise).
CLASS_STEPS = {"AutoProjectedGradientDescent": 2.0, "AutoConjugateGradient": 2.0}

#: ART classes that search without gradients (checked against white-box attacks).
BLACKBOX_CLASSES = {"SquareAttack", "HopSkipJump", "BoundaryAttack", "SimBA", "ZooAttack",
                    "GeoDA", "SignOPTAttack", "PixelAttack", "ThresholdAttack"}

#: ART classes that iterate within the ε-ball without a ``max_iter`` argument of their own.
ITERATES_WITHOUT_MAX_ITER = {"AutoAttack"}


#: What an ART class costs per image (:class:`~art_study.attacks.base.Passes`) from its settings
#: (ART's defaults filled in), where it is not every iteration of every restart on every image
#: (:func:`~art_study.attacks.base.iterations`). ART's Square, HopSkipJump and DeepFool stop
#: on the images they broke; ART's AutoAttack runs its components (:func:`autoattack_components`)
#: on the images still robust.
CLASS_PASSES = {
    "SquareAttack": lambda s: Passes(FORWARD, s["max_iter"] * s["nb_restarts"] * FORWARD),
    "HopSkipJump": lambda s: Passes(FORWARD, s["max_iter"] * s["max_eval"] * FORWARD),
    "DeepFool": lambda s: Passes(s["nb_grads"], (s["max_iter"] - 1) * s["nb_grads"]),
    "AutoAttack": lambda s: Passes(100, 100 + 1000 * FORWARD),
}


def autoattack_components(estimator, eps: float, batch_size: int) -> list:
    """AutoAttack's standard untargeted ensemble (APGD-CE, APGD-DLR, Square) at a CPU budget.

    ART's default list adds DeepFool and 5 restarts of 5000-query Square; on a CPU that is hours
    per model. Croce & Hein's "standard" version is APGD-CE, APGD-T, FAB-T and Square; the
    untargeted CE + DLR pair with Square keeps its white-box/black-box mix. APGD starts at the
    reference's step, 2·ε (ART's ``eps_step`` is APGD's initial step). For the reference's
    standard version, use ``autoattack-standard``.
    """
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack

    from art_study.estimator import CompiledKerasClassifier

    common = {"norm": np.inf, "eps": eps, "eps_step": 2.0 * eps, "max_iter": 100,
              "nb_random_init": 1, "batch_size": batch_size, "verbose": False}
    dlr = CompiledKerasClassifier(estimator.model, loss="dlr")
    return [
        AutoProjectedGradientDescent(estimator, **common),
        AutoProjectedGradientDescent(dlr, **common),
        SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=1000, nb_restarts=1,
                     batch_size=batch_size, verbose=False),
    ]


#: ART classes that run other attacks: the list they get unless the config gives one.
SUB_ATTACKS = {"AutoAttack": autoattack_components}


def art_class(name: str) -> type | None:
    """The class of ``art.attacks.evasion`` called ``name``, if it is an attack."""
    from art.attacks import evasion

    cls = getattr(evasion, name, None)
    return cls if inspect.isclass(cls) and hasattr(cls, "generate") else None


def art_classes() -> list[str]:
    """Every attack class of ``art.attacks.evasion``, sorted."""
    from art.attacks import evasion

    return sorted(n for n in vars(evasion) if n[0].isupper() and art_class(n) is not None)


@dataclass(frozen=True)
class ArtAttack:
    """A registry entry for ART's class ``class_name`` with the defaults a careful evaluation
    gives it.

    ``step``: ``eps_step = step × ε`` for iterative attacks (the usual 2.5 ε / iterations of
    Madry et al.'s PGD is 0.0625 ε at 40 iterations; we take 0.1 ε at 20–40). ``estimator``:
    ``keras`` is :class:`~art_study.estimator.CompiledKerasClassifier` on cross-entropy,
    ``keras-dlr`` the same on the DLR loss (APGD with ``loss_type=None`` then optimises DLR;
    ART's own ``loss_type`` losses exist only for ``TensorFlowV2Classifier`` and run eagerly,
    ~15× slower here), ``tensorflow`` ART's ``TensorFlowV2Classifier`` on the same model.
    ``note``: what the logged budget should say beyond its numbers.
    """

    class_name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    step: float | None = None
    estimator: str = "keras"
    note: str = ""

    @classmethod
    def by_name(cls, name: str) -> ArtAttack | None:
        """Any ART class by its name, with no defaults of art-study's."""
        return cls(name, step=CLASS_STEPS.get(name)) if art_class(name) else None

    @property
    def cls(self) -> type:
        return art_class(self.class_name)

    @property
    def what(self) -> str:
        return self.class_name

    def _params(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.cls.__init__).parameters)

    @property
    def bounded(self) -> bool:
        """It takes ``eps`` (else it looks for the smallest perturbation that fools)."""
        return "eps" in self._params()

    @property
    def blackbox(self) -> bool:
        return self.class_name in BLACKBOX_CLASSES

    @property
    def iterative(self) -> bool:
        return (self.class_name in ITERATES_WITHOUT_MAX_ITER
                or "max_iter" in self._params())

    def parameters(self) -> list[str]:
        return settable(inspect.signature(self.cls.__init__))

    def budget(self, settings: dict[str, Any]) -> dict[str, float]:
        """The step, when the class takes one and ε bounds it."""
        if self.bounded and "eps_step" in self._params():
            return {"eps_step_over_eps": float(self.step or 0.1)}
        return {}

    def passes(self, settings: dict[str, Any]) -> Passes:
        """Its cost per image at one ε: :data:`CLASS_PASSES`, else every iteration of every
        restart (ART's defaults where the settings are silent)."""
        full = {name: p.default for name, p in self._params().items()
                if p.default is not inspect.Parameter.empty} | settings
        count = CLASS_PASSES.get(self.class_name)
        return count(full) if count else Passes(iterations(full))

    def attack(self, estimator, batch_size: int, settings: dict[str, Any]) -> ArtEvasion:
        return ArtEvasion(self, estimator, batch_size, settings)

    def build(self, estimator, eps: float | None, batch_size: int, settings: dict[str, Any]):
        """ART's attack object on ``estimator`` at budget ``eps`` (ignored when unbounded)."""
        kwargs = dict(settings)
        params = self._params()
        if "verbose" in params:
            kwargs["verbose"] = False
        if "batch_size" in params:
            kwargs["batch_size"] = batch_size
        if self.bounded and eps is not None:
            kwargs["eps"] = eps
            if "eps_step" in params:
                kwargs.setdefault("eps_step", (self.step or 0.1) * eps)
        if self.class_name in SUB_ATTACKS and "attacks" not in kwargs:
            kwargs["attacks"] = SUB_ATTACKS[self.class_name](estimator, eps, batch_size)
        first = "classifier" if "classifier" in params else "estimator"
        return self.cls(**{first: estimator}, **kwargs)


class ArtEvasion(Attack):
    """ART's attack as an art-study :class:`~art_study.attacks.base.Attack`: ART's object is
    built at each ε (ART fixes ε at construction) and run with the true labels; it reports no
    image as fooled by itself, so only the point it returns is scored. How it is read (bounded,
    black-box, iterative) is its entry's, :class:`ArtAttack`."""

    def __init__(self, entry: ArtAttack, estimator, batch_size: int, settings: dict[str, Any]):
        self.entry, self.estimator = entry, estimator
        self.batch_size, self.settings = batch_size, settings

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        from art_study.models import one_hot

        attack = self.entry.build(self.estimator, eps, self.batch_size, self.settings)
        return Outcome(attack.generate(x=x, y=one_hot(y, self.estimator.nb_classes)),
                       np.zeros(len(x), bool))


def art_fgsm(classifier, x: np.ndarray, y_onehot: np.ndarray, eps: float,
             batch_size: int = 500) -> np.ndarray:
    """ART's ``FastGradientMethod`` (L∞, untargeted, no random init) with the true labels.

    The true labels are passed explicitly: ART would otherwise attack the model's own
    predictions, which differs from the paper's FGSM on misclassified images. At ε = 0 FGSM is
    the identity, which ART refuses to compute (its step must be positive): ``x`` is returned.
    """
    from art.attacks.evasion import FastGradientMethod

    if eps == 0:
        return np.array(x, dtype=np.float32)
    attack = FastGradientMethod(
        classifier, norm=np.inf, eps=eps, eps_step=eps, targeted=False, num_random_init=0,
        batch_size=batch_size, minimal=False,
    )
    return attack.generate(x=x, y=y_onehot).astype(np.float32)
