"""Expand a config into runs, and each run into a chain of stages keyed by everything before them.

Sequences share prefixes: AT→DD, AT→GM and AT alone (4 + 3 epochs of AT) all begin with the same
4-epoch AT stage. A stage's key is a hash of its defense, resolved settings and epochs, plus the
key of the stage it continues from (or, for a first stage, the model, training and data config and
the seed). Equal keys mean equal work, so the executor trains each distinct stage once and a
resumed study finds it in the cache.

Planning validates every defense name and setting, so a typo fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from art_study.config import EvaluationConfig, ExperimentConfig
from art_study.errors import ConfigError

if TYPE_CHECKING:
    from art_study.datasets import DatasetSpec
    from art_study.defenses import DefenseSettings

PLAN_VERSION = 1  # bump when the meaning of a stage changes, to invalidate cached stages
# Version of what a run's evaluation measures, part of every run key (not of stage keys: the
# trained models stay valid). Bump it whenever the evaluation code changes what a logged number
# means, so a resumed study re-evaluates its runs instead of mixing old and new numbers.
#   1: (implicit, before the constant) FGSM sweep, ART attacks, transfer, diagnostics.
#   2: APGD with the reference step schedule and any-iterate success,
#      robust = clean-correct and not fooled for every attack, the per-image worst case over
#      attacks, diagnostics on common images and exact ε keys.
#   3: AutoAttack's standard cascade with FAB-T, its Square check and escalation, and the
#      reference's model checks.
#   4: AutoAttack in chunks of 1 000 images, each seeded by itself (resumable), and the
#      escalation's restarts as a setting (plus_restarts).
EVALUATION_VERSION = 4
# Settings that change how fast a stage trains, never its weights (tested bit for bit): left
# out of stage and study keys, so a cached stage or a resumed study serves any value of them.
SPEED_ONLY: dict[str, set[str]] = {"train": {"steps_per_execution"}}
# Where results are stored and inputs read from, not what a study is: the same study run with
# `--tracking-uri X`, `MLFLOW_TRACKING_URI=X`, another `--data-dir` (the data itself is in the
# keys by fingerprint) or another stage cache has the same keys, so it resumes.
LOCATION: dict[str, bool | set[str]] = {"tracking": True, "data": {"dir", "download", "path"},
                                        "study": {"cache_dir", "register_models"}}
# How the machine computes, not what: a study resumes under either numerics mode. Stage keys
# carry the numerics fingerprint only with ``study.numerics_strict`` (``plan_runs``).
NUMERICS: dict[str, bool | set[str]] = {"numerics": True, "study": {"numerics_strict"}}


def data_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data section as it enters stage and study keys: the dataset's name, except MNIST's
    (keys made before other datasets existed stay valid), and a local dataset's ``path`` left
    out like the other locations (its content is in the keys by fingerprint)."""
    data = cfg.data.model_dump(mode="json", exclude={*LOCATION["data"], "name"})
    if cfg.data.path is not None:
        data["name"] = "local"
    elif cfg.data.name != "mnist":
        data["name"] = cfg.data.name
    return data


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): stable across runs and machines.

    Values JSON lacks go in by :func:`_canonical`, which names functions by module and qualified
    name and refuses anything whose text is a memory address: such a key would differ in every
    process, so a resumed study would find neither its parent nor its finished runs.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(blob.encode()).hexdigest()


def _canonical(value: Any) -> str:
    """The stable text of a value JSON cannot encode (see :func:`stable_hash`). A closure is
    named by its function, not by what it captures (``_apgd("ce")`` and ``_apgd("dlr")`` read
    alike): what it captures must enter the key through another field (the attack's ``key``)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    text = str(value)
    if " at 0x" in text:
        raise TypeError(f"no stable key for {text}: its text is a memory address")
    return text


@dataclass(frozen=True)
class StageSpec:
    """One training stage: ``epochs`` of ``defense`` with ``settings``, after ``parent``."""

    index: int  # 0-based position in its sequence
    defense: str
    settings: dict[str, Any]
    epochs: int
    parent: StageSpec | None
    key: str
    # The key of the ``none`` stage in the same place (same parent, position and epochs), for a
    # first stage whose defense is plain training followed by a transformation
    # (``Defense.after_plain``): its training part *is* that stage, which the control of the same
    # depth and seed trains first, so ``stages.train_stage`` starts from it. Not part of ``key``.
    plain_key: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One MLflow run: a sequence of stages at one depth and seed, then the evaluation."""

    sequence: str  # e.g. "adversarial_training>gradient_masking"; "none" for the control
    depth: int
    seed: int
    stages: tuple[StageSpec, ...]
    config: ExperimentConfig  # resolved for this run (model.n_conv = depth, seed = seed)
    key: str
    # The last stage of the undefended control at the same depth and seed, on which transfer
    # attacks are crafted (``evaluation.transfer``); None for the control itself.
    reference: StageSpec | None = None

    @property
    def name(self) -> str:
        return f"{self.sequence} | {self.depth}conv | seed {self.seed}"


