"""ART's attacks, built from names at the edge so the rest of art-study stays plain."""

from __future__ import annotations

import numpy as np


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
