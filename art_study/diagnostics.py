"""Is a model's robustness real, or are its gradients only hidden? Checks after Carlini et al.
(2019), "On Evaluating Adversarial Robustness", section 5, computed for every evaluated model.

FGSM alone flatters defenses that mask gradients: defensive distillation saturates the softmax so
cross-entropy gradients vanish (Carlini & Wagner 2016 broke it to 0 %), a noisy gradient layer
misleads a single step, and FGSM adversarial training can overfit to its own single step
(Wong et al. 2020's catastrophic overfitting; Tramèr et al. 2018's gradient masking). Each check
below is a symptom a truly robust model does not show:

1. ``iterative_not_weaker``: an iterative white-box attack (the diagnostics' PGD, and any
   configured PGD/APGD/BIM/AutoAttack) does at least as well as single-step FGSM at the same ε.
   Minimal-perturbation attacks (DeepFool is L2-driven, ART's C&W L∞ is weak at its defaults,
   HopSkipJump) are not held to it: losing to FGSM is their nature, not a symptom;
2. ``blackbox_not_stronger``: each transfer attack from the undefended model does not beat its
   own white-box counterpart (transfer-FGSM vs FGSM, transfer-PGD vs PGD: the FGSM-adversarial-
   training signature, which a comparison with the best white-box attack hides as soon as PGD
   runs at that ε), and no black-box or transfer attack beats any white-box attack;
3. ``falls_to_chance``: accuracy under PGD at a budget that can grey out any digit
   (``destroy_eps``, 0.5) is near chance, and the FGSM sweep does not rise with ε;
4. ``more_iterations_not_weaker``: 5× the PGD iterations do not raise accuracy;
5. ``gradients_not_vanishing``: the loss gradient is not numerically zero on most test inputs;
6. ``gradients_deterministic``: the same attack on the same input gives the same image (a
   randomised gradient needs EOT to evaluate, Athalye et al. 2018).

All comparisons are paired: per-image verdicts of two attacks on the first images both ran on
(their common prefix), with a slack ``tolerance`` for sampling noise. ε is a key as configured
(never rebuilt from a metric name), so 8/255 is checked like 0.3.
A check that lacks its inputs (no black-box attack configured) is *not evaluated*, never passed
by default. A model failing any check is tagged ``gradient_masking_suspected=true`` with the
reasons; the test suite shows the checks flag a distilled or noisy-gradient model and pass an
undefended one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from art_study.config import DiagnosticsConfig

#: Share of test images whose loss gradient is numerically zero above which gradients "vanish".
VANISHING_SHARE = 0.5
#: A per-image loss gradient whose largest component is below this is numerically zero.
ZERO_GRADIENT = 1e-12
CHANCE = 0.1  # ten classes



@dataclass
class Check:
    """One diagnostic: its verdict (``None`` = not evaluated) and why."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Diagnosis:
    """All checks of one model, and the overall verdict."""

    checks: list[Check] = field(default_factory=list)

    @property
    def suspected(self) -> bool:
        return any(c.passed is False for c in self.checks)

    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.passed is False]

    def metrics(self) -> dict[str, float]:
        out = {f"diag/{c.name}": float(c.passed) for c in self.checks if c.passed is not None}
        out["diag/gradient_masking_suspected"] = float(self.suspected)
        return out

    def tags(self) -> dict[str, str]:
        tags = {"gradient_masking_suspected": str(self.suspected).lower()}
        for c in self.checks:
            verdict = "not evaluated" if c.passed is None else ("pass" if c.passed else "FAIL")
            tags[f"diag.{c.name}"] = f"{verdict}: {c.detail}"[:500]
        if self.suspected:
            tags["gradient_masking_reasons"] = "; ".join(self.reasons())[:5000]
        return tags


