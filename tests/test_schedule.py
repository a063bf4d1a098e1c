"""The scale-out prediction: list scheduling of a study's task graph on N nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from art_study.attacks.base import FORWARD, QUERY
from art_study.attacks.registry import resolve
from art_study.cli import main
from art_study.config import load_config
from art_study.study.plan import distinct_stages, plan_runs
from art_study.study.schedule import (
    Task,
    attack_passes,
    critical_path,
    done_tasks,
    evaluation_passes,
    plain_epoch_passes,
    remaining,
    saturation,
    simulate,
    study_graph,
    tasks,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper.yaml"
ROBUST = REPO / "configs" / "robust.yaml"


def graph(*specs: tuple[str, float, tuple[str, ...], int]) -> list[Task]:
    return [Task(*s) for s in specs]


def test_list_scheduling_by_hand() -> None:
    """A → B (10 s, 5 s) beside C (7 s): one node does 22 s, two do 15 s, the chain is 15 s."""
    g = graph(("A", 10, (), 0), ("B", 5, ("A",), 0), ("C", 7, (), 0))
    assert simulate(g, 1).wall_s == 22
    assert simulate(g, 2).wall_s == 15
    assert simulate(g, 3).wall_s == 15
    assert critical_path(g) == (15, ["A", "B"])
    assert saturation(g) == 2
    assert simulate(g, 2).busy == pytest.approx(22 / 30)


def test_lookahead_holds_back_later_runs() -> None:
    """The driver submits runs only so far ahead of the one it logs: with a window of one run,
    run 1's task cannot start before run 0's evaluation is done, though a node is free."""
    g = graph(("stage:a", 10, (), 0), ("evaluate:0", 1, ("stage:a",), 0),
              ("stage:b", 10, (), 1), ("evaluate:1", 1, ("stage:b",), 1))
    assert simulate(g, 2, lookahead=2).wall_s == 11
    assert simulate(g, 2, lookahead=1).wall_s == 22


def test_a_cycle_is_refused() -> None:
    g = graph(("A", 1, ("B",), 0), ("B", 1, ("A",), 0))
    with pytest.raises(ValueError, match="never finishes"):
        simulate(g, 1)


@pytest.fixture(scope="module")
def paper_seed0():
    cfg = load_config(PAPER, ["study.seeds=[0]"])
    return plan_runs(cfg, {0: "seed 0"})


def test_task_graph_of_the_paper_study(paper_seed0) -> None:
    """Each distinct stage once, an evaluation per run, a transfer crafting per control that
    other runs attack from; gradient masking's first stage waits for the control's."""
    runs = paper_seed0
    g = tasks(runs, lambda s, r: 1.0, lambda r: 1.0, lambda r: 1.0)
    names = [t.name for t in g]
    assert len(names) == len(set(names))
    kinds = pd.Series([n.split(":")[0] for n in names]).value_counts().to_dict()
    assert kinds == {"stage": len(distinct_stages(runs)), "evaluate": len(runs),
                     "transfer": len({r.reference.key for r in runs if r.reference})}
    by_name = {t.name: t for t in g}
    for run in runs:
        evaluation = by_name[f"evaluate:{run.key}"]
        assert f"stage:{run.stages[-1].key}" in evaluation.after
        if run.reference is not None:
            assert f"transfer:{run.reference.key}" in evaluation.after
        first = run.stages[0]
        if first.plain_key is not None:
            assert f"stage:{first.plain_key}" in by_name[f"stage:{first.key}"].after


def test_measured_times_are_used_and_the_rest_modelled(paper_seed0) -> None:
    """A runs table gives its runs' stage and evaluation seconds; runs missing from it fall back
    to the cost model, and are counted."""
    runs = paper_seed0
    control = next(r for r in runs if r.sequence == "none" and r.depth == 2)
    table = pd.DataFrame([{"sequence": "none", "depth": 2, "seed": 0,
                           "metrics.stage1/time_s": 100.0, "metrics.stage2/time_s": 50.0,
                           "metrics.eval/time_s": 30.0}])
    g, modelled = study_graph(runs, table, plain_epoch_s=10.0)
    by_name = {t.name: t for t in g}
    assert by_name[f"stage:{control.stages[0].key}"].seconds == 100.0
    assert by_name[f"stage:{control.stages[1].key}"].seconds == 50.0
    assert by_name[f"evaluate:{control.key}"].seconds == 30.0
    assert modelled == len(g) - 3
    _, all_modelled = study_graph(runs, None, plain_epoch_s=10.0)
    assert all_modelled == len(g)


def test_plan_command_prints_the_prediction(tmp_path, capsys) -> None:
    times = tmp_path / "runs.csv"
    pd.DataFrame([{"sequence": "none", "depth": 2, "seed": 0, "metrics.stage1/time_s": 60.0,
                   "metrics.stage2/time_s": 45.0, "metrics.eval/time_s": 30.0}]).to_csv(times)
    code = main(["plan", str(PAPER), "--set", "study.seeds=[0]", "--nodes", "1,2,66",
                 "--times", str(times)])
    out = capsys.readouterr().out
    assert code == 0
    assert "22 runs, 38 distinct stages" in out
    assert "61 from the plain-epoch cost model" in out  # 64 tasks, 3 measured
    assert "critical path:" in out and "shorten nothing" in out


def test_plan_command_refuses_bad_times(tmp_path, capsys) -> None:
    bogus = tmp_path / "not-runs.csv"
    bogus.write_text("a,b\n1,2\n")
    code = main(["plan", str(PAPER), "--times", str(bogus)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("art-study: error: --times:") and "\n" not in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code = main(["plan", str(PAPER), "--times", str(empty)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("art-study: error: --times: cannot read")
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(PAPER), "--nodes", "0"])
    assert exc.value.code == 2


def test_an_evaluation_costs_what_its_attacks_budget(paper_seed0) -> None:
    """The cost model counts an evaluation's passes from its attacks: the paper study's lands
    near its measured 2.1 plain epochs; the robust study's AutoAttack on 10 000 images costs
    hundreds on a robust model (the passes after APGD-CE run only on the images it keeps) and
    tens on the control; the passes grow with the images and shrink without the escalation."""
    control = next(r for r in paper_seed0 if r.sequence == "none" and r.depth == 2)
    assert 1.5 < evaluation_passes(control) / plain_epoch_passes(control.config) < 3.0
    robust = plan_runs(load_config(ROBUST, ["study.seeds=[0]"]), {0: "seed 0"})
    pgd_at, plain = (next(r for r in robust if r.sequence == s and r.depth == 2)
                     for s in ("pgd_adversarial_training", "none"))
    epochs = {r.sequence: evaluation_passes(r) / plain_epoch_passes(r.config)
              for r in (pgd_at, plain)}
    assert epochs["pgd_adversarial_training"] > 500
    assert 10 < epochs["none"] < 40
    aa = next(a for a in pgd_at.config.evaluation.attacks if a.name == "autoattack-standard")
    cost = resolve(aa, pgd_at.config.evaluation.eps).passes()
    assert cost.every == 100  # APGD-CE, 100 iterations, on every image
    # APGD-T and FAB-T (9 targets), Square, and the escalation: 2 × 5 APGD restarts, 1 Square
    assert cost.robust == pytest.approx(9 * 100 * (2 + FORWARD) + 5000 * QUERY
                                        + 2 * 5 * 100 + 1 * 5000 * QUERY)
    assert attack_passes(pgd_at.config.evaluation, 10_000, 0.9, [aa.key]) == pytest.approx(
        10_000 * (100 + 0.9 * cost.robust))
    assert attack_passes(pgd_at.config.evaluation, 1_000, 0.9, [aa.key]) == pytest.approx(
        1_000 * (100 + 0.9 * cost.robust))
    calm = aa.model_copy(update={"args": {**aa.args, "escalate": False}})
    assert resolve(calm, [0.3]).passes().robust == pytest.approx(
        9 * 100 * (2 + FORWARD) + 5000 * QUERY)


def test_plan_of_the_robust_study_is_bound_by_one_autoattack(capsys) -> None:
    """One run's evaluation is one task: the robust study's critical path is a robust model's
    AutoAttack on 10 000 images, hours where the plain-epoch count of its stages says minutes,
    and nodes beyond a handful stop helping."""
    code = main(["plan", str(ROBUST), "--nodes", "1,16", "--plain-epoch-s", "25"])
    out = capsys.readouterr().out
    assert code == 0
    minutes = {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)", out, re.M)}
    path = float(re.search(r"critical path: ([\d.]+) min", out)[1])
    assert path > 180 and "evaluate" in out.split("critical path:")[1]
    assert minutes[16] == pytest.approx(path, rel=0.05)
    assert minutes[1] > 6 * path * 0.9  # six robust models at depth 2, each as long


def test_what_a_resumed_study_does_not_run_again(paper_seed0) -> None:
    """Finished runs' evaluations, cached stages and stages no unfinished run needs are done;
    a control's transfer crafting is done only once every run attacked with it has finished
    (the examples are not kept); the rest keeps its time."""
    runs = paper_seed0
    control = next(r for r in runs if r.sequence == "none" and r.depth == 2)
    users = [r for r in runs if r.reference == control.stages[-1]]
    assert users
    g = tasks(runs, lambda s, r: 1.0, lambda r: 1.0, lambda r: 1.0)
    craft = f"transfer:{control.stages[-1].key}"
    done = done_tasks(runs, cached={control.stages[0].key}, finished={control.key})
    assert f"evaluate:{control.key}" in done and f"stage:{control.stages[0].key}" in done
    assert craft not in done
    # the control's second stage is needed by no unfinished run: done though not cached
    assert f"stage:{control.stages[1].key}" in done
    done = done_tasks(runs, set(), {control.key, *(r.key for r in users)})
    assert craft in done
    left = remaining(g, done)
    assert sum(t.seconds for t in left) == len(g) - len(done)
    assert {t.name for t in left if t.seconds == 0} == done
