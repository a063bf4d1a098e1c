"""Record planned runs in MLflow: a study's parent run and its children, or one top-level run.

:class:`Executor` owns MLflow. A study is one parent run, held by this process's lease
(``lease.py``), with a child per (sequence, depth, seed). Rerunning a study resumes its parent,
skips children that FINISHED (matched by their ``run_key``), deletes and reruns unfinished or
failed ones. Each child logs its config and tags, its stages (their recorded epochs, trained or
restored from the stage cache), the evaluation and the model. An exception inside a run ends it
FAILED with a ``failure_reason``.

Where the stages train and the evaluations compute is the backend's part: a subclass says how it
gets a stage's record (:meth:`Executor._stage`) and a run's evaluation
(:meth:`Executor._evaluate`), both from the functions of ``stages.py``: ``local_backend.py``
calls them in this process, ``ray_backend.py`` as Ray tasks. ``backends.py`` picks one.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field

import keras
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunInfo

from art_study import numerics
from art_study.config import ExperimentConfig, flatten, to_yaml
from art_study.data import MnistData
from art_study.errors import ArtStudyError, TrackingError
from art_study.evaluation import EvaluationResult
from art_study.models import compile_model
from art_study.run_page import DataRef, dataset_name, log_run_page
from art_study.study.cache import StageCache, StageRecord
from art_study.study.lease import OWNER, Lease, LeaseLost, busy
from art_study.study.plan import RunSpec, StageSpec, distinct_stages, study_key
from art_study.study.stages import step_offset
from art_study.tracking import (
    environment_tags,
    failure_reason,
    local_store_path,
    log_evaluation,
    log_keras_model,
    redact,
    redact_config,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """One finished run: its MLflow id and the metrics it logged at the end."""

    run_id: str
    spec: RunSpec
    metrics: dict[str, float]
    skipped: bool = False  # True when a FINISHED run from an earlier invocation was reused


@dataclass
class StudyResult:
    """What a study (or single experiment) invocation did."""

    parent_run_id: str | None
    runs: list[RunResult] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    stages_trained: int = 0
    stages_reused: int = 0


class Executor(abc.ABC):
    """Runs planned runs and records them; each distinct stage is trained once (per process,
    and via the stage cache). A backend subclasses it (``local_backend.py``, ``ray_backend.py``).
    """

    def __init__(self, cfg: ExperimentConfig, data: dict[int, MnistData], cache: StageCache,
                 progress: bool):
        self.cfg, self.data, self.cache, self.progress = cfg, data, cache, progress
        self.trained = self.reused = 0  # stages trained by this invocation, and restored

    # -- the backend: where stages and evaluations compute ---------------------------------------
    @abc.abstractmethod
    def start(self, runs: list[RunSpec]) -> None:
        """Begin the work of ``runs`` before they are logged (a backend that computes elsewhere
        submits it all here, so that it runs while earlier runs are logged)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what :meth:`start` acquired."""

    @abc.abstractmethod
    def _stage(self, stage: StageSpec, spec: RunSpec, data: MnistData) -> StageRecord:
        """The record of ``stage`` of run ``spec`` once its model is in the stage cache, its
        epochs logged to the active run (as it trains, or from the record: :meth:`_replay`),
        counted as trained or reused."""

    @abc.abstractmethod
    def _evaluate(self, spec: RunSpec, model: keras.Model,
                  data: MnistData) -> tuple[EvaluationResult, float]:
        """The evaluation of run ``spec``'s final ``model`` and its wall time (what
        :func:`~art_study.study.stages.evaluate_run` returns)."""

    # -- a study: parent run, children, resume ------------------------------------------------
    def study(self, runs: list[RunSpec], experiment_id: str) -> StudyResult:
        """Run the children of the study's parent run, holding its lease (``lease.py``).

        The parent is created (or resumed) and ended through the client, not as MLflow's active
        run: a process that has lost its lease must leave the parent's status to its new owner.
        """
        key = study_key(self.cfg, runs)
        client = MlflowClient()
        lease = self._lease = Lease(client)
        parent = _find_parent(client, experiment_id, key)
        if parent is None:
            parent = self._create_parent(client, experiment_id, runs, key, lease)
        else:
            lease.claim(parent, self.cfg.name)
            client.update_run(parent, status="RUNNING")
        self._parent, self._experiment_id = parent, experiment_id
        lease.start()
        try:
            with _sql_errors_not_logged():
                result = self._study_children(client, runs, parent)
        except (LeaseLost, TrackingError):  # the parent is another's, or the store is gone
            lease.release()
            raise
        except BaseException:
            lease.release()
            with contextlib.suppress(Exception):
                client.set_terminated(parent, "FAILED")
            raise
        lease.release()
        if result.failed:
            client.set_tag(parent, "failure_reason", f"{len(result.failed)} runs failed")
        client.set_terminated(parent, "FAILED" if result.failed else "FINISHED")
        return result

    def _study_children(self, client: MlflowClient, runs: list[RunSpec],
                        parent: str) -> StudyResult:
        result = StudyResult(parent)
        finished = _finished_children(client, self._experiment_id, parent)
        self.start([spec for spec in runs if spec.key not in finished])
        for spec in runs:
            if spec.key in finished:
                done = finished[spec.key]
                result.runs.append(RunResult(done.info.run_id, spec, done.data.metrics,
                                             skipped=True))
                continue
            self._check_lease(client)
            try:
                result.runs.append(self._child(spec))
            except LeaseLost:
                raise
            except ArtStudyError as exc:
                result.failed.append((spec, str(exc)))
            except Exception as exc:  # a bug in one run must not lose the others
                _raise_if_store_gone(client, parent, exc)
                log.exception("run %s failed", spec.name)
                result.failed.append((spec, failure_reason(exc)))
        self._check_lease(client)
        client.log_batch(parent, metrics=[
            Metric(k, float(v), int(time.time() * 1000), 0) for k, v in {
                "study/runs": len(runs), "study/failed": len(result.failed),
                "study/stages_trained": self.trained, "study/stages_reused": self.reused,
            }.items()])
        return result

    def _check_lease(self, client: MlflowClient) -> None:
        """Stop at a run boundary if the lease was taken over or the store went away."""
        self._lease.check()
        _raise_if_store_gone(client, self._parent, self._lease.error)

    def _create_parent(self, client: MlflowClient, experiment_id: str, runs: list[RunSpec],
                       key: str, lease: Lease) -> str:
        """A new parent run holding the lease from its creation; it backs off (deleted, and
        :class:`StudyBusy`) if another process created one for the same study meanwhile."""
        from mlflow.tracking.context import registry

        tags = {**environment_tags(), "art_study.role": "study", "study_key": key,
                "study": self.cfg.name, **lease.tags()}
        run = client.create_run(experiment_id, run_name=self.cfg.name,
                                tags=registry.resolve_tags(tags))
        parent = run.info.run_id
        try:
            lease.confirm(parent, self.cfg.name)
            rival = _rival_parent(client, experiment_id, key, lease, run.info)
            if rival is not None:
                raise busy(self.cfg.name, rival.info.run_id, rival.data.tags, lease.policy)
            self._log_study(client, parent, runs)
        except BaseException:
            with contextlib.suppress(Exception):
                client.delete_run(parent)
            raise
        return parent

    def _log_study(self, client: MlflowClient, parent: str, runs: list[RunSpec]) -> None:
        import pandas as pd

        shown = redact_config(self.cfg)
        client.log_batch(parent, params=[Param(k, v) for k, v in flatten(shown).items()])
        client.log_text(parent, to_yaml(shown), "config.yaml")
        plan = pd.DataFrame([{"sequence": r.sequence, "depth": r.depth, "seed": r.seed,
                              "stages": ">".join(s.defense for s in r.stages),
                              "run_key": r.key} for r in runs])
        client.log_table(parent, plan, "plan.json")
        client.log_metric(parent, "study/distinct_stages", len(distinct_stages(runs)))

    def _child(self, spec: RunSpec) -> RunResult:
        # The key is a creation tag, so even a run killed in its first instant is recognisable;
        # the lease owner tells whose it is (its liveness is the parent's).
        tags = {"art_study.role": "run", "study": self.cfg.name, "run_key": spec.key,
                OWNER: self._lease.owner}
        with mlflow.start_run(run_name=spec.name, parent_run_id=self._parent, tags=tags,
                              experiment_id=self._experiment_id) as run:
            metrics = self._in_run(spec)
        if self._lease.lost:  # taken over while this run trained: the new owner reruns it
            with contextlib.suppress(Exception):
                MlflowClient().delete_run(run.info.run_id)
            self._lease.check()
        return RunResult(run.info.run_id, spec, metrics)

    # -- a single experiment --------------------------------------------------------------------
    def top_level_run(self, spec: RunSpec, experiment_id: str) -> RunResult:
        """One run, with a lease heartbeat so that a killed one shows as stale."""
        self.start([spec])
        lease = Lease(MlflowClient())
        with mlflow.start_run(experiment_id=experiment_id, run_name=self.cfg.name,
                              tags=lease.tags()) as run:
            lease.adopt(run.info.run_id)
            lease.start()
            try:
                return RunResult(run.info.run_id, spec, self._in_run(spec))
            finally:
                lease.release()

    # -- one run: stages → evaluation → model ---------------------------------------------------
    def _in_run(self, spec: RunSpec) -> dict[str, float]:
        try:
            return self._execute(spec)
        except BaseException as exc:
            mlflow.set_tag("failure_reason", failure_reason(exc))
            raise

    def _execute(self, spec: RunSpec) -> dict[str, float]:
        cfg, data = spec.config, self.data[spec.seed]
        shown = redact_config(cfg)  # no credentials of the tracking URI in the run
        mlflow.log_params(flatten(shown))
        mlflow.log_text(to_yaml(shown), "config.yaml")
        mlflow.set_tags({
            **environment_tags(), "run_key": spec.key, "sequence": spec.sequence,
            "stages": ">".join(s.defense for s in spec.stages), "n_conv": str(spec.depth),
            "depth": str(spec.depth), "seed": str(spec.seed), "data.source": data.source,
            "data.fingerprint": data.fingerprint,
        })

        metrics: dict[str, float] = {}
        records = [self._stage(stage, spec, data) for stage in spec.stages]
        for stage, record in zip(spec.stages, records, strict=True):
            n = stage.index + 1
            metrics[f"stage{n}/time_s"] = record.train_time_s
            metrics[f"stage{n}/epochs"] = stage.epochs
        # Each stage's .h5 hand-off file stays in the stage cache, once for every run that
        # shares it; the run names the entries (what `art-study cache --prune` keeps) and the
        # final model is logged below.
        mlflow.set_tags({f"stage{s.index + 1}.key": s.key for s in spec.stages})
        mlflow.set_tags({f"stage{s.index + 1}.sha256": r.model_sha256
                         for s, r in zip(spec.stages, records, strict=True) if r.model_sha256})
        mlflow.set_tags(stage_numerics_tags(records, numerics.fingerprint()["id"]))
        times = [h["epoch_time_s"] for r in records for h in r.history if "epoch_time_s" in h]
        metrics["train/total_time_s"] = sum(r.train_time_s for r in records)
        metrics["train/mean_epoch_time_s"] = sum(times) / max(len(times), 1)

        model = compile_model(self.cache.load_model(spec.stages[-1].key), cfg.train)
        result, eval_time_s = self._evaluate(spec, model, data)
        metrics.update(result.metrics)
        metrics["eval/time_s"] = eval_time_s
        mlflow.log_metrics(metrics)
        mlflow.set_tags(result.tags)  # the gradient-masking verdict and its reasons
        log_evaluation(result)
        log_run_page(metrics, result.tags, DataRef(dataset_name(cfg.data), data.source,
                                                   data.fingerprint, context="training"))
        if cfg.tracking.log_model:
            log_keras_model(model, data.x_test[:2])
        return metrics

    def _replay(self, stage: StageSpec, *, cached: bool) -> StageRecord:
        """Log the recorded epochs of a stage in the cache to the active run, at its steps."""
        record = self.cache.record(stage.key)
        offset = step_offset(stage)
        for i, h in enumerate(record.history):
            mlflow.log_metrics({f"train/{k}": v for k, v in h.items()}, step=offset + i)
        mlflow.log_metric(f"stage{stage.index + 1}/cached", float(cached))
        return record


def stage_numerics_tags(records: list[StageRecord], current_id: str) -> dict[str, str]:
    """``stage<n>.numerics``: what computed each stage (its record's fingerprint in one line);
    ``stage<n>.numerics_differs``: ``true`` for a stage trained under another fingerprint than
    this process's (another CPU, thread count or mode), whose weights this machine might not
    reproduce bit for bit."""
    tags = {}
    for n, record in enumerate(records, start=1):
        fp = record.numerics
        tags[f"stage{n}.numerics"] = numerics.summary(fp)
        if fp.get("id") and fp["id"] != current_id:
            tags[f"stage{n}.numerics_differs"] = "true"
    return tags


def _find_parent(client: MlflowClient, experiment_id: str, study_key: str) -> str | None:
    """The parent run of an earlier invocation of the same study, to resume it."""
    found = client.search_runs([experiment_id],
                               f"tags.study_key = '{study_key}' and "
                               "tags.`art_study.role` = 'study'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def finished_run_keys(client: MlflowClient, experiment_id: str, study_key: str) -> set[str]:
    """The ``run_key`` of every FINISHED child of the study's latest parent run: the runs a
    resumed study skips. Reads only (unlike :func:`_finished_children`)."""
    parent = _find_parent(client, experiment_id, study_key)
    if parent is None:
        return set()
    return {r.data.tags["run_key"]
            for r in search_all(client, experiment_id, f"tags.mlflow.parentRunId = '{parent}'")
            if r.info.status == "FINISHED" and r.data.tags.get("run_key")}


def _rival_parent(client: MlflowClient, experiment_id: str, study_key: str, lease: Lease,
                  mine: RunInfo):
    """An earlier RUNNING parent of the same study whose lease is live: two processes started
    the study at once and both created one. The later one (by start time, then run id, an order
    both processes compute alike) backs off; the earlier one goes on. Both searches follow
    their own creation, so the later always sees the earlier, and exactly one stays."""
    order = (mine.start_time, mine.run_id)
    for r in search_all(client, experiment_id,
                         f"tags.study_key = '{study_key}' and tags.`art_study.role` = 'study' "
                         "and attributes.status = 'RUNNING'"):
        if ((r.info.start_time, r.info.run_id) < order
                and lease.held_by_other(r.data.tags, r.info.status)):
            return r
    return None


@contextlib.contextmanager
def _sql_errors_not_logged():
    """MLflow's SQL store logs every failed statement with its traceback before raising it; the
    exception itself reaches the run's ``failure_reason`` or, for a failed store, one line."""
    quiet = logging.getLogger("mlflow.store.db.utils")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        quiet.setLevel(level)


def _raise_if_store_gone(client: MlflowClient, parent: str, exc: BaseException | None) -> None:
    """One line instead of a traceback per remaining run when the store itself has failed
    (deleted, read-only, unreachable): a run that failed for its own reason leaves the store
    writable, which a tag on the parent run proves."""
    uri = mlflow.get_tracking_uri()
    local = local_store_path(uri)
    usable = local is None or local.exists()
    if usable and exc is not None:
        try:
            client.set_tag(parent, "art_study.store_check", f"{time.time():.3f}")
        except Exception:
            usable = False
    if usable:
        return
    while exc is not None and exc.__cause__ is not None:  # the database's own words
        exc = exc.__cause__
    text = str(exc).strip().splitlines() if exc is not None else []
    why = f" ({redact(text[0])[:200]})" if text else " (it is gone)"
    raise TrackingError(
        f"the tracking store {redact(uri)} failed during the study{why}; the runs finished "
        "before are kept in it if it comes back: rerun then") from None


def _finished_children(client: MlflowClient, experiment_id: str, parent_id: str) -> dict:
    """FINISHED child runs of the parent by ``run_key``; every other child is deleted.

    The caller holds the study's lease, so no other live process is running these children: a
    child that is not FINISHED is left over from a failure or a kill, and is replaced.
    """
    finished: dict[str, object] = {}
    for r in search_all(client, experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'"):
        key = r.data.tags.get("run_key")
        if r.info.status == "FINISHED" and key and key not in finished:
            finished[key] = r
        else:
            client.delete_run(r.info.run_id)
    return finished


def search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    """Every run matching ``filter_string`` (MLflow pages its results)."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out
