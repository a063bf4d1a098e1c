"""Reading a study back from MLflow: its parent run, plan, child runs and their results.

``mlflow.search_runs`` returns one pandas row per run (tags, status, params, metrics). Each run's
evaluation is its table (``eval/results.parquet``, :mod:`art_study.results`), read into one long
frame for the study (:func:`study_results`); a run logged before the table existed gets its
table rebuilt from its metrics. The per-image verdicts beside the table (``eval/verdicts.npz``,
or ``eval/correct.npz`` before it) are read when a test needs them (:class:`Verdicts`).
Everything is gathered once into a :class:`StudyData`.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from art_study.errors import ArtStudyError
from art_study.results import (
    LEGACY_VERDICTS_ARTIFACT,
    RESULTS_ARTIFACT,
    VERDICTS_ARTIFACT,
    Kind,
    legacy_key,
    outcomes_from_metrics,
    read_table,
)
from art_study.tracking import (
    is_environment_tag,
    local_store_path,
    redact,
    resolve_tracking_uri,
)

DEFAULT_EXPERIMENT = "art-study"


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


def _download(run_id: str, artifact: str, tmp: str) -> Path | None:
    """A run's artifact, downloaded into ``tmp``; None where the run has none."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                        dst_path=tmp))
    except (MlflowException, OSError):
        return None


def configured_eps(run: pd.Series) -> list[float]:
    """Every ε a run's config names (the sweep, each attack's, the diagnostics' ``destroy_eps``),
    from its logged params: the ε of a run logged before the table, exactly as configured."""
    found: list[float] = []

    def param(name: str):
        value = run.get(f"params.{name}")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) \
            else yaml.safe_load(str(value))

    found += [float(e) for e in param("evaluation.eps") or []]
    for attack in param("evaluation.attacks") or []:
        found += [float(e) for e in (attack or {}).get("eps") or []]
    destroy = param("evaluation.diagnostics.destroy_eps")
    if isinstance(destroy, int | float):
        found.append(float(destroy))
    return sorted(set(found))


def run_table(run: pd.Series) -> pd.DataFrame:
    """One run's table: ``eval/results.parquet``, or for a run logged before it, the table
    rebuilt from its metrics (``row`` -1: no verdicts by row)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _download(run["run_id"], RESULTS_ARTIFACT, tmp)
        if path is not None:
            return read_table(path).assign(source="table")
    metrics = {c.removeprefix("metrics."): v for c, v in run.items()
               if c.startswith("metrics.")}
    return outcomes_from_metrics(metrics, configured_eps(run)).assign(source="metrics")


RUN_COLUMNS = ["run_id", "sequence", "depth", "seed"]


def study_results(finished: pd.DataFrame) -> pd.DataFrame:
    """Every finished run's table in one long frame: the run (id, sequence, depth, seed) and
    its rows (kind, attack, component, ε, images, accuracy, seconds, budget, row)."""
    tables = [run_table(run).assign(**{c: run[c] for c in RUN_COLUMNS})
              for _, run in finished.iterrows()]
    if not tables:
        return pd.DataFrame(columns=[*RUN_COLUMNS, "kind", "attack", "component", "eps",
                                     "n_images", "accuracy", "seconds", "budget", "row"])
    return pd.concat(tables, ignore_index=True)


@dataclass
class Verdicts:
    """The per-image verdicts of a study's runs, read from each run's artifacts on first use:
    ``eval/verdicts.npz`` by row of its table, else the legacy ``eval/correct.npz`` by name."""

    results: pd.DataFrame
    _cache: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict, repr=False)

    def __call__(self, run_id: str, kind: Kind, eps: float) -> np.ndarray | None:
        """Which images run ``run_id`` got right under ``kind`` (clean, fgsm, worst_case) at
        ε; None where it logged no verdicts."""
        rows = self.results[(self.results["run_id"] == run_id) & (self.results["kind"] == kind)
                            & (self.results["component"] == "") & (self.results["eps"] == eps)]
        if rows.empty:
            return None
        row = rows.iloc[0]
        arrays = self._arrays(run_id, row["row"] >= 0)
        if arrays is None:
            return None
        key = str(row["row"]) if row["row"] >= 0 else legacy_key(kind, kind, eps)
        return arrays.get(key)

    def _arrays(self, run_id: str, by_row: bool) -> dict[str, np.ndarray] | None:
        if run_id not in self._cache:
            self._cache[run_id] = load_npz(run_id, VERDICTS_ARTIFACT if by_row
                                           else LEGACY_VERDICTS_ARTIFACT)
        return self._cache[run_id]


def load_npz(run_id: str, artifact: str) -> dict[str, np.ndarray] | None:
    """A run's ``.npz`` artifact as arrays; None where it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _download(run_id, artifact, tmp)
        if path is None:
            return None
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}


