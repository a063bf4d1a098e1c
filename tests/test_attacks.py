"""Our FGSM against ART's: same model, inputs and labels → the same adversarial images."""

from __future__ import annotations

import numpy as np
import pytest

from art_study.attacks import FGSM, art_fgsm
from art_study.config import EvaluationConfig
from art_study.evaluation import eps_key, evaluate
from art_study.models import accuracy, one_hot, to_art


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_custom_fgsm_matches_art(trained_model, small_mnist, eps: float) -> None:
    x, y = small_mnist.x_test, small_mnist.y_test
    ours = FGSM(trained_model, batch_size=128).generate(x, one_hot(y), eps)
    theirs = art_fgsm(to_art(trained_model), x, one_hot(y), eps, batch_size=128)
    assert np.abs(ours - theirs).max() <= 1e-6
    # It is a real attack: L∞ budget respected, images stay valid, accuracy drops.
    assert np.abs(ours - x).max() <= eps + 1e-6
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    assert accuracy(trained_model, ours, y) < accuracy(trained_model, x, y)


def test_batch_size_does_not_change_the_result(trained_model, small_mnist) -> None:
    x, y1h = small_mnist.x_test[:100], one_hot(small_mnist.y_test[:100])
    a = FGSM(trained_model, batch_size=7).generate(x, y1h, 0.1)
    b = FGSM(trained_model, batch_size=100).generate(x, y1h, 0.1)
    np.testing.assert_array_equal(a, b)


def test_eps_zero_is_identity(trained_model, small_mnist) -> None:
    x = small_mnist.x_test[:50]
    out = FGSM(trained_model).generate(x, one_hot(small_mnist.y_test[:50]), 0.0)
    np.testing.assert_array_equal(out, x)


def test_evaluation_reports_cross_check_and_throughput(trained_model, small_mnist) -> None:
    cfg = EvaluationConfig(eps=[0.1, 0.2], n_attack=200, batch_size=100)
    m = evaluate(trained_model, small_mnist.x_test, small_mnist.y_test, cfg, progress=False).metrics
    assert m["eval/n_images"] == 200
    for k in ("eps_0.1", "eps_0.2"):
        assert m[f"xcheck/max_abs_diff_{k}"] <= 1e-6
        assert m[f"xcheck/pixel_diff_share_{k}"] == 0.0
        assert m[f"xcheck/prediction_agreement_{k}"] == 1.0
        assert m[f"fgsm_custom/accuracy_{k}"] == m[f"fgsm_art/accuracy_{k}"]
    # Stronger budget, lower accuracy (on a trained model this is strict).
    assert m["fgsm_custom/accuracy_eps_0.2"] < m["fgsm_custom/accuracy_eps_0.1"]
    assert m["fgsm_custom/accuracy_eps_0.1"] < m["clean/accuracy"]
    assert m["fgsm_custom/images_per_s"] > 0 and m["fgsm_art/images_per_s"] > 0


def test_one_gradient_sweep_gives_the_images_of_each_eps(trained_model, small_mnist) -> None:
    """FGSM.sweep (one gradient for every ε) is a speed option only: bit for bit the images of
    one generate() per ε, at any batch size."""
    x, y1h = small_mnist.x_test[:150], one_hot(small_mnist.y_test[:150])
    eps_values = [0.0, 0.05, 0.3]
    swept = FGSM(trained_model, batch_size=64).sweep(x, y1h, eps_values)
    for eps in eps_values:
        np.testing.assert_array_equal(swept[eps], FGSM(trained_model).generate(x, y1h, eps))


