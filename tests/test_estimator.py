"""CompiledKerasClassifier computes what ART's KerasClassifier computes, on the same model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from art_study.config import ModelConfig, TrainConfig
from art_study.models import build_cnn, compile_model, one_hot


@pytest.fixture(scope="module")
def pair(trained_model):
    from art.estimators.classification import KerasClassifier

    from art_study.estimator import CompiledKerasClassifier

    ref = KerasClassifier(trained_model, use_logits=True, clip_values=(0.0, 1.0))
    return ref, CompiledKerasClassifier(trained_model)


def test_is_an_art_keras_classifier(pair) -> None:
    from art.estimators.classification import KerasClassifier

    ref, ours = pair
    assert isinstance(ours, KerasClassifier)
    assert ours.nb_classes == ref.nb_classes and ours.input_shape == ref.input_shape


def test_loss_gradient_matches_art(pair, small_mnist) -> None:
    ref, ours = pair
    x, y = small_mnist.x_test[:64], small_mnist.y_test[:64]
    theirs, mine = ref.loss_gradient(x, one_hot(y)), ours.loss_gradient(x, one_hot(y))
    assert mine.shape == x.shape
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
    # Index labels mean the same labels (ART's own method rejects them for this loss).
    np.testing.assert_array_equal(ours.loss_gradient(x, y), mine)


def test_compute_loss_matches_art_for_every_reduction(pair, small_mnist) -> None:
    ref, ours = pair
    x, y1h = small_mnist.x_test[:16], one_hot(small_mnist.y_test[:16])
    np.testing.assert_allclose(ours.compute_loss(x, y1h), ref.compute_loss(x, y1h).ravel(),
                               rtol=1e-5, atol=1e-6)
    for reduction in ("mean", "sum"):
        np.testing.assert_allclose(ours.compute_loss(x, y1h, reduction=reduction),
                                   ref.compute_loss(x, y1h, reduction=reduction), rtol=1e-5)


@pytest.mark.parametrize("label", [None, 3, "per-image"])
def test_class_gradient_matches_art(pair, small_mnist, label) -> None:
    ref, ours = pair
    x = small_mnist.x_test[:8]
    if label == "per-image":
        label = small_mnist.y_test[:8]
    theirs, mine = ref.class_gradient(x, label=label), ours.class_gradient(x, label=label)
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


def test_single_batch_fit_takes_the_same_step_as_art(small_mnist) -> None:
    """AdversarialTrainer's one-batch ``fit`` calls: the same optimizer step, the callbacks
    see the batch's logs. Dropout is off and the optimizer is SGD so that only the summation
    order differs: ``model.fit`` shuffles the batch (moving dropout masks between images), and
    Adam's first step is ``lr · sign(g)`` wherever ``|g|`` is near its ε."""
    from art.estimators.classification import KerasClassifier

    from art_study.estimator import CompiledKerasClassifier

    x, y1h = small_mnist.x_train[:128], one_hot(small_mnist.y_train[:128])
    keras.utils.set_random_seed(0)
    start = build_cnn(ModelConfig(dropout=0.0))
    seen: list[dict] = []
    cb = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(logs))
    weights = []
    for wrap in (lambda m: KerasClassifier(m, use_logits=True, clip_values=(0.0, 1.0)),
                 CompiledKerasClassifier):
        model = keras.models.clone_model(start)
        model.set_weights(start.get_weights())
        model = compile_model(model, TrainConfig(optimizer="sgd", learning_rate=0.1))
        wrap(model).fit(x, y1h, batch_size=128, nb_epochs=1, callbacks=[cb])
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert any(not np.array_equal(a, w0) for a, w0 in zip(weights[1], start.get_weights(),
                                                         strict=True))
    assert len(seen) == 2 and seen[1]["loss"] == pytest.approx(seen[0]["loss"], rel=1e-5)
