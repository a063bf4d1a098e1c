"""Datasets beyond MNIST: Fashion-MNIST from Debian's package, CIFAR-10 from its archive (a small
synthetic one in the real format, made here: the real one cannot be downloaded on these
machines), a local npz; the config's ``data:`` section; ε written as 8/255; MNIST's keys as
they were; a whole tiny study and its report on 32×32×3 images.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from art_study.config import config_from_mapping, load_config
from art_study.data import FASHION_DEBIAN_DIR, load_dataset, load_mnist
from art_study.datasets import CIFAR10, FASHION_MNIST, MNIST, eps_text
from art_study.errors import ConfigError, DataError
from art_study.evaluation import eps_key

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# -- MNIST's keys -------------------------------------------------------------------------------

#: The stage keys of this plan (fingerprint "0" * 64), printed by the code of main before
#: datasets existed (commits 496049c and 31b3ea2, `plan_runs` on KEYS_CONFIG): a MNIST study
#: planned now must reuse the stages trained then. (Run and study keys also hold
#: EVALUATION_VERSION, which changes with the evaluation; their data part is checked below.)
KEYS_CONFIG = {
    "name": "keys", "data": {"n_train": 300, "n_test": 100}, "model": {"n_conv": 2},
    "study": {"seeds": [0], "stage_epochs": [1, 1], "blocks": [
        {"depths": [2], "sequences": ["control", ["adversarial_training", "gradient_masking"]]}]}}
MAIN_STAGE_KEYS = {
    "none": ["2958c05a8c1cbdb1767e6f631cdca7932d7c7c60dd3a0686f76164b7857286c1",
             "bc1661d821e7e860b3c8bb3d7d6e1fe0b0a17be913deb76fc598009bb2f4a527"],
    "adversarial_training>gradient_masking": [
        "dfeac219b15fbf76d7c5686c7d21b441779f2730afa401775a4753bb1b804de6",
        "3641124a14bca5f4370592f0d35de877c7170eb5d19c369144db791c8693c9dc"],
}


def plan(raw: dict):
    from art_study.study.plan import plan_runs, study_key

    cfg = config_from_mapping(raw)
    runs = plan_runs(cfg, {0: "0" * 64})
    return {r.sequence: [s.key for s in r.stages] for r in runs}, study_key(cfg, runs)


def test_mnist_keys_are_those_of_main() -> None:
    from art_study.study.plan import data_identity

    for data in ({}, {"name": "mnist"}):
        raw = {**KEYS_CONFIG, "data": {**KEYS_CONFIG["data"], **data}}
        assert plan(raw)[0] == MAIN_STAGE_KEYS
        # the data section as main's study key dumped it: locations out, nothing added
        assert data_identity(config_from_mapping(raw)) == {"n_train": 300, "n_test": 100}


def test_other_datasets_have_other_keys() -> None:
    fashion = {**KEYS_CONFIG, "data": {**KEYS_CONFIG["data"], "name": "fashion_mnist"},
               "evaluation": {"eps": list(MNIST.eps)}}
    keys, study = plan(fashion)
    assert study != plan(KEYS_CONFIG)[1]
    assert all(keys[s][0] != MAIN_STAGE_KEYS[s][0] for s in MAIN_STAGE_KEYS)


# -- the config ---------------------------------------------------------------------------------


def test_data_name_sets_the_eps_grid_and_fractions_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nmodel: {n_conv: 2}\n")
    assert load_config(path).evaluation.eps == list(MNIST.eps)
    assert load_config(path, ["data.name=fashion_mnist"]).evaluation.eps == list(
        FASHION_MNIST.eps)
    cfg = load_config(path, ["data.name=cifar10", "evaluation.eps=[4/255, 8/255]",
                             "defenses.pgd_adversarial_training.eps=8/255"])
    assert cfg.evaluation.eps == [4 / 255, 8 / 255]
    assert cfg.defenses["pgd_adversarial_training"]["eps"] == "8/255"  # validated when planned
    assert load_config(path, ["data.name=cifar10"]).evaluation.eps[-2] == 8 / 255
    with pytest.raises(ConfigError, match=r"data\.name"):
        load_config(path, ["data.name=svhn"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(path, ["data.name=cifar10", "data.path=x.npz"])


def test_metric_names_round_trip_eps() -> None:
    assert eps_key(0.1) == "eps_0.1" and eps_key(0.3) == "eps_0.3"  # MNIST's names unchanged
    for eps in (*MNIST.eps, *FASHION_MNIST.eps, *CIFAR10.eps):
        assert float(eps_key(eps).removeprefix("eps_")) == eps
    assert eps_text(8 / 255) == repr(8 / 255)


def test_configs_validate_and_plan() -> None:
    from art_study.study.plan import plan_runs

    fashion = load_config(CONFIGS / "fashion.yaml")
    assert fashion.data.name == "fashion_mnist"
    assert max(fashion.evaluation.eps) == 0.2 and 0.1 in fashion.evaluation.eps
    assert fashion.study is not None and fashion.study.seeds == [0, 1, 2]
    runs = plan_runs(fashion, dict.fromkeys([0, 1, 2], "f" * 64))
    sequences = {r.sequence for r in runs}
    assert {"none", "pgd_adversarial_training", "trades",
            "adversarial_training>distillation"} <= sequences
    settings = {s.defense: s.settings for r in runs for s in r.stages}
    assert settings["pgd_adversarial_training"]["eps"] == 0.1
    assert settings["adversarial_training"]["eps"] == 0.1
    cifar = load_config(CONFIGS / "cifar10.yaml")
    runs = plan_runs(cifar, {0: "c" * 64})
    settings = {s.defense: s.settings for r in runs for s in r.stages}
    assert settings["pgd_adversarial_training"]["eps"] == 8 / 255
    assert 8 / 255 in cifar.evaluation.eps


# -- Fashion-MNIST ------------------------------------------------------------------------------


def test_fashion_mnist_from_the_debian_package() -> None:
    """`make test-deps` installs dataset-fashion-mnist; its files pass the published sha256."""
    full = load_dataset("fashion_mnist", download=False)
    assert full.source == str(FASHION_DEBIAN_DIR)
    assert full.x_train.shape == (60_000, 28, 28, 1) and full.x_test.shape == (10_000, 28, 28, 1)
    assert np.bincount(full.y_train).tolist() == [6000] * 10  # as published: 6000 per class
    assert full.x_train.min() == 0.0 and full.x_train.max() == 1.0
    mnist = load_mnist(n_train=600, n_test=100, download=False)
    sub = load_dataset("fashion_mnist", n_train=600, n_test=100, download=False)
    assert sub.spec is FASHION_MNIST and sub.fingerprint != mnist.fingerprint


def test_fashion_mnist_corrupt_copy_is_refused(tmp_path: Path) -> None:
    for path in FASHION_DEBIAN_DIR.glob("*.gz"):
        data = gzip.decompress(path.read_bytes())
        if path.name.startswith("t10k-labels"):
            data = data[:-1] + bytes([(data[-1] + 1) % 10])  # one label changed
        (tmp_path / path.name.removesuffix(".gz")).write_bytes(data)
    with pytest.raises(DataError, match=r"checksum mismatch .*t10k-labels"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete fashion_mnist IDX files"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)


# -- CIFAR-10 -----------------------------------------------------------------------------------


def cifar_archive(directory: Path, per_batch: int = 20, *, bad_label: bool = False) -> Path:
    """A cifar-10-python.tar.gz in the real layout: pickled dicts of channel-first uint8 rows."""
    rng = np.random.default_rng(0)
    path = directory / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            labels = [i % 10 for i in range(per_batch)]
            labels[0] += 10 * bad_label
            blob = pickle.dumps({b"data": rng.integers(0, 256, (per_batch, 3072), np.uint8),
                                 b"labels": labels, b"batch_label": name.encode()}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_from_a_local_archive(tmp_path: Path, caplog) -> None:
    path = cifar_archive(tmp_path)
    data = load_dataset("cifar10", data_dir=tmp_path, n_test=10, seed=0, download=False)
    assert data.spec is CIFAR10
    assert data.x_train.shape == (100, 32, 32, 3) and data.x_test.shape == (10, 32, 32, 3)
    assert "not the canonical CIFAR-10" in caplog.text
    # channel-first rows become HWC: pixel (row 0, col 1) of channel 2 is byte 2·1024 + 1
    with tarfile.open(path) as archive:
        member = archive.extractfile("cifar-10-batches-py/data_batch_1")
        first = pickle.load(member, encoding="bytes")[b"data"][0]
    full = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert full.x_train[0, 0, 1, 2] == np.float32(first[2 * 1024 + 1]) / np.float32(255)


def test_cifar10_bad_archives_are_refused(tmp_path: Path) -> None:
    path = cifar_archive(tmp_path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt CIFAR-10 archive"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    cifar_archive(tmp_path, bad_label=True)
    with pytest.raises(DataError, match=r"values 0\.\.10, labels outside the classes 0\.\.9"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=r"no cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere", download=False)
    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / "cifar-10-python.tar.gz", "w:gz") as archive:
        blob = pickle.dumps(print)  # any global but numpy's arrays is refused, never called
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(blob)
        archive.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        load_dataset("cifar10", data_dir=evil, download=False)


# -- a local dataset ----------------------------------------------------------------------------


def synthetic_npz(path: Path, n_train: int = 600, n_test: int = 200, classes: int = 10) -> Path:
    """32×32×3 images whose class is a colour in one quadrant: learnable in one epoch."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % classes
        x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label) % 4, 2)
            x[i, 16 * r: 16 * r + 16, 16 * c: 16 * c + 16, label % 3] = 150 + 10 * (label // 3)
        return x, y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_local_npz_and_its_errors(tmp_path: Path) -> None:
    path = synthetic_npz(tmp_path / "mine.npz", classes=5)
    data = load_dataset(path=path, n_train=100, download=False)
    assert data.spec.input_shape == (32, 32, 3) and data.spec.n_classes == 5
    assert data.x_train.shape == (100, 32, 32, 3) and data.x_train.dtype == np.float32
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(tmp_path / "bad.npz", **{**arrays, "y_test": arrays["y_test"] + 3})
    with pytest.raises(DataError, match=r"values 3\.\.7, labels outside the classes 0\.\.4"):
        load_dataset(path=tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", x_train=arrays["x_train"])
    with pytest.raises(DataError, match="lacks key"):
        load_dataset(path=tmp_path / "short.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(path=tmp_path / "none.npz")


def test_cnn_builds_for_any_shape_and_class_count() -> None:
    from art_study.config import ModelConfig
    from art_study.models import build_cnn

    for n_conv in (2, 5):
        model = build_cnn(ModelConfig(n_conv=n_conv), input_shape=(32, 32, 3), n_classes=7)
        assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 7)
    five = build_cnn(ModelConfig(n_conv=5), input_shape=(32, 32, 3))
    assert sum("pool" in layer.name for layer in five.layers) == 5  # 32 → 1: pools every block


# -- a whole study on colour images -------------------------------------------------------------


def test_tiny_study_and_report_on_32x32x3(tmp_path: Path) -> None:
    """Train the control, gradient masking and PGD-AT on a synthetic 32×32×3 dataset at
    ε 8/255, attack them (PGD, APGD-CE, Square, FGSM transfer), run the masking checks, write
    the report."""
    from art_study import report
    from art_study.study import run_study

    data = synthetic_npz(tmp_path / "colour.npz", n_train=300, n_test=60)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_mapping({
        "name": "colour", "data": {"path": str(data)},
        "model": {"n_conv": 2, "filters": [8, 16], "dense_units": 32},
        "train": {"batch_size": 50},
        "defenses": {"pgd_adversarial_training": {"eps": "8/255", "steps": 2}},
        "evaluation": {"eps": ["4/255", "8/255"], "batch_size": 60,
                       "attacks": [{"name": "pgd", "n_images": 30, "args": {"max_iter": 3}},
                                   {"name": "apgd-ce", "n_images": 30, "args": {"max_iter": 3}},
                                   {"name": "square", "n_images": 30,
                                    "args": {"max_iter": 20}}],
                       "transfer": ["fgsm"],
                       "diagnostics": {"n_images": 30, "pgd_steps": 2}},
        "tracking": {"uri": uri},
        "study": {"seeds": [0], "stage_epochs": [1, 1], "blocks": [
            {"depths": [2], "sequences": ["control", ["gradient_masking"],
                                          ["pgd_adversarial_training"]]}]},
    })
    result = run_study(cfg, progress=False)
    assert not result.failed and len(result.runs) == 3
    import mlflow

    client = mlflow.MlflowClient(uri)
    for run in result.runs:
        metrics = client.get_run(run.run_id).data.metrics
        assert metrics["clean/accuracy"] > 0.3  # chance is 0.1: the colour quadrant is learnt
        for name in ("fgsm_custom", "attack/pgd", "attack/apgd-ce", "attack/square"):
            assert f"{name}/accuracy_{eps_key(8 / 255)}" in metrics
    files = report.write_report("colour", tracking_uri=uri, out_dir=tmp_path / "out", log=False)
    md = files.markdown.read_text(encoding="utf-8")
    assert "pgd_adversarial_training" in md and f"{8 / 255:g}" in md


# -- evaluating a model of another dataset ------------------------------------------------------


def test_evaluate_a_fashion_model_at_its_budgets_and_refusals(tmp_path: Path, capsys) -> None:
    """`art-study evaluate MODEL --data fashion_mnist`: the paper's evaluation at Fashion-MNIST's
    ε; the same model on 32×32×3 data, or wanting [0, 255] pixels, is refused in one line and
    leaves no run."""
    import keras
    import mlflow

    from art_study.cli import main
    from art_study.config import ModelConfig, TrainConfig
    from art_study.model_source import ModelError, check_input_scale
    from art_study.models import build_cnn, compile_model, one_hot

    data = load_dataset("fashion_mnist", n_train=1000, n_test=200, download=False)
    model = compile_model(build_cnn(ModelConfig(n_conv=2, filters=[8, 16], dense_units=32)),
                          TrainConfig())
    model.fit(data.x_train, one_hot(data.y_train), epochs=3, batch_size=50, verbose=0)
    path = tmp_path / "fashion.keras"
    model.save(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = ["--tracking-uri", uri, "--no-progress", "--set", "data.n_test=200",
             "--set", "evaluation.xcheck_images=50", "--set", "evaluation.transfer=[]",
             "--set", "evaluation.attacks=[{name: pgd, n_images: 20, args: {max_iter: 3}}]",
             "--set", "evaluation.diagnostics.n_images=20"]
    client = mlflow.MlflowClient(uri)

    def runs() -> list:
        return [r for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id])]

    assert main(["evaluate", str(path), "--data", "fashion_mnist", *small]) == 0
    out = capsys.readouterr().out
    assert "ε=0.1 " in out and "ε=0.2" in out and "ε=0.3" not in out
    assert [r.data.params["data.name"] for r in runs()] == ["fashion_mnist"]

    colour = synthetic_npz(tmp_path / "colour.npz", n_train=100, n_test=200)
    assert main(["evaluate", str(path), "--data", str(colour), *small]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "takes inputs of shape (28, 28, 1); art-study evaluates the local dataset as " \
           "(32, 32, 3)" in err
    assert len(runs()) == 1

    wants_bytes = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255),
                                    model])
    with pytest.raises(ModelError, match=r"Fashion-MNIST test images .*pixels \[0, 255\]"):
        check_input_scale(wants_bytes, "bytes.keras", data.x_test * 1.0, data.y_test,
                          FASHION_MNIST)
