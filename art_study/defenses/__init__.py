"""Defenses, each a training stage, looked up by name.

A new defense is one module in this package (``Settings`` + ``train``, see ``base.py``) and one
entry in :data:`DEFENSES`.
"""

from art_study.defenses import (
    adversarial_training,
    adversarial_training_fast,
    distillation,
    gradient_masking,
    pgd_adversarial_training,
    plain,
    trades,
)
from art_study.defenses.base import Defense, DefenseSettings, StageContext

DEFENSES: dict[str, Defense] = {
    "none": Defense(plain.Settings, plain.train),
    "adversarial_training": Defense(adversarial_training.Settings, adversarial_training.train),
    "adversarial_training_fast": Defense(adversarial_training_fast.Settings,
                                         adversarial_training_fast.train),
    "distillation": Defense(distillation.Settings, distillation.train),
    "gradient_masking": Defense(gradient_masking.Settings, gradient_masking.train,
                                gradient_masking.mask),
    "pgd_adversarial_training": Defense(pgd_adversarial_training.Settings,
                                        pgd_adversarial_training.train),
    "trades": Defense(trades.Settings, trades.train),
}

__all__ = ["DEFENSES", "Defense", "DefenseSettings", "StageContext"]
