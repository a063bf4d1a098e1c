"""How long a study takes on N nodes: its stage tree scheduled as the Ray backend submits it.

A study is a graph of tasks (:func:`tasks`): one per distinct stage, after the stage it continues
from (and, for a defense applied after plain training, after the plain stage it starts from);
one per control whose transfer examples other runs are attacked with, after that control's last
stage; one evaluation per run, after its last stage and its transfer examples. :func:`simulate`
runs that graph on ``nodes`` nodes of one task each, as
:class:`~art_study.study.ray_backend.RayExecutor` feeds a cluster: runs are submitted in plan
order, ``2 × nodes`` runs ahead of the run the driver is logging, and a free node takes the
first ready task in submission order. The critical path is the longest chain of dependent
tasks: no number of nodes finishes the study faster.

Task times come from a finished study (its ``runs.csv`` export or its store: every run logs its
stages' and its evaluation's seconds) or, where there is none, from a plain-epoch cost model
(:data:`PLAIN_EPOCHS` for training; an evaluation's attacks counted in forward and backward
passes from their budgets, :func:`evaluation_passes`). A task's measured time depends on how
many tasks shared its node's cores while it ran, so a prediction is as good as the match
between the study it was measured on and the cluster it is made for (docs/scale-out.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from art_study.attacks.base import FORWARD
from art_study.attacks.resolved import ResolvedAttack
from art_study.config import AttackConfig, EvaluationConfig, ExperimentConfig
from art_study.study.plan import RunSpec, StageSpec

#: Cost model for a study never run: seconds of a training task in plain 2-conv training epochs
#: of the same machine, per epoch of a stage of each defense. Derived from a timed seed of
#: configs/paper.yaml and the robust recipes' costs in docs/scale-out.md; defenses not listed
#: cost one plain epoch.
PLAIN_EPOCHS = {
    "none": 1.0,
    "adversarial_training": 1.0,
    "adversarial_training_fast": 1.0,
    "distillation": 2.0,  # a teacher and a student
    "gradient_masking": 1.1,
    "pgd_adversarial_training": 4.25,
    "trades": 5.9,
}

#: An evaluation or a transfer crafting is counted in forward-and-backward passes per image
#: (each attack's :meth:`~art_study.attacks.resolved.ResolvedAttack.passes`); a plain training
#: epoch costs this many such passes per training image (an optimizer step, batch 128: 742 µs
#: CPU per image against 466 µs for a forward and backward pass at batch 500, docs/benchmarks.md).
TRAIN_PASSES = 1.6

#: The share of the attacked images a model keeps while an attack runs on it, by the defenses
#: of its sequence (the largest counts), for the attacks' passes that run only on images still
#: robust (:class:`~art_study.attacks.base.Passes`): what the robust study's models keep at
#: ε = 0.3 on MNIST (docs/robust.md). Every other defense is broken by the first passes (the
#: paper study's finding), so those passes are not counted for it.
ROBUST_SHARE = {"pgd_adversarial_training": 0.9, "trades": 0.9}

#: Test and training images of the datasets, where a config does not subset them.
TEST_IMAGES = 10_000
TRAIN_IMAGES = {"cifar10": 50_000}


def robust_share(run: RunSpec) -> float:
    """:data:`ROBUST_SHARE` of the run's most robust defense."""
    return max((ROBUST_SHARE.get(s.defense, 0.0) for s in run.stages), default=0.0)


def attacked_images(cfg: ExperimentConfig) -> int:
    """How many test images (the first) an evaluation of ``cfg`` attacks."""
    return min(cfg.data.n_test or TEST_IMAGES, cfg.evaluation.n_attack or TEST_IMAGES)


def attack_budgets(cfg: EvaluationConfig, n_test: int, keys: Iterable[str] | None = None
                   ) -> list[tuple[ResolvedAttack, int]]:
    """``cfg``'s attacks (those of ``keys`` only, when given; ``fgsm`` is the sweep's FGSM),
    each with the number of images it runs on out of the first ``n_test``."""
    from art_study.attacks.registry import resolve  # the ART classes load on first use

    attacks = {a.key: a for a in cfg.attacks}
    resolved = [resolve(attacks[key] if key in attacks
                        else AttackConfig(name="fgsm", n_images=n_test), cfg.eps)
                for key in (attacks if keys is None else keys)]
    return [(a, min(a.cfg.n_images, n_test)) for a in resolved]


