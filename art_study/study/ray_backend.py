"""Run a study on a Ray cluster: stages and evaluations are Ray tasks, MLflow stays with the driver.

The plan's stage tree becomes a graph of tasks:

- one task per distinct stage not yet in the stage cache, taking the task of the stage it
  continues from as an argument, so Ray starts it once that one has finished; it reads its
  parent's ``.h5`` file from the stage cache and writes its own there (atomically);
- one task per run evaluating the run's final model, after the run's last stage.

Each task declares its resources (``num_cpus``, and ``num_gpus`` where the cluster has GPUs) and
is retried ``max_retries`` times when its worker dies. Tasks run the same functions as the
in-process backend (:func:`~art_study.study.stages.train_stage`,
:func:`~art_study.study.stages.evaluate_run`), so a run gives the same metrics on either.

What must be shared: the stage cache, a bucket (``s3://…``, :mod:`.object_cache`) or a directory
at the same absolute path on the driver and on every node. On a cluster given by address, the
workers get art-study itself from the driver (Ray's ``runtime_env`` ``py_modules``); its
dependencies must be installed on the nodes. The training and
test data go to Ray's object store once per seed, so workers need no MNIST files. Workers never
talk to MLflow: the driver (the process running ``art-study run``) creates each child run, logs
its stages' recorded epochs, the evaluation and the model, in plan order, exactly as in-process,
so resuming a study (FINISHED children skipped by ``run_key``, the others replaced) is unchanged.

Ray is an optional extra (``pip install -e '.[ray]'``), imported only when this backend is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

import art_study
from art_study import numerics
from art_study.config import ExperimentConfig, NumericsConfig
from art_study.data import MnistData
from art_study.errors import ArtStudyError
from art_study.evaluation import EvaluationResult, TransferSet
from art_study.models import compile_model
from art_study.study.cache import StageCache, StageRecord
from art_study.study.executor import Executor
from art_study.study.object_cache import ObjectStageCache, open_cache
from art_study.study.plan import RunSpec, StageSpec
from art_study.study.stages import evaluate_run, train_stage, transfer_examples


@dataclass(frozen=True)
class RayOptions:
    """Where and how the tasks run."""

    address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray instance
    # CPUs a task declares, and then TensorFlow's thread count in it. None: 1 CPU declared and
    # TensorFlow's default threads (the node's cores), as in-process: TF's float reductions
    # depend on its thread count, so only then are metrics bit-identical to an in-process run
    # on the same machine. Set it on nodes running many tasks at once.
    cpus_per_task: float | None = None
    gpus_per_task: float | None = None  # None: 1 where the cluster has GPUs, else 0
    max_retries: int = 3  # re-executions of a task whose worker process died

    def __post_init__(self) -> None:
        cpus, gpus = self.cpus_per_task, self.gpus_per_task
        if (cpus is not None and cpus <= 0) or (gpus is not None and gpus < 0) or \
                self.max_retries < 0:
            raise ArtStudyError("Ray tasks need CPUs > 0, GPUs >= 0 and max_retries >= 0")


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`ArtStudyError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ArtStudyError(
            "--backend ray needs Ray, an optional extra: pip install -e '.[ray]' "
            "(or pip install 'ray>=2.60')"
        ) from None
    return ray


class RayExecutor(Executor):
    """The executor whose stages and evaluations are computed by Ray tasks.

    :meth:`start` submits the tasks of the first runs still to do; logging a run then waits for
    its own tasks only (``ray.get``), so the driver logs run 1 while workers train run 5. Runs are
    submitted in plan order, at most :attr:`lookahead` ahead of the one being logged: Ray queues
    a task when its inputs are ready, so a stage with no parent submitted at the start would
    overtake every evaluation that became ready later. With all tasks submitted at once, a
    study's depth-5 stages ran before its depth-2 evaluations and nothing was logged for hours;
    the window keeps the study near plan order (the priority a study's config sets: its first
    blocks first) while keeping every task slot busy.
    """

    def __init__(self, cfg: ExperimentConfig, data: dict[int, MnistData], cache: StageCache,
                 progress: bool, options: RayOptions):
        super().__init__(cfg, data, cache, progress)
        cpus, gpus = options.cpus_per_task, options.gpus_per_task
        self.ray = ray = import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _connect(ray, options.address, portable=cfg.numerics.mode == "portable")
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self._resources = {"num_cpus": 1 if cpus is None else cpus, "num_gpus": gpus,
                           "max_retries": options.max_retries}
        self._threads = None if cpus is None else max(1, int(cpus))
        self._cache_root = cache.location
        # Two runs per task slot: enough independent work to fill the slots while a run's
        # chain (stage → stage → evaluation) waits on itself.
        slots = int(ray.cluster_resources().get("CPU", 1) // self._resources["num_cpus"])
        self.lookahead = 2 * max(1, slots)
        self._pending: list[RunSpec] = []  # runs of start() not yet submitted, in plan order
        self._stage_task = ray.remote(_stage_task)
        self._eval_task = ray.remote(_evaluate_task)
        self._craft_task = ray.remote(_craft_task)
        self._data_refs: dict[int, Any] = {}  # id(MnistData) → its ref in the object store
        self._stage_refs: dict[str, Any] = {}  # stage key → task ref, or False if it was cached
        self._eval_refs: dict[str, Any] = {}  # run key → task ref
        self._craft_refs: dict[str, Any] = {}  # control stage key → transfer examples task ref
        self._counted: set[str] = set()  # stages trained by this invocation, already counted

    def start(self, runs: list[RunSpec]) -> None:
        self._pending = list(runs)
        self._submit_through(self.lookahead)

    def _advance(self, spec: RunSpec) -> None:
        """The driver is logging ``spec``: submit runs through :attr:`lookahead` from it."""
        while spec.key not in self._eval_refs and self._pending:
            self._submit_run(self._pending.pop(0))
        if spec.key in self._eval_refs:
            self._submit_through(list(self._eval_refs).index(spec.key) + self.lookahead)

    def _submit_through(self, n: int) -> None:
        """Submit pending runs, in plan order, until ``n`` runs are submitted."""
        while self._pending and len(self._eval_refs) < n:
            self._submit_run(self._pending.pop(0))

    def _submit_run(self, spec: RunSpec) -> None:
        """The tasks of one run: its stages not yet submitted, the transfer examples its
        evaluation needs, and its evaluation."""
        data = self._data_ref(spec.seed)
        for stage in spec.stages:  # each is logged to the run from its record in the cache
            self._submit(stage, spec.config, data)
        # The evaluation waits for the run's last stage and, for transfer attacks, for the
        # examples crafted once on the control of its depth and seed (``spec.reference``,
        # a stage of an earlier run of the plan) by a task of their own.
        done = self._submit(spec.stages[-1], spec.config, data)
        crafted = None
        if spec.reference is not None and spec.config.evaluation.transfer:
            crafted = self._craft(spec, data)
        self._eval_refs[spec.key] = self._eval_task.options(
            name=f"evaluate:{spec.sequence}:{spec.key[:12]}", **self._resources,
        ).remote(spec, data, self._cache_root, self._threads, crafted, done)

    def _craft(self, spec: RunSpec, data: Any) -> Any:
        """The task crafting the transfer examples on ``spec``'s control, submitted once per
        control, after the control's last stage."""
        key = spec.reference.key
        if key not in self._craft_refs:
            done = self._submit(spec.reference, spec.config, data)
            self._craft_refs[key] = self._craft_task.options(
                name=f"transfer:{key[:12]}", **self._resources,
            ).remote(spec, data, self._cache_root, self._threads, done)
        return self._craft_refs[key]

    def _submit(self, stage: StageSpec, cfg: ExperimentConfig, data: Any) -> Any:
        """The task training ``stage``, submitted once, after its parent's; False for a stage
        already in the cache."""
        if stage.key not in self._stage_refs:
            if self.cache.has(stage.key):
                self._stage_refs[stage.key] = False
            else:
                parent = self._submit(stage.parent, cfg, data) if stage.parent else False
                self._stage_refs[stage.key] = self._stage_task.options(
                    name=f"stage:{stage.defense}:{stage.key[:12]}", **self._resources,
                ).remote(stage, cfg, data, self._cache_root, self._threads, parent)
        return self._stage_refs[stage.key]

    def close(self) -> None:
        if self._owns_ray:
            self.ray.shutdown()

    def _stage(self, stage: StageSpec, spec: RunSpec, data: MnistData) -> StageRecord:
        """The stage's record once its task has finished, logged to the run like the
        in-process backend does: trained by this invocation for the first run that uses it,
        reused from the cache for every other."""
        self._advance(spec)
        trained = self._get(self._stage_refs[stage.key])
        _require(self.cache, stage.key, "the driver")
        if trained and stage.key not in self._counted:
            self._counted.add(stage.key)
            self.trained += 1
            return self._replay(stage, cached=False)
        self.reused += 1
        return self._replay(stage, cached=True)

    def _evaluate(self, spec: RunSpec, model: keras.Model,
                  data: MnistData) -> tuple[EvaluationResult, float]:
        self._advance(spec)
        return self._get(self._eval_refs[spec.key])

    def _data_ref(self, seed: int) -> Any:
        data = self.data[seed]  # the full set is one object shared by every seed: put once
        if id(data) not in self._data_refs:
            self._data_refs[id(data)] = self.ray.put(data)
        return self._data_refs[id(data)]

    def _get(self, ref: Any) -> Any:
        """A task's value; a task that raised re-raises its own exception here (a
        ``TrainingError`` stays one), whichever task of the chain it came from."""
        if not isinstance(ref, self.ray.ObjectRef):
            return ref
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise


