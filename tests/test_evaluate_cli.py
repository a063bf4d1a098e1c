"""``art-study evaluate`` on every MODEL form, the models it must refuse in one line, and
``art-study runs``.

Evaluations use a tiny config (100 test images, ε 0.3, PGD with 3 steps on 20 images, the
diagnostics on 20) so each takes seconds; what is checked is that the numbers are the ones a
study's own evaluation gives for the same model, data and seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# ART's import runs logging.config.dictConfig, which closes every existing handler; absl's
# handler then closes its stream unless it is the *current* sys.stderr. Imported here, at
# collection, that stream is still pytest's own; first imported inside a test with capsys, it
# would close pytest's capture file and crash the session.
import art  # noqa: F401
import keras
import mlflow
import numpy as np
import pytest
import yaml

from art_study.cli import main
from art_study.evaluate_model import PAPER_EVALUATION, evaluation_config

REPO = Path(__file__).resolve().parents[1]
TINY_EVALUATION = {
    "eps": [0.3], "batch_size": 100,
    "attacks": [{"name": "pgd", "eps": [0.3], "n_images": 20, "args": {"max_iter": 3}}],
    "diagnostics": {"n_images": 20, "pgd_steps": 2},
}
TINY_DATA = {"n_train": 300, "n_test": 100}
#: Metrics that depend only on the model, the data and the seed (not on wall time).
TIMED = ("time_s", "images_per_s", "craft_time_s")


def write_config(tmp_path: Path, study: bool = False, log_model: bool = False) -> Path:
    raw = {"name": "one", "data": TINY_DATA, "train": {"batch_size": 64},
           "evaluation": TINY_EVALUATION, "tracking": {"log_model": log_model}}
    if study:
        raw["study"] = {"seeds": [0], "stage_epochs": [1, 1],
                        "blocks": [{"depths": [2], "sequences": ["control"]}]}
    path = tmp_path / ("study.yaml" if study else "eval.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def all_runs(uri: str):
    mlflow.set_tracking_uri(uri)
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(exps) if exps else None


def assert_nothing_left_running(uri: str) -> None:
    """A refused model leaves no run at all; in particular none RUNNING."""
    runs = all_runs(uri)
    assert runs is None or len(runs) == 0, runs[["status", "tags.mlflow.runName"]]


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("art-study: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def evaluate(model: str, config: Path, uri: str, mnist_dir: Path, *extra: str) -> int:
    return main(["evaluate", model, "--config", str(config), "--tracking-uri", uri,
                 "--data-dir", str(mnist_dir), "--no-progress", *extra])


def evaluation_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation's metrics that do not depend on timing."""
    keep = ("clean/", "fgsm_", "xcheck/", "attack/", "diag/", "eval/n_images")
    return {k: v for k, v in metrics.items()
            if k.startswith(keep) and not k.endswith(TIMED)}


def latest_run(uri: str) -> mlflow.entities.Run:
    runs = all_runs(uri)
    return mlflow.get_run(runs.sort_values("start_time").run_id.iloc[-1])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_model) -> Path:
    path = tmp_path_factory.mktemp("models") / "cnn.keras"
    trained_model.save(path)
    return path


def test_default_evaluation_is_the_paper_study_s() -> None:
    """The installed package carries configs/paper.yaml's evaluation section as a Python value;
    the two must not drift apart."""
    from art_study.config import load_config

    assert evaluation_config(None, []).evaluation == \
        load_config(REPO / "configs" / "paper.yaml").evaluation
    assert PAPER_EVALUATION["transfer"] == ["fgsm", "pgd"]
    cfg = evaluation_config(None, ["evaluation.n_attack=50", "data.n_test=100"])
    assert cfg.evaluation.n_attack == 50 and cfg.data.n_test == 100


