"""Safe to share: a study is owned by one process at a time (a lease in the store),
the stage cache checks itself, no credentials are recorded, Ray listens on loopback only."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import mlflow
import numpy as np
import pytest
from mlflow.entities import ViewType

from art_study.config import ModelConfig, TrainConfig, load_config
from art_study.errors import ArtStudyError, ConfigError
from art_study.inventory import STALE, inventory
from art_study.study import lease, run_study
from art_study.study.cache import CorruptStage, StageCache, StageRecord

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def fitted():
    """A 2-conv CNN after one Adam step, so it has optimizer state to (not) save."""
    from art_study.models import build_cnn, compile_model

    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=2)), TrainConfig())
    x = np.random.default_rng(0).random((32, 28, 28, 1), dtype=np.float32)
    model.fit(x, keras.utils.to_categorical(np.arange(32) % 10, 10), epochs=1, verbose=0)
    return model


def record(key: str) -> StageRecord:
    return StageRecord(key, "none", 1, [{"loss": 1.0}], 0.5, {})


def same_weights(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


# -- the stage cache checks itself ---------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_entry_is_evicted_with_one_warning(tmp_path, fitted, caplog, damage) -> None:
    """Before: has() only looked for stage.json; a truncated file raised a raw traceback on
    every load, a flipped bit loaded silently with other weights."""
    cache = StageCache(tmp_path)
    key = "ab" + "0" * 62
    path = cache.save(fitted, record(key))
    assert cache.has(key) and same_weights(cache.load_model(key), fitted)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:  # one bit of the largest weight array (the dense kernel), in the middle of the file
        blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="art_study.study.cache"):
        assert not cache.has(key)  # evicted: the caller retrains it
    ours = [r.getMessage() for r in caplog.records if r.name == "art_study.study.cache"]
    assert len(ours) == 1 and "\n" not in ours[0] and "damaged" in ours[0]
    assert not cache.model_path(key).parent.exists()
    cache.save(fitted, record(key))  # retrained, it is a good entry again
    assert cache.has(key)


def test_damaged_entry_loaded_directly_is_one_line_error(tmp_path, fitted) -> None:
    cache = StageCache(tmp_path)
    key = "cd" + "1" * 62
    path = cache.save(fitted, record(key))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptStage, match="evicted: rerun to retrain it"):
        cache.load_model(key)
    assert not cache.has(key)


def test_planted_lambda_h5_does_not_run(tmp_path, monkeypatch) -> None:
    """CVE-2025-9905: keras < 3.11.3 ignored safe_mode for .h5, so a Lambda layer in a cache
    file ran its code on load. The cache loads with safe_mode, and keras>=3.14 applies it."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ART_STUDY_TEST_PWNED", str(marker))
    cache = StageCache(tmp_path / "cache")
    key = "ef" + "2" * 62
    inputs = keras.Input((28, 28, 1))
    out = keras.layers.Lambda(lambda x: (__import__("pathlib").Path(
        __import__("os").environ["ART_STUDY_TEST_PWNED"]).touch(), x)[1])(inputs)
    planted = keras.Model(inputs, keras.layers.Flatten()(out))
    cache.save(planted, record(key))  # an attacker also writes a matching checksum
    marker.unlink(missing_ok=True)
    with pytest.raises(CorruptStage):
        cache.load_model(key)
    assert not marker.exists()


def test_keras_floor_excludes_the_vulnerable_versions() -> None:
    """pyproject's keras floor must exclude 3.11.2 (CVE-2025-9905, fixed in 3.11.3) and the
    later .h5 advisories up to 3.14.0; the installed keras must satisfy it."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d) for d in deps if Requirement(d).name == "keras").specifier
    assert not spec.contains("3.11.2") and not spec.contains("3.13.1")
    assert spec.contains(importlib.metadata.version("keras"))


def test_cache_stores_no_optimizer_state(tmp_path, fitted) -> None:
    """Before: every entry kept Adam's slots (2/3 of the file), which no stage reads back."""
    cache = StageCache(tmp_path)
    key = "0a" + "3" * 62
    path = cache.save(fitted, record(key))
    with h5py.File(path) as f:
        assert "optimizer_weights" not in f
    legacy = tmp_path / "with_optimizer.h5"
    fitted.save(legacy)
    assert path.stat().st_size < 0.6 * legacy.stat().st_size
    assert same_weights(cache.load_model(key), fitted)


