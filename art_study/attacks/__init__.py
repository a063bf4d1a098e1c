"""Attacks: our own compiled FGSM (the paper's) and ART's attacks by name.

A new attack from ART needs no code here: add it to a config. A hand-written attack goes in its
own module next to ``fgsm.py`` and gets a cross-check test against ART's version.
"""

from art_study.attacks.art_attacks import art_fgsm
from art_study.attacks.fgsm import FGSM, draws_randomness_in_inference

__all__ = ["FGSM", "art_fgsm", "draws_randomness_in_inference"]
