"""The report's tables: formatted cells (mean ± 95 % CI over seeds), one function per table.

Beside a robust accuracy the tables give one model's binomial (Wilson) 95 % interval on the
images it was measured on (:func:`fmt_per_model`): the seed interval is the spread of training,
this one the finite test set.

Every table is made from the study's long results frame (:func:`art_study.report.reading.
study_results`: one row per run, kind, attack, component and ε) and its summary over seeds
(:func:`summarise`), selecting rows by those fields. Each table is a pandas frame of strings,
columns as they should read; ``document.py`` places it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from art_study.report.statistics import (
    SeedDiscordance,
    ci95_half_width,
    clustered_mcnemar,
    mcnemar,
    paired_t,
    summarise_seeds,
    wilson_half_width,
)
from art_study.results import Kind

CONTROL = "none"  # the sequence of the undefended model
PER_MODEL = "binomial 95 % per model"  # the header of a per-model interval's column
KEYS = ["depth", "sequence", "kind", "attack", "component", "eps"]

#: ``(run_id, kind, ε) → which images it got right``, or None where none were logged
VerdictOf = Callable[[str, Kind, float], np.ndarray | None]


# -- the per-cell summary and its formatting ------------------------------------------------------
def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy in %: mean, 95 % CI half-width and seed count per (depth, sequence, kind,
    attack, component, ε), long format."""
    return summarise_seeds(results.assign(acc=results["accuracy"] * 100), KEYS)


def select(frame: pd.DataFrame, kind: Kind, eps: float | None = None, attack: str | None = None,
           component: str | None = "", **where) -> pd.DataFrame:
    """The rows of ``frame`` (results or summary) of one kind (and ε, attack, component, and
    any other column's value given as a keyword); ``component=None``: every component's."""
    mask = frame["kind"] == kind
    if component is not None:
        mask &= frame["component"] == component
    if eps is not None:
        mask &= frame["eps"] == eps
    if attack is not None:
        mask &= frame["attack"] == attack
    for column, value in where.items():
        mask &= frame[column] == value
    return frame[mask]


def lookup(summary: pd.DataFrame, depth: int, sequence: str, kind: Kind,
           eps: float | None = None, **more) -> pd.Series | None:
    """The summary row of one cell, or None when no run of it logged the value."""
    hit = select(summary, kind, eps, depth=depth, sequence=sequence, **more)
    return None if hit.empty else hit.iloc[0]


def _ci_row(values: pd.Series) -> pd.Series | None:
    """A summary row (mean, 95 % CI half-width, n) of per-seed values; None when there are none."""
    values = values.dropna()
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


def fmt_count(n: float) -> str:
    """An image count with a space between thousands: ``10 000``."""
    return f"{int(n):,}".replace(",", " ")


def fmt_per_model(rows: pd.DataFrame) -> str:
    """One model's binomial 95 % interval (Wilson, in points) of the per-seed rows of one
    measurement, from each row's accuracy and image count: ``± 0.6 per model (n = 10 000)``,
    a range where the seeds' half-widths (at one decimal) or image counts differ; ``—`` where
    no row has both."""
    rows = rows.dropna(subset=["accuracy", "n_images"])
    rows = rows[rows["n_images"] > 0]
    if rows.empty:
        return "—"
    half = pd.Series([wilson_half_width(a, int(n)) * 100 for a, n in
                      zip(rows["accuracy"], rows["n_images"], strict=True)]).round(1)
    return (f"± {_range_text(half, '{:.1f}')} per model "
            f"(n = {_range_text(rows['n_images'], fmt_count)})")


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


def shown(sequence: str) -> str:
    """A sequence as a table shows it, the control marked."""
    return sequence + (" (control)" if sequence == CONTROL else "")


def reference_eps(eps: list[float], dataset: str = "mnist") -> float:
    """The ε the headline falls back to and the plots compare depths at, unless an optional
    section (the paper comparison) sets another: the dataset's headline budget (MNIST 0.3,
    Fashion-MNIST 0.1, CIFAR-10 8/255) when the sweep has it, else the sweep's largest."""
    from art_study.datasets import DATASETS, MNIST

    headline = DATASETS.get(dataset, MNIST).headline_eps
    return next((e for e in eps if abs(e - headline) < 1e-9), eps[-1])


