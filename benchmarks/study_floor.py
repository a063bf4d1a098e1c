"""The compute floor of a study (default configs/paper.yaml, one seed) and its real wall time.

Floor = Σ over the plan's distinct stages (after prefix sharing, ``plan.distinct_stages``) of
epochs × the plain-epoch time at the stage's depth × the stage's inherent multiple:

- 2 for single-step adversarial training (``adversarial_training``, ``adversarial_training_fast``:
  one attack pass and one training pass per batch);
- 2 for distillation when it trains its own teacher (teacher + student), 1 when the incoming
  model is the teacher;
- 0 for a first ``gradient_masking`` stage whose plain twin (``StageSpec.plain_key``: the
  control's first stage) is in the plan: it starts from that stage and only masks (seconds);
- 1 otherwise (``none``, a later ``gradient_masking``: its masking pass is a few seconds of
  inference).

Plain-epoch times are measured here, per depth, by ``model.fit`` of the paper CNN (as the
``none`` stage runs it) on a ``--images`` slice, interleaved across depths in rounds (best
round), and extrapolated linearly to the study's training-set size. The floor counts training
only: evaluation and logging come on top, and are shown separately where a store is given.

The real figures come from an existing study, never from running it here (hours on 2 cores):

- ``--tracking-uri URI``: the study's parent run and its children in that MLflow store: the
  training time of every stage a child trained (``stage<n>/time_s`` where ``stage<n>/cached`` is
  0, matched to the plan by the child's ``run_key``), evaluation time, and the parent's wall
  time (start to end, or to now while it runs; a resumed study includes its pauses);
- ``--cache-dir DIR``: the stage cache's ``stage.json`` files (``train_time_s`` per stage),
  matched to the plan by stage key.

Either may hold only part of the study: the ratio is then over the stages that are there.
Where stages and evaluations ran side by side (``--backend ray``), each logged time is its own
task's wall time on shared cores: the seed's wall time is then split between training and
evaluation in proportion to their task time, and that training share is what meets the floor.
Real times measured on a loaded machine (e.g. a study at nice 19 beside other work) compare
with a floor measured under other load only loosely; compare like with like.

    .venv/bin/python benchmarks/study_floor.py [CONFIG] [--seed 0] [--images 12000]
        [--epoch-times 2:24,3:27,4:34,5:42]
        [--tracking-uri sqlite:///PATH/mlflow.db] [--cache-dir PATH/stage-cache]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

from _common import interleaved, machine_line, print_round

#: Task time over wall time above which a seed's tasks count as having run side by side.
SIDE_BY_SIDE = 1.05


def multiple(stage, planned: set[str] = frozenset()) -> int:
    """The stage's inherent cost in plain epochs per epoch (see the module docstring);
    ``planned``: the keys of the plan's distinct stages."""
    if stage.plain_key is not None and stage.plain_key in planned:
        return 0
    if stage.defense in ("adversarial_training", "adversarial_training_fast"):
        return 2
    if stage.defense == "distillation":
        teacher = stage.settings.get("train_teacher")
        trains_teacher = stage.parent is None if teacher is None else bool(teacher)
        return 2 if trains_teacher else 1
    return 1


def measure_plain_epochs(depths: list[int], data, cfg, images: int, rounds: int
                         ) -> dict[int, float]:
    """Seconds per full plain epoch at each depth (slice timed, extrapolated linearly)."""
    import keras

    from art_study.models import build_cnn, compile_model, one_hot

    n = min(images, len(data.x_train))
    x, y = data.x_train[:n], one_hot(data.y_train[:n])
    bs = cfg.train.batch_size
    models = {}
    for depth in depths:
        keras.utils.set_random_seed(0)
        model_cfg = cfg.model.model_copy(update={"n_conv": depth})
        models[depth] = compile_model(build_cnn(model_cfg), cfg.train)
        models[depth].fit(x[: 4 * bs], y[: 4 * bs], batch_size=bs, epochs=1, verbose=0)

    def epoch(depth):
        return lambda: models[depth].fit(x, y, batch_size=bs, epochs=1, shuffle=True, verbose=0)

    print(f"plain epochs: {n} images per timed epoch, batch {bs}, best of {rounds} rounds, "
          f"extrapolated × {len(data.x_train) / n:g} to {len(data.x_train)} images; "
          f"{machine_line()}", flush=True)
    wall, _ = interleaved({f"depth{d}": epoch(d) for d in depths}, rounds, print_round)
    return {d: min(wall[f"depth{d}"]) * len(data.x_train) / n for d in depths}


