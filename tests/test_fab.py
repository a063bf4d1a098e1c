"""FAB-T against closed-form minimal perturbations, the AutoAttack cascade's accounting with
FAB-T in it, AutoAttack's Square check and the escalation it triggers, and the reference's
other checks on models built to trip them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import briefly_trained_cnn
from scipy.optimize import linprog

from art_study.attacks.apgd import _predict
from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS, AutoAttackStandard
from art_study.attacks.fab import FABT, project_linf
from art_study.diagnostics import (
    Diagnosis,
    output_check,
    probe_checks,
    probe_model,
    square_check,
    square_checks,
    zero_gradient_count,
)
from art_study.models import INPUT_SHAPE, N_CLASSES, one_hot


def _linf_to_halfspace(x: np.ndarray, w: np.ndarray, b: float) -> float:
    """The smallest ‖d‖∞ with ``w·(x + d) + b ≥ 0`` and ``0 ≤ x + d ≤ 1``, as a linear program
    (variables ``d`` and the radius ``λ``); inf when the box cannot reach the half-space."""
    n = len(x)
    eye, col = sp.eye(n), sp.csr_matrix(-np.ones((n, 1)))
    a_ub = sp.vstack([sp.hstack([eye, col]), sp.hstack([-eye, col]),
                      sp.hstack([sp.csr_matrix(-w[None]), sp.csr_matrix([[0.0]])])])
    b_ub = np.r_[np.zeros(2 * n), w @ x + b]
    bounds = [(-xi, 1.0 - xi) for xi in x] + [(0.0, None)]
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return float(res.fun) if res.status == 0 else np.inf


@pytest.fixture(scope="module")
def linear(small_mnist):
    """Multinomial logistic regression on the slice: its logits are affine in the image."""
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input(INPUT_SHAPE), keras.layers.Flatten(),
                          keras.layers.Dense(N_CLASSES)])
    m.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    m.fit(small_mnist.x_train, one_hot(small_mnist.y_train), epochs=5, batch_size=64, verbose=0)
    return m


@pytest.fixture(scope="module")
def cnn(small_mnist):
    """The paper's 2-conv CNN, briefly trained (BatchNorm momentum 0.9 so that its running
    statistics settle within the slice, as in test_apgd.py)."""


    return briefly_trained_cnn(small_mnist, epochs=2)


def test_the_projection_is_the_minimal_linf_step_onto_hyperplane_and_box() -> None:
    """Against a linear program, including points on the box's faces and unreachable planes."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for trial in range(20):
        t = rng.uniform(0.0, 1.0, (1, 30)).astype(np.float32)
        t[0, : 10 * (trial % 2)] = 0.0  # black pixels: the box binds
        w = rng.normal(size=(1, 30)).astype(np.float32)
        b = float(w[0] @ t[0]) + 3.0 * rng.normal()
        d = project_linf(tf.constant(t), tf.constant(w), tf.constant([b], tf.float32)).numpy()[0]
        # reaching w·z = b from one side is the half-space on the far side of t
        side = 1.0 if b > w[0] @ t[0] else -1.0
        truth = _linf_to_halfspace(t[0].astype(np.float64), side * w[0], -side * b)
        assert t[0].min() >= 0.0 and (t[0] + d).min() >= -1e-6 and (t[0] + d).max() <= 1 + 1e-6
        if np.isfinite(truth):
            assert abs(w[0] @ (t[0] + d) - b) < 1e-4
            assert np.abs(d).max() == pytest.approx(truth, rel=1e-4, abs=1e-6)
        else:  # the corner closest to the plane: every coordinate as far as it goes
            assert np.allclose(t[0] + d, np.where(side * w[0] > 0, 1.0, 0.0))


