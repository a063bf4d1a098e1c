"""Typed, validated configuration.

A YAML file is parsed into an :class:`ExperimentConfig`; ``--set key=value`` overrides are
applied to the raw mapping before validation, so an override is checked exactly like a value
in the file. Every model refuses unknown keys, and every error names the offending key, which
is what a user needs to fix a typo in a long study file.

Where the paper (Kim 2025) is silent, the defaults below are the choices documented in
docs/choices.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from art_study.datasets import DATASETS, Eps
from art_study.errors import ConfigError

#: The paper's FGSM budget is not stated. We sweep ε over the usual MNIST L∞ range, up to 0.3
#: (Madry et al. 2018's MNIST budget), finely enough to locate the paper's control accuracy.
DEFAULT_EPS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


class _Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(_Strict):
    """Which dataset, where it comes from and how much of it a run uses."""

    name: Literal["mnist", "fashion_mnist", "cifar10"] = Field(
        "mnist", description="The dataset (art_study/datasets.py): its shape, classes and ε grid.")
    path: str | None = Field(
        None, description="A dataset of your own instead of `name`: an npz with x_train, "
        "y_train, x_test, y_test, or a directory of the four IDX files.")
    dir: str | None = Field(
        None, description="Directory with the named dataset's files (MNIST: IDX files or "
        "mnist.npz, else $ART_STUDY_DATA_DIR; Fashion-MNIST: IDX files; CIFAR-10: "
        "cifar-10-python.tar.gz); else the usual places, then Keras' download."
    )
    n_train: int | None = Field(None, ge=10, le=60_000, description="Stratified train subset.")
    n_test: int | None = Field(None, ge=10, le=10_000, description="Stratified test subset.")
    download: bool = Field(True, description="Allow Keras' own download as a last resort.")

    @model_validator(mode="after")
    def _name_or_path(self) -> DataConfig:
        if self.path is not None and self.name != "mnist":
            raise ValueError(f"set data.name ({self.name}) or data.path, not both")
        return self


class ModelConfig(_Strict):
    """The paper's CNN: ``n_conv`` blocks of Conv → BatchNorm → MaxPool, Dense 256, dropout."""

    n_conv: int = Field(2, ge=2, le=5, description="Number of conv blocks (paper: 2 or 3).")
    filters: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 128, 128],
        description="Filters of each conv block; the first n_conv are used.",
    )
    kernel_size: int = Field(3, ge=1, le=7)
    dense_units: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("filters")
    @classmethod
    def _positive_filters(cls, v: list[int]) -> list[int]:
        if any(f < 1 for f in v):
            raise ValueError("every filter count must be >= 1")
        return v

    @model_validator(mode="after")
    def _enough_filters(self) -> ModelConfig:
        if len(self.filters) < self.n_conv:
            raise ValueError(f"filters has {len(self.filters)} entries but n_conv is {self.n_conv}")
        return self


class TrainConfig(_Strict):
    """Plain Keras training of the undefended (control) model."""

    epochs: int = Field(7, ge=1, le=1000)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    steps_per_execution: int = Field(
        1, ge=1, le=1024,
        description="Training steps per call of Keras' compiled function (compile's "
        "steps_per_execution). Speed only: the weights are bit-identical (tested), so it is left "
        "out of stage and study keys and a cached stage serves any value.")


def _check_eps(v: list[float]) -> list[float]:
    """In [0, 1], sorted, without duplicates. (Metric names carry ε exactly, ``eps_text``, so
    two distinct values never share a name.)"""
    for e in v:
        if not math.isfinite(e) or e < 0.0 or e > 1.0:
            raise ValueError(f"each ε must be in [0, 1] (pixel scale), got {e}")
    return sorted(set(v))


class AttackConfig(_Strict):
    """One attack beyond the FGSM sweep: an alias or any ``art.attacks.evasion`` class.

    Names and arguments are checked against ART before any training starts
    (:func:`art_study.attacks.registry.validate_attacks`). ``n_images`` and the arguments
    (iterations, restarts, queries) are the evaluation budget, logged with the results.
    """

    name: str = Field(..., min_length=1, description="Alias (pgd, apgd-ce, square, ...) or class.")
    eps: list[Eps] | None = Field(
        None, min_length=1, description="L∞ budgets (e.g. 0.3 or 8/255); unset → the "
        "evaluation's eps list."
    )
    n_images: int = Field(500, ge=1, description="The first n test images are attacked.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for ART.")
    estimator: Literal["keras", "keras-dlr", "tensorflow"] | None = Field(
        None, description="ART estimator: compiled KerasClassifier (CE or DLR loss) or "
                          "TensorFlowV2Classifier; unset → the alias's choice, else keras.")
    label: str | None = Field(
        None, description="Name in metric keys (default: the alias or class name).")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _check_eps(v)

    @property
    def key(self) -> str:
        """The attack's name in metric keys: ``attack/<key>/accuracy_eps_0.3``."""
        return (self.label or self.name).lower()


