"""Config validation: typed objects, unknown keys and out-of-range values refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from art_study.config import ExperimentConfig, flatten, load_config, to_yaml
from art_study.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["smoke", "control"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert 2 <= cfg.model.n_conv <= 5
    assert all(0 < e <= 1 for e in cfg.evaluation.eps)


def test_defaults_fill_in_and_name_defaults_to_file_stem(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "seed: 3\n"))
    assert cfg.name == "c"
    assert cfg.seed == 3
    assert cfg.model.dense_units == 256
    assert cfg.evaluation.eps == sorted(cfg.evaluation.eps)


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {n_conv: 2}\n")
    cfg = load_config(path, ["model.n_conv=4", "evaluation.eps=[0.3, 0.1]", "train.epochs=2"])
    assert cfg.model.n_conv == 4
    assert cfg.evaluation.eps == [0.1, 0.3]
    with pytest.raises(ConfigError, match=r"model\.n_conv"):
        load_config(path, ["model.n_conv=7"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["model.n_conv"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("model: {n_conv: 7}\n", "model.n_conv"),
        ("model: {n_conv: 1}\n", "model.n_conv"),
        ("evaluation: {eps: [0.1, -0.2]}\n", "evaluation.eps"),
        ("evaluation: {eps: [1.5]}\n", "evaluation.eps"),
        ("modell: {n_conv: 2}\n", "modell"),
        ("train: {epochs: 2, lr: 0.1}\n", "train.lr"),
        ("data: {n_train: 5}\n", "data.n_train"),
        ("model: {n_conv: 4, filters: [8, 8]}\n", "model"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    assert key in msg
    assert "\n" not in msg


def test_unknown_key_says_unknown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr: unknown key"):
        load_config(write(tmp_path, "train: {lr: 0.1}\n"))


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_flatten_and_yaml_round_trip() -> None:
    cfg = ExperimentConfig(name="x")
    flat = flatten(cfg)
    assert flat["model.n_conv"] == "2"
    assert flat["evaluation.eps"].startswith("[")
    assert flat["data.dir"] == "null"
    import yaml

    assert ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("name", ["paper", "robust", "fashion", "tiny"])
def test_a_logged_study_config_loads_back(name: str) -> None:
    """What a run logs as config.yaml is a config the loader takes: the report re-reads it
    (a field logged by its Python name, not its YAML key, made every report skip its examples)."""
    import yaml

    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["study.register=true"])
    again = ExperimentConfig.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg and again.study.register_models
    assert flatten(cfg)["study.register"] == "True"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "{}\n", "null\n",
                                  "name: x\n", "name: x\ntracking: {experiment: e}\n"])
def test_empty_config_or_nothing_to_run_is_refused(tmp_path: Path, text: str) -> None:
    """An empty file used to run the default experiment (7 epochs on full MNIST)."""
    with pytest.raises(ConfigError, match=r"is empty|nothing to run") as err:
        load_config(write(tmp_path, text), ["model.n_conv=3"])
    assert "\n" not in str(err.value)


STUDY = """evaluation:
  eps: [0.1, 0.3]
  n_attack: 200
  attacks: [{name: pgd, n_images: 100}]
  diagnostics: {n_images: 50}
study:
  blocks:
    - {depths: [2], sequences: [control]%s}
    - {depths: [3], sequences: [control]}
"""


def test_a_block_overrides_the_evaluation_key_by_key(tmp_path: Path) -> None:
    """Mappings merge key by key, a list (attacks) is replaced whole, the other block keeps the
    top-level evaluation."""
    over = ", evaluation: {n_attack: 1000, diagnostics: {pgd_steps: 3}, attacks: [{name: fgsm}]}"
    cfg = load_config(write(tmp_path, STUDY % over))
    first, second = cfg.block_evaluation(0), cfg.block_evaluation(1)
    assert first.n_attack == 1000 and first.eps == [0.1, 0.3]
    assert (first.diagnostics.pgd_steps, first.diagnostics.n_images) == (3, 50)
    assert [(a.name, a.n_images) for a in first.attacks] == [("fgsm", 500)]
    assert second == cfg.evaluation and second.n_attack == 200


@pytest.mark.parametrize(
    ("override", "key"),
    [(", evaluation: {n_attack: 0}", "study.blocks.0.evaluation.n_attack"),
     (", evaluation: {diagnostics: {n_imgs: 5}}", "study.blocks.0.evaluation.diagnostics.n_imgs"),
     (", evaluation: {transfer: [square]}", "study.blocks.0.evaluation"),
     (", evaluation: {attacks: [{name: pgd, n_images: -1}]}",
      "study.blocks.0.evaluation.attacks.0.n_images")],
)
def test_a_blocks_evaluation_is_validated_like_the_top_level(tmp_path: Path, override: str,
                                                             key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, STUDY % override))
    assert key in str(err.value) and "\n" not in str(err.value)