def test_study_run_reevaluated_by_run_id_and_listed(tmp_path, tracking_uri, mnist_dir,
                                                    capsys) -> None:
    """A study's run, evaluated again by its run id with the same config, gives the same
    figures under the same metric names, and `runs` lists both."""
    study = write_config(tmp_path, study=True, log_model=True)
    assert main(["run", str(study), "--tracking-uri", tracking_uri, "--data-dir",
                 str(mnist_dir), "--no-progress"]) == 0
    runs = all_runs(tracking_uri)
    child = runs[runs["tags.art_study.role"] == "run"].iloc[0]
    parent_id = runs[runs["tags.art_study.role"] == "study"].run_id.iloc[0]
    capsys.readouterr()

    assert evaluate(child.run_id, study, tracking_uri, mnist_dir,
                    "--set", "tracking.log_model=false") == 0
    out = capsys.readouterr().out
    assert "ε=0.3" in out and "attack/pgd" in out and "gradient masking" in out

    ev = latest_run(tracking_uri)
    original = mlflow.get_run(child.run_id)
    t = ev.data.tags
    assert ev.info.status == "FINISHED"
    assert t["evaluation_only"] == "true" and t["art_study.role"] == "evaluation"
    assert t["source_model"] == f"runs:/{child.run_id}/model"
    assert t["source_run_id"] == child.run_id
    assert t["source_model_output"] == "logits"
    assert t["data.fingerprint"] == original.data.tags["data.fingerprint"]
    assert ev.info.experiment_id == original.info.experiment_id  # beside the study's runs
    mine, theirs = evaluation_metrics(ev.data.metrics), evaluation_metrics(original.data.metrics)
    assert set(mine) == set(theirs)  # same metric names: the UI compares them
    assert mine == pytest.approx(theirs, abs=1e-6)
    assert t["gradient_masking_suspected"] == original.data.tags["gradient_masking_suspected"]

    assert main(["runs", "--tracking-uri", tracking_uri]) == 0
    listing = capsys.readouterr().out
    assert parent_id in listing and child.run_id in listing and ev.info.run_id in listing
    assert "evaluation-only runs" in listing
    assert main(["runs", "--tracking-uri", tracking_uri, "--study", "one"]) == 0
    only = capsys.readouterr().out
    assert child.run_id in only and ev.info.run_id not in only
    code = main(["runs", "--tracking-uri", tracking_uri, "--study", "nope"])
    assert_one_line_error(capsys, code, "no study named 'nope'")


def test_file_then_runs_uri_then_registered_version(tmp_path, tracking_uri, mnist_dir,
                                                    model_file, trained_model, capsys) -> None:
    """The same model as a file, as the model its evaluation run logged (runs:/) and as a
    registered version (models:/) gets the same figures; the file's sha256 is recorded."""
    config = write_config(tmp_path)
    assert evaluate(str(model_file), config, tracking_uri, mnist_dir,
                    "--set", "tracking.log_model=true") == 0
    first = latest_run(tracking_uri)
    assert first.data.tags["source_model"] == str(model_file)
    assert first.data.tags["source_model_sha256"] == \
        hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert first.data.tags["source_model_kind"] == "file"
    # The logged clean accuracy is the model's own on the same test images.
    from art_study.data import load_mnist
    from art_study.models import accuracy

    data = load_mnist(mnist_dir, **TINY_DATA, seed=0)
    assert first.data.metrics["clean/accuracy"] == pytest.approx(
        accuracy(trained_model, data.x_test, data.y_test), abs=1e-9)

    assert evaluate(f"runs:/{first.info.run_id}/model", config, tracking_uri, mnist_dir) == 0
    second = latest_run(tracking_uri)
    assert second.data.tags["source_model_kind"] == "mlflow"
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(f"runs:/{first.info.run_id}/model", "digits").version
    # The registered version, with FGSM transfer examples crafted on the file's model.
    assert evaluate(f"models:/digits/{version}", config, tracking_uri, mnist_dir,
                    "--transfer-from", str(model_file), "--set", "evaluation.transfer=[fgsm]") == 0
    third = latest_run(tracking_uri)
    assert third.data.tags["source_model"] == f"models:/digits/{version}"
    assert third.data.tags["transfer"].startswith(f"crafted on {model_file}")
    reference = evaluation_metrics(first.data.metrics)
    assert second.info.status == third.info.status == "FINISHED"
    assert evaluation_metrics(second.data.metrics) == pytest.approx(reference, abs=1e-6)
    m = third.data.metrics
    for key in ("clean/accuracy", "fgsm_custom/accuracy_eps_0.3", "attack/pgd/accuracy_eps_0.3"):
        assert m[key] == pytest.approx(reference[key], abs=1e-6), key
    # Crafted by ART's FGSM on the same weights: the white-box examples of fgsm_art.
    assert m["transfer/fgsm/accuracy_eps_0.3"] == pytest.approx(m["fgsm_art/accuracy_eps_0.3"])


