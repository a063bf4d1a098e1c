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
Every number is returned as a flat ``metric name → value`` dict ready for MLflow, with the tags
of the verdict, and which test images the model got right under each attack and ε, for paired
per-example tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np
from tqdm.auto import tqdm

from art_study.attacks import FGSM, art_fgsm, draws_randomness_in_inference
from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
from art_study.attacks.registry import Estimators, ResolvedAttack, resolve
from art_study.config import AttackConfig, EvaluationConfig
from art_study.diagnostics import (
    Evidence,
    diagnose,
    gradient_zero_share,
    probe_model,
    zero_gradient_count,
)
from art_study.models import one_hot, predict_labels, to_art


@dataclass(frozen=True)
class CrossCheck:
    """How far our FGSM and ART's FGSM are from each other on the same inputs."""

    max_abs_diff: float
    pixel_diff_share: float
    prediction_agreement: float


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


def eps_key(eps: float) -> str:
    """Metric-name suffix for an ε (``0.1`` → ``eps_0.1``)."""
    return f"eps_{eps:g}"


@dataclass
class EvaluationResult:
    """All figures of one evaluation, named as they are logged to MLflow.

    ``correct`` holds one boolean per evaluated image: ``clean``, ``fgsm_eps_<ε>`` (ours), each
    attack's ``<prefix>/<key>_eps_<ε>`` and the worst case ``robust_eps_<ε>``, so two models
    evaluated on the same images can be compared image by image (McNemar's test).
    ``verdicts`` holds the same per-image verdicts keyed by the exact configured ε
    (``verdicts[name][ε]``, ``name`` ``fgsm`` or ``<prefix>/<key>``), so nothing downstream has
    to parse an ε back out of a metric name (8/255 does not survive ``f"{ε:g}"``).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    verdicts: dict[str, dict[float, np.ndarray]] = field(default_factory=dict, repr=False)

    def fgsm_accuracy(self, eps: float, impl: str = "custom") -> float:
        return self.metrics[f"fgsm_{impl}/accuracy_{eps_key(eps)}"]


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
                x=x[:n], y=one_hot(y[:n])) for eps in attack.eps}
        out.seconds[key] = time.perf_counter() - t0
    return out


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: EvaluationConfig,
             progress: bool = True, transfer_set: TransferSet | None = None) -> EvaluationResult:
    """Everything :mod:`art_study.evaluation` promises, for one model.

    ``transfer_set`` holds the transfer attacks' examples, crafted on the undefended control
    of the same depth and seed (:func:`craft_transfer`; ``None`` for the control itself).
    """
    if cfg.n_attack is not None:
        x, y = x[: cfg.n_attack], y[: cfg.n_attack]
    result = EvaluationResult()
    fgsm_sweep(model, x, y, cfg, result, progress)
    attacks = [resolve(a, cfg.eps) for a in cfg.attacks]  # validated when the plan was made
    estimators = Estimators(model)
    for attack in tqdm(attacks, desc="attacks", disable=not progress, leave=False):
        run_attack(attack, estimators, x, y, cfg, result, prefix="attack")
    if transfer_set is not None:
        transfer(model, transfer_set, y, result)
    worst_case(result)
    if cfg.diagnostics.enabled:
        diagnostics(model, estimators, x, y, cfg, result, attacks)
    return result


def fgsm_sweep(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: EvaluationConfig,
               result: EvaluationResult, progress: bool) -> None:
    """Clean accuracy; our FGSM at every ε; ART's on the first ``xcheck_images``; cross-check."""
    y1h = one_hot(y)
    m = result.metrics
    result.correct["clean"] = predict_labels(model, x) == y
    m["clean/accuracy"] = float(np.mean(result.correct["clean"]))
    m["eval/n_images"] = float(len(x))

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
    clean = result.correct["clean"]
    n_x = len(x) if cfg.xcheck_images is None else min(cfg.xcheck_images, len(x))
    m["xcheck/n_images"] = float(n_x)
    swept = None
    if one_gradient:  # bit for bit the images of one generate() per ε
        t0 = time.perf_counter()
        swept = ours.sweep(x, y1h, list(cfg.eps))
        t_ours = time.perf_counter() - t0
    for eps in tqdm(cfg.eps, desc="FGSM sweep (ours + ART)", disable=not progress, leave=False):
        k = eps_key(eps)
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
        result.correct[f"fgsm_{k}"] = ok
        result.verdicts.setdefault("fgsm", {})[eps] = ok
        m[f"fgsm_custom/accuracy_{k}"] = float(np.mean(ok))
        m[f"fgsm_art/accuracy_{k}"] = float(np.mean(clean[:n_x] & (pred_art == y[:n_x])))
        cc = cross_check(x_ours[:n_x], x_art, pred_ours[:n_x], pred_art)
        m[f"xcheck/max_abs_diff_{k}"] = cc.max_abs_diff
        m[f"xcheck/pixel_diff_share_{k}"] = cc.pixel_diff_share
        m[f"xcheck/prediction_agreement_{k}"] = cc.prediction_agreement

    # Our FGSM again on the same inputs: on a deterministic model it is bit-identical. When it
    # is not, the model's gradients are randomised (e.g. a gradient-noise layer), and any
    # disagreement with ART above comes from the model, not from either implementation. At the
    # largest ε: at ε = 0 FGSM is the identity and would hide any randomness.
    repeat = ours.generate(x, y1h, top)
    m["xcheck/repeat_max_abs_diff"] = float(np.abs(repeat - x_top).max())

    m["fgsm_custom/images_per_s"] = len(x) * len(cfg.eps) / max(t_ours, 1e-9)
    m["fgsm_art/images_per_s"] = n_x * len(cfg.eps) / max(t_art, 1e-9)
    m["xcheck/max_abs_diff"] = max(m[f"xcheck/max_abs_diff_{eps_key(e)}"] for e in cfg.eps)


