"""The report's tables: formatted cells (mean ± 95 % CI over seeds), one function per table.

Each table is a pandas frame of strings, columns as they should read; ``document.py`` places it.
Also here: the paper's numbers and the ε at which ours are compared with them (the paper never
states its ε: the control pins it down, :func:`choose_comparison_eps`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import pandas as pd

from art_study.evaluation import eps_key
from art_study.report.reading import StudyData, metric_names
from art_study.report.statistics import (
    SeedDiscordance,
    ci95_half_width,
    clustered_mcnemar,
    mcnemar,
    paired_t,
    summarise_seeds,
)

CONTROL = "none"  # the sequence of the undefended model

# -- the paper's numbers ---------------------------------------------------------------------------
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


# -- the per-cell summary and its formatting ------------------------------------------------------
def summarise(scores: pd.DataFrame, eps: list[float]) -> pd.DataFrame:
    """Mean, 95 % CI half-width and seed count per (depth, sequence, metric), long format."""
    return summarise_seeds(scores, metric_names(eps))


def lookup(summary: pd.DataFrame, depth: int, sequence: str, metric: str) -> pd.Series | None:
    """The summary row of one cell, or None when no run of it finished."""
    hit = summary[(summary["depth"] == depth) & (summary["sequence"] == sequence)
                  & (summary["metric"] == metric)]
    return None if hit.empty else hit.iloc[0]


def _ci_row(values: pd.Series) -> pd.Series | None:
    """A summary row (mean, 95 % CI half-width, n) of per-seed values; None when there are none."""
    if values.empty:
        return None
    return pd.Series({"mean": values.mean(), "half": ci95_half_width(values), "n": len(values)})


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


def fmt_diff(value: float) -> str:
    """A cross-check difference: ``0`` when bit-identical, else two significant digits."""
    return "—" if value is None or math.isnan(value) else ("0" if value == 0 else f"{value:.2g}")


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
ATTACK_METRIC = re.compile(r"^metrics\.(attack|transfer)/([^/]+)/accuracy_eps_([^/]+)$")


def robust_columns(finished: pd.DataFrame) -> dict[str, str]:
    """ε as written in the metric name → its worst-case column, for the ε at which a run logged
    the worst case *and* one of the config's attacks (``attack/…``: PGD, APGD, Square, ...) ran.
    Where only FGSM and transfer FGSM ran, the "worst case" is a single-step attack again, and a
    column of it beside a real worst case reads as if robustness came back at a larger ε."""
    attacked = {m.group(3) for c in finished.columns
                if (m := ATTACK_METRIC.match(c)) and m.group(1) == "attack"
                and finished[c].notna().any()}
    found = {m.group(1): c for c in finished.columns
             if (m := ROBUST_METRIC.match(c)) and finished[c].notna().any()
             and m.group(1) in attacked}
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


# -- beyond FGSM: stronger attacks, their components and cost, the masking verdict -------------
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


# -- significance -------------------------------------------------------------------------------
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


def seed_matched(scores: pd.DataFrame, depth: int, a: str, b: str
                 ) -> list[tuple[pd.Series, pd.Series]]:
    """The finished runs of A and B at ``depth`` paired by seed (same seed, same test images)."""
    at = scores[scores["depth"] == depth]
    ra = at[at["sequence"] == a].set_index("seed")
    rb = at[at["sequence"] == b].set_index("seed")
    return [(ra.loc[s], rb.loc[s]) for s in sorted(set(ra.index) & set(rb.index))]


def paired_t_cell(pairs: list[tuple[pd.Series, pd.Series]], metric: str) -> str:
    """The paired t-test over seeds of A's and B's accuracy: its p, or why there is none."""
    p = paired_t([ra[metric] for ra, _ in pairs], [rb[metric] for _, rb in pairs])
    if p is not None:
        return fmt_p(p)
    if len(pairs) < 2:
        return f"n/a ({len(pairs)} seed{'' if len(pairs) == 1 else 's'})"
    return "n/a (same difference every seed)"


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


def significance_table(scores: pd.DataFrame, summary: pd.DataFrame,
                       correct: dict[str, dict | None], pairs: list[tuple[int, str, str]],
                       eps_star: float, measure: str = "fgsm") -> pd.DataFrame:
    """Both tests for each (depth, A, B) at the comparison ε, one row per pair: McNemar per
    seed, and over seeds with images as the unit (:func:`clustered_mcnemar`), never pooled.

    ``measure``: ``fgsm`` (our FGSM, the paper's measure) or ``robust`` (the per-image worst
    case over every attack, ``robust_eps_<ε>`` in ``scores`` and in each run's per-image
    verdicts): the accuracy a defense should be judged by where stronger attacks ran."""
    if measure not in ("fgsm", "robust"):
        raise ValueError(f"measure must be fgsm or robust, got {measure!r}")
    metric = eps_key(eps_star) if measure == "fgsm" else f"robust_{eps_key(eps_star)}"
    key = f"{measure}_{eps_key(eps_star)}"
    if measure == "robust":
        summary = summarise_seeds(scores, [metric])
    rows = []
    for depth, a, b in pairs:
        ma, mb = lookup(summary, depth, a, metric), lookup(summary, depth, b, metric)
        pairs_ab = seed_matched(scores, depth, a, b)
        per_seed = seed_discordance(pairs_ab, correct, key)
        row = {"depth": depth, "A": a, "B": b,
               "A %": fmt_ci(ma), "B %": fmt_ci(mb),
               "Δ (A−B) pp": "—" if ma is None or mb is None else f"{ma['mean'] - mb['mean']:+.2f}",
               "paired t p": paired_t_cell(pairs_ab, metric)}
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
