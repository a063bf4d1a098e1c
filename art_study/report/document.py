"""A study's results, read back from MLflow and written as a report people can read.

The path reads top to bottom:

1. find the study's parent run (by name or id) and read its plan and child runs
   (``mlflow.search_runs`` returns one pandas row per run: tags, status, every metric);
2. per-seed accuracies → mean ± 95 % confidence interval per sequence and depth;
3. the ε at which to compare with the paper (the paper never states its ε);
4. significance at that ε: paired t-test over seeds, McNemar's test over test images;
5. the runs the plan expected but that did not finish;
6. plots (robustness curves, accuracy vs depth, adversarial examples);
7. one Markdown file (PNGs beside it) and one self-contained HTML file, logged to the parent run
   under ``report/``.

Runs record which test image they got right in ``eval/correct.npz`` (``tracking.log_correctness``),
so two models can be compared image by image.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from scipy import stats

from art_study.errors import ArtStudyError
from art_study.evaluation import eps_key
from art_study.tracking import (
    CORRECT_ARTIFACT,
    DEFAULT_STORE_DIR,
    local_store_path,
    redact,
    resolve_tracking_uri,
)

REPORT_ARTIFACT_DIR = "report"
DEFAULT_EXPERIMENT = "art-study"
CONTROL = "none"

# Kim (2025), section 4: FGSM accuracy (%) per (sequence, depth); the paper gives no ε. The
# combination "Gradient Masking and Adversarial Training" has no stated order: both orders match.
PAPER_FGSM: dict[tuple[str, int], float] = {
    (CONTROL, 2): 29.15,
    ("adversarial_training", 2): 88.5,
    ("adversarial_training", 5): 97.9,
    ("distillation", 2): 33.12,
    ("gradient_masking", 2): 47.52,
    ("adversarial_training>gradient_masking", 2): 85.56,
    ("gradient_masking>adversarial_training", 2): 85.56,
}
PAPER_CLEAN: dict[tuple[str, int], float] = {(CONTROL, 2): 99.5}
PAPER_CONTROL_FGSM = PAPER_FGSM[(CONTROL, 2)]
EXACT_MCNEMAR_BELOW = 25  # discordant pairs; above, the χ² approximation is accurate
N_EXAMPLES = 8


# -- per-example correctness: written by every run (tracking.log_correctness) ------------
def load_correctness(run_id: str) -> dict[str, np.ndarray] | None:
    """The run's ``eval/correct.npz`` as arrays; None for runs recorded before it existed."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                       artifact_path=CORRECT_ARTIFACT, dst_path=tmp)
            with np.load(path) as npz:
                return {k: npz[k] for k in npz.files}
    except (MlflowException, OSError):
        return None


