"""Safe to share (issue 17): a study is owned by one process at a time (a lease in the store),
the stage cache checks itself, no credentials are recorded, Ray listens on loopback only."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from art_study.config import ModelConfig, TrainConfig
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

    def replace(src, dst):
        if Path(dst).name == key and not raced:
            raced.append(True)
            cache.save(fitted, record(key))  # the other writer, completing first
        return real_replace(src, dst)

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
    assert errno.ENOTEMPTY  # the error the rename raised before


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