def test_fab_t_finds_the_minimal_perturbation_of_a_linear_model(linear, small_mnist) -> None:
    """A linear model misclassifies ``x + d`` iff some wrong class's half-space ``z_t ≥ z_y`` is
    reached: the minimal L∞ perturbation is the smallest of nine linear programs. FAB-T with
    all nine targets finds it within 1 %, never below it; ``attack`` at ε agrees."""
    x, y = small_mnist.x_test[:12], small_mnist.y_test[:12]
    kernel, bias = (np.asarray(v, np.float64) for v in linear.layers[-1].get_weights())
    fab = FABT(linear)
    dist, x_adv = fab.minimal(x, y)
    clean_ok = _predict(linear, x, 100) == y
    assert clean_ok.sum() >= 9
    for i in np.flatnonzero(clean_ok):
        xf = x[i].reshape(-1).astype(np.float64)
        truth = min(_linf_to_halfspace(xf, kernel[:, t] - kernel[:, y[i]], bias[t] - bias[y[i]])
                    for t in range(N_CLASSES) if t != y[i])
        assert truth * (1 - 1e-4) <= dist[i] <= truth * 1.01, (i, truth, dist[i])
    assert (dist[~clean_ok] == 0).all()
    assert (_predict(linear, x_adv, 100)[clean_ok] != y[clean_ok]).all()
    eps = float(np.median(dist[clean_ok]))
    fooled, xa = fab.attack(x, y, eps)
    np.testing.assert_array_equal(fooled, dist <= eps)
    assert np.abs(xa - x).reshape(len(x), -1).max(axis=1)[fooled].max() <= eps


def test_fab_t_on_the_cnn_scores_like_autoattack(cnn, small_mnist) -> None:
    """An image counts broken at ε only with a misclassified point within ε; one minimal search
    gives every ε's verdict; and FAB-T breaks images of a briefly trained CNN at ε 0.1."""
    x, y = small_mnist.x_test[:24], small_mnist.y_test[:24]
    fab = FABT(cnn, n_iter=20, batch_size=24)  # the scoring, not the search, is under test
    dist, _ = fab.minimal(x, y)
    fooled, xa = fab.attack(x, y, 0.1)
    np.testing.assert_array_equal(fooled, dist <= 0.1)
    assert 0 < fooled.sum() < len(x)
    assert np.abs(xa - x).reshape(len(x), -1).max(axis=1).max() <= 0.1 + 1e-6
    assert (_predict(cnn, xa, 100)[fooled] != y[fooled]).all()
    assert (xa[~fooled] == x[~fooled]).all()


def test_the_cascade_is_an_and_over_its_components(cnn, small_mnist, monkeypatch) -> None:
    """With a FAB-T that breaks nothing and returns clean images, every image APGD-T's point
    broke stays broken with that point; each component attacks only what is still robust; the
    final verdict is the union of the components' (robust = robust against every one)."""
    x, y, eps = small_mnist.x_test[:40], small_mnist.y_test[:40], 0.1
    aa = AutoAttackStandard(cnn, max_iter=10, n_queries=50, batch_size=40, escalate=False)
    seen = {}
    real = aa._component

    def spy(name, xs, ys, e):
        seen[name] = len(xs)
        if name == "fab-t":  # the worst FAB-T: no success, clean images back
            return np.zeros(len(xs), bool), xs.copy()
        return real(name, xs, ys, e)

    monkeypatch.setattr(aa, "_component", spy)
    np.random.seed(0)
    fooled, x_adv, after = aa.cascade(x, y, eps)
    assert tuple(after) == COMPONENTS
    assert after["apgd-t"].sum() > after["apgd-ce"].sum()  # APGD-T broke images of its own
    np.testing.assert_array_equal(after["fab-t"], after["apgd-t"])
    for a, b in itertools.pairwise(COMPONENTS):
        assert (after[b] >= after[a]).all()
        assert seen[b] == (~after[a]).sum()
    np.testing.assert_array_equal(fooled, after["square"])
    pred = _predict(cnn, x_adv, 100)
    assert (pred[fooled] != y[fooled]).all()
    assert np.abs(x_adv - x).max() <= eps + 1e-6