# -- reading the study back ---------------------------------------------------------------------
def study_runs(parent_run_id: str) -> pd.DataFrame:
    """One row per child run of the study: tags, status and every metric."""
    parent = mlflow.get_run(parent_run_id)
    df = mlflow.search_runs([parent.info.experiment_id],
                            f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if df.empty:
        return df
    df = df.rename(columns={"tags.sequence": "sequence", "tags.depth": "depth",
                            "tags.seed": "seed"})
    for col in ("depth", "seed"):  # absent only on a run that crashed before it was tagged
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64") if col in df else pd.NA
    return df


def open_store(tracking_uri: str | None) -> str:
    """Point MLflow at the store, refusing a local store that does not exist (reading only)."""
    uri = resolve_tracking_uri(tracking_uri)
    local = local_store_path(uri)
    if local is not None and not local.exists():
        raise ArtStudyError(f"no MLflow store at {local}: run a study first")
    mlflow.set_tracking_uri(uri)
    return uri


def find_study(study: str | None, experiment: str = DEFAULT_EXPERIMENT) -> mlflow.entities.Run:
    """The parent run of ``study``: a study name (its most recent parent) or a parent run id;
    None means the most recent study in ``experiment``."""
    role = "tags.`art_study.role` = 'study'"
    order = ["attributes.start_time DESC"]
    try:
        if study is None:
            exp = mlflow.get_experiment_by_name(experiment)
            found = mlflow.search_runs([exp.experiment_id], role, max_results=1, order_by=order,
                                       output_format="list") if exp else []
            if not found:
                raise ArtStudyError(f"no study in experiment {experiment!r}: run one first")
            return found[0]
        name = study.replace("'", "\\'")
        found = mlflow.search_runs(filter_string=f"{role} and tags.study = '{name}'",
                                   search_all_experiments=True, max_results=1, order_by=order,
                                   output_format="list")
        if found:
            return found[0]
        if re.fullmatch(r"[0-9a-f]{32}", study):
            run = mlflow.get_run(study)
            if run.data.tags.get("art_study.role") == "study":
                return run
            raise ArtStudyError(f"run {study} is not a study's parent run")
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtStudyError(f"cannot read study {study!r}: {first}") from None
    raise ArtStudyError(f"no study named {study!r} in {redact(mlflow.get_tracking_uri())}")


def load_plan(parent_run_id: str) -> pd.DataFrame | None:
    """The plan the study logged (sequence, depth, seed, run_key per expected run), if any."""
    try:  # mlflow.load_table searches the active experiment only; read the file directly
        table = mlflow.artifacts.load_dict(f"runs:/{parent_run_id}/plan.json")
    except (MlflowException, OSError, ValueError):
        return None
    plan = pd.DataFrame(table.get("data", []), columns=table.get("columns"))
    if plan.empty:
        return None
    return plan[["sequence", "depth", "seed", "run_key"]].astype({"depth": int, "seed": int})


def run_status(plan: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per expected run with the run that answers it (a FINISHED one first, else the
    latest) and its status; ``not started`` when the plan's run has no run yet."""
    cols = ["sequence", "depth", "seed", "run_key"]
    if runs.empty:
        runs = pd.DataFrame(columns=[*cols[:3], "tags.run_key", "run_id", "status",
                                     "start_time", "tags.failure_reason"])
    runs = runs.assign(run_key=runs.get("tags.run_key"),
                       failure_reason=runs.get("tags.failure_reason"),
                       finished=runs["status"] == "FINISHED")
    best = (runs.sort_values(["finished", "start_time"], ascending=False)
                .drop_duplicates("run_key"))
    if plan is None:  # no plan logged: the runs themselves are what was expected
        plan = best[cols].dropna(subset=["sequence"])
    merged = plan.merge(best[["run_key", "run_id", "status", "failure_reason"]],
                        on="run_key", how="left")
    merged["status"] = merged["status"].fillna("not started")
    return merged


# -- per-seed scores and their summary ------------------------------------------------------------
def eps_values(runs: pd.DataFrame) -> list[float]:
    """The ε sweep, read from the metric names the runs logged (ours: ``fgsm_custom``)."""
    prefix = "metrics.fgsm_custom/accuracy_eps_"
    return sorted(float(c[len(prefix):]) for c in runs.columns if c.startswith(prefix))


def metric_names(eps: list[float]) -> list[str]:
    """Column names of the score table: ``clean`` and ``eps_<ε>`` (as in the metric names)."""
    return ["clean", *(eps_key(e) for e in eps)]


def seed_scores(finished: pd.DataFrame, eps: list[float]) -> pd.DataFrame:
    """One row per finished run: accuracies in % (clean, ours-FGSM per ε) and cross-checks."""
    out = finished[["run_id", "sequence", "depth", "seed"]].copy()
    out["clean"] = finished["metrics.clean/accuracy"] * 100
    for e in eps:
        out[eps_key(e)] = finished[f"metrics.fgsm_custom/accuracy_{eps_key(e)}"] * 100
    for col, metric in (("xcheck", "xcheck/max_abs_diff"),
                        ("repeat", "xcheck/repeat_max_abs_diff")):
        out[col] = finished.get(f"metrics.{metric}", np.nan)
    out["fingerprint"] = finished.get("tags.data.fingerprint")
    return out.reset_index(drop=True)


def ci95_half_width(values: pd.Series) -> float:
    """Half-width of the 95 % Student-t confidence interval of the mean; NaN below 2 values."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def summarise(scores: pd.DataFrame, eps: list[float]) -> pd.DataFrame:
    """Mean, 95 % CI half-width and seed count per (depth, sequence, metric), long format."""
    long = scores.melt(id_vars=["depth", "sequence", "seed"], value_vars=metric_names(eps),
                       var_name="metric", value_name="acc").dropna(subset=["acc"])
    return (long.groupby(["depth", "sequence", "metric"], sort=False)["acc"]
                .agg(mean="mean", half=ci95_half_width, n="count").reset_index())


def lookup(summary: pd.DataFrame, depth: int, sequence: str, metric: str) -> pd.Series | None:
    """The summary row of one cell, or None when no run of it finished."""
    hit = summary[(summary["depth"] == depth) & (summary["sequence"] == sequence)
                  & (summary["metric"] == metric)]
    return None if hit.empty else hit.iloc[0]


def fmt_ci(row: pd.Series | None) -> str:
    """``97.3 ± 1.2`` (mean ± 95 % CI), ``97.3 (n=1)`` for one seed, ``—`` for none."""
    if row is None:
        return "—"
    if row["n"] < 2 or math.isnan(row["half"]):
        return f"{row['mean']:.2f} (n={int(row['n'])})"
    return f"{row['mean']:.2f} ± {row['half']:.2f}"


def fmt_p(p: float) -> str:
    """A p-value with three significant digits (``<0.0001`` below that)."""
    return "<0.0001" if p < 1e-4 else f"{p:.3g}"


def sequence_order(status: pd.DataFrame) -> list[str]:
    """Sequences in plan order, the control first."""
    seqs = list(dict.fromkeys(status["sequence"]))
    return sorted(seqs, key=lambda s: s != CONTROL)


def paper_value(table: dict[tuple[str, int], float], sequence: str, depth: int) -> str:
    """The paper's number for this sequence and depth, or blank where it has none."""
    value = table.get((sequence, depth))
    return "" if value is None else f"{value:g}"


# -- the comparison ε ---------------------------------------------------------------------------
@dataclass
class Comparison:
    """The ε at which our numbers are compared with the paper's, and why."""

    eps: float
    base_depth: int | None
    sweep: pd.DataFrame
    reason: str


def choose_comparison_eps(summary: pd.DataFrame, eps: list[float]) -> Comparison:
    """The ε where the control's mean FGSM accuracy (at the smallest depth with a control) is
    closest to the paper's 29.15 %: the paper does not state its ε, the control pins it down."""
    controls = summary[(summary["sequence"] == CONTROL) & (summary["metric"] != "clean")]
    if controls.empty:
        reason = (f"No control run finished, so ε cannot be matched to the paper's control "
                  f"({PAPER_CONTROL_FGSM} %); the largest ε of the sweep, {eps[-1]:g}, is used.")
        return Comparison(eps[-1], None, pd.DataFrame(), reason)
    base = int(controls["depth"].min())
    rows = []
    for e in eps:
        row = lookup(summary, base, CONTROL, eps_key(e))
        if row is not None:
            rows.append({"ε": f"{e:g}", "control FGSM accuracy %": fmt_ci(row),
                         "|Δ| to paper (pp)": abs(row["mean"] - PAPER_CONTROL_FGSM),
                         "_eps": e})
    sweep = pd.DataFrame(rows)
    best = sweep.loc[sweep["|Δ| to paper (pp)"].idxmin()]
    n = int(lookup(summary, base, CONTROL, eps_key(best["_eps"]))["n"])
    reason = (f"The paper reports FGSM accuracies but never its ε. We compare at ε = "
              f"{best['_eps']:g}: there the control (no defense, {base} conv, mean over {n} "
              f"seed{'s' if n > 1 else ''}) has {best['control FGSM accuracy %']} % FGSM "
              f"accuracy, closest to the paper's {PAPER_CONTROL_FGSM} % among the sweep "
              f"(|Δ| = {best['|Δ| to paper (pp)']:.2f} pp). Every ε of the sweep is in the "
              f"tables; the full control sweep:")
    sweep["|Δ| to paper (pp)"] = sweep["|Δ| to paper (pp)"].map(lambda d: f"{d:.2f}")
    return Comparison(float(best["_eps"]), base, sweep.drop(columns="_eps"), reason)


# -- the results tables ---------------------------------------------------------------------------
def fmt_diff(value: float) -> str:
    """A cross-check difference: ``0`` when bit-identical, else two significant digits."""
    return "—" if value is None or math.isnan(value) else ("0" if value == 0 else f"{value:.2g}")


def results_table(summary: pd.DataFrame, scores: pd.DataFrame, status: pd.DataFrame,
                  depth: int, eps: list[float], eps_star: float) -> pd.DataFrame:
    """One row per sequence expected at ``depth``: accuracies (mean ± CI) per ε, seeds, the
    paper's numbers at the comparison ε, and the cross-checks of our FGSM."""
    rows = []
    expected = status[status["depth"] == depth]
    for seq in sequence_order(expected):
        runs = scores[(scores["depth"] == depth) & (scores["sequence"] == seq)]
        row = {"sequence": seq + (" (control)" if seq == CONTROL else ""),
               "seeds": f"{len(runs)}/{(expected['sequence'] == seq).sum()}",
               "clean %": fmt_ci(lookup(summary, depth, seq, "clean"))}
        for e in eps:
            mark = " ★" if e == eps_star else ""
            row[f"FGSM ε={e:g} %{mark}"] = fmt_ci(lookup(summary, depth, seq, eps_key(e)))
        row[f"paper FGSM % (at ε={eps_star:g})"] = paper_value(PAPER_FGSM, seq, depth)
        row["paper clean %"] = paper_value(PAPER_CLEAN, seq, depth)
        row["ours vs ART max|Δ|"] = fmt_diff(runs["xcheck"].max())
        repeat = runs["repeat"].max()
        row["repeat max|Δ|"] = fmt_diff(repeat) + (
            " randomised gradients" if repeat > 0 else "")
        rows.append(row)
    return pd.DataFrame(rows)


# -- significance -------------------------------------------------------------------------------
def seed_matched(scores: pd.DataFrame, depth: int, a: str, b: str
                 ) -> list[tuple[pd.Series, pd.Series]]:
    """The finished runs of A and B at ``depth`` paired by seed (same seed, same test images)."""
    at = scores[scores["depth"] == depth]
    ra = at[at["sequence"] == a].set_index("seed")
    rb = at[at["sequence"] == b].set_index("seed")
    return [(ra.loc[s], rb.loc[s]) for s in sorted(set(ra.index) & set(rb.index))]


def paired_t(pairs: list[tuple[pd.Series, pd.Series]], metric: str) -> str:
    """Two-sided paired t-test over seeds of A's and B's accuracy: its p, or why there is none."""
    a = np.array([ra[metric] for ra, _ in pairs], dtype=float)
    b = np.array([rb[metric] for _, rb in pairs], dtype=float)
    if len(pairs) < 2:
        return f"n/a ({len(pairs)} seed{'' if len(pairs) == 1 else 's'})"
    if np.allclose(a - b, (a - b)[0]):
        return "n/a (same difference every seed)"
    return fmt_p(float(stats.ttest_rel(a, b).pvalue))


def mcnemar(a_only: int, b_only: int) -> tuple[float, str]:
    """McNemar's test on the discordant counts: exact binomial below 25 discordant images, else
    χ² with continuity correction."""
    n = a_only + b_only
    if n == 0:
        return 1.0, "exact"
    if n < EXACT_MCNEMAR_BELOW:
        return float(stats.binomtest(a_only, n, 0.5).pvalue), "exact"
    chi2 = (abs(a_only - b_only) - 1) ** 2 / n
    return float(stats.chi2.sf(chi2, 1)), "χ²"


@dataclass(frozen=True)
class SeedDiscordance:
    """One seed's discordant images at one metric: A right and B wrong, and the reverse."""

    seed: int
    a_only: np.ndarray  # bool per test image
    b_only: np.ndarray

    @property
    def counts(self) -> tuple[int, int]:
        return int(self.a_only.sum()), int(self.b_only.sum())


def seed_discordance(pairs: list[tuple[pd.Series, pd.Series]], correct: dict[str, dict | None],
                     key: str) -> list[SeedDiscordance]:
    """Per seed-matched pair of runs with per-example data on the same images: which images
    only A gets right and which only B does."""
    out = []
    for ra, rb in pairs:
        ca, cb = correct.get(ra["run_id"]) or {}, correct.get(rb["run_id"]) or {}
        if key not in ca or key not in cb or ca[key].shape != cb[key].shape:
            continue
        if isinstance(ra["fingerprint"], str) and ra["fingerprint"] != rb["fingerprint"]:
            continue  # not the same test images
        out.append(SeedDiscordance(int(ra.name), ca[key] & ~cb[key], ~ca[key] & cb[key]))
    return out


def clustered_mcnemar(per_seed: list[SeedDiscordance]) -> tuple[float, str] | None:
    """McNemar's test over seeds with each test image as a cluster of its seeds' outcomes.

    The seeds of a study are evaluated on the same test images (the full test set, or subsets
    aligned by position), so an image that is hard for B is hard for B in every seed: summing
    the seeds' discordant counts, as if every (seed, image) were an independent pair, overstates
    the evidence. Here the unit is the image: its net discordance d = Σ_seeds (A✓B✗ − A✗B✓).
    Under H0 (A and B exchangeable) d is symmetric about 0, and the test is on Σ d:
    Durkalski et al. (2003)'s clustered McNemar χ² = (Σ d)² / Σ d² with 1 df from
    ``EXACT_MCNEMAR_BELOW`` images with d ≠ 0, and below that the sign-flip permutation test
    of Σ d (scipy's ``permutation_test``; exact up to 2^16 sign patterns, seeded Monte Carlo
    above). With one seed this is McNemar's test (exact binomial; χ² without continuity
    correction). Where the seeds hold different images, aligning them by position keeps the
    test valid (a sum of independent symmetric terms is symmetric), only less powerful.
    None when the seeds' image counts differ (no alignment).
    """
    if not per_seed or len({len(s.a_only) for s in per_seed}) != 1:
        return None
    net = sum(s.a_only.astype(int) - s.b_only.astype(int) for s in per_seed)
    d = net[net != 0].astype(float)
    if d.size == 0:
        return 1.0, "exact"
    if d.size >= EXACT_MCNEMAR_BELOW:
        return float(stats.chi2.sf(d.sum() ** 2 / np.sum(d * d), 1)), "clustered χ²"
    result = stats.permutation_test((d,), lambda x, axis: np.sum(x, axis=axis),
                                    permutation_type="samples", vectorized=True,
                                    n_resamples=2**16, alternative="two-sided", random_state=0)
    how = "exact" if 2**d.size <= 2**16 else "sign-flip, 2^16 draws"
    return float(min(result.pvalue, 1.0)), how


def significance_table(scores: pd.DataFrame, summary: pd.DataFrame,
                       correct: dict[str, dict | None], pairs: list[tuple[int, str, str]],
                       eps_star: float) -> pd.DataFrame:
    """Both tests for each (depth, A, B) at the comparison ε, one row per pair: McNemar per
    seed, and over seeds with images as the unit (:func:`clustered_mcnemar`), never pooled."""
    metric, key = eps_key(eps_star), f"fgsm_{eps_key(eps_star)}"
    rows = []
    for depth, a, b in pairs:
        ma, mb = lookup(summary, depth, a, metric), lookup(summary, depth, b, metric)
        pairs_ab = seed_matched(scores, depth, a, b)
        per_seed = seed_discordance(pairs_ab, correct, key)
        row = {"depth": depth, "A": a, "B": b,
               "A %": fmt_ci(ma), "B %": fmt_ci(mb),
               "Δ (A−B) pp": "—" if ma is None or mb is None else f"{ma['mean'] - mb['mean']:+.2f}",
               "paired t p": paired_t(pairs_ab, metric)}
        row |= mcnemar_cells(per_seed)
        rows.append(row)
    return pd.DataFrame(rows)


def mcnemar_cells(per_seed: list[SeedDiscordance]) -> dict[str, str]:
    """The McNemar columns of a significance row: counts and p per seed, p over seeds."""
    if not per_seed:
        return {"A✓B✗ / A✗B✓ per seed": "—", "McNemar p per seed": "—",
                "McNemar p over seeds": "n/a (no per-example data)", "seeds · images": "—"}
    counts = [s.counts for s in per_seed]
    per_seed_p = [mcnemar(*c) for c in counts]
    combined = clustered_mcnemar(per_seed)
    sizes = sorted({len(s.a_only) for s in per_seed})
    return {
        "A✓B✗ / A✗B✓ per seed": " · ".join(f"s{s.seed}: {a} / {b}"
                                           for s, (a, b) in zip(per_seed, counts, strict=True)),
        "McNemar p per seed": " · ".join(f"s{s.seed}: {fmt_p(p)} ({how})"
                                         for s, (p, how) in zip(per_seed, per_seed_p,
                                                                strict=True)),
        "McNemar p over seeds": ("n/a (image counts differ between seeds)" if combined is None
                                 else f"{fmt_p(combined[0])} ({combined[1]})"),
        "seeds · images": f"{len(per_seed)} · {'/'.join(str(n) for n in sizes)}",
    }


def comparison_pairs(scores: pd.DataFrame, status: pd.DataFrame) -> tuple[list, list]:
    """(depth, defense, control) pairs and (depth, defense, defense) pairs, for the depths where
    runs finished."""
    vs_control, between = [], []
    for depth in sorted(scores["depth"].unique()):
        seqs = [s for s in sequence_order(status[status["depth"] == depth])
                if ((scores["depth"] == depth) & (scores["sequence"] == s)).any()]
        defenses = [s for s in seqs if s != CONTROL]
        if CONTROL in seqs:
            vs_control += [(int(depth), d, CONTROL) for d in defenses]
        between += [(int(depth), a, b) for a, b in itertools.combinations(defenses, 2)]
    return vs_control, between


# -- plots ----------------------------------------------------------------------------------------
def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg, off-screen, without pyplot's global state."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_robustness(summary: pd.DataFrame, depth: int, order: list[str], eps: list[float],
                    eps_star: float, path: Path) -> None:
    """Accuracy vs ε (clean at ε = 0), one line per sequence, 95 % CI bands with ≥ 2 seeds:
    how fast each defense gives way as the budget grows."""
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    xs = [0.0, *eps]
    for i, seq in enumerate(order):
        rows = [lookup(summary, depth, seq, m) for m in metric_names(eps)]
        pts = [(x, r["mean"], r["half"]) for x, r in zip(xs, rows, strict=True) if r is not None]
        if not pts:
            continue
        x, mean, half = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
        style = "--" if ">" in seq else "-"
        (line,) = ax.plot(x, mean, style, marker="o", color=f"C{i % 10}", label=seq)
        if np.isfinite(half).any():
            half = np.nan_to_num(half)
            ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.axvline(eps_star, color="grey", lw=0.8, ls=":")
    ax.axhline(PAPER_CONTROL_FGSM, color="grey", lw=0.8, ls="-.", label="paper control 29.15 %")
    ax.set(xlabel="FGSM ε (pixel scale [0, 1]; 0 = clean)", ylabel="accuracy %",
           title=f"Robustness, {depth} conv layers (ours FGSM; dotted: comparison ε)",
           ylim=(0, 101))
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path)


