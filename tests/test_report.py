"""The results report, on studies logged as a study logs them (results table, verdicts, metrics,
tags, plan) from small synthetic tables, no training: the tables, tests and plots; the paper's
section only for a study of the paper's defenses; a study with a failed and a missing run; runs
logged before the table (metrics only); the ``art-study report`` command."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from art_study import report
from art_study.cli import main
from art_study.config import ModelConfig, load_config, to_yaml
from art_study.models import build_cnn
from art_study.report import figures, paper, reading, statistics, tables
from art_study.results import (
    LEGACY_VERDICTS_ARTIFACT,
    CrossCheck,
    EvaluationResult,
    Kind,
    Outcome,
)
from art_study.tracking import log_evaluation, log_keras_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SEQUENCES = ["none", "adversarial_training", "distillation", "gradient_masking"]
P_VALUE = re.compile(r"^(<0\.0001|\d(\.\d+)?(e-\d+)?)"
                     r"( \((exact|χ²|clustered χ²|sign-flip, 2\^16 draws)\))?$")
N = 100  # test images per run


# -- synthetic evaluations, logged as a study logs them ------------------------------------------
def mask(rng: np.random.Generator, accuracy: float, n: int = N) -> np.ndarray:
    """``n`` per-image verdicts, exactly ``accuracy`` of them true."""
    return rng.permutation(n) < round(accuracy * n)


def evaluation(seed: int, clean: float, fgsm: dict[float, float],
               attacks: dict[tuple[str, float], float] | None = None,
               transfer: dict[float, float] | None = None,
               components: dict[float, dict[str, float]] | None = None,
               worst_images: int = N, repeat: float = 0.0, worst: bool = True
               ) -> EvaluationResult:
    """An evaluation with these accuracies: our and ART's FGSM per ε, ``attack/pgd``-style
    attacks on the first ``worst_images`` images, transfer FGSM, an AutoAttack's components,
    two diagnostic PGD runs, and (``worst``) the worst case over FGSM, attacks and transfer."""
    rng = np.random.default_rng(seed)
    r = EvaluationResult(repeat_max_abs_diff=repeat)
    add = r.outcomes.append
    add(Outcome(Kind.CLEAN, "", np.nan, clean, N, verdict=mask(rng, clean)))
    for eps, acc in fgsm.items():
        add(Outcome(Kind.FGSM, "fgsm", eps, acc, N, 0.5, verdict=mask(rng, acc)))
        add(Outcome(Kind.FGSM_ART, "fgsm", eps, acc, N, 2.0, verdict=mask(rng, acc)))
        r.cross_checks[eps] = CrossCheck(0.0, 0.0, 1.0)
    for (key, eps), acc in (attacks or {}).items():
        add(Outcome(Kind.ATTACK, key, eps, acc, worst_images, 3.0 + seed,
                    budget={"max_iter": 40.0}, verdict=mask(rng, acc, worst_images)))
    for eps, parts in (components or {}).items():
        for name, acc in parts.items():
            add(Outcome(Kind.ATTACK, "autoattack-standard", eps, acc, worst_images,
                        component=name, verdict=mask(rng, acc, worst_images)))
    for eps, acc in (transfer or {}).items():
        add(Outcome(Kind.TRANSFER, "fgsm", eps, acc, N, 0.2,
                    budget={"craft_time_s": 1.0}, verdict=mask(rng, acc)))
    for label, steps in (("pgd5", 5.0), ("pgd25", 25.0)):
        add(Outcome(Kind.DIAG, label, max(fgsm), 0.0, 50, 1.0 + steps / 10,
                    budget={"max_iter": steps}, verdict=np.zeros(50, bool)))
    for eps in fgsm if worst else []:
        rows = [o for o in r.outcomes if o.eps == eps and o.component == ""
                and o.kind in (Kind.FGSM, Kind.ATTACK, Kind.TRANSFER)]
        n = min(o.n_images for o in rows)
        worst = min(o.accuracy for o in rows)
        add(Outcome(Kind.WORST_CASE, "", eps, worst, n, verdict=mask(rng, worst, n)))
    return r


def log_study(name: str, runs: list[dict], eps: list[float], *, legacy: bool = False,
              models: dict | None = None, params: dict | None = None) -> str:
    """A study's parent run (with its plan, and ``params`` as its logged config) and one
    finished child per run: the evaluation's table and verdicts (or, ``legacy``, only its
    metrics and ``eval/correct.npz``), its metrics, tags and params; ``models``: (sequence,
    seed) → a Keras model to log with a config.yaml, for the examples figure."""
    with mlflow.start_run(run_name=name) as parent:
        mlflow.set_tags({"art_study.role": "study", "study": name})
        mlflow.log_params(params or {})
        plan = [[r["sequence"], 2, r["seed"], f"{name}-{r['sequence']}-{r['seed']}"] for r in runs]
        mlflow.log_dict({"columns": ["sequence", "depth", "seed", "run_key"], "data": plan},
                        "plan.json")
        for r in runs:
            with mlflow.start_run(nested=True, run_name=f"{r['sequence']} | 2conv | {r['seed']}"):
                mlflow.set_tags({"art_study.role": "run", "sequence": r["sequence"],
                                 "depth": "2", "seed": str(r["seed"]), "data.fingerprint": "same",
                                 "run_key": f"{name}-{r['sequence']}-{r['seed']}",
                                 **r.get("tags", {})})
                mlflow.log_params({"evaluation.eps": yaml.safe_dump(eps, default_flow_style=True)
                                   .strip(), **r.get("params", {})})
                result = r["result"]
                mlflow.log_metrics(result.metrics)
                if legacy:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / "correct.npz"
                        np.savez_compressed(path, **result.correct)
                        mlflow.log_artifact(str(path), str(Path(LEGACY_VERDICTS_ARTIFACT).parent))
                else:
                    log_evaluation(result)
                model = (models or {}).get((r["sequence"], r["seed"]))
                if model is not None:
                    mlflow.log_text(models["config"], "config.yaml")
                    log_keras_model(model, np.zeros((2, 28, 28, 1), np.float32))
    return parent.info.run_id


MASKED = {"gradient_masking_suspected": "true",
          "gradient_masking_reasons": "gradients_deterministic: repeat differs; "
                                      "falls_to_chance: accuracy at 0.5 is 0.4"}
#: The paper-like study: accuracy (clean, FGSM at 0.1 and 0.3) per sequence and seed.
PAPER_RUNS = {"none": ((0.99, 0.55, 0.28), (0.98, 0.60, 0.31)),
              "adversarial_training": ((0.98, 0.90, 0.85), (0.97, 0.88, 0.80)),
              "distillation": ((0.99, 0.50, 0.33), (0.99, 0.52, 0.34)),
              "gradient_masking": ((0.97, 0.70, 0.45), (0.96, 0.69, 0.48))}
#: The robust study, seed 0 (seed 1 adds 2 points): clean, FGSM 0.1/0.3, PGD 0.1/0.3, and
#: AutoAttack at 0.3 after APGD-CE, APGD-T, Square (cumulative).
ROBUST_RUNS = {"none": (0.99, 0.70, 0.30, 0.05, 0.00, (0.02, 0.00, 0.00)),
               "trades": (0.98, 0.96, 0.94, 0.95, 0.89, (0.90, 0.88, 0.86))}


def paper_runs() -> list[dict]:
    runs = []
    for seq, seeds in PAPER_RUNS.items():
        for seed, (clean, f1, f3) in enumerate(seeds):
            runs.append({"sequence": seq, "seed": seed,
                         "tags": {**(MASKED if seq == "gradient_masking" else
                                     {"gradient_masking_suspected": "false"})},
                         "result": evaluation(seed, clean, {0.1: f1, 0.3: f3},
                                              transfer=None if seq == "none"
                                              else {0.1: f1 + 0.02, 0.3: f3 + 0.05},
                                              repeat=0.6 if seq == "gradient_masking" else 0)})
    return runs


def robust_runs() -> list[dict]:
    runs = []
    for seq, (clean, f1, f3, p1, p3, aa) in ROBUST_RUNS.items():
        for seed in (0, 1):
            d = 0.02 * seed
            runs.append({"sequence": seq, "seed": seed, "result": evaluation(
                seed, clean, {0.1: f1 + d, 0.3: f3 + d},
                attacks={("pgd", 0.1): p1 + d, ("pgd", 0.3): p3 + d,
                         ("autoattack-standard", 0.3): aa[2] + d},
                components={0.3: dict(zip(("apgd-ce", "apgd-t", "square"),
                                          (a + d for a in aa), strict=True))},
                worst_images=40)})
    # evaluated before the worst case and the attacks existed: FGSM only
    runs.append({"sequence": "pgd_adversarial_training", "seed": 0,
                 "result": evaluation(0, 0.98, {0.1: 0.97, 0.3: 0.93}, worst=False)})
    for seq, teacher in (("adversarial_training>distillation", "False"),
                         ("gradient_masking>distillation", "True")):
        older = evaluation(0, 0.97, {0.1: 0.5, 0.3: 0.2}, worst=False)
        runs.append({"sequence": seq, "seed": 0, "result": older,
                     "params": {"defenses.distillation.train_teacher": teacher}})
    return runs


@pytest.fixture(scope="module")
def store(tmp_path_factory, mnist_dir) -> str:
    """One sqlite store (creating one costs seconds) with the studies: ``paper`` (the paper's
    defenses, two models logged for the examples), ``robust`` (attacks, AutoAttack components,
    the worst case), and ``legacy`` (the same runs as ``robust``, logged as before the table)."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('report') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(report.DEFAULT_EXPERIMENT)
    config = to_yaml(load_config(TINY, [f"data.dir={mnist_dir}"]))
    model = build_cnn(ModelConfig(n_conv=2))  # untrained: the examples grid only needs a model
    log_study("paper", paper_runs(), [0.1, 0.3],
              models={("none", 0): model, ("adversarial_training", 0): model, "config": config})
    log_study("robust", robust_runs(), [0.1, 0.3])
    log_study("legacy", robust_runs(), [0.1, 0.3], legacy=True)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def written(store, tmp_path_factory, mnist_dir):
    """The report of the paper-like study, by name, into a fresh directory, logged."""
    files = report.write_report("paper", tracking_uri=store, data_dir=str(mnist_dir),
                                out_dir=tmp_path_factory.mktemp("out"))
    return files, files.markdown.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def robust_md(store, tmp_path_factory) -> str:
    return report.write_report("robust", tracking_uri=store, out_dir=tmp_path_factory.mktemp(
        "robust"), log=False, examples=False).markdown.read_text(encoding="utf-8")


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


