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
   (``destroy_eps``, 0.5) is near chance (1 / the model's classes, plus ``chance_margin``),
   and the FGSM sweep does not rise with ε;
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

AutoAttack's own checks (``autoattack/checks.py``, Croce & Hein 2020) are kept apart, each a
small function with the reference's threshold and message, evaluated where their inputs exist:

- ``autoattack_square`` (``check_square_sr``): Square, run after the white-box components of an
  AutoAttack cascade, lowers robust accuracy by more than 0.2 points. This is the verdict
  ``evaluation_unreliable`` (the cascade escalates to stronger settings when it fires; the
  detail gives both figures). Like the reference, every evaluation that ran a cascade gives it,
  with the other diagnostics disabled too (:func:`square_tags`);
- warnings that add to the checks above: ``autoattack_output_not_probability`` (the model outputs
  a softmax, not logits: ``check_range_output``), ``autoattack_no_zero_gradient`` (*any* image
  with an exactly zero gradient, where check 5 asks for most: ``check_zero_gradients``),
  ``autoattack_deterministic_output`` (five forward passes agree: ``check_randomized``) and
  ``autoattack_static_model`` (inference changes no weight and does not depend on the rest of
  the batch: the Keras counterpart of ``check_dynamic``, which the reference leaves undone for
  TensorFlow models). They are tagged ``autoattack_warnings``, as the reference warns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from art_study.config import DiagnosticsConfig

#: Share of test images whose loss gradient is numerically zero above which gradients "vanish".
VANISHING_SHARE = 0.5
#: A per-image loss gradient whose largest component is below this is numerically zero.
ZERO_GRADIENT = 1e-12

#: check_square_sr: Square may lower robust accuracy after the white-box components by this much.
SQUARE_ALPHA = 0.002
#: check_range_output: outputs within this of [0, 1], rows summing to 1 within it, are a softmax.
RANGE_ALPHA = 1e-5
#: check_randomized: forward passes, and the largest L2 distance between their L2-normalised
#: outputs beyond which the model is randomised.
RANDOM_CALLS, RANDOM_ALPHA = 5, 1e-4
#: The static-model check: an image's logits alone and in a batch, or before and after a
#: forward pass, may differ by this much relative to the largest logit (float32 round-off).
DYNAMIC_RTOL = 1e-4
#: Where the reference's messages send the reader (AutoAttack's repository).
FLAGS_DOC = "see flags_doc.md in AutoAttack's repository"


@dataclass
class Check:
    """One diagnostic: its verdict (``None`` = not evaluated) and why."""

    name: str
    passed: bool | None
    detail: str

    def tag(self) -> str:
        """The verdict and why, as one tag value."""
        verdict = "not evaluated" if self.passed is None else ("pass" if self.passed else "FAIL")
        return f"{verdict}: {self.detail}"[:500]


@dataclass
class Diagnosis:
    """All checks of one model, and the overall verdict."""

    checks: list[Check] = field(default_factory=list)
    #: AutoAttack's checks: the Square check (the ``evaluation_unreliable`` verdict) first, then
    #: the reference's warnings
    reference: list[Check] = field(default_factory=list)

    @property
    def suspected(self) -> bool:
        return any(c.passed is False for c in self.checks)

    @property
    def unreliable(self) -> bool:
        """AutoAttack's Square check failed: the white-box figure is not to be trusted."""
        return any(c.passed is False for c in self.reference if c.name == "autoattack_square")

    def warnings(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.reference
                if c.passed is False and c.name != "autoattack_square"]

    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.passed is False]

    def metrics(self) -> dict[str, float]:
        out = {f"diag/{c.name}": float(c.passed) for c in [*self.checks, *self.reference]
               if c.passed is not None}
        out["diag/gradient_masking_suspected"] = float(self.suspected)
        if any(c.name == "autoattack_square" and c.passed is not None for c in self.reference):
            out["diag/evaluation_unreliable"] = float(self.unreliable)
        return out

    def tags(self) -> dict[str, str]:
        tags = {"gradient_masking_suspected": str(self.suspected).lower()}
        for c in [*self.checks, *self.reference]:
            tags[f"diag.{c.name}"] = c.tag()
        if self.suspected:
            tags["gradient_masking_reasons"] = "; ".join(self.reasons())[:5000]
        for c in self.reference:
            if c.name == "autoattack_square":
                tags.update(square_tags(c))
        if self.warnings():
            tags["autoattack_warnings"] = "; ".join(self.warnings())[:5000]
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
    #: classes the model scores: chance accuracy, for the "falls to chance" check, is 1 / this
    n_classes: int
    iterative: frozenset[str] = frozenset()
    blackbox: frozenset[str] = frozenset()
    counterparts: dict[str, str] = field(default_factory=dict)
    #: AutoAttack cascades: ``attack → {ε: {component: robust accuracy after it}}`` in the
    #: order the components ran (the figures the evaluation logs per component)
    cascades: dict[str, dict[float, dict[str, float]]] = field(default_factory=dict)
    #: images whose loss gradient is exactly zero (``None``: not measured)
    grad_zero_count: int | None = None
    #: what :func:`probe_model` found (``None``: not probed)
    probe: ModelProbe | None = None

    def verdict(self, name: str, eps: float) -> np.ndarray | None:
        """An attack's per-image verdict at ε (``fgsm`` falls back to the sweep)."""
        if name in self.attacks:
            return self.attacks[name].get(eps)
        return self.fgsm.get(eps) if name == "fgsm" else None


