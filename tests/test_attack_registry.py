"""Attacks from configs: aliases and ART class names resolve, run and are scored; bad names
and arguments fail before any training with the list of what exists."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from art_study.attacks import FGSM
from art_study.attacks.base import FORWARD, QUERY, Attack, HandWritten, Outcome, Passes
from art_study.attacks.registry import ALIASES, Estimators, resolve, validate_attacks
from art_study.config import AttackConfig, EvaluationConfig
from art_study.datasets import MNIST
from art_study.errors import ConfigError
from art_study.evaluation import craft_transfer, eps_key, evaluate
from art_study.models import input_shape_of, n_classes_of, one_hot, predict_labels


def _cfg() -> EvaluationConfig:
    return EvaluationConfig(
        eps=[0.1, 0.3], n_attack=100, batch_size=100,
        attacks=[
            {"name": "pgd", "n_images": 60, "args": {"max_iter": 10}},
            {"name": "ProjectedGradientDescent", "n_images": 60,
             "args": {"max_iter": 10, "num_random_init": 1}, "label": "pgd-by-class"},
            {"name": "square", "n_images": 60, "eps": [0.3], "args": {"max_iter": 50}},
            {"name": "deepfool", "n_images": 60, "args": {"max_iter": 20}},
            {"name": "apgd-dlr", "n_images": 60, "eps": [0.3], "args": {"max_iter": 10}},
            {"name": "autoattack-standard", "n_images": 40, "eps": [0.1],
             "args": {"max_iter": 5, "n_target_classes": 2, "n_queries": 20}},
        ],
        transfer=["fgsm", "pgd"],
        diagnostics={"n_images": 60, "pgd_steps": 5},
    )


@pytest.fixture(scope="module")
def evaluated(trained_model, small_mnist):
    """Everything at once on the shared 2-epoch model (it misclassifies about half the slice:
    the clean-correct condition matters). Transfer examples are crafted on the model itself."""
    cfg = _cfg()
    validate_attacks(cfg, MNIST)
    np.random.seed(0)
    crafted = craft_transfer(trained_model, small_mnist.x_test, small_mnist.y_test, cfg)
    return evaluate(trained_model, small_mnist.x_test, small_mnist.y_test, cfg, progress=False,
                    transfer_set=crafted)


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


def test_no_attack_scores_above_clean_accuracy_on_the_same_images(evaluated) -> None:
    """An image is robust only if it is clean-correct and not fooled: DeepFool pushes away from
    the *predicted* class, so a misclassified image can land on the true one; the transfer
    examples and ART's FGSM were scored without the clean condition too."""
    clean = evaluated.correct["clean"]
    checked = 0
    for key, ok in evaluated.correct.items():
        if key != "clean":
            assert not (ok & ~clean[: len(ok)]).any(), key
            checked += 1
    assert checked >= 20 and (~clean).sum() > 50  # many misclassified images to test on
    m = evaluated.metrics
    for eps in ("0.1", "0.3"):
        assert m[f"fgsm_art/accuracy_eps_{eps}"] <= m["clean/accuracy"]
        assert m[f"fgsm_art/accuracy_eps_{eps}"] == m[f"fgsm_custom/accuracy_eps_{eps}"]


def test_worst_case_over_every_attack_per_image(evaluated) -> None:
    """robust/accuracy_eps_<ε>: robust under every attack at ε on the first images all ran on
    (60 at ε 0.1 and 0.3: pgd, deepfool, transfer; autoattack-standard ran on 40 at 0.1)."""
    c, m = evaluated.correct, evaluated.metrics
    for eps, n in ((0.1, 40), (0.3, 60)):
        k = eps_key(eps)
        names = [key for key in c if key.endswith(f"_{k}") and key.startswith(
            ("fgsm_", "attack/", "transfer/"))]
        assert len(names) >= 5
        expected = np.logical_and.reduce([c[name][:n] for name in names])
        np.testing.assert_array_equal(c[f"robust_{k}"], expected)
        assert m[f"robust/n_images_{k}"] == n
        assert m[f"robust/accuracy_{k}"] == pytest.approx(float(np.mean(expected)))
        assert m[f"robust/accuracy_{k}"] <= min(float(np.mean(c[name][:n])) for name in names)