def test_entries_get_the_umask_permissions(tmp_path, fitted) -> None:
    """Before: entries came from mkdtemp (0700): another user of a shared cache got EACCES."""
    old = os.umask(0o002)
    try:
        cache = StageCache(tmp_path)
        key = "1b" + "4" * 62
        path = cache.save(fitted, record(key))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o775
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_second_writer_of_a_stage_uses_the_first_ones_entry(tmp_path, fitted, monkeypatch) -> None:
    """Two writers of one stage: the first finishes between the second's check and its rename.
    Before: the rename failed with "Directory not empty" and the run failed."""
    import art_study.study.cache as cache_mod

    cache = StageCache(tmp_path)
    key = "2c" + "5" * 62
    real_replace, synced, raced = os.replace, [], []

    refused = []  # errno of each rename refused because the entry was already there

    def replace(src, dst):
        if Path(dst).name == key and not raced:
            raced.append(True)
            first = dataclasses.replace(record(key), train_time_s=0.25)
            cache.save(fitted, first)  # the other writer, completing first
        try:
            return real_replace(src, dst)
        except OSError as exc:
            refused.append(exc.errno)
            raise

    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(cache_mod.os, "replace", replace)
    monkeypatch.setattr(cache_mod.os, "fsync", fsync)
    path = cache.save(fitted, record(key))
    assert raced and cache.has(key) and same_weights(cache.load_model(key), fitted)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    # Flushed before the rename: the model, the record, the entry and its parent directory.
    assert any(s.endswith("model.h5") for s in synced)
    assert any(".stage.json." in s for s in synced)
    assert str(path.parent.parent) in synced
    # The second writer's rename was refused (the first one's entry is not replaced under a
    # reader), the refusal handled, and the first writer's entry kept.
    assert refused == [errno.ENOTEMPTY]
    assert cache.record(key).train_time_s == 0.25


def test_entry_without_checksum_is_checked_once_then_kept(tmp_path, fitted) -> None:
    """Entries written before checksums: loaded once to check them, then given a checksum."""
    cache = StageCache(tmp_path)
    key = "3d" + "6" * 62
    path = cache.save(fitted, record(key))
    rec = json.loads((path.parent / "stage.json").read_text())
    digest = rec.pop("model_sha256")
    (path.parent / "stage.json").write_text(json.dumps(rec))
    assert cache.has(key)
    assert cache.record(key).model_sha256 == digest