def run_attack(attack: ResolvedAttack, estimators: dict, x: np.ndarray, y: np.ndarray,
               cfg: EvaluationConfig, result: EvaluationResult, prefix: str) -> None:
    """One attack on the first ``n_images``: accuracy per ε, its wall time and budget; for a
    cascade (``autoattack-standard``) also the cumulative accuracy after each component,
    ``<prefix>/<key>/<component>/accuracy_eps_<ε>``."""
    n = min(attack.cfg.n_images, len(x))
    t0 = time.perf_counter()
    components: dict[str, dict[float, np.ndarray]] = {}
    correct = attack.run(estimators[attack.estimator], x[:n], y[:n], cfg.batch_size,
                         components=components)
    name = f"{prefix}/{attack.key}"
    record(result, name, correct, time.perf_counter() - t0,
           attack.budget() | {"n_images": float(n)})
    for component, by_eps in components.items():
        for eps, ok in by_eps.items():
            result.metrics[f"{name}/{component}/accuracy_{eps_key(eps)}"] = float(np.mean(ok))
    if attack.note:
        result.tags[f"{name.replace('/', '.')}.budget"] = attack.note


def record(result: EvaluationResult, name: str, correct: dict[float, np.ndarray],
           seconds: float, budget: dict[str, float]) -> None:
    """Log ``<name>/accuracy_eps_<ε>``, ``<name>/time_s`` and the budget; keep the per-image
    verdicts under ``<name>_eps_<ε>`` for McNemar's test and in ``result.verdicts[name]``.

    Every verdict is ANDed with clean correctness here too, whatever produced it."""
    m = result.metrics
    clean = result.correct["clean"]
    for eps, ok in correct.items():
        ok = np.asarray(ok, bool) & clean[: len(ok)]
        m[f"{name}/accuracy_{eps_key(eps)}"] = float(np.mean(ok))
        result.correct[f"{name}_{eps_key(eps)}"] = ok
        result.verdicts.setdefault(name, {})[eps] = ok
    m[f"{name}/time_s"] = seconds
    m.update({f"{name}/{k}": v for k, v in budget.items()})


def transfer(model: keras.Model, crafted: TransferSet, y: np.ndarray,
             result: EvaluationResult) -> None:
    """The examples crafted on the control, evaluated on ``model`` (black box). ``time_s`` is
    this model's share; ``craft_time_s`` the one-off crafting on the control."""
    for key, by_eps in crafted.examples.items():
        n = len(next(iter(by_eps.values())))
        t0 = time.perf_counter()
        clean = result.correct["clean"][:n]
        correct = {eps: clean & (predict_labels(model, xa) == y[:n])
                   for eps, xa in by_eps.items()}
        record(result, f"transfer/{key}", correct, time.perf_counter() - t0,
               {"n_images": float(n), "craft_time_s": crafted.seconds[key]})


