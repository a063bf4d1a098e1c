"""The Ray backend: the same study, seed for seed, on a local Ray cluster; worker deaths retried."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlflow

from art_study import cli
from art_study.config import load_config
from art_study.study import run_study
from art_study.study.ray_backend import RayOptions

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# A slice of the tiny study: two pairs sharing their gradient-masking stage, so every defense,
# a hand-off and a shared stage are in it (2 runs, 3 distinct stages); without the control,
# so without transfer attacks (crafted on it).
SLICE = ("study.blocks=[{depths: [2], sequences: [[gradient_masking, distillation], "
         "[gradient_masking, adversarial_training]]}]", "evaluation.transfer=[]")


def tiny(tmp: Path, mnist_dir: Path, *overrides: str):
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, load_config(TINY, [f"tracking.uri={uri}", f"data.dir={mnist_dir}", *overrides])


def children(uri: str, parent: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("art-study")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric but wall times and throughputs."""
    return {k: v for k, v in metrics.items() if "time" not in k and "per_s" not in k}


def test_ray_gives_the_same_runs_and_metrics_as_in_process(tmp_path, mnist_dir, ray_cluster,
                                                           monkeypatch) -> None:
    uri_local, cfg_local = tiny(tmp_path / "local", mnist_dir, *SLICE, "tracking.log_model=false")
    local = run_study(cfg_local, progress=False)

    # On Ray the driver only logs: a stage or an evaluation computed here would fail the study.
    from art_study.study import local_backend as execute

    def not_here(*args, **kwargs):
        raise AssertionError("the driver computed what a Ray task should")

    monkeypatch.setattr(execute, "train_stage", not_here)
    monkeypatch.setattr(execute, "evaluate_run", not_here)
    uri_ray, cfg_ray = tiny(tmp_path / "ray", mnist_dir, *SLICE, "tracking.log_model=false")
    on_ray = run_study(cfg_ray, progress=False, ray_options=RayOptions())

    assert (on_ray.stages_trained, on_ray.stages_reused) == (local.stages_trained,
                                                            local.stages_reused) == (3, 1)
    runs = {}
    for name, uri, result in (("local", uri_local, local), ("ray", uri_ray, on_ray)):
        kids = children(uri, result.parent_run_id)
        assert all(k.info.status == "FINISHED" for k in kids)
        runs[name] = {k.data.tags["run_key"]: k for k in kids}
        assert len(runs[name]) == len(kids) == 2
    assert runs["ray"].keys() == runs["local"].keys()
    client_local, client_ray = mlflow.MlflowClient(uri_local), mlflow.MlflowClient(uri_ray)
    for key, a in runs["local"].items():
        b = runs["ray"][key]
        for tag in ("sequence", "stages", "depth", "seed", "data.fingerprint"):
            assert a.data.tags[tag] == b.data.tags[tag]
        assert len(comparable(a.data.metrics)) > 15
        assert comparable(a.data.metrics) == comparable(b.data.metrics), a.data.tags["sequence"]
        # Per-epoch curves too, at the same steps (the driver replays each stage's record).
        for metric in ("train/loss", "train/accuracy"):
            hist = [[(m.step, m.value) for m in c.get_metric_history(r.info.run_id, metric)]
                    for c, r in ((client_local, a), (client_ray, b))]
            assert hist[0] == hist[1] and len(hist[0]) == 2


def test_runs_are_submitted_in_plan_order_a_window_ahead(tmp_path, mnist_dir,
                                                          ray_cluster) -> None:
    """Ray queues a task when its inputs are ready, so submitting a whole study at once let its
    last runs' parentless stages overtake its first runs' evaluations (the robust study trained
    depth 3 while depth 2 waited to be evaluated). Runs go in plan order instead, at most
    ``lookahead`` (two per task slot: 4 on 2 CPUs) ahead of the run being logged."""
    from art_study.study.cache import StageCache
    from art_study.study.execute import load_data
    from art_study.study.plan import plan_runs
    from art_study.study.ray_backend import RayExecutor

    _, cfg = tiny(tmp_path, mnist_dir)
    data = load_data(cfg, [0])
    runs = plan_runs(cfg, {0: data[0].fingerprint})
    assert len(runs) == 10
    executor = RayExecutor(cfg, data, StageCache(tmp_path / "cache"), False, RayOptions())
    submitted: list[str] = []

    def record(spec) -> None:  # what _submit_run does to the bookkeeping, without the tasks
        submitted.append(spec.key)
        executor._eval_refs[spec.key] = spec.key

    executor._submit_run = record
    try:
        assert executor.lookahead == 4
        executor.start(runs)
        assert submitted == [r.key for r in runs[:4]]
        executor._advance(runs[0])  # logging the first run submits nothing more
        assert len(submitted) == 4
        executor._advance(runs[3])
        assert submitted == [r.key for r in runs[:7]]
        executor._advance(runs[8])  # a run not yet submitted: everything up to it, then ahead
        assert submitted == [r.key for r in runs]
    finally:
        executor.close()


