"""Review findings: each test fails on the code before its fix."""

from __future__ import annotations

import numpy as np
import pandas as pd

from art_study.report.tables import attack_table
from art_study.results import Kind


def _autoattack_rows(seed: int, accuracy: float) -> list[dict]:
    return [{"run_id": f"t{seed}", "sequence": "trades", "depth": 2, "seed": seed,
             "kind": str(Kind.ATTACK), "attack": "autoattack-standard", "component": "",
             "eps": 0.3, "n_images": 100, "accuracy": accuracy, "seconds": 1.0, "budget": {},
             "row": -1}]


def test_attack_table_shows_autoattack_square_check_verdict() -> None:
    """A seed whose AutoAttack figure its own Square check calls unreliable is counted beside
    the figure, as the masking verdict is: the report must not show it as if it were sound."""
    results = pd.DataFrame(_autoattack_rows(0, 0.91) + _autoattack_rows(1, 0.90))
    finished = pd.DataFrame({"run_id": ["t0", "t1"], "sequence": "trades", "depth": 2,
                             "seed": [0, 1],
                             "tags.gradient_masking_suspected": ["false", "false"],
                             "tags.evaluation_unreliable": ["true", "false"]})
    table = attack_table(results, finished, 2, ["trades"])
    [row] = table.to_dict("records")
    assert row["masking suspected"] == "0/2"
    assert row["AutoAttack unreliable"] == "1/2"


def test_attack_table_without_the_square_check_has_no_unreliable_column() -> None:
    results = pd.DataFrame(_autoattack_rows(0, 0.91))
    finished = pd.DataFrame({"run_id": ["t0"], "sequence": "trades", "depth": 2, "seed": [0],
                             "tags.gradient_masking_suspected": ["false"]})
    [row] = attack_table(results, finished, 2, ["trades"]).to_dict("records")
    assert "AutoAttack unreliable" not in row and np.isclose(float(row[
        "autoattack-standard ε 0.3"].split()[0]), 91.0)


def _five_class_model():
    import keras

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


def test_targeted_attacks_refuse_more_targets_than_wrong_classes_when_built() -> None:
    """On a 5-class model there are 4 wrong classes: 9 targets must be refused when the attack
    is built (plan time), not when it first runs (after training)."""
    import pytest

    from art_study.attacks.apgd import APGDT
    from art_study.attacks.autoattack import AutoAttackStandard

    model = _five_class_model()
    for cls in (APGDT, AutoAttackStandard):
        with pytest.raises(ValueError, match=r"n_target_classes must be an integer in 1\.\.4"):
            cls(model, n_target_classes=9)
    assert APGDT(model, n_target_classes=4).n_target_classes == 4


def test_autoattack_chain_averages_the_same_seeds_in_every_cell() -> None:
    """The escalation runs only where the Square check fires: a seed without it keeps its
    figure after Square, so the chain's last cell is the headline's mean, not the mean of the
    escalated seeds alone."""
    steps = ("apgd-ce", "apgd-t", "fab-t", "square", "plus-apgd-ce", "plus-apgd-dlr",
             "plus-square")
    figures = {0: (0.90, 0.88, 0.87, 0.85, 0.84, 0.84, 0.83), 1: (0.95, 0.93, 0.92, 0.92)}
    rows = []
    for seed, accs in figures.items():
        rows += _autoattack_rows(seed, accs[-1])
        rows += [{**rows[-1], "component": c, "accuracy": a}
                 for c, a in zip(steps, accs, strict=False)]
    finished = pd.DataFrame({"run_id": ["t0", "t1"], "sequence": "trades", "depth": 2,
                             "seed": [0, 1]})
    [row] = attack_table(pd.DataFrame(rows), finished, 2, ["trades"]).to_dict("records")
    chain = row[f"autoattack-standard ε 0.3 after {' → '.join(steps)}"].split(" → ")
    assert chain == ["92.50", "90.50", "89.50", "88.50", "88.00", "88.00", "87.50"]
    assert row["autoattack-standard ε 0.3"].startswith("87.50")