def attacked_eps(results: pd.DataFrame) -> list[float]:
    """The ε at which a run logged the worst case *and* one of the config's attacks (PGD,
    APGD, Square, AutoAttack, ...) ran. Where only FGSM and transfer FGSM ran, the "worst case"
    is a single-step attack again, and a column of it beside a real worst case reads as if
    robustness came back at a larger ε."""
    ran = set(select(results, Kind.ATTACK).dropna(subset=["accuracy"])["eps"])
    worst = set(select(results, Kind.WORST_CASE).dropna(subset=["accuracy"])["eps"])
    return sorted(float(e) for e in ran & worst)


# -- the results tables ---------------------------------------------------------------------------
def run_metric(finished: pd.DataFrame, metric: str) -> pd.Series:
    """One figure per finished run that is not an accuracy (the FGSM cross-checks)."""
    return finished.get(f"metrics.{metric}", pd.Series(np.nan, index=finished.index))


def results_table(summary: pd.DataFrame, finished: pd.DataFrame, status: pd.DataFrame,
                  depth: int, eps: list[float], eps_star: float) -> pd.DataFrame:
    """One row per sequence expected at ``depth``: accuracies (mean ± CI) per ε, seeds, and
    the cross-checks of our FGSM; ★ marks the reference ε."""
    rows = []
    expected = status[status["depth"] == depth]
    for seq in sequence_order(expected):
        runs = finished[(finished["depth"] == depth) & (finished["sequence"] == seq)]
        row = {"sequence": shown(seq),
               "seeds": f"{len(runs)}/{(expected['sequence'] == seq).sum()}",
               "clean %": fmt_ci(lookup(summary, depth, seq, Kind.CLEAN))}
        for e in eps:
            mark = " ★" if e == eps_star else ""
            row[f"FGSM ε={e:g} %{mark}"] = fmt_ci(lookup(summary, depth, seq, Kind.FGSM, e))
        row["ours vs ART max|Δ|"] = fmt_diff(run_metric(runs, "xcheck/max_abs_diff").max())
        repeat = run_metric(runs, "xcheck/repeat_max_abs_diff").max()
        row["repeat max|Δ|"] = fmt_diff(repeat) + (" randomised gradients" if repeat > 0 else "")
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
def headline_table(results: pd.DataFrame, status: pd.DataFrame, eps_star: float
                   ) -> tuple[pd.DataFrame, bool]:
    """Clean and robust accuracy per depth and sequence (mean ± 95 % CI over seeds), each
    robust figure followed by one model's binomial 95 % interval on its images
    (:func:`fmt_per_model`), and whether robust means the worst case over attacks (else FGSM
    at ``eps_star`` is the headline, and its per-model interval is shown)."""
    robust = attacked_eps(results)
    rows = []
    for depth in sorted(status["depth"].unique()):
        for seq in sequence_order(status[status["depth"] == depth]):
            group = results[(results["depth"] == depth) & (results["sequence"] == seq)]
            if group.empty:
                continue
            row = {"depth": int(depth), "sequence": shown(seq),
                   "seeds": str(group["run_id"].nunique()),
                   "clean %": fmt_ci(_pct(group, Kind.CLEAN))}
            for eps in robust:
                worst = select(group, Kind.WORST_CASE, eps).dropna(subset=["accuracy"])
                fgsm_only = worst.empty  # runs evaluated before the worst case was logged
                if fgsm_only:
                    worst = select(group, Kind.FGSM, eps).dropna(subset=["accuracy"])
                row[f"worst case ε={eps:g} %"] = fmt_ci(_ci_row(worst["accuracy"] * 100)) + (
                    " (FGSM only)" if fgsm_only and not worst.empty else "")
                row[f"worst case ε={eps:g}: {PER_MODEL}"] = fmt_per_model(worst)
            fgsm_eps = robust[-1] if robust else eps_star
            row[f"FGSM ε={fgsm_eps:g} %"] = fmt_ci(_pct(group, Kind.FGSM, fgsm_eps))
            if not robust:  # FGSM is the headline
                row[f"FGSM ε={fgsm_eps:g}: {PER_MODEL}"] = fmt_per_model(
                    select(group, Kind.FGSM, fgsm_eps))
            rows.append(row)
    return pd.DataFrame(rows), bool(robust)