def stages_from_store(uri: str, study: str | None, seed: int, runs_by_key: dict) -> dict:
    """The seed's runs in the study: real training time per trained stage key; the summed wall
    time of its finished runs, with their training and evaluation; the study's wall time."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("art-study")
    if exp is None:
        raise SystemExit(f"no experiment 'art-study' in {uri}")
    flt = "tags.`art_study.role` = 'study'" + (f" and tags.study = '{study}'" if study else "")
    parents = client.search_runs([exp.experiment_id], flt, max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise SystemExit(f"no study{' ' + study if study else ''} in {uri}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                  f"tags.seed = '{seed}'", max_results=5000)
    trained: dict[str, float] = {}
    unmatched = 0
    # The split of the seed's run time: finished runs only, so a running run's trained stage
    # is not counted as training inside a run time that leaves it out.
    split = {"runs_s": 0.0, "training_s": 0.0, "evaluation_s": 0.0}
    statuses = collections.Counter(c.info.status for c in children)
    for child in children:
        spec = runs_by_key.get(child.data.tags.get("run_key"))
        m = child.data.metrics
        trained_here = {i: m[f"stage{i}/time_s"] for i in range(1, 4)
                        if m.get(f"stage{i}/cached") == 0.0 and f"stage{i}/time_s" in m}
        for i, t in trained_here.items():
            if spec is None:
                unmatched += 1
            else:
                trained[spec.stages[i - 1].key] = t
        if child.info.status == "FINISHED":
            split["runs_s"] += (child.info.end_time - child.info.start_time) / 1000
            split["training_s"] += sum(trained_here.values())
            split["evaluation_s"] += m.get("eval/time_s", 0.0)
    end = parent.info.end_time or time.time() * 1000
    return {"name": parent.data.tags.get("study", parent.info.run_name),
            "status": parent.info.status, "children": dict(statuses), "trained": trained,
            "unmatched": unmatched, **split, "wall_s": (end - parent.info.start_time) / 1000}


def stages_from_cache(cache_dir: Path, keys: set[str]) -> dict[str, float]:
    """``train_time_s`` of every stage of the plan found in a stage cache."""
    out = {}
    for path in cache_dir.glob("*/*/stage.json"):
        record = json.loads(path.read_text())
        if record["key"] in keys:
            out[record["key"]] = record["train_time_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/paper.yaml")
    p.add_argument("--seed", type=int, default=0, help="the one seed of the study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", type=int, default=12_000, help="images per timed plain epoch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epoch-times", metavar="D:S,...",
                   help="plain full-epoch seconds per depth, e.g. 2:24,3:27,4:34,5:42, instead "
                   "of measuring them (figures from an idle machine, or the study's own)")
    p.add_argument("--tracking-uri", help="an MLflow store holding the study's runs")
    p.add_argument("--study", help="the study's name in that store (default: the config's name)")
    p.add_argument("--cache-dir", type=Path, help="a stage cache holding the study's stages")
    p.add_argument("--data-dir", default=os.environ.get("ART_STUDY_DATA_DIR"))
    args = p.parse_args()

    from art_study.config import load_config
    from art_study.study.execute import load_data
    from art_study.study.plan import distinct_stages, plan_runs

    overrides = [f"study.seeds=[{args.seed}]", *args.overrides]
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    cfg = load_config(args.config, overrides)
    data = load_data(cfg, [args.seed])[args.seed]  # its fingerprint is part of every stage key
    runs = plan_runs(cfg, {args.seed: data.fingerprint})
    stages = distinct_stages(runs)
    depth_of = {s.key: r.depth for r in runs for s in r.stages}
    depths = sorted(set(depth_of.values()))
    print(f"{args.config}, seed {args.seed}: {len(runs)} runs, {len(stages)} distinct stages "
          f"({sum(len(r.stages) for r in runs)} before prefix sharing), depths {depths}")

    if args.epoch_times:
        plain = {int(d): float(t) for d, t in
                 (item.split(":") for item in args.epoch_times.split(","))}
        missing = [d for d in depths if d not in plain]
        if missing:
            raise SystemExit(f"--epoch-times lacks depth(s) {missing}")
        print("plain epochs: given with --epoch-times (not measured)")
    else:
        plain = measure_plain_epochs(depths, data, cfg, args.images, args.rounds)
    for d in depths:
        print(f"  plain epoch at depth {d}: {plain[d]:6.1f} s (full training set)")

    planned = set(stages)
    mult = {k: multiple(s, planned) for k, s in stages.items()}
    floor = {k: s.epochs * plain[depth_of[k]] * mult[k] for k, s in stages.items()}
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for k, s in stages.items():
        groups[(depth_of[k], s.defense, s.index, mult[k])].append(k)
    print("floor by stage kind (depth, defense, position, multiple):")
    for (d, defense, index, mult), keys in sorted(groups.items()):
        epochs = sum(stages[k].epochs for k in keys)
        print(f"  depth {d}  {defense:26s} stage{index + 1}  ×{mult}  {len(keys):2d} stages "
              f"{epochs:3d} epochs  {sum(floor[k] for k in keys) / 60:6.1f} min")
    total = sum(floor.values())
    print(f"compute floor: {total / 60:.1f} min ({total:.0f} s) for {len(stages)} stages, "
          f"{sum(s.epochs for s in stages.values())} epochs")

    real: dict[str, float] = {}
    concurrency, train_s = 1.0, 0.0  # tasks at once and their training time, from the store
    if args.tracking_uri:
        found = stages_from_store(args.tracking_uri, args.study or cfg.name, args.seed,
                                  {r.key: r for r in runs})
        real.update(found["trained"])
        print(f"store {args.tracking_uri}: study {found['name']!r} ({found['status']}), "
              f"children {found['children']}, {len(found['trained'])} stages trained there"
              + (f", {found['unmatched']} not in this plan" if found["unmatched"] else ""))
        runs_s, train_s, eval_s = found["runs_s"], found["training_s"], found["evaluation_s"]
        n_done = found["children"].get("FINISHED", 0)
        concurrency = (train_s + eval_s) / runs_s if runs_s else 0.0
        if concurrency > SIDE_BY_SIDE:
            # Stages and evaluations ran side by side (--backend ray): each logged time is its
            # own task's wall time on shared cores, so they add up to more than the wall clock.
            # The wall is split between training and evaluation in proportion to task time.
            print(f"  seed {args.seed}: its {n_done} finished runs took {runs_s / 60:.1f} min of "
                  f"wall time, tasks side by side: training {train_s / 60:.1f} + evaluation "
                  f"{eval_s / 60:.1f} task-minutes, {concurrency:.2f} tasks at once on average; "
                  f"apportioned to the wall: training ≈ {train_s / concurrency / 60:.1f} + "
                  f"evaluation ≈ {eval_s / concurrency / 60:.1f} min")
        else:
            other_s = runs_s - train_s - eval_s
            print(f"  seed {args.seed}: its {n_done} finished runs took {runs_s / 60:.1f} min = "
                  f"training {train_s / 60:.1f} + evaluation {eval_s / 60:.1f} + the rest "
                  f"(loading, transfer examples, logging) {other_s / 60:.1f} min")
        print(f"  the study's parent run: {found['wall_s'] / 60:.1f} min (all seeds, with the "
              "pauses of a resumed study)")
    if args.cache_dir:
        cached = stages_from_cache(args.cache_dir, set(stages))
        print(f"cache {args.cache_dir}: {len(cached)} of {len(stages)} planned stages present")
        for k, t in cached.items():
            real.setdefault(k, t)
    if real:
        covered = sum(floor[k] for k in real)
        spent = sum(real.values())
        print(f"real training time of the {len(real)} stages found: {spent / 60:.1f} min vs "
              f"their floor {covered / 60:.1f} min: {spent / covered:.2f}× (target ≤ 1.15×)")
        if concurrency > SIDE_BY_SIDE:
            share = train_s / concurrency
            print(f"  (tasks ran side by side, {concurrency:.2f} at once: each stage's "
                  "time is its task's wall on shared cores; the training share of the wall, "
                  f"≈ {share / 60:.1f} min, is {share / covered:.2f}× the floor)")
        by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for k, t in real.items():
            kind = f"{stages[k].defense} @ depth {depth_of[k]}"
            by_kind[kind][0] += t
            by_kind[kind][1] += floor[k]
        for kind, (t, f) in sorted(by_kind.items()):
            ratio = f"{t / f:5.2f}×" if f else "(floor 0: starts from the control's stage)"
            print(f"  {kind:36s} real {t / 60:6.1f} min  floor {f / 60:6.1f} min  {ratio}")


if __name__ == "__main__":
    main()