def worst_case(result: EvaluationResult) -> None:
    """Per image, robust at ε only if robust under every attack run at ε: our FGSM, each
    configured attack and each transfer attack, on the first images all of them ran on.

    Logs ``robust/accuracy_eps_<ε>`` and ``robust/n_images_eps_<ε>`` and keeps the verdicts as
    ``correct["robust_eps_<ε>"]``. ART's FGSM (a cross-check of ours) and the diagnostics' PGD
    runs (checks sized by ``diagnostics.n_images``, which would shrink the common prefix) are
    left out.
    """
    names = [n for n in result.verdicts if n == "fgsm" or n.startswith(("attack/", "transfer/"))]
    for eps in sorted({e for n in names for e in result.verdicts[n]}):
        masks = [result.verdicts[n][eps] for n in names if eps in result.verdicts[n]]
        n = min(len(mask) for mask in masks)
        robust = np.logical_and.reduce([mask[:n] for mask in masks])
        result.metrics[f"robust/accuracy_{eps_key(eps)}"] = float(np.mean(robust))
        result.metrics[f"robust/n_images_{eps_key(eps)}"] = float(n)
        result.correct[f"robust_{eps_key(eps)}"] = robust


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
        run_attack(attack, estimators, x, y, cfg, result, prefix="diag")
    grads = estimators["keras"].loss_gradient(x[:n], one_hot(y[:n]))
    m = result.metrics
    m["diag/grad_zero_share"] = gradient_zero_share(grads)
    m["diag/grad_l1_median"] = float(np.median(np.abs(grads.reshape(n, -1)).sum(axis=1)))
    # AutoAttack's Square check reads each cascade's logged per-component accuracies
    cascades = {a.key: {e: {c: m[k] for c in (*COMPONENTS, *PLUS_COMPONENTS)
                            if (k := f"attack/{a.key}/{c}/accuracy_{eps_key(e)}") in m}
                        for e in a.eps} for a in attacks or []}

    resolved = {a.key: a for a in attacks or []}
    names, kinds = {}, {"iterative": set(), "blackbox": set()}
    counterparts: dict[str, str] = {}
    for full in result.verdicts:
        prefix, _, key = full.partition("/")
        if prefix == "attack":
            names[full] = key
            r = resolved.get(key)
            if r is not None and r.iterative:
                kinds["iterative"].add(key)
            if r is not None and r.blackbox:
                kinds["blackbox"].add(key)
        elif prefix == "transfer":
            names[full] = f"transfer-{key}"
            kinds["blackbox"].add(names[full])
            counterparts[names[full]] = key if f"attack/{key}" in result.verdicts else "fgsm"
        elif prefix == "diag":
            names[full] = f"diag-{key}"
            kinds["iterative"].add(names[full])
    evidence = Evidence(
        fgsm=result.verdicts["fgsm"],
        fgsm_sweep={e: m[f"fgsm_custom/accuracy_{eps_key(e)}"] for e in cfg.eps},
        attacks={names[k]: v for k, v in result.verdicts.items() if k in names},
        pgd_steps=(f"diag-pgd{d.pgd_steps}", f"diag-pgd{5 * d.pgd_steps}"),
        pgd_destroy="diag-pgd_destroy",
        grad_zero_share=m["diag/grad_zero_share"],
        repeat_max_abs_diff=m["xcheck/repeat_max_abs_diff"],
        iterative=frozenset(kinds["iterative"]),
        blackbox=frozenset(kinds["blackbox"]),
        counterparts=counterparts,
        cascades={a: t for a, t in cascades.items() if any(t.values())},
        grad_zero_count=zero_gradient_count(grads),
        probe=probe_model(model, x[:n], y[:n]),
    )
    diagnosis = diagnose(evidence, d)
    m.update(diagnosis.metrics())
    result.tags.update(diagnosis.tags())
