"""Reading a study back from MLflow: its parent run, plan, child runs and per-seed scores.

``mlflow.search_runs`` returns one pandas row per run (tags, status, every metric); the rest of
the report works on those frames, gathered once into a :class:`StudyData`. Runs record which
test image they got right in ``eval/correct.npz`` (``tracking.log_correctness``), so two models
can be compared image by image (:func:`load_correctness`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from art_study.errors import ArtStudyError
from art_study.evaluation import eps_key
from art_study.tracking import (
    CORRECT_ARTIFACT,
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


#: Tags of a run that say what it is (``runs.csv``): its place in the plan and its verdict.
RUN_TAGS = ("sequence", "depth", "seed", "stages", "gradient_masking_suspected", "run_key",
            "failure_reason", "data.fingerprint")


def is_provenance(tag: str) -> bool:
    """What produced a run: its environment (:func:`art_study.tracking.is_environment_tag`)
    and each stage's model sha256 (``stage<n>.sha256``). A re-run compares its models' hashes
    with these to tell "the same training, bit for bit" from "another machine's floating
    point"."""
    return is_environment_tag(tag) or (tag.startswith("stage") and tag.endswith(".sha256"))


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


def eps_values(runs: pd.DataFrame) -> list[float]:
    """The ε sweep, read from the metric names the runs logged (ours: ``fgsm_custom``)."""
    prefix = "metrics.fgsm_custom/accuracy_eps_"
    return sorted(float(c[len(prefix):]) for c in runs.columns if c.startswith(prefix))


def metric_names(eps: list[float]) -> list[str]:
    """Column names of the score table: ``clean`` and ``eps_<ε>`` (as in the metric names)."""
    return ["clean", *(eps_key(e) for e in eps)]


def seed_scores(finished: pd.DataFrame, eps: list[float]) -> pd.DataFrame:
    """One row per finished run: accuracies in % (clean, ours-FGSM per ε, the worst case over
    attacks per ε as ``robust_eps_<ε>`` where logged) and cross-checks."""
    out = finished[["run_id", "sequence", "depth", "seed"]].copy()
    out["clean"] = finished["metrics.clean/accuracy"] * 100
    for e in eps:
        out[eps_key(e)] = finished[f"metrics.fgsm_custom/accuracy_{eps_key(e)}"] * 100
        worst = f"metrics.robust/accuracy_{eps_key(e)}"
        if worst in finished:  # the per-image worst case over attacks, where runs logged it
            out[f"robust_{eps_key(e)}"] = finished[worst] * 100
    for col, metric in (("xcheck", "xcheck/max_abs_diff"),
                        ("repeat", "xcheck/repeat_max_abs_diff")):
        out[col] = finished.get(f"metrics.{metric}", np.nan)
    out["fingerprint"] = finished.get("tags.data.fingerprint")
    return out.reset_index(drop=True)


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
