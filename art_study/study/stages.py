"""The work of a run, as plain functions of their inputs: train a stage, craft the transfer
examples, evaluate the run's final model.

Each seeds itself (from the run's seed and, for a stage, its position), reads and writes models
through the stage cache, and knows nothing of where it runs: the in-process backend
(``local_backend.py``) calls them as each run comes, the Ray backend (``ray_backend.py``) runs
them as Ray tasks, and a run gives the same metrics on either. What is recorded in MLflow is the
executor's business (``executor.py``); a stage's defense logs its epochs to the active run, if
there is one.
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf

from art_study import numerics
from art_study.config import ExperimentConfig
from art_study.data import MnistData
from art_study.defenses import DEFENSES, StageContext
from art_study.errors import ArtStudyError
from art_study.evaluation import EvaluationResult, TransferSet, craft_transfer, evaluate
from art_study.models import build_cnn, compile_model
from art_study.study.cache import StageCache, StageRecord
from art_study.study.plan import RunSpec, StageSpec


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TF, and make TF ops deterministic, so a run is reproducible."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def stage_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th stage: fixed by the run's seed and the stage's position."""
    return (seed + 7919 * index) % 2**31


def step_offset(stage: StageSpec) -> int:
    """The run's epoch step at which ``stage`` begins: the epochs of the stages before it."""
    offset, parent = 0, stage.parent
    while parent is not None:
        offset, parent = offset + parent.epochs, parent.parent
    return offset


def train_stage(stage: StageSpec, cfg: ExperimentConfig, data: MnistData, cache: StageCache,
                *, progress: bool = False) -> StageRecord:
    """Train ``stage`` of a run with config ``cfg`` and save its model and record in ``cache``.

    The stage starts from a fresh CNN, or from its parent's ``.h5`` file in ``cache`` (the
    paper's hand-off), and seeds itself from the run's seed and its position, so it gives the
    same model wherever it runs. Each epoch's figures are logged to the active MLflow run as they
    come (the defenses do that) and kept in the returned record.
    """
    seed_everything(stage_seed(cfg.seed, stage.index))
    # A first stage builds the CNN; a later one reloads its parent's .h5 file (the hand-off).
    model = (build_cnn(cfg.model, input_shape=data.spec.input_shape,
                       n_classes=data.spec.n_classes)
             if stage.parent is None else cache.load_model(stage.parent.key))
    model = compile_model(model, cfg.train)
    ctx = StageContext(data.x_train, data.y_train, cfg.model, cfg.train, cfg.seed,
                       incoming_trained=stage.parent is not None,
                       step_offset=step_offset(stage), progress=progress,
                       n_classes=data.spec.n_classes)
    defense = DEFENSES[stage.defense]
    settings = defense.settings(**stage.settings)
    t0 = time.perf_counter()
    extra = {}
    if stage.plain_key is not None and cache.has(stage.plain_key):
        # Its training is the control's first stage, done already: replay that stage's epochs
        # into this run and apply the rest of the defense (the same model, bit for bit).
        plain = cache.record(stage.plain_key)
        model = compile_model(cache.load_model(stage.plain_key), cfg.train)
        for epoch in plain.history:
            ctx.log_epoch(epoch)
        model = defense.after_plain(model, ctx, settings)
        extra = {"plain_from": stage.plain_key, "plain_train_time_s": plain.train_time_s}
    else:
        model = defense.train(model, ctx, stage.epochs, settings)
    record = StageRecord(stage.key, stage.defense, stage.epochs, ctx.history,
                         time.perf_counter() - t0, {**extra, "numerics": numerics.fingerprint()})
    cache.save(model, record)
    return cache.record(stage.key)  # as saved: with its checksum (or a concurrent writer's)


def transfer_examples(spec: RunSpec, data: MnistData, cache: StageCache | None) -> TransferSet:
    """The transfer attacks' examples for run ``spec``: crafted on its control
    (``spec.reference``, loaded from ``cache``) after seeding with the run's seed, so every run
    of that depth and seed, in any process, gets the same examples."""
    if cache is None or spec.reference is None or not cache.has(spec.reference.key):
        raise ArtStudyError(f"{spec.name}: the control model for the transfer attack is not in "
                            "the stage cache")
    seed_everything(spec.seed)
    reference = compile_model(cache.load_model(spec.reference.key), spec.config.train)
    return craft_transfer(reference, data.x_test, data.y_test, spec.config.evaluation)


def evaluate_run(spec: RunSpec, model: keras.Model, data: MnistData,
                 cache: StageCache | None = None, *, progress: bool = False,
                 transfer_sets: dict[str, TransferSet] | None = None,
                 ) -> tuple[EvaluationResult, float]:
    """Evaluate the final model of run ``spec``, seeded by the run's seed; also its wall time.

    With ``evaluation.transfer``, the examples crafted on the control of the same depth and seed
    come from ``transfer_sets`` (by the control's stage key), else are crafted now (and kept
    there for the next run that shares the control).
    """
    t0 = time.perf_counter()
    crafted = None
    if spec.reference is not None and spec.config.evaluation.transfer:
        sets = {} if transfer_sets is None else transfer_sets
        if spec.reference.key not in sets:
            sets[spec.reference.key] = transfer_examples(spec, data, cache)
        crafted = sets[spec.reference.key]
    seed_everything(spec.seed)  # the evaluation's own randomness, whether or not it crafted
    result = evaluate(model, data.x_test, data.y_test, spec.config.evaluation, progress=progress,
                      transfer_set=crafted,
                      checkpoints=None if cache is None else cache.checkpoints)
    return result, time.perf_counter() - t0
