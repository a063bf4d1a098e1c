"""The significance table where McNemar's test has nothing to pair: runs logged without
per-example verdicts, or on other test images. The paired t-test still reports; McNemar says
why it cannot, instead of testing on nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from art_study import report


def _scores(fingerprints: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame([
        {"run_id": f"{seq}{seed}", "sequence": seq, "depth": 2, "seed": seed, "eps_0.3": acc,
         "fingerprint": fp}
        for seq, accs, fp in (("none", (10.0, 12.0, 11.0), fingerprints[0]),
                              ("adversarial_training", (60.0, 55.0, 58.0), fingerprints[1]))
        for seed, acc in zip((0, 1, 2), accs, strict=True)])


def _verdicts(scores: pd.DataFrame) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    return {rid: {"fgsm_eps_0.3": rng.random(100) < 0.5} for rid in scores["run_id"]}


@pytest.mark.parametrize("case", ["no verdicts logged", "verdicts of other runs",
                                  "other test images"])
def test_mcnemar_without_per_example_data_says_so(case: str) -> None:
    fingerprints = ("a", "b") if case == "other test images" else ("same", "same")
    scores = _scores(fingerprints)
    summary = report.summarise(scores.assign(clean=99.0), [0.3])
    correct = {"no verdicts logged": {rid: None for rid in scores["run_id"]},
               "verdicts of other runs": _verdicts(scores.assign(run_id=scores["run_id"] + "x")),
               "other test images": _verdicts(scores)}[case]
    [row] = report.significance_table(scores, summary, correct,
                                      [(2, "adversarial_training", "none")], 0.3).to_dict("records")
    assert row["McNemar p over seeds"] == "n/a (no per-example data)"
    assert row["A✓B✗ / A✗B✓ per seed"] == "—" and row["seeds · images"] == "—"
    assert row["paired t p"] not in ("—", "") and row["Δ (A−B) pp"] == "+46.67"