def attack_passes(cfg: EvaluationConfig, n_test: int, share: float,
                  keys: Iterable[str] | None = None) -> float:
    """Forward-and-backward passes of :func:`attack_budgets`' attacks, each at every ε it runs,
    on a model that keeps ``share`` of the images."""
    return sum(n * len(a.eps) * a.passes().per_image(share)
               for a, n in attack_budgets(cfg, n_test, keys))


def evaluation_passes(run: RunSpec) -> float:
    """One run's evaluation in forward-and-backward passes: clean predictions, our FGSM at
    every ε and ART's on the cross-check images, the attacks, the predictions on the transfer
    examples, the diagnostics' three PGD runs (k and 5k steps, and k at the destroying ε)."""
    cfg, n = run.config.evaluation, attacked_images(run.config)
    n_eps = len(cfg.eps)
    passes = n * FORWARD + n * n_eps + min(cfg.xcheck_images or n, n) * n_eps
    passes += attack_passes(cfg, n, robust_share(run))
    if run.reference is not None and cfg.transfer:
        passes += FORWARD * sum(k * len(a.eps) for a, k in attack_budgets(cfg, n, cfg.transfer))
    if cfg.diagnostics.enabled:
        passes += min(cfg.diagnostics.n_images, n) * 7 * cfg.diagnostics.pgd_steps
    return passes


def crafting_passes(run: RunSpec) -> float:
    """The transfer examples of ``run``'s control in forward-and-backward passes: each transfer
    attack run on the control, which it breaks (only the passes every image gets count)."""
    cfg = run.config.evaluation
    return attack_passes(cfg, attacked_images(run.config), 0.0, cfg.transfer)


def plain_epoch_passes(cfg: ExperimentConfig) -> float:
    """A plain training epoch of ``cfg`` in forward-and-backward passes."""
    n = cfg.data.n_train or TRAIN_IMAGES.get(cfg.data.name, 60_000)
    return TRAIN_PASSES * n


@dataclass(frozen=True)
class Task:
    """A unit of work: ``seconds`` long, startable once every task in ``after`` has finished
    and the driver has submitted run ``run`` (the first run of the plan that needs it)."""

    name: str
    seconds: float
    after: tuple[str, ...]
    run: int


@dataclass(frozen=True)
class Prediction:
    """The study on ``nodes`` nodes: its wall time and the node-seconds its tasks take."""

    nodes: int
    wall_s: float
    work_s: float

    @property
    def busy(self) -> float:
        """The share of the nodes' time spent on tasks."""
        return self.work_s / (self.wall_s * self.nodes) if self.wall_s else 0.0


def tasks(runs: list[RunSpec], stage_s: Callable[[StageSpec, RunSpec], float],
          eval_s: Callable[[RunSpec], float], craft_s: Callable[[RunSpec], float]) -> list[Task]:
    """The task graph of ``runs`` (in plan order), with each task's seconds from the callables:
    ``stage_s(stage, run)`` for a stage first needed by ``run``, ``eval_s(run)``, and
    ``craft_s(run)`` for the transfer examples of ``run``'s control."""
    out: dict[str, Task] = {}
    planned = {s.key for r in runs for s in r.stages}

    def add(name: str, seconds: Callable[[], float], after: Iterable[str], index: int) -> None:
        if name not in out:
            out[name] = Task(name, float(seconds()), tuple(after), index)

    for i, run in enumerate(runs):
        for stage in run.stages:
            after = [f"stage:{stage.parent.key}"] if stage.parent else []
            if stage.plain_key in planned:
                after.append(f"stage:{stage.plain_key}")
            add(f"stage:{stage.key}", lambda s=stage, r=run: stage_s(s, r), after, i)
        after = [f"stage:{run.stages[-1].key}"]
        if run.reference is not None and run.config.evaluation.transfer:
            craft = f"transfer:{run.reference.key}"
            add(craft, lambda r=run: craft_s(r), [f"stage:{run.reference.key}"], i)
            after.append(craft)
        add(f"evaluate:{run.key}", lambda r=run: eval_s(r), after, i)
    return list(out.values())