def softmax_variants(model: keras.Model) -> dict[str, keras.Model]:
    """The same network ending in a Softmax layer, and with its last Dense made softmax."""
    layer = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))
    config = model.get_config()
    config["layers"][-1]["config"]["activation"] = "softmax"
    dense = keras.Sequential.from_config(config)
    dense.set_weights(model.get_weights())
    return {"layer": layer, "dense": dense}


def test_separable_softmax_is_evaluated_on_the_logits(trained_model, small_mnist) -> None:
    from art_study.model_source import ModelSource, to_logits

    x = small_mnist.x_test[:64]
    logits = trained_model.predict(x, verbose=0)
    for kind, model in softmax_variants(trained_model).items():
        src = ModelSource(kind, "file", kind, Path(kind), "0" * 64)
        prepared = to_logits(model, src, x)
        assert prepared.output == "softmax_removed", kind
        assert np.allclose(prepared.model.predict(x, verbose=0), logits, atol=1e-5), kind
    assert to_logits(trained_model, src, x).output == "logits"


def test_inseparable_softmax_is_evaluated_with_a_warning(trained_model, small_mnist) -> None:
    """A softmax that is not the last layer cannot be taken off: the model is evaluated as
    is, with a warning and the tag that gradient attacks are weakened."""
    from art_study.model_source import ModelSource, to_logits

    wrapped = keras.Model(trained_model.inputs, keras.layers.Rescaling(1.0)(
        keras.layers.Softmax()(trained_model.outputs[0])))
    src = ModelSource("probs.keras", "file", "/m/probs.keras", Path("probs.keras"), "0" * 64)
    prepared = to_logits(wrapped, src, small_mnist.x_test[:64])
    assert prepared.model is wrapped and prepared.output == "probabilities"
    assert prepared.tags()["gradient_attacks_weakened"] == "true"
    assert "gradient-based attacks are weakened" in prepared.warnings[0]


def small_model(input_shape: tuple, *first: keras.layers.Layer) -> keras.Model:
    return keras.Sequential([keras.Input(input_shape), *first, keras.layers.Flatten(),
                             keras.layers.Dense(10)])


@keras.saving.register_keras_serializable(package="planted")
class Planted(keras.layers.Layer):
    def call(self, x):
        return x