def _pct(group: pd.DataFrame, kind: Kind, eps: float | None = None, **more) -> pd.Series | None:
    """The per-seed accuracies (%) of one measurement in ``group``, summarised."""
    return _ci_row(select(group, kind, eps, **more)["accuracy"] * 100)


# -- beyond FGSM: stronger attacks, their components and cost, the masking verdict -------------
# AutoAttack's standard order; components not listed follow alphabetically.
COMPONENT_ORDER = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def components(rows: pd.DataFrame) -> dict[tuple[str, float], list[str]]:
    """(ensemble attack, ε) → its components, in the order they run."""
    found: dict[tuple[str, float], list[str]] = {}
    parts = rows[(rows["kind"] == Kind.ATTACK) & (rows["component"] != "")]
    for (attack, eps), group in parts.groupby(["attack", "eps"], sort=False):
        found[(attack, float(eps))] = list(dict.fromkeys(group["component"]))
    rank = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    return {k: sorted(v, key=lambda c: (rank.get(c, len(rank)), c)) for k, v in found.items()}


def chain_means(group: pd.DataFrame, kind: Kind, eps: float, attack: str,
                steps: list[str]) -> list[float | None]:
    """Mean robust accuracy (%) over the runs after each of an ensemble's ``steps``, in order. A
    run without a step (AutoAttack's escalation runs only where its Square check fires) keeps
    its figure after the step before, so every cell averages the same runs."""
    parts = select(group, kind, eps, attack=attack, component=None)
    parts = parts[parts["component"].isin(steps)]
    wide = parts.pivot_table(index="run_id", columns="component", values="accuracy",
                             aggfunc="first").reindex(columns=steps).ffill(axis=1) * 100
    return [None if wide[c].dropna().empty else float(wide[c].mean()) for c in steps]


def masking_verdict(group: pd.DataFrame) -> str | None:
    """Seeds flagged for gradient masking / seeds, with the checks that failed; None where the
    runs were not checked."""
    verdict_col = "tags.gradient_masking_suspected"
    if verdict_col not in group:
        return None
    flags = group[verdict_col].dropna()
    reasons = group.get("tags.gradient_masking_reasons", pd.Series(dtype=str)).dropna()
    failed = sorted({part.partition(":")[0].strip() for text in reasons
                     for part in text.split("; ") if ":" in part
                     and part.partition(":")[0].strip().isidentifier()})
    return (f"{int((flags == 'true').sum())}/{len(flags)}"
            + (f" ({', '.join(failed)})" if failed else ""))


def unreliable_verdict(group: pd.DataFrame) -> str | None:
    """Seeds whose AutoAttack figure its own Square check calls unreliable / seeds it checked;
    None where no run had the check (no AutoAttack cascade)."""
    flags = group.get("tags.evaluation_unreliable", pd.Series(dtype=str)).dropna()
    return f"{int((flags == 'true').sum())}/{len(flags)}" if len(flags) else None


