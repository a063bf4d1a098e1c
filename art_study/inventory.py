"""What a store holds, so run ids can be found without the UI: ``art-study runs``.

Every run of every experiment is read once (``mlflow.search_runs``: one pandas row per run,
its tags, status and metrics) and sorted by what art-study made it: a study's parent run
(``art_study.role=study``), the children of a study (one per sequence, depth and seed), an
evaluation of a given model (``evaluation_only=true``), or a single experiment's run (a config
without ``study``). The tables are pandas DataFrames, printed plainly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from art_study.errors import ArtStudyError, TrackingError
from art_study.study.lease import liveness

STUDY_COLUMNS = ["study", "run_id", "status", "start", "runs", "failed", "experiment"]
CHILD_COLUMNS = ["run_id", "sequence", "depth", "seed", "status", "clean", "masking",
                 "numerics"]
EVALUATION_COLUMNS = ["run_id", "source_model", "output", "status", "start", "clean", "masking",
                      "numerics"]
SINGLE_COLUMNS = ["run_id", "name", "sequence", "depth", "seed", "status", "start", "clean",
                  "numerics"]
#: The numerics tags shown: the fingerprint's id in the tables, the rest once per id below them.
NUMERICS_TAGS = ("id", "mode", "onednn", "contraction", "cpu", "isa", "intra_op_threads",
                 "inter_op_threads", "l1d_kib", "l2_kib", "tensorflow", "keras", "numpy", "art")


@dataclass
class Inventory:
    """The store's runs, by kind: each a DataFrame (empty when the store has none)."""

    uri: str
    studies: pd.DataFrame
    children: dict[str, pd.DataFrame] = field(default_factory=dict)  # parent run id → runs
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)
    singles: pd.DataFrame = field(default_factory=pd.DataFrame)
    numerics: dict[str, str] = field(default_factory=dict)  # fingerprint id → its summary

    @property
    def empty(self) -> bool:
        return self.studies.empty and self.evaluations.empty and self.singles.empty


def read_store(tracking_uri: str | None) -> tuple[str, pd.DataFrame]:
    """Every run of every experiment in the store, as one DataFrame (read only: a local store
    that does not exist is an error, not created)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from art_study.tracking import local_store_path, redact, resolve_tracking_uri

    full = resolve_tracking_uri(tracking_uri)
    uri = redact(full)  # what is shown: no credentials
    local = local_store_path(full)
    if local is not None and not local.exists():
        raise TrackingError(f"no MLflow store at {local}: run a study first")
    mlflow.set_tracking_uri(full)
    try:
        experiments = {e.experiment_id: e.name for e in mlflow.search_experiments()}
        runs = (mlflow.search_runs(list(experiments), order_by=["attributes.start_time ASC"])
                if experiments else pd.DataFrame())
    except MlflowException as exc:
        raise TrackingError(f"cannot read the store {uri}: {redact(_first_line(exc))}") from None
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise TrackingError(f"cannot reach the store {uri}: {redact(_first_line(exc))}") from None
    if not runs.empty:
        runs["experiment"] = runs["experiment_id"].map(experiments)
    return uri, runs


def inventory(tracking_uri: str | None, study: str | None = None) -> Inventory:
    """The store's runs by kind; with ``study`` (a name or a parent run id) only that study,
    every parent run of it when it ran more than once."""
    uri, runs = read_store(tracking_uri)
    if runs.empty:
        if study is not None:
            raise ArtStudyError(f"no study {study!r} in {uri}: the store holds no runs")
        return Inventory(uri, pd.DataFrame(columns=STUDY_COLUMNS))
    for col in ("tags.art_study.role", "tags.study", "tags.evaluation_only",
                "tags.mlflow.parentRunId", "tags.mlflow.runName", "tags.sequence", "tags.depth",
                "tags.seed", "tags.gradient_masking_suspected", "tags.source_model",
                "tags.source_model_output", "metrics.clean/accuracy",
                *(f"tags.numerics.{t}" for t in NUMERICS_TAGS)):
        if col not in runs:
            runs[col] = None
    fingerprints = _fingerprints(runs)
    role = runs["tags.art_study.role"]
    parents = runs[role == "study"]
    if study is not None:
        parents = parents[(parents["tags.study"] == study) | (parents["run_id"] == study)]
        if parents.empty:
            raise ArtStudyError(f"no study named {study!r} (nor a study's parent run id) in {uri}")
    parent_ids = set(parents["run_id"])
    is_child = runs["tags.mlflow.parentRunId"].isin(parent_ids)
    parent_status = _status_with_lease(parents)
    children = {pid: _child_table(runs[runs["tags.mlflow.parentRunId"] == pid],
                                  stale=parent_status[pid] == STALE)
                for pid in parents["run_id"]}
    studies = pd.DataFrame({
        "study": parents["tags.study"], "run_id": parents["run_id"],
        "status": parents["run_id"].map(parent_status), "start": _start(parents),
        "runs": [len(children[p]) for p in parents["run_id"]],
        "failed": [int((children[p]["status"] == "FAILED").sum()) for p in parents["run_id"]],
        "experiment": parents["experiment"]}, columns=STUDY_COLUMNS)
    if study is not None:
        return Inventory(uri, studies.reset_index(drop=True), children, numerics=fingerprints)
    evaluation = runs["tags.evaluation_only"] == "true"
    evaluations = runs[evaluation]
    evaluations = pd.DataFrame({
        "run_id": evaluations["run_id"], "source_model": evaluations["tags.source_model"],
        "output": evaluations["tags.source_model_output"], "status": evaluations["status"],
        "start": _start(evaluations), "clean": evaluations["metrics.clean/accuracy"],
        "masking": evaluations["tags.gradient_masking_suspected"].map(_masking),
        "numerics": evaluations["tags.numerics.id"]}, columns=EVALUATION_COLUMNS)
    single = runs[(role != "study") & ~is_child & ~evaluation
                  & runs["tags.mlflow.parentRunId"].isna()]
    singles = pd.DataFrame({
        "run_id": single["run_id"], "name": single["tags.mlflow.runName"],
        "sequence": single["tags.sequence"], "depth": single["tags.depth"],
        "seed": single["tags.seed"], "status": single["status"], "start": _start(single),
        "clean": single["metrics.clean/accuracy"], "numerics": single["tags.numerics.id"]},
        columns=SINGLE_COLUMNS)
    return Inventory(uri, studies.reset_index(drop=True), children,
                     evaluations.reset_index(drop=True), singles.reset_index(drop=True),
                     fingerprints)


def _fingerprints(runs: pd.DataFrame) -> dict[str, str]:
    """Each numerics fingerprint id of the store's runs → its one-line summary."""
    from art_study.numerics import summary

    tags = runs[[f"tags.numerics.{t}" for t in NUMERICS_TAGS]].dropna(subset="tags.numerics.id")
    return {row["tags.numerics.id"]: summary({k.removeprefix("tags.numerics."): v
                                              for k, v in row.items() if isinstance(v, str)})
            for _, row in tags.drop_duplicates("tags.numerics.id").iterrows()}


