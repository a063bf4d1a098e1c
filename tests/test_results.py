"""The evaluation's results table: one row per (attack, component, ε) with its verdicts, the
MLflow metrics made from it under their established names, the inverse for runs logged before
it, and the artifacts a run keeps (read back as the report reads them)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from art_study.config import AttackConfig, DiagnosticsConfig, EvaluationConfig
from art_study.evaluation import craft_transfer, evaluate
from art_study.report.reading import Verdicts, run_table
from art_study.results import Kind, outcomes_from_metrics
from art_study.tracking import log_evaluation

EPS = [0.1, 0.3]


@pytest.fixture(scope="module")
def result(trained_model, small_mnist):
    """PGD at 0.3 on 40 images, transfer FGSM (crafted on the model itself), the diagnostics'
    PGD on 30 images: every kind of row."""
    cfg = EvaluationConfig(
        eps=EPS, n_attack=100, batch_size=100, xcheck_images=60, transfer=["fgsm"],
        attacks=[AttackConfig(name="pgd", eps=[0.3], n_images=40, args={"max_iter": 5})],
        diagnostics=DiagnosticsConfig(n_images=30, pgd_steps=3))
    crafted = craft_transfer(trained_model, small_mnist.x_test, small_mnist.y_test, cfg)
    return evaluate(trained_model, small_mnist.x_test, small_mnist.y_test, cfg, progress=False,
                    transfer_set=crafted)


def test_one_row_per_attack_component_and_eps_with_its_verdict(result) -> None:
    table = result.frame()
    assert set(table["kind"]) == {str(k) for k in Kind}
    assert not table.duplicated(["kind", "attack", "component", "eps"]).any()
    assert list(table.columns) == ["kind", "attack", "component", "eps", "n_images", "accuracy",
                                   "seconds", "budget"]
    clean = result.clean()
    for o in result.outcomes:
        assert o.verdict is not None and o.verdict.dtype == bool
        assert len(o.verdict) == o.n_images and o.accuracy == pytest.approx(o.verdict.mean())
        if o.component == "" and o.kind != Kind.CLEAN:  # robust only if right when clean
            assert not (o.verdict & ~clean[: o.n_images]).any(), o
    pgd = result.find(Kind.ATTACK, "pgd", 0.3)
    assert (pgd.n_images, pgd.budget["max_iter"]) == (40, 5.0) and pgd.seconds > 0
    assert result.find(Kind.FGSM_ART, eps=0.1).n_images == 60
    worst = result.find(Kind.WORST_CASE, eps=0.3)  # the first 40 images, those PGD ran on
    expected = np.logical_and.reduce([o.verdict[:40] for o in result.outcomes if o.eps == 0.3
                                      and o.kind in (Kind.FGSM, Kind.ATTACK, Kind.TRANSFER)])
    np.testing.assert_array_equal(worst.verdict, expected)
    assert result.find(Kind.WORST_CASE, eps=0.1).n_images == 100  # FGSM and transfer only


def test_metrics_are_made_from_the_table_under_their_established_names(result) -> None:
    m = result.metrics
    table_names = {
        "clean/accuracy", "eval/n_images", "xcheck/n_images", "fgsm_custom/images_per_s",
        "fgsm_art/images_per_s", "attack/pgd/accuracy_eps_0.3", "attack/pgd/time_s",
        "attack/pgd/n_images", "attack/pgd/max_iter", "attack/pgd/eps_step_over_eps",
        "attack/pgd/num_random_init", "transfer/fgsm/time_s", "transfer/fgsm/n_images",
        "transfer/fgsm/craft_time_s", "diag/pgd_destroy/accuracy_eps_0.5",
        *(f"{p}/accuracy_eps_{e}" for p in ("fgsm_custom", "fgsm_art", "transfer/fgsm",
                                            "robust") for e in ("0.1", "0.3")),
        *(f"robust/n_images_eps_{e}" for e in ("0.1", "0.3")),
        *(f"diag/{d}/{k}" for d in ("pgd3", "pgd15", "pgd_destroy")
          for k in ("time_s", "n_images", "max_iter", "eps_step_over_eps", "num_random_init")),
        "diag/pgd3/accuracy_eps_0.3", "diag/pgd15/accuracy_eps_0.3"}
    others = {*(f"xcheck/{k}_eps_{e}" for k in ("max_abs_diff", "pixel_diff_share",
                                                "prediction_agreement") for e in ("0.1", "0.3")),
              "xcheck/max_abs_diff", "xcheck/repeat_max_abs_diff", "diag/grad_zero_share",
              "diag/grad_l1_median", *result.diagnosis.metrics()}
    assert set(m) == table_names | others
    assert m["clean/accuracy"] == result.find(Kind.CLEAN).accuracy
    assert m["robust/accuracy_eps_0.3"] == result.find(Kind.WORST_CASE, eps=0.3).accuracy
    assert m["eval/n_images"] == 100 and m["robust/n_images_eps_0.3"] == 40
    fgsm = result.find(Kind.FGSM, eps=0.1)
    assert m["fgsm_custom/images_per_s"] == pytest.approx(100 * 2 / fgsm.seconds)
    assert m["xcheck/max_abs_diff"] == max(c.max_abs_diff for c in result.cross_checks.values())


def test_the_metrics_read_back_give_the_table(result) -> None:
    """A run logged before the table: its metrics and configured ε give the same rows (without
    verdicts); an ε the config does not name is left out rather than guessed."""
    def rows(table: pd.DataFrame) -> list[tuple]:
        key = table.assign(budget=table["budget"].map(lambda b: sorted(b.items())))
        return sorted(tuple(r) for r in key[["kind", "attack", "component", "eps", "n_images",
                                              "accuracy", "budget"]].astype(str).itertuples(
                                                  index=False))

    table = result.frame()
    fgsm_seconds = table["kind"].isin(["fgsm", "fgsm_art"])
    back = outcomes_from_metrics(result.metrics, [*EPS, 0.5])
    assert rows(back) == rows(table)
    assert (back["row"] == -1).all()
    named = back["kind"].isin(["attack", "transfer", "diag"])
    assert sorted(back.loc[named, "seconds"]) == sorted(table.loc[named & ~fgsm_seconds,
                                                                  "seconds"])
    without_destroy = outcomes_from_metrics(result.metrics, EPS)
    assert set(without_destroy["eps"].dropna()) == set(EPS)


def test_verdicts_are_kept_once_under_their_former_names_too(result) -> None:
    correct = result.correct
    assert set(correct) == {"clean", "fgsm_eps_0.1", "fgsm_eps_0.3", "attack/pgd_eps_0.3",
                            "transfer/fgsm_eps_0.1", "transfer/fgsm_eps_0.3", "robust_eps_0.1",
                            "robust_eps_0.3", "diag/pgd3_eps_0.3", "diag/pgd15_eps_0.3",
                            "diag/pgd_destroy_eps_0.5"}
    assert correct["attack/pgd_eps_0.3"] is result.find(Kind.ATTACK, "pgd", 0.3).verdict
    assert result.verdicts["fgsm"][0.3] is result.find(Kind.FGSM, eps=0.3).verdict


def test_a_run_logs_the_table_and_verdicts_the_report_reads(result, tracking_uri) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("results")  # not the active id of another test's store
    with mlflow.start_run() as run:
        log_evaluation(result)
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert logged == {"eval/results.parquet", "eval/verdicts.npz"}
    table = run_table(pd.Series({"run_id": run.info.run_id}))
    assert (table["source"] == "table").all()
    expected = result.frame()
    pd.testing.assert_frame_equal(table[expected.columns], expected)
    verdicts = Verdicts(table.assign(run_id=run.info.run_id))
    for kind, eps in ((Kind.FGSM, 0.3), (Kind.WORST_CASE, 0.3), (Kind.FGSM_ART, 0.1)):
        np.testing.assert_array_equal(verdicts(run.info.run_id, kind, eps),
                                      result.find(kind, eps=eps).verdict)
    assert verdicts(run.info.run_id, Kind.FGSM, 0.2) is None