def test_autoattack_standard_logs_its_components_with_fab_t(evaluated) -> None:
    m, base = evaluated.metrics, "attack/autoattack-standard"
    steps = [m[f"{base}/{c}/accuracy_eps_0.1"] for c in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert steps == sorted(steps, reverse=True)  # cumulative: each only removes images
    assert m[f"{base}/accuracy_eps_0.1"] == steps[-1]
    assert steps[0] <= float(np.mean(evaluated.correct["clean"][:40]))
    assert m[f"{base}/fab_target_classes"] == 2
    assert m[f"{base}/n_queries"] == 20 and m[f"{base}/n_target_classes"] == 2
    assert "FAB-T" in evaluated.tags["attack.autoattack-standard.budget"]


def test_apgd_by_class_name_starts_at_the_references_step() -> None:
    """ART's eps_step is APGD's *initial* step; Croce & Hein start at 2·ε."""
    r = resolve(AttackConfig(name="AutoProjectedGradientDescent"), [0.3])
    attack = r.build(Estimators(_tiny_model())["keras"], 0.3, batch_size=10)
    assert attack.eps_step == pytest.approx(0.6)
    aa = resolve(AttackConfig(name="autoattack"), [0.3]).build(
        Estimators(_tiny_model())["keras"], 0.3, batch_size=10)
    assert [a.eps_step for a in aa.attacks[:2]] == [pytest.approx(0.6)] * 2
    # the aliases run art-study's compiled APGD (any iterate counts)
    from art_study.attacks.apgd import APGD

    for name in ("apgd-ce", "apgd-dlr", "apgd-t"):
        built = resolve(AttackConfig(name=name), [0.3]).build(
            Estimators(_tiny_model())["keras"], 0.3, batch_size=10)
        assert isinstance(built.attack.apgd, APGD) and built.attack.apgd.n_iter == 100


def _tiny_model():
    from art_study.attacks.validation import throwaway_model

    return throwaway_model(MNIST.input_shape, MNIST.n_classes)


def test_every_alias_resolves_to_its_class_and_passes_its_checks() -> None:
    """ART's aliases run ART's class, the others art-study's own (an Attack, no ART class)."""
    from art_study.attacks.base import Attack

    own = {"apgd-ce", "apgd-dlr", "apgd-t", "autoattack-standard"}
    for name in ALIASES:
        cls = resolve(AttackConfig(name=name), [0.3]).cls
        if name in own:
            assert issubclass(cls, Attack) and cls.__module__.startswith("art_study.attacks")
        else:
            assert cls.__module__.startswith("art.attacks.evasion")
    resolved = validate_attacks(EvaluationConfig(attacks=[{"name": n} for n in ALIASES]), MNIST)
    assert [r.key for r in resolved] == list(ALIASES)
    assert {r.key for r in resolved if not r.bounded} == {"cw-linf", "deepfool", "hopskipjump"}


def test_unknown_attack_lists_aliases_and_classes() -> None:
    with pytest.raises(ConfigError) as err:
        validate_attacks(EvaluationConfig(attacks=[{"name": "pgdd"}]), MNIST)
    msg = str(err.value)
    assert "unknown attack 'pgdd'" in msg
    assert "apgd-ce" in msg and "ProjectedGradientDescent" in msg and "SquareAttack" in msg


def test_wrong_argument_lists_what_the_class_takes() -> None:
    with pytest.raises(ConfigError, match=r"does not take max_iters; it takes: .*max_iter"):
        validate_attacks(
            EvaluationConfig(attacks=[{"name": "pgd", "args": {"max_iters": 3}}]), MNIST)
    with pytest.raises(ConfigError, match="attack 'square'"):  # ART's own check of the value
        validate_attacks(
            EvaluationConfig(attacks=[{"name": "square", "args": {"p_init": 7}}]), MNIST)
    with pytest.raises(ConfigError, match=r"does not take eps_step.*max_iter, n_queries"):
        validate_attacks(EvaluationConfig(attacks=[{"name": "autoattack-standard",
                                                    "args": {"eps_step": 3}}]), MNIST)
    with pytest.raises(ConfigError, match="attack 'apgd-t': n_target_classes"):
        validate_attacks(EvaluationConfig(attacks=[{"name": "apgd-t",
                                                    "args": {"n_target_classes": 10}}]), MNIST)
    for arg in ("chunk_images", "plus_restarts", "plus_square_restarts"):
        with pytest.raises(ConfigError, match=rf"^attack 'autoattack-standard': {arg} must be "
                                              "a positive integer, got 0$"):
            validate_attacks(EvaluationConfig(attacks=[{"name": "autoattack-standard",
                                                        "args": {arg: 0}}]), MNIST)


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


class SignStep(Attack):
    """FGSM written against the protocol: one signed-gradient step of ``scale × ε``."""

    iterative = False

    def __init__(self, model, *, scale: float = 1.0, batch_size: int = 500):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.fgsm, self.scale = FGSM(model, batch_size=batch_size), scale

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        return Outcome(self.fgsm.generate(x, one_hot(y), self.scale * eps),
                       np.zeros(len(x), bool))


def test_a_hand_written_attack_is_its_class_and_one_registry_line(
        monkeypatch, trained_model, small_mnist) -> None:
    """No ART class of its name: checked, built, run and scored like any other attack, its
    verdicts those of the same step taken by the FGSM sweep."""
    monkeypatch.setitem(ALIASES, "sign-step", HandWritten(SignStep))
    with pytest.raises(ConfigError, match=r"does not take steps; it takes: scale \("):
        validate_attacks(
            EvaluationConfig(attacks=[{"name": "sign-step", "args": {"steps": 2}}]), MNIST)
    with pytest.raises(ConfigError, match="attack 'sign-step': scale must be positive"):
        validate_attacks(
            EvaluationConfig(attacks=[{"name": "sign-step", "args": {"scale": 0}}]), MNIST)
    cfg = EvaluationConfig(eps=[0.1, 0.3], attacks=[{"name": "Sign-Step", "n_images": 60}])
    [r] = validate_attacks(cfg, MNIST)
    assert (r.bounded, r.iterative, r.blackbox, r.kwargs) == (True, False, False, {"scale": 1.0})
    assert r.budget() == {"n_images": 60.0}
    x, y = small_mnist.x_test[:60], small_mnist.y_test[:60]
    est = Estimators(trained_model)["keras"]
    robust = r.run(est, x, y, batch_size=50)
    fgsm, clean = FGSM(trained_model), predict_labels(trained_model, x) == y
    for eps in (0.1, 0.3):
        x_fgsm = fgsm.generate(x, one_hot(y), eps)
        expected = clean & (predict_labels(trained_model, x_fgsm) == y)
        np.testing.assert_array_equal(robust[eps], expected)
        # ART's generate() for callers written against ART (crafting transfer examples)
        np.testing.assert_array_equal(r.build(est, eps, 50).generate(x, one_hot(y)), x_fgsm)
    assert robust[0.1].sum() > robust[0.3].sum() and robust[0.3].sum() < clean.sum()


class TargetProbe(Attack):
    """Refuses more target classes than the model has wrong classes (as APGD-T and FAB-T do),
    and records the input shape and classes of each model it is built on."""

    built: ClassVar[list[tuple[tuple[int, ...], int]]] = []

    def __init__(self, model, *, n_target_classes: int = 1, batch_size: int = 500):
        n_classes = n_classes_of(model)
        if not 1 <= n_target_classes <= n_classes - 1:
            raise ValueError(f"n_target_classes must be in 1..{n_classes - 1}")
        TargetProbe.built.append((input_shape_of(model), n_classes))

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        raise AssertionError("only built, never run, by the checks")


def test_attacks_are_checked_on_the_datasets_shape_and_classes(monkeypatch) -> None:
    """validate_attacks builds each attack on a model of the dataset's shape and classes: six
    target classes pass on seven classes and fail on six; planning a CIFAR-10 config checks on
    32×32×3, a local dataset's plan (its shape unknown before loading) builds nothing."""
    from art_study.config import config_from_mapping
    from art_study.datasets import local_spec
    from art_study.study.plan import plan_runs

    monkeypatch.setitem(ALIASES, "target-probe", HandWritten(TargetProbe))
    monkeypatch.setattr(TargetProbe, "built", [])
    six = EvaluationConfig(attacks=[{"name": "target-probe", "args": {"n_target_classes": 6}}])
    validate_attacks(six, local_spec((28, 28, 1), 7))
    with pytest.raises(ConfigError, match=r"attack 'target-probe': n_target_classes .* 1\.\.5"):
        validate_attacks(six, local_spec((12, 12, 3), 6))
    assert TargetProbe.built == [((28, 28, 1), 7)]  # the refused one is not built
    with pytest.raises(ConfigError, match=r"attack 'apgd-t': n_target_classes .* 1\.\.6"):
        validate_attacks(EvaluationConfig(attacks=[{"name": "apgd-t"}]),  # nine by default
                         local_spec((28, 28, 1), 7))

    evaluation = {"attacks": [{"name": "target-probe"}]}
    plan_runs(config_from_mapping({"name": "c", "data": {"name": "cifar10"},
                                   "evaluation": evaluation}), {0: "c" * 64})
    assert TargetProbe.built[-1] == ((32, 32, 3), 10)
    local = config_from_mapping({"name": "l", "data": {"path": "/nowhere/own.npz"},
                                 "evaluation": evaluation})
    plan_runs(local, {0: "l" * 64})
    assert len(TargetProbe.built) == 2
    plan_runs(local, {0: "l" * 64}, spec=local_spec((20, 20, 1), 4))
    assert TargetProbe.built[-1] == ((20, 20, 1), 4)


def test_every_attack_counts_its_passes_from_its_settings() -> None:
    """The planner's cost of an attack (passes per image) comes from its budget: every alias
    has one; the config's settings change it; ART's defaults fill what a config leaves out;
    attacks that stop on broken images count their later passes only for the robust ones."""
    def passes(name: str, **args):
        return resolve(AttackConfig(name=name, eps=[0.3], n_images=10, args=args), [0.3]).passes()

    for name in ALIASES:
        assert passes(name).per_image(1.0) > 0, name
    assert passes("pgd") == Passes(40.0)
    assert passes("pgd", max_iter=100, num_random_init=3) == Passes(300.0)
    assert passes("ProjectedGradientDescent") == Passes(100.0)  # ART's default max_iter
    assert passes("apgd-ce", nb_random_init=5) == Passes(100.0, 400.0)
    assert passes("apgd-t") == Passes(100.0, 800.0)
    assert passes("square") == Passes(FORWARD, 1000 * FORWARD)
    light = passes("autoattack-standard", max_iter=10, n_queries=100, escalate=False)
    assert light == Passes(10, 9 * 10 * (2 + FORWARD) + 100 * QUERY)
    assert passes("autoattack-standard").robust > light.robust