#: How a RUNNING run whose study's lease went stale is shown: its process is gone (killed,
#: machine down), and the next ``art-study run`` of the study takes it over.
STALE = "RUNNING (stale)"


def _status_with_lease(parents: pd.DataFrame) -> dict[str, str]:
    """Each parent run's status, ``RUNNING (stale)`` where its lease has no live holder."""
    out = {}
    for _, row in parents.iterrows():
        tags = {k[len("tags."):]: v for k, v in row.items()
                if k.startswith("tags.") and isinstance(v, str)}
        stale = row["status"] == "RUNNING" and liveness(tags) == "stale"
        out[row["run_id"]] = STALE if stale else row["status"]
    return out


def _child_table(runs: pd.DataFrame, stale: bool = False) -> pd.DataFrame:
    """A study's child runs; a RUNNING child of a stale study is shown stale too."""
    status = runs["status"]
    if stale:
        status = status.where(status != "RUNNING", STALE)
    table = pd.DataFrame({
        "run_id": runs["run_id"], "sequence": runs["tags.sequence"],
        "depth": pd.to_numeric(runs["tags.depth"], errors="coerce").astype("Int64"),
        "seed": pd.to_numeric(runs["tags.seed"], errors="coerce").astype("Int64"),
        "status": status, "clean": runs["metrics.clean/accuracy"],
        "masking": runs["tags.gradient_masking_suspected"].map(_masking),
        "numerics": runs["tags.numerics.id"]}, columns=CHILD_COLUMNS)
    return table.sort_values(["depth", "seed", "sequence"], na_position="last",
                             kind="stable").reset_index(drop=True)


def _masking(tag: object) -> str:
    """The gradient-masking verdict in a word: suspected / no / — (not checked)."""
    return {"true": "suspected", "false": "no"}.get(tag, "—") if isinstance(tag, str) else "—"


def _start(runs: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(runs["start_time"]).dt.strftime("%Y-%m-%d %H:%M")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return text[:300] if text else type(exc).__name__


def render(inv: Inventory) -> str:
    """The inventory as plain text: studies, each study's runs, evaluations, single runs."""
    def table(df: pd.DataFrame) -> str:
        return df.to_string(index=False, na_rep="—",
                            float_format=lambda v: f"{v:.4f}")

    if inv.empty:
        return f"the store {inv.uri} holds no runs"
    out = [f"store {inv.uri}"]
    if not inv.studies.empty:
        out += ["", "studies (parent runs):", table(inv.studies)]
        for row in inv.studies.itertuples():
            out += ["", f"study {row.study}, parent run {row.run_id}:"]
            kids = inv.children.get(row.run_id)
            out.append(table(kids) if kids is not None and not kids.empty else "(no runs yet)")
    if not inv.evaluations.empty:
        out += ["", "evaluation-only runs (art-study evaluate):", table(inv.evaluations)]
    if not inv.singles.empty:
        out += ["", "single runs (configs without study):", table(inv.singles)]
    if inv.numerics:
        out += ["", "numerics fingerprints (what computed the runs; — : recorded before "
                "fingerprints):", *(f"  {text}" for text in inv.numerics.values())]
    return "\n".join(out)
