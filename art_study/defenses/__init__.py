"""Defenses, each a training stage, looked up by name.

A new defense is one module in this package and one entry in :data:`DEFENSES`.
"""

from art_study.defenses.base import StageContext
from art_study.defenses.plain import train_plain

DEFENSES = {"none": train_plain}

__all__ = ["DEFENSES", "StageContext", "train_plain"]