def plot_depth(summary: pd.DataFrame, order: list[str], eps_star: float, path: Path) -> None:
    """Accuracy vs depth for the control and each single defense, clean and at the comparison ε,
    with the paper's numbers as crosses: does depth buy robustness, as the paper says?"""
    singles = [s for s in order if ">" not in s]
    depths = sorted(int(d) for d in summary["depth"].unique())
    fig = new_figure(10, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, paper, title in (
            (axes[0], "clean", PAPER_CLEAN, "clean"),
            (axes[1], eps_key(eps_star), PAPER_FGSM, f"FGSM ε={eps_star:g}")):
        for i, seq in enumerate(singles):
            sel = summary[(summary["sequence"] == seq) & (summary["metric"] == metric)]
            sel = sel.sort_values("depth")
            dodge = 0.06 * (i - (len(singles) - 1) / 2)  # keep error bars apart
            if not sel.empty:
                ax.errorbar(sel["depth"].astype(float) + dodge, sel["mean"],
                            yerr=sel["half"].fillna(0), marker="o", capsize=3,
                            color=f"C{i % 10}", label=seq)
            for d in depths:
                if (seq, d) in paper:
                    ax.plot(d + dodge, paper[(seq, d)], "x", ms=9, mew=2, color=f"C{i % 10}")
        ax.set(xlabel="conv layers", title=title, ylim=(0, 101),
               xlim=(depths[0] - 0.5, depths[-1] + 0.5))
        ax.set_xticks(depths)
    axes[0].set_ylabel("accuracy % (mean ± 95 % CI; × = paper)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path)


@dataclass
class ExampleModel:
    """A model shown in the examples grid: its run, label and whose predictions."""

    run_id: str
    label: str


def example_images(run_id: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The first test images the run evaluated, loaded as the run loaded them (its config)."""
    from art_study.config import config_from_mapping
    from art_study.data import load_mnist

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    cfg = config_from_mapping(yaml.safe_load(text), "config.yaml")
    data = load_mnist(data_dir or cfg.data.dir, n_train=cfg.data.n_train,
                      n_test=cfg.data.n_test, seed=cfg.seed, download=False)
    return data.x_test[:N_EXAMPLES], data.y_test[:N_EXAMPLES]


def plot_examples(models: list[ExampleModel], eps: float, data_dir: str | None,
                  path: Path) -> None:
    """Clean and FGSM images with each model's predictions (green right, red wrong): what the
    attack does to a digit, and what a defense changes about it."""
    import keras

    import art_study.defenses  # noqa: F401  (registers the gradient-masking layers for loading)
    from art_study.attacks import FGSM
    from art_study.models import one_hot, predict_labels

    x, y = example_images(models[0].run_id, data_dir)
    fig = new_figure(1.3 * N_EXAMPLES, 1.5 * 2 * len(models))
    axes = fig.subplots(2 * len(models), N_EXAMPLES, squeeze=False)
    for m, spec in enumerate(models):
        model = mlflow.keras.load_model(f"runs:/{spec.run_id}/model",
                                        load_model_kwargs={"compile": False})
        keras.utils.set_random_seed(0)
        x_adv = FGSM(model, batch_size=N_EXAMPLES).generate(x, one_hot(y), eps)
        for r, (images, kind) in enumerate(((x, "clean"), (x_adv, f"FGSM ε={eps:g}"))):
            preds = predict_labels(model, images)
            for j in range(N_EXAMPLES):
                ax = axes[2 * m + r, j]
                ax.imshow(images[j, :, :, 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"pred {preds[j]}", fontsize=8,
                             color="green" if preds[j] == y[j] else "red")
            axes[2 * m + r, 0].set_ylabel(f"{spec.label}\n{kind}", fontsize=7)
    fig.suptitle(f"True labels: {' '.join(str(v) for v in y)}", fontsize=9)
    fig.savefig(path)


def example_models(scores: pd.DataFrame, summary: pd.DataFrame, cmp: Comparison
                   ) -> list[ExampleModel]:
    """The control and the most robust defended sequence at the base depth, same seed (so the
    same test images)."""
    depth = cmp.base_depth
    if depth is None:
        return []
    at_depth = scores[scores["depth"] == depth]
    control = at_depth[at_depth["sequence"] == CONTROL].sort_values("seed")
    metric = eps_key(cmp.eps)
    ranked = (summary[(summary["depth"] == depth) & (summary["sequence"] != CONTROL)
                      & (summary["metric"] == metric)].sort_values("mean", ascending=False))
    for seq in ranked["sequence"]:
        for _, c in control.iterrows():
            other = at_depth[(at_depth["sequence"] == seq) & (at_depth["seed"] == c["seed"])]
            if not other.empty:
                return [ExampleModel(c["run_id"], f"control, seed {c['seed']}"),
                        ExampleModel(other.iloc[0]["run_id"], f"{seq}, seed {c['seed']}")]
    return [ExampleModel(c["run_id"], f"control, seed {c['seed']}") for _, c in control[:1]
            .iterrows()]


# -- the document: Markdown and self-contained HTML from the same blocks ------------------------
@dataclass
class Doc:
    """The report as a list of blocks (heading, paragraph, table, image), rendered twice."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        """A section title (level 2) or sub-section (3)."""
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        """A paragraph; `code` and **bold** are the only markup it may use."""
        self.blocks.append(("para", text))

    def table(self, df: pd.DataFrame) -> None:
        """A table of already formatted cells (strings), columns as they should read."""
        self.blocks.append(("table", df))

    def image(self, path: Path, caption: str) -> None:
        """A PNG already written to ``path``: linked from Markdown, embedded in HTML."""
        self.blocks.append(("image", path, caption))

    def markdown(self) -> str:
        """Markdown with the PNGs linked by file name (they sit beside the .md file)."""
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "para":
                out += [block[1], ""]
            elif kind == "table":
                out += [markdown_table(block[1]), ""]
            else:
                out += [f"![{block[2]}]({block[1].name})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        """One HTML file, the PNGs embedded as base64 data URIs: mail it, open it anywhere."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{inline_html(block[2])}</h{block[1]}>")
            elif kind == "para":
                body.append(f"<p>{inline_html(block[1])}</p>")
            elif kind == "table":
                body.append(block[1].to_html(index=False, border=0, classes="results"))
            else:
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" '
                            f'alt="{html.escape(block[2])}"><figcaption>'
                            f"{html.escape(block[2])}</figcaption></figure>")
        return HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; }}
