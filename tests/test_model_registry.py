"""``art-study register``: a run's model in the MLflow Model Registry with its robustness as
tags, ``@most-robust`` on the most robust unflagged version, and ``art-study evaluate
models:/NAME@most-robust``; one-line errors for what cannot be registered."""

from __future__ import annotations

import mlflow
import numpy as np
import yaml

from art_study.cli import main
from art_study.evaluate_model import evaluate_model, evaluation_config
from art_study.tracking import log_keras_model

NAME = "mnist-cnn"


def small_config(tmp_path, tracking_uri, mnist_dir):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "name": "registry-test",
        "data": {"dir": str(mnist_dir), "n_train": 100, "n_test": 50},
        "tracking": {"uri": tracking_uri},
        "evaluation": {"eps": [0.1], "batch_size": 50,
                       "attacks": [{"name": "pgd", "n_images": 20, "args": {"max_iter": 3}}],
                       "diagnostics": {"n_images": 20, "pgd_steps": 2}}}))
    return path


def variant(model, metrics: dict[str, float], worst: float, masking: str) -> str:
    """A run with the same model and figures except its worst case and masking verdict."""
    with mlflow.start_run() as run:
        mlflow.log_metrics({**metrics, "robust/accuracy_eps_0.1": worst})
        mlflow.set_tag("gradient_masking_suspected", masking)
        log_keras_model(model, np.zeros((2, 28, 28, 1), np.float32))
    return run.info.run_id


def register(run_id: str, uri: str, capsys) -> tuple[int, str, str]:
    code = main(["register", run_id, "--name", NAME, "--tracking-uri", uri])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_register_tags_alias_and_evaluate_at_the_alias(tmp_path, tracking_uri, mnist_dir,
                                                       trained_model, capsys) -> None:
    config = small_config(tmp_path, tracking_uri, mnist_dir)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("registry-test")  # not an experiment id of an earlier test's store
    trained_model.save(tmp_path / "model.keras")
    first = evaluate_model(str(tmp_path / "model.keras"), evaluation_config(config, []),
                           progress=False)
    m = first.metrics
    worst = m["robust/accuracy_eps_0.1"]
    masked = variant(trained_model, m, worst=worst + 0.5, masking="true")
    robust = variant(trained_model, m, worst=worst + 0.2, masking="false")

    code, out, err = register(first.run_id, tracking_uri, capsys)
    assert code == 0, err
    assert out.startswith(f"{NAME} version 1: clean {m['clean/accuracy']:.4f}, worst case "
                          f"{worst:.4f} at ε=0.1")
    assert register(masked, tracking_uri, capsys)[1].startswith(f"{NAME} version 2:")
    assert register(robust, tracking_uri, capsys)[1].endswith("@most-robust → version 3")
    assert register(first.run_id, tracking_uri, capsys)[1].startswith(f"{NAME} version 1:")

    client = mlflow.MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 3  # registering a run twice keeps its version
    assert client.get_model_version_by_alias(NAME, "most-robust").run_id == robust
    tags = next(v for v in versions if v.run_id == first.run_id).tags
    assert tags["robustness.clean_accuracy"] == f"{m['clean/accuracy']:.4f}"
    assert tags["robustness.worst_case.eps_0.1"] == f"{m['robust/accuracy_eps_0.1']:.4f}"
    assert tags["robustness.headline_eps"] == "0.1"
    assert tags["robustness.gradient_masking"] == (
        "suspected" if first.tags["gradient_masking_suspected"] == "true" else "not suspected")
    assert tags["robustness.attacks"] == "fgsm_custom, fgsm_art, pgd"
    assert tags["robustness.budget.pgd"] == (
        "ε 0.1; n_images 20; eps_step_over_eps 0.1; max_iter 3; num_random_init 1")
    masked_version = next(v for v in versions if v.run_id == masked)
    assert masked_version.tags["robustness.gradient_masking"] == "suspected"

    code = main(["evaluate", f"models:/{NAME}@most-robust", "--config", str(config),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"clean accuracy {m['clean/accuracy']:.4f}" in out
    assert f"model models:/{NAME}@most-robust" in out


def test_register_errors_are_one_line(tmp_path, tracking_uri, mnist_dir, capsys) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("registry-test")
    with mlflow.start_run() as run:
        mlflow.log_metric("clean/accuracy", 0.9)
    unknown = "0" * 32
    cases = {
        unknown: (tracking_uri, f"no run {unknown} in the store {tracking_uri}"),
        run.info.run_id: (tracking_uri, f"run {run.info.run_id} has no logged model"),
        "x": (f"file://{tmp_path}/mlruns", "is a plain file store, which has no model registry"),
    }
    for run_id, (uri, message) in cases.items():
        code, out, err = register(run_id, uri, capsys)
        assert code == 1 and not out
        assert message in err and len(err.splitlines()) == 1, err
