"""Attacks by name: an alias of :data:`ALIASES`, or any class of ``art.attacks.evasion``.

An ART alias is a class plus the defaults a careful evaluation uses on MNIST (Madry et al.
2018's PGD, Croce & Hein 2020's APGD and AutoAttack components, Andriushchenko et al. 2020's
Square), sized so that one model's evaluation takes minutes on a 2-core CPU. Anything the
config's ``args`` sets overrides them; any other ART evasion class works by its name with its
own arguments, so adding ART's other attacks needs no code change. A hand-written attack is its
module (a class implementing :class:`~art_study.attacks.base.Attack`) and one line here.

Four aliases run art-study's compiled implementations of the reference algorithms rather than
ART's classes: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (:mod:`.apgd`: Croce & Hein's step schedule
starting at 2·ε, and an image counts as broken when *any* iterate of any restart misclassified
it) and ``autoattack-standard`` (:mod:`.autoattack`, a cascade). Each is cross-checked against
ART's version in the tests and is never weaker than it. ART's ``AutoProjectedGradientDescent``
by class name (and inside the light ``autoattack`` alias) gets ``eps_step = 2·ε``, the
reference's initial step; ART scores only its returned point, restarts included (it keeps a
restart's point only if it fools). ART's PGD keeps any restart's successful point too (checked
in ART 1.20's source), and like Madry et al.'s PGD scores its last iterate.

How an attack is scored is :mod:`.scoring`; how a configured attack is checked before any
training is :mod:`.validation` (:func:`validate_attacks`).
"""

from __future__ import annotations

import numpy as np

from art_study.attacks.apgd import APGDCE, APGDDLR, APGDT
from art_study.attacks.art_attacks import ArtAttack, art_classes
from art_study.attacks.autoattack import AutoAttackStandard
from art_study.attacks.base import AttackFactory, HandWritten
from art_study.attacks.resolved import ResolvedAttack
from art_study.attacks.validation import (
    check_arguments,
    check_values,
    throwaway_model,
    unknown_attack,
)
from art_study.config import AttackConfig, EvaluationConfig
from art_study.datasets import DatasetSpec
from art_study.estimator import Estimators

ALIASES: dict[str, AttackFactory] = {
    "fgsm": ArtAttack("FastGradientMethod", {"norm": np.inf, "num_random_init": 0}, step=1.0),
    "bim": ArtAttack("BasicIterativeMethod", {"max_iter": 20}, step=0.1),
    "pgd": ArtAttack("ProjectedGradientDescent",
                     {"norm": np.inf, "max_iter": 40, "num_random_init": 1}, step=0.1),
    "apgd-ce": HandWritten(APGDCE),
    "apgd-dlr": HandWritten(APGDDLR),
    "apgd-t": HandWritten(APGDT),
    "autoattack": ArtAttack("AutoAttack", {"norm": np.inf}, step=2.0),
    "autoattack-standard": HandWritten(AutoAttackStandard),
    "cw-linf": ArtAttack("CarliniLInfMethod", {"max_iter": 10, "learning_rate": 0.01}),
    "deepfool": ArtAttack("DeepFool", {"max_iter": 50, "epsilon": 0.02, "nb_grads": 10}),
    "square": ArtAttack("SquareAttack", {"norm": np.inf, "max_iter": 1000, "nb_restarts": 1,
                                         "p_init": 0.8}),
    "hopskipjump": ArtAttack("HopSkipJump", {"norm": np.inf, "max_iter": 20, "max_eval": 1000,
                                             "init_eval": 100}),
}

__all__ = ["ALIASES", "Estimators", "ResolvedAttack", "available", "resolve",
           "validate_attacks"]


def available() -> list[str]:
    """Aliases, then every class of ``art.attacks.evasion``."""
    return [*ALIASES, *art_classes()]


def resolve(cfg: AttackConfig, default_eps: list[float]) -> ResolvedAttack:
    """Look up the attack, merge its defaults and the config's arguments, refuse unknown names
    and arguments."""
    factory = ALIASES.get(cfg.name.lower()) or ArtAttack.by_name(cfg.name)
    if factory is None:
        raise unknown_attack(cfg.name, available())
    check_arguments(cfg, factory)
    kwargs = {**factory.defaults, **cfg.args}
    if kwargs.get("norm") in ("inf", "np.inf"):
        kwargs["norm"] = np.inf
    return ResolvedAttack(cfg=cfg, factory=factory, kwargs=kwargs,
                          estimator=cfg.estimator or factory.estimator,
                          eps=tuple(cfg.eps or default_eps))


def validate_attacks(cfg: EvaluationConfig, spec: DatasetSpec) -> list[ResolvedAttack]:
    """Resolve every configured attack and let it check its values on a throw-away model of
    ``spec``'s input shape and classes (the dataset the attacks will run on).

    Runs before any training, so a typo in the tenth attack of a study costs seconds, not the
    study. Raises :class:`~art_study.errors.ConfigError` with the attack's name and message.
    """
    if not cfg.attacks:
        return []
    resolved = [resolve(a, cfg.eps) for a in cfg.attacks]
    estimators = Estimators(throwaway_model(spec.input_shape, spec.n_classes))
    for r in resolved:
        check_values(r.cfg.name, lambda r=r: r.build(estimators[r.estimator], max(r.eps),
                                                      cfg.batch_size))
    return resolved