def ci(values: list[float]) -> str:
    return report.fmt_ci(report._ci_row(pd.Series(values) * 100))


# -- the paper-like study ------------------------------------------------------------------------
def test_results_tables_and_the_paper_section(written) -> None:
    files, md = written
    assert files.study == "paper"
    rows = {r["sequence"]: r for r in table_after(md, "## Results: 2 conv layers")}
    assert set(rows) == {"none (control)", *SEQUENCES[1:]}
    for seq, seeds in PAPER_RUNS.items():
        row = rows["none (control)" if seq == "none" else seq]
        assert row["seeds"] == "2/2"
        assert row["clean %"] == ci([s[0] for s in seeds])
        assert row["FGSM ε=0.1 %"] == ci([s[1] for s in seeds])
    # The control's FGSM accuracy at 0.3 (29.5 %) is closest to the paper's 29.15 %: ★ there.
    assert rows["none (control)"]["FGSM ε=0.3 % ★"] == ci([0.28, 0.31])
    assert "randomised gradients" in rows["gradient_masking"]["repeat max|Δ|"]
    assert rows["none (control)"]["repeat max|Δ|"] == "0"

    assert md.index("## Headline") < md.index("## Comparison with Kim (2025)") < md.index(
        "## Results: 2 conv layers")
    assert "We compare at ε = 0.3:" in md and "closest to the paper's 29.15 %" in md
    assert [r["ε"] for r in table_after(md, "## Comparison with Kim (2025)")] == ["0.1", "0.3"]
    paper = {r["sequence"]: r for r in table_after(md, "| depth | sequence | ours FGSM")}
    assert paper["none (control)"]["paper FGSM %"] == "29.15"
    assert paper["none (control)"]["paper clean %"] == "99.5"
    assert paper["adversarial_training"]["paper FGSM %"] == "88.5"
    assert paper["adversarial_training"]["ours FGSM ε=0.3 %"] == ci([0.85, 0.80])
    # Only FGSM and transfer FGSM ran: the headline is FGSM at the comparison ε, saying so.
    assert "headline falls back to **FGSM at ε = 0.3**" in md
    head = {r["sequence"]: r for r in table_after(md, "## Headline: robust accuracy")}
    assert not any(c.startswith("worst case") for c in head["adversarial_training"])


