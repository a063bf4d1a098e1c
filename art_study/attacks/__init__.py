"""Attacks: our own compiled FGSM (the paper's), APGD, Square and AutoAttack cascade, and ART's
attacks by name, all behind one protocol (:class:`Attack`, in ``base.py``).

A new attack from ART needs no code here: add it to a config. A hand-written attack is its own
module (a class implementing :class:`Attack`: settings in the constructor, images, labels and ε
in the call) plus one line ``"name": HandWritten(TheClass)`` in ``registry.py``, with a
cross-check test against a reference implementation.
"""

from art_study.attacks.art_attacks import art_fgsm
from art_study.attacks.base import Attack, HandWritten, Outcome
from art_study.attacks.fgsm import FGSM, draws_randomness_in_inference

__all__ = ["FGSM", "Attack", "HandWritten", "Outcome", "art_fgsm",
           "draws_randomness_in_inference"]