def _connect(ray: Any, address: str | None, portable: bool = False) -> None:
    """``ray.init``: connect to the cluster at ``address`` (or $RAY_ADDRESS), else start one
    that listens on loopback only (:func:`_loopback_only`). With ``portable`` numerics the
    workers start with oneDNN off: TensorFlow reads the switches once, when a worker imports it."""
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    if portable:
        env.update(numerics.PORTABLE_ENV)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    runtime_env: dict[str, Any] = {"env_vars": env}
    if not local:  # the cluster's nodes get this very art-study from the driver, not a path
        runtime_env["py_modules"] = [str(Path(art_study.__file__).parent)]
    try:
        with _loopback_only(ray) if local else contextlib.nullcontext():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        raise ArtStudyError(f"cannot start Ray ({where}): {first}") from None


#: Ray's switch for a single-machine instance (its default on macOS and Windows): the node's
#: address is loopback, so the GCS, raylets and workers listen on 127.0.0.1 only.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only(ray: Any) -> Iterator[None]:
    """Start a local Ray instance reachable from this machine only.

    On Linux Ray gives a new local instance the machine's network address, and its servers
    listen on every interface: anyone who can reach the machine could submit tasks, i.e. run
    code as this user. A local instance needs no network, so it gets Ray's own loopback mode
    (set for this process and inherited by the Ray processes it starts). A cluster given by
    ``--address``/``$RAY_ADDRESS`` is left as its operator set it up.
    """
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node address
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