def attack_table(results: pd.DataFrame, finished: pd.DataFrame, depth: int, order: list[str]
                 ) -> pd.DataFrame | None:
    """Accuracy (mean ± 95 % CI over seeds) under each stronger attack and the transfer attack,
    one model's binomial 95 % interval beside each stronger attack's (:func:`fmt_per_model`),
    an ensemble attack's (AutoAttack's) robust accuracy after each of its components, the
    gradient-masking verdict (seeds flagged / seeds, with the failed checks) and AutoAttack's
    Square check (seeds whose figure it calls unreliable / seeds checked)."""
    at = results[results["depth"] == depth]
    attacked = at[at["kind"].isin([Kind.ATTACK, Kind.TRANSFER]) & (at["component"] == "")]
    attacked = attacked.dropna(subset=["accuracy"])
    columns = sorted({(k, a, float(e)) for k, a, e in zip(
        attacked["kind"], attacked["attack"], attacked["eps"], strict=True)},
        key=lambda c: (c[0] == Kind.TRANSFER, c[1], c[2]))
    parts = components(at)
    runs = finished[finished["depth"] == depth]
    if not columns and "tags.gradient_masking_suspected" not in runs:
        return None
    rows = []
    for seq in order:
        group, checked = at[at["sequence"] == seq], runs[runs["sequence"] == seq]
        if group.empty and checked.empty:
            continue
        row = {"sequence": shown(seq)}
        for kind, name, eps in columns:
            label = f"{'transfer ' if kind == Kind.TRANSFER else ''}{name} ε {eps:g}"
            row[label] = fmt_ci(_pct(group, kind, eps, attack=name))
            if kind == Kind.ATTACK:
                row[f"{label}: {PER_MODEL}"] = fmt_per_model(
                    select(group, kind, eps, attack=name))
            steps = parts.get((name, eps)) if kind == Kind.ATTACK else None
            if steps:
                row[f"{name} ε {eps:g} after {' → '.join(steps)}"] = " → ".join(
                    "—" if mean is None else f"{mean:.2f}"
                    for mean in chain_means(group, kind, eps, name, steps))
        verdict = masking_verdict(checked)
        if verdict is not None:
            row["masking suspected"] = verdict
        unreliable = unreliable_verdict(checked)
        if unreliable is not None:
            row["AutoAttack unreliable"] = unreliable
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def attack_cost_table(results: pd.DataFrame) -> pd.DataFrame | None:
    """Each attack's budget (images, iterations, restarts, queries: what it was given) and its
    wall time per model, median and range over the finished runs; below a cascade, each of its
    components (over its ε, parts resumed from checkpoints counted at the time they took)."""
    named = results[results["kind"].isin([Kind.ATTACK, Kind.TRANSFER, Kind.DIAG])]
    attacks = named[named["component"] == ""].drop_duplicates(["run_id", "kind", "attack"])
    parts = (named[named["component"] != ""].dropna(subset=["seconds"])
             .groupby(["run_id", "kind", "attack", "component"], as_index=False, sort=False)
             .agg(seconds=("seconds", "sum"), n_images=("n_images", "first")))
    rows = []
    for (kind, name), group in sorted(attacks.groupby(["kind", "attack"]), key=lambda g: g[0]):
        seconds = group["seconds"].dropna()
        if seconds.empty:
            continue
        budget = pd.DataFrame(list(group["budget"]), index=group.index)
        budget = budget[[c for c in budget if not c.endswith("time_s")]]
        rows.append({
            "attack": f"{kind} {name}",
            "images": _range_text(group["n_images"].dropna(), "{:.0f}"),
            "budget": ", ".join(f"{k} {_range_text(budget[k].dropna(), '{:g}')}"
                                for k in sorted(budget) if budget[k].notna().any()) or "—",
            "wall s per model: median (min–max)":
                f"{seconds.median():.1f} ({seconds.min():.1f}–{seconds.max():.1f})",
            "models": len(seconds),
        })
        mine = parts[(parts["kind"] == kind) & (parts["attack"] == name)]
        for component, runs in mine.groupby("component", sort=False):
            rows.append({
                "attack": f"  › {component}",
                "images": _range_text(runs["n_images"].dropna(), "{:.0f}"),
                "budget": "",
                "wall s per model: median (min–max)":
                    f"{runs['seconds'].median():.1f} ({runs['seconds'].min():.1f}–"
                    f"{runs['seconds'].max():.1f})",
                "models": len(runs),
            })
    return pd.DataFrame(rows) if rows else None


def _range_text(values: pd.Series, fmt: str | Callable[[float], str]) -> str:
    """One value, or ``low–high`` where the runs differ; ``—`` when there is none. ``fmt``: a
    format string or a function of the value."""
    if values.empty:
        return "—"
    text = fmt if callable(fmt) else fmt.format
    low, high = values.min(), values.max()
    return text(low) if low == high else f"{text(low)}–{text(high)}"


# -- significance -------------------------------------------------------------------------------
def comparison_pairs(results: pd.DataFrame, status: pd.DataFrame) -> tuple[list, list]:
    """(depth, defense, control) pairs and (depth, defense, defense) pairs, for the depths where
    runs finished."""
    vs_control, between = [], []
    for depth in sorted(results["depth"].unique()):
        seqs = [s for s in sequence_order(status[status["depth"] == depth])
                if ((results["depth"] == depth) & (results["sequence"] == s)).any()]
        defenses = [s for s in seqs if s != CONTROL]
        if CONTROL in seqs:
            vs_control += [(int(depth), d, CONTROL) for d in defenses]
        between += [(int(depth), a, b) for a, b in itertools.combinations(defenses, 2)]
    return vs_control, between


