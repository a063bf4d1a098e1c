"""The ``art-robustness`` MLflow evaluator: ``mlflow.models.evaluate`` gives the figures of
``art-study evaluate`` on the same model and images, and a clear refusal of what it cannot take.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from art_study.data import data_fingerprint
from art_study.evaluate_model import evaluate_model, evaluation_config
from art_study.mlflow_evaluator import NAME, ArtRobustnessEvaluator, EvaluatorError
from art_study.run_page import CURVE_ARTIFACT, DIGEST_CHARS, NOTE_TAG, TABLE_ARTIFACT
from art_study.study.execute import load_data
from art_study.tracking import log_keras_model, prepare_store

REPO = Path(__file__).resolve().parents[1]
#: Figures that measure the machine, not the model.
TIMINGS = ("time_s", "images_per_s")


def register_from_pyproject() -> None:
    """Register the evaluator the way MLflow does, from the entry point pyproject.toml declares
    (the installed package's metadata may predate it)."""
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    value = declared["mlflow.model_evaluator"][NAME]
    entry = importlib.metadata.EntryPoint(NAME, value, "mlflow.model_evaluator")
    assert entry.load() is ArtRobustnessEvaluator
    _model_evaluation_registry.register(entry.name, entry.load())


@pytest.fixture
def logged(tmp_path, tracking_uri, mnist_dir, trained_model):
    """A config file with a small evaluation, the trained model logged with mlflow.keras, and
    the config's test images as MLflow passes them: one row of 784 pixels per image."""
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "evaluator-test", "seed": 0,
        "data": {"dir": str(mnist_dir), "n_train": 100, "n_test": 60},
        "tracking": {"uri": tracking_uri, "log_model": False},
        "evaluation": {"eps": [0.05, 0.1], "batch_size": 60,
                       "attacks": [{"name": "pgd", "eps": [0.1], "n_images": 30,
                                    "args": {"max_iter": 3}}],
                       "diagnostics": {"n_images": 30, "pgd_steps": 2}}}))
    cfg = evaluation_config(config, [])
    mlflow.set_experiment(experiment_id=prepare_store(tracking_uri, "art-study"))
    with mlflow.start_run() as run:
        log_keras_model(trained_model, np.zeros((2, 28, 28, 1), np.float32))
    data = load_data(cfg, [cfg.seed])[cfg.seed]
    rows = pd.DataFrame(data.x_test.reshape(len(data.x_test), -1),
                        columns=[f"px{i}" for i in range(784)]).assign(label=data.y_test)
    yield config, cfg, f"runs:/{run.info.run_id}/model", rows
    mlflow.tracking.fluent._active_experiment_id = None  # its id belongs to this test's store


def test_evaluator_gives_the_figures_of_art_study_evaluate(logged) -> None:
    config, cfg, uri, rows = logged
    register_from_pyproject()
    cli = evaluate_model(uri, cfg, progress=False)

    with mlflow.start_run() as run:
        out = mlflow.models.evaluate(uri, rows, targets="label", model_type="classifier",
                                     evaluators=[NAME],
                                     evaluator_config={NAME: {"config": str(config)}})
    logged_run = mlflow.get_run(run.info.run_id)
    same = {k: v for k, v in cli.metrics.items() if not k.endswith(TIMINGS)}
    assert "attack/pgd/accuracy_eps_0.1" in same and "robust/accuracy_eps_0.1" in same
    assert {k: out.metrics[k] for k in same} == same
    assert {k: logged_run.data.metrics[k] for k in same} == pytest.approx(same)
    verdict = {k: v for k, v in cli.tags.items() if k.startswith(("diag.", "gradient_mask"))}
    assert "gradient_masking_suspected" in verdict and len(verdict) > 3
    assert {k: logged_run.data.tags[k] for k in verdict} == verdict
    # The data's fingerprint is over the images given (the CLI's over the train and test split).
    pixels = np.rint(rows.drop(columns="label").to_numpy() * 255).astype(np.uint8)
    given = data_fingerprint(pixels.reshape(-1, 28, 28), rows["label"].to_numpy())
    assert logged_run.data.tags["data.fingerprint"] == given

    # Both runs carry the run page: figure, table, dataset input, description.
    client = mlflow.MlflowClient()
    for run_id in (run.info.run_id, cli.run_id):
        listed = {a.path for a in client.list_artifacts(run_id, "robustness")}
        assert {CURVE_ARTIFACT, TABLE_ARTIFACT} <= listed
        shown = mlflow.get_run(run_id)
        digests = {i.dataset.digest for i in shown.inputs.dataset_inputs}
        assert shown.data.tags["data.fingerprint"][:DIGEST_CHARS] in digests
        assert shown.data.tags[NOTE_TAG].startswith(
            f"clean accuracy {cli.metrics['clean/accuracy']:.4f}; worst case "
            f"{cli.metrics['robust/accuracy_eps_0.1']:.4f} at ε=0.1; gradient masking ")


def test_evaluator_refuses_other_models_and_shapes_in_one_line(logged) -> None:
    config, _cfg, uri, rows = logged
    register_from_pyproject()
    settings = {NAME: {"config": str(config)}}
    with mlflow.start_run(), pytest.raises(EvaluatorError) as wrong_shape:
        mlflow.models.evaluate(uri, rows.iloc[:, 100:], targets="label", model_type="classifier",
                               evaluators=[NAME], evaluator_config=settings)
    assert str(wrong_shape.value) == (f"{NAME}: the data has rows of (684,) values; the model "
                                      "takes (28, 28, 1) images, 784 values per row")
    with mlflow.start_run(), pytest.raises(EvaluatorError, match="evaluates Keras models") as fn:
        mlflow.models.evaluate(lambda df: np.zeros(len(df), int), rows, targets="label",
                               model_type="classifier", evaluators=[NAME],
                               evaluator_config=settings)
    assert "\n" not in str(fn.value)
    with mlflow.start_run(), pytest.raises(EvaluatorError, match="unknown evaluator_config"):
        mlflow.models.evaluate(uri, rows, targets="label", model_type="classifier",
                               evaluators=[NAME], evaluator_config={NAME: {"cfg": "x"}})
