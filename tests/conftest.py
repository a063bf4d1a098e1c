"""Shared fixtures: real MNIST from ../shared/data/mnist, a throw-away MLflow store per test."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*PyTorch not found.*")

# TensorFlow and ART imported together, before any test swaps sys.stderr: absl's log handler
# keeps the sys.stderr of TensorFlow's import, and ART's import (logging.config.dictConfig)
# closes every existing handler; absl closes its stream unless it is the current sys.stderr.
# Imported in different tests, that closed pytest's capture of the first one ("I/O operation on
# closed file", seen with test_cli.py's smoke test followed by an in-process CLI test).
import art  # noqa: E402, F401
import tensorflow  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(
    os.environ.get("ART_STUDY_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist")
)


def pytest_configure(config: pytest.Config) -> None:
    if not SHARED_MNIST.is_dir():
        raise pytest.UsageError(
            f"canonical MNIST not found at {SHARED_MNIST}; set ART_STUDY_TEST_MNIST"
        )


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The canonical IDX files (read-only)."""
    return SHARED_MNIST


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store for one test, also exported as MLFLOW_TRACKING_URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away store for a module's stage tests, with an experiment of its own (the
    experiment an earlier test made active lives in another store)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db")
    mlflow.set_experiment("stage-tests")
    yield
    mlflow.set_tracking_uri(previous)
    # The active experiment's id belongs to this store; a later test in another store must
    # not inherit it ("No Experiment with id=1 exists").
    mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture
def run(mlflow_store):
    """An active MLflow run in that store (a stage logs its epochs to the active run)."""
    import mlflow

    with mlflow.start_run() as active:
        yield active


@pytest.fixture(scope="session")
def small_mnist(mnist_dir: Path):
    """A stratified slice: 1000 train / 300 test images."""
    from art_study.data import load_mnist

    return load_mnist(mnist_dir, n_train=1000, n_test=300, seed=0)


@pytest.fixture(scope="session")
def trained_model(small_mnist):
    """A 2-conv paper CNN trained 2 epochs on the slice (shared by read-only tests)."""
    import keras

    from art_study.config import ModelConfig, TrainConfig
    from art_study.models import build_cnn, compile_model, one_hot

    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=2)), TrainConfig(batch_size=64))
    model.fit(small_mnist.x_train, one_hot(small_mnist.y_train), epochs=2, batch_size=64,
              verbose=0)
    return model


@pytest.fixture
def mlflow_ui():
    """Start ``art-study ui`` for a store on a free loopback port; stopped after the test.

    Returns ``start(uri) -> (address line printed by the command, base URL, experiment names)``,
    once the server answers the MLflow REST API.
    """
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    procs: list[subprocess.Popen] = []

    def start(uri: str, timeout_s: float = 180) -> tuple[str, str, list[str]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = Path(sys.executable).with_name("art-study")
        proc = subprocess.Popen([str(exe), "ui", "--port", str(port), "--tracking-uri", uri],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        procs.append(proc)
        first = proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout_s
        while True:
            try:
                url = f"{base}/api/2.0/mlflow/experiments/search?max_results=10"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return first, base, [e["name"] for e in json.load(resp)["experiments"]]
            except OSError:
                assert proc.poll() is None, "the UI server exited"
                assert time.time() < deadline, f"the UI did not answer within {timeout_s} s"
                time.sleep(1)

    yield start
    # Cleanup only: that SIGTERM stops the server and its workers is test_ui_server's to assert.
    # Under load (a study beside CI) the stop has taken over 30 s, so it gets 60, then SIGKILL.
    from art_study.ui_server import stop_group

    for proc in procs:
        stop_group(proc, timeout_s=60)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs on loopback, shared by the Ray tests; shut down after.

    Ray is a test dependency (the ``ray`` extra, which ``make test`` installs): without it these
    tests fail with ImportError rather than skip.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS's ``weed mini`` on loopback, ``tests/s3_server.py``) with a
    bucket ``art-study``, for the whole session; killed after, its ports checked free."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The S3 server, with its endpoint and credentials in this test's environment (where
    art-study and any AWS client read them)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def settling_cnn(cfg=None, name: str | None = None):
    """The paper's CNN (2 conv unless ``cfg`` says otherwise) with BatchNorm momentum 0.9:
    Keras' 0.99 needs hundreds of steps before the running statistics, and so inference-mode
    accuracy, are usable; the tests train on slices of a few hundred images."""
    import keras

    from art_study.config import ModelConfig
    from art_study.models import build_cnn

    model = build_cnn(cfg if cfg is not None else ModelConfig(n_conv=2), name=name)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def fresh_cnn(seed: int, train=None):
    """``settling_cnn`` seeded with ``seed`` and compiled (batch 32 unless ``train`` says)."""
    import keras

    from art_study.config import TrainConfig
    from art_study.models import compile_model

    keras.utils.set_random_seed(seed)
    return compile_model(settling_cnn(), train if train is not None else TrainConfig(batch_size=32))


def briefly_trained_cnn(data, epochs: int):
    """``fresh_cnn(1)`` trained ``epochs`` epochs on ``data`` (a small slice)."""
    from art_study.models import one_hot

    m = fresh_cnn(1)
    m.fit(data.x_train, one_hot(data.y_train), epochs=epochs, batch_size=32, verbose=0)
    return m