def seed_matched(scores: pd.DataFrame, depth: int, a: str, b: str
                 ) -> list[tuple[pd.Series, pd.Series]]:
    """The runs of A and B at ``depth`` paired by seed (same seed, same test images): rows of
    ``scores`` (run_id, sequence, depth, seed, acc, fingerprint)."""
    at = scores[scores["depth"] == depth]
    ra = at[at["sequence"] == a].drop_duplicates("seed").set_index("seed")
    rb = at[at["sequence"] == b].drop_duplicates("seed").set_index("seed")
    return [(ra.loc[s], rb.loc[s]) for s in sorted(set(ra.index) & set(rb.index))]


def paired_t_cell(pairs: list[tuple[pd.Series, pd.Series]]) -> str:
    """The paired t-test over seeds of A's and B's accuracy: its p, or why there is none."""
    p = paired_t([ra["acc"] for ra, _ in pairs], [rb["acc"] for _, rb in pairs])
    if p is not None:
        return fmt_p(p)
    if len(pairs) < 2:
        return f"n/a ({len(pairs)} seed{'' if len(pairs) == 1 else 's'})"
    return "n/a (same difference every seed)"


def seed_discordance(pairs: list[tuple[pd.Series, pd.Series]], verdict_of: VerdictOf,
                     kind: Kind, eps: float) -> list[SeedDiscordance]:
    """Per seed-matched pair of runs with per-image verdicts on the same images: which images
    only A gets right and which only B does."""
    out = []
    for ra, rb in pairs:
        ca, cb = verdict_of(ra["run_id"], kind, eps), verdict_of(rb["run_id"], kind, eps)
        if ca is None or cb is None or ca.shape != cb.shape:
            continue
        if isinstance(ra["fingerprint"], str) and ra["fingerprint"] != rb["fingerprint"]:
            continue  # not the same test images
        out.append(SeedDiscordance(int(ra.name), ca & ~cb, ~ca & cb))
    return out


def scores_of(results: pd.DataFrame, kind: Kind, eps: float,
              fingerprints: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run: its accuracy in % under ``kind`` at ε, and its test images'
    fingerprint (None where unknown)."""
    rows = select(results, kind, eps).dropna(subset=["accuracy"])
    return rows.assign(acc=rows["accuracy"] * 100,
                       fingerprint=rows["run_id"].map(fingerprints or {}))


def significance_table(results: pd.DataFrame, verdict_of: VerdictOf,
                       pairs: list[tuple[int, str, str]], eps: float, kind: Kind = Kind.FGSM,
                       fingerprints: dict[str, str] | None = None) -> pd.DataFrame:
    """Both tests for each (depth, A, B) at ε, one row per pair: the paired t-test over seeds,
    McNemar per seed, and over seeds with images as the unit (:func:`clustered_mcnemar`),
    never pooled.

    ``kind``: ``fgsm`` (our FGSM) or ``worst_case`` (the per-image worst case over every
    attack): the accuracy a defense should be judged by where stronger attacks ran."""
    if kind not in (Kind.FGSM, Kind.WORST_CASE):
        raise ValueError(f"significance is tested on fgsm or worst_case, got {kind!r}")
    scores = scores_of(results, kind, eps, fingerprints)
    rows = []
    for depth, a, b in pairs:
        matched = seed_matched(scores, depth, a, b)
        ma, mb = (_ci_row(scores.loc[(scores["depth"] == depth) & (scores["sequence"] == s),
                                     "acc"]) for s in (a, b))
        row = {"depth": depth, "A": a, "B": b, "A %": fmt_ci(ma), "B %": fmt_ci(mb),
               "Δ (A−B) pp": "—" if ma is None or mb is None else f"{ma['mean'] - mb['mean']:+.2f}",
               "paired t p": paired_t_cell(matched)}
        row |= mcnemar_cells(seed_discordance(matched, verdict_of, kind, eps))
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