def planted_cases(tmp_path: Path, trained_model: keras.Model) -> dict[str, tuple[str, str]]:
    """name → (MODEL argument, text the one-line error must contain)."""
    cases: dict[str, tuple[str, str]] = {}

    def save(name: str, model: keras.Model, suffix: str = ".keras") -> str:
        path = tmp_path / f"{name}{suffix}"
        model.save(path)
        return str(path)

    cases["no channel axis"] = (save("hw", small_model((28, 28))), "shape (28, 28)")
    cases["colour 32x32"] = (save("rgb", small_model((32, 32, 3))), "shape (32, 32, 3)")
    cases["5 classes"] = (save("five", keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])), "(5,)")
    cases["pixels 0-255"] = (save("bytes", keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255), trained_model])),
        "pixels [0, 255]")
    cases["lambda"] = (save("lambda", small_model((28, 28, 1), keras.layers.Lambda(
        lambda x: x * 2))), "--unsafe-load")
    cases["lambda h5"] = (save("lambda", small_model((28, 28, 1), keras.layers.Lambda(
        lambda x: x * 2)), ".h5"), "--unsafe-load")
    custom = save("custom", small_model((28, 28, 1), Planted()))
    cases["custom layer"] = (custom, "planted>Planted")
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    cases["text as .keras"] = (str(text), "not a zip archive")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 64)
    cases["junk .h5"] = (str(junk), "not an HDF5 file")
    other = tmp_path / "weights.npy"
    np.save(other, np.zeros(3))
    cases["other suffix"] = (str(other), "not a Keras model file")
    cases["missing file"] = (str(tmp_path / "gone.keras"), "not found")
    cases["unknown run id"] = ("0123456789abcdef0123456789abcdef", "no run 0123456789abcdef")
    cases["unknown registered model"] = ("models:/nobody/1", "cannot fetch the model")
    cases["no such form"] = ("my-model", "not a model file, an MLflow model URI")
    return cases


def test_planted_models_each_give_one_line(tmp_path, tracking_uri, mnist_dir, trained_model,
                                           capsys) -> None:
    config = write_config(tmp_path)
    cases = planted_cases(tmp_path, trained_model)
    keras.saving.get_custom_objects().pop("planted>Planted")  # as in a fresh process
    from art_study.tracking import prepare_store

    prepare_store(tracking_uri, "art-study")  # a store exists: run ids are looked up in it
    capsys.readouterr()
    for name, (model, needle) in cases.items():
        code = evaluate(model, config, tracking_uri, mnist_dir)
        err = assert_one_line_error(capsys, code, needle)
        assert "Traceback" not in err, name
        assert_nothing_left_running(tracking_uri)


def test_unsafe_load_is_explicit(tmp_path, trained_model) -> None:
    from art_study.model_source import ModelError, load, local_file

    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Lambda(lambda x: x),
                      trained_model]).save(path)
    source = local_file(path, str(path), "file", str(path))
    with pytest.raises(ModelError, match="unsafe-load"):
        load(source)
    assert load(source, unsafe=True).output_shape == (None, 10)


def test_unreachable_store_and_missing_store(tmp_path, mnist_dir, model_file, capsys,
                                             monkeypatch) -> None:
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = write_config(tmp_path)
    secret = f"http://alice:s3cret@127.0.0.1:{port}"  # credentials are never shown
    code = evaluate(str(model_file), config, secret, mnist_dir)
    assert "s3cret" not in assert_one_line_error(capsys, code, f"127.0.0.1:{port}")
    code = main(["runs", "--tracking-uri", secret])
    assert "s3cret" not in assert_one_line_error(capsys, code, f"127.0.0.1:{port}")

    missing = tmp_path / "none" / "mlflow.db"
    code = evaluate("0123456789abcdef0123456789abcdef", config, f"sqlite:///{missing}",
                    mnist_dir)
    assert_one_line_error(capsys, code, "no MLflow store")
    code = main(["runs", "--tracking-uri", f"sqlite:///{missing}"])
    assert_one_line_error(capsys, code, "no MLflow store")
    assert not missing.parent.exists()  # reading never creates a store


def test_failure_during_the_evaluation_ends_the_run_failed(tmp_path, tracking_uri, mnist_dir,
                                                           model_file, monkeypatch) -> None:
    import art_study.evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure in the attacks")

    monkeypatch.setattr(art_study.evaluation, "evaluate", broken)
    with pytest.raises(RuntimeError, match="planted"):
        evaluate(str(model_file), write_config(tmp_path), tracking_uri, mnist_dir)
    runs = all_runs(tracking_uri)
    assert list(runs.status) == ["FAILED"]
    assert "planted failure" in runs["tags.failure_reason"].iloc[0]


