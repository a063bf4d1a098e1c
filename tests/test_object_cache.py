"""The stage cache on a real S3 server (SeaweedFS, ``tests/s3_server.py``): the local cache's
guarantees kept on object storage, and every way of not reaching it refused in one line."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest

from art_study import cli
from art_study.config import load_config
from art_study.errors import ArtStudyError, ConfigError
from art_study.study import run_study
from art_study.study.cache import CorruptStage, StageRecord
from art_study.study.object_cache import ObjectStageCache, open_cache

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# The tiny study's control alone, evaluated without the gradient-masking checks: two stages.
CONTROL = ("study.blocks=[{depths: [2], sequences: [control]}]", "evaluation.transfer=[]",
           "evaluation.diagnostics.enabled=false", "tracking.log_model=false")


def prefix_uri(s3) -> str:
    """A fresh prefix in the test bucket, so tests never see each other's entries."""
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:10]}"


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def record(key: str) -> StageRecord:
    return StageRecord(key=key, defense="none", epochs=1, history=[{"loss": 1.0}],
                       train_time_s=0.5, extra={})


def same_weights(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(),
                                                    strict=True))


def test_an_entry_is_visible_only_once_its_record_is_written(s3) -> None:
    cache = open_cache(prefix_uri(s3))
    assert isinstance(cache, ObjectStageCache)
    key = hashlib.sha256(b"stage").hexdigest()
    writes = cache._write

    def killed_before_the_record(path: str, blob: bytes) -> None:
        if path.endswith(cache.RECORD):
            raise KeyboardInterrupt  # the writer dies between its two uploads
        writes(path, blob)

    cache._write = killed_before_the_record
    with pytest.raises(KeyboardInterrupt):
        cache.save(tiny_model(0), record(key))
    cache._write = writes
    objects = s3.objects(cache.base.split("/", 1)[1])
    assert len(objects) == 1 and objects[0].rsplit("/", 1)[1].startswith("model-")
    assert not cache.has(key) and list(cache.entries()) == []
    with pytest.raises(ArtStudyError, match="is not in the stage cache"):
        cache.load_model(key)
    assert cache.leftovers(min_age_s=0) == objects
    assert cache.leftovers() == []  # a writer elsewhere may still be uploading: kept an hour

    model = tiny_model(1)
    path = cache.save(model, record(key))
    assert cache.has(key) and [k for k, _ in cache.entries()] == [key]
    assert same_weights(cache.load_model(key), model)
    stored = cache.record(key)
    assert path.endswith(f"model-{stored.model_sha256[:16]}.h5")
    assert cache.leftovers(min_age_s=0) == objects  # the dead writer's upload, named by nothing


def test_two_writers_of_one_stage_end_with_one_valid_entry(s3) -> None:
    """Both check that the entry is absent, then both put their record at once: the last put
    wins and names its own complete model; the other model is a leftover."""
    uri, key = prefix_uri(s3), hashlib.sha256(b"shared stage").hexdigest()
    writers = [open_cache(uri), open_cache(uri)]  # as two processes: no state shared
    both_checked = threading.Barrier(2)
    for cache in writers:
        writes = cache._write

        def at_once(path: str, blob: bytes, writes=writes) -> None:
            if path.endswith(ObjectStageCache.RECORD):
                both_checked.wait(timeout=60)
            writes(path, blob)

        cache._write = at_once
    models = [tiny_model(2), tiny_model(3)]  # distinct bytes, to tell whose entry remains
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            writers[i].save(models[i], record(key))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    reader = open_cache(uri)
    assert reader.has(key) and [k for k, _ in reader.entries()] == [key]
    loaded = reader.load_model(key)
    assert sum(same_weights(loaded, m) for m in models) == 1
    assert len(reader.leftovers(min_age_s=0)) == 1

    # A third writer, after the entry is complete, keeps it and uploads a leftover only.
    sha = reader.record(key).model_sha256
    open_cache(uri).save(tiny_model(4), record(key))
    assert reader.record(key).model_sha256 == sha
    assert same_weights(reader.load_model(key), loaded)
    assert len(reader.leftovers(min_age_s=0)) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted"])