def test_significance_per_seed_and_over_seeds(written) -> None:
    _, md = written
    vs_control = table_after(md, "### Each defense vs the control: FGSM, ε = 0.3")
    assert {r["A"] for r in vs_control} == set(SEQUENCES[1:])
    between = table_after(md, "### Between defenses: FGSM, ε = 0.3")
    assert len(between) == 3
    for row in vs_control + between:
        assert P_VALUE.match(row["paired t p"]) or \
            row["paired t p"] == "n/a (same difference every seed)", row
        assert P_VALUE.match(row["McNemar p over seeds"]), row
        assert re.fullmatch(r"s0: \d+ / \d+ · s1: \d+ / \d+", row["A✓B✗ / A✗B✓ per seed"]), row
        assert row["seeds · images"] == "2 · 100"
    at = {r["A"]: r for r in vs_control}["adversarial_training"]
    assert at["A %"] == ci([0.85, 0.80]) and at["Δ (A−B) pp"] == "+53.00"
    assert at["paired t p"] == report.fmt_p(
        statistics.paired_t([85, 80], [28, 31]))
    assert "### Each defense vs the control: worst case" not in md  # only FGSM-type attacks
    assert "## Missing or failed runs\n\nNone: all 8 planned runs finished." in md


def test_transfer_masking_verdict_and_cost(written) -> None:
    _, md = written
    rows = {r["sequence"]: r for r in table_after(
        md, "## Beyond FGSM: stronger attacks and the gradient-masking verdict")}
    assert rows["none (control)"]["transfer fgsm ε 0.3"] == "—"  # not run on the control
    assert rows["adversarial_training"]["transfer fgsm ε 0.3"] == ci([0.90, 0.85])
    assert rows["gradient_masking"]["masking suspected"] == \
        "2/2 (falls_to_chance, gradients_deterministic)"
    assert rows["distillation"]["masking suspected"] == "0/2"
    cost = {r["attack"]: r for r in table_after(md, "### Evaluation budget and wall time")}
    assert set(cost) == {"diag pgd5", "diag pgd25", "transfer fgsm"}
    assert cost["transfer fgsm"]["images"] == "100" and cost["transfer fgsm"]["models"] == "6"
    assert cost["transfer fgsm"]["budget"] == "—"  # crafting time is not a budget
    assert cost["diag pgd25"]["budget"] == "max_iter 25" and cost["diag pgd25"]["models"] == "8"
    assert cost["diag pgd25"]["wall s per model: median (min–max)"] == "3.5 (3.5–3.5)"