@pytest.mark.parametrize(("square", "verdict"), [(0.892, "UNRELIABLE"), (0.904, "not flagged")])
def test_summary_prints_autoattacks_verdict_apart_from_the_masking_checks(square, verdict) -> None:
    """The tags diagnostics writes for a cascade whose Square broke 13 of 1 000 images after the
    white-box components (AutoAttack's check fires) or 1 (it does not), and a model whose
    outputs are probabilities (AutoAttack's warning): each on its own line."""
    from types import SimpleNamespace

    from art_study.diagnostics import Check, Diagnosis, output_check, square_checks
    from art_study.evaluate_model import EvaluateOnly, summary

    table = {"apgd-ce": 0.913, "apgd-t": 0.905, "fab-t": 0.905, "square": square}
    diagnosis = Diagnosis([Check("falls_to_chance", True, "PGD at ε 0.5 leaves 0 %")],
                          [square_checks({"autoattack-standard": {0.3: table}}),
                           output_check(np.full((4, 10), 0.1, np.float32))])
    prepared = SimpleNamespace(source=SimpleNamespace(uri="m.keras", sha256="0" * 64),
                               output="logits")
    metrics = {"clean/accuracy": 0.99, "eval/n_images": 1000.0,
               "attack/autoattack-standard/accuracy_eps_0.3": square}
    lines = summary(EvaluateOnly("r", "sqlite:///x", prepared, metrics,
                                 diagnosis.tags())).splitlines()
    masking = next(x for x in lines if x.startswith("gradient masking"))
    assert masking == "gradient masking: not suspected (passed: falls_to_chance)"
    aa = [x for x in lines if x.startswith("AutoAttack's Square check")]
    assert len(aa) == 1
    assert aa[0].startswith(f"AutoAttack's Square check: evaluation {verdict} "
                            "(autoattack-standard at ε 0.3: ")
    assert ("after Square 89.2%" in aa[0]) == (verdict == "UNRELIABLE")
    assert sum(x.startswith("AutoAttack warnings: autoattack_output_not_probability")
               for x in lines) == 1


def test_autoattack_of_an_evaluation_resumes_from_the_stores_checkpoints(tmp_path, mnist_dir,
                                                                          model_file) -> None:
    """``art-study evaluate`` saves AutoAttack's finished chunks beside the stage cache of its
    store; the same command run again loads them and logs the same figures."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "aa.yaml"
    config.write_text(yaml.safe_dump({
        "name": "aa", "data": TINY_DATA, "evaluation": {
            "eps": [0.1], "batch_size": 100, "diagnostics": {"enabled": False},
            "attacks": [{"name": "autoattack-standard", "eps": [0.1], "n_images": 30,
                         "args": {"max_iter": 3, "n_target_classes": 2, "n_queries": 10}}]}}))
    assert evaluate(str(model_file), config, uri, mnist_dir) == 0
    saved = sorted((tmp_path / "stage-cache" / "checkpoints").glob("*/*.npz"))
    assert saved, "no checkpoint beside the store's stage cache"
    first = latest_run(uri)
    stamps = [p.stat().st_mtime_ns for p in saved]

    assert evaluate(str(model_file), config, uri, mnist_dir) == 0
    second = latest_run(uri)
    assert second.info.run_id != first.info.run_id
    assert sorted((tmp_path / "stage-cache" / "checkpoints").glob("*/*.npz")) == saved
    assert [p.stat().st_mtime_ns for p in saved] == stamps  # read, not written again
    name = "attack/autoattack-standard/apgd-t/time_s_eps_0.1"
    assert second.data.metrics[name] == first.data.metrics[name]  # the chunk's recorded time
    assert evaluation_metrics(second.data.metrics) == evaluation_metrics(first.data.metrics)
