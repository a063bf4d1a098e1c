"""The significance table where McNemar's test has nothing to pair: runs logged without
per-image verdicts, verdicts of another length, or runs on other test images. The paired
t-test still reports; McNemar says why it cannot, instead of testing on nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from art_study import report

N = 100


def _results() -> pd.DataFrame:
    return pd.DataFrame([
        {"run_id": f"{seq}{seed}", "sequence": seq, "depth": 2, "seed": seed, "kind": "fgsm",
         "attack": "", "component": "", "eps": 0.3, "n_images": N, "accuracy": acc,
         "seconds": np.nan, "budget": {}, "row": -1}
        for seq, accs in (("none", (0.10, 0.12, 0.11)),
                          ("adversarial_training", (0.60, 0.55, 0.58)))
        for seed, acc in zip((0, 1, 2), accs, strict=True)])


@pytest.mark.parametrize("case", ["no verdicts logged", "verdicts of another length",
                                  "other test images"])
def test_mcnemar_without_per_example_data_says_so(case: str) -> None:
    results = _results()
    rng = np.random.default_rng(0)
    verdicts = {rid: rng.random(N if rid[0] == "a" or case != "verdicts of another length"
                                else N // 2) < 0.5 for rid in results["run_id"]}
    fingerprints = ({rid: rid[0] for rid in results["run_id"]} if case == "other test images"
                    else {rid: "same" for rid in results["run_id"]})

    def verdict_of(rid, kind, eps):
        return None if case == "no verdicts logged" else verdicts[rid]

    [row] = report.significance_table(results, verdict_of, [(2, "adversarial_training", "none")],
                                      0.3, fingerprints=fingerprints).to_dict("records")
    assert row["McNemar p over seeds"] == "n/a (no per-example data)"
    assert row["A✓B✗ / A✗B✓ per seed"] == "—" and row["seeds · images"] == "—"
    assert row["paired t p"] not in ("—", "") and row["Δ (A−B) pp"] == "+46.67"