class DiagnosticsConfig(_Strict):
    """Gradient-masking checks after Carlini et al. 2019 (see ``art_study/diagnostics.py``)."""

    enabled: bool = True
    tolerance: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Accuracy slack for paired comparisons on the same images (sampling noise).")
    destroy_eps: float = Field(
        0.5, gt=0.0, le=1.0,
        description="An L∞ budget at which every digit can be made grey: accuracy must fall.")
    chance_margin: float = Field(
        0.1, ge=0.0, le=1.0, description="Accuracy at destroy_eps must be ≤ chance + margin.")
    n_images: int = Field(500, ge=1, description="Images for the diagnostic attacks.")
    pgd_steps: int = Field(
        20, ge=1, description="PGD iterations; the 'more iterations' check runs 5× as many.")


class EvaluationConfig(_Strict):
    """FGSM sweep (ours and ART's, cross-checked), stronger attacks, transfer, diagnostics."""

    eps: list[Eps] = Field(
        default_factory=lambda: list(DEFAULT_EPS), min_length=1,
        description="The FGSM sweep's L∞ budgets (0.1, or 8/255); unset → the dataset's grid.")
    n_attack: int | None = Field(
        None, ge=1, description="Test images attacked (the first n of the test set); all if unset."
    )
    xcheck_images: int | None = Field(
        None, ge=1,
        description="Images on which ART's FGSM re-does ours for the cross-check; all if unset.")
    batch_size: int = Field(500, ge=1)
    attacks: list[AttackConfig] = Field(default_factory=list)
    transfer: list[str] = Field(
        default_factory=list,
        description="Attacks (keys of `attacks`, or fgsm) crafted on the control model of the "
                    "same depth and seed and evaluated on this model.")
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, v: list[float]) -> list[float]:
        return _check_eps(v)

    @model_validator(mode="after")
    def _unique_attack_keys(self) -> EvaluationConfig:
        keys = [a.key for a in self.attacks]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"attack names must be unique (set `label`): {', '.join(dupes)}")
        unknown = sorted(set(self.transfer) - {*keys, "fgsm"})
        if unknown:
            raise ValueError(f"transfer names unknown attacks {unknown}; known: "
                             f"{', '.join(['fgsm', *keys])}")
        return self


