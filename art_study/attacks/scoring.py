"""Per-image verdicts of an attack: which images stay robust at each ε.

Two kinds of attack are scored differently:

- *bounded* attacks take ``eps`` and stay inside the L∞ ball: an image is robust at ε when the
  attack did not report it fooled (art-study's own attacks count any iterate, not only the
  returned one) and its output is still classified correctly; they run once per ε;
- *minimal-perturbation* attacks (DeepFool, C&W L∞, HopSkipJump) take no ε and look for the
  smallest perturbation that flips the label: an image counts as broken at ε only when it is
  misclassified **and** its L∞ perturbation is ≤ ε. One run gives the whole ε curve.

Either way an image is robust only if it is classified correctly clean **and** the attack did
not fool it: accuracy under an attack never exceeds clean accuracy on the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from art_study.attacks.base import Attack

#: Slack on the L∞ distance of a minimal perturbation (float32 rounding of ``x + δ``).
DISTANCE_TOLERANCE = 1e-6

Verdicts = dict[float, np.ndarray]


def bounded(attack: Attack, predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
            y: np.ndarray, eps_values: Sequence[float],
            components: dict[str, Verdicts] | None = None,
            component_seconds: dict[str, dict[float, float]] | None = None,
            computed_by: dict[str, int] | None = None) -> Verdicts:
    """Robust images per ε of a bounded attack, run once per ε (ε = 0 is the identity: ART's
    attacks refuse a zero budget). ``components``, if given, receives a cascade's cumulative
    verdict after each of its components (``components[name][ε]``), ``component_seconds`` the
    wall time each computed, ``computed_by`` the chunks each numerics fingerprint computed
    (summed over ε)."""
    clean = predict(x) == y
    out: Verdicts = {}
    for eps in eps_values:
        if eps == 0:
            out[eps] = clean
            continue
        outcome = attack(x, y, eps)
        if computed_by is not None:
            for fid, chunks in outcome.computed_by.items():
                computed_by[fid] = computed_by.get(fid, 0) + chunks
        for name, fooled in outcome.after.items():
            if components is not None:
                components.setdefault(name, {})[eps] = clean & ~fooled
            if component_seconds is not None and name in outcome.seconds:
                component_seconds.setdefault(name, {})[eps] = outcome.seconds[name]
        out[eps] = clean & ~outcome.fooled & (predict(outcome.x_adv) == y)
    return out


def minimal(attack: Attack, predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
            y: np.ndarray, eps_values: Sequence[float]) -> Verdicts:
    """Robust images per ε of a minimal-perturbation attack, from one run: fooled at ε when
    misclassified with an L∞ perturbation of at most ε."""
    clean = predict(x) == y
    x_adv = attack(x, y, None).x_adv
    fooled = predict(x_adv) != y
    dist = np.abs(x_adv.reshape(len(x), -1) - x.reshape(len(x), -1)).max(axis=1)
    return {eps: clean & ~(fooled & (dist <= eps + DISTANCE_TOLERANCE)) for eps in eps_values}
