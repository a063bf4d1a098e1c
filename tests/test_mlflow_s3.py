"""The whole shared setup without a shared disk: an MLflow server on PostgreSQL whose artifacts
live in the S3 bucket (``--artifacts-destination s3://…``, the SeaweedFS of
``tests/s3_server.py``), and the stage cache in the same bucket. A study logs through the server;
its model loads back from ``runs:/…/model``, read from the bucket through the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_mlflow_server import free_port, postgres_uri  # noqa: F401 (a fixture)

from art_study.config import load_config
from art_study.data import load_mnist
from art_study.models import predict_labels
from art_study.study import run_study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def mlflow_s3_server(postgres_uri, s3_server, tmp_path_factory):  # noqa: F811
    """``mlflow server`` on the PostgreSQL store, its artifacts under ``s3://BUCKET/artifacts``
    (boto3 with MLFLOW_S3_ENDPOINT_URL and the bucket's credentials, in the server's
    environment only)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("mlflow-s3") / "mlflow-server.log").open("w")
    env = {**os.environ, **s3_server.env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
         "--artifacts-destination", f"s3://{s3_server.bucket}/artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow server exited; see " + log.name
            assert time.time() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # its workers linger on open connections
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def test_a_study_logs_through_the_server_its_models_in_the_bucket(mnist_dir, s3,
                                                                   mlflow_s3_server,
                                                                   monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache = f"s3://{s3.bucket}/stages-{uuid.uuid4().hex[:8]}"
    cfg = load_config(TINY, [f"tracking.uri={mlflow_s3_server}", f"data.dir={mnist_dir}",
                             f"study.cache_dir={cache}",
                             "study.blocks=[{depths: [2], sequences: [control]}]",
                             "evaluation.transfer=[]", "evaluation.diagnostics.enabled=false"])
    result = run_study(cfg, progress=False)
    client = mlflow.MlflowClient(mlflow_s3_server)
    (kid,) = [r.run_id for r in result.runs]
    run = client.get_run(kid)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server

    # The model is in the bucket, and loads back through the server.
    artifacts = s3.objects("artifacts")
    assert any(o.endswith(".keras") or o.endswith("MLmodel") for o in artifacts), artifacts
    assert any(kid in o for o in artifacts)
    model = mlflow.keras.load_model(f"runs:/{kid}/model")
    test = load_mnist(mnist_dir, n_train=cfg.data.n_train, n_test=cfg.data.n_test, seed=0)
    accuracy = float(np.mean(predict_labels(model, test.x_test) == test.y_test))
    assert accuracy == run.data.metrics["clean/accuracy"]
    # The stages went to the same bucket, named by the run.
    for i in (1, 2):
        assert any(f"/{run.data.tags[f'stage{i}.key']}/stage.json" in o
                   for o in s3.objects(cache.split("/", 3)[3]))