class NumericsConfig(_Strict):
    """How TensorFlow computes: ``fast`` (its defaults: oneDNN where its policy turns it on, a
    thread per core) or ``portable`` (oneDNN off, the thread counts below, deterministic ops),
    whose numbers do not depend on the core count and match on any x86 CPU with the same cache
    sizes (``art_study/numerics.py``). Written ``numerics: portable`` or as a mapping."""

    mode: Literal["fast", "portable"] = "fast"
    intra_op_threads: int = Field(
        2, ge=1, le=1024, description="Threads within an op, in portable mode only.")
    inter_op_threads: int = Field(
        2, ge=1, le=1024, description="Ops run at once, in portable mode only.")

    @model_validator(mode="before")
    @classmethod
    def _mode_alone(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v


class TrackingConfig(_Strict):
    """Where runs go. ``uri`` unset → $MLFLOW_TRACKING_URI → sqlite store under ./mlruns."""

    uri: str | None = None
    experiment: str = Field("art-study", min_length=1)
    log_model: bool = True


#: Keywords a study block may use in ``sequences`` instead of an explicit list of defenses.
SEQUENCE_KEYWORDS = ("control", "singles", "pairs", "triples")


def _check_epochs(v: list[int]) -> list[int]:
    if any(e < 1 for e in v):
        raise ValueError("every stage needs at least 1 epoch")
    return v


def _check_seeds(v: list[int]) -> list[int]:
    if any(s < 0 or s >= 2**31 for s in v) or len(set(v)) != len(v):
        raise ValueError("seeds must be distinct integers in [0, 2^31)")
    return v


class StudyBlock(_Strict):
    """A set of sequences trained at each of a set of depths (and, optionally, its own seeds)."""

    depths: list[int] = Field(..., min_length=1)
    seeds: list[int] | None = Field(
        None, min_length=1,
        description="This block's seeds; unset → study.seeds. Lets a study run its main block "
        "at three seeds and a costly extension (e.g. deeper nets) at one.")
    stage_epochs: list[int] | None = Field(
        None, min_length=1, max_length=3,
        description="This block's epochs per stage; unset → study.stage_epochs. Lets one study "
        "train the paper's defenses 4 + 3 epochs and a robust recipe as one stage of its own "
        "length (its warm-up and one-cycle schedule span the stage, which a second stage of "
        "itself would restart).")
    evaluation: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the study's `evaluation` for this block's runs, merged into it "
        "(mappings key by key, a list such as `attacks` replaced whole) and validated like it: "
        "e.g. the headline models attacked on more images than a costly extension.")
    sequences: list[str | list[str]] = Field(
        ..., min_length=1,
        description="'control', 'singles', 'pairs', 'triples', or an explicit list of defenses "
        "applied in order, e.g. [adversarial_training, gradient_masking].",
    )

    @field_validator("depths")
    @classmethod
    def _depths_in_range(cls, v: list[int]) -> list[int]:
        for d in v:
            if not 2 <= d <= 5:
                raise ValueError(f"each depth (n_conv) must be in 2..5, got {d}")
        return v

    @field_validator("seeds")
    @classmethod
    def _block_seeds_valid(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else _check_seeds(v)

    @field_validator("stage_epochs")
    @classmethod
    def _block_epochs_positive(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else _check_epochs(v)

    @field_validator("sequences")
    @classmethod
    def _known_keywords(cls, v: list[str | list[str]]) -> list[str | list[str]]:
        for item in v:
            if isinstance(item, str) and item not in SEQUENCE_KEYWORDS:
                raise ValueError(
                    f"unknown sequence keyword {item!r}; use one of {', '.join(SEQUENCE_KEYWORDS)}"
                    " or a list of defense names"
                )
            if isinstance(item, list) and not item:
                raise ValueError("an explicit sequence needs at least one defense")
        return v


class StudySection(_Strict):
    """Expands one config into runs over sequences × depths × seeds (one MLflow child each).

    A sequence of k defenses trains ``stage_epochs[i]`` epochs with its i-th defense, saving the
    model as ``.h5`` and reloading it between stages (the paper: 4 + 3). The control and single
    defenses are trained as the first two stages of themselves (4 + 3 epochs of the same
    defense), so they get the same budget as a pair and share its first stage.
    """

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    stage_epochs: list[int] = Field(default_factory=lambda: [4, 3], min_length=2, max_length=3)
    defenses: list[str] = Field(
        default_factory=lambda: ["adversarial_training", "distillation", "gradient_masking"],
        min_length=1, description="The defenses that 'singles', 'pairs' and 'triples' combine.",
    )
    blocks: list[StudyBlock] = Field(..., min_length=1)
    cache_dir: str | None = Field(
        None, description="Stage cache: a directory, or an object store by URI "
        "(s3://BUCKET/PREFIX; endpoint and credentials from the environment); default: "
        "stage-cache/ beside a local sqlite store, else ./mlruns/stage-cache.",
    )
    numerics_strict: bool = Field(
        False, description="Make the numerics fingerprint part of every stage key, so a cached "
        "stage serves only the machine settings that trained it. Off: a cache shared by a team "
        "or a Ray cluster serves every machine, and runs tag stages trained under another "
        "fingerprint.",
    )
    # `register` in YAML; as a field name it would shadow ABCMeta.register of the model class.
    register_models: bool = Field(
        False, alias="register",
        description="Register each run's model in the MLflow Model Registry under the "
        "study's name, with its robustness as tags and @most-robust on the most robust.")

    @field_validator("seeds")
    @classmethod
    def _seeds_valid(cls, v: list[int]) -> list[int]:
        return _check_seeds(v)

    def all_seeds(self) -> list[int]:
        """Every seed some block runs, in order of first appearance (data is loaded per seed)."""
        seeds = [s for b in self.blocks for s in (b.seeds or self.seeds)]
        return list(dict.fromkeys(seeds))

    @field_validator("stage_epochs")
    @classmethod
    def _epochs_positive(cls, v: list[int]) -> list[int]:
        return _check_epochs(v)

    def block_epochs(self, index: int) -> list[int]:
        """The epochs per stage of block ``index``: its own, else the study's."""
        return self.blocks[index].stage_epochs or self.stage_epochs

    @model_validator(mode="after")
    def _sequences_fit_their_stages(self) -> StudySection:
        for i, block in enumerate(self.blocks):
            epochs = self.block_epochs(i)
            where = f"block {i}: " if block.stage_epochs else ""
            for item in block.sequences:
                # control, singles, pairs: two stages; triples three; a list one per defense
                needed = len(item) if isinstance(item, list) else 3 if item == "triples" else 2
                if needed <= len(epochs):
                    continue
                if needed == 3:
                    raise ValueError(f"{where}sequences of three defenses need three "
                                     "stage_epochs, e.g. [4, 3, 3]")
                if isinstance(item, list):
                    raise ValueError(f"{where}an explicit sequence is longer than stage_epochs")
                raise ValueError(f"{where}{item!r} trains two stages; its block's stage_epochs "
                                 f"{epochs} has one")
        return self


class ExperimentConfig(_Strict):
    """One experiment, or a whole study when ``study`` is set.

    Without ``study``: data → model → ``train.epochs`` of plain training → FGSM evaluation →
    one MLflow run. With ``study``: the same path for every (sequence, depth, seed), each an
    MLflow child run of one parent run.
    """

    name: str = Field(..., min_length=1)
    seed: int = Field(0, ge=0, lt=2**31)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    defenses: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings per defense name, validated by that defense's Settings model.",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    numerics: NumericsConfig = Field(default_factory=NumericsConfig)
    study: StudySection | None = None

    @model_validator(mode="before")
    @classmethod
    def _dataset_eps(cls, raw: Any) -> Any:
        """An evaluation without ``eps`` sweeps its dataset's grid (MNIST's is DEFAULT_EPS)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            return raw
        spec = DATASETS.get(raw["data"].get("name"))
        evaluation = raw.get("evaluation", {})
        if spec is None or not isinstance(evaluation, dict) or "eps" in evaluation:
            return raw
        return {**raw, "evaluation": {**evaluation, "eps": list(spec.eps)}}

    def block_evaluation(self, index: int, source: str = "<mapping>") -> EvaluationConfig:
        """The evaluation of study block ``index``'s runs: ``evaluation`` with the block's
        overrides merged in, validated (a one-line ConfigError naming the block's key)."""
        assert self.study is not None
        overrides = self.study.blocks[index].evaluation
        if not overrides:
            return self.evaluation
        try:
            return EvaluationConfig.model_validate(merge(self.evaluation.model_dump(), overrides))
        except ValidationError as err:
            where = ("study", "blocks", index, "evaluation")
            raise ConfigError(_format_error(err, source, where)) from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings key by key, any other value replaced."""
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def _format_error(err: ValidationError, source: str, where: tuple[str | int, ...] = ()) -> str:
    """One line naming every offending key, e.g. ``model.n_conv: ... (got 7)``; ``where``
    prefixes each key (a nested section validated on its own)."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in (*where, *e["loc"])) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{key}: {msg}")
    return f"invalid config {source}: " + "; ".join(parts)


class _Loader(yaml.SafeLoader):
    """YAML as a person means it: ``010`` is ten, not YAML 1.1's octal eight.

    A seed or a count written with a leading zero is read as a decimal number (``0o10`` and
    ``0x10`` keep their explicit bases), in config files and ``--set`` values alike.
    """


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    digits = text.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and digits.isdigit():
        return int(text, 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def read_yaml(text: str) -> Any:
    """Parse YAML with :class:`_Loader` (safe; leading zeros are decimal)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: builds plain data only


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so numbers and lists keep their type."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML") from exc
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw mapping (creating intermediate sections)."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_mapping(raw: dict[str, Any], source: str = "<mapping>") -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` or raise a one-line ConfigError."""
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    for i in range(len(cfg.study.blocks) if cfg.study else 0):
        cfg.block_evaluation(i, source)  # each block's merged evaluation is valid too
    return cfg


#: Keys that name or place an experiment without saying anything about it: a file with only
#: these (or nothing) is refused rather than run as the default 7-epoch full-MNIST experiment.
NOTHING_TO_RUN = frozenset({"name", "tracking"})


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML study file, apply ``--set`` overrides and validate.

    An empty file (or one that only names the experiment or its store) is an error: it is
    far more often a wrong path or an unsaved editor buffer than a wish for every default.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{where}") from None
    if raw is None or raw == {}:
        raise ConfigError(f"config {path} is empty: nothing to run (see configs/smoke.yaml "
                          "for a small one)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    if set(raw) <= NOTHING_TO_RUN:
        raise ConfigError(f"config {path} has nothing to run: it sets only "
                          f"{', '.join(sorted(raw))} (add a model, train, evaluation or study "
                          "section)")
    raw.setdefault("name", path.stem)
    return config_from_mapping(apply_overrides(raw, overrides or []), str(path))


def flatten(cfg: BaseModel) -> dict[str, str]:
    """Flatten a config to ``section.key -> str`` for MLflow params (lists as compact YAML)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            out[prefix] = yaml.safe_dump(value, default_flow_style=True).strip()
        else:
            out[prefix] = "null" if value is None else str(value)

    walk("", cfg.model_dump(mode="json", by_alias=True))
    return out


def to_yaml(cfg: BaseModel) -> str:
    """The fully resolved config (defaults filled in) as YAML: what reproduces a run."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
