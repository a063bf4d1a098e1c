"""The results report: a tiny two-seed study read back from MLflow, rendered, logged; a study with a
failed and a missing run; the ``art-study report`` command; the statistics on known numbers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest

from art_study import report
from art_study.cli import main
from art_study.config import load_config
from art_study.study import run_study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SEQUENCES = ["none", "adversarial_training", "distillation", "gradient_masking"]
P_VALUE = re.compile(r"^(<0\.0001|\d(\.\d+)?(e-\d+)?)"
                     r"( \((exact|χ²|clustered χ²|sign-flip, 2\^16 draws)\))?$")


@pytest.fixture(scope="module")
def study(tmp_path_factory, mnist_dir):
    """The tiny study with two seeds, control and single defenses: 8 child runs."""
    store = tmp_path_factory.mktemp("report-study")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = load_config(TINY, [f"tracking.uri={uri}", f"data.dir={mnist_dir}", "study.seeds=[0,1]",
                             "evaluation.eps=[0.1,0.3]",
                             "study.blocks=[{depths: [2], sequences: [control, singles]}]"])
    result = run_study(cfg, progress=False)
    return uri, result.parent_run_id, store


@pytest.fixture(scope="module")
def written(study, tmp_path_factory):
    """The report of that study, by name, into a fresh directory, logged to the parent run."""
    uri, _, _ = study
    files = report.write_report("tiny", tracking_uri=uri, out_dir=tmp_path_factory.mktemp("out"))
    return files, files.markdown.read_text(encoding="utf-8")


def table_after(md: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after ``heading``, as dicts."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r, strict=True)) for r in body]


def test_report_tables_tests_and_comparison_eps(study, written) -> None:
    _, parent, _ = study
    files, md = written
    assert files.parent_run_id == parent and files.study == "tiny"
    rows = {r["sequence"]: r for r in table_after(md, "## Results: 2 conv layers")}
    assert set(rows) == {"none (control)", *SEQUENCES[1:]}
    for row in rows.values():
        assert row["seeds"] == "2/2"
        assert "±" in row["clean %"] and "±" in row["FGSM ε=0.3 %"]
    eps_star = re.search(r"We compare at ε = ([0-9.]+):", md).group(1)
    assert f"FGSM ε={eps_star} % ★" in rows["none (control)"]
    paper = f"paper FGSM % (at ε={eps_star})"
    assert rows["none (control)"][paper] == "29.15"
    assert rows["adversarial_training"][paper] == "88.5"
    assert rows["none (control)"]["paper clean %"] == "99.5"
    assert "randomised gradients" in rows["gradient_masking"]["repeat max|Δ|"]
    assert "randomised gradients" not in rows["none (control)"]["repeat max|Δ|"]

    assert "closest to the paper's 29.15 %" in md
    # The headline: the worst case over attacks where the runs logged it, else FGSM, saying so.
    head = {r["sequence"]: r for r in table_after(md, "## Headline: robust accuracy")}
    assert set(head) == {"none (control)", *SEQUENCES[1:]}
    worst_case = any(c.startswith("worst case") for c in head["none (control)"])
    assert worst_case == ("per-image worst case over every attack" in md)
    assert worst_case != ("headline falls back to **FGSM" in md)
    assert {r["ε"] for r in table_after(md, "## Comparison ε")} == {"0.1", "0.3"}

    vs_control = table_after(md, "### Each defense vs the control")
    assert {r["A"] for r in vs_control} == set(SEQUENCES[1:])
    assert len(table_after(md, "### Between defenses")) == 3
    pairs = vs_control + table_after(md, "### Between defenses")
    for row in pairs:
        # Two seeds whose accuracies differ by exactly the same amount (1-point steps on 100
        # images) leave the paired t-test undefined: the report says so instead of a p-value.
        assert P_VALUE.match(row["paired t p"]) or \
            row["paired t p"] == "n/a (same difference every seed)", row
        assert P_VALUE.match(row["McNemar p over seeds"]), row
        assert re.fullmatch(r"s0: \d+ / \d+ · s1: \d+ / \d+", row["A✓B✗ / A✗B✓ per seed"]), row
        assert row["seeds · images"] == "2 · 100"
    assert any(P_VALUE.match(row["paired t p"]) for row in pairs)
    assert "## Missing or failed runs\n\nNone: all 8 planned runs finished." in md


def test_report_shows_transfer_and_masking_verdict(written) -> None:
    _, md = written
    rows = {r["sequence"]: r for r in table_after(
        md, "## Beyond FGSM: stronger attacks and the gradient-masking verdict")}
    assert set(rows) == {"none (control)", *SEQUENCES[1:]}
    assert rows["none (control)"]["transfer fgsm ε 0.3"] == "—"  # crafted on itself: not run
    assert "±" in rows["adversarial_training"]["transfer fgsm ε 0.3"]
    # The gradient-noise layer fails the determinism check on both seeds.
    assert rows["gradient_masking"]["masking suspected"].startswith("2/2")
    assert "gradients_deterministic" in rows["gradient_masking"]["masking suspected"]

    # Each attack's budget and wall time per model (tiny.yaml: 100 test images, diagnostics on
    # 50 with 5 and 25 PGD steps, the transfer FGSM on the 6 defended runs).
    cost = {r["attack"]: r for r in table_after(md, "### Evaluation budget and wall time")}
    assert set(cost) == {"diag pgd5", "diag pgd25", "diag pgd_destroy", "transfer fgsm"}
    assert cost["transfer fgsm"]["images"] == "100" and cost["transfer fgsm"]["models"] == "6"
    assert cost["diag pgd25"]["images"] == "50" and cost["diag pgd25"]["models"] == "8"
    assert "max_iter 25" in cost["diag pgd25"]["budget"]
    for row in cost.values():
        assert re.fullmatch(r"\d+\.\d \(\d+\.\d–\d+\.\d\)",
                            row["wall s per model: median (min–max)"]), row


def test_runs_log_per_example_correctness(study) -> None:
    uri, parent, _ = study
    mlflow.set_tracking_uri(uri)
    for run_id in report.study_runs(parent)["run_id"]:
        correct = report.load_correctness(run_id)
        run = mlflow.get_run(run_id)
        control = run.data.tags["sequence"] == "none"
        expected = {"clean", "fgsm_eps_0.1", "fgsm_eps_0.3", "diag/pgd5_eps_0.3",
                    "diag/pgd25_eps_0.3", "diag/pgd_destroy_eps_0.5"}
        if not control:  # tiny.yaml: transfer [fgsm], crafted on the control
            expected |= {"transfer/fgsm_eps_0.1", "transfer/fgsm_eps_0.3"}
        expected |= {"robust_eps_0.1", "robust_eps_0.3"}  # the per-image worst case
        assert set(correct) == expected
        for eps in ("0.1", "0.3"):  # robust only where clean-correct and FGSM did not fool it
            robust = correct[f"robust_eps_{eps}"]
            n = len(robust)
            assert not (robust & ~(correct["clean"][:n] & correct[f"fgsm_eps_{eps}"][:n])).any()
        for key in expected - {"clean", "fgsm_eps_0.1", "fgsm_eps_0.3"}:
            name, _, eps = key.rpartition("_eps_")
            assert correct[key].mean() == pytest.approx(
                run.data.metrics[f"{name}/accuracy_eps_{eps}"])
        assert correct["clean"].dtype == bool and correct["clean"].shape == (100,)
        assert correct["clean"].mean() == pytest.approx(run.data.metrics["clean/accuracy"])
        assert correct["fgsm_eps_0.3"].mean() == pytest.approx(
            run.data.metrics["fgsm_custom/accuracy_eps_0.3"])


def test_plots_html_and_logged_artifacts(study, written) -> None:
    _, parent, _ = study
    files, md = written
    assert sorted(p.name for p in files.images) == ["depth.png", "examples.png",
                                                    "robustness_depth2.png"]
    for png in files.images:
        assert f"]({png.name})" in md
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[2] in (3, 4)
        assert image.shape[0] >= 200 and image.shape[1] >= 400
        assert image.std() > 0.01  # not a blank canvas
    page = files.html.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == len(files.images)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<table" in page and "closest to the paper" in page
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "report")}
    assert logged == {f"report/{p.name}" for p in (files.markdown, files.html, *files.images)}


def test_failed_and_missing_runs_are_listed(study, tmp_path) -> None:
    """On a copy of the store: one run FAILED, one deleted; the report still renders."""
    _, parent, store = study
    shutil.copy(store / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = report.study_runs(parent).set_index(["sequence", "seed"])
    client = mlflow.MlflowClient()
    failed = runs.loc[("distillation", 1), "run_id"]
    client.set_tag(failed, "failure_reason", "RuntimeError: injected")
    client.set_terminated(failed, "FAILED")
    client.delete_run(runs.loc[("gradient_masking", 0), "run_id"])

    files = report.write_report(parent, tracking_uri=uri, out_dir=tmp_path / "out", log=False,
                                examples=False)
    md = files.markdown.read_text(encoding="utf-8")
    missing = {(r["sequence"], r["seed"]): r for r in table_after(md, "## Missing or failed")}
    assert set(missing) == {("distillation", "1"), ("gradient_masking", "0")}
    assert missing[("distillation", "1")]["status"] == "FAILED"
    assert "injected" in missing[("distillation", "1")]["failure reason"]
    assert missing[("gradient_masking", "0")]["status"] == "not started"
    rows = {r["sequence"]: r for r in table_after(md, "## Results: 2 conv layers")}
    assert rows["distillation"]["seeds"] == "1/2"
    assert "(n=1)" in rows["distillation"]["clean %"]
    vs_control = {r["A"]: r for r in table_after(md, "### Each defense vs the control")}
    assert vs_control["distillation"]["paired t p"] == "n/a (1 seed)"
    assert P_VALUE.match(vs_control["distillation"]["McNemar p over seeds"])
    assert vs_control["distillation"]["A✓B✗ / A✗B✓ per seed"].startswith("s0: ")


def test_cli_report(study, tmp_path, monkeypatch, capsys) -> None:
    uri, parent, _ = study
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--tracking-uri", uri]) == 0  # the most recent study, default dir
    out = capsys.readouterr().out
    where = Path("mlruns") / "reports" / "tiny"
    assert f"{where / 'report.md'}" in out and parent in out
    assert (tmp_path / where / "report.html").stat().st_size > 0

    for args, needle in ((["no-such-study"], "no study named 'no-such-study'"),
                         (["--tracking-uri", f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"],
                          "no MLflow store")):
        argv = ["report", *args] if "--tracking-uri" in args else ["report", *args,
                                                                    "--tracking-uri", uri]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("art-study: error:") and "\n" not in err, err
        assert needle in err, err


def test_export_keeps_markdown_pngs_and_one_csv_row_per_run(study, tmp_path, capsys,
                                                          mnist_dir) -> None:
    """`report --export`: what results/<study>/ keeps, regenerated from the store alone."""
    uri, parent, _ = study
    client = mlflow.MlflowClient(uri)
    logged_before = {a.path for a in client.list_artifacts(parent, "report")}
    out = tmp_path / "results" / "tiny"
    out.mkdir(parents=True)
    (out / "report.html").write_text("stale")
    assert main(["report", "tiny", "--tracking-uri", uri, "--export", str(out),
                 "--data-dir", str(mnist_dir)]) == 0
    assert "exported to" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["depth.png", "examples.png", "report.md", "robustness_depth2.png",
                     "runs.csv"]
    assert sum(p.stat().st_size for p in out.iterdir()) < 5 * 2**20
    assert "## Headline: robust accuracy" in (out / "report.md").read_text(encoding="utf-8")

    runs = pd.read_csv(out / "runs.csv")
    kids = mlflow.search_runs(experiment_ids=[mlflow.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(runs["run_id"]) == sorted(kids["run_id"]) and len(runs) == 8
    assert list(runs.columns[:5]) == ["run_id", "status", "sequence", "depth", "seed"]
    assert set(runs["verdict_masking_suspected"].astype(str).str.lower()) <= {"true", "false"}
    assert not any(c.startswith("params.tracking.") or c.startswith("tags.mlflow")
                   for c in runs.columns)
    one = runs.set_index(["sequence", "seed"]).loc[("distillation", 1)]
    run = mlflow.get_run(one["run_id"])
    assert one["metrics.clean/accuracy"] == pytest.approx(run.data.metrics["clean/accuracy"])
    assert str(one["params.model.n_conv"]) == run.data.params["model.n_conv"]
    # what produced the run: code, versions, platform, and each trained model's hash
    for tag in ("git_commit", "platform", "version.tensorflow", "stage1.sha256"):
        assert one[tag] == run.data.tags[tag], tag
    assert len(one["stage1.sha256"]) == 64
    # nothing logged to the store by an export
    assert {a.path for a in client.list_artifacts(parent, "report")} == logged_before


# -- the statistics on known numbers (no training) -----------------------------------------------
def test_significance_rows_report_each_seed() -> None:
    """Per-seed counts and p-values, the p over seeds, and the images per seed."""
    scores = pd.DataFrame([
        {"run_id": f"{seq}{seed}", "sequence": seq, "depth": 2, "seed": seed, "eps_0.3": acc,
         "fingerprint": "same"}
        for seq, accs in (("none", (10.0, 12.0)), ("adversarial_training", (60.0, 55.0)))
        for seed, acc in zip((0, 1), accs, strict=True)])
    summary = report.summarise(scores.assign(clean=99.0), [0.3])
    rng = np.random.default_rng(0)
    correct = {rid: {"fgsm_eps_0.3": rng.random(100) < (0.6 if rid[0] == "a" else 0.1)}
               for rid in scores["run_id"]}
    [row] = report.significance_table(scores, summary, correct,
                                      [(2, "adversarial_training", "none")], 0.3).to_dict("records")
    for seed in (0, 1):
        a, b = correct[f"adversarial_training{seed}"]["fgsm_eps_0.3"], \
            correct[f"none{seed}"]["fgsm_eps_0.3"]
        counts = f"s{seed}: {int(np.sum(a & ~b))} / {int(np.sum(~a & b))}"
        assert counts in row["A✓B✗ / A✗B✓ per seed"]
        p, how = report.mcnemar(int(np.sum(a & ~b)), int(np.sum(~a & b)))
        assert f"s{seed}: {report.fmt_p(p)} ({how})" in row["McNemar p per seed"]
    assert P_VALUE.match(row["McNemar p over seeds"]) and row["seeds · images"] == "2 · 100"


def test_significance_on_the_worst_case_uses_its_verdicts() -> None:
    """measure="robust": the worst case's accuracies and per-image verdicts, not FGSM's."""
    scores = pd.DataFrame([
        {"run_id": f"{seq}{seed}", "sequence": seq, "depth": 2, "seed": seed, "eps_0.3": fg,
         "robust_eps_0.3": worst, "fingerprint": "same"}
        for seq, rows in (("none", ((30.0, 0.0), (32.0, 1.0))),
                          ("trades", ((95.0, 88.0), (94.0, 86.0))))
        for seed, (fg, worst) in zip((0, 1), rows, strict=True)])
    summary = report.summarise(scores.assign(clean=99.0), [0.3])
    rng = np.random.default_rng(1)
    correct = {rid: {"fgsm_eps_0.3": rng.random(200) < 0.5,
                     "robust_eps_0.3": rng.random(200) < (0.88 if rid[0] == "t" else 0.01)}
               for rid in scores["run_id"]}
    [row] = report.significance_table(scores, summary, correct, [(2, "trades", "none")], 0.3,
                                      "robust").to_dict("records")
    assert row["A %"].startswith("87.00 ±") and row["B %"].startswith("0.50 ±")
    a, b = correct["trades0"]["robust_eps_0.3"], correct["none0"]["robust_eps_0.3"]
    assert row["A✓B✗ / A✗B✓ per seed"].startswith(
        f"s0: {int(np.sum(a & ~b))} / {int(np.sum(~a & b))}")
    [fgsm] = report.significance_table(scores, summary, correct, [(2, "trades", "none")],
                                       0.3).to_dict("records")
    assert fgsm["A %"].startswith("94.50 ±") and fgsm != row
    with pytest.raises(ValueError, match="measure"):
        report.significance_table(scores, summary, correct, [(2, "trades", "none")], 0.3, "pgd")


def test_confidence_interval_and_formatting() -> None:
    assert report.fmt_ci(pd.Series({"mean": 97.0, "half": np.nan, "n": 1})) == "97.00 (n=1)"
    assert report.fmt_ci(pd.Series({"mean": 97.0, "half": 1.5, "n": 3})) == "97.00 ± 1.50"


def test_comparison_eps_is_closest_to_paper_control() -> None:
    summary = pd.DataFrame([
        {"depth": d, "sequence": "none", "metric": m, "mean": v, "half": 1.0, "n": 3}
        for d, m, v in [(2, "clean", 99.0), (2, "eps_0.1", 70.0), (2, "eps_0.2", 31.0),
                        (2, "eps_0.3", 12.0), (3, "eps_0.3", 29.0)]])
    cmp = report.choose_comparison_eps(summary, [0.1, 0.2, 0.3])
    assert cmp.eps == 0.2 and cmp.base_depth == 2
    assert "closest to the paper's 29.15 %" in cmp.reason
    assert list(cmp.sweep["ε"]) == ["0.1", "0.2", "0.3"]


# -- headline and AutoAttack on synthetic runs (a throw-away store, no training) ----------------
def log_study(name: str, runs: list[tuple[str, int, dict]],
              params: dict[str, dict[str, str]] | None = None) -> None:
    """A study's parent run and one finished child per (sequence, seed, metrics), depth 2;
    ``params``: config parameters by sequence."""
    with mlflow.start_run(run_name=name):
        mlflow.set_tags({"art_study.role": "study", "study": name})
        for seq, seed, metrics in runs:
            with mlflow.start_run(nested=True, run_name=f"{seq} | 2conv | seed {seed}"):
                mlflow.set_tags({"art_study.role": "run", "sequence": seq, "depth": "2",
                                 "seed": str(seed), "run_key": f"{name}-{seq}-{seed}"})
                mlflow.log_params((params or {}).get(seq, {}))
                mlflow.log_metrics(metrics)


def _accuracies(clean: float, fgsm: float, **more: float) -> dict[str, float]:
    return {"clean/accuracy": clean, "fgsm_custom/accuracy_eps_0.1": min(clean, fgsm + 0.2),
            "fgsm_custom/accuracy_eps_0.3": fgsm, **more}


AA = "attack/autoattack-standard"
#: per seed: FGSM, worst case, and AutoAttack after APGD-CE, APGD-T, Square (cumulative)
WORST_CASE_RUNS = [(0.80, 0.10, 0.30, 0.12, 0.10), (0.84, 0.14, 0.34, 0.16, 0.14)]
#: worst case by ε (seed 0; seed 1 adds 2 points): both fall to 0 at 0.3, not at 0.1
TWO_EPS = {"none": {"0.1": 0.05, "0.3": 0.0}, "distillation": {"0.1": 0.6, "0.3": 0.0}}


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> str:
    """One sqlite store (creating one costs seconds) with two synthetic studies: ``worst-case``
    (distillation with the worst case and AutoAttack logged; a control evaluated before them)
    and ``fgsm-only`` (no worst case at all)."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('synthetic') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(report.DEFAULT_EXPERIMENT)
    runs = []
    for seed, (fg, worst, ce, t, sq) in enumerate(WORST_CASE_RUNS):
        runs.append(("distillation", seed, _accuracies(
            0.99, fg, **{"robust/accuracy_eps_0.3": worst, "robust/accuracy_eps_0.1": 0.5,
                         "transfer/fgsm/accuracy_eps_0.1": 0.5,
                         f"{AA}/accuracy_eps_0.3": sq, f"{AA}/square/accuracy_eps_0.3": sq,
                         f"{AA}/apgd-t/accuracy_eps_0.3": t, f"{AA}/apgd-ce/accuracy_eps_0.3": ce,
                         "attack/pgd/accuracy_eps_0.3": ce})))
        runs.append(("none", seed, _accuracies(0.99, 0.30)))
    runs.append(("adversarial_training>distillation", 0, _accuracies(0.98, 0.25)))
    runs.append(("gradient_masking>distillation", 0, _accuracies(0.98, 0.9)))
    log_study("worst-case", runs, params={"gradient_masking>distillation":
                                          {"defenses.distillation.train_teacher": "True"}})
    log_study("fgsm-only", [(seq, seed, _accuracies(0.99, fgsm + 0.01 * seed))
                            for seq, fgsm in (("none", 0.29), ("adversarial_training", 0.9))
                            for seed in (0, 1)])
    log_study("two-eps", [(seq, seed, _accuracies(0.99, 0.5, **{
        f"{m}/accuracy_eps_{eps}": worst[eps] + 0.02 * seed
        for m in ("attack/pgd", "robust") for eps in ("0.1", "0.3")}))
        for seq, worst in TWO_EPS.items() for seed in (0, 1)])
    yield uri
    mlflow.set_tracking_uri(previous)