def test_the_square_check_fires_on_the_references_threshold() -> None:
    """check_square_sr: Square below the lowest white-box figure by more than 0.2 points."""
    table = {"clean": 0.95, "apgd-ce": 0.91, "apgd-t": 0.905, "fab-t": 0.905}
    assert square_check({**table, "square": 0.892}).passed is False  # 1.3 points
    assert square_check({**table, "square": 0.904}).passed is True  # 0.1 point
    assert square_check({**table, "square": 0.905}).passed is True
    assert square_check({"clean": 0.95, "square": 0.5}).passed is None  # no white-box before
    assert square_check(table).passed is None
    fired = square_checks({"autoattack-standard": {0.3: {**table, "square": 0.892,
                                                         "plus-square": 0.887}}})
    assert fired.passed is False and "evaluation unreliable" in fired.detail
    assert "1.30%" in fired.detail and "88.7%" in fired.detail
    d = Diagnosis(reference=[fired])
    assert d.unreliable and d.tags()["evaluation_unreliable"] == "true"
    assert d.tags()["diag.autoattack_square"].startswith("FAIL")
    ok = Diagnosis(reference=[square_checks({"aa": {0.3: {**table, "square": 0.905}}})])
    assert not ok.unreliable and ok.tags()["evaluation_unreliable"] == "false"
    assert "evaluation_unreliable" not in Diagnosis().tags()


@pytest.mark.parametrize("square_breaks", [0, 3])
def test_escalation_runs_only_when_the_square_check_fires(linear, small_mnist, monkeypatch,
                                                          square_breaks) -> None:
    """Scripted components: Square breaking 3 of 100 images (3 points) escalates, and the plus
    components attack only the images still robust; breaking none does not."""
    x, y = small_mnist.x_test[:100], small_mnist.y_test[:100]
    aa = AutoAttackStandard(linear, max_iter=5, n_queries=10, batch_size=100)
    calls: dict[str, int] = {}

    def scripted(name, xs, ys, e):
        calls[name] = len(xs)
        f = np.zeros(len(xs), bool)
        f[: {"apgd-ce": 10, "square": square_breaks, "plus-apgd-dlr": 2}.get(name, 0)] = True
        return f, xs.copy()

    monkeypatch.setattr(aa, "_component", scripted)
    fooled, _, after = aa.cascade(x, y, 0.3)
    fires = square_breaks > 0
    assert aa.check.passed is (not fires) and aa.escalated is fires
    assert set(calls) == set(COMPONENTS) | (set(PLUS_COMPONENTS) if fires else set())
    assert set(after) == set(calls)
    if fires:
        assert calls["plus-apgd-ce"] == (~after["square"]).sum()
        assert fooled.sum() == after["square"].sum() + 2  # the headline is the lower figure
    else:
        np.testing.assert_array_equal(fooled, after["square"])


def test_the_escalations_own_attacks_run_on_what_is_left(linear, small_mnist,
                                                         monkeypatch) -> None:
    """The check forced to fire, the real plus components (tiny budgets) attack only the images
    still robust and can only lower the figure; every image counted broken has its point."""
    import art_study.attacks.autoattack as aa_module
    from art_study.diagnostics import Check

    monkeypatch.setattr(aa_module, "square_check",
                        lambda table: Check("autoattack_square", False, "forced"))
    x, y, eps = small_mnist.x_test[:60], small_mnist.y_test[:60], 0.03
    aa = AutoAttackStandard(linear, max_iter=5, n_target_classes=2, n_queries=20, batch_size=60)
    np.random.seed(0)
    fooled, x_adv, after = aa.cascade(x, y, eps)
    assert aa.escalated and tuple(after) == (*COMPONENTS, *PLUS_COMPONENTS)
    steps = list(after.values())
    assert all((b >= a).all() for a, b in itertools.pairwise(steps))
    assert aa.costs["plus-apgd-ce"][2] == (~after["square"]).sum() > 0
    np.testing.assert_array_equal(fooled, after["plus-square"])
    assert (_predict(linear, x_adv, 100)[fooled] != y[fooled]).all()
    assert np.abs(x_adv - x).max() <= eps + 1e-6