def done_tasks(runs: list[RunSpec], cached: set[str], finished: set[str]) -> set[str]:
    """The tasks of :func:`tasks` that a resumed study does not run again: the evaluations of
    the ``finished`` runs (by run key), the stages in the cache (``cached``, by stage key) or
    needed by no unfinished run, and the transfer crafting every run that needs has finished
    (transfer examples are not kept: a run still to evaluate crafts them again)."""
    todo = [r for r in runs if r.key not in finished]
    needed = {s.key for r in todo for s in r.stages}
    crafted = {r.reference.key for r in todo
               if r.reference is not None and r.config.evaluation.transfer}
    done = {f"evaluate:{r.key}" for r in runs if r.key in finished}
    done |= {f"stage:{s.key}" for r in runs for s in r.stages
             if s.key in cached or s.key not in needed}
    done |= {f"transfer:{r.reference.key}" for r in runs
             if r.reference is not None and r.reference.key not in crafted}
    return done


def remaining(graph: list[Task], done: set[str]) -> list[Task]:
    """``graph`` with the ``done`` tasks taking no time."""
    return [Task(t.name, 0.0, t.after, t.run) if t.name in done else t for t in graph]


def simulate(graph: list[Task], nodes: int, lookahead: int | None = None) -> Prediction:
    """Run ``graph`` on ``nodes`` nodes of one task each; ``lookahead`` runs are submitted
    ahead of the run being logged (default ``2 × nodes``, as the Ray backend does)."""
    if nodes < 1:
        raise ValueError("a study needs at least one node")
    window = 2 * nodes if lookahead is None else lookahead
    order = {t.name: i for i, t in enumerate(graph)}
    by_name = {t.name: t for t in graph}
    evaluations = sorted((t.run, t.name) for t in graph if t.name.startswith("evaluate:"))
    done: set[str] = set()
    started: set[str] = set()
    running: list[tuple[float, str]] = []
    logged, now = 0, 0.0  # runs the driver has logged (in plan order), the clock
    while len(done) < len(graph):
        ready = [t for t in graph if t.name not in started and t.run < logged + window
                 and all(a in done for a in t.after)]
        for task in sorted(ready, key=lambda t: (t.run, order[t.name]))[:nodes - len(running)]:
            started.add(task.name)
            heapq.heappush(running, (now + task.seconds, task.name))
        if not running:
            raise ValueError("the task graph has a dependency that never finishes")
        now, name = heapq.heappop(running)
        done.add(name)
        while logged < len(evaluations) and evaluations[logged][1] in done:
            logged += 1
    return Prediction(nodes, now, sum(by_name[n].seconds for n in done))


def critical_path(graph: list[Task]) -> tuple[float, list[str]]:
    """The longest chain of dependent tasks: its seconds and its task names, first to last."""
    finish: dict[str, tuple[float, list[str]]] = {}
    by_name = {t.name: t for t in graph}

    def longest(name: str) -> tuple[float, list[str]]:
        if name not in finish:
            task = by_name[name]
            before = max((longest(a) for a in task.after), default=(0.0, []),
                         key=lambda p: p[0])
            finish[name] = (before[0] + task.seconds, [*before[1], name])
        return finish[name]

    return max((longest(t.name) for t in graph), key=lambda p: p[0])


def saturation(graph: list[Task]) -> int:
    """The fewest nodes beyond which more nodes no longer shorten the study."""
    best = simulate(graph, len(graph)).wall_s
    low, high = 1, len(graph)
    while low < high:  # the wall time does not grow with nodes under this list scheduling
        mid = (low + high) // 2
        if simulate(graph, mid).wall_s <= best * (1 + 1e-9):
            high = mid
        else:
            low = mid + 1
    return low