def test_headline_is_the_worst_case_and_autoattack_shows_its_components(synthetic_store,
                                                                          tmp_path) -> None:
    """With ``robust/accuracy_eps_<ε>`` logged, the headline is the worst case over attacks
    (mean ± CI over seeds), FGSM beside it; a sequence whose runs predate the metric shows FGSM,
    marked. The AutoAttack column comes with its cumulative components, in AutoAttack's order."""
    files = report.write_report("worst-case", tracking_uri=synthetic_store,
                                out_dir=tmp_path / "out", log=False, examples=False)
    md = files.markdown.read_text(encoding="utf-8")

    assert "per-image worst case over every attack" in md
    head = {r["sequence"]: r for r in table_after(md, "## Headline: robust accuracy")}
    dd = head["distillation"]
    worst = pd.Series([100 * r[1] for r in WORST_CASE_RUNS])
    assert dd["worst case ε=0.3 %"] == report.fmt_ci(report._ci_row(worst))
    # Logged, but only FGSM and transfer FGSM ran at 0.1: no "worst case" column there.
    assert "worst case ε=0.1 %" not in dd
    assert dd["FGSM ε=0.3 %"].startswith("82.00 ±")
    assert dd["seeds"] == "2" and dd["clean %"].startswith("99.00")
    control = head["none (control)"]
    assert control["worst case ε=0.3 %"].startswith("30.00") and \
        control["worst case ε=0.3 %"].endswith("(FGSM only)")
    assert md.index("## Headline") < md.index("## Comparison ε")

    worst_vs_control = {r["A"]: r for r in table_after(
        md, "### Each defense vs the control: worst case over attacks, ε = 0.3")}
    assert worst_vs_control["distillation"]["A %"] == dd["worst case ε=0.3 %"]
    assert "worst case over attacks, ε = 0.1" not in md  # only FGSM-type attacks ran there

    beyond = {r["sequence"]: r for r in table_after(
        md, "## Beyond FGSM: stronger attacks and the gradient-masking verdict")}["distillation"]
    assert beyond["autoattack-standard ε 0.3"] == dd["worst case ε=0.3 %"]
    breakdown = "autoattack-standard ε 0.3 after apgd-ce → apgd-t → square"
    assert beyond[breakdown] == "32.00 → 14.00 → 12.00"
    assert not any("/" in column for column in beyond)  # components only in the breakdown
    assert beyond["pgd ε 0.3"].startswith("32.00")

    # What "X → distillation" is, per how the teacher was made.
    assert ("`adversarial_training>distillation`: **distillation from a T = 1 teacher**"
            in md)
    assert "`gradient_masking>distillation`: the first stage's model was trained further" in md