def test_the_evaluation_feeds_the_cascade_to_autoattacks_checks(linear, small_mnist,
                                                                tmp_path, monkeypatch) -> None:
    """An evaluation with ``autoattack-standard`` logs FAB-T's figure and gives the Square
    check (read from the logged per-component figures) and the model checks a verdict; with
    checkpoints, the cascade saves its chunk there and a second evaluation reuses it. The
    first runs as another machine would (another numerics fingerprint): the second, which
    reuses its chunks, says so in its tags; the first, whose chunks are its own, does not."""
    from art_study import numerics
    from art_study.attacks.checkpoints import Checkpoints
    from art_study.config import EvaluationConfig
    from art_study.evaluation import evaluate

    cfg = EvaluationConfig(
        eps=[0.1], n_attack=40, batch_size=40,
        attacks=[{"name": "autoattack-standard", "n_images": 40,
                  "args": {"max_iter": 5, "n_target_classes": 2, "n_queries": 20}}],
        transfer=[], diagnostics={"n_images": 40, "pgd_steps": 2})
    store = Checkpoints(tmp_path)
    here = numerics.fingerprint()
    with monkeypatch.context() as patch:
        patch.setattr(numerics, "fingerprint", lambda: {**here, "id": "another-cpu"})
        np.random.seed(0)
        result = evaluate(linear, small_mnist.x_test, small_mnist.y_test, cfg, progress=False,
                          checkpoints=store)
    m, tags = result.metrics, result.tags
    saved = list(tmp_path.glob("*/*.npz"))
    assert len(saved) in (1, 2)  # the standard chunk, and the escalation's if it ran
    assert not any(".numerics" in k for k in tags)
    np.random.seed(0)
    again = evaluate(linear, small_mnist.x_test, small_mnist.y_test, cfg, progress=False,
                     checkpoints=store)
    assert again.tags["attack.autoattack-standard.numerics"] == \
        f"another-cpu: {len(saved)} chunks"
    assert again.tags["attack.autoattack-standard.numerics_differs"] == "true"
    timeless = {k: v for k, v in m.items() if not k.endswith(("time_s", "_per_s"))}
    assert {k: again.metrics[k] for k in timeless} == timeless
    # each component's compute time is logged; the second run's come from the checkpoint
    for c in COMPONENTS:
        assert m[f"attack/autoattack-standard/{c}/time_s_eps_0.1"] >= 0.0
    assert m["attack/autoattack-standard/apgd-t/time_s_eps_0.1"] > 0.0
    assert again.metrics["attack/autoattack-standard/apgd-t/time_s_eps_0.1"] == \
        m["attack/autoattack-standard/apgd-t/time_s_eps_0.1"]
    assert list(tmp_path.glob("*/*.npz")) == saved
    assert "attack/autoattack-standard/fab-t/accuracy_eps_0.1" in m
    assert tags["diag.autoattack_square"].split(":")[0] in ("pass", "FAIL")
    assert "autoattack-standard at ε 0.1" in tags["diag.autoattack_square"]
    assert tags["evaluation_unreliable"] in ("true", "false")
    for name in ("output_not_probability", "deterministic_output", "static_model"):
        assert tags[f"diag.autoattack_{name}"].startswith("pass")
    assert m["diag/autoattack_no_zero_gradient"] in (0.0, 1.0)


def test_the_references_other_checks_flag_models_built_to_trip_them(linear, small_mnist) -> None:
    """A softmax output, a random layer and a batch-dependent layer each fail their check;
    the plain linear model passes all three. Zero gradients are counted exactly."""
    import keras
    import tensorflow as tf

    x, y = small_mnist.x_test[:50], small_mnist.y_test[:50]

    def passed(model):
        return {c.name: c.passed for c in probe_checks(probe_model(model, x, y))}

    assert all(passed(linear).values())
    soft = keras.Sequential([linear, keras.layers.Softmax()])
    noisy = keras.Sequential([keras.layers.Lambda(
        lambda v: v + tf.random.uniform(tf.shape(v), 0, 0.3)), linear])
    batchy = keras.Sequential([keras.layers.Lambda(
        lambda v: v - tf.reduce_mean(v, axis=0, keepdims=True)), linear])
    assert passed(soft)["autoattack_output_not_probability"] is False
    assert output_check(np.asarray(linear(x))).passed is True
    assert passed(noisy)["autoattack_deterministic_output"] is False
    assert passed(batchy)["autoattack_static_model"] is False
    assert passed(batchy)["autoattack_deterministic_output"] is True
    grads = np.ones((4, 28, 28, 1), np.float32)
    grads[1] = 0.0
    assert zero_gradient_count(grads) == 1