def resolve_settings(cfg: ExperimentConfig, defense: str) -> dict[str, Any]:
    """The defense's settings with defaults filled in, validated by its ``Settings`` model."""
    from art_study.defenses import DEFENSES

    if defense not in DEFENSES:
        raise ConfigError(
            f"unknown defense {defense!r}; available: {', '.join(sorted(DEFENSES))}"
        )
    try:
        settings = DEFENSES[defense].settings.model_validate(cfg.defenses.get(defense, {}))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(["defenses", defense, *(str(p) for p in e["loc"])])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        raise ConfigError(f"invalid config: {key}: {msg}") from None
    return settings.model_dump(mode="json")


def check_defense_sections(cfg: ExperimentConfig) -> None:
    """Every key of the ``defenses:`` map names a defense: a misspelt one
    (``adversarial_trainin``) would otherwise be ignored, and the defense trained with its
    defaults."""
    import difflib

    from art_study.defenses import DEFENSES

    for name in sorted(set(cfg.defenses) - set(DEFENSES)):
        close = difflib.get_close_matches(name, DEFENSES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(DEFENSES)}"
        raise ConfigError(f"invalid config: defenses.{name}: unknown defense; {hint}")


def expand_sequences(cfg: ExperimentConfig, items: list[str | list[str]]) -> list[tuple[str, ...]]:
    """Keywords → explicit defense chains, in a stable order without duplicates.

    ``control`` and ``singles`` repeat their defense for the first two stages (4 + 3 epochs of
    itself); ``pairs``/``triples`` are every ordered combination of distinct defenses.
    """
    assert cfg.study is not None
    defenses = cfg.study.defenses
    out: list[tuple[str, ...]] = []
    for item in items:
        if item == "control":
            chains = [("none", "none")]
        elif item == "singles":
            chains = [(d, d) for d in defenses]
        elif item == "pairs":
            chains = list(itertools.permutations(defenses, 2))
        elif item == "triples":
            chains = list(itertools.permutations(defenses, 3))
        else:
            chains = [tuple(item)]
        out += [c for c in chains if c not in out]
    return out


def sequence_name(chain: tuple[str, ...]) -> str:
    """``(AT, AT)`` → ``adversarial_training``; ``(AT, GM)`` → ``AT>GM`` (full names)."""
    return chain[0] if len(set(chain)) == 1 else ">".join(chain)


def _run_config(cfg: ExperimentConfig, depth: int, seed: int,
                evaluation: EvaluationConfig) -> ExperimentConfig:
    """The config of one run: the study's, at ``depth`` and ``seed``, with its block's
    ``evaluation``."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.model.n_conv = depth
    run_cfg.seed = seed
    run_cfg.study = None
    run_cfg.evaluation = evaluation.model_copy(deep=True)
    return run_cfg


def key_settings(model: type[DefenseSettings], settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that enter a stage key: those added later are left out at the value that
    trains as before they existed (``key_defaults``), so older cached stages keep their keys."""
    omit = model.key_defaults
    return {k: v for k, v in settings.items() if not (k in omit and omit[k] == v)}


