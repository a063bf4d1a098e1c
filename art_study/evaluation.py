"""Evaluate a trained model: clean accuracy, FGSM per ε with both implementations and their
cross-check, the configured stronger attacks, the transfer attack, and the gradient-masking
diagnostics.

Reads top to bottom like RobustBench's ``benchmark``: clean accuracy → for each ε, our FGSM and
ART's FGSM on the same images and labels → accuracies, agreement between the two, throughput →
each configured ART attack on its first ``n_images`` test images → examples crafted on the
undefended control, evaluated here → the per-image worst case over every attack at each ε →
the diagnostics of :mod:`art_study.diagnostics`.

An image is robust under an attack only if the model classifies it correctly clean **and** the
attack did not fool it, for every attack alike (FGSM, ART's and our bounded attacks,
minimal-perturbation attacks, transfer, diagnostics): accuracy under an attack never exceeds
clean accuracy on the same images.
Every number is returned as data (:class:`art_study.results.EvaluationResult`): one row per
(attack, component, ε) with its budget, images, accuracy, wall time and per-image verdicts (for
paired per-example tests), the cross-checks, the diagnosis and its tags. Metric names are made
from that table in :mod:`art_study.results` only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np
from tqdm.auto import tqdm

from art_study import numerics
from art_study.attacks import FGSM, art_fgsm, draws_randomness_in_inference
from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
from art_study.attacks.checkpoints import Checkpoints
from art_study.attacks.registry import Estimators, ResolvedAttack, resolve
from art_study.config import AttackConfig, EvaluationConfig
from art_study.diagnostics import (
    Evidence,
    diagnose,
    gradient_zero_share,
    probe_model,
    square_checks,
    square_tags,
    zero_gradient_count,
)
from art_study.models import n_classes_of, one_hot, predict_labels, to_art
from art_study.results import (
    CrossCheck,
    EvaluationResult,
    GradientFigures,
    Kind,
    Outcome,
    eps_key,
)

__all__ = ["CrossCheck", "EvaluationResult", "TransferSet", "craft_transfer", "cross_check",
           "eps_key", "evaluate"]


def cross_check(x_ours: np.ndarray, x_art: np.ndarray, pred_ours: np.ndarray,
                pred_art: np.ndarray) -> CrossCheck:
    """Max |Δ| between the adversarial batches, share of differing pixels, share of agreeing
    predictions."""
    diff = np.abs(x_ours - x_art)
    return CrossCheck(
        max_abs_diff=float(diff.max()),
        pixel_diff_share=float(np.mean(diff > 0)),
        prediction_agreement=float(np.mean(pred_ours == pred_art)),
    )


@dataclass
class TransferSet:
    """The transfer attacks' examples, crafted once on a control and shared by every defended
    model of its depth and seed: ``examples[key][ε]`` are the first test images (as many as the
    attack's ``n_images``) attacked by ``key``; ``seconds[key]`` what crafting them took."""

    examples: dict[str, dict[float, np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def craft_transfer(reference: keras.Model, x: np.ndarray, y: np.ndarray,
                   cfg: EvaluationConfig) -> TransferSet:
    """Craft every ``cfg.transfer`` attack on the undefended ``reference``.

    The caller seeds the RNGs first (``evaluate_run``: the run's seed), so the examples are the
    same whichever defended model, process or Ray task crafts them first.
    """
    if cfg.n_attack is not None:
        x, y = x[: cfg.n_attack], y[: cfg.n_attack]
    by_key = {a.key: a for a in (resolve(a, cfg.eps) for a in cfg.attacks)}
    estimators = Estimators(reference)
    out = TransferSet()
    for key in cfg.transfer:
        attack = by_key.get(key) or resolve(AttackConfig(name="fgsm", n_images=len(x)), cfg.eps)
        n = min(attack.cfg.n_images, len(x))
        t0 = time.perf_counter()
        est = estimators[attack.estimator]
        out.examples[key] = {  # ε = 0 is the identity (ART's attacks refuse a zero budget)
            eps: x[:n].copy() if eps == 0 else attack.build(est, eps, cfg.batch_size).generate(
                x=x[:n], y=one_hot(y[:n], n_classes_of(reference))) for eps in attack.eps}
        out.seconds[key] = time.perf_counter() - t0
    return out


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: EvaluationConfig,
             progress: bool = True, transfer_set: TransferSet | None = None,
             checkpoints: Checkpoints | None = None) -> EvaluationResult:
    """Everything :mod:`art_study.evaluation` promises, for one model.

    ``transfer_set`` holds the transfer attacks' examples, crafted on the undefended control
    of the same depth and seed (:func:`craft_transfer`; ``None`` for the control itself).
    ``checkpoints``: where the configured attacks that checkpoint (AutoAttack) save their
    finished chunks, so that an evaluation stopped midway resumes there.
    """
    if cfg.n_attack is not None:
        x, y = x[: cfg.n_attack], y[: cfg.n_attack]
    result = EvaluationResult()
    fgsm_sweep(model, x, y, cfg, result, progress)
    attacks = [resolve(a, cfg.eps) for a in cfg.attacks]  # validated when the plan was made
    estimators = Estimators(model)
    for attack in tqdm(attacks, desc="attacks", disable=not progress, leave=False):
        run_attack(attack, estimators, x, y, cfg, result, Kind.ATTACK, checkpoints)
    if transfer_set is not None:
        transfer(model, transfer_set, y, result)
    worst_case(result)
    if cfg.diagnostics.enabled:
        diagnostics(model, estimators, x, y, cfg, result, attacks)
    elif cascades := cascade_tables(result, attacks):  # AutoAttack's own check, always run
        result.tags.update(square_tags(square_checks(cascades)))
    return result


def fgsm_sweep(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: EvaluationConfig,
               result: EvaluationResult, progress: bool) -> None:
    """Clean accuracy; our FGSM at every ε; ART's on the first ``xcheck_images``; cross-check."""
    y1h = one_hot(y, n_classes_of(model))
    clean = predict_labels(model, x) == y
    result.outcomes.append(Outcome(Kind.CLEAN, "", math.nan, float(np.mean(clean)), len(x),
                                   verdict=clean))

    ours = FGSM(model, batch_size=cfg.batch_size, progress=progress)
    classifier = to_art(model)
    # One gradient serves every ε where the model's gradient is a function of its input: no
    # layer declares randomness (else nothing is drawn here, as before the sweep existed) and
    # two gradients of the first batch agree bit for bit.
    one_gradient = not draws_randomness_in_inference(model)
    ours.warm_up(sweep=one_gradient)  # trace once so the timings measure throughput
    if one_gradient:
        one_gradient = ours.gradient_repeats(x[: cfg.batch_size], y1h[: cfg.batch_size])
    t_ours = t_art = 0.0
    top, x_top = max(cfg.eps), None
    n_x = len(x) if cfg.xcheck_images is None else min(cfg.xcheck_images, len(x))
    swept = None
    if one_gradient:  # bit for bit the images of one generate() per ε
        t0 = time.perf_counter()
        swept = ours.sweep(x, y1h, list(cfg.eps))
        t_ours = time.perf_counter() - t0
    sweep: list[tuple[Outcome, Outcome]] = []
    for eps in tqdm(cfg.eps, desc="FGSM sweep (ours + ART)", disable=not progress, leave=False):
        t0 = time.perf_counter()
        x_ours = ours.generate(x, y1h, eps) if swept is None else swept[eps]
        t1 = time.perf_counter()
        x_art = art_fgsm(classifier, x[:n_x], y1h[:n_x], eps, batch_size=cfg.batch_size)
        t2 = time.perf_counter()
        t_ours, t_art = t_ours + (t1 - t0), t_art + (t2 - t1)
        x_top = x_ours if eps == top else x_top

        # robust = clean-correct and not fooled, for ours and ART's alike (like with like)
        pred_ours, pred_art = predict_labels(model, x_ours), predict_labels(model, x_art)
        ok = clean & (pred_ours == y)
        ok_art = clean[:n_x] & (pred_art == y[:n_x])
        sweep.append((Outcome(Kind.FGSM, "fgsm", eps, float(np.mean(ok)), len(x), verdict=ok),
                      Outcome(Kind.FGSM_ART, "fgsm", eps, float(np.mean(ok_art)), n_x,
                              verdict=ok_art)))
        result.cross_checks[eps] = cross_check(x_ours[:n_x], x_art, pred_ours[:n_x], pred_art)
    for ours_row, art_row in sweep:  # the sweep's wall time, once it is known
        ours_row.seconds, art_row.seconds = t_ours, t_art
    result.outcomes += [row for pair in zip(*sweep, strict=True) for row in pair]

    # Our FGSM again on the same inputs: on a deterministic model it is bit-identical. When it
    # is not, the model's gradients are randomised (e.g. a gradient-noise layer), and any
    # disagreement with ART above comes from the model, not from either implementation. At the
    # largest ε: at ε = 0 FGSM is the identity and would hide any randomness.
    repeat = ours.generate(x, y1h, top)
    result.repeat_max_abs_diff = float(np.abs(repeat - x_top).max())


def run_attack(attack: ResolvedAttack, estimators: dict, x: np.ndarray, y: np.ndarray,
               cfg: EvaluationConfig, result: EvaluationResult, kind: Kind,
               checkpoints: Checkpoints | None = None) -> None:
    """One attack on the first ``n_images``: accuracy per ε, its wall time and budget; for a
    cascade (``autoattack-standard``) also the cumulative accuracy after each component.

    When chunks resumed from checkpoints were computed under another numerics fingerprint
    than this process's (a study resumed on another machine), the run says so as the stage
    cache's stages do: tags ``<kind>.<key>.numerics`` (the chunks each fingerprint computed)
    and ``<kind>.<key>.numerics_differs``."""
    n = min(attack.cfg.n_images, len(x))
    t0 = time.perf_counter()
    components: dict[str, dict[float, np.ndarray]] = {}
    seconds: dict[str, dict[float, float]] = {}
    computed_by: dict[str, int] = {}
    correct = attack.run(estimators[attack.estimator], x[:n], y[:n], cfg.batch_size,
                         components=components, checkpoints=checkpoints,
                         component_seconds=seconds, computed_by=computed_by)
    if computed_by and set(computed_by) - {numerics.fingerprint()["id"]}:
        result.tags[f"{kind}.{attack.key}.numerics"] = ", ".join(
            f"{fid}: {chunks} chunks" for fid, chunks in sorted(computed_by.items()))
        result.tags[f"{kind}.{attack.key}.numerics_differs"] = "true"
    budget = attack.budget()
    budget.pop("n_images", None)
    record(result, kind, attack.key, correct, time.perf_counter() - t0, n, budget)
    for component, by_eps in components.items():
        for eps, ok in by_eps.items():
            result.outcomes.append(Outcome(kind, attack.key, eps, float(np.mean(ok)), len(ok),
                                           seconds.get(component, {}).get(eps, math.nan),
                                           component=component, verdict=np.asarray(ok, bool)))
    if attack.note:
        result.tags[f"{kind}.{attack.key}.budget"] = attack.note


def record(result: EvaluationResult, kind: Kind, key: str, correct: dict[float, np.ndarray],
           seconds: float, n_images: int, budget: dict[str, float]) -> None:
    """One row per ε of an attack, with its per-image verdicts.

    Every verdict is ANDed with clean correctness here too, whatever produced it."""
    clean = result.clean()
    for eps, ok in correct.items():
        ok = np.asarray(ok, bool) & clean[: len(ok)]
        result.outcomes.append(Outcome(kind, key, eps, float(np.mean(ok)), n_images, seconds,
                                       budget=budget, verdict=ok))


def transfer(model: keras.Model, crafted: TransferSet, y: np.ndarray,
             result: EvaluationResult) -> None:
    """The examples crafted on the control, evaluated on ``model`` (black box). ``seconds`` is
    this model's share; the budget's ``craft_time_s`` the one-off crafting on the control."""
    for key, by_eps in crafted.examples.items():
        n = len(next(iter(by_eps.values())))
        t0 = time.perf_counter()
        clean = result.clean()[:n]
        correct = {eps: clean & (predict_labels(model, xa) == y[:n])
                   for eps, xa in by_eps.items()}
        record(result, Kind.TRANSFER, key, correct, time.perf_counter() - t0, n,
               {"craft_time_s": crafted.seconds[key]})


def worst_case(result: EvaluationResult) -> None:
    """Per image, robust at ε only if robust under every attack run at ε: our FGSM, each
    configured attack and each transfer attack, on the first images all of them ran on.

    ART's FGSM (a cross-check of ours) and the diagnostics' PGD runs (checks sized by
    ``diagnostics.n_images``, which would shrink the common prefix) are left out.
    """
    rows = [o for o in result.outcomes if o.component == ""
            and o.kind in (Kind.FGSM, Kind.ATTACK, Kind.TRANSFER)]
    for eps in sorted({o.eps for o in rows}):
        masks = [o.verdict for o in rows if o.eps == eps]
        n = min(len(mask) for mask in masks)
        robust = np.logical_and.reduce([mask[:n] for mask in masks])
        result.outcomes.append(Outcome(Kind.WORST_CASE, "", eps, float(np.mean(robust)), n,
                                       verdict=robust))


def cascade_tables(result: EvaluationResult, attacks: list[ResolvedAttack]
                   ) -> dict[str, dict[float, dict[str, float]]]:
    """What AutoAttack's Square check reads: for each cascade that ran, its robust accuracy
    after each component, per ε, in the order the components ran."""
    order = (*COMPONENTS, *PLUS_COMPONENTS)
    tables = {a.key: {e: {o.component: o.accuracy for o in sorted(
        (o for o in result.outcomes if o.kind == Kind.ATTACK and o.attack == a.key
         and o.eps == e and o.component in order), key=lambda o: order.index(o.component))}
        for e in a.eps} for a in attacks}
    return {a: t for a, t in tables.items() if any(t.values())}


def diagnostics(model: keras.Model, estimators: dict, x: np.ndarray, y: np.ndarray,
                cfg: EvaluationConfig, result: EvaluationResult,
                attacks: list[ResolvedAttack] | None = None) -> None:
    """PGD at the top ε with k and 5k steps and at ``destroy_eps``, the loss-gradient check,
    then the verdict of :func:`art_study.diagnostics.diagnose` as metrics and tags.

    The evidence is per image, keyed by the exact configured ε; each check compares two
    attacks on the first images both ran on. Which attacks are iterative, black-box, and which
    white-box attack each transfer attack is the counterpart of, comes from the resolved
    attacks (``attacks``), not from their names.
    """
    d = cfg.diagnostics
    n = min(d.n_images, len(x))
    top = max(cfg.eps)
    runs = {f"pgd{d.pgd_steps}": ([top], d.pgd_steps),
            f"pgd{5 * d.pgd_steps}": ([top], 5 * d.pgd_steps),
            "pgd_destroy": ([d.destroy_eps], d.pgd_steps)}
    for label, (eps, steps) in runs.items():
        attack = resolve(AttackConfig(name="pgd", eps=eps, n_images=n,
                                      args={"max_iter": steps}, label=label), cfg.eps)
        run_attack(attack, estimators, x, y, cfg, result, Kind.DIAG)
    grads = estimators["keras"].loss_gradient(x[:n], one_hot(y[:n], n_classes_of(model)))
    result.gradients = GradientFigures(
        zero_share=gradient_zero_share(grads),
        l1_median=float(np.median(np.abs(grads.reshape(n, -1)).sum(axis=1))))
    resolved = {a.key: a for a in attacks or []}
    rows = [o for o in result.outcomes if o.component == "" and o.kind in
            (Kind.ATTACK, Kind.TRANSFER, Kind.DIAG)]
    names = {Kind.ATTACK: "{}", Kind.TRANSFER: "transfer-{}", Kind.DIAG: "diag-{}"}
    verdicts: dict[str, dict[float, np.ndarray]] = {}
    kinds: dict[str, set[str]] = {"iterative": set(), "blackbox": set()}
    counterparts: dict[str, str] = {}
    ran = {o.attack for o in rows if o.kind == Kind.ATTACK}
    for o in rows:
        name = names[o.kind].format(o.attack)
        verdicts.setdefault(name, {})[o.eps] = o.verdict
        r = resolved.get(o.attack) if o.kind == Kind.ATTACK else None
        if o.kind == Kind.DIAG or (r is not None and r.iterative):
            kinds["iterative"].add(name)
        if o.kind == Kind.TRANSFER or (r is not None and r.blackbox):
            kinds["blackbox"].add(name)
        if o.kind == Kind.TRANSFER:
            counterparts[name] = o.attack if o.attack in ran else "fgsm"
    fgsm = [o for o in result.outcomes if o.kind == Kind.FGSM]
    evidence = Evidence(
        fgsm={o.eps: o.verdict for o in fgsm},
        fgsm_sweep={o.eps: o.accuracy for o in fgsm},
        attacks=verdicts,
        pgd_steps=(f"diag-pgd{d.pgd_steps}", f"diag-pgd{5 * d.pgd_steps}"),
        pgd_destroy="diag-pgd_destroy",
        grad_zero_share=result.gradients.zero_share,
        repeat_max_abs_diff=result.repeat_max_abs_diff,
        n_classes=n_classes_of(model),
        iterative=frozenset(kinds["iterative"]),
        blackbox=frozenset(kinds["blackbox"]),
        counterparts=counterparts,
        cascades=cascade_tables(result, attacks or []),
        grad_zero_count=zero_gradient_count(grads),
        probe=probe_model(model, x[:n], y[:n]),
    )
    result.diagnosis = diagnose(evidence, d)
    result.tags.update(result.diagnosis.tags())