def test_a_stopped_cascade_resumes_from_its_checkpoints_bit_for_bit(linear, small_mnist,
                                                                    monkeypatch,
                                                                    tmp_path) -> None:
    """In chunks of 20 images, a cascade stopped in its second chunk and run again loads the
    first chunk, computes the rest and gives the verdicts, adversarial images and RNG state
    of an uninterrupted run; a damaged checkpoint is recomputed, another model's is not used."""
    import art_study.attacks.autoattack as aa_module
    from art_study.attacks.checkpoints import Checkpoints
    from art_study.diagnostics import Check

    monkeypatch.setattr(aa_module, "square_check",  # the escalation runs in chunks too
                        lambda table: Check("autoattack_square", False, "forced"))
    x, y, eps = small_mnist.x_test[:60], small_mnist.y_test[:60], 0.05

    def attack(checkpoints=None):
        aa = AutoAttackStandard(linear, max_iter=5, n_target_classes=2, n_queries=20,
                                batch_size=60, plus_restarts=2,
                                plus_square_restarts=2)
        aa.chunk_images = 20
        if checkpoints is not None:
            aa.resume_from(checkpoints)
        return aa

    def run(aa):
        np.random.seed(0)
        out = aa.cascade(x, y, eps)
        return out, np.random.random()

    (fooled, x_adv, after), after_draw = run(attack())
    assert 0 < fooled.sum() < len(x) and aa_module.PLUS_COMPONENTS[-1] in after

    store = Checkpoints(tmp_path / "checkpoints")
    stopped = attack(store)
    real, calls = stopped._component, []

    def stop_in_second_chunk(name, xs, ys, e):
        calls.append(name)
        if len(calls) > len(COMPONENTS):
            raise KeyboardInterrupt
        return real(name, xs, ys, e)

    monkeypatch.setattr(stopped, "_component", stop_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    assert len(list(store.root.glob("*/*.npz"))) == 1

    resumed = attack(store)
    (fooled2, x_adv2, after2), after_draw2 = run(resumed)
    assert resumed.resumed == 1
    np.testing.assert_array_equal(fooled2, fooled)
    np.testing.assert_array_equal(x_adv2, x_adv)
    assert after2.keys() == after.keys()
    for name in after:
        np.testing.assert_array_equal(after2[name], after[name])
    assert after_draw2 == after_draw
    # the loaded chunk brings its recorded cost: APGD-CE attacked every clean-correct image
    assert resumed.costs["apgd-ce"][2] == (_predict(linear, x, 60) == y).sum()

    saved = sorted(store.root.glob("*/*.npz"))
    assert len(saved) == 6  # 3 chunks × (standard, plus)
    saved[0].write_bytes(b"not an npz")
    again = attack(store)
    (fooled3, _, _), _ = run(again)
    assert again.resumed == 5
    np.testing.assert_array_equal(fooled3, fooled)

    import keras

    nudged = keras.models.clone_model(linear)
    nudged.set_weights([w * 1.01 for w in linear.get_weights()])
    other = AutoAttackStandard(nudged, max_iter=5, n_target_classes=2, n_queries=20,
                               batch_size=60)
    other.chunk_images = 20
    other.resume_from(store)
    np.random.seed(0)
    other.cascade(x, y, eps)
    assert other.resumed == 0


def test_checkpoints_serve_only_the_settings_that_computed_them(linear, small_mnist,
                                                                monkeypatch, tmp_path) -> None:
    """A chunk saved under weaker settings is never read by a stronger attack (more Square
    queries: nothing reused), and a change of the escalation's budget keeps the standard
    chunks and recomputes only the escalation's."""
    import art_study.attacks.autoattack as aa_module
    from art_study.attacks.checkpoints import Checkpoints
    from art_study.diagnostics import Check

    monkeypatch.setattr(aa_module, "square_check",
                        lambda table: Check("autoattack_square", False, "forced"))
    x, y, eps = small_mnist.x_test[:40], small_mnist.y_test[:40], 0.05
    store = Checkpoints(tmp_path / "checkpoints")

    def run(**settings):
        aa = AutoAttackStandard(linear, **{"max_iter": 5, "n_target_classes": 2,
                                           "n_queries": 20, "batch_size": 40,
                                           "plus_restarts": 1, "plus_square_restarts": 1,
                                           **settings})
        aa.chunk_images = 20
        aa.resume_from(store)
        np.random.seed(0)
        aa.cascade(x, y, eps)
        return aa.resumed

    assert run() == 0
    assert run() == 4  # 2 chunks × (standard, plus)
    assert run(n_queries=40) == 0
    assert run(plus_square_restarts=2) == 2  # the standard chunks only


@pytest.mark.parametrize("n_targets", [0, 5])
def test_every_targeted_attack_refuses_targets_outside_the_wrong_classes(n_targets) -> None:
    """On a 5-class model: no target, or as many targets as classes, is refused by APGD-T (the
    attack and the function), FAB-T and the cascade, with one message."""
    import keras

    from art_study.attacks.apgd import APGD, APGDT, apgd_targeted, check_target_classes

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    message = rf"^n_target_classes must be an integer in 1\.\.4, got {n_targets}$"
    x, y = np.zeros((2, 8, 8, 1), np.float32), np.zeros(2, int)
    builds = [lambda: check_target_classes(n_targets, model),
              lambda: APGDT(model, n_target_classes=n_targets),
              lambda: apgd_targeted(APGD(model, loss="dlr-targeted"), x, y, 0.1,
                                    n_target_classes=n_targets),
              lambda: FABT(model, n_target_classes=n_targets),
              lambda: AutoAttackStandard(model, n_target_classes=n_targets)]
    for build in builds:
        with pytest.raises(ValueError, match=message):
            build()
    check_target_classes(4, model)  # every wrong class is a valid target


def test_the_square_check_runs_with_the_diagnostics_disabled(linear, small_mnist,
                                                             monkeypatch) -> None:
    """As in the reference, a cascade is followed by its Square check whatever the diagnostics'
    setting: Square (scripted) breaking 2 of 40 images tags the evaluation unreliable with the
    diagnostics off, and with them on the same two tags hold the same values; without a
    cascade there is no verdict."""
    from art_study.config import EvaluationConfig
    from art_study.evaluation import evaluate

    def scripted(self, name, xs, ys, e):
        f = np.zeros(len(xs), bool)
        f[: {"apgd-ce": 3, "square": 2}.get(name, 0)] = True
        return f, xs.copy()

    monkeypatch.setattr(AutoAttackStandard, "_component", scripted)
    cascade = [{"name": "autoattack-standard", "n_images": 40,
                "args": {"max_iter": 5, "n_target_classes": 2, "n_queries": 20}}]

    def tags(attacks, enabled):
        cfg = EvaluationConfig(eps=[0.1], n_attack=40, batch_size=40, attacks=attacks,
                               transfer=[], diagnostics={"enabled": enabled, "n_images": 40,
                                                         "pgd_steps": 2})
        result = evaluate(linear, small_mnist.x_test, small_mnist.y_test, cfg, progress=False)
        assert (result.diagnosis is None) is not enabled
        return result.tags

    off = tags(cascade, enabled=False)
    assert off["evaluation_unreliable"] == "true"
    assert off["diag.autoattack_square"].startswith("FAIL: evaluation unreliable: "
                                                    "autoattack-standard at ε 0.1")
    assert "gradient_masking_suspected" not in off  # the masking checks did not run
    on = tags(cascade, enabled=True)
    for name in ("evaluation_unreliable", "diag.autoattack_square"):
        assert on[name] == off[name]
    assert "gradient_masking_suspected" in on
    assert not {"evaluation_unreliable", "diag.autoattack_square"} & set(tags([], False))