# -- the tasks (run on the workers) -------------------------------------------------------------
def _stage_task(stage: StageSpec, cfg: ExperimentConfig, data: MnistData, cache_root: str,
                threads: int | None, parent_done: bool) -> bool:
    """Train ``stage`` into the shared stage cache; True if trained, False if already there
    (a retry after the save, or another study). ``parent_done`` only orders it after its
    parent's task."""
    cache = open_cache(cache_root)
    if cache.has(stage.key):
        return False
    if stage.parent is not None:
        _require(cache, stage.parent.key, f"worker {socket.gethostname()}")
    _configure(cfg.numerics, threads)
    with _without_live_metrics():
        train_stage(stage, cfg, data, cache)
    return True


def _craft_task(spec: RunSpec, data: MnistData, cache_root: str, threads: int | None,
                stage_done: bool) -> TransferSet:
    """The transfer examples crafted on ``spec``'s control, as in-process (same seeding, so
    the same examples). ``stage_done`` only orders it after the control's last stage."""
    cache = open_cache(cache_root)
    _require(cache, spec.reference.key, f"worker {socket.gethostname()}")
    _configure(spec.config.numerics, threads)
    return transfer_examples(spec, data, cache)


def _evaluate_task(spec: RunSpec, data: MnistData, cache_root: str, threads: int | None,
                   crafted: TransferSet | None, stage_done: bool) -> tuple[EvaluationResult, float]:
    """Evaluate the run's final model from the shared stage cache, as in-process, with the
    transfer examples of its control (Ray hands the craft task's result in).
    ``stage_done`` only orders it after the task of the stage it reads."""
    cache = open_cache(cache_root)
    _require(cache, spec.stages[-1].key, f"worker {socket.gethostname()}")
    _configure(spec.config.numerics, threads)
    model = compile_model(cache.load_model(spec.stages[-1].key), spec.config.train)
    sets = {} if crafted is None else {spec.reference.key: crafted}
    return evaluate_run(spec, model, data, cache, transfer_sets=sets)


def _require(cache: StageCache | ObjectStageCache, key: str, where: str) -> None:
    if not cache.has(key):
        raise ArtStudyError(
            f"stage {key[:12]} is missing from the stage cache {cache.root} on {where}: the "
            "stage cache (study.cache_dir: a bucket, or a directory at the same path) must be "
            "shared by the driver and every Ray node; rerun to retrain it"
        )


def _configure(n: NumericsConfig, threads: int | None) -> None:
    """The worker's TensorFlow as the config says: portable numerics (its own thread counts),
    else ``threads`` (:func:`_limit_threads`)."""
    if n.mode == "portable":
        numerics.apply(n.mode, n.intra_op_threads, n.inter_op_threads)
    else:
        _limit_threads(threads)


def _limit_threads(n: int | None) -> None:
    """Give TensorFlow ``n`` threads, not one per core of the node (None: leave its default).
    Set before its runtime starts; a worker reused for a later task keeps its first count."""
    if n is None:
        return
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)


@contextlib.contextmanager
def _without_live_metrics() -> Iterator[None]:
    """Drop the per-epoch ``mlflow.log_metric(s)`` calls a stage makes while it trains.

    In-process they go to the child run as they come. A worker has no run: everything they log
    is also kept in the stage's record, which the driver logs into every run using the stage.
    """
    import mlflow

    saved = mlflow.log_metric, mlflow.log_metrics
    mlflow.log_metric = mlflow.log_metrics = _drop
    try:
        yield
    finally:
        mlflow.log_metric, mlflow.log_metrics = saved


def _drop(*args: Any, **kwargs: Any) -> None:
    return None
