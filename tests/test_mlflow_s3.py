"""The whole shared setup without a shared disk: an MLflow server on PostgreSQL whose artifacts
live in the S3 bucket (``--artifacts-destination s3://…``, the SeaweedFS of
``tests/s3_server.py``), and the stage cache in the same bucket. A study logs through the server;
its model loads back from ``runs:/…/model``, read from the bucket through the server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_mlflow_server import postgres_uri, serving_mlflow  # noqa: F401 (a fixture)

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
    env = {**os.environ, **s3_server.env()}
    log = tmp_path_factory.mktemp("mlflow-s3") / "mlflow-server.log"
    with serving_mlflow(postgres_uri, f"s3://{s3_server.bucket}/artifacts", log, env) as base:
        yield base


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
