"""Attacks from configs: aliases and ART class names resolve, run and are scored; bad names
and arguments fail before any training with the list of what exists."""

from __future__ import annotations

import numpy as np
import pytest

from art_study.attacks.registry import ALIASES, Estimators, resolve, validate_attacks
from art_study.config import AttackConfig, EvaluationConfig
from art_study.errors import ConfigError
from art_study.evaluation import evaluate


@pytest.fixture(scope="module")
def evaluated(trained_model, small_mnist):
    cfg = EvaluationConfig(
        eps=[0.1, 0.3], n_attack=100, batch_size=100,
        attacks=[
            {"name": "pgd", "n_images": 60, "args": {"max_iter": 10}},
            {"name": "ProjectedGradientDescent", "n_images": 60,
             "args": {"max_iter": 10, "num_random_init": 1}, "label": "pgd-by-class"},
            {"name": "square", "n_images": 60, "eps": [0.3], "args": {"max_iter": 50}},
            {"name": "deepfool", "n_images": 60, "args": {"max_iter": 20}},
            {"name": "apgd-dlr", "n_images": 60, "eps": [0.3], "args": {"max_iter": 10}},
        ],
        diagnostics={"n_images": 60, "pgd_steps": 5},
    )
    validate_attacks(cfg)
    return evaluate(trained_model, small_mnist.x_test, small_mnist.y_test, cfg, progress=False)


def test_alias_and_class_name_attacks_run_and_agree(evaluated) -> None:
    m = evaluated.metrics
    for key in ("pgd", "pgd-by-class", "deepfool"):
        for eps in ("0.1", "0.3"):
            assert 0.0 <= m[f"attack/{key}/accuracy_eps_{eps}"] <= 1.0
    # The alias is PGD with a random start: by name, with the same arguments, the same attack.
    for eps in ("0.1", "0.3"):
        assert m[f"attack/pgd/accuracy_eps_{eps}"] == pytest.approx(
            m[f"attack/pgd-by-class/accuracy_eps_{eps}"], abs=0.1)
    # Iterative attacks are at least as strong as FGSM on the same images (real behaviour of
    # an undefended model), and a bigger ε never helps the model.
    fgsm_03 = float(np.mean(evaluated.correct["fgsm_eps_0.3"][:60]))
    assert m["attack/pgd/accuracy_eps_0.3"] <= fgsm_03
    assert m["attack/apgd-dlr/accuracy_eps_0.3"] <= fgsm_03
    assert m["attack/deepfool/accuracy_eps_0.3"] <= m["attack/deepfool/accuracy_eps_0.1"]
    assert m["attack/square/accuracy_eps_0.3"] < m["clean/accuracy"]


def test_budget_and_time_are_logged_with_every_attack(evaluated) -> None:
    m = evaluated.metrics
    assert m["attack/pgd/n_images"] == 60 and m["attack/pgd/max_iter"] == 10
    assert m["attack/square/max_iter"] == 50 and m["attack/square/nb_restarts"] == 1
    assert all(m[f"attack/{k}/time_s"] > 0 for k in ("pgd", "square", "deepfool", "apgd-dlr"))
    assert evaluated.correct["attack/pgd_eps_0.3"].shape == (60,)


def test_every_alias_resolves_to_an_art_class_and_passes_arts_checks() -> None:
    for name in ALIASES:
        r = resolve(AttackConfig(name=name), [0.3])
        assert r.cls.__module__.startswith("art.attacks.evasion")
    resolved = validate_attacks(EvaluationConfig(attacks=[{"name": n} for n in ALIASES]))
    assert [r.key for r in resolved] == list(ALIASES)
    assert {r.key for r in resolved if not r.bounded} == {"cw-linf", "deepfool", "hopskipjump"}


def test_unknown_attack_lists_aliases_and_classes() -> None:
    with pytest.raises(ConfigError) as err:
        validate_attacks(EvaluationConfig(attacks=[{"name": "pgdd"}]))
    msg = str(err.value)
    assert "unknown attack 'pgdd'" in msg
    assert "apgd-ce" in msg and "ProjectedGradientDescent" in msg and "SquareAttack" in msg


def test_wrong_argument_lists_what_the_class_takes() -> None:
    with pytest.raises(ConfigError, match=r"does not take max_iters; it takes: .*max_iter"):
        validate_attacks(EvaluationConfig(attacks=[{"name": "pgd", "args": {"max_iters": 3}}]))
    with pytest.raises(ConfigError, match="attack 'square'"):  # ART's own check of the value
        validate_attacks(EvaluationConfig(attacks=[{"name": "square", "args": {"p_init": 7}}]))


def test_dlr_estimator_is_scale_invariant(trained_model, small_mnist) -> None:
    """The DLR loss (what breaks a saturated softmax) does not change when logits are scaled;
    its gradient is what APGD-DLR follows."""
    import keras

    from art_study.estimator import dlr_loss
    from art_study.models import one_hot

    est = Estimators(trained_model)["keras-dlr"]
    x, y1h = small_mnist.x_test[:32], one_hot(small_mnist.y_test[:32])
    logits = trained_model.predict(x, verbose=0)
    expected = keras.ops.convert_to_numpy(dlr_loss(y1h, logits))
    np.testing.assert_allclose(est.compute_loss(x, y1h), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dlr_loss(y1h, 20 * logits)), expected,
                               rtol=1e-4, atol=1e-6)
    assert np.abs(est.loss_gradient(x, y1h)).max() > 0
