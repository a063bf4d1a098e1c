"""A study on a multi-node Ray cluster whose nodes share only the S3 bucket (the stage cache):
two ``ray start`` nodes of 1 CPU each on this machine (``tests/ray_nodes.py``), the driver
``art-study run --backend ray --address`` in a process of its own, the cache only on the
SeaweedFS server of ``tests/s3_server.py``. The nodes run without this checkout on their path:
art-study reaches them from the driver (Ray's ``runtime_env``), as on machines of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from art_study.config import load_config
from art_study.study import run_study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# As tests/test_ray_backend.py: two runs sharing their gradient-masking stage (3 distinct
# stages: two of them can run at once, one on each node), without transfer attacks.
SLICE = ("study.blocks=[{depths: [2], sequences: [[gradient_masking, distillation], "
         "[gradient_masking, adversarial_training]]}]", "evaluation.transfer=[]",
         "tracking.log_model=false")


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric but wall times and throughputs."""
    return {k: v for k, v in metrics.items() if "time" not in k and "per_s" not in k}


def children(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("art-study")
    return [r for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def node_env(s3_server) -> dict[str, str]:
    """A node's environment: the S3 endpoint and credentials, Ray's token authentication (the
    nodes listen beyond loopback), no usage statistics, and not this checkout on the path."""
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RAY_ADDRESS") and not k.startswith("MLFLOW_")}
    return {**env, **s3_server.env(), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": generate_new_authentication_token(),
            "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def cluster(node_env):
    """A head and one worker node, 1 CPU each; killed after the module, every process checked
    gone."""
    from ray_nodes import start_cluster

    started = time.time()
    nodes = start_cluster(node_env, workers=1)
    print(f"2-node Ray cluster up in {time.time() - started:.0f} s at {nodes.address}")
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, mnist_dir) -> dict[str, dict[str, float]]:
    """The slice run in this process with a local cache: each run's metrics by run key."""
    tmp = tmp_path_factory.mktemp("in-process")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_study(load_config(TINY, [f"tracking.uri={uri}", f"data.dir={mnist_dir}", *SLICE]),
              progress=False)
    return {k.data.tags["run_key"]: comparable(k.data.metrics) for k in children(uri)}


RUN = "import sys; from art_study.cli import main; sys.exit(main())"


def driver(cluster, tmp: Path, mnist_dir: Path, cache_uri: str, sets=SLICE) -> list[str]:
    """``art-study run`` of a tiny study on the cluster: the arguments after the program."""
    return ["run", str(TINY), "--backend", "ray", "--address", cluster.address,
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            *[a for s in (f"data.dir={mnist_dir}", f"study.cache_dir={cache_uri}", *sets)
              for a in ("--set", s)]]


def driver_env(node_env) -> dict[str, str]:
    return {**node_env, "PYTHONPATH": str(REPO)}


def check_study(tmp: Path, in_process: dict, s3_server, prefix: str) -> None:
    """Every run FINISHED once, with the in-process run's metrics; the stages in the bucket and
    nowhere on disk."""
    kids = children(f"sqlite:///{tmp / 'mlflow.db'}")
    assert all(k.info.status == "FINISHED" for k in kids)
    by_key = {k.data.tags["run_key"]: k for k in kids}
    assert len(by_key) == len(kids) == 2 and by_key.keys() == in_process.keys()
    for key, kid in by_key.items():
        assert len(comparable(kid.data.metrics)) > 15
        assert comparable(kid.data.metrics) == in_process[key], kid.data.tags["sequence"]
    stage_keys = {kid.data.tags[f"stage{i}.key"] for kid in kids for i in (1, 2)}
    assert len(stage_keys) == 3
    objects = s3_server.objects(prefix)
    for key in stage_keys:
        mine = [o for o in objects if f"/{key}/" in o]
        assert len(mine) == 2 and any(o.endswith("/stage.json") for o in mine), mine
    assert not (tmp / "stage-cache").exists() and not (tmp / "mlruns").exists()


def test_a_study_on_two_nodes_sharing_only_a_bucket(tmp_path, mnist_dir, s3_server, node_env,
                                                    cluster, in_process) -> None:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    started = time.time()
    done = subprocess.run([sys.executable, "-c", RUN, *driver(
                              cluster, tmp_path, mnist_dir, f"s3://{s3_server.bucket}/{prefix}")],
                          env=driver_env(node_env), cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    print(f"study on 2 nodes: {time.time() - started:.0f} s\n{done.stdout}")
    assert done.returncode == 0, done.stderr[-3000:]
    check_study(tmp_path, in_process, s3_server, prefix)
    # Both nodes ran tasks, and each got art-study from the driver, not from a path.
    for node in cluster.nodes:
        logs = "".join(p.read_text(errors="replace") for p in
                       node.temp_dir.glob("session_latest/logs/worker-*.out"))
        assert ":task_name:stage:" in logs or ":task_name:evaluate:" in logs, node.temp_dir
        shipped = list(node.temp_dir.glob(
            "session_latest/runtime_resources/py_modules_files/*/art_study/study/"
            "object_cache.py"))
        assert shipped, f"no art-study shipped to {node.temp_dir}"


# The driver, told once that a stage is in the cache when it is not (as if it vanished between
# the driver's look and a worker's: pruned, or evicted by another reader), submits no task for
# it; whoever needs it next finds it missing.
VANISHED = """
import sys
from art_study import cli
from art_study.study.object_cache import ObjectStageCache
gone, has = set(sys.argv.pop(1).split(",")), ObjectStageCache.has
def has_once(self, key):
    if key in gone:
        gone.discard(key)
        return True
    return has(self, key)
ObjectStageCache.has = has_once
sys.exit(cli.main())
"""


def test_a_stage_missing_where_it_is_needed_fails_its_run_and_a_rerun_resumes(
        tmp_path, mnist_dir, s3_server, node_env, cluster) -> None:
    from art_study.study.execute import load_data
    from art_study.study.plan import plan_runs

    control = ("study.blocks=[{depths: [2], sequences: [control]}]", "evaluation.transfer=[]",
               "evaluation.diagnostics.enabled=false", "tracking.log_model=false")
    cfg = load_config(TINY, [f"data.dir={mnist_dir}", *control])
    (spec,) = plan_runs(cfg, {0: load_data(cfg, [0])[0].fingerprint})
    last = spec.stages[-1].key
    uri = f"s3://{s3_server.bucket}/vanished-{uuid.uuid4().hex[:8]}"
    cmd = driver(cluster, tmp_path, mnist_dir, uri, control)

    failed = subprocess.run([sys.executable, "-c", VANISHED, last, *cmd],
                            env=driver_env(node_env), cwd=tmp_path, capture_output=True,
                            text=True, timeout=1200)
    err = failed.stderr.strip().splitlines()[-1]
    print(f"first invocation: exit {failed.returncode}: {err}")
    assert failed.returncode == 1
    assert err.startswith("art-study: error: 1 of 1 runs failed (first: ")
    assert f"stage {last[:12]} is missing from the stage cache {uri} on " in err
    assert "rerun to retrain it" in err and err.endswith("rerun the same command to retry them")
    (kid,) = children(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert kid.info.status == "FAILED"

    again = subprocess.run([sys.executable, "-c", RUN, *cmd], env=driver_env(node_env),
                           cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    print(f"rerun: exit {again.returncode}: {again.stdout.strip().splitlines()[:1]}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 runs (0 already finished), 1 stages trained, 1 reused" in again.stdout
    (kid,) = children(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert kid.info.status == "FINISHED" and kid.data.tags["stage2.key"] == last


def test_a_worker_node_killed_mid_stage(tmp_path, mnist_dir, s3_server, node_env, cluster,
                                        in_process) -> None:
    """SIGKILL the worker node (its raylet and workers) while it trains a stage: Ray runs the
    task again on the head, and the study finishes with every run present once."""
    from ray_nodes import task_title

    worker = cluster.nodes[1]
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-c", RUN,
           *driver(cluster, tmp_path, mnist_dir, f"s3://{s3_server.bucket}/{prefix}")]
    log = (tmp_path / "driver.log").open("w+")
    proc = subprocess.Popen(cmd, env=driver_env(node_env), cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    killed = ""
    deadline = time.time() + 900
    while not killed and proc.poll() is None and time.time() < deadline:
        titles = [task_title(pid) for pid in worker.processes()]
        stage = next((t for t in titles if t.startswith("ray::stage:")), "")
        if stage:
            time.sleep(2)  # into its training
            worker.kill()
            killed = stage
        time.sleep(0.1)
    assert killed, "no stage ran on the worker node"
    code = proc.wait(timeout=1200)
    log.seek(0)
    output = log.read()
    print(f"killed the worker node during {killed}; driver exit {code}\n{output[-2000:]}")
    if code != 0:  # the task was not retried in time: a rerun resumes the study
        again = subprocess.run(cmd, env=driver_env(node_env), cwd=tmp_path,
                               capture_output=True, text=True, timeout=1200)
        print(f"rerun exit {again.returncode}")
        assert again.returncode == 0, again.stderr[-3000:]
    check_study(tmp_path, in_process, s3_server, prefix)
    assert worker.proc.poll() is not None
