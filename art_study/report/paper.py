"""The optional comparison with Kim (2025): the paper's numbers, the ε at which ours are compared
with them (the paper never states its ε: the control pins it down), and its section of the
report. Included only for a study that ran at least one of the paper's defenses
(:func:`applies`); the rest of the report knows nothing of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from art_study.report.tables import CONTROL, fmt_ci, lookup, sequence_order, shown
from art_study.results import Kind

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
PAPER_DEFENSES = frozenset(seq for seq, _ in PAPER_FGSM) - {CONTROL}


def applies(sequences: pd.Series) -> bool:
    """Whether a study ran one of the paper's defended sequences (its control alone is every
    study's control, not a reason to compare with the paper)."""
    return bool(PAPER_DEFENSES & set(sequences.dropna()))


@dataclass
class Comparison:
    """The ε at which our numbers are compared with the paper's, and why."""

    eps: float
    base_depth: int | None
    sweep: pd.DataFrame
    reason: str


def choose_comparison_eps(summary: pd.DataFrame, eps: list[float]) -> Comparison:
    """The ε where the control's mean FGSM accuracy (at the smallest depth whose control has one
    at an ε of the sweep) is closest to the paper's 29.15 %: the paper does not state its ε, the
    control pins it down. Without any such figure, the largest ε of the sweep."""
    controls = summary[(summary["sequence"] == CONTROL) & (summary["kind"] == Kind.FGSM)
                       & summary["eps"].isin(eps) & summary["mean"].notna()]
    if controls.empty:
        reason = (f"No finished control run has an FGSM accuracy at an ε of the sweep, so ε "
                  f"cannot be matched to the paper's control ({PAPER_CONTROL_FGSM} %); the "
                  f"largest ε of the sweep, {eps[-1]:g}, is used.")
        return Comparison(eps[-1], None, pd.DataFrame(), reason)
    base = int(controls["depth"].min())
    rows = []
    for e in eps:
        row = lookup(controls, base, CONTROL, Kind.FGSM, e)
        if row is not None:
            rows.append({"ε": f"{e:g}", "control FGSM accuracy %": fmt_ci(row),
                         "|Δ| to paper (pp)": abs(row["mean"] - PAPER_CONTROL_FGSM),
                         "_eps": e, "_n": int(row["n"])})
    sweep = pd.DataFrame(rows)
    best = sweep.loc[sweep["|Δ| to paper (pp)"].idxmin()]
    n = int(best["_n"])
    reason = (f"The paper reports FGSM accuracies but never its ε. We compare at ε = "
              f"{best['_eps']:g}: there the control (no defense, {base} conv, mean over {n} "
              f"seed{'s' if n > 1 else ''}) has {best['control FGSM accuracy %']} % FGSM "
              f"accuracy, closest to the paper's {PAPER_CONTROL_FGSM} % among the sweep "
              f"(|Δ| = {best['|Δ| to paper (pp)']:.2f} pp). ★ in the results tables marks this "
              f"ε. The full control sweep:")
    sweep["|Δ| to paper (pp)"] = sweep["|Δ| to paper (pp)"].map(lambda d: f"{d:.2f}")
    return Comparison(float(best["_eps"]), base, sweep.drop(columns=["_eps", "_n"]), reason)


def comparison_table(summary: pd.DataFrame, status: pd.DataFrame, eps_star: float
                     ) -> pd.DataFrame:
    """Ours beside the paper's, for each (depth, sequence) the paper reports and the study ran:
    FGSM at the comparison ε and clean accuracy."""
    rows = []
    for depth in sorted(status["depth"].unique()):
        for seq in sequence_order(status[status["depth"] == depth]):
            if (seq, int(depth)) not in PAPER_FGSM:
                continue
            clean = PAPER_CLEAN.get((seq, int(depth)))
            rows.append({
                "depth": int(depth), "sequence": shown(seq),
                f"ours FGSM ε={eps_star:g} %": fmt_ci(lookup(summary, depth, seq, Kind.FGSM,
                                                             eps_star)),
                "paper FGSM %": f"{PAPER_FGSM[(seq, int(depth))]:g}",
                "ours clean %": fmt_ci(lookup(summary, depth, seq, Kind.CLEAN)),
                "paper clean %": "" if clean is None else f"{clean:g}"})
    return pd.DataFrame(rows)


PAPER_NUMBERS = ("Paper numbers (Kim 2025, section 4): control 29.15 %, adversarial training "
                 "88.5 % (2 conv) and 97.9 % (5 conv), distillation 33.12 %, gradient masking "
                 "47.52 %, gradient masking + adversarial training 85.56 % (order not stated: "
                 "shown for both orders), clean control 99.5 %.")


def section(doc: Any, summary: pd.DataFrame, status: pd.DataFrame, cmp: Comparison) -> None:
    """The comparison with the paper, added to ``doc`` (a :class:`~art_study.report.document.
    Doc`): how ε was chosen, ours beside the paper's numbers."""
    doc.heading("Comparison with Kim (2025)")
    doc.para(cmp.reason)
    if not cmp.sweep.empty:
        doc.table(cmp.sweep)
    table = comparison_table(summary, status, cmp.eps)
    if not table.empty:
        doc.table(table)
    doc.para(PAPER_NUMBERS)