def _stage_chain(cfg: ExperimentConfig, chain: tuple[str, ...], epochs: list[int],
                 fingerprint: str, numerics_id: str | None = None) -> tuple[StageSpec, ...]:
    from art_study.defenses import DEFENSES

    root = {
        "version": PLAN_VERSION,
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude=SPEED_ONLY["train"]),
        "data": {**data_identity(cfg), "fingerprint": fingerprint},
        "seed": cfg.seed,
    }
    if numerics_id is not None:  # absent by default, so shared caches keep their keys
        root["numerics"] = numerics_id
    stages: list[StageSpec] = []
    parent_key = stable_hash(root)
    for i, (defense, n) in enumerate(zip(chain, epochs, strict=True)):
        settings, key = _stage_key(cfg, parent_key, i, defense, n)
        plain_key = None
        if i == 0 and defense != "none" and DEFENSES[defense].after_plain is not None:
            plain_key = _stage_key(cfg, parent_key, i, "none", n)[1]
        stages.append(StageSpec(i, defense, settings, n, stages[-1] if stages else None, key,
                                plain_key))
        parent_key = key
    return tuple(stages)


def _stage_key(cfg: ExperimentConfig, parent_key: str, index: int, defense: str,
               epochs: int) -> tuple[dict[str, Any], str]:
    """A stage's resolved settings and its key: everything before it and all it does."""
    from art_study.defenses import DEFENSES

    settings = resolve_settings(cfg, defense)
    settings_model = DEFENSES[defense].settings
    material = {"parent": parent_key, "index": index, "defense": defense,
                "settings": key_settings(settings_model, settings), "epochs": epochs}
    implementation = settings_model.implementation
    if implementation > 1:  # absent at 1, so keys made before versions existed stay valid
        material["implementation"] = implementation
    return settings, stable_hash(material)


def plan_runs(cfg: ExperimentConfig, fingerprints: dict[int, str],
              numerics_id: str | None = None, spec: DatasetSpec | None = None
              ) -> list[RunSpec]:
    """Every run of the config, in execution order (depth, seed, then sequence).

    ``fingerprints`` maps each seed to the fingerprint of the data that seed's runs use (subsets
    are seeded), so a stage trained on other data never matches. ``numerics_id`` (given with
    ``study.numerics_strict``) enters every stage key, so a stage trained under another numerics
    fingerprint never matches either.

    ``spec`` is the loaded data's (input shape, classes): the attacks check their values on a
    model of that shape before any training. Without it, the config's named dataset is taken;
    a local dataset (``data.path``), whose shape only its data tells, then has its attacks'
    names and arguments checked, their values only once a run passes its data.
    """
    check_defense_sections(cfg)
    if cfg.study is None:  # a single experiment: one stage of plain training
        chain = ("none",)
        blocks = [([cfg.model.n_conv], [cfg.seed], [chain], cfg.evaluation, [cfg.train.epochs])]
    else:
        blocks = [(b.depths, b.seeds or cfg.study.seeds, expand_sequences(cfg, b.sequences),
                   cfg.block_evaluation(i), cfg.study.block_epochs(i))
                  for i, b in enumerate(cfg.study.blocks)]
    if spec is None and cfg.data.path is None:
        from art_study.datasets import DATASETS

        spec = DATASETS[cfg.data.name]
    runs: list[RunSpec] = []
    # A run two blocks both plan (same sequence, depth, seed) is run once if both plan it
    # alike, and refused if they differ: keeping one silently would drop the other's epochs
    # or evaluation.
    seen: dict[tuple[str, int, int], tuple[int, str]] = {}
    for block, (depths, seeds, chains, evaluation, epochs) in enumerate(blocks):
        if evaluation.attacks and spec is not None:
            from art_study.attacks.registry import validate_attacks

            # a bad attack fails here, before any training
            validate_attacks(evaluation, spec)
        for depth, seed, chain in itertools.product(depths, seeds, chains):
            name = sequence_name(chain)
            run_cfg = _run_config(cfg, depth, seed, evaluation)
            stages = _stage_chain(run_cfg, chain, epochs[: len(chain)], fingerprints[seed],
                                  numerics_id)
            key = stable_hash({"stages": stages[-1].key, **evaluation_identity(run_cfg)})
            first = seen.get((name, depth, seed))
            if first is None:
                seen[name, depth, seed] = (block, key)
                runs.append(RunSpec(name, depth, seed, stages, run_cfg, key))
            elif first[1] != key:
                raise ConfigError(
                    f"invalid config: study.blocks: blocks {first[0]} and {block} both plan "
                    f"{name} at depth {depth}, seed {seed}, with different stages or "
                    "evaluation; plan it in one block")
    return _with_references(runs)