@pytest.mark.parametrize("checked_first", [False, True])
def test_damaged_entry_without_checksum_is_not_trusted(tmp_path, fitted, checked_first) -> None:
    """An entry from before checksums is trusted only if it loads; once checked and given its
    checksum, a later flipped bit (which still loads) is caught by that checksum."""
    cache = StageCache(tmp_path)
    key = "4e" + "7" * 62
    path = cache.save(fitted, record(key))
    rec = json.loads((path.parent / "stage.json").read_text())
    del rec["model_sha256"]
    (path.parent / "stage.json").write_text(json.dumps(rec))
    blob = bytearray(path.read_bytes())
    if checked_first:
        assert cache.has(key)  # checked once: it loads, and now has a checksum
        blob[len(blob) // 2] ^= 0x01
    else:
        blob = blob[: len(blob) // 2]
    path.write_bytes(bytes(blob))
    assert not cache.has(key)
    assert not path.parent.exists()  # evicted, so the study retrains it


# -- a study is owned: a lease with a heartbeat on the parent run --------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store and stage cache for the study tests here (creating one costs seconds)."""
    return tmp_path_factory.mktemp("store")


def one_run_study(store: Path, mnist_dir: Path, sequences: str = "[control]"):
    """The tiny config cut to a few runs and a quick evaluation."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return load_config(TINY, [
        f"tracking.uri={uri}", f"data.dir={mnist_dir}", "data.n_train=100", "data.n_test=50",
        f"study.blocks=[{{depths: [2], sequences: {sequences}}}]", "evaluation.transfer=[]",
        "evaluation.diagnostics.enabled=false", "tracking.log_model=false"]), uri


def runs_of(parent: str, deleted: bool = False) -> list:
    client = mlflow.MlflowClient()
    exp = client.get_run(parent).info.experiment_id
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", run_view_type=view)


def pretend_another_process_runs(parent: str, heartbeat_age_s: float) -> str:
    """Make ``parent`` look held by another process (on another host) that is training a
    child now; return that live child's id."""
    client = mlflow.MlflowClient()
    client.update_run(parent, status="RUNNING")
    for k, v in {lease.OWNER: "other-owner", lease.HOST: "elsewhere", lease.PID: "4242",
                 lease.HEARTBEAT: f"{time.time() - heartbeat_age_s:.3f}"}.items():
        client.set_tag(parent, k, v)
    exp = client.get_run(parent).info.experiment_id
    return client.create_run(exp, tags={"mlflow.parentRunId": parent, "run_key": "live",
                                        "art_study.role": "run"}).info.run_id


def test_a_live_study_is_refused_and_a_stale_one_taken_over(store, mnist_dir) -> None:
    """Before: a second `run` of the same study resumed the parent another process was running,
    deleted its live child, and both then logged the same runs. Now it refuses in one line
    while the holder's heartbeat is fresh; once it is older than the limit (SIGKILL, machine
    down) the runs show as stale and the next `run` takes the study over."""
    cfg, uri = one_run_study(store, mnist_dir)
    first = run_study(cfg, progress=False)
    client = mlflow.MlflowClient()
    assert client.get_run(first.parent_run_id).data.tags[lease.OWNER]  # the lease is recorded

    live_child = pretend_another_process_runs(first.parent_run_id, heartbeat_age_s=5)
    with pytest.raises(lease.StudyBusy) as exc:
        run_study(cfg, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "pid 4242 on host elsewhere" in msg and "120 s" in msg
    assert client.get_run(live_child).info.lifecycle_stage == "active"
    assert client.get_run(live_child).info.status == "RUNNING"
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.data.tags[lease.OWNER] == "other-owner"
    assert lease.liveness(parent.data.tags) == "live"

    client.set_tag(first.parent_run_id, lease.HEARTBEAT, f"{time.time() - 1000:.3f}")
    assert lease.liveness(client.get_run(first.parent_run_id).data.tags) == "stale"
    shown = inventory(uri, first.parent_run_id)  # `art-study runs` tells stale runs from live
    assert list(shown.studies["status"]) == [STALE]
    kids = shown.children[first.parent_run_id].set_index("run_id")["status"]
    assert kids[live_child] == STALE and (kids.drop(live_child) == "FINISHED").all()
    again = run_study(cfg, progress=False)
    assert again.parent_run_id == first.parent_run_id and all(r.skipped for r in again.runs)
    assert client.get_run(live_child).info.lifecycle_stage == "deleted"  # dead by now
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[lease.OWNER] not in ("other-owner", None)


def test_of_two_parents_created_at_once_the_later_backs_off(store) -> None:
    """Two processes that start one new study at once both create a parent; each then looks
    for a rival. Before, each found the other's live parent and both backed off (no study
    ran). Now only the later parent (start time, then run id) has a rival: exactly one stays.
    Both are created within one millisecond's tie as well, so the run id decides."""
    from art_study.study.executor import _rival_parent

    mlflow.set_tracking_uri(f"sqlite:///{store / 'rivals.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("rivals")
    start = int(time.time() * 1000)
    made = []
    for owner, at in (("first", start), ("second", start + 5), ("tie", start + 5)):
        held = lease.Lease(client)
        held.owner = owner
        tags = {**held.tags(), lease.HOST: "elsewhere", "study_key": "k",
                "art_study.role": "study"}
        made.append((held, client.create_run(exp, start_time=at, tags=tags).info))
    later = sorted(made, key=lambda m: (m[1].start_time, m[1].run_id))
    rivals = {held.owner: _rival_parent(client, exp, "k", held, info) for held, info in later}
    assert rivals[later[0][0].owner] is None
    for i, (held, _) in enumerate(later[1:], start=1):  # an earlier parent, whichever
        assert rivals[held.owner].info.run_id in {info.run_id for _, info in later[:i]}
    assert later[0][0].owner == "first"


def test_a_killed_holder_on_this_machine_is_stale_at_once() -> None:
    """Same host and pid namespace, pid gone: no need to wait for the heartbeat to age."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    tags = lease.Lease(mlflow.MlflowClient()).tags()
    assert lease.liveness(tags) == "live"
    assert lease.liveness({**tags, lease.PID: proc.stdout.strip()}) == "stale"
    assert lease.liveness({**tags, lease.HOST: "elsewhere",
                           lease.PID: proc.stdout.strip()}) == "live"
    assert lease.liveness({"mlflow.runName": "x"}) == "unleased"


def test_a_process_that_lost_its_lease_stops_and_leaves_the_parent(store, mnist_dir,
                                                                    monkeypatch) -> None:
    """A process frozen past the limit and taken over notices at its next heartbeat: it
    deletes the run it was logging (the new owner reruns it), starts no other, and does not
    end the parent run (which is the new owner's)."""
    from art_study.study.executor import Executor as _Executor

    monkeypatch.setenv(lease.STALE_ENV, "0.4")  # heartbeat every 0.1 s
    cfg, _ = one_run_study(store, mnist_dir, "[control, [distillation]]")
    real = _Executor._in_run

    def taken_over(self, spec):
        out = real(self, spec)
        client = mlflow.MlflowClient()
        client.set_tag(self._parent, lease.OWNER, "new-owner")
        client.set_tag(self._parent, lease.STALE_AFTER, "120")
        deadline = time.monotonic() + 60  # a heartbeat (every 0.1 s) notices; poll for it
        while not self._lease.lost:
            assert time.monotonic() < deadline, "the heartbeat never noticed the takeover"
            time.sleep(0.02)
        return out

    monkeypatch.setattr(_Executor, "_in_run", taken_over)
    with pytest.raises(lease.LeaseLost):
        run_study(cfg, progress=False)
    parent = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`art_study.role` = 'study' and "
                                "attributes.status = 'RUNNING'")[0]
    assert parent.info.status == "RUNNING"  # as the new owner has it
    kids = runs_of(parent.info.run_id, deleted=True)
    assert [k.info.lifecycle_stage for k in kids] == ["deleted"]


# -- no credentials in what is recorded or shown --------------------------------------------------
SECRET_URI = "https://alice:s3cret@mlflow.example.org:8443/base?token=abc123&x=1"


def test_redact_removes_userinfo_and_secret_query_values() -> None:
    from art_study.tracking import redact

    assert redact(SECRET_URI) == "https://***@mlflow.example.org:8443/base?token=***&x=1"
    assert redact("postgresql://u:p@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("failed: API request to http://u:p@h/api?sig=zz&api_key=k failed") == \
        "failed: API request to http://***@h/api?sig=***&api_key=*** failed"
    plain = "sqlite:////tmp/x@y/mlflow.db"  # an @ in a path is not a credential
    assert redact(plain) == plain and redact("http://h:5000/") == "http://h:5000/"


def test_runs_record_no_credentials(store, mnist_dir, monkeypatch) -> None:
    """Before: the tracking URI, password included, was a param and in config.yaml of every
    run. The study is recorded in a local store standing in for the remote one."""
    from art_study.study import execute

    cfg, uri = one_run_study(store, mnist_dir)
    cfg.tracking.uri = SECRET_URI
    real = execute.prepare_store
    monkeypatch.setattr(execute, "prepare_store", lambda _uri, exp: real(uri, exp))
    cfg.name = "secret-study"
    result = run_study(cfg, progress=False)
    client = mlflow.MlflowClient()
    for run_id in (result.parent_run_id, result.runs[0].run_id):
        run = client.get_run(run_id)
        recorded = json.dumps([run.data.params, run.data.tags])
        recorded += mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
        assert "s3cret" not in recorded and "abc123" not in recorded
        assert run.data.params["tracking.uri"].startswith("https://***@mlflow.example.org")


def test_store_errors_show_no_credentials(monkeypatch) -> None:
    from art_study.tracking import prepare_store

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ArtStudyError) as exc:
        prepare_store("http://alice:s3cret@127.0.0.1:9/?token=abc123", "art-study")
    assert "s3cret" not in str(exc.value) and "abc123" not in str(exc.value)
    assert "http://***@127.0.0.1:9/" in str(exc.value)


# -- Ray: a local instance listens on loopback only -----------------------------------------------
RAY_LISTENERS = r"""
import os, re, subprocess
import ray
from art_study.study.ray_backend import _connect

_connect(ray, None)
assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
ppid = {}
for stat in os.listdir("/proc"):
    if stat.isdigit():
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid[int(stat)] = int(fields[1])
ours = {os.getpid()}
while True:
    more = {p for p, q in ppid.items() if q in ours} - ours
    if not more:
        break
    ours |= more
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    if pids & ours:
        print("LISTEN", line.split()[3])
ray.shutdown()
"""


def test_a_local_ray_instance_listens_on_loopback_only(tmp_path) -> None:
    """Before: `--backend ray` started Ray with the machine's address, its GCS, raylet and
    workers listening on every interface (ss showed *:port): anyone on the network could
    submit tasks."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", RAY_LISTENERS], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    listening = [line.split()[1] for line in proc.stdout.splitlines()
                 if line.startswith("LISTEN")]
    assert len(listening) >= 3, proc.stdout  # the GCS, the raylet, a worker at least
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert all(addr.startswith(loopback) for addr in listening), listening


# -- config: what would silently do something else is refused or read as meant ------------------
def test_misspelled_defense_section_is_refused() -> None:
    """Before: `--set defenses.adversarial_trainin.eps=0.05` was ignored; AT trained at ε 0.3."""
    from art_study.study import plan_runs

    cfg = load_config(TINY, ["defenses.adversarial_trainin.eps=0.05"])
    with pytest.raises(ConfigError, match=r"defenses\.adversarial_trainin: unknown defense; "
                                          r"did you mean 'adversarial_training'\?"):
        plan_runs(cfg, {0: "data"})
    single = load_config(REPO / "configs" / "smoke.yaml", ["defenses.qqq={}"])
    with pytest.raises(ConfigError, match=r"defenses\.qqq: unknown defense; available: none"):
        plan_runs(single, {0: "data"})


@pytest.mark.parametrize("field", ["evaluation.eps", "evaluation.attacks"])
def test_close_eps_get_metric_names_of_their_own(field) -> None:
    """Before: 0.1 and 0.1000001 both logged as accuracy_eps_0.1, one overwriting the other
    (then refused in the config); metric names now carry ε exactly, so both are kept, each
    under a name that reads back as itself."""
    from art_study.evaluation import eps_key

    value = ("[0.1, 0.1000001]" if field == "evaluation.eps"
             else "[{name: pgd, eps: [0.3, 0.30000004]}]")
    cfg = load_config(TINY, [f"{field}={value}"])
    kept = cfg.evaluation.eps if field == "evaluation.eps" else cfg.evaluation.attacks[0].eps
    assert len(kept) == 2
    names = [eps_key(e) for e in kept]
    assert len(set(names)) == 2
    assert [float(n.removeprefix("eps_")) for n in names] == kept


def test_leading_zero_numbers_are_decimal(tmp_path) -> None:
    """Before: `--set seed=010` was YAML 1.1 octal: seed 8. Now 010 is ten, in --set values
    and in config files; explicit 0x/0o prefixes keep their bases."""
    assert load_config(TINY, ["seed=010"]).seed == 10
    assert load_config(TINY, ["study.seeds=[007, 010]"]).study.seeds == [7, 10]
    assert load_config(TINY, ["seed=0x10"]).seed == 16
    path = tmp_path / "c.yaml"
    path.write_text((TINY.read_text()).replace("seeds: [0]", "seeds: [010]"))
    assert load_config(path).study.seeds == [10]


# -- resources: `art-study cache` ---------------------------------------------------------------
def test_cache_command_shows_and_prunes(tmp_path, mnist_dir, capsys) -> None:
    """Entries no finished run names, and leftovers of killed writers, are pruned; an entry a
    finished run names is kept; nothing is pruned while a study runs on the store."""
    import shutil

    from art_study.cli import main
    from art_study.study import run_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"tracking.uri={uri}", f"data.dir={mnist_dir}", "data.n_train=100", "data.n_test=50",
        "evaluation.diagnostics.enabled=false", "tracking.log_model=false"])
    run = run_experiment(cfg, progress=False)
    used = mlflow.MlflowClient().get_run(run.run_id).data.tags["stage1.key"]
    cache = StageCache(tmp_path / "stage-cache")
    unused = "ff" + used[2:]
    (cache.root / "ff").mkdir()
    shutil.copytree(cache.model_path(used).parent, cache.model_path(unused).parent)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftover = cache.root / f".tmp-{os.uname().nodename}-{dead}-0badc0de"
    leftover.mkdir()
    (leftover / "model.h5").write_bytes(b"half")
    old, fresh = cache.checkpoints.scoped("old"), cache.checkpoints.scoped("fresh")
    for where in (old, fresh):
        where.save("chunk", {"fooled": np.zeros(3, bool)})
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old._path("chunk"), (week_ago, week_ago))

    assert main(["cache", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "1 named by finished runs" in out and "1 leftovers" in out
    assert f"{used[:16]}  none" in out and f"{unused[:16]}  none" in out

    # A study running on the store (a live lease) may need any entry: no pruning.
    client = mlflow.MlflowClient()
    holder = client.create_run(client.get_run(run.run_id).info.experiment_id,
                               tags=lease.Lease(client).tags())
    assert main(["cache", "--tracking-uri", uri, "--prune"]) == 1
    assert "not pruning: studies are running" in capsys.readouterr().err
    client.set_terminated(holder.info.run_id)

    assert main(["cache", "--tracking-uri", uri, "--prune"]) == 0
    assert "pruned 1 entries and 1 leftovers" in capsys.readouterr().out
    assert cache.has(used) and not cache.model_path(unused).parent.exists()
    assert not leftover.exists()
    assert old.load("chunk") is None and fresh.load("chunk") is not None


# -- the store deleted under a running study ------------------------------------------------------
def test_store_deleted_during_a_study_is_one_line(tmp_path, mnist_dir, monkeypatch,
                                                  capfd) -> None:
    """Before: every remaining run failed with its own chain of tracebacks (24 for the tiny
    study), then the parent's end raised one more. Now the study stops with one line."""
    import shutil

    from art_study.cli import main
    from art_study.study.executor import Executor as _Executor

    db = tmp_path / "store"
    real = _Executor._in_run

    def in_run(self, spec):
        out = real(self, spec)
        shutil.rmtree(db, ignore_errors=True)  # someone deletes the store
        return out

    monkeypatch.setattr(_Executor, "_in_run", in_run)
    code = main(["run", str(TINY), "--no-progress", "--tracking-uri",
                 f"sqlite:///{db / 'mlflow.db'}", "--data-dir", str(mnist_dir),
                 "--set", "study.blocks=[{depths: [2], sequences: [control, singles]}]",
                 "--set", "data.n_train=100", "--set", "data.n_test=50",
                 "--set", "evaluation.transfer=[]", "--set", "tracking.log_model=false",
                 "--set", "evaluation.diagnostics.enabled=false",
                 "--set", f"study.cache_dir={tmp_path / 'cache'}"])
    err = capfd.readouterr().err
    assert code == 1
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("art-study: error:")]
    assert len(ours) == 1 and "failed during the study" in ours[0], err
    assert "attempt to write a readonly database" in ours[0]
