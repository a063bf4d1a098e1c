"""Run a config, one experiment or a whole study, and record it in MLflow.

The path reads top to bottom (:func:`run_study`):

1. pick the backend (``backends.py``), check the store and load the data — all before any run
   exists, so bad input leaves nothing behind;
2. plan the runs (``plan.py``, validating every defense name and setting);
3. the executor (``executor.py``) records each run: its stages (each restored from the stage
   cache, or trained: build or reload the ``.h5`` hand-off → defense → save), then the
   evaluation, then the model, computed by the functions of ``stages.py`` in this process
   (``local_backend.py``) or as Ray tasks (``ray_backend.py``).

A config without ``study`` is a single top-level run. A study is one parent run with a child
per (sequence, depth, seed); rerunning it resumes it (``executor.py``) and reuses every cached
stage. Also here: where the stage cache is, and which of its stages the store's runs still use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from art_study import numerics
from art_study.config import ExperimentConfig
from art_study.data import MnistData, load_dataset, load_mnist
from art_study.errors import ArtStudyError
from art_study.study.backends import RayOptions, choose_backend
from art_study.study.executor import RunResult, StudyResult, finished_run_keys, search_all
from art_study.study.object_cache import is_uri, open_cache
from art_study.study.plan import RunSpec, distinct_stages, plan_runs, study_key
from art_study.tracking import (
    DEFAULT_STORE_DIR,
    local_store_path,
    prepare_store,
    redact,
    resolve_tracking_uri,
)


class StudyIncomplete(ArtStudyError):
    """Some runs of a study failed; the others are recorded and a rerun retries the failed."""


def cache_dir_for(cfg: ExperimentConfig) -> str | Path:
    """``study.cache_dir`` (a directory or an object-store URI), else ``stage-cache/`` beside a
    local sqlite store, else ./mlruns."""
    if cfg.study is not None and cfg.study.cache_dir:
        return cfg.study.cache_dir if is_uri(cfg.study.cache_dir) else Path(cfg.study.cache_dir)
    return default_cache_dir(cfg.tracking.uri)


def default_cache_dir(tracking_uri: str | None) -> Path:
    """``stage-cache/`` beside a local sqlite store, else under ./mlruns."""
    local = local_store_path(resolve_tracking_uri(tracking_uri))
    return (local.parent if local is not None else DEFAULT_STORE_DIR) / "stage-cache"


@dataclass
class StagesInUse:
    """What the runs of a store need from the stage cache."""

    keys: set[str] = field(default_factory=set)  # stages named by FINISHED runs
    unnamed: int = 0  # FINISHED runs from before runs named their stages
    live: list[str] = field(default_factory=list)  # studies being run now (live lease)


def stages_in_use(client: MlflowClient) -> StagesInUse:
    """The stage keys every FINISHED art-study run of the store names, and the live studies."""
    from art_study.study.lease import liveness

    out = StagesInUse()
    for exp in client.search_experiments():
        for r in search_all(client, exp.experiment_id, "attributes.status = 'RUNNING'"):
            if liveness(r.data.tags) == "live":
                out.live.append(r.data.tags.get("study", r.info.run_name or r.info.run_id))
        for r in search_all(client, exp.experiment_id, "attributes.status = 'FINISHED' and "
                             "tags.run_key != ''"):
            keys = {v for k, v in r.data.tags.items() if k.startswith("stage") and
                    k.endswith(".key")}
            out.keys |= keys
            out.unnamed += not keys
    return out


def load_data(cfg: ExperimentConfig, seeds: list[int]) -> dict[int, MnistData]:
    """The data of each seed (subsets are seeded; the full set is loaded once)."""
    d = cfg.data

    def load(**kwargs) -> MnistData:
        if d.path is None and d.name == "mnist":
            return load_mnist(d.dir, download=d.download, **kwargs)
        return load_dataset(d.name, path=d.path, data_dir=d.dir, download=d.download, **kwargs)

    if d.n_train is None and d.n_test is None:
        return dict.fromkeys(seeds, load(seed=seeds[0]))
    return {s: load(n_train=d.n_train, n_test=d.n_test, seed=s) for s in seeds}


def planned_runs(cfg: ExperimentConfig) -> tuple[list[RunSpec], dict[int, MnistData]]:
    """The runs of ``cfg`` keyed by the data each seed loads (and, with
    ``study.numerics_strict``, by this machine's numerics), and that data."""
    seeds = cfg.study.all_seeds() if cfg.study else [cfg.seed]
    data = load_data(cfg, seeds)
    strict = cfg.study is not None and cfg.study.numerics_strict
    runs = plan_runs(cfg, {s: data[s].fingerprint for s in seeds},
                     numerics.fingerprint()["id"] if strict else None, data[seeds[0]].spec)
    return runs, data


def run_study(cfg: ExperimentConfig, *, progress: bool = True,
              ray_options: RayOptions | None = None) -> StudyResult:
    """Run every experiment of ``cfg`` (one, or a whole study) and record them in MLflow.

    With ``ray_options``, stages and evaluations run as tasks on a Ray cluster
    (``ray_backend.py``); this process still logs every run, so the results are the same.
    """
    make_executor = choose_backend(ray_options)  # fails before the store or the data is touched
    cache = open_cache(cache_dir_for(cfg))  # so does a stage cache that cannot be reached
    n = cfg.numerics
    numerics.apply(n.mode, n.intra_op_threads, n.inter_op_threads)  # before any tensor exists
    register = cfg.study is not None and cfg.study.register_models
    if register and not cfg.tracking.log_model:
        raise ArtStudyError("study.register needs the models: tracking.log_model is false")
    experiment_id = prepare_store(cfg.tracking.uri, cfg.tracking.experiment)
    runs, data = planned_runs(cfg)
    executor = make_executor(cfg, data, cache, progress)
    try:
        if cfg.study is None:
            result = StudyResult(None)
            result.runs.append(executor.top_level_run(runs[0], experiment_id))
        else:
            result = executor.study(runs, experiment_id)
    finally:
        executor.close()
    result.stages_trained, result.stages_reused = executor.trained, executor.reused
    if register:
        from art_study.model_registry import register_study

        register_study([r.run_id for r in result.runs], cfg.name, cfg.tracking.uri)
    if result.failed:
        spec, reason = result.failed[0]
        raise StudyIncomplete(
            f"{len(result.failed)} of {len(runs)} runs failed (first: {spec.name}: {reason}); "
            "rerun the same command to retry them"
        )
    return result


def study_progress(cfg: ExperimentConfig) -> tuple[list[RunSpec], set[str], set[str]]:
    """What a resumed ``run_study(cfg)`` would not compute again: its runs as it plans them
    (the data is loaded for its fingerprints), the keys of their stages the stage cache holds,
    and the run keys its store has FINISHED under the study's latest parent run. Reads only: a
    store or cache that does not exist holds nothing."""
    runs, _data = planned_runs(cfg)
    root = cache_dir_for(cfg)
    cached: set[str] = set()
    if is_uri(root) or Path(root).is_dir():
        cache = open_cache(root)
        cached = {key for key in distinct_stages(runs) if cache.has(key)}
    uri = resolve_tracking_uri(cfg.tracking.uri)
    local = local_store_path(uri)
    finished: set[str] = set()
    if cfg.study is not None and (local is None or local.exists()):
        try:
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            if experiment is not None:
                finished = finished_run_keys(client, experiment.experiment_id,
                                             study_key(cfg, runs))
        except Exception as exc:  # a store that cannot be read: say so in one line
            text = str(exc).strip().splitlines()
            raise ArtStudyError(f"tracking store {redact(uri)} cannot be read: "
                                f"{redact(text[0] if text else type(exc).__name__)}") from None
    return runs, cached, finished


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> RunResult:
    """A config without a ``study`` section: one run. Returns that run's result."""
    if cfg.study is not None:
        raise ArtStudyError("run_experiment takes a config without 'study'; use run_study")
    return run_study(cfg, progress=progress).runs[0]


