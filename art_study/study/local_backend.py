"""The in-process backend: each stage trains, and each evaluation runs, when its run is logged."""

from __future__ import annotations

import keras
import mlflow

from art_study.config import ExperimentConfig
from art_study.data import MnistData
from art_study.evaluation import EvaluationResult, TransferSet
from art_study.study.cache import StageCache, StageRecord
from art_study.study.executor import Executor
from art_study.study.plan import RunSpec, StageSpec
from art_study.study.stages import evaluate_run, train_stage


class LocalExecutor(Executor):
    """Computes in this process, one run after the other, reusing the stage cache."""

    def __init__(self, cfg: ExperimentConfig, data: dict[int, MnistData], cache: StageCache,
                 progress: bool):
        super().__init__(cfg, data, cache, progress)
        self._transfer: dict[str, TransferSet] = {}  # control stage key → examples crafted on it

    def start(self, runs: list[RunSpec]) -> None:
        """Nothing to begin: each stage trains and each evaluation runs when its run is
        logged."""

    def close(self) -> None:
        """Nothing to release."""

    def _stage(self, stage: StageSpec, spec: RunSpec, data: MnistData) -> StageRecord:
        """Restore ``stage`` from the cache, or train it from its parent's ``.h5`` file."""
        if self.cache.has(stage.key):
            self.reused += 1
            return self._replay(stage, cached=True)
        record = train_stage(stage, spec.config, data, self.cache, progress=self.progress)
        self.trained += 1
        mlflow.log_metric(f"stage{stage.index + 1}/cached", 0.0)
        return record

    def _evaluate(self, spec: RunSpec, model: keras.Model,
                  data: MnistData) -> tuple[EvaluationResult, float]:
        """The run's evaluation and its wall time."""
        return evaluate_run(spec, model, data, self.cache, progress=self.progress,
                            transfer_sets=self._transfer)