def test_killed_worker_is_retried(tmp_path, mnist_dir, ray_cluster) -> None:
    """SIGKILL the worker process training the first stage: Ray runs that task again, in
    another worker process (its second attempt), and the study ends with its run present once
    and FINISHED."""
    uri, cfg = tiny(tmp_path, mnist_dir, "tracking.log_model=false",
                    "evaluation.diagnostics.enabled=false",
                    "study.blocks=[{depths: [2], sequences: [control]}]")
    killed: list[tuple[int, str]] = []
    seen: set[tuple[int, str]] = set()  # every (worker pid, stage task) seen running
    stop = threading.Event()

    def kill_first_stage_worker() -> None:
        while not stop.is_set():
            for pid, title in stage_workers():
                seen.add((pid, title))
                if not killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, title))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_stage_worker, daemon=True)
    killer.start()
    try:
        result = run_study(cfg, progress=False, ray_options=RayOptions(max_retries=2))
    finally:
        stop.set()
        killer.join()
    assert killed, "no stage task was seen running"
    (dead, task), = killed
    retries = {pid for pid, title in seen if title == task and pid != dead}
    assert retries, f"{task} never ran again after its worker {dead} was killed"
    assert result.stages_trained == 2
    kids = children(uri, result.parent_run_id)
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert kids[0].data.tags["sequence"] == "none"


def stage_workers() -> list[tuple[int, str]]:
    """This test's Ray worker processes executing a stage task (Ray titles them
    ``ray::<task name>``): descendants of this process only, which started the test cluster, so
    a study running on the same machine in its own Ray instance is never touched (this test
    once killed one's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::stage:") and descends_from(int(entry.name), os.getpid()):
            found.append((int(entry.name), title))
    return found


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid``'s parent, grandparent, ... (from ``/proc/<pid>/stat``)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the ppid
        if pid == ancestor:
            return True
    return False


def test_missing_ray_is_one_line_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    db = tmp_path / "mlflow.db"
    code = cli.main(["run", str(TINY), "--backend", "ray", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("art-study: error: --backend ray needs Ray") and "\n" not in err
    assert "pip install -e '.[ray]'" in err
    assert not db.exists()  # failed before touching the store


def test_address_without_ray_backend_is_refused(tmp_path, capsys) -> None:
    db = tmp_path / "mlflow.db"
    code = cli.main(["run", str(TINY), "--address", "auto", "--tracking-uri", f"sqlite:///{db}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--address, --cpus-per-task and --gpus-per-task need --backend ray" in err
    assert not db.exists()


def test_a_stage_missing_from_a_nodes_cache_fails_with_its_message(tmp_path, mnist_dir) -> None:
    """A node whose stage cache is not the driver's (study.cache_dir not shared) finds no
    parent stage to hand off from and no final stage to evaluate: each task says which stage
    is missing where, and what to share, instead of training from nothing or a traceback."""
    import pytest

    from art_study.errors import ArtStudyError
    from art_study.study import plan_runs
    from art_study.study.ray_backend import _evaluate_task, _stage_task

    _, cfg = tiny(tmp_path, mnist_dir, *SLICE)
    spec = plan_runs(cfg, {0: "data-0"})[0]
    empty = str(tmp_path / "node-cache")
    for key, call in (
            (spec.stages[0].key, lambda: _stage_task(spec.stages[1], spec.config, None, empty,
                                                     None, True)),
            (spec.stages[-1].key, lambda: _evaluate_task(spec, None, empty, None, None, True))):
        with pytest.raises(ArtStudyError) as exc:
            call()
        msg = str(exc.value)
        assert msg.startswith(f"stage {key[:12]} is missing from the stage cache {empty} on "
                              "worker ") and "\n" not in msg
        assert "must be shared by the driver and every Ray node" in msg


def test_cpus_per_task_caps_tensorflows_threads() -> None:
    """--cpus-per-task N gives each task's TensorFlow N threads (set before its runtime
    starts, in a fresh worker process), not one per core of the node."""
    import subprocess

    code = ("from art_study.study.ray_backend import _limit_threads\n"
            "_limit_threads(1)\n"
            "import tensorflow as tf\n"
            "tf.reduce_sum(tf.ones([4]))\n"
            "t = tf.config.threading\n"
            "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.stdout.split() == ["1", "1"]
    parsed = cli.build_parser().parse_args(["run", str(TINY), "--backend", "ray",
                                            "--cpus-per-task", "1"])
    assert parsed.cpus_per_task == 1
