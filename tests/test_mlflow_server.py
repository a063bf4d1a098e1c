"""A study on Ray logging to an MLflow tracking server backed by PostgreSQL, resume included.

The test starts its own services on loopback and stops them: a throw-away PostgreSQL cluster
(Debian's ``postgresql``: ``initdb`` + ``pg_ctl`` in a temp dir, on a free port) and an
``mlflow server`` on it, with a local directory as artifact destination (served by the server).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from art_study.config import load_config
from art_study.study import run_study
from art_study.study.ray_backend import RayOptions
from art_study.ui_server import stop_group

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SEQUENCES = ["none", "none>gradient_masking"]  # sharing their first stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs: on PATH, or Debian's versioned one."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if not dirs:
        pytest.fail("PostgreSQL server programs not found: apt-get install postgresql")
    return Path(dirs[-1])


@pytest.fixture(scope="module")
def postgres_uri():
    """A PostgreSQL cluster in a temp dir on 127.0.0.1, trust auth, database ``mlflow``."""
    bindir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="art-study-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        name = "postgres" if _user_exists("postgres") else "nobody"
        entry = pwd.getpwnam(name)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([str(bindir / args[0]), *args[1:]], check=True, capture_output=True,
                       cwd=root, **as_user)

    run("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    run("pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "120", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def serving_mlflow(postgres_uri: str, artifacts: str, log_path: Path,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` on the PostgreSQL store with ``--artifacts-destination artifacts``, on
    a free loopback port, until it answers ``/health``; its base URL while the block runs, then
    stopped (SIGTERM, SIGKILL after 10 s: its workers linger on open connections)."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
             "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # no job runner (8 processes for GenAI jobs a study never runs), as `art-study ui`
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or os.environ)})
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
                assert proc.poll() is None, f"mlflow server exited; see {log_path}"
                assert time.time() < deadline, "mlflow server did not answer within 180 s"
                time.sleep(1)
            yield base
        finally:
            if proc.poll() is None:
                stop_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory):
    """``mlflow server`` on the PostgreSQL store, serving artifacts from a local directory."""
    artifacts = tmp_path_factory.mktemp("server-artifacts")
    with serving_mlflow(postgres_uri, str(artifacts), artifacts.parent / "mlflow-server.log") \
            as base:
        yield base


def children(client: mlflow.MlflowClient, parent: str) -> list:
    exp = client.get_experiment_by_name("art-study")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_ray_study_on_postgres_server_logs_each_child_once_and_resumes(
        tmp_path, mnist_dir, mlflow_server, ray_cluster, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(TINY, [f"tracking.uri={mlflow_server}", f"data.dir={mnist_dir}",
                             f"study.cache_dir={tmp_path / 'stage-cache'}",
                             "study.blocks=[{depths: [2], sequences: "
                             "[control, [none, gradient_masking]]}]",
                             "evaluation.diagnostics.enabled=false"])
    first = run_study(cfg, progress=False, ray_options=RayOptions())
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    kids = children(client, first.parent_run_id)
    assert sorted(k.data.tags["sequence"] for k in kids) == sorted(SEQUENCES)
    assert all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["run_key"] for k in kids} == {r.spec.key for r in first.runs}

    # Each child's model, read back through the server (MLflow 3 keeps it as a logged model that
    # runs:/<id>/model resolves to), is the model evaluated.
    data = first.runs[0].spec.config.data
    from art_study.data import load_mnist
    from art_study.models import predict_labels

    test = load_mnist(mnist_dir, n_train=data.n_train, n_test=data.n_test, seed=0)
    for kid in kids:
        listed = {a.path for a in client.list_artifacts(kid.info.run_id)}
        assert {"config.yaml", "eval"} <= listed
        assert not {"keras", "stages"} & listed  # stored once: the MLflow model, the cache
        assert kid.data.tags["stage1.key"] and kid.data.tags["stage2.sha256"]
        model = mlflow.keras.load_model(f"runs:/{kid.info.run_id}/model")
        accuracy = float(np.mean(predict_labels(model, test.x_test) == test.y_test))
        assert accuracy == kid.data.metrics["clean/accuracy"]

    # Resume against the server: a FAILED child is replaced, the FINISHED one skipped.
    failed = next(k for k in kids if k.data.tags["sequence"] == SEQUENCES[1])
    client.set_terminated(failed.info.run_id, "FAILED")
    again = run_study(cfg, progress=False, ray_options=RayOptions())
    assert again.parent_run_id == first.parent_run_id
    assert sorted(r.skipped for r in again.runs) == [False, True]
    assert again.stages_trained == 0
    kids = children(client, first.parent_run_id)
    assert sorted(k.data.tags["sequence"] for k in kids) == sorted(SEQUENCES)
    assert all(k.info.status == "FINISHED" for k in kids)
    assert failed.info.run_id not in {k.info.run_id for k in kids}
