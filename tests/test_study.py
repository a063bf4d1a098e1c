"""The study: plan (no training), the tiny study end to end, resume, determinism."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from art_study.config import ExperimentConfig, load_config
from art_study.errors import ConfigError
from art_study.study import distinct_stages, plan_runs, run_study
from art_study.study.plan import study_key

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SINGLE_PAIRS = 1 + 3 + 6  # control, each defense alone, every ordered pair


def fake_fingerprints(cfg):
    seeds = cfg.study.all_seeds() if cfg.study else [cfg.seed]
    return {s: f"data-{s}" for s in seeds}


# -- planning (no training) ----------------------------------------------------------------------
def test_paper_plan_shape() -> None:
    cfg = load_config(REPO / "configs" / "paper.yaml")
    runs = plan_runs(cfg, fake_fingerprints(cfg))
    seeds = len(cfg.study.seeds)
    assert seeds >= 3
    base = [r for r in runs if r.depth == 2]
    assert len({r.sequence for r in base}) == SINGLE_PAIRS
    for depth in (3, 4, 5):
        assert {r.sequence for r in runs if r.depth == depth} == {
            "none", "adversarial_training", "distillation", "gradient_masking"}
    assert len(runs) == seeds * (SINGLE_PAIRS + 3 * 4)
    # Prefix sharing: per seed, 4 first stages per depth + one second stage per sequence.
    assert len(distinct_stages(runs)) == seeds * ((4 + SINGLE_PAIRS) + 3 * (4 + 4))


def test_robust_plan_runs_its_deep_block_at_its_own_seed() -> None:
    """robust.yaml: three seeds at 2 conv, the costly depths 3-5 at seed 0 only (a block's own
    `seeds`), each defended run with its control of the same depth and seed for transfer."""
    cfg = load_config(REPO / "configs" / "robust.yaml")
    runs = plan_runs(cfg, fake_fingerprints(cfg))
    at2 = {(r.sequence, r.seed) for r in runs if r.depth == 2}
    assert at2 == {(s, seed) for s in ("none", "pgd_adversarial_training", "trades")
                   for seed in (0, 1, 2)}
    deep = {(r.sequence, r.depth, r.seed) for r in runs if r.depth > 2}
    assert deep == {(s, d, 0) for s in ("none", "pgd_adversarial_training") for d in (3, 4, 5)}
    for r in runs:
        if r.sequence != "none":
            assert r.reference is not None and r.reference.key == next(
                c.stages[-1].key for c in runs
                if (c.sequence, c.depth, c.seed) == ("none", r.depth, r.seed))


def test_a_blocks_stage_epochs_train_its_sequences_only(tmp_path: Path) -> None:
    """fashion.yaml: the paper's defenses 4 + 3 epochs, the robust recipe one stage of 8 (its
    block's own `stage_epochs`), as in robust.yaml; a block that repeats the study's epochs
    keeps every key it had without them."""
    cfg = load_config(REPO / "configs" / "fashion.yaml")
    runs = plan_runs(cfg, fake_fingerprints(cfg))
    epochs = {r.sequence: [s.epochs for s in r.stages] for r in runs}
    assert epochs["none"] == epochs["adversarial_training>distillation"] == [4, 3]
    assert epochs["pgd_adversarial_training"] == epochs["trades"] == [8]
    assert {r.seed for r in runs if r.sequence == "trades"} == {0, 1, 2}

    def tiny_with(stage_epochs: list[int]) -> Path:
        raw = yaml.safe_load(TINY.read_text())
        raw["study"]["blocks"][0]["stage_epochs"] = stage_epochs
        (path := tmp_path / f"tiny-{len(stage_epochs)}-{stage_epochs[0]}.yaml").write_text(
            yaml.safe_dump(raw))
        return path

    tiny = load_config(TINY)
    same = load_config(tiny_with(tiny.study.stage_epochs))
    before = plan_runs(tiny, fake_fingerprints(tiny))
    after = plan_runs(same, fake_fingerprints(same))
    assert [r.key for r in after] == [r.key for r in before]
    longer = load_config(tiny_with([2, 1]))
    changed = {r.sequence: r for r in plan_runs(longer, fake_fingerprints(longer))}
    assert [s.epochs for s in changed["none"].stages] == [2, 1]
    assert changed["none"].key != next(r.key for r in before if r.sequence == "none")
    with pytest.raises(ConfigError, match=r"block 0: 'control' trains two stages") as err:
        load_config(tiny_with([8]))
    assert "\n" not in str(err.value)


def test_two_blocks_planning_one_run_differently_are_refused(tmp_path: Path) -> None:
    """The same run (sequence, depth, seed) in two blocks is run once when both plan it alike;
    when their epochs differ the config is refused in one line, not the second silently
    dropped."""
    def tiny_blocks(blocks: list[dict]) -> ExperimentConfig:
        raw = yaml.safe_load(TINY.read_text())
        raw["study"]["blocks"] = blocks
        (path := tmp_path / f"tiny-{len(list(tmp_path.iterdir()))}.yaml").write_text(
            yaml.safe_dump(raw))
        return load_config(path)

    alike = tiny_blocks([{"depths": [2], "sequences": ["control", "singles"]},
                         {"depths": [2], "sequences": ["control"]}])
    names = [r.sequence for r in plan_runs(alike, fake_fingerprints(alike))]
    assert names.count("none") == 1 and len(names) == len(set(names)) == 4
    differ = tiny_blocks([{"depths": [2], "sequences": [["adversarial_training"]]},
                          {"depths": [2], "stage_epochs": [3],
                           "sequences": [["adversarial_training"]]}])
    with pytest.raises(ConfigError, match=r"blocks 0 and 1 both plan adversarial_training at "
                       r"depth 2, seed 0") as err:
        plan_runs(differ, fake_fingerprints(differ))
    assert "\n" not in str(err.value)


def test_grid_plan_covers_every_sequence_at_every_depth() -> None:
    cfg = load_config(REPO / "configs" / "grid.yaml")
    runs = plan_runs(cfg, fake_fingerprints(cfg))
    per_depth = SINGLE_PAIRS + 6  # + every ordered triple of the three defenses
    assert len(runs) == len(cfg.study.seeds) * 4 * per_depth
    assert {len(r.stages) for r in runs if ">" in r.sequence} == {2, 3}


def test_prefixes_are_shared_and_keys_are_stable() -> None:
    cfg = load_config(TINY)
    runs = {r.sequence: r for r in plan_runs(cfg, fake_fingerprints(cfg))}
    at = runs["adversarial_training"]
    assert at.stages[0].key == runs["adversarial_training>distillation"].stages[0].key
    assert at.stages[0].key == runs["adversarial_training>gradient_masking"].stages[0].key
    assert at.stages[1].key != runs["adversarial_training>distillation"].stages[1].key
    assert [s.epochs for s in at.stages] == [1, 1]
    again = {r.sequence: r for r in plan_runs(load_config(TINY), fake_fingerprints(cfg))}
    assert all(again[k].key == runs[k].key for k in runs)
    # Anything before a stage changes its key: the data, a setting, the epochs.
    other_data = {r.sequence: r for r in plan_runs(cfg, {0: "other"})}
    assert other_data["none"].stages[0].key != runs["none"].stages[0].key
    cfg2 = load_config(TINY, ["defenses.adversarial_training.eps=0.2"])
    changed = {r.sequence: r for r in plan_runs(cfg2, fake_fingerprints(cfg2))}
    assert changed["none"].key == runs["none"].key
    assert changed["adversarial_training"].stages[0].key != at.stages[0].key


KEYS_OF_ROBUST = """
import sys
from art_study.config import ExperimentConfig, load_config
from art_study.study import plan_runs
from art_study.study.plan import study_key
cfg = load_config(sys.argv[1])
runs = plan_runs(cfg, {s: f"data-{s}" for s in cfg.study.all_seeds()})
print(study_key(cfg, runs), *(r.key for r in runs))
"""


def test_keys_are_the_same_in_another_process() -> None:
    """A resumed study is another process: its keys must not depend on anything of this one.
    robust.yaml's attacks run art-study's compiled APGD/AutoAttack, whose factories are
    functions (their text once carried a memory address: every restart made a new parent)."""
    cfg_path = REPO / "configs" / "robust.yaml"
    cfg = load_config(cfg_path)
    runs = plan_runs(cfg, fake_fingerprints(cfg))
    assert any(a.name == "autoattack-standard" for a in cfg.evaluation.attacks)
    here = [study_key(cfg, runs), *(r.key for r in runs)]
    out = subprocess.run([sys.executable, "-c", KEYS_OF_ROBUST, str(cfg_path)],
                         capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.stdout.split() == here


def test_a_key_refuses_a_memory_address() -> None:
    from art_study.study.plan import stable_hash

    assert stable_hash({"f": stable_hash}) == stable_hash({"f": "art_study.study.plan.stable_hash"})
    with pytest.raises(TypeError, match="memory address"):
        stable_hash({"x": object()})


def test_first_gradient_masking_stage_starts_from_the_controls_stage(
        mnist_dir, tmp_path, run) -> None:
    """gradient_masking trains exactly like `none`, then masks: as a first stage it starts from
    the control's first stage when the cache has it. The model (weights and gradient noise) and
    the epochs it records are those of training it itself, bit for bit."""
    import numpy as np
    import tensorflow as tf

    from art_study.data import load_mnist
    from art_study.study.cache import StageCache
    from art_study.study.stages import train_stage

    cfg = load_config(TINY, ["data.n_train=200",
                             "defenses.gradient_masking.n_activation_samples=100"])
    data = load_mnist(mnist_dir, n_train=200, n_test=50, seed=0)
    runs = {r.sequence: r for r in plan_runs(cfg, {0: data.fingerprint})}
    plain, masked = runs["none"].stages[0], runs["gradient_masking"].stages[0]
    assert masked.plain_key == plain.key and masked.key != plain.key
    assert runs["gradient_masking>distillation"].stages[0].plain_key == plain.key
    assert runs["distillation"].stages[0].plain_key is None  # its teacher trains at T
    assert runs["none"].stages[0].plain_key is None

    shared, alone = StageCache(tmp_path / "shared"), StageCache(tmp_path / "alone")
    train_stage(plain, runs["none"].config, data, shared)
    reused = train_stage(masked, runs["gradient_masking"].config, data, shared)
    trained = train_stage(masked, runs["gradient_masking"].config, data, alone)
    assert reused.extra["plain_from"] == plain.key and "plain_from" not in trained.extra

    def figures(record):
        return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in record.history]
    assert figures(reused) == figures(trained) and "gm/masked_units" in reused.history[-1]
    a, b = shared.load_model(masked.key), alone.load_model(masked.key)
    assert [w.name for w in a.weights] == [w.name for w in b.weights]
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    x = tf.constant(data.x_test[:20])
    y = tf.one_hot(data.y_test[:20], 10)

    def gradient(model):  # twice: the noise layer's successive draws must match too
        out = []
        for _ in range(2):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.keras.losses.categorical_crossentropy(y, model(x), from_logits=True)
            out.append(tape.gradient(loss, x).numpy())
        return out
    for ga, gb in zip(gradient(a), gradient(b), strict=True):
        np.testing.assert_array_equal(ga, gb)


def test_speed_only_settings_keep_every_key() -> None:
    """steps_per_execution changes no weight (test_defenses checks it bit for bit), so stages
    cached with one value serve another, and a study resumed with it finds its parent run."""
    cfg = load_config(TINY)
    fast = load_config(TINY, ["train.steps_per_execution=16"])
    assert fast.train.steps_per_execution == 16
    before = plan_runs(cfg, fake_fingerprints(cfg))
    after = plan_runs(fast, fake_fingerprints(fast))
    assert [r.key for r in after] == [r.key for r in before]
    assert [s.key for r in after for s in r.stages] == [s.key for r in before for s in r.stages]
    assert study_key(fast, after) == study_key(cfg, before)
    slower = load_config(TINY, ["train.batch_size=32"])  # a real training change does count
    assert plan_runs(slower, fake_fingerprints(slower))[0].key != before[0].key
    assert study_key(slower, before) != study_key(cfg, before)


def test_where_results_go_is_not_what_a_study_is(monkeypatch) -> None:
    """`--tracking-uri X`, `MLFLOW_TRACKING_URI=X` (not in the config at all), `--data-dir`,
    another experiment name or stage cache: the same study, the same keys, so a rerun resumes.
    What the data is still counts (n_train)."""
    base = load_config(TINY)
    moved = load_config(TINY, ["tracking.uri=sqlite:////elsewhere/mlflow.db",
                               "data.dir=/somewhere/mnist", "data.download=false",
                               "tracking.experiment=other", "tracking.log_model=false",
                               "study.cache_dir=/shared/cache"])
    before = plan_runs(base, fake_fingerprints(base))
    after = plan_runs(moved, fake_fingerprints(moved))
    assert [r.key for r in after] == [r.key for r in before]
    assert [s.key for r in after for s in r.stages] == [s.key for r in before for s in r.stages]
    assert study_key(moved, after) == study_key(base, before)
    smaller = load_config(TINY, ["data.n_train=200"])
    assert study_key(smaller, plan_runs(smaller, fake_fingerprints(smaller))) != \
        study_key(base, before)


def test_run_keys_cover_resolved_attack_budgets_and_evaluation_version(monkeypatch) -> None:
    """Same config, but an alias default (PGD's iterations) or the evaluation code changed:
    every run key changes, stage keys do not (the trained models stay valid)."""
    from art_study.attacks import registry
    from art_study.study import plan

    cfg = load_config(TINY, ["evaluation.attacks=[{name: pgd, eps: [0.1], n_images: 20}]"])
    before = plan_runs(cfg, fake_fingerprints(cfg))
    pgd = registry.ALIASES["pgd"]
    monkeypatch.setitem(registry.ALIASES, "pgd", dataclasses.replace(
        pgd, defaults={**pgd.defaults, "max_iter": pgd.defaults["max_iter"] + 10}))
    stronger = plan_runs(cfg, fake_fingerprints(cfg))
    monkeypatch.undo()
    _only_run_keys_changed(cfg, stronger, before)
    monkeypatch.setattr(plan, "EVALUATION_VERSION", plan.EVALUATION_VERSION + 1)
    _only_run_keys_changed(cfg, plan_runs(cfg, fake_fingerprints(cfg)), before)


def _only_run_keys_changed(cfg, changed: list, before: list) -> None:
    assert all(a.key != b.key for a, b in zip(changed, before, strict=True))
    assert [s.key for r in changed for s in r.stages] == [s.key for r in before for s in r.stages]
    assert study_key(cfg, changed) != study_key(cfg, before)


def test_a_new_implementation_of_a_defense_invalidates_only_its_stages(monkeypatch) -> None:
    from art_study.defenses import DEFENSES

    cfg = load_config(TINY)
    before = {r.sequence: r for r in plan_runs(cfg, fake_fingerprints(cfg))}
    settings = DEFENSES["distillation"].settings
    monkeypatch.setattr(settings, "implementation", settings.implementation + 1)
    after = {r.sequence: r for r in plan_runs(cfg, fake_fingerprints(cfg))}
    assert after["none"].key == before["none"].key
    assert after["distillation"].stages[0].key != before["distillation"].stages[0].key
    seq = "adversarial_training>distillation"
    assert after[seq].stages[0].key == before[seq].stages[0].key
    assert after[seq].stages[1].key != before[seq].stages[1].key


def stage_keys(cfg) -> list[str]:
    return [s.key for r in plan_runs(cfg, fake_fingerprints(cfg)) for s in r.stages]


def stage_keys_without_option(monkeypatch, cfg, option: str) -> list[str]:
    """The stage keys ``cfg`` had before a defense gained ``option``: its settings dumped
    without it."""
    from art_study.study import plan

    resolve = plan.resolve_settings
    monkeypatch.setattr(plan, "resolve_settings", lambda c, name: {
        k: v for k, v in resolve(c, name).items() if k != option})
    keys = stage_keys(cfg)
    monkeypatch.undo()
    return keys


@pytest.mark.parametrize("defense", ["adversarial_training", "adversarial_training_fast"])
def test_an_added_option_at_its_old_behaviour_keeps_stage_keys(monkeypatch, defense) -> None:
    """``labels`` came after stages were cached: at ``true`` (how those stages were trained) a
    stage keeps the key its settings had without the option; ``predicted`` is new work."""

    overrides = [f"study.defenses=[{defense}]"]
    cfg = load_config(TINY, overrides)
    now = stage_keys(cfg)
    assert now == stage_keys_without_option(monkeypatch, cfg, "labels")
    explicit = load_config(TINY, [*overrides, f"defenses.{defense}.labels=true"])
    assert [s.key for r in plan_runs(explicit, fake_fingerprints(cfg))
            for s in r.stages] == now
    predicted = load_config(TINY, [*overrides, f"defenses.{defense}.labels=predicted"])
    runs = {r.sequence: r for r in plan_runs(predicted, fake_fingerprints(cfg))}
    assert runs[defense].stages[0].key not in now
    assert runs[defense].stages[0].settings["labels"] == "predicted"
    assert runs["none"].stages[0].key in now


def test_trades_in_the_authors_kl_mode_keeps_the_stage_keys_it_had(monkeypatch) -> None:
    """``kl_mode`` came after TRADES stages were cached, with a new default: ``independent``
    (how those stages were trained) keeps the key its settings had without the option; the
    default ``shared`` trains differently, so it is new work."""

    overrides = ["study.defenses=[trades]"]
    authors = load_config(TINY, [*overrides, "defenses.trades.kl_mode=independent"])
    now = stage_keys(authors)
    assert now == stage_keys_without_option(monkeypatch, authors, "kl_mode")
    default = load_config(TINY, overrides)
    runs = {r.sequence: r for r in plan_runs(default, fake_fingerprints(default))}
    assert runs["trades"].stages[0].settings["kl_mode"] == "shared"
    assert runs["trades"].stages[0].key not in now
    assert runs["none"].stages[0].key in now


@pytest.mark.parametrize(
    ("override", "needle"),
    [("study.defenses=[adversarial_training,typo]", "unknown defense 'typo'"),
     ("defenses.adversarial_training.bogus=1", "defenses.adversarial_training.bogus"),
     ("study.blocks=[{depths: [6], sequences: [control]}]", "depth"),
     ("study.blocks=[{depths: [2], sequences: [everything]}]", "everything")],
)
def test_bad_study_configs_fail_before_training(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        cfg = load_config(TINY, [override])
        plan_runs(cfg, fake_fingerprints(cfg))


# -- the tiny study end to end -------------------------------------------------------------------
def children(uri: str, parent: str) -> list:
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("art-study")
    return mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                              output_format="list")


def has_noise_layer(stages: list[str]) -> bool:
    """GM adds the noise layer; a later distillation deploys a fresh student without it."""
    if "gradient_masking" not in stages:
        return False
    last = len(stages) - 1 - stages[::-1].index("gradient_masking")
    return "distillation" not in stages[last + 1:]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, mnist_dir):
    """The tiny study, run once for the read-only assertions below."""
    store = tmp_path_factory.mktemp("tiny")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = load_config(TINY, [f"tracking.uri={uri}", f"data.dir={mnist_dir}"])
    result = run_study(cfg, progress=False)
    return cfg, uri, result


def test_tiny_study_creates_every_child_once(tiny_study) -> None:
    _cfg, uri, result = tiny_study
    kids = children(uri, result.parent_run_id)
    assert len(kids) == SINGLE_PAIRS
    assert all(k.info.status == "FINISHED" for k in kids)
    seqs = {k.data.tags["sequence"] for k in kids}
    assert len(seqs) == SINGLE_PAIRS
    assert {"none", "adversarial_training", "distillation", "gradient_masking",
            "adversarial_training>gradient_masking", "gradient_masking>distillation"} <= seqs
    for k in kids:
        assert k.data.tags["depth"] == "2" and k.data.tags["seed"] == "0"
        m = k.data.metrics
        for key in ("clean/accuracy", "fgsm_custom/accuracy_eps_0.1",
                    "fgsm_art/accuracy_eps_0.1", "stage1/time_s", "stage2/time_s",
                    "train/loss"):
            assert key in m, (k.data.tags["sequence"], key)
        # Every model gets the gradient-masking verdict; defended ones the transfer attack
        # crafted on the control of their depth and seed (tiny.yaml: transfer [fgsm]).
        assert k.data.tags["gradient_masking_suspected"] in ("true", "false")
        assert "diag/gradients_deterministic" in m
        control = k.data.tags["sequence"] == "none"
        assert ("transfer/fgsm/accuracy_eps_0.1" in m) is not control
        # Crafting on the control is timed once and logged with every run that uses it.
        assert control or m["transfer/fgsm/craft_time_s"] > 0
        if has_noise_layer(k.data.tags["stages"].split(">")):
            # The gradient-noise layer randomises every gradient: our FGSM does not even agree
            # with itself, and the cross-check reports that instead of hiding it, and the
            # diagnostics flag it.
            assert m["xcheck/repeat_max_abs_diff"] > 0
            assert m["xcheck/max_abs_diff"] > 0
            assert k.data.tags["gradient_masking_suspected"] == "true"
            assert k.data.tags["diag.gradients_deterministic"].startswith("FAIL")
        else:
            assert m["xcheck/max_abs_diff"] <= 1e-6
            assert m["xcheck/repeat_max_abs_diff"] == 0
    # Each distinct stage trained once: 4 first stages + 10 second stages.
    assert result.stages_trained == 4 + SINGLE_PAIRS
    assert result.stages_reused == 2 * SINGLE_PAIRS - result.stages_trained
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["study/runs"] == SINGLE_PAIRS


def test_stage_handoff_files_are_named_not_copied(tiny_study) -> None:
    """Each stage's .h5 file is stored once, in the stage cache; a run names its entries (key
    and checksum) instead of copying them (before: 20 MB per two-stage run, shared stages
    duplicated)."""
    from art_study.study.cache import StageCache, sha256_file
    from art_study.study.execute import cache_dir_for

    cfg, uri, result = tiny_study
    kid = next(k for k in children(uri, result.parent_run_id)
               if k.data.tags["sequence"] == "adversarial_training>gradient_masking")
    client = mlflow.MlflowClient()
    assert client.list_artifacts(kid.info.run_id, "stages") == []
    cache = StageCache(cache_dir_for(cfg))
    for n in (1, 2):
        key = kid.data.tags[f"stage{n}.key"]
        assert cache.has(key)
        assert sha256_file(cache.model_path(key)) == kid.data.tags[f"stage{n}.sha256"]


def test_plan_remaining_counts_what_the_store_and_the_cache_hold(tiny_study, mnist_dir,
                                                                 tmp_path, capsys) -> None:
    """``art-study plan --remaining`` on a finished study predicts nothing left; with a second
    seed (another study: a new parent run) the first seed's stages are in the cache but no run
    is finished, and what is left is more than none; a store that cannot be read is one line."""
    from art_study.cli import main

    _cfg, uri, _result = tiny_study
    args = ["plan", str(TINY), "--remaining", "--tracking-uri", uri, "--data-dir",
            str(mnist_dir), "--nodes", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"done: {SINGLE_PAIRS} runs finished, 14 of 14 stages in the cache" in out
    assert "tasks, 0.0 task-minutes" in out
    assert main([*args, "--set", "study.seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "done: 0 runs finished, 14 of 28 stages in the cache" in out
    assert "tasks, 0.0 task-minutes" not in out
    bad = tmp_path / "not-a-store.db"
    bad.write_text("not a database")
    args[args.index(uri)] = f"sqlite:///{bad}"
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("art-study: error: tracking store") and "\n" not in err


def test_rerun_skips_finished_children(tiny_study) -> None:
    cfg, uri, first = tiny_study
    again = run_study(cfg, progress=False)
    assert again.parent_run_id == first.parent_run_id
    assert all(r.skipped for r in again.runs)
    assert again.stages_trained == 0
    assert len(children(uri, first.parent_run_id)) == SINGLE_PAIRS


def test_transfer_examples_do_not_depend_on_which_run_crafts_them(tiny_study, mnist_dir) -> None:
    """A defended run's transfer attack is crafted on its control, once per control: the first
    defended run to need it crafts it, the others (and a resumed study, or a Ray task) reuse or
    recraft it. Its examples, and the run's own metrics, must not depend on which run that was.
    Random-start PGD for the transfer, and Square, whose use of the RNG depends on the model
    it attacks, make the examples depend on the RNG state."""
    from art_study.models import compile_model
    from art_study.study.cache import StageCache
    from art_study.study.execute import cache_dir_for, load_data
    from art_study.study.stages import evaluate_run

    _, uri, _ = tiny_study
    cfg = load_config(TINY, [
        f"tracking.uri={uri}", f"data.dir={mnist_dir}", "evaluation.transfer=[pgd]",
        "evaluation.attacks=[{name: pgd, eps: [0.1], n_images: 50}, "
        "{name: square, eps: [0.1], n_images: 20, args: {max_iter: 30}}]"])
    data = load_data(cfg, [0])[0]
    runs = {r.sequence: r for r in plan_runs(cfg, {0: data.fingerprint})}
    cache = StageCache(cache_dir_for(cfg))  # the tiny study's: evaluation is not in stage keys

    def metrics(sequence: str, sets: dict) -> dict[str, float]:
        spec = runs[sequence]
        model = compile_model(cache.load_model(spec.stages[-1].key), spec.config.train)
        m = evaluate_run(spec, model, data, cache, transfer_sets=sets)[0].metrics
        return {k: v for k, v in m.items() if "time" not in k and "per_s" not in k}

    alone = metrics("distillation", {})
    shared: dict = {}
    metrics("adversarial_training", shared)  # crafts the control's examples first
    assert len(shared) == 1
    after = metrics("distillation", shared)
    assert "transfer/pgd/accuracy_eps_0.1" in alone, sorted(alone)
    assert any(k.startswith("diag/pgd") and "/accuracy_eps_" in k for k in alone)
    assert after == alone


def test_failed_run_is_retried_once_on_rerun(tmp_path, mnist_dir, monkeypatch) -> None:
    """Inject a failure in one stage; the study records the rest; a rerun completes it."""
    from art_study import defenses
    from art_study.study import StudyIncomplete

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TINY, [f"tracking.uri={uri}", f"data.dir={mnist_dir}",
                             "study.blocks=[{depths: [2], sequences: [control, [distillation]]}]"])
    real = defenses.DEFENSES["distillation"]

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setitem(defenses.DEFENSES, "distillation", real._replace(train=broken))
    with pytest.raises(StudyIncomplete, match="1 of 2 runs failed"):
        run_study(cfg, progress=False)
    parent = mlflow.search_runs(search_all_experiments=True,
                                filter_string="tags.`art_study.role` = 'study'",
                                output_format="list")[0]
    kids = children(uri, parent.info.run_id)
    assert sorted(k.info.status for k in kids) == ["FAILED", "FINISHED"]
    failed = next(k for k in kids if k.info.status == "FAILED")
    assert "injected failure" in failed.data.tags["failure_reason"]

    # A child killed in its first instant: RUNNING, without any of our tags.
    client = mlflow.MlflowClient()
    orphan = client.create_run(parent.info.experiment_id,
                               tags={"mlflow.parentRunId": parent.info.run_id})
    assert orphan.info.status == "RUNNING"

    monkeypatch.setitem(defenses.DEFENSES, "distillation", real)
    result = run_study(cfg, progress=False)
    assert result.parent_run_id == parent.info.run_id
    assert sum(not r.skipped for r in result.runs) == 1
    kids = children(uri, parent.info.run_id)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.tags["run_key"] for k in kids}) == 2


def test_sigkill_midway_then_resume(tmp_path, mnist_dir) -> None:
    """Kill the study with SIGKILL after its first child finished; rerun; every run once, and
    the finished child is kept as it was (same run, same end time), not rerun."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(Path(sys.executable).with_name("art-study")), "run", str(TINY), "--no-progress",
            "--tracking-uri", uri, "--data-dir", str(mnist_dir),
            "--set", "study.blocks=[{depths: [2], sequences: [control, [adversarial_training]]}]"]
    # Create the store first: this test polls it while the study runs, and two processes must
    # not both create a fresh MLflow database at once.
    from art_study.tracking import prepare_store

    prepare_store(uri, "art-study")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, finished = time.time() + 300, []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            finished = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                          filter_string="attributes.status = 'FINISHED' and "
                                          "tags.`art_study.role` = 'run'")
            if finished:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the study ended before it could be killed"
    assert finished, "no child finished before the kill"
    done_id, done_end = finished[0].info.run_id, finished[0].info.end_time

    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`art_study.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children(uri, parents[0].info.run_id)
    assert len(kids) == 2
    assert all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.tags["sequence"] for k in kids}) == 2
    kept = next(k for k in kids if k.info.run_id == done_id)
    assert kept.info.end_time == done_end
    assert "2 runs (1 already finished)" in rerun.stdout, rerun.stdout


def test_same_seed_same_metrics(tmp_path, mnist_dir) -> None:
    """Two independent runs (own store, own stage cache) of one config: identical metrics."""
    from art_study.study import run_experiment

    metrics = []
    for i in range(2):
        cfg = load_config(REPO / "configs" / "smoke.yaml",
                          [f"tracking.uri=sqlite:///{tmp_path / str(i) / 'mlflow.db'}",
                           f"data.dir={mnist_dir}", "tracking.log_model=false"])
        metrics.append(run_experiment(cfg, progress=False).metrics)
    keep = [k for k in metrics[0] if "time" not in k and "per_s" not in k]
    assert len(keep) > 10
    assert {k: metrics[0][k] for k in keep} == {k: metrics[1][k] for k in keep}


# -- a block's own evaluation (planning, no training) --------------------------------------------
def test_robust_headline_block_attacks_all_test_images() -> None:
    """robust.yaml: PGD and AutoAttack on all 10 000 test images for the depth-2 runs (the
    block's `evaluation`: the per-image worst case is taken on the images every attack ran on,
    so both must cover them), the first 1 000 at depths 3-5; the rest of the evaluation is the
    study's."""
    cfg = load_config(REPO / "configs" / "robust.yaml")
    for r in plan_runs(cfg, fake_fingerprints(cfg)):
        budgets = {a.name: a.n_images for a in r.config.evaluation.attacks}
        n = 10_000 if r.depth == 2 else 1000
        assert budgets == {"pgd": n, "autoattack-standard": n}
        assert r.config.evaluation.diagnostics == cfg.evaluation.diagnostics


def test_a_blocks_evaluation_enters_only_its_runs_keys() -> None:
    """The run key comes from the run's own evaluation: overriding one block's changes that
    block's run keys only, and no stage key (the trained models stay valid)."""
    two_blocks = ["study.blocks=[{depths: [2], sequences: [control, singles]}, "
                  "{depths: [3], sequences: [control]}]"]
    cfg = load_config(TINY, two_blocks)
    before = {r.name: r for r in plan_runs(cfg, fake_fingerprints(cfg))}
    cfg.study.blocks[0].evaluation = {"n_attack": 50}
    after = {r.name: r for r in plan_runs(cfg, fake_fingerprints(cfg))}
    for name, run in after.items():
        assert [s.key for s in run.stages] == [s.key for s in before[name].stages]
        assert (run.key != before[name].key) == (run.depth == 2)
        assert run.config.evaluation.n_attack == (50 if run.depth == 2 else None)


def test_runs_sharing_a_control_for_transfer_need_the_same_evaluation() -> None:
    """Transfer examples are crafted once per control: two blocks whose runs share one but
    evaluate differently are refused; a block without transfer needs no control."""
    shared = ("study.blocks=[{depths: [2], sequences: [control, [distillation]]}, "
              "{depths: [2], sequences: [[gradient_masking]], evaluation: {n_attack: 50}}]")
    with pytest.raises(ConfigError, match="same evaluation"):
        cfg = load_config(TINY, [shared])
        plan_runs(cfg, fake_fingerprints(cfg))
    alone = "study.blocks=[{depths: [2], sequences: [[distillation]], evaluation: {transfer: []}}]"
    cfg = load_config(TINY, [alone])
    assert [r.reference for r in plan_runs(cfg, fake_fingerprints(cfg))] == [None]


def test_two_processes_starting_the_same_new_study_never_collide(tmp_path, mnist_dir) -> None:
    """Two `art-study run` of one new study started at once: at most one parent run survives,
    each of its runs exists once, and a process that backs off says so in one line."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from art_study.tracking import prepare_store

    prepare_store(uri, "art-study")  # one database, created once (as a team's server is)
    args = [str(Path(sys.executable).with_name("art-study")), "run", str(TINY), "--no-progress",
            "--tracking-uri", uri, "--data-dir", str(mnist_dir),
            "--set", "study.blocks=[{depths: [2], sequences: [control]}]",
            "--set", "data.n_train=100", "--set", "data.n_test=50",
            "--set", "evaluation.transfer=[]", "--set", "evaluation.diagnostics.enabled=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 or "is being run by another process" in err, err[-2000:]
    codes = sorted(p.returncode for p in procs)
    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`art_study.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", codes
    kids = children(uri, parents[0].info.run_id)
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
