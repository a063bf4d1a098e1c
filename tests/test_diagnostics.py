"""The verdict logic of the gradient-masking checks, on measured-looking per-image evidence."""

from __future__ import annotations

import numpy as np

from art_study.config import DiagnosticsConfig
from art_study.diagnostics import Evidence, diagnose

CFG = DiagnosticsConfig()
N = 200  # images per verdict unless a case says otherwise


def v(acc: float, n: int = N) -> np.ndarray:
    """A per-image verdict with accuracy ``acc``: the first ``round(acc·n)`` images robust."""
    out = np.zeros(n, bool)
    out[: round(acc * n)] = True
    return out


def vs(accs: dict[float, float], n: int = N) -> dict[float, np.ndarray]:
    return {e: v(a, n) for e, a in accs.items()}


def evidence(**over) -> Evidence:
    """An undefended model's profile: PGD beats FGSM, accuracy falls to 0, gradients fine."""
    base = dict(
        fgsm=vs({0.1: 0.80, 0.3: 0.25}), fgsm_sweep={0.1: 0.79, 0.2: 0.50, 0.3: 0.26},
        attacks={"pgd": vs({0.1: 0.40, 0.3: 0.0}), "square": vs({0.3: 0.05}),
                 "diag-pgd20": vs({0.3: 0.0}), "diag-pgd100": vs({0.3: 0.0}),
                 "diag-pgd_destroy": vs({0.5: 0.0})},
        pgd_steps=("diag-pgd20", "diag-pgd100"), pgd_destroy="diag-pgd_destroy",
        grad_zero_share=0.1, repeat_max_abs_diff=0.0, n_classes=10,
        iterative=frozenset({"pgd", "diag-pgd20", "diag-pgd100", "diag-pgd_destroy"}),
        blackbox=frozenset({"square"}))
    base.update(over)
    return Evidence(**base)


def attacks(**over) -> dict:
    return {**evidence().attacks, **over}


def verdicts(ev: Evidence) -> dict[str, bool | None]:
    return {c.name: c.passed for c in diagnose(ev, CFG).checks}


def test_an_undefended_profile_passes_every_check() -> None:
    d = diagnose(evidence(), CFG)
    assert not d.suspected and all(c.passed for c in d.checks)
    assert d.tags()["gradient_masking_suspected"] == "false"


def test_each_symptom_fails_its_own_check() -> None:
    cases = {
        "iterative_not_weaker": dict(attacks=attacks(pgd=vs({0.1: 0.9, 0.3: 0.6}))),
        "blackbox_not_stronger": dict(attacks=attacks(  # Square beats every white-box attack
            pgd=vs({0.1: 0.4, 0.3: 0.2}), **{"diag-pgd20": vs({0.3: 0.2}),
                                              "diag-pgd100": vs({0.3: 0.2})})),
        "falls_to_chance": dict(fgsm_sweep={0.1: 0.9, 0.2: 0.95, 0.3: 0.99}),
        "more_iterations_not_weaker": dict(attacks=attacks(**{"diag-pgd20": vs({0.3: 0.5}),
                                                              "diag-pgd100": vs({0.3: 0.6})})),
        "gradients_not_vanishing": dict(grad_zero_share=0.98),
        "gradients_deterministic": dict(repeat_max_abs_diff=0.3),
    }
    for check, over in cases.items():
        v_ = verdicts(evidence(**over))
        assert v_[check] is False, (check, v_)
        d = diagnose(evidence(**over), CFG)
        assert d.suspected and check in d.tags()["gradient_masking_reasons"]


def test_a_transfer_pgd_weaker_than_white_box_fgsm_is_no_symptom() -> None:
    """Measured on the paper study's AT → DD model (2 conv, seed 0): PGD crafted on the control
    left 91.5 % at ε 0.1 where white-box FGSM left 77.5 %; transfer attacks are black-box and
    are expected to be weaker, so only white-box iterative attacks are held to FGSM."""
    ev = evidence(attacks=attacks(**{"transfer-pgd": vs({0.1: 0.915, 0.3: 0.12})}),
                  fgsm=vs({0.1: 0.775, 0.3: 0.25}),
                  blackbox=frozenset({"square", "transfer-pgd"}),
                  counterparts={"transfer-pgd": "pgd"})
    assert verdicts(ev)["iterative_not_weaker"] is True
    assert verdicts(evidence(attacks=attacks(pgd=vs({0.1: 0.915, 0.3: 0.0})),
                             fgsm=vs({0.1: 0.775, 0.3: 0.25})))["iterative_not_weaker"] is False