#: Tags of a run that say what it is (``runs.csv``): its place in the plan and its verdict.
RUN_TAGS = ("sequence", "depth", "seed", "stages", "gradient_masking_suspected", "run_key",
            "failure_reason", "data.fingerprint")


def is_provenance(tag: str) -> bool:
    """What produced a run: its environment (:func:`art_study.tracking.is_environment_tag`),
    each stage's model sha256 and numerics fingerprint (``stage<n>.sha256``,
    ``stage<n>.numerics``) and the fingerprints of an attack's resumed chunks computed
    elsewhere (``attack.<key>.numerics``). A re-run compares its models' hashes with these to
    tell "the same training, bit for bit" from "another machine's floating point"."""
    numerics_tag = tag.endswith((".numerics", ".numerics_differs"))
    return (is_environment_tag(tag)
            or (tag.startswith("stage") and (numerics_tag or tag.endswith(".sha256")))
            or (tag.startswith("attack.") and numerics_tag))


def runs_table(finished: pd.DataFrame) -> pd.DataFrame:
    """One row per run for ``runs.csv``: what it is (tags), what produced it (code commit,
    package versions, platform, the trained models' sha256), its resolved config (every
    parameter but ``tracking.*``, which says where it was stored, not what it is) and every
    metric, sorted by depth, sequence and seed. MLflow's own tags are left out."""
    if finished.empty:
        return pd.DataFrame(columns=["run_id", "status", *RUN_TAGS])
    df = finished.rename(columns={f"tags.{t}": t for t in RUN_TAGS[3:]})
    df = df.rename(columns={"gradient_masking_suspected": "verdict_masking_suspected"})
    tags = [c for c in ("stages", "verdict_masking_suspected", "run_key", "failure_reason",
                        "data.fingerprint") if c in df]
    params = sorted(c for c in df if c.startswith("params.")
                    and not c.startswith("params.tracking."))
    provenance = sorted(c.removeprefix("tags.") for c in df
                        if c.startswith("tags.") and is_provenance(c.removeprefix("tags.")))
    df = df.rename(columns={f"tags.{c}": c for c in provenance})
    metrics = sorted(c for c in df if c.startswith("metrics."))
    out = df[["run_id", "status", "sequence", "depth", "seed", *tags, *provenance, *params,
              *metrics]]
    return out.sort_values(["depth", "sequence", "seed"]).reset_index(drop=True)


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


def sweep_eps(results: pd.DataFrame) -> list[float]:
    """The ε of our FGSM sweep, as the runs' tables hold them."""
    return sorted(float(e) for e in results.loc[results["kind"] == Kind.FGSM, "eps"].unique())


@dataclass
class StudyData:
    """Everything the report reads from MLflow, gathered once: the plan's runs and their status,
    the finished runs (tags, params, metrics), their results in one long frame, and the ε of
    the FGSM sweep."""

    parent: mlflow.entities.Run
    name: str
    status: pd.DataFrame
    finished: pd.DataFrame
    results: pd.DataFrame
    eps: list[float]
    verdicts: Verdicts | None = None
    dataset: str = "mnist"  # the config's data.name, or "local" (data.path): see dataset_of

    def __post_init__(self) -> None:
        if self.verdicts is None:
            self.verdicts = Verdicts(self.results)


def gather(parent: mlflow.entities.Run) -> StudyData:
    """The study's plan, child runs and their results."""
    runs = study_runs(parent.info.run_id)
    status = run_status(load_plan(parent.info.run_id), runs)
    finished_ids = status.loc[status["status"] == "FINISHED", "run_id"]
    finished = runs[runs["run_id"].isin(finished_ids)] if not runs.empty else runs
    results = study_results(finished)
    name = parent.data.tags.get("study") or parent.info.run_name
    return StudyData(parent, name, status, finished, results, sweep_eps(results),
                     dataset=dataset_of(parent))


def dataset_of(parent: mlflow.entities.Run) -> str:
    """The study's dataset, from the config its parent run logged as params: ``data.name``,
    ``local`` for a ``data.path``, and ``mnist`` for studies logged before ``data:`` existed."""
    params = parent.data.params
    if params.get("data.path") not in (None, "", "null", "None"):
        return "local"
    return params.get("data.name", "mnist")