@dataclass
class ModelProbe:
    """What AutoAttack's model checks measure on a batch of test images."""

    outputs: np.ndarray  # the model's outputs (inference mode) on the batch
    random_max_diff: float  # largest L2 distance of normalised outputs over the repeated passes
    random_correct_differs: bool  # the repeated passes classify different numbers correctly
    dynamic_detail: str  # empty if the model looks static, else what changed


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Accuracies of two verdicts on their common prefix of images, and its length."""
    n = min(len(a), len(b))
    return float(np.mean(a[:n])), float(np.mean(b[:n])), n


def diagnose(ev: Evidence, cfg: DiagnosticsConfig) -> Diagnosis:
    """Run the six checks, then AutoAttack's (:attr:`Diagnosis.reference`), on what the
    evaluation measured."""
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
        bound = 1 / ev.n_classes + cfg.chance_margin
        if acc > bound:
            problems.append(f"PGD at ε {cfg.destroy_eps:g} leaves {acc:.1%} (> {bound:.0%})")
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

    d.reference.append(square_checks(ev.cascades))
    d.reference.append(zero_gradient_check(ev.grad_zero_count))
    d.reference += probe_checks(ev.probe)
    return d


def square_check(accuracies: Mapping[str, float]) -> Check:
    """``check_square_sr``: on one cascade's table of robust accuracy after each component (and
    ``clean``, optionally), Square must not lower the lowest white-box figure by more than
    :data:`SQUARE_ALPHA`. Escalation components (``plus-…``) are not part of the table."""
    before = [v for k, v in accuracies.items()
              if k not in ("square", "clean") and not k.startswith("plus-")]
    if "square" not in accuracies or not before:
        return Check("autoattack_square", None, "no Square after white-box components")
    drop = min(before) - accuracies["square"]
    if accuracies["square"] < min(before) - SQUARE_ALPHA:  # the reference's comparison
        return Check("autoattack_square", False,
                     f"Square Attack has decreased the robust accuracy of {drop:.2%}. This "
                     "might indicate that the robustness evaluation using AutoAttack is "
                     "unreliable. Consider running Square Attack with more iterations and "
                     f"restarts or an adaptive attack ({FLAGS_DOC})")
    return Check("autoattack_square", True,
                 f"Square lowers robust accuracy by {drop:.2%} (≤ {SQUARE_ALPHA:.1%})")


def square_checks(cascades: Mapping[str, Mapping[float, Mapping[str, float]]]) -> Check:
    """:func:`square_check` on every cascade at every ε: fails if any fails (evaluation
    unreliable), saying where, and what the escalation found (``plus-square``, if it ran)."""
    passed, failed, message = [], [], ""
    for name, by_eps in sorted(cascades.items()):
        for eps, table in sorted(by_eps.items()):
            c = square_check(table)
            where = f"{name} at ε {eps:g}"
            if c.passed is True:
                passed.append(f"{where}: {c.detail}")
            elif c.passed is False:
                message = c.detail
                line = f"{where}: after Square {table['square']:.1%}"
                if "plus-square" in table:
                    line += f", after the escalation {table['plus-square']:.1%}"
                failed.append(line)
    if failed:
        return Check("autoattack_square", False,
                     f"evaluation unreliable: {'; '.join(failed)}. {message}")
    if passed:
        return Check("autoattack_square", True, "; ".join(passed))
    return Check("autoattack_square", None, "no AutoAttack cascade ran")


def square_tags(check: Check) -> dict[str, str]:
    """The Square check's tags: its verdict (``diag.autoattack_square``) and, once evaluated,
    ``evaluation_unreliable``. An evaluation sets them whether or not the diagnostics run, as
    the reference AutoAttack always runs this check."""
    tags = {f"diag.{check.name}": check.tag()}
    if check.passed is not None:
        tags["evaluation_unreliable"] = str(check.passed is False).lower()
    return tags


def zero_gradient_check(count: int | None) -> Check:
    """``check_zero_gradients``: no image at all with an exactly zero loss gradient."""
    if count is None:
        return Check("autoattack_no_zero_gradient", None, "gradients not measured")
    if count:
        return Check("autoattack_no_zero_gradient", False,
                     f"there are {count} points with zero gradient! This might lead to "
                     f"unreliable evaluation with gradient-based attacks ({FLAGS_DOC})")
    return Check("autoattack_no_zero_gradient", True, "no image has a zero loss gradient")


def output_check(outputs: np.ndarray) -> Check:
    """``check_range_output``: outputs in [0, 1] summing to 1 per image are probabilities."""
    outputs = np.asarray(outputs, np.float64)
    softmax = (outputs.max() < 1.0 + RANGE_ALPHA and outputs.min() > -RANGE_ALPHA
               and bool(np.all(np.abs(outputs.sum(-1) - 1.0) < RANGE_ALPHA)))
    if softmax:
        return Check("autoattack_output_not_probability", False,
                     "it seems that the output is a probability distribution, please be sure "
                     f"that the logits are used! ({FLAGS_DOC})")
    return Check("autoattack_output_not_probability", True, "the model outputs logits")


def random_check(max_diff: float, correct_differs: bool) -> Check:
    """``check_randomized``: repeated forward passes give the same outputs."""
    if correct_differs or max_diff > RANDOM_ALPHA:
        return Check("autoattack_deterministic_output", False,
                     f"it seems to be a randomized defense! (outputs differ by {max_diff:.3g} "
                     f"over {RANDOM_CALLS} passes; evaluate with EOT) ({FLAGS_DOC})")
    return Check("autoattack_deterministic_output", True,
                 f"{RANDOM_CALLS} forward passes agree (max {max_diff:.3g})")


def dynamic_check(detail: str) -> Check:
    """``check_dynamic``, for a Keras model: inference changes nothing and sees one image."""
    if detail:
        return Check("autoattack_static_model", False,
                     f"it seems to be a dynamic defense! The evaluation with AutoAttack might be "
                     f"insufficient ({detail}) ({FLAGS_DOC})")
    return Check("autoattack_static_model", True,
                 "inference changes no weight and each image's output ignores the batch")


def probe_checks(probe: ModelProbe | None) -> list[Check]:
    names = ("autoattack_output_not_probability", "autoattack_deterministic_output",
             "autoattack_static_model")
    if probe is None:
        return [Check(n, None, "model not probed") for n in names]
    return [output_check(probe.outputs),
            random_check(probe.random_max_diff, probe.random_correct_differs),
            dynamic_check(probe.dynamic_detail)]


def probe_model(model, x: np.ndarray, y: np.ndarray) -> ModelProbe:
    """Run the model as AutoAttack's checks do: :data:`RANDOM_CALLS` passes over ``x`` (the
    randomness check, on L2-normalised outputs), then each of the first images alone against
    its row of the batch, and every weight before and after (the static-model check)."""
    before = [np.array(v) for v in model.variables]
    outs = [np.asarray(model(x, training=False)) for _ in range(RANDOM_CALLS)]
    after = [np.array(v) for v in model.variables]
    normed = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outs]
    diff = max((float(np.linalg.norm(a - b, axis=1).max()) for i, a in enumerate(normed)
                for b in normed[i + 1:]), default=0.0)
    correct = {int((o.argmax(1) == y).sum()) for o in outs}
    scale = float(np.abs(outs[0]).max()) + 1e-12
    changes = []
    moved = sum(not np.allclose(a, b, rtol=0.0, atol=DYNAMIC_RTOL * (np.abs(a).max() + 1e-12))
                for a, b in zip(before, after, strict=True))
    if moved:
        changes.append(f"{moved} weight tensors changed during inference")
    alone = np.concatenate([np.asarray(model(x[i: i + 1], training=False)) for i in
                            range(min(len(x), 8))])
    gap = float(np.abs(alone - outs[0][: len(alone)]).max()) / scale
    if gap > DYNAMIC_RTOL:
        changes.append(f"an image's output alone and in the batch differ by {gap:.2g} relative")
    return ModelProbe(outs[0], diff, len(correct) > 1, "; ".join(changes))


def zero_gradient_count(grads: np.ndarray) -> int:
    """Images whose loss gradient is exactly zero (the reference's ``|g|₁ == 0``)."""
    return int(np.sum(np.abs(grads.reshape(len(grads), -1)).sum(axis=1) == 0))


def gradient_zero_share(grads: np.ndarray) -> float:
    """Share of images whose loss gradient's largest component is numerically zero."""
    per_image = np.abs(grads.reshape(len(grads), -1)).max(axis=1)
    return float(np.mean(per_image < ZERO_GRADIENT))
