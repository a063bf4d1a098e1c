"""Execute one experiment and record it in MLflow.

The path reads top to bottom: check the store and load the data (both before any run exists,
so bad input leaves nothing behind) → seed everything → build the model → train → evaluate →
log the model. An exception after the run has started ends it FAILED with a
``failure_reason`` tag; it never stays RUNNING.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import keras
import mlflow
import tensorflow as tf

from art_study.config import ExperimentConfig, flatten, to_yaml
from art_study.data import MnistData, load_mnist
from art_study.defenses import DEFENSES, StageContext
from art_study.evaluation import evaluate
from art_study.models import build_cnn, compile_model
from art_study.tracking import environment_tags, failure_reason, log_keras_model, prepare_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """The MLflow run id and every metric it logged at the end."""

    run_id: str
    metrics: dict[str, float]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TF, and make TF ops deterministic, so a run is reproducible."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> RunResult:
    """Train the configured model, evaluate it under FGSM, and record it all in MLflow."""
    experiment_id = prepare_store(cfg.tracking.uri, cfg.tracking.experiment)
    data = load_mnist(cfg.data.dir, n_train=cfg.data.n_train, n_test=cfg.data.n_test,
                      seed=cfg.seed, download=cfg.data.download)

    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.name) as run:
        try:
            metrics = _run(cfg, data, progress)
        except BaseException as exc:
            mlflow.set_tag("failure_reason", failure_reason(exc))
            raise
    return RunResult(run.info.run_id, metrics)


def _run(cfg: ExperimentConfig, data: MnistData, progress: bool) -> dict[str, float]:
    mlflow.log_params(flatten(cfg))
    mlflow.log_text(to_yaml(cfg), "config.yaml")
    mlflow.set_tags({**environment_tags(), "data.source": data.source,
                     "data.fingerprint": data.fingerprint, "n_conv": str(cfg.model.n_conv),
                     "defense": "none", "seed": str(cfg.seed)})

    seed_everything(cfg.seed)
    model = compile_model(build_cnn(cfg.model), cfg.train)

    ctx = StageContext(data.x_train, data.y_train, cfg.model, cfg.train, cfg.seed,
                       progress=progress)
    plain = DEFENSES["none"]
    t0 = time.perf_counter()
    model = plain.train(model, ctx, cfg.train.epochs, plain.settings())
    train_time = time.perf_counter() - t0

    result = evaluate(model, data.x_test, data.y_test, cfg.evaluation, progress=progress)
    metrics = {**result.metrics, "train/total_time_s": train_time,
               "train/mean_epoch_time_s": sum(ctx.epoch_times) / len(ctx.epoch_times)}
    mlflow.log_metrics(metrics)
    if cfg.tracking.log_model:
        log_keras_model(model, data.x_test[:2])
    return metrics
