"""The run page's content: the curve's points, the headline, the one-line description, and
what :func:`log_run_page` puts into a run (figure, table, dataset input, description)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from art_study.run_page import (
    CURVE_ARTIFACT,
    DIGEST_CHARS,
    NOTE_TAG,
    TABLE_ARTIFACT,
    WORST_CASE,
    DataRef,
    curve_points,
    log_run_page,
    summary_line,
)

#: Metrics as evaluation.evaluate names them: the FGSM sweep, one attack at the top ε, a
#: cascade component and the diagnostics (both left off the curve), the worst case.
METRICS = {
    "clean/accuracy": 0.98, "eval/n_images": 100.0, "xcheck/n_images": 50.0,
    "fgsm_custom/accuracy_eps_0.1": 0.7, "fgsm_art/accuracy_eps_0.1": 0.72,
    "fgsm_custom/accuracy_eps_0.3": 0.2, "fgsm_art/accuracy_eps_0.3": 0.22,
    "attack/pgd/accuracy_eps_0.3": 0.05, "attack/pgd/n_images": 40.0,
    "attack/autoattack/apgd-ce/accuracy_eps_0.3": 0.04,
    "diag/pgd20/accuracy_eps_0.3": 0.05,
    "robust/accuracy_eps_0.1": 0.7, "robust/n_images_eps_0.1": 100.0,
    "robust/accuracy_eps_0.3": 0.04, "robust/n_images_eps_0.3": 40.0,
}
TAGS = {"gradient_masking_suspected": "false"}


def test_curve_points_and_summary() -> None:
    points = curve_points(METRICS)
    assert list(dict.fromkeys(points["attack"])) == ["FGSM (ours)", "FGSM (ART)", "pgd",
                                                       WORST_CASE]
    worst = points[points["attack"] == WORST_CASE]  # not at 0.1: only FGSM ran there
    assert list(worst["eps"]) == [0.3] and list(worst["n_images"]) == [40.0]
    assert points.loc[points["key"] == "fgsm_art", "n_images"].tolist() == [50.0, 50.0]
    assert summary_line(METRICS, TAGS) == ("clean accuracy 0.9800; worst case 0.0400 at ε=0.3; "
                                           "gradient masking not suspected")
    assert summary_line(METRICS, {}).endswith("gradient masking not checked")


def test_the_headline_is_where_the_attacks_ran_not_the_sweep_s_end() -> None:
    """A Fashion-MNIST evaluation: FGSM swept to 0.2, the attacks at 0.05 and 0.1. The worst
    case logged at 0.15 and 0.2 is FGSM's; the headline, the curve, the registry's tags and the
    evaluate command's table all take the worst case at 0.1."""
    from art_study.evaluate_model import accuracy_table
    from art_study.model_registry import HEADLINE_TAG, robustness_tags

    metrics = {"clean/accuracy": 0.89, "eval/n_images": 1000.0}
    for eps, fgsm, pgd, worst in ((0.05, 0.52, 0.13, 0.12), (0.1, 0.31, 0.004, 0.004),
                                  (0.15, 0.2, None, 0.2), (0.2, 0.14, None, 0.14)):
        metrics[f"fgsm_custom/accuracy_eps_{eps:g}"] = fgsm
        metrics[f"robust/accuracy_eps_{eps:g}"] = worst
        if pgd is not None:
            metrics[f"attack/pgd/accuracy_eps_{eps:g}"] = pgd
    points = curve_points(metrics)
    assert points.loc[points["attack"] == WORST_CASE, "eps"].tolist() == [0.05, 0.1]
    assert summary_line(metrics, TAGS).startswith("clean accuracy 0.8900; worst case 0.0040 "
                                                  "at ε=0.1;")
    tags = robustness_tags(metrics, TAGS)
    assert tags[HEADLINE_TAG] == "0.0040"
    table = accuracy_table(metrics)
    assert table.loc["robust"].notna().tolist() == [True, True, False, False]
    assert table.loc["fgsm_custom"].notna().all()
    fgsm_only = {k: v for k, v in metrics.items() if not k.startswith("attack/")}
    assert "worst case" not in summary_line(fgsm_only, TAGS)
    assert "robust" not in accuracy_table(fgsm_only).index


def test_log_run_page_fills_the_run(run, tmp_path) -> None:
    fingerprint = "ab" * 32
    log_run_page(METRICS, TAGS, DataRef("mnist", str(tmp_path), fingerprint))
    client = mlflow.MlflowClient()
    run_id = run.info.run_id
    listed = {a.path for a in client.list_artifacts(run_id, "robustness")}
    assert listed == {CURVE_ARTIFACT, TABLE_ARTIFACT}
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{TABLE_ARTIFACT}"))
    assert table["columns"] == ["attack", "key", "eps", "accuracy", "n_images"]
    assert len(table["data"]) == len(curve_points(METRICS))
    png = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{CURVE_ARTIFACT}",
                                              dst_path=str(tmp_path / "png"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = client.get_run(run_id)
    (dataset,) = shown.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("mnist", fingerprint[:DIGEST_CHARS])
    assert {t.key: t.value for t in dataset.tags}["fingerprint"] == fingerprint
    assert shown.data.tags[NOTE_TAG] == summary_line(METRICS, TAGS)