def test_transfer_fgsm_beating_white_box_fgsm_is_flagged_even_when_pgd_is_stronger() -> None:
    """The FGSM-adversarial-training signature: FGSM crafted on the control beats white-box FGSM.
    White-box PGD at the same ε is stronger still, which hid it when the check compared only
    with the best white-box attack (more attacks, fewer flags)."""
    ev = evidence(fgsm=vs({0.1: 0.95, 0.3: 0.90}),
                  attacks=attacks(pgd=vs({0.1: 0.4, 0.3: 0.0}),
                                  **{"transfer-fgsm": vs({0.1: 0.6, 0.3: 0.5})}),
                  blackbox=frozenset({"square", "transfer-fgsm"}),
                  counterparts={"transfer-fgsm": "fgsm"})
    d = diagnose(ev, CFG)
    assert verdicts(ev)["blackbox_not_stronger"] is False
    tag = d.tags()["diag.blackbox_not_stronger"]
    assert "transfer-fgsm 50.0% < its white-box fgsm 90.0%" in tag
    # the same transfer attack, weaker than white-box FGSM: no symptom
    ok = evidence(fgsm=vs({0.1: 0.5, 0.3: 0.2}),
                  attacks=attacks(**{"transfer-fgsm": vs({0.1: 0.6, 0.3: 0.5})}),
                  blackbox=frozenset({"square", "transfer-fgsm"}),
                  counterparts={"transfer-fgsm": "fgsm"})
    assert verdicts(ok)["blackbox_not_stronger"] is True


def test_transfer_pgd_is_compared_with_white_box_pgd() -> None:
    ev = evidence(attacks=attacks(pgd=vs({0.1: 0.7, 0.3: 0.6}),
                                  **{"transfer-pgd": vs({0.1: 0.5, 0.3: 0.4}),
                                     "diag-pgd20": vs({0.3: 0.1}), "diag-pgd100": vs({0.3: 0.1})}),
                  fgsm=vs({0.1: 0.8, 0.3: 0.7}),
                  blackbox=frozenset({"square", "transfer-pgd"}),
                  counterparts={"transfer-pgd": "pgd"})
    tag = diagnose(ev, CFG).tags()["diag.blackbox_not_stronger"]
    assert tag.startswith("FAIL") and "its white-box pgd 60.0%" in tag


def test_comparisons_use_the_common_prefix_of_images() -> None:
    """FGSM on 500 images against PGD on 100: the first 100 are hard (FGSM breaks them all),
    the other 400 easy. Over all 500 FGSM leaves 80 %, over the 100 PGD ran on it leaves 0 %:
    PGD's 30 % on those 100 is weaker than FGSM on the *same* images."""
    fgsm = np.r_[np.zeros(100, bool), np.ones(400, bool)]
    ev = evidence(fgsm={0.1: v(0.8, 500), 0.3: fgsm},
                  attacks=attacks(pgd={0.1: v(0.4, 100), 0.3: v(0.3, 100)}))
    assert verdicts(ev)["iterative_not_weaker"] is False
    assert "(100 images)" in diagnose(ev, CFG).tags()["diag.iterative_not_weaker"]


def test_eps_that_do_not_round_trip_through_g_format_are_checked() -> None:
    """8/255 printed with ``:g`` is 0.0313725; read back it is another float, so a check keyed
    by the printed value finds no FGSM at that ε and silently passes."""
    eps = 8 / 255
    assert float(f"{eps:g}") != eps
    ev = evidence(fgsm={eps: v(0.3)}, fgsm_sweep={eps: 0.3},
                  attacks=attacks(pgd={eps: v(0.9)}, square={eps: v(0.95)}))
    assert verdicts(ev)["iterative_not_weaker"] is False