table.results {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }}
table.results th, table.results td {{ border: 1px solid #ccc; padding: 3px 6px;
                                      text-align: left; }}
table.results th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figcaption {{ font-style: italic; font-size: 0.9em; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head>
<body>
{body}
</body></html>
"""


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table (pandas' ``to_markdown`` needs the optional ``tabulate``)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = [[cell(c) for c in df.columns], *([cell(v) for v in r] for r in df.itertuples(
        index=False))]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Escape, then the two bits of Markdown the paragraphs use: ``code`` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


# -- putting it together --------------------------------------------------------------------------
@dataclass
class StudyData:
    """Everything the report reads from MLflow, gathered once."""

    parent: mlflow.entities.Run
    name: str
    status: pd.DataFrame
    scores: pd.DataFrame
    eps: list[float]
    finished: pd.DataFrame | None = None  # the finished child runs, every metric and tag


def gather(parent: mlflow.entities.Run) -> StudyData:
    """The study's plan, child runs and per-seed scores."""
    runs = study_runs(parent.info.run_id)
    status = run_status(load_plan(parent.info.run_id), runs)
    finished_ids = status.loc[status["status"] == "FINISHED", "run_id"]
    finished = runs[runs["run_id"].isin(finished_ids)] if not runs.empty else runs
    eps = eps_values(finished) if not finished.empty else []
    scores = (seed_scores(finished, eps) if not finished.empty
              else pd.DataFrame(columns=["run_id", "sequence", "depth", "seed"]))
    name = parent.data.tags.get("study") or parent.info.run_name
    return StudyData(parent, name, status, scores, eps, finished)


ATTACK_METRIC = re.compile(r"^metrics\.(attack|transfer)/([^/]+)/accuracy_eps_([^/]+)$")
# A component of an ensemble attack (AutoAttack): the robust accuracy left after it and every
# component before it, e.g. ``attack/autoattack-standard/apgd-t/accuracy_eps_0.3``.
COMPONENT_METRIC = re.compile(r"^metrics\.attack/([^/]+)/([^/]+)/accuracy_eps_([^/]+)$")
# AutoAttack's standard order; components not listed follow alphabetically.
COMPONENT_ORDER = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def _component_columns(runs: pd.DataFrame) -> dict[tuple[str, float], list[tuple[str, str]]]:
    """(ensemble attack, ε) → its components' (name, column), in the order they run."""
    found: dict[tuple[str, float], list[tuple[str, str]]] = {}
    for c in runs.columns:
        m = COMPONENT_METRIC.match(c)
        if m and runs[c].notna().any():
            found.setdefault((m.group(1), float(m.group(3))), []).append((m.group(2), c))
    rank = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    return {k: sorted(v, key=lambda nc: (rank.get(nc[0], len(rank)), nc[0]))
            for k, v in found.items()}


def attack_table(finished: pd.DataFrame, depth: int, order: list[str]) -> pd.DataFrame | None:
    """Accuracy (mean ± 95 % CI over seeds) under each stronger attack and the transfer attack,
    an ensemble attack's (AutoAttack's) robust accuracy after each of its components, and the
    gradient-masking verdict (seeds flagged / seeds, with the failed checks)."""
    runs = finished[finished["depth"] == depth]
    cols = sorted((c for c in runs.columns if ATTACK_METRIC.match(c) and runs[c].notna().any()),
                  key=lambda c: (ATTACK_METRIC.match(c).group(1) == "transfer",
                                 ATTACK_METRIC.match(c).group(2),
                                 float(ATTACK_METRIC.match(c).group(3))))
    components = _component_columns(runs)
    verdict_col = "tags.gradient_masking_suspected"
    if not cols and verdict_col not in runs:
        return None
    rows = []
    for seq in order:
        group = runs[runs["sequence"] == seq]
        if group.empty:
            continue
        row = {"sequence": seq + (" (control)" if seq == CONTROL else "")}
        for c in cols:
            kind, name, eps = ATTACK_METRIC.match(c).groups()
            label = f"{'transfer ' if kind == 'transfer' else ''}{name} ε {float(eps):g}"
            row[label] = fmt_ci(_ci_row(group[c].dropna() * 100))
            parts = components.get((name, float(eps))) if kind == "attack" else None
            if parts:
                steps = " → ".join(part for part, _ in parts)
                row[f"{name} ε {float(eps):g} after {steps}"] = " → ".join(
                    "—" if group[col].dropna().empty else f"{group[col].dropna().mean() * 100:.2f}"
                    for _, col in parts)
        if verdict_col in group:
            flags = group[verdict_col].dropna()
            failed = sorted({name for reasons in group.get(
                "tags.gradient_masking_reasons", pd.Series(dtype=str)).dropna()
                for name in re.findall(r"(?:^|; )([a-z_]+):", reasons)})
            row["masking suspected"] = (f"{int((flags == 'true').sum())}/{len(flags)}"
                                        + (f" ({', '.join(failed)})" if failed else ""))
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


ATTACK_TIME = re.compile(r"^metrics\.(attack|transfer|diag)/([^/]+)/time_s$")


def attack_cost_table(finished: pd.DataFrame) -> pd.DataFrame | None:
    """Each attack's budget (images, iterations, restarts, queries: the metrics logged beside
    its accuracies) and its wall time per model, median and range over the finished runs."""
    rows = []
    for col in sorted(c for c in finished.columns if ATTACK_TIME.match(c)):
        kind, name = ATTACK_TIME.match(col).groups()
        seconds = finished[col].dropna()
        if seconds.empty:
            continue
        prefix = f"metrics.{kind}/{name}/"
        budget = {c[len(prefix):]: finished[c].dropna() for c in finished.columns
                  if c.startswith(prefix) and c != col and "/" not in c[len(prefix):]
                  and not c[len(prefix):].startswith("accuracy")
                  and not c.endswith("time_s")}
        images = budget.pop("n_images", pd.Series(dtype=float))
        rows.append({
            "attack": f"{kind} {name}",
            "images": _range_text(images, "{:.0f}"),
            "budget": ", ".join(f"{k} {_range_text(v, '{:g}')}" for k, v in sorted(budget.items())
                                if not v.empty) or "—",
            "wall s per model: median (min–max)":
                f"{seconds.median():.1f} ({seconds.min():.1f}–{seconds.max():.1f})",
            "models": len(seconds),
        })
    return pd.DataFrame(rows) if rows else None


def _range_text(values: pd.Series, fmt: str) -> str:
    """One value, or ``low–high`` where the runs differ; ``—`` when there is none."""
    if values.empty:
        return "—"
    low, high = values.min(), values.max()
    return fmt.format(low) if low == high else f"{fmt.format(low)}–{fmt.format(high)}"


def _ci_row(values: pd.Series) -> pd.Series | None:
    if values.empty:
        return None
    return pd.Series({"mean": values.mean(), "half": ci95_half_width(values), "n": len(values)})


def missing_table(status: pd.DataFrame) -> pd.DataFrame:
    """The plan's runs that did not finish: failed, still running, or never started."""
    missing = status[status["status"] != "FINISHED"]
    return pd.DataFrame({
        "sequence": missing["sequence"], "depth": missing["depth"], "seed": missing["seed"],
        "status": missing["status"],
        "failure reason": missing["failure_reason"].fillna("").astype(str).str.slice(0, 160),
        "run id": missing["run_id"].fillna("—"),
    })


# -- the headline: robust accuracy, the per-image worst case over attacks --------------------
ROBUST_METRIC = re.compile(r"^metrics\.robust/accuracy_eps_([^/]+)$")


def robust_columns(finished: pd.DataFrame) -> dict[str, str]:
    """ε as written in the metric name → its worst-case column, for the ε any run logged."""
    found = {m.group(1): c for c in finished.columns
             if (m := ROBUST_METRIC.match(c)) and finished[c].notna().any()}
    return dict(sorted(found.items(), key=lambda kv: float(kv[0])))


def _pct(group: pd.DataFrame, column: str) -> pd.Series:
    return (group[column] if column in group else pd.Series(dtype=float)).dropna() * 100


def headline_table(data: StudyData, eps_star: float) -> tuple[pd.DataFrame, bool]:
    """Clean and robust accuracy per depth and sequence (mean ± 95 % CI over seeds), and
    whether robust means the worst case over attacks (else: FGSM at ``eps_star``)."""
    finished = data.finished if data.finished is not None else pd.DataFrame()
    robust = robust_columns(finished) if not finished.empty else {}
    rows = []
    for depth in sorted(data.status["depth"].unique()):
        for seq in sequence_order(data.status[data.status["depth"] == depth]):
            group = finished[(finished["depth"] == depth) & (finished["sequence"] == seq)]
            if group.empty:
                continue
            row = {"depth": int(depth), "sequence": seq + (" (control)" if seq == CONTROL else ""),
                   "seeds": str(len(group)),
                   "clean %": fmt_ci(_ci_row(_pct(group, "metrics.clean/accuracy")))}
            for eps, column in robust.items():
                values = _pct(group, column)
                if values.empty:  # runs evaluated before the worst case was logged
                    fgsm = _pct(group, f"metrics.fgsm_custom/accuracy_eps_{eps}")
                    cell = "—" if fgsm.empty else f"{fmt_ci(_ci_row(fgsm))} (FGSM only)"
                else:
                    cell = fmt_ci(_ci_row(values))
                row[f"worst case ε={float(eps):g} %"] = cell
            fgsm_eps = list(robust)[-1] if robust else eps_key(eps_star).removeprefix("eps_")
            row[f"FGSM ε={float(fgsm_eps):g} %"] = fmt_ci(_ci_row(
                _pct(group, f"metrics.fgsm_custom/accuracy_eps_{fgsm_eps}")))
            rows.append(row)
    return pd.DataFrame(rows), bool(robust)


def headline_section(doc: Doc, data: StudyData, cmp: Comparison) -> None:
    """The number to compare defenses by: the worst case over attacks when the runs logged it,
    else FGSM, saying which."""
    table, worst_case = headline_table(data, cmp.eps)
    if table.empty:
        return
    doc.heading("Headline: robust accuracy")
    if worst_case:
        doc.para("Robust accuracy is the **per-image worst case over every attack** a run "
                 "evaluated at that ε (metric `robust/accuracy_eps_<ε>`): an image counts only "
                 "if the model classifies it correctly, clean and under each attack. This is "
                 "the number a leaderboard reports and the one to compare defenses by. FGSM at "
                 "the largest of these ε is shown beside it: the gap is what FGSM alone "
                 "overstates. A cell marked `(FGSM only)` comes from runs evaluated before the "
                 "worst case was logged.")
    else:
        doc.para("No run logged a worst case over attacks (`robust/accuracy_eps_<ε>`), so the "
                 f"headline falls back to **FGSM at ε = {cmp.eps:g}** (the comparison ε), "
                 "which overstates the robustness of a defense that hides its gradients: see "
                 "the stronger attacks and the gradient-masking verdict below.")
    doc.table(table)


def teacher_note(finished: pd.DataFrame | None) -> str | None:
    """What "X → distillation" rows are: by default the distillation of X's model as trained
    (a T = 1 teacher), not Papernot's defensive distillation (``train_teacher: true``)."""
    if finished is None or finished.empty or "sequence" not in finished:
        return None
    later = finished[finished["sequence"].fillna("").str.contains(">distillation", regex=False)]
    if later.empty:
        return None
    col = "params.defenses.distillation.train_teacher"
    at_t = (later[col].astype(str).str.lower() == "true") if col in later else \
        pd.Series(False, index=later.index)
    from_t1 = sorted(set(later.loc[~at_t, "sequence"]))
    trained = sorted(set(later.loc[at_t, "sequence"]))
    parts = []
    if from_t1:
        parts.append(f"{', '.join(f'`{s}`' for s in from_t1)}: **distillation from a T = 1 "
                     "teacher**. The first stage's model, trained at T = 1, is the teacher and "
                     "its logits are only softened at T for the soft labels; Papernot et al.'s "
                     "defensive distillation trains the teacher at T, which is what saturates "
                     "the student (set `defenses.distillation.train_teacher: true` for that).")
    if trained:
        parts.append(f"{', '.join(f'`{s}`' for s in trained)}: the first stage's model was "
                     "trained further at T before distilling (`train_teacher: true`), "
                     "Papernot's teacher.")
    return "Sequences ending in distillation after another defense. " + " ".join(parts)


def intro(doc: Doc, data: StudyData, uri: str) -> None:
    """What was studied, where it is recorded, and how to read the numbers."""
    st, p = data.status, data.parent
    done = int((st["status"] == "FINISHED").sum())
    doc.para(f"Study **{data.name}**, parent run `{p.info.run_id}` (status {p.info.status}) in "
             f"the MLflow store `{uri}`. Report written "
             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.")
    doc.para(f"{done} of {len(st)} planned runs finished; depths "
             f"{', '.join(str(d) for d in sorted(st['depth'].unique()))}; seeds "
             f"{', '.join(str(s) for s in sorted(st['seed'].unique()))}; FGSM ε sweep "
             f"{', '.join(f'{e:g}' for e in data.eps) or '—'}.")
    doc.para("Accuracies are in % on the evaluated test images, as mean ± half-width of the 95 % "
             "Student-t confidence interval over seeds (one seed: the value and n=1, no "
             "interval). FGSM is ours (the paper's `tf.GradientTape` attack, metric "
             "`fgsm_custom/accuracy_eps_<ε>`), white-box against each model with the true "
             "labels. ★ marks the ε used for comparing with the paper. `ours vs ART max|Δ|` is "
             "the largest pixel difference between our FGSM and ART's on the same inputs; "
             "`repeat max|Δ|` is ours run twice: non-zero means the model's gradients are "
             "randomised (gradient noise), so the attack itself is noisy — a sign of gradient "
             "masking, not of robustness.")


def attacks_section(doc: Doc, data: StudyData) -> None:
    """Stronger attacks, transfer, and whether each defense's robustness is real."""
    if data.finished is None or data.finished.empty:
        return
    order = sequence_order(data.status)
    tables = [(d, attack_table(data.finished, int(d), order))
              for d in sorted(data.status["depth"].unique())]
    tables = [(d, t) for d, t in tables if t is not None]
    if not tables:
        return
    doc.heading("Beyond FGSM: stronger attacks and the gradient-masking verdict")
    doc.para("Accuracy in % on the first test images each attack was given (its budget is "
             "logged with the run: `attack/<name>/n_images`, `max_iter`, ...). `transfer` "
             "examples are crafted on the undefended control of the same depth and seed. "
             "`masking suspected` counts the seeds whose model failed at least one of the "
             "checks of Carlini et al. (2019) (see docs/attacks.md): robustness that "
             "FGSM shows but PGD, APGD, Square or the transfer attack take away is hidden "
             "gradients, not robustness. For an ensemble (AutoAttack) the `after` column "
             "gives the mean robust accuracy left after each component in turn (cumulative: "
             "an image broken by an earlier component stays broken), so it shows which "
             "component does the work.")
    for depth, table in tables:
        doc.heading(f"{depth} conv layers", level=3)
        doc.table(table)
    cost = attack_cost_table(data.finished)
    if cost is not None:
        doc.heading("Evaluation budget and wall time", level=3)
        doc.para("What each attack was given and what it cost, per evaluated model (`diag` are "
                 "the extra attacks of the gradient-masking checks). A transfer attack's time is "
                 "that of classifying the control's examples; crafting them, once per control, "
                 "is logged as `transfer/<name>/craft_time_s` (in runs recorded before that "
                 "metric existed it is part of the first defended model's time).")
        doc.table(cost)


def significance_section(doc: Doc, data: StudyData, summary: pd.DataFrame,
                         cmp: Comparison) -> None:
    """Paired t-test over seeds and McNemar over images, defense vs control and between
    defenses, at the comparison ε."""
    vs_control, between = comparison_pairs(data.scores, data.status)
    correct = {rid: load_correctness(rid) for rid in data.scores["run_id"]}
    doc.heading(f"Significance at ε = {cmp.eps:g}")
    doc.para("Paired t-test: the FGSM accuracies of A and B paired by seed (same seed, same data "
             "order and test images), two-sided; it needs at least 2 seeds. McNemar's test: on "
             "the same test images, the images only A classifies correctly (A✓B✗) against those "
             f"only B does (A✗B✓), per seed: exact binomial below {EXACT_MCNEMAR_BELOW} "
             "discordant images, χ² with continuity correction above. Over seeds the counts are "
             "not summed: the seeds are evaluated on the same test images, so their discordant "
             "pairs are not independent. `McNemar p over seeds` takes each test image as the "
             "unit, with its net discordance over the seeds (Σ A✓B✗ − A✗B✓), and tests that it "
             "is symmetric about 0: Durkalski et al. (2003)'s clustered McNemar χ² from "
             f"{EXACT_MCNEMAR_BELOW} images with a non-zero net, a sign-flip permutation test "
             "below. With one seed it is McNemar's test. p-values are not corrected for the "
             "number of comparisons.")
    for title, pairs in (("Each defense vs the control", vs_control),
                         ("Between defenses", between)):
        doc.heading(title, 3)
        if pairs:
            doc.table(significance_table(data.scores, summary, correct, pairs, cmp.eps))
        else:
            doc.para("No pair of sequences with finished runs.")


def plots_section(doc: Doc, data: StudyData, summary: pd.DataFrame, cmp: Comparison,
                  out_dir: Path, data_dir: str | None, examples: bool) -> list[Path]:
    """Robustness curves per depth, accuracy vs depth, and the adversarial examples grid."""
    doc.heading("Plots")
    written = []
    order = sequence_order(data.status)
    for depth in sorted(data.scores["depth"].unique()):
        path = out_dir / f"robustness_depth{depth}.png"
        plot_robustness(summary, int(depth), order, data.eps, cmp.eps, path)
        doc.image(path, f"Accuracy vs FGSM ε, {depth} conv layers (bands: 95 % CI over seeds)")
        written.append(path)
    path = out_dir / "depth.png"
    plot_depth(summary, order, cmp.eps, path)
    doc.image(path, f"Accuracy vs number of conv layers, clean and at ε = {cmp.eps:g} "
                    "(control and single defenses; crosses: the paper)")
    written.append(path)
    if examples:
        written += examples_figure(doc, data, summary, cmp, out_dir, data_dir)
    return written


def examples_figure(doc: Doc, data: StudyData, summary: pd.DataFrame, cmp: Comparison,
                    out_dir: Path, data_dir: str | None) -> list[Path]:
    """The examples grid, or a line saying why it is missing (no model logged, no MNIST)."""
    models = example_models(data.scores, summary, cmp)
    path = out_dir / "examples.png"
    try:
        if not models:
            raise ArtStudyError("no finished control run")
        plot_examples(models, cmp.eps, data_dir, path)
    except Exception as exc:  # an optional figure: say why it is missing, keep the report
        doc.para(f"Example images skipped: {type(exc).__name__}: {exc}.")
        return []
    doc.image(path, f"The first {N_EXAMPLES} test images, clean and after our FGSM at ε = "
                    f"{cmp.eps:g} against each model (rows: " + "; ".join(
                        m.label for m in models) + "); titles: the model's prediction, "
                    "green right, red wrong")
    return [path]


def build_doc(data: StudyData, uri: str, out_dir: Path, data_dir: str | None,
              examples: bool) -> tuple[Doc, list[Path]]:
    """All sections of the report, plots written into ``out_dir`` as it goes."""
    doc = Doc(f"art-study report: {data.name}")
    intro(doc, data, uri)
    pngs: list[Path] = []
    if data.scores.empty:
        doc.para("No run of this study has finished yet: no results to show.")
    else:
        summary = summarise(data.scores, data.eps)
        cmp = choose_comparison_eps(summary, data.eps)
        headline_section(doc, data, cmp)
        doc.heading("Comparison ε")
        doc.para(cmp.reason)
        if not cmp.sweep.empty:
            doc.table(cmp.sweep)
        for depth in sorted(data.status["depth"].unique()):
            doc.heading(f"Results: {depth} conv layers")
            doc.table(results_table(summary, data.scores, data.status, int(depth), data.eps,
                                    cmp.eps))
        doc.para("Paper numbers (Kim 2025, section 4) at the comparison ε: control 29.15 %, "
                 "adversarial training 88.5 % (2 conv) and 97.9 % (5 conv), distillation "
                 "33.12 %, gradient masking 47.52 %, gradient masking + adversarial training "
                 "85.56 % (order not stated: shown for both orders), clean control 99.5 %.")
        note = teacher_note(data.finished)
        if note:
            doc.para(note)
        attacks_section(doc, data)
        significance_section(doc, data, summary, cmp)
    doc.heading("Missing or failed runs")
    missing = missing_table(data.status)
    if missing.empty:
        doc.para(f"None: all {len(data.status)} planned runs finished.")
    else:
        doc.para(f"{len(missing)} of {len(data.status)} planned runs have not finished "
                 "(failed, still running, or not started); the results count finished runs "
                 "only (see the seed counts). Once the study has stopped, rerunning its command "
                 "resumes it: finished runs are kept, the others are run again.")
        doc.table(missing)
    if not data.scores.empty:
        pngs = plots_section(doc, data, summary, cmp, out_dir, data_dir, examples)
    return doc, pngs


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written, and the parent run it was logged to."""

    study: str
    parent_run_id: str
    markdown: Path
    html: Path
    images: list[Path]
    logged: bool


def write_report(study: str | None = None, *, tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, data_dir: str | None = None,
                 log: bool = True, examples: bool = True) -> ReportFiles:
    """Write the report of ``study`` (name, parent run id, or None: the most recent study).

    Args:
        study: the study's name (its most recent parent run) or its parent run id.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI``, then ./mlruns).
        out_dir: where the files go (default: ``mlruns/reports/<study name>``).
        data_dir: MNIST for the example images (default: where the runs loaded it).
        log: also log the files to the parent run under ``report/``.
        examples: draw the example images (loads two models and attacks 8 images).

    Raises:
        ArtStudyError: no store, no such study.
    """
    uri = open_store(tracking_uri)
    data = gather(find_study(study))
    out = Path(out_dir) if out_dir else DEFAULT_STORE_DIR / "reports" / safe_name(data.name)
    out.mkdir(parents=True, exist_ok=True)
    doc, pngs = build_doc(data, redact(uri), out, data_dir, examples)
    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.markdown(), encoding="utf-8")
    page.write_text(doc.html(), encoding="utf-8")
    if log:
        client = mlflow.MlflowClient()
        for path in (md, page, *pngs):
            client.log_artifact(data.parent.info.run_id, str(path), REPORT_ARTIFACT_DIR)
    return ReportFiles(data.name, data.parent.info.run_id, md, page, pngs, log)


def safe_name(name: str) -> str:
    """A study name usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