def test_plots_html_and_logged_artifacts(store, written) -> None:
    files, md = written
    assert sorted(p.name for p in files.images) == ["depth.png", "examples.png",
                                                    "robustness_depth2.png"]
    for png in files.images:
        assert f"]({png.name})" in md
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[2] in (3, 4)
        assert image.shape[0] >= 200 and image.shape[1] >= 400
        assert image.std() > 0.01  # not a blank canvas
    assert "rows: control, seed 0; adversarial_training, seed 0" in md
    page = files.html.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == len(files.images)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<table" in page and "closest to the paper" in page
    client = mlflow.MlflowClient(store)
    logged = {a.path for a in client.list_artifacts(files.parent_run_id, "report")}
    assert logged == {f"report/{p.name}" for p in (files.markdown, files.html, *files.images)}


def test_failed_and_missing_runs_are_listed(store, tmp_path) -> None:
    """On a copy of the store: one run FAILED, one deleted; the report still renders."""
    shutil.copy(reading.local_store_path(store), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    parent = reading.find_study("paper").info.run_id
    runs = report.study_runs(parent).set_index(["sequence", "seed"])
    client = mlflow.MlflowClient()
    failed = runs.loc[("distillation", 1), "run_id"]
    client.set_tag(failed, "failure_reason", "RuntimeError: injected")
    client.set_terminated(failed, "FAILED")
    client.delete_run(runs.loc[("gradient_masking", 0), "run_id"])

    files = report.write_report(parent, tracking_uri=uri, out_dir=tmp_path / "out", log=False,
                                examples=False)
    mlflow.set_tracking_uri(store)
    md = files.markdown.read_text(encoding="utf-8")
    missing = {(r["sequence"], r["seed"]): r for r in table_after(md, "## Missing or failed")}
    assert set(missing) == {("distillation", "1"), ("gradient_masking", "0")}
    assert missing[("distillation", "1")]["status"] == "FAILED"
    assert "injected" in missing[("distillation", "1")]["failure reason"]
    assert missing[("gradient_masking", "0")]["status"] == "not started"
    rows = {r["sequence"]: r for r in table_after(md, "## Results: 2 conv layers")}
    assert rows["distillation"]["seeds"] == "1/2"
    assert rows["distillation"]["clean %"] == "99.00 (n=1)"
    vs_control = {r["A"]: r for r in table_after(md, "### Each defense vs the control")}
    assert vs_control["distillation"]["paired t p"] == "n/a (1 seed)"
    assert P_VALUE.match(vs_control["distillation"]["McNemar p over seeds"])
    assert vs_control["distillation"]["A✓B✗ / A✗B✓ per seed"].startswith("s0: ")


# -- a study of other defenses, with attacks beyond FGSM -------------------------------------------
def test_headline_is_the_worst_case_and_there_is_no_paper(robust_md) -> None:
    md = robust_md
    assert "Kim (2025)" not in md and "29.15" not in md and "Comparison with" not in md
    assert "per-image worst case over every attack" in md
    assert "first 40 test images" in md and "FGSM on 100" in md
    head = {r["sequence"]: r for r in table_after(md, "## Headline: robust accuracy")}
    trades = head["trades"]
    assert trades["worst case ε=0.3 %"] == ci([0.86, 0.88])  # AutoAttack's Square: the minimum
    assert trades["worst case ε=0.1 %"] == ci([0.95, 0.97])  # PGD's, below FGSM's there
    assert trades["FGSM ε=0.3 %"] == ci([0.94, 0.96])
    assert head["pgd_adversarial_training"]["worst case ε=0.3 %"] == "93.00 (n=1) (FGSM only)"
    rows = {r["sequence"]: r for r in table_after(md, "## Results: 2 conv layers")}
    assert "FGSM ε=0.3 % ★" in rows["trades"]  # the reference ε: the sweep's largest


def per_model(accuracies: list[float], n: int) -> str:
    """The per-model cell of seeds with these accuracies on ``n`` images each."""
    halves = sorted({f"{statistics.wilson_half_width(a, n) * 100:.1f}" for a in accuracies})
    return f"± {'–'.join(halves)} per model (n = {n})"


def test_headline_gives_one_models_binomial_interval_beside_the_seed_interval(robust_md) -> None:
    """Each robust figure (mean ± seed interval) is followed by one model's Wilson interval on
    the images it was measured on: the worst case on 40 images here, FGSM on all 100 where the
    runs logged no worst case; the document says what each interval means."""
    head = {r["sequence"]: r for r in table_after(robust_md, "## Headline: robust accuracy")}
    trades = head["trades"]
    column = "worst case ε=0.3: binomial 95 % per model"
    assert list(trades).index(column) == list(trades).index("worst case ε=0.3 %") + 1
    # seeds at 86 % and 88 % of 40 images: 34 and 35 correct, ± 11.0 and ± 10.3 points
    assert trades[column] == per_model([0.86, 0.88], 40) == "± 10.3–11.0 per model (n = 40)"
    assert head["none (control)"]["worst case ε=0.1: binomial 95 % per model"] == \
        per_model([0.05, 0.07], 40)
    assert head["pgd_adversarial_training"][column] == per_model([0.93], 100)
    assert "the spread of training" in robust_md
    assert "± 1.9 points on 1 000 images and ± 0.6 on 10 000" in robust_md
    beyond = {r["sequence"]: r for r in table_after(
        robust_md, "## Beyond FGSM: stronger attacks and the gradient-masking verdict")}
    assert beyond["trades"]["autoattack-standard ε 0.3: binomial 95 % per model"] == \
        per_model([0.86, 0.88], 40)


def test_per_model_interval_says_the_range_where_seeds_differ_in_images() -> None:
    """Seeds measured on 1 000 and on 10 000 images: the cell gives both half-widths and both
    counts; the FGSM fallback headline carries the interval of FGSM."""
    results = pd.concat([
        results_frame([("trades", 0, "worst_case", 0.3, 0.89)]).assign(n_images=1000),
        results_frame([("trades", 1, "worst_case", 0.3, 0.89)]).assign(n_images=10_000),
        results_frame([("trades", seed, "attack", 0.3, 0.89) for seed in (0, 1)]),
        results_frame([("trades", 0, "fgsm", 0.3, 0.95)]).assign(n_images=10_000)])
    status = pd.DataFrame({"sequence": ["trades"] * 2, "depth": [2, 2], "seed": [0, 1]})
    table, worst_case = tables.headline_table(results, status, 0.3)
    [row] = table.to_dict("records")
    assert worst_case
    assert row["worst case ε=0.3: binomial 95 % per model"] == \
        "± 0.6–1.9 per model (n = 1 000–10 000)"
    fallback, worst_case = tables.headline_table(results[results["kind"] == "fgsm"], status, 0.3)
    assert not worst_case
    assert fallback.to_dict("records")[0]["FGSM ε=0.3: binomial 95 % per model"] == \
        "± 0.4 per model (n = 10 000)"


def test_autoattack_shows_its_components_in_order(robust_md) -> None:
    beyond = {r["sequence"]: r for r in table_after(
        robust_md, "## Beyond FGSM: stronger attacks and the gradient-masking verdict")}
    trades = beyond["trades"]
    assert trades["autoattack-standard ε 0.3 after apgd-ce → apgd-t → square"] == \
        "91.00 → 89.00 → 87.00"
    assert trades["autoattack-standard ε 0.3"] == ci([0.86, 0.88])
    assert trades["pgd ε 0.1"] == ci([0.95, 0.97])
    assert not any("/" in column for column in trades)
    cost = {r["attack"]: r for r in table_after(robust_md, "### Evaluation budget and wall time")}
    assert cost["attack pgd"]["images"] == "40" and cost["attack pgd"]["models"] == "4"
    assert cost["attack pgd"]["wall s per model: median (min–max)"] == "3.5 (3.0–4.0)"


def test_significance_tests_the_worst_case_at_every_attacked_eps(robust_md) -> None:
    heads = re.findall(r"^### Each defense vs the control: (.+)$", robust_md, flags=re.M)
    assert heads == ["worst case over attacks, ε = 0.1", "worst case over attacks, ε = 0.3",
                     "FGSM, ε = 0.3"]
    row = {r["A"]: r for r in table_after(
        robust_md, "### Each defense vs the control: worst case over attacks, ε = 0.3")}["trades"]
    assert row["A %"] == ci([0.86, 0.88]) and row["seeds · images"] == "2 · 40"


def test_teacher_note_says_how_the_teacher_was_made(robust_md) -> None:
    assert ("`adversarial_training>distillation`: **distillation from a T = 1 teacher**"
            in robust_md)
    assert "`gradient_masking>distillation`: the first stage's model was trained further" \
        in robust_md


def test_robustness_plot_shows_the_worst_case_where_attacks_ran(store) -> None:
    mlflow.set_tracking_uri(store)
    data = reading.gather(reading.find_study("robust"))
    summary = report.summarise(data.results)
    assert tables.attacked_eps(data.results) == [0.1, 0.3]
    x, mean, _ = figures._curve(summary, 2, "trades", Kind.WORST_CASE, [0.1, 0.3])
    assert list(x) == [0.1, 0.3] and mean == pytest.approx([96.0, 87.0])
    x, mean, _ = figures._curve(summary, 2, "trades", Kind.FGSM, data.eps)
    assert list(x) == [0.0, 0.1, 0.3] and mean[0] == pytest.approx(98.0)  # clean at ε = 0
    assert figures._curve(summary, 2, "pgd_adversarial_training", Kind.WORST_CASE,
                                 [0.1, 0.3]) is None  # evaluated before the worst case


def test_every_sequence_of_a_study_gets_its_own_colour() -> None:
    """The Fashion-MNIST study has 12 sequences; Matplotlib's default cycle has 10 colours,
    and gave PGD-AT the control's and TRADES FGSM-AT's."""
    for n in (1, 10, 12, 20):
        assert len(set(figures.sequence_colours(n))) == n
    assert figures.sequence_colours(3) == figures.sequence_colours(10)[:3]  # tab10 as before


def test_runs_logged_before_the_table_give_the_same_report(store, robust_md, tmp_path) -> None:
    """Metrics and ``eval/correct.npz`` only: the table is rebuilt from the metrics, the
    verdicts read by their former names; every table reads the same."""
    legacy = report.write_report("legacy", tracking_uri=store, out_dir=tmp_path, log=False,
                                 examples=False).markdown.read_text(encoding="utf-8")
    mlflow.set_tracking_uri(store)
    data = reading.gather(reading.find_study("legacy"))
    assert set(data.results["source"]) == {"metrics"}

    def body(md: str) -> str:
        return md[md.index("## Headline"):]
    assert body(legacy) == body(robust_md)


def test_cli_report(store, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--tracking-uri", store]) == 0  # the most recent study, default dir
    out = capsys.readouterr().out
    where = Path("mlruns") / "reports" / "legacy"
    assert f"{where / 'report.md'}" in out
    assert (tmp_path / where / "report.html").stat().st_size > 0

    for args, needle in ((["no-such-study"], "no study named 'no-such-study'"),
                         (["--tracking-uri", f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"],
                          "no MLflow store")):
        argv = ["report", *args] if "--tracking-uri" in args else ["report", *args,
                                                                    "--tracking-uri", store]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("art-study: error:") and "\n" not in err, err
        assert needle in err, err


def test_export_keeps_markdown_pngs_and_one_csv_row_per_run(store, tmp_path, capsys) -> None:
    """`report --export`: what results/<study>/ keeps, regenerated from the store alone."""
    client = mlflow.MlflowClient(store)
    mlflow.set_tracking_uri(store)
    parent = reading.find_study("robust").info.run_id
    logged_before = {a.path for a in client.list_artifacts(parent, "report")}
    out = tmp_path / "results" / "robust"
    out.mkdir(parents=True)
    (out / "report.html").write_text("stale")
    assert main(["report", "robust", "--tracking-uri", store, "--export", str(out)]) == 0
    assert "exported to" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["depth.png", "report.md", "robustness_depth2.png", "runs.csv"]
    runs = pd.read_csv(out / "runs.csv")
    kids = report.study_runs(parent)
    assert sorted(runs["run_id"]) == sorted(kids["run_id"]) and len(runs) == 7
    assert list(runs.columns[:5]) == ["run_id", "status", "sequence", "depth", "seed"]
    one = runs.set_index(["sequence", "seed"]).loc[("trades", 1)]
    run = mlflow.get_run(one["run_id"])
    assert one["metrics.robust/accuracy_eps_0.3"] == pytest.approx(0.88)
    assert one["metrics.attack/autoattack-standard/apgd-t/accuracy_eps_0.3"] == \
        run.data.metrics["attack/autoattack-standard/apgd-t/accuracy_eps_0.3"]
    assert {a.path for a in client.list_artifacts(parent, "report")} == logged_before


# -- the statistics on known numbers (no store) --------------------------------------------------
def results_frame(rows: list[tuple[str, int, str, float, float]]) -> pd.DataFrame:
    """A study's long results frame from (sequence, seed, kind, ε, accuracy) rows, depth 2."""
    return pd.DataFrame([{"run_id": f"{seq}{seed}", "sequence": seq, "depth": 2, "seed": seed,
                          "kind": kind, "attack": "", "component": "", "eps": eps,
                          "n_images": N, "accuracy": acc, "seconds": np.nan, "budget": {},
                          "row": -1} for seq, seed, kind, eps, acc in rows])


def test_significance_rows_report_each_seed() -> None:
    results = results_frame([(seq, seed, "fgsm", 0.3, acc)
                             for seq, accs in (("none", (0.10, 0.12)),
                                               ("adversarial_training", (0.60, 0.55)))
                             for seed, acc in zip((0, 1), accs, strict=True)])
    rng = np.random.default_rng(0)
    verdicts = {rid: rng.random(N) < (0.6 if rid[0] == "a" else 0.1)
                for rid in results["run_id"]}
    [row] = report.significance_table(
        results, lambda rid, kind, eps: verdicts[rid] if kind == "fgsm" and eps == 0.3 else None,
        [(2, "adversarial_training", "none")], 0.3).to_dict("records")
    for seed in (0, 1):
        a, b = verdicts[f"adversarial_training{seed}"], verdicts[f"none{seed}"]
        assert f"s{seed}: {int(np.sum(a & ~b))} / {int(np.sum(~a & b))}" in \
            row["A✓B✗ / A✗B✓ per seed"]
        p, how = report.mcnemar(int(np.sum(a & ~b)), int(np.sum(~a & b)))
        assert f"s{seed}: {report.fmt_p(p)} ({how})" in row["McNemar p per seed"]
    assert P_VALUE.match(row["McNemar p over seeds"]) and row["seeds · images"] == "2 · 100"
    assert row["A %"] == ci([0.60, 0.55])


def test_significance_on_the_worst_case_uses_its_verdicts() -> None:
    results = results_frame([
        (seq, seed, kind, 0.3, acc)
        for seq, rows in (("none", ((0.30, 0.0), (0.32, 0.01))),
                          ("trades", ((0.95, 0.88), (0.94, 0.86))))
        for seed, (fg, worst) in zip((0, 1), rows, strict=True)
        for kind, acc in (("fgsm", fg), ("worst_case", worst))])
    rng = np.random.default_rng(1)
    verdicts = {(rid, kind): rng.random(200) < (0.88 if rid[0] == "t" and kind == "worst_case"
                                                else 0.5)
                for rid in results["run_id"] for kind in ("fgsm", "worst_case")}

    def verdict_of(rid, kind, eps):
        return verdicts[(rid, kind)]
    [row] = report.significance_table(results, verdict_of, [(2, "trades", "none")], 0.3,
                                      Kind.WORST_CASE).to_dict("records")
    assert row["A %"].startswith("87.00 ±") and row["B %"].startswith("0.50 ±")
    a, b = verdicts[("trades0", "worst_case")], verdicts[("none0", "worst_case")]
    assert row["A✓B✗ / A✗B✓ per seed"].startswith(
        f"s0: {int(np.sum(a & ~b))} / {int(np.sum(~a & b))}")
    [fgsm] = report.significance_table(results, verdict_of, [(2, "trades", "none")],
                                       0.3).to_dict("records")
    assert fgsm["A %"].startswith("94.50 ±") and fgsm != row
    with pytest.raises(ValueError, match="fgsm or worst_case"):
        report.significance_table(results, verdict_of, [(2, "trades", "none")], 0.3,
                                  Kind.ATTACK)


def test_confidence_interval_and_formatting() -> None:
    assert report.fmt_ci(pd.Series({"mean": 97.0, "half": np.nan, "n": 1})) == "97.00 (n=1)"
    assert report.fmt_ci(pd.Series({"mean": 97.0, "half": 1.5, "n": 3})) == "97.00 ± 1.50"


def test_comparison_eps_is_closest_to_paper_control() -> None:
    results = results_frame([("none", 0, "clean", np.nan, 0.99), ("none", 0, "fgsm", 0.1, 0.70),
                             ("none", 0, "fgsm", 0.2, 0.31), ("none", 0, "fgsm", 0.3, 0.12)])
    results = pd.concat([results, results_frame([("none", 0, "fgsm", 0.3, 0.29)]).assign(
        depth=3)])
    cmp = report.choose_comparison_eps(report.summarise(results), [0.1, 0.2, 0.3])
    assert cmp.eps == 0.2 and cmp.base_depth == 2
    assert "closest to the paper's 29.15 %" in cmp.reason
    assert list(cmp.sweep["ε"]) == ["0.1", "0.2", "0.3"]


def test_the_paper_section_is_for_studies_of_its_defenses() -> None:
    assert paper.applies(pd.Series(["none", "distillation"]))
    assert not paper.applies(pd.Series(["none", "trades", "pgd_adversarial_training"]))


def test_the_paper_is_compared_on_mnist_only(tmp_path) -> None:
    """Kim (2025)'s numbers are MNIST's: a study of its defenses on Fashion-MNIST (its parent's
    logged `data.name`) is not set beside them, says so, and marks that dataset's own budget
    (ε 0.1) rather than the sweep's largest."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri := f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment(report.DEFAULT_EXPERIMENT)
        runs = [{"sequence": seq, "seed": seed,
                 "result": evaluation(seed, clean, {0.05: f1, 0.1: (f1 + f3) / 2, 0.2: f3})}
                for seq, seeds in PAPER_RUNS.items()
                for seed, (clean, f1, f3) in enumerate(seeds)]
        log_study("fashion", runs, [0.05, 0.1, 0.2],
                  params={"data.name": "fashion_mnist", "data.path": "null"})
        md = report.write_report("fashion", tracking_uri=uri, out_dir=tmp_path / "out",
                                 log=False, examples=False).markdown.read_text(encoding="utf-8")
    finally:
        mlflow.set_tracking_uri(previous)
    assert "Dataset `fashion_mnist`" in md
    assert "## Comparison with Kim" not in md and "29.15" not in md
    assert "Kim (2025) studied MNIST only" in md
    assert "FGSM ε=0.1 % ★" in md and "FGSM ε=0.2 % ★" not in md


def test_comparison_eps_without_a_usable_control_figure_falls_back_to_the_largest_eps() -> None:
    """The paper's section when the control's FGSM figure is missing at the sweep's ε (logged
    at another ε only, or NaN) is the one of a study without a control: the largest ε, no
    control sweep; a deeper control with a figure is used when the shallowest has none."""
    from art_study.report.document import Doc

    results = results_frame([("none", 0, "clean", np.nan, 0.99), ("none", 0, "fgsm", 0.05, 0.5),
                             ("distillation", 0, "fgsm", 0.1, 0.4),
                             ("distillation", 0, "fgsm", 0.3, 0.2)])
    summary = report.summarise(results)
    blank = summary.assign(mean=np.where(summary["kind"] == "fgsm", np.nan, summary["mean"]))
    for frame, eps in ((summary, [0.1, 0.3]), (blank, [0.05, 0.1, 0.3])):
        cmp = report.choose_comparison_eps(frame, eps)
        assert (cmp.eps, cmp.base_depth) == (0.3, None) and cmp.sweep.empty
        assert "the largest ε of the sweep, 0.3, is used" in cmp.reason
        doc = Doc("t")
        paper.section(doc, frame, results[["depth", "sequence"]].drop_duplicates(), cmp)
        assert "| ε | control FGSM accuracy %" not in doc.markdown()

    deeper = pd.concat([results, results_frame([("none", 0, "fgsm", 0.3, 0.28)]).assign(
        depth=3)])
    cmp = report.choose_comparison_eps(report.summarise(deeper), [0.1, 0.3])
    assert (cmp.eps, cmp.base_depth) == (0.3, 3) and list(cmp.sweep["ε"]) == ["0.3"]


def test_attack_cost_table_lists_a_cascades_components_under_it() -> None:
    """The cost table gives a cascade's per-model wall time and, under it, each component's,
    summed over its ε; an attack without components gets no sub-rows."""
    import math

    import pandas as pd

    from art_study.report.tables import attack_cost_table
    from art_study.results import Kind

    def row(run, attack, component, eps, seconds):
        return {"run_id": run, "kind": Kind.ATTACK, "attack": attack, "component": component,
                "eps": eps, "n_images": 100, "accuracy": 0.9, "seconds": seconds,
                "budget": {"max_iter": 100.0} if not component else {}}

    rows = []
    for run, scale in (("r1", 1.0), ("r2", 3.0)):
        rows += [row(run, "aa", "", 0.3, 10.0 * scale),
                 row(run, "aa", "apgd-ce", 0.3, 1.0 * scale),
                 row(run, "aa", "square", 0.3, 6.0 * scale),
                 row(run, "pgd", "", 0.1, 2.0), row(run, "pgd", "", 0.3, 2.0)]
    rows.append(row("r3", "aa", "", 0.3, 20.0))  # a run logged before component times
    rows.append(row("r3", "aa", "square", 0.3, math.nan))
    table = attack_cost_table(pd.DataFrame(rows))
    names = list(table["attack"])
    assert names == ["attack aa", "  › apgd-ce", "  › square", "attack pgd"]
    by = dict(zip(table["attack"], table["wall s per model: median (min–max)"], strict=True))
    assert by["attack aa"] == "20.0 (10.0–30.0)"
    assert by["  › square"] == "12.0 (6.0–18.0)"
    assert table.set_index("attack").loc["  › square", "models"] == 2