def test_the_sweep_takes_one_gradient_only_where_the_model_draws_no_noise(
        trained_model, small_mnist, monkeypatch) -> None:
    """Dropout draws noise in training only: the trained CNN gets the one-gradient sweep. The
    paper's gradient-noise layer draws fresh noise per gradient, so its model is attacked once
    per ε as before (one shared gradient would change its results)."""
    from art_study.attacks import draws_randomness_in_inference
    from art_study.config import TrainConfig
    from art_study.defenses.gradient_masking import GradientNoise, insert_masking
    from art_study.models import compile_model

    noisy = compile_model(insert_masking(trained_model, {}, GradientNoise(1.0, 0)), TrainConfig())
    assert not draws_randomness_in_inference(trained_model)
    assert draws_randomness_in_inference(noisy)

    cfg = EvaluationConfig(eps=[0.1, 0.3], n_attack=100, batch_size=100, xcheck_images=50)
    calls = {"sweep": 0, "generate": 0}
    for name in calls:
        original = getattr(FGSM, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(FGSM, name, counted)
    x, y = small_mnist.x_test, small_mnist.y_test
    evaluate(trained_model, x, y, cfg, progress=False)
    assert calls == {"sweep": 1, "generate": 1}  # the sweep, then the repeat check
    calls.update(sweep=0, generate=0)
    evaluate(noisy, x, y, cfg, progress=False)
    assert calls == {"sweep": 0, "generate": 3}  # one per ε, then the repeat check


def test_randomness_no_layer_declares_is_caught_by_two_gradients(
        trained_model, small_mnist, monkeypatch) -> None:
    """tf.random inside a Lambda holds no SeedGenerator: the layer check misses it, the repeat
    of one batch's gradient catches it, and the evaluation attacks once per ε."""
    import keras
    import tensorflow as tf

    from art_study.attacks import draws_randomness_in_inference
    from art_study.config import TrainConfig
    from art_study.models import INPUT_SHAPE, compile_model

    noisy = compile_model(keras.Sequential([
        keras.Input(INPUT_SHAPE),
        keras.layers.Lambda(lambda x: x + tf.random.normal(tf.shape(x), stddev=0.1)),
        trained_model]), TrainConfig())
    x, y1h = small_mnist.x_test[:50], one_hot(small_mnist.y_test[:50])
    assert not draws_randomness_in_inference(noisy)
    assert not FGSM(noisy).gradient_repeats(x, y1h)
    assert FGSM(trained_model).gradient_repeats(x, y1h)

    calls = {"sweep": 0}
    original = FGSM.sweep

    def counted(self, *args):
        calls["sweep"] += 1
        return original(self, *args)
    monkeypatch.setattr(FGSM, "sweep", counted)
    cfg = EvaluationConfig(eps=[0.1, 0.3], n_attack=100, batch_size=100, xcheck_images=50)
    evaluate(noisy, small_mnist.x_test, small_mnist.y_test, cfg, progress=False)
    assert calls["sweep"] == 0


# --- attacks from a config: scoring, the worst case, alias defaults ------------------------------

def _scoring_cfg() -> EvaluationConfig:
    return EvaluationConfig(
        eps=[0.1, 0.3], n_attack=60, batch_size=100,
        attacks=[{"name": "deepfool", "n_images": 60, "args": {"max_iter": 5, "nb_grads": 3}},
                 {"name": "pgd", "n_images": 60, "eps": [0.3], "args": {"max_iter": 5}}],
        transfer=["fgsm", "pgd"], diagnostics={"enabled": False})


@pytest.fixture(scope="module")
def scored(trained_model, small_mnist):
    from art_study.evaluation import craft_transfer

    cfg = _scoring_cfg()
    np.random.seed(0)
    crafted = craft_transfer(trained_model, small_mnist.x_test, small_mnist.y_test, cfg)
    return evaluate(trained_model, small_mnist.x_test, small_mnist.y_test, cfg, progress=False,
                    transfer_set=crafted)


def test_minimal_perturbation_is_scored_per_image_within_each_eps(scored) -> None:
    """DeepFool runs once; an image is broken at ε only if its perturbation is within ε: the
    images robust at 0.3 are a subset of those at 0.1, and here a strictly smaller one."""
    at_01 = scored.correct["attack/deepfool_eps_0.1"]
    at_03 = scored.correct["attack/deepfool_eps_0.3"]
    assert not (at_03 & ~at_01).any()
    assert (at_01 & ~at_03).any(), "no image needs more than 0.1 and at most 0.3"


def test_worst_case_covers_every_configured_attack(scored) -> None:
    """The expected set comes from the config: our FGSM, every attack configured at ε and every
    transfer attack; an attack whose verdicts were never recorded fails with a KeyError."""
    cfg, c, m = _scoring_cfg(), scored.correct, scored.metrics
    for eps in cfg.eps:
        k = eps_key(eps)
        at_eps = [a for a in cfg.attacks if eps in (a.eps or cfg.eps)]
        names = ["fgsm", *(f"attack/{a.key}" for a in at_eps),
                 *(f"transfer/{t}" for t in cfg.transfer if t == "fgsm" or t in {
                     a.key for a in at_eps})]
        n = min([cfg.n_attack, *(a.n_images for a in at_eps)])
        expected = np.logical_and.reduce([c[f"{name}_{k}"][:n] for name in names])
        assert m[f"robust/n_images_{k}"] == n
        np.testing.assert_array_equal(c[f"robust_{k}"], expected)
        assert m[f"robust/accuracy_{k}"] == pytest.approx(float(np.mean(expected)))


def test_pgd_alias_builds_arts_pgd_with_its_documented_defaults() -> None:
    """``pgd``: ART's PGD, 40 iterations, a random start, step 0.1·ε, L∞."""
    from art.attacks.evasion import ProjectedGradientDescent

    from art_study.attacks.registry import Estimators, resolve
    from art_study.attacks.validation import throwaway_model
    from art_study.config import AttackConfig
    from art_study.datasets import MNIST

    eps = 0.3
    attack = resolve(AttackConfig(name="pgd"), [eps]).build(
        Estimators(throwaway_model(MNIST.input_shape, MNIST.n_classes))["keras"], eps,
        batch_size=10)
    assert isinstance(attack, ProjectedGradientDescent)
    assert attack.max_iter == 40
    assert attack.num_random_init >= 1
    assert attack.eps == eps and attack.eps_step == pytest.approx(0.1 * eps)
    assert attack.norm == np.inf