def measured_times(df: pd.DataFrame, runs: list[RunSpec]) -> tuple[
        Callable[[StageSpec, RunSpec], float | None], Callable[[RunSpec], float | None],
        Callable[[RunSpec], float | None]]:
    """Task-time look-ups from a study's runs table (``runs.csv`` or the store's runs: columns
    ``sequence``, ``depth``, ``seed`` and the ``metrics.stage<n>/time_s``,
    ``metrics.eval/time_s``, ``metrics.transfer/<attack>/craft_time_s`` each run logs); each
    returns None where the table has no figure."""
    rows = {(str(r.sequence), int(r.depth), int(r.seed)): r for r in df.itertuples(index=False)}
    columns = list(df.columns)
    craft_cols = [c for c in columns
                  if c.startswith("metrics.transfer/") and c.endswith("/craft_time_s")]

    def value(run: RunSpec, column: str) -> float | None:
        row = rows.get((run.sequence, run.depth, run.seed))
        if row is None or column not in columns:
            return None
        v = row[columns.index(column)]
        return None if pd.isna(v) else float(v)

    def stage(s: StageSpec, run: RunSpec) -> float | None:
        return value(run, f"metrics.stage{s.index + 1}/time_s")

    def evaluation(run: RunSpec) -> float | None:
        return value(run, "metrics.eval/time_s")

    def craft(run: RunSpec) -> float | None:
        found = [value(run, c) for c in craft_cols]
        return sum(v for v in found if v is not None) if any(found) else None

    return stage, evaluation, craft


def modelled_times(plain_epoch_s: float) -> tuple[
        Callable[[StageSpec, RunSpec], float], Callable[[RunSpec], float],
        Callable[[RunSpec], float]]:
    """Task-time look-ups from the cost model and the plain epoch's seconds: a stage from
    :data:`PLAIN_EPOCHS`, an evaluation and a transfer crafting from their attacks' passes
    (:func:`evaluation_passes`, :func:`crafting_passes`) over a plain epoch's."""
    def stage(s: StageSpec, run: RunSpec) -> float:
        if s.index == 0 and s.plain_key is not None:
            return 0.0  # applied to the control's first stage, which is trained anyway
        return s.epochs * plain_epoch_s * PLAIN_EPOCHS.get(s.defense, 1.0)

    def passes(count: Callable[[RunSpec], float]) -> Callable[[RunSpec], float]:
        return lambda run: count(run) / plain_epoch_passes(run.config) * plain_epoch_s

    return stage, passes(evaluation_passes), passes(crafting_passes)


def study_graph(runs: list[RunSpec], times: pd.DataFrame | None,
                plain_epoch_s: float) -> tuple[list[Task], int]:
    """The task graph with measured times where ``times`` has them, else modelled ones; also
    how many tasks were modelled."""
    model = modelled_times(plain_epoch_s)
    measured = measured_times(times, runs) if times is not None else (
        lambda s, r: None, lambda r: None, lambda r: None)
    modelled = 0

    def pick(found: float | None, fallback: float) -> float:
        nonlocal modelled
        if found is None:
            modelled += 1
            return fallback
        return found

    graph = tasks(runs, lambda s, r: pick(measured[0](s, r), model[0](s, r)),
                  lambda r: pick(measured[1](r), model[1](r)),
                  lambda r: pick(measured[2](r), model[2](r)))
    return graph, modelled


def render(graph: list[Task], node_counts: list[int], modelled: int) -> str:
    """A plain-text table: per node count the predicted wall time, speed-up and busy share,
    then the critical path and the node count where the speed-up stops."""
    one = simulate(graph, 1).wall_s
    head = (f"{len(graph)} tasks, {sum(t.seconds for t in graph) / 60:.1f} task-minutes"
            + (f" ({modelled} from the plain-epoch cost model)" if modelled else ""))
    if one == 0:  # every task done (plan --remaining of a finished study)
        return f"{head}: nothing left to run"
    path_s, path = critical_path(graph)
    lines = [head, "", f"{'nodes':>5}  {'wall (min)':>10}  {'speed-up':>8}  {'busy':>5}"]
    for n in node_counts:
        p = simulate(graph, n)
        lines.append(f"{n:>5}  {p.wall_s / 60:>10.1f}  {one / p.wall_s:>7.2f}x  {p.busy:>5.0%}")
    stages = " → ".join(name.split(":")[0] for name in path)
    lines += ["", f"critical path: {path_s / 60:.1f} min, {len(path)} tasks ({stages})",
              f"more than {saturation(graph)} nodes shorten nothing"]
    return "\n".join(lines)