@dataclass
class Evidence:
    """Per-image verdicts (``True`` = robust) on the evaluated images, ``attack → {ε: mask}``,
    with ε exactly as configured, and the gradient figures.

    ``fgsm`` is our FGSM on every evaluated image; ``fgsm_sweep`` its accuracies. ``iterative``
    names the white-box iterative attacks, ``blackbox`` the black-box and transfer attacks,
    ``counterparts`` maps a transfer attack to the white-box attack it was crafted with
    (``"fgsm"``: the FGSM sweep unless an attack of that name ran).
    """

    fgsm: dict[float, np.ndarray]
    fgsm_sweep: dict[float, float]
    attacks: dict[str, dict[float, np.ndarray]]
    pgd_steps: tuple[str, str]  # keys of (PGD k steps, PGD 5k steps) at the top ε
    pgd_destroy: str  # key of PGD at destroy_eps
    grad_zero_share: float
    repeat_max_abs_diff: float
    iterative: frozenset[str] = frozenset()
    blackbox: frozenset[str] = frozenset()
    counterparts: dict[str, str] = field(default_factory=dict)

    def verdict(self, name: str, eps: float) -> np.ndarray | None:
        """An attack's per-image verdict at ε (``fgsm`` falls back to the sweep)."""
        if name in self.attacks:
            return self.attacks[name].get(eps)
        return self.fgsm.get(eps) if name == "fgsm" else None


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Accuracies of two verdicts on their common prefix of images, and its length."""
    n = min(len(a), len(b))
    return float(np.mean(a[:n])), float(np.mean(b[:n])), n


def diagnose(ev: Evidence, cfg: DiagnosticsConfig) -> Diagnosis:
    """Run the six checks on what the evaluation measured."""
    tol = cfg.tolerance
    d = Diagnosis()

    # 1. iterative white-box attacks are not weaker than FGSM at the same ε (a transfer PGD is
    # crafted on another model: weaker than white-box FGSM is what it should be; a
    # minimal-perturbation attack is not iterative in this sense)
    worse = []
    for name in sorted(ev.iterative & set(ev.attacks)):
        for eps, ok in ev.attacks[name].items():
            if eps in ev.fgsm:
                acc, fgsm, n = paired(ok, ev.fgsm[eps])
                if acc > fgsm + tol:
                    worse.append(f"{name} {acc:.1%} > FGSM {fgsm:.1%} at ε {eps:g} ({n} images)")
    d.checks.append(Check("iterative_not_weaker", not worse,
                          "; ".join(worse) or "every iterative attack ≤ FGSM + tolerance"))

    # 2. black-box / transfer attacks are not stronger than white-box ones: each against its
    # own white-box counterpart, and each against every white-box attack at its ε
    white = {"fgsm": ev.fgsm, **{n: a for n, a in ev.attacks.items() if n not in ev.blackbox}}
    found, stronger = False, []
    for name in sorted(ev.blackbox & set(ev.attacks)):
        for eps, ok in ev.attacks[name].items():
            own = ev.counterparts.get(name)
            ref = ev.verdict(own, eps) if own else None
            if ref is not None:
                found = True
                acc, acc_w, n = paired(ok, ref)
                if acc < acc_w - tol:
                    stronger.append(f"{name} {acc:.1%} < its white-box {own} {acc_w:.1%} "
                                    f"at ε {eps:g} ({n} images)")
            # beats every white-box attack at this ε (each on the images both ran on)
            pairs = [(w, *paired(ok, accs[eps])) for w, accs in white.items() if eps in accs]
            found = found or bool(pairs)
            if pairs and all(acc < acc_w - tol for _, acc, acc_w, _ in pairs):
                w, acc, acc_w, n = min(pairs, key=lambda p: p[2] - p[1])
                stronger.append(f"{name} {acc:.1%} < best white-box {w} {acc_w:.1%} "
                                f"at ε {eps:g} ({n} images)")
    d.checks.append(Check(
        "blackbox_not_stronger", None if not found else not stronger,
        "; ".join(stronger) if stronger else
        ("black-box and transfer ≥ white-box − tolerance" if found else
         "no black-box or transfer attack at a white-box ε")))

    # 3. accuracy falls towards chance when the digit can be destroyed; no rise with ε
    problems = []
    destroy = ev.attacks.get(ev.pgd_destroy, {})
    if destroy:
        acc = float(np.mean(next(iter(destroy.values()))))
        if acc > CHANCE + cfg.chance_margin:
            problems.append(f"PGD at ε {cfg.destroy_eps:g} leaves {acc:.1%} "
                            f"(> {CHANCE + cfg.chance_margin:.0%})")
    # against the lowest accuracy at any smaller ε, so a slow climb over many steps counts too
    sweep = sorted(ev.fgsm_sweep.items())
    for i, (e1, a1) in enumerate(sweep[1:], start=1):
        e0, a0 = min(sweep[:i], key=lambda item: item[1])
        if a1 > a0 + tol:
            problems.append(f"FGSM accuracy rises with ε: {a0:.1%} at {e0:g} → {a1:.1%} at {e1:g}")
            break
    d.checks.append(Check("falls_to_chance", not problems,
                          "; ".join(problems) or "falls with ε and to chance at destroy_eps"))

    # 4. more iterations do not raise accuracy
    few, many = (ev.attacks.get(k, {}) for k in ev.pgd_steps)
    common = sorted(set(few) & set(many))
    if common:
        eps = common[-1]
        acc_few, acc_many, n = paired(few[eps], many[eps])
        d.checks.append(Check("more_iterations_not_weaker", acc_many <= acc_few + tol,
                              f"PGD {ev.pgd_steps[0]} {acc_few:.1%} vs {ev.pgd_steps[1]} "
                              f"{acc_many:.1%} at ε {eps:g} ({n} images)"))
    else:
        d.checks.append(Check("more_iterations_not_weaker", None, "PGD not run"))

    # 5. the loss gradient does not vanish
    d.checks.append(Check("gradients_not_vanishing", ev.grad_zero_share <= VANISHING_SHARE,
                          f"{ev.grad_zero_share:.1%} of test images have a numerically zero "
                          "loss gradient"))

    # 6. gradients are deterministic (FGSM repeated at the largest ε)
    d.checks.append(Check("gradients_deterministic", ev.repeat_max_abs_diff == 0.0,
                          "the same FGSM twice (largest ε) differs by max |Δ| "
                          f"{ev.repeat_max_abs_diff:.3g}"))
    return d


def gradient_zero_share(grads: np.ndarray) -> float:
    """Share of images whose loss gradient's largest component is numerically zero."""
    per_image = np.abs(grads.reshape(len(grads), -1)).max(axis=1)
    return float(np.mean(per_image < ZERO_GRADIENT))