def test_a_damaged_model_is_detected_by_its_checksum_and_evicted(s3, caplog, damage) -> None:
    cache = open_cache(prefix_uri(s3))
    key = hashlib.sha256(damage.encode()).hexdigest()
    model_path = cache.save(tiny_model(5), record(key))
    blob = s3.filesystem().open_input_stream(model_path).read()
    if damage == "deleted":
        s3.filesystem().delete_file(model_path)
    else:
        bad = blob[: len(blob) // 2] if damage == "truncated" else \
            blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:]
        with s3.filesystem().open_output_stream(model_path) as f:
            f.write(bad)
    with caplog.at_level(logging.WARNING, logger="art_study.study.object_cache"):
        assert not cache.has(key)
    warnings = [r.getMessage() for r in caplog.records if r.name == "art_study.study.object_cache"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"stage cache entry {key[:12]} is damaged" in warnings[0]
    assert "evicted, it will be retrained" in warnings[0]
    assert s3.objects(cache.base.split("/", 1)[1]) == []  # record and model both gone

    # load_model on a damaged entry evicts it too, and says so in one line.
    model_path = cache.save(tiny_model(5), record(key))
    with s3.filesystem().open_output_stream(model_path) as f:
        f.write(blob[:100])
    with pytest.raises(CorruptStage, match=r"was corrupt .*evicted: rerun to retrain it"):
        cache.load_model(key)
    assert not cache.has(key)


def test_study_on_s3_reuses_retrains_a_corrupt_stage_and_prunes(tmp_path, mnist_dir, s3, caplog,
                                                                  capsys) -> None:
    """The control's two stages go to the bucket; a study in another store reuses them, except
    the one whose model was truncated, which is evicted with a warning and trained again; and
    ``art-study cache --prune`` on the bucket removes what no finished run names."""
    uri = prefix_uri(s3)
    cfgs = [load_config(TINY, [f"tracking.uri=sqlite:///{tmp_path / f'{n}.db'}",
                               f"data.dir={mnist_dir}", f"study.cache_dir={uri}", *CONTROL])
            for n in ("first", "second")]
    first = run_study(cfgs[0], progress=False)
    assert (first.stages_trained, first.stages_reused) == (2, 0)
    assert not (tmp_path / "stage-cache").exists()  # nothing cached beside the store
    cache = open_cache(uri)
    keys = [s.key for s in first.runs[0].spec.stages]
    assert sorted(k for k, _ in cache.entries()) == sorted(keys)
    last = cache._model(keys[1], cache.record(keys[1]).model_sha256)
    blob = s3.filesystem().open_input_stream(last).read()
    with s3.filesystem().open_output_stream(last) as f:
        f.write(blob[: len(blob) // 3])

    with caplog.at_level(logging.WARNING, logger="art_study.study.object_cache"):
        second = run_study(cfgs[1], progress=False)
    assert (second.stages_trained, second.stages_reused) == (1, 1)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and keys[1][:12] in damaged[0]
    assert cache.has(keys[1])

    # An entry no finished run of the second store names, and a fresh leftover: prune removes
    # the first and keeps the second (its writer may still be uploading).
    orphan = hashlib.sha256(b"orphan").hexdigest()
    cache.save(tiny_model(6), record(orphan))
    cache._write(cache._model("ab" * 32, "cd" * 32), b"half an upload")
    db = cfgs[1].tracking.uri
    capsys.readouterr()
    assert cli.main(["cache", "--cache-dir", uri, "--tracking-uri", db]) == 0
    listing = capsys.readouterr().out
    assert f"stage cache {uri}: 3 entries" in listing and "2 named by finished runs" in listing
    assert cli.main(["cache", "--cache-dir", uri, "--tracking-uri", db, "--prune"]) == 0
    assert "pruned 1 entries" in capsys.readouterr().out
    assert sorted(k for k, _ in cache.entries()) == sorted(keys)
    assert len(cache.leftovers(min_age_s=0)) == 1


def run_cli(tmp_path: Path, mnist_dir: Path, cache_dir: str, capsys) -> tuple[int, str, Path]:
    db = tmp_path / "mlflow.db"
    capsys.readouterr()
    code = cli.main(["run", str(TINY), "--tracking-uri", f"sqlite:///{db}",
                     "--set", f"data.dir={mnist_dir}", "--set", f"study.cache_dir={cache_dir}",
                     *[a for s in CONTROL for a in ("--set", s)]])
    return code, capsys.readouterr().err.strip(), db


@pytest.mark.parametrize("problem", ["unreachable", "credentials", "bucket"])
def test_a_store_that_cannot_be_used_stops_the_run_in_one_line(tmp_path, mnist_dir, s3,
                                                               monkeypatch, capsys,
                                                               problem) -> None:
    from s3_server import free_ports

    cache_dir = f"s3://{s3.bucket}/runs"
    if problem == "unreachable":  # a loopback port nothing listens on
        import random

        endpoint = f"http://127.0.0.1:{free_ports(1, random.Random())[0]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        expected = f"art-study: error: stage cache {cache_dir} unreachable at {endpoint}: "
    elif problem == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = (f"art-study: error: stage cache {cache_dir}: access denied at {s3.endpoint} "
                    "(are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, the "
                    "store's?)")
    else:
        cache_dir = "s3://no-such-bucket/runs"
        expected = (f"art-study: error: stage cache {cache_dir}: no bucket 'no-such-bucket' at "
                    f"{s3.endpoint} (create it first)")
    code, err, db = run_cli(tmp_path, mnist_dir, cache_dir, capsys)
    assert code == 1
    assert err.startswith(expected) and "\n" not in err, err
    assert "not-the-secret" not in err and s3.secret_key not in err
    assert not db.exists()  # refused before the store was touched: no run, none RUNNING


def test_a_cache_uri_of_an_unknown_scheme_is_refused(tmp_path, mnist_dir, capsys) -> None:
    code, err, db = run_cli(tmp_path, mnist_dir, "foo://x", capsys)
    assert code == 1
    assert err.startswith("art-study: error: study.cache_dir: cannot open 'foo://x' as a stage "
                          "cache") and "\n" not in err, err
    assert not db.exists() and not (Path.cwd() / "foo:").exists()
    with pytest.raises(ConfigError, match="names no bucket"):
        open_cache("s3:///prefix")


def test_the_record_is_plain_json_naming_its_model(s3) -> None:
    cache = open_cache(prefix_uri(s3))
    key = hashlib.sha256(b"json").hexdigest()
    path = cache.save(tiny_model(7), record(key))
    raw = json.loads(s3.filesystem().open_input_stream(
        f"{cache._dir(key)}/{cache.RECORD}").read())
    blob = s3.filesystem().open_input_stream(path).read()
    assert raw["model_sha256"] == hashlib.sha256(blob).hexdigest()
    assert raw["key"] == key and raw["history"] == [{"loss": 1.0}]


def test_a_worker_missing_its_stage_says_so_in_one_line(tmp_path, mnist_dir, s3) -> None:
    """The evaluation task, on a worker, for a run whose last stage is not in the bucket."""
    import socket

    from art_study.study.execute import load_data
    from art_study.study.plan import plan_runs
    from art_study.study.ray_backend import _evaluate_task

    uri = prefix_uri(s3)
    cfg = load_config(TINY, [f"data.dir={mnist_dir}", f"study.cache_dir={uri}", *CONTROL])
    data = load_data(cfg, [0])
    (spec,) = plan_runs(cfg, {0: data[0].fingerprint})
    with pytest.raises(ArtStudyError) as raised:
        _evaluate_task(spec, data[0], uri, None, None, True)
    message = str(raised.value)
    assert message == (
        f"stage {spec.stages[-1].key[:12]} is missing from the stage cache {uri} on worker "
        f"{socket.gethostname()}: the stage cache (study.cache_dir: a bucket, or a directory at "
        "the same path) must be shared by the driver and every Ray node; rerun to retrain it")


def test_an_entry_found_intact_is_not_downloaded_again_until_it_changes(s3) -> None:
    """has() verifies a model's checksum once per process: asked again, it reads the record
    (and lists the model) only. An entry replaced under another sha256, truncated, or evicted
    elsewhere is seen at the next has()."""
    cache = open_cache(prefix_uri(s3))
    key, other = (hashlib.sha256(s).hexdigest() for s in (b"memo", b"replacement"))
    cache.save(tiny_model(8), record(key))
    reads: list[str] = []
    read = cache._read

    def counted(path: str) -> bytes:
        reads.append(path.rsplit("/", 1)[1])
        return read(path)

    cache._read = counted

    def downloads() -> int:
        return sum(name.startswith("model-") for name in reads)

    assert cache.has(key) and downloads() == 1
    for _ in range(3):
        assert cache.has(key)
    assert downloads() == 1 and reads.count(cache.RECORD) == 4

    # Replaced by another writer: a record naming another model (the other key's, copied).
    cache.save(tiny_model(9), record(other))
    fs, sha = s3.filesystem(), cache.record(other).model_sha256
    with fs.open_output_stream(cache._model(key, sha)) as f:
        f.write(fs.open_input_stream(cache._model(other, sha)).read())
    with fs.open_output_stream(f"{cache._dir(key)}/{cache.RECORD}") as f:
        f.write(json.dumps({**record(key).__dict__, "model_sha256": sha}).encode())
    reads.clear()
    assert cache.has(key) and cache.has(key) and downloads() == 1
    assert same_weights(cache.load_model(key), tiny_model(9))

    # Truncated in place after it was verified: the listing differs, the check runs again.
    model = cache._model(key, sha)
    blob = fs.open_input_stream(model).read()
    with fs.open_output_stream(model) as f:
        f.write(blob[: len(blob) // 2])
    reads.clear()
    assert not cache.has(key) and downloads() == 1
    assert list(cache.entries()) == [(other, cache._dir(other))]

    # Evicted elsewhere after it was verified: gone at the next has(), nothing downloaded.
    assert cache.has(other)
    reads.clear()
    fs.delete_file(f"{cache._dir(other)}/{cache.RECORD}")
    assert not cache.has(other) and downloads() == 0


def test_attack_checkpoints_live_in_the_bucket_beside_the_entries(s3) -> None:
    """An evaluation's AutoAttack chunks saved through one cache object are read back through
    another (another node); they are no stage entry and no leftover; damage reads as absent."""
    uri = prefix_uri(s3)
    saved = {"fooled": np.array([True, False]), "costs": np.arange(3.0)}
    ObjectStageCache(uri).checkpoints.scoped("model", 0.3).save("chunk", saved)
    other = ObjectStageCache(uri)
    where = other.checkpoints.scoped("model", 0.3)
    loaded = where.load("chunk")
    assert loaded is not None and loaded.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(loaded[k], saved[k])
    assert other.checkpoints.scoped("model", 0.1).load("chunk") is None
    assert list(other.entries()) == [] and other.leftovers(min_age_s=0) == []
    where._write(where._name("chunk"), b"half an upload")
    assert where.load("chunk") is None
