"""Attacks from configs: short aliases, or any class of ``art.attacks.evasion`` by name.

An alias is a class plus the defaults a careful evaluation uses on MNIST (Madry et al. 2018's
PGD, Croce & Hein 2020's APGD and AutoAttack components, Andriushchenko et al. 2020's Square),
sized so that one model's evaluation takes minutes on a 2-core CPU. Anything the config's
``args`` sets overrides them; any other ART evasion class works by its name with its own
arguments, so adding ART's other attacks needs no code change.

Two kinds of attack are scored differently:

- *bounded* attacks take ``eps`` and stay inside the L∞ ball: an image is robust at ε when the
  attack's output is still classified correctly;
- *minimal-perturbation* attacks (DeepFool, C&W L∞, HopSkipJump) take no ε and look for the
  smallest perturbation that flips the label: an image counts as broken at ε only when it is
  misclassified **and** its L∞ perturbation is ≤ ε. One run gives the whole ε curve.

Either way an image is robust only if it is classified correctly clean **and** the attack did
not fool it: accuracy under an attack never exceeds clean accuracy on the same images.

Four aliases run art-study's compiled implementations of the reference algorithms rather than
ART's classes (``runner``): ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (:mod:`.apgd`: Croce & Hein's
step schedule starting at 2·ε, and an image counts as broken when *any* iterate of any restart
misclassified it) and ``autoattack-standard`` (:mod:`.autoattack`: APGD-CE → APGD-T → Square
with 5 000 queries, as a cascade). Each is cross-checked against ART's version in the tests and
is never weaker than it. ART's ``AutoProjectedGradientDescent`` by class name (and inside the
light ``autoattack`` alias) gets ``eps_step = 2·ε``, the reference's initial step; ART scores
only its returned point, restarts included (it keeps a restart's point only if it fools).
ART's PGD keeps any restart's successful point too (checked in ART 1.20's source), and like
Madry et al.'s PGD scores its last iterate.

Every name and argument is checked before any training starts (:func:`validate_attacks`):
unknown names list what exists, unknown arguments list what the class accepts, and ART's own
parameter checks run on a throw-away model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from art_study.config import AttackConfig, EvaluationConfig
from art_study.errors import ConfigError


class OwnAttack:
    """One of art-study's compiled attacks bound to an ε, with ART's ``generate`` API (for
    transfer crafting) and a per-image verdict (``attack``) that ART's attacks lack."""

    def __init__(self, fn, eps: float, components: tuple[str, ...] = ()):
        self._fn, self.eps, self.components = fn, eps, components

    def attack(self, x: np.ndarray, y: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(fooled, x_adv, fooled after each component)`` for integer labels ``y``."""
        out = self._fn(np.asarray(x, np.float32), np.asarray(y), self.eps)
        return out if len(out) == 3 else (*out, {})

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        if y is None:
            raise ValueError("art-study's attacks need the true labels")
        y = np.asarray(y)
        labels = y.argmax(axis=1) if y.ndim == 2 else y
        return self.attack(x, labels)[1]


def _apgd_attack(model, loss: str, batch_size: int, max_iter, nb_random_init, norm):
    from art_study.attacks.apgd import APGD

    if norm not in (np.inf, "inf"):
        raise ValueError(f"art-study's APGD is L∞ only, got norm={norm!r}")
    return APGD(model, loss=loss, n_iter=max_iter, n_restarts=nb_random_init,
                batch_size=batch_size)


def _apgd(loss: str):
    """The factory of a compiled untargeted APGD alias: ``(model, eps, batch_size, **args)``."""

    def make(model, eps: float, batch_size: int, *, max_iter: int = 100,
             nb_random_init: int = 1, norm=np.inf) -> OwnAttack:
        return OwnAttack(
            _apgd_attack(model, loss, batch_size, max_iter, nb_random_init, norm).attack, eps)

    return make


def _apgd_t(model, eps: float, batch_size: int, *, max_iter: int = 100, nb_random_init: int = 1,
            norm=np.inf, n_target_classes: int = 9) -> OwnAttack:
    """The factory of ``apgd-t``: targeted DLR towards the top ``n_target_classes`` classes."""
    from art_study.attacks.apgd import apgd_targeted

    if not isinstance(n_target_classes, int) or not 1 <= n_target_classes <= 9:
        raise ValueError(f"n_target_classes must be an integer in 1..9, got {n_target_classes!r}")
    attack = _apgd_attack(model, "dlr-targeted", batch_size, max_iter, nb_random_init, norm)
    return OwnAttack(lambda x, y, e: apgd_targeted(attack, x, y, e,
                                                   n_target_classes=n_target_classes), eps)


def _autoattack_standard(model, eps: float, batch_size: int, *, max_iter: int = 100,
                         n_target_classes: int = 9, n_queries: int = 5000,
                         p_init: float = 0.8) -> OwnAttack:
    """The factory of ``autoattack-standard`` (see :mod:`art_study.attacks.autoattack`)."""
    from art_study.attacks.autoattack import COMPONENTS, AutoAttackStandard

    aa = AutoAttackStandard(model, max_iter=max_iter, n_target_classes=n_target_classes,
                            n_queries=n_queries, p_init=p_init, batch_size=batch_size)
    return OwnAttack(aa.cascade, eps, COMPONENTS)


@dataclass(frozen=True)
class Alias:
    """A named ART attack with its default arguments.

    ``step``: ``eps_step = step × ε`` for iterative attacks (the usual 2.5 ε / iterations of
    Madry et al.'s PGD is 0.0625 ε at 40 iterations; we take 0.1 ε at 20–40). ``estimator``:
    ``keras`` is :class:`~art_study.estimator.CompiledKerasClassifier` on cross-entropy,
    ``keras-dlr`` the same on the DLR loss (APGD with ``loss_type=None`` then optimises DLR;
    ART's own ``loss_type`` losses exist only for ``TensorFlowV2Classifier`` and run eagerly,
    ~15× slower here), ``tensorflow`` ART's ``TensorFlowV2Classifier`` on the same model.
    ``runner``: the factory of art-study's own compiled implementation, if the alias runs one
    (``art_class`` is then the ART class it is cross-checked against); ``note``: what the
    logged budget should say beyond its numbers.
    """

    art_class: str
    defaults: dict[str, Any] = field(default_factory=dict)
    step: float | None = None
    estimator: str = "keras"
    runner: Any = None
    note: str = ""


ALIASES: dict[str, Alias] = {
    "fgsm": Alias("FastGradientMethod", {"norm": np.inf, "num_random_init": 0}, step=1.0),
    "bim": Alias("BasicIterativeMethod", {"max_iter": 20}, step=0.1),
    "pgd": Alias("ProjectedGradientDescent",
                 {"norm": np.inf, "max_iter": 40, "num_random_init": 1}, step=0.1),
    "apgd-ce": Alias("AutoProjectedGradientDescent", {"max_iter": 100, "nb_random_init": 1},
                     runner=_apgd("ce")),
    "apgd-dlr": Alias("AutoProjectedGradientDescent", {"max_iter": 100, "nb_random_init": 1},
                      runner=_apgd("dlr")),
    "apgd-t": Alias("AutoProjectedGradientDescent",
                    {"max_iter": 100, "nb_random_init": 1, "n_target_classes": 9},
                    runner=_apgd_t),
    "autoattack": Alias("AutoAttack", {"norm": np.inf}, step=2.0),
    "autoattack-standard": Alias(
        "AutoAttack", {"max_iter": 100, "n_target_classes": 9, "n_queries": 5000, "p_init": 0.8},
        runner=_autoattack_standard,
        note="APGD-CE, APGD-T, Square as a cascade; no FAB-T (ART has no FAB)"),
    "cw-linf": Alias("CarliniLInfMethod", {"max_iter": 10, "learning_rate": 0.01}),
    "deepfool": Alias("DeepFool", {"max_iter": 50, "epsilon": 0.02, "nb_grads": 10}),
    "square": Alias("SquareAttack", {"norm": np.inf, "max_iter": 1000, "nb_restarts": 1,
                                     "p_init": 0.8}),
    "hopskipjump": Alias("HopSkipJump", {"norm": np.inf, "max_iter": 20, "max_eval": 1000,
                                         "init_eval": 100}),
}

#: ``eps_step`` as a multiple of ε for ART classes used by name (the reference's initial step
#: for APGD-style attacks; 0.1 ε otherwise).
CLASS_STEPS = {"AutoProjectedGradientDescent": 2.0, "AutoConjugateGradient": 2.0}

#: ART classes that search without gradients (checked against white-box attacks).
BLACKBOX_CLASSES = {"SquareAttack", "HopSkipJump", "BoundaryAttack", "SimBA", "ZooAttack",
                    "GeoDA", "SignOPTAttack", "PixelAttack", "ThresholdAttack"}

#: Arguments art-study sets itself; a config must not.
_RESERVED = {"estimator", "classifier", "eps", "eps_step", "verbose", "attacks", "batch_size"}


def available() -> list[str]:
    """Aliases, then every class of ``art.attacks.evasion``."""
    from art.attacks import evasion

    classes = sorted(n for n, c in vars(evasion).items()
                     if inspect.isclass(c) and n[0].isupper() and hasattr(c, "generate"))
    return [*ALIASES, *classes]


@dataclass(frozen=True)
class ResolvedAttack:
    """An attack entry checked against ART: its class, arguments and how it is scored."""

    cfg: AttackConfig
    cls: type
    kwargs: dict[str, Any]
    bounded: bool
    step: float | None
    estimator: str
    eps: tuple[float, ...]
    runner: Any = None
    note: str = ""

    @property
    def key(self) -> str:
        return self.cfg.key

    @property
    def blackbox(self) -> bool:
        """The attack never asks for a gradient."""
        return self.cls.__name__ in BLACKBOX_CLASSES and self.runner is None

    @property
    def iterative(self) -> bool:
        """A white-box attack that iterates within the ε-ball (not single-step FGSM, not a
        minimal-perturbation attack): what must do at least as well as FGSM."""
        return (self.bounded and not self.blackbox
                and (self.runner is not None or self.cls.__name__ == "AutoAttack"
                     or "max_iter" in inspect.signature(self.cls.__init__).parameters))

    def budget(self) -> dict[str, float]:
        """The evaluation budget: images, iterations, restarts, queries (whatever applies)."""
        out = {"n_images": float(self.cfg.n_images)}
        if self.bounded and self.runner is None and "eps_step" in inspect.signature(
                self.cls.__init__).parameters:
            out["eps_step_over_eps"] = float(self.step or 0.1)
        if self.runner is _autoattack_standard:
            out["fab_target_classes"] = 0.0  # ART has no FAB
        for name in ("max_iter", "nb_random_init", "num_random_init", "nb_restarts", "max_eval",
                     "nb_grads", "n_target_classes", "n_queries", "p_init"):
            if isinstance(self.kwargs.get(name), int | float):
                out[name] = float(self.kwargs[name])
        return out

    def build(self, estimator, eps: float | None, batch_size: int):
        """The ART attack object on ``estimator`` at budget ``eps`` (ignored when unbounded), or
        art-study's own (an :class:`OwnAttack`) for an alias with a runner."""
        kwargs = dict(self.kwargs)
        if self.runner is not None:
            return self.runner(estimator.model, eps, batch_size, **kwargs)
        params = inspect.signature(self.cls.__init__).parameters
        if "verbose" in params:
            kwargs["verbose"] = False
        if "batch_size" in params:
            kwargs["batch_size"] = batch_size
        if self.bounded and eps is not None:
            kwargs["eps"] = eps
            if "eps_step" in params:
                kwargs.setdefault("eps_step", (self.step or 0.1) * eps)
        if self.cls.__name__ == "AutoAttack" and "attacks" not in kwargs:
            kwargs["attacks"] = _autoattack_components(estimator, eps, batch_size)
        first = "classifier" if "classifier" in params else "estimator"
        return self.cls(**{first: estimator}, **kwargs)


    def run(self, estimator, x: np.ndarray, y: np.ndarray, batch_size: int,
            components: dict[str, dict[float, np.ndarray]] | None = None,
            ) -> dict[float, np.ndarray]:
        """Which of ``x`` (labels ``y``) are robust, per ε of this attack: classified correctly
        clean **and** not fooled.

        Bounded attacks run once per ε; art-study's own attacks also report images fooled by
        an iterate other than the one returned. A minimal-perturbation attack runs once: an
        image is fooled at ε when its output is misclassified and its L∞ perturbation is at
        most ε. ``components``, if given, receives a cascade's cumulative verdict after each
        of its components (``components[name][ε]``, robust images as above).
        """
        from art_study.models import one_hot

        y = np.asarray(y)
        y1h = one_hot(y)
        clean = _predict(estimator, x, batch_size) == y
        out: dict[float, np.ndarray] = {}
        if self.bounded:
            for eps in self.eps:
                if eps == 0:  # the identity; ART's attacks refuse a zero budget
                    out[eps] = clean
                    continue
                attack = self.build(estimator, eps, batch_size)
                if isinstance(attack, OwnAttack):
                    fooled, x_adv, after = attack.attack(x, y)
                    for name, f in after.items():
                        if components is not None:
                            components.setdefault(name, {})[eps] = clean & ~f
                else:
                    x_adv, fooled = attack.generate(x=x, y=y1h), np.zeros(len(x), bool)
                out[eps] = clean & ~fooled & (_predict(estimator, x_adv, batch_size) == y)
            return out
        x_adv = self.build(estimator, None, batch_size).generate(x=x, y=y1h)
        fooled = _predict(estimator, x_adv, batch_size) != y
        dist = np.abs(x_adv.reshape(len(x), -1) - x.reshape(len(x), -1)).max(axis=1)
        for eps in self.eps:
            out[eps] = clean & ~(fooled & (dist <= eps + 1e-6))
        return out


def _predict(estimator, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.argmax(estimator.predict(x.astype(np.float32), batch_size=batch_size), axis=1)


def _autoattack_components(estimator, eps: float, batch_size: int) -> list:
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


def resolve(cfg: AttackConfig, default_eps: list[float]) -> ResolvedAttack:
    """Look up the class, merge defaults and arguments, refuse unknown names and arguments."""
    from art.attacks import evasion

    alias = ALIASES.get(cfg.name.lower())
    class_name = alias.art_class if alias else cfg.name
    cls = getattr(evasion, class_name, None)
    if not (inspect.isclass(cls) and hasattr(cls, "generate")):
        raise ConfigError(
            f"unknown attack {cfg.name!r}; available: {', '.join(available())}")
    runner = alias.runner if alias else None
    params = inspect.signature(runner or cls.__init__).parameters
    accepted = sorted(p for p in params if p not in {"self", "model", *_RESERVED} and
                      params[p].kind is not inspect.Parameter.VAR_KEYWORD)
    bad = sorted(set(cfg.args) - set(accepted))
    if bad:
        what = "art-study's compiled version" if runner else class_name
        raise ConfigError(
            f"attack {cfg.name!r} ({what}) does not take {', '.join(bad)}; "
            f"it takes: {', '.join(accepted)} (eps, eps_step, batch_size are set by art-study)")
    kwargs = {**(alias.defaults if alias else {}), **cfg.args}
    if kwargs.get("norm") in ("inf", "np.inf"):
        kwargs["norm"] = np.inf
    bounded = runner is not None or "eps" in params
    return ResolvedAttack(
        cfg=cfg, cls=cls, kwargs=kwargs, bounded=bounded,
        step=alias.step if alias else CLASS_STEPS.get(class_name),
        estimator=cfg.estimator or (alias.estimator if alias else "keras"),
        eps=tuple(cfg.eps or default_eps), runner=runner, note=alias.note if alias else "",
    )


def validate_attacks(cfg: EvaluationConfig) -> list[ResolvedAttack]:
    """Resolve every configured attack and let ART check its parameters on a throw-away model.

    Runs before any training, so a typo in the tenth attack of a study costs seconds, not the
    study. Raises :class:`ConfigError` with the attack's name and ART's message.
    """
    if not cfg.attacks:
        return []
    resolved = [resolve(a, cfg.eps) for a in cfg.attacks]
    estimators = Estimators(_throwaway_model())
    for r in resolved:
        try:
            r.build(estimators[r.estimator], max(r.eps), batch_size=cfg.batch_size)
        except (ValueError, TypeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"attack {r.cfg.name!r}: {msg}") from None
    return resolved


@functools.cache
def _throwaway_model():
    """A one-layer model of the right shapes, for ART's parameter checks (built once per
    process: every plan of a study, and every test that plans one, checks on the same)."""
    import keras

    from art_study.models import INPUT_SHAPE, N_CLASSES

    model = keras.Sequential([keras.Input(INPUT_SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(N_CLASSES)])
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


class Estimators(dict):
    """The ART estimators an attack may ask for, all on the very same Keras model, each built
    the first time it is asked for (and kept: its compiled functions trace once)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def __missing__(self, kind: str):
        from art_study.estimator import CompiledKerasClassifier, to_tensorflow_v2

        makers = {"keras": lambda: CompiledKerasClassifier(self.model),
                  "keras-dlr": lambda: CompiledKerasClassifier(self.model, loss="dlr"),
                  "tensorflow": lambda: to_tensorflow_v2(self.model)}
        self[kind] = makers[kind]()
        return self[kind]