def test_minimal_perturbation_attacks_are_not_held_to_fgsm() -> None:
    """DeepFool (L2-driven) and C&W L∞ at ART's defaults lose to FGSM at large ε by nature."""
    ev = evidence(attacks=attacks(deepfool=vs({0.1: 0.9, 0.3: 0.8}),
                                  **{"cw-linf": vs({0.1: 0.95, 0.3: 0.9})}))
    assert verdicts(ev)["iterative_not_weaker"] is True


def test_a_slow_climb_with_eps_is_a_rise() -> None:
    """Measured on the paper's FGSM-trained model: no step rises by 2 points, the sweep does."""
    sweep = {0.05: 0.9702, 0.1: 0.9707, 0.15: 0.9811, 0.2: 0.9886, 0.25: 0.9928, 0.3: 0.9926}
    assert verdicts(evidence(fgsm_sweep=sweep))["falls_to_chance"] is False


def test_destroyed_digits_must_reach_chance() -> None:
    ev = evidence(attacks=attacks(**{"diag-pgd_destroy": vs({0.5: 0.6})}))
    assert verdicts(ev)["falls_to_chance"] is False


def test_chance_is_one_over_the_number_of_classes() -> None:
    """22% left at destroy_eps: above chance + margin for ten classes (20%), within it for
    seven (1/7 + 10% ≈ 24.3%); 30% is above the seven-class bound, which the detail names."""

    def falls(acc: float, n_classes: int) -> tuple[bool | None, str]:
        destroyed = attacks(**{"diag-pgd_destroy": vs({0.5: acc})})
        d = diagnose(evidence(attacks=destroyed, n_classes=n_classes), CFG)
        check = next(c for c in d.checks if c.name == "falls_to_chance")
        return check.passed, check.detail

    assert falls(0.22, 10) == (False, "PGD at ε 0.5 leaves 22.0% (> 20%)")
    assert falls(0.22, 7)[0] is True
    assert falls(0.30, 7) == (False, "PGD at ε 0.5 leaves 30.0% (> 24%)")


def test_missing_evidence_is_not_evaluated_rather_than_passed() -> None:
    without = {k: a for k, a in evidence().attacks.items() if k != "square"}
    d = diagnose(evidence(attacks=without), CFG)
    assert verdicts(evidence(attacks=without))["blackbox_not_stronger"] is None
    assert "not evaluated" in d.tags()["diag.blackbox_not_stronger"]
    assert "diag/blackbox_not_stronger" not in d.metrics()


def test_a_noisy_gradient_model_is_caught_with_eps_zero_in_the_sweep(trained_model,
                                                                      small_mnist) -> None:
    """Real model: input noise at inference randomises the gradients. FGSM repeated at the
    sweep's first ε (0, the identity) saw no difference; repeated at the largest ε it does.
    The sweep's 8/255 is evaluated under its exact value."""
    import keras
    import tensorflow as tf

    from art_study.config import EvaluationConfig, TrainConfig
    from art_study.evaluation import eps_key, evaluate
    from art_study.models import INPUT_SHAPE, compile_model

    noisy = keras.Sequential([
        keras.Input(INPUT_SHAPE),
        keras.layers.Lambda(lambda x: x + tf.random.normal(tf.shape(x), stddev=0.1)),
        trained_model])
    compile_model(noisy, TrainConfig())
    cfg = EvaluationConfig(eps=[0.0, 8 / 255, 0.3], n_attack=40, batch_size=40,
                           diagnostics={"n_images": 20, "pgd_steps": 2})
    result = evaluate(noisy, small_mnist.x_test, small_mnist.y_test, cfg, progress=False)
    assert result.metrics["xcheck/repeat_max_abs_diff"] > 0
    assert result.tags["diag.gradients_deterministic"].startswith("FAIL")
    assert 8 / 255 in result.verdicts["fgsm"]
    assert f"robust/accuracy_{eps_key(8 / 255)}" in result.metrics