def evaluation_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a run's evaluation is, for its key (``cfg``: the run's config, with its block's
    evaluation): the evaluation config, every attack as ART will
    run it (alias defaults merged with the configured arguments, class, step, estimator, ε), and
    :data:`EVALUATION_VERSION`. A changed alias default or evaluation code thus changes the run
    key, and a resumed study re-evaluates rather than mixing budgets."""
    from art_study.attacks.registry import resolve

    attacks = []
    for attack in cfg.evaluation.attacks:
        resolved = resolve(attack, cfg.evaluation.eps)
        # Every resolved field (class, merged arguments, step, estimator, ε, ...), so a field
        # the registry gains later is covered too; the config itself is in "evaluation".
        fields = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)
                  if f.name != "cfg"}
        attacks.append({**fields, "cls": resolved.cls.__name__, "key": resolved.key})
    return {"evaluation": cfg.evaluation.model_dump(mode="json"), "attacks": attacks,
            "evaluation_version": EVALUATION_VERSION}


def key_exclude() -> dict[str, bool | set[str]]:
    """Config fields left out of study keys: speed-only settings, locations, numerics."""
    out: dict[str, bool | set[str]] = {k: set(v) for k, v in SPEED_ONLY.items()}
    for section, fields in [*LOCATION.items(), *NUMERICS.items()]:
        out[section] = True if fields is True else {*out.get(section, set()), *fields}
    return out


def study_key(cfg: ExperimentConfig, runs: list[RunSpec]) -> str:
    """The identity of a study's parent run: its name, config and runs (a rerun of the same
    command finds the parent by it and resumes); speed-only settings and where results are
    stored or data read from (:data:`LOCATION`) left out."""
    config = {**cfg.model_dump(mode="json", exclude=key_exclude()), "data": data_identity(cfg)}
    for block in (config["study"] or {}).get("blocks", []):
        if not block["evaluation"]:  # in its runs' keys; out when empty, as before blocks had one
            del block["evaluation"]
        if block["stage_epochs"] is None:  # out when unset, as before blocks had their own
            del block["stage_epochs"]
    return stable_hash({"name": cfg.name, "config": config, "runs": [r.key for r in runs]})


def _with_references(runs: list[RunSpec]) -> list[RunSpec]:
    """Point every defended run with ``evaluation.transfer`` at the control of its depth and
    seed (the transfer source).

    The control must be part of the plan: it is trained and evaluated as a run of its own
    before the defended runs of its depth and seed, so its model is in the stage cache when
    they need it. The examples are crafted once per control, so the runs that share one must
    share their evaluation.
    """
    controls = {(r.depth, r.seed): r for r in runs
                if all(s.defense == "none" for s in r.stages)}
    crafting: dict[tuple[int, int], RunSpec] = {}
    out = []
    for r in runs:
        if all(s.defense == "none" for s in r.stages) or not r.config.evaluation.transfer:
            out.append(r)
            continue
        control = controls.get((r.depth, r.seed))
        if control is None:
            raise ConfigError(
                f"evaluation.transfer needs the undefended control at depth {r.depth}, seed "
                f"{r.seed} (for {r.sequence}): add `control` to that block's sequences")
        first = crafting.setdefault((r.depth, r.seed), r)
        if first.config.evaluation != r.config.evaluation:
            raise ConfigError(
                f"{first.sequence} and {r.sequence} at depth {r.depth}, seed {r.seed} share the "
                "control their transfer examples are crafted on, so they need the same "
                "evaluation: give their blocks the same `evaluation` overrides")
        out.append(dataclasses.replace(r, reference=control.stages[-1]))
    # Each control runs before the first run that needs it, so its model exists by then.
    ordered: list[RunSpec] = []
    for r in out:
        control = controls.get((r.depth, r.seed)) if r.reference is not None else None
        if control is not None and control not in ordered:
            ordered.append(control)
        if r not in ordered:
            ordered.append(r)
    return ordered


def distinct_stages(runs: list[RunSpec]) -> dict[str, StageSpec]:
    """Every distinct stage of the plan (what the study really trains), by key."""
    return {s.key: s for r in runs for s in r.stages}
