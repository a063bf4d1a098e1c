"""What an evaluation found, as data: one row per (attack, component, ε), the per-image verdicts
beside it, and every format they are kept in.

A row is an :class:`Outcome`: the kind of measurement (:class:`Kind`), the attack's key, the
component of a cascade (AutoAttack's ``apgd-ce``, ...; ``""`` for the attack itself), the exact
configured ε, how many images it ran on, the accuracy, the attack's wall time and budget, and
which images stayed robust. Readers select rows by these fields, never by parsing a name, as
RobustBench's ``benchmark`` returns numbers rather than names.

This module is also the one place that turns the table into MLflow metric names
(:meth:`EvaluationResult.metrics`: ``attack/<key>/<component>/accuracy_eps_<ε>`` and the rest,
what the UI shows) and, for runs logged before the table existed, back
(:func:`outcomes_from_metrics`). A run keeps the table as ``eval/results.parquet`` and the
verdicts as ``eval/verdicts.npz``, keyed by the row's position in the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from art_study.datasets import eps_text

if TYPE_CHECKING:
    from art_study.diagnostics import Diagnosis

RESULTS_ARTIFACT = "eval/results.parquet"
VERDICTS_ARTIFACT = "eval/verdicts.npz"
#: Before the table: one boolean per image under names such as ``fgsm_eps_0.3``.
LEGACY_VERDICTS_ARTIFACT = "eval/correct.npz"
COLUMNS = ["kind", "attack", "component", "eps", "n_images", "accuracy", "seconds", "budget"]


class Kind(StrEnum):
    """What a row measures."""

    CLEAN = "clean"  # no attack; ε is NaN
    FGSM = "fgsm"  # our FGSM, on every evaluated image
    FGSM_ART = "fgsm_art"  # ART's FGSM, the cross-check of ours
    ATTACK = "attack"  # a configured attack (PGD, APGD, Square, AutoAttack, ...)
    TRANSFER = "transfer"  # examples crafted on the undefended control
    DIAG = "diag"  # the gradient-masking checks' own attacks
    WORST_CASE = "worst_case"  # per image, robust under every attack run at ε


#: The metric prefix of each kind; a configured, transfer or diagnostic attack adds ``/<key>``.
METRIC_PREFIX = {Kind.CLEAN: "clean", Kind.FGSM: "fgsm_custom", Kind.FGSM_ART: "fgsm_art",
                 Kind.ATTACK: "attack", Kind.TRANSFER: "transfer", Kind.DIAG: "diag",
                 Kind.WORST_CASE: "robust"}
NAMED = (Kind.ATTACK, Kind.TRANSFER, Kind.DIAG)  # kinds whose metrics carry the attack's key
SWEEPS = (Kind.FGSM, Kind.FGSM_ART)  # the FGSM sweep at every ε, ours and ART's


def eps_key(eps: float) -> str:
    """Metric-name suffix for an ε (``0.1`` → ``eps_0.1``; 8/255 → ``eps_0.03137254901960784``,
    exact, so the name reads back as the ε: :func:`art_study.datasets.eps_text`): an output
    format only."""
    return f"eps_{eps_text(eps)}"


@dataclass(eq=False)
class Outcome:
    """One row: accuracy under one attack (or a cascade's component) at one ε.

    ``seconds`` is the attack's wall time over all its ε (the same on each of its rows) in
    the process that logged it; on a cascade's component row, the wall time that component
    computed at that ε, parts resumed from checkpoints included;
    ``budget`` what it was given beyond ``n_images`` (iterations, restarts, queries; a transfer
    attack's one-off ``craft_time_s``); ``verdict`` one boolean per image, robust or not.
    """

    kind: Kind
    attack: str
    eps: float
    accuracy: float
    n_images: int
    seconds: float = math.nan
    component: str = ""
    budget: dict[str, float] = field(default_factory=dict)
    verdict: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The metric prefix: ``fgsm_custom``, ``attack/pgd``, ``robust``, ..."""
        prefix = METRIC_PREFIX[self.kind]
        return f"{prefix}/{self.attack}" if self.kind in NAMED else prefix


@dataclass(frozen=True)
class CrossCheck:
    """How far our FGSM and ART's FGSM are from each other on the same inputs."""

    max_abs_diff: float
    pixel_diff_share: float
    prediction_agreement: float


@dataclass(frozen=True)
class GradientFigures:
    """The loss gradient on the diagnostics' images: share numerically zero, median L1 norm."""

    zero_share: float
    l1_median: float


@dataclass
class EvaluationResult:
    """All figures of one evaluation: the table of outcomes (with their verdicts), the FGSM
    cross-checks per ε, the gradient figures and the gradient-masking diagnosis, and the tags
    of the verdict."""

    outcomes: list[Outcome] = field(default_factory=list)
    cross_checks: dict[float, CrossCheck] = field(default_factory=dict)
    repeat_max_abs_diff: float = math.nan
    gradients: GradientFigures | None = None
    diagnosis: Diagnosis | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def find(self, kind: Kind, attack: str = "", eps: float | None = None,
             component: str = "") -> Outcome | None:
        """The first row of ``kind`` (and ``attack``, unless empty; ``eps``, unless None), or
        None."""
        for o in self.outcomes:
            if (o.kind == kind and o.component == component and (not attack or o.attack == attack)
                    and (eps is None or o.eps == eps)):
                return o
        return None

    def clean(self) -> np.ndarray:
        """Which evaluated images the model classifies correctly."""
        return self.find(Kind.CLEAN).verdict

    def frame(self) -> pd.DataFrame:
        """The table, one row per outcome in order (verdicts left out: :meth:`verdict_arrays`)."""
        return outcomes_frame(self.outcomes)

    def verdict_arrays(self) -> dict[str, np.ndarray]:
        """The per-image verdicts by the position of their row in :meth:`frame`."""
        return {str(i): np.asarray(o.verdict, dtype=bool) for i, o in enumerate(self.outcomes)
                if o.verdict is not None}

    @property
    def verdicts(self) -> dict[str, dict[float, np.ndarray]]:
        """Per-image verdicts of our FGSM (``fgsm``) and of each configured, transfer and
        diagnostic attack (``attack/<key>``, ...) by exact ε: the attacks the worst case and the
        diagnostics compare."""
        out: dict[str, dict[float, np.ndarray]] = {}
        for o in self.outcomes:
            if o.component == "" and o.verdict is not None and (o.kind == Kind.FGSM
                                                                 or o.kind in NAMED):
                out.setdefault("fgsm" if o.kind == Kind.FGSM else o.name, {})[o.eps] = o.verdict
        return out

    @property
    def correct(self) -> dict[str, np.ndarray]:
        """The verdicts under the names of the former ``eval/correct.npz`` (:func:`legacy_key`):
        clean, our FGSM, each attack and the worst case."""
        return {legacy_key(o.kind, o.name, o.eps): o.verdict for o in self.outcomes
                if o.verdict is not None and o.component == "" and o.kind != Kind.FGSM_ART}

    @property
    def metrics(self) -> dict[str, float]:
        """Every figure as ``metric name → value`` for MLflow: the only place the names are
        made."""
        m = table_metrics(self.outcomes)
        for eps, cc in self.cross_checks.items():
            m[f"xcheck/max_abs_diff_{eps_key(eps)}"] = cc.max_abs_diff
            m[f"xcheck/pixel_diff_share_{eps_key(eps)}"] = cc.pixel_diff_share
            m[f"xcheck/prediction_agreement_{eps_key(eps)}"] = cc.prediction_agreement
        if not math.isnan(self.repeat_max_abs_diff):
            m["xcheck/repeat_max_abs_diff"] = self.repeat_max_abs_diff
        if self.cross_checks:
            m["xcheck/max_abs_diff"] = max(cc.max_abs_diff for cc in self.cross_checks.values())
        if self.gradients is not None:
            m["diag/grad_zero_share"] = self.gradients.zero_share
            m["diag/grad_l1_median"] = self.gradients.l1_median
        if self.diagnosis is not None:
            m.update(self.diagnosis.metrics())
        return m


def table_metrics(outcomes: Iterable[Outcome]) -> dict[str, float]:
    """The metrics of the table's rows: accuracy per ε, and per attack its images, wall time
    and budget (for our and ART's FGSM: images per second over the sweep)."""
    m: dict[str, float] = {}
    sweeps: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.kind == Kind.CLEAN:
            m["clean/accuracy"] = o.accuracy
            m["eval/n_images"] = float(o.n_images)
            continue
        part = f"{o.name}/{o.component}" if o.component else o.name
        m[f"{part}/accuracy_{eps_key(o.eps)}"] = o.accuracy
        if o.component:
            if not math.isnan(o.seconds):
                m[f"{part}/time_s_{eps_key(o.eps)}"] = o.seconds
            continue
        if o.kind == Kind.WORST_CASE:
            m[f"robust/n_images_{eps_key(o.eps)}"] = float(o.n_images)
        elif o.kind in SWEEPS:
            sweeps.setdefault(o.name, []).append(o)
        else:
            m[f"{o.name}/time_s"] = o.seconds
            m[f"{o.name}/n_images"] = float(o.n_images)
            m.update({f"{o.name}/{k}": v for k, v in o.budget.items()})
    for name, rows in sweeps.items():
        m[f"{name}/images_per_s"] = rows[0].n_images * len(rows) / max(rows[0].seconds, 1e-9)
        if rows[0].kind == Kind.FGSM_ART:
            m["xcheck/n_images"] = float(rows[0].n_images)
    return m


def legacy_key(kind: Kind, name: str, eps: float) -> str:
    """A verdict's name in ``eval/correct.npz``: ``clean``, ``fgsm_eps_<ε>``,
    ``robust_eps_<ε>``, ``attack/<key>_eps_<ε>``."""
    if kind == Kind.CLEAN:
        return "clean"
    base = {Kind.FGSM: "fgsm", Kind.WORST_CASE: "robust"}.get(kind, name)
    return f"{base}_{eps_key(eps)}"


# -- the table as a file ---------------------------------------------------------------------
def outcomes_frame(outcomes: Iterable[Outcome]) -> pd.DataFrame:
    """The rows as a pandas frame with :data:`COLUMNS` (``budget`` a dict per row)."""
    rows = [{"kind": str(o.kind), "attack": o.attack, "component": o.component,
             "eps": float(o.eps), "n_images": int(o.n_images), "accuracy": float(o.accuracy),
             "seconds": float(o.seconds), "budget": dict(o.budget)} for o in outcomes]
    return pd.DataFrame(rows, columns=COLUMNS).astype({"n_images": "int64"})


def write_table(result: EvaluationResult, directory: Path) -> list[Path]:
    """``results.parquet`` (the budget as JSON text) and ``verdicts.npz`` in ``directory``."""
    table = result.frame()
    table["budget"] = table["budget"].map(lambda b: json.dumps(b, sort_keys=True))
    paths = [directory / Path(RESULTS_ARTIFACT).name, directory / Path(VERDICTS_ARTIFACT).name]
    table.to_parquet(paths[0], index=False)
    np.savez_compressed(paths[1], **result.verdict_arrays())
    return paths


def read_table(path: Path) -> pd.DataFrame:
    """A ``results.parquet`` back as the frame of :func:`outcomes_frame`, with ``row``: each
    row's position, the key of its verdict in ``verdicts.npz``."""
    table = pd.read_parquet(path)
    table["budget"] = table["budget"].map(json.loads)
    return table.assign(row=np.arange(len(table)))


# -- runs logged before the table: their metrics, read back -----------------------------------
def outcomes_from_metrics(metrics: Mapping[str, float], eps_values: Iterable[float]
                          ) -> pd.DataFrame:
    """The table of a run logged before it existed, from its metrics: the inverse of
    :meth:`EvaluationResult.metrics`. ε comes from ``eps_values`` (the run's configured ε,
    exactly), matched to the metric names by the same :func:`eps_key` that wrote them; a
    metric at any other ε is left out. No verdicts: ``row`` is -1."""
    by_key = {eps_key(e): float(e) for e in eps_values}
    m = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not math.isnan(v)}
    rows = []
    if "clean/accuracy" in m:
        rows.append({"kind": Kind.CLEAN, "attack": "", "component": "", "eps": math.nan,
                     "n_images": m.get("eval/n_images", math.nan),
                     "accuracy": m["clean/accuracy"], "seconds": math.nan, "budget": {}})
    for name, value in m.items():
        head, sep, key = name.rpartition("/accuracy_")
        if not sep or key not in by_key:
            continue
        eps, parts = by_key[key], head.split("/")
        kind = next((k for k, p in METRIC_PREFIX.items() if p == parts[0]), None)
        depth = 2 if kind in NAMED else 1  # the attack's own rows; a component adds a level
        if kind in (None, Kind.CLEAN) or not (
                len(parts) == depth or (kind == Kind.ATTACK and len(parts) == 3)):
            continue
        prefix = "/".join(parts[:depth])
        attack = parts[1] if kind in NAMED else ("fgsm" if kind in SWEEPS else "")
        component = parts[2] if len(parts) == 3 else ""
        seconds = (m.get(f"{prefix}/{component}/time_s_{key}", math.nan) if component
                   else m.get(f"{prefix}/time_s", math.nan))
        row = {"kind": kind, "attack": attack, "component": component,
               "eps": eps, "accuracy": value, "seconds": seconds,
               "n_images": m.get(f"{prefix}/n_images", math.nan), "budget": {}}
        if kind in NAMED:
            row["budget"] = {k.removeprefix(f"{prefix}/"): v for k, v in m.items()
                             if k.startswith(f"{prefix}/") and "/" not in k[len(prefix) + 1:]
                             and not k[len(prefix) + 1:].startswith("accuracy_")
                             and k[len(prefix) + 1:] not in ("time_s", "n_images")}
        elif kind == Kind.WORST_CASE:
            row["n_images"] = m.get(f"robust/n_images_{key}", math.nan)
        elif kind in SWEEPS:
            row["n_images"] = m.get("eval/n_images" if kind == Kind.FGSM else "xcheck/n_images",
                                    math.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["kind"] = table["kind"].astype(str)
    table["n_images"] = pd.to_numeric(table["n_images"]).round().astype("Int64")
    return table.assign(row=-1)