def test_significance_tests_the_worst_case_at_every_attacked_eps(synthetic_store,
                                                                   tmp_path) -> None:
    """Where every defense falls to 0 at the comparison ε, the worst case at a smaller attacked
    ε still separates them: the significance section tests it at each such ε, then FGSM."""
    md = report.write_report("two-eps", tracking_uri=synthetic_store, out_dir=tmp_path / "out",
                             log=False, examples=False).markdown.read_text(encoding="utf-8")
    heads = re.findall(r"^### Each defense vs the control: (.+)$", md, flags=re.M)
    assert heads[:2] == ["worst case over attacks, ε = 0.1", "worst case over attacks, ε = 0.3"]
    at = {eps: table_after(md, f"### Each defense vs the control: worst case over attacks, "
                               f"ε = {eps}")[0] for eps in ("0.1", "0.3")}
    assert at["0.1"]["A %"].startswith("61.00 ±") and at["0.1"]["Δ (A−B) pp"] == "+55.00"
    assert at["0.3"]["Δ (A−B) pp"] == "+0.00"
    assert "### Each defense vs the control: FGSM, ε = 0.3" in md


def test_headline_falls_back_to_fgsm_and_says_so(synthetic_store, tmp_path) -> None:
    """No worst case logged: FGSM at the comparison ε, and the text says so."""
    md = report.write_report("fgsm-only", tracking_uri=synthetic_store, out_dir=tmp_path / "out",
                             log=False, examples=False).markdown.read_text(encoding="utf-8")
    eps_star = re.search(r"We compare at ε = ([0-9.]+):", md).group(1)
    assert f"headline falls back to **FGSM at ε = {eps_star}**" in md
    head = {r["sequence"]: r for r in table_after(md, "## Headline: robust accuracy")}
    assert set(head) == {"none (control)", "adversarial_training"}
    assert not any(c.startswith("worst case") for c in head["adversarial_training"])
    assert head["adversarial_training"][f"FGSM ε={eps_star} %"].startswith("90.50 ±")
    assert "distillation from a T = 1 teacher" not in md  # no X → distillation row


def test_headline_says_on_how_many_images_worst_case_and_fgsm_were_measured() -> None:
    """The headline sets the worst case (first 1 000 images) beside FGSM (all 10 000): its
    text says so; a worst case only FGSM-type attacks made (ε 0.1 here) is not counted."""
    from art_study.report.document import _images_note

    finished = pd.DataFrame({
        "metrics.robust/accuracy_eps_0.3": [0.9], "metrics.robust/n_images_eps_0.3": [1000.0],
        "metrics.attack/pgd/accuracy_eps_0.3": [0.92],
        "metrics.robust/accuracy_eps_0.1": [0.95], "metrics.robust/n_images_eps_0.1": [10000.0],
        "metrics.transfer/fgsm/accuracy_eps_0.1": [0.97], "metrics.eval/n_images": [10000.0]})
    assert "first 1 000 test images" in _images_note(finished)
    assert "FGSM on 10 000" in _images_note(finished)
    assert _images_note(finished.assign(**{"metrics.robust/n_images_eps_0.3": [10000.0]})) == ""
