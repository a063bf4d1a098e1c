"""The paper's CNN and its ART wrapper.

The network outputs **logits**, not probabilities. Three reasons: defensive distillation needs a
temperature applied to the logits (softmax(z / T)); cross-entropy from logits is numerically
stable where a softmax output saturates; and ART's attacks are stronger with logits
(``use_logits=True``). A softmax is applied only where probabilities are asked for.
"""

from __future__ import annotations

import keras
import numpy as np

from art_study.config import ModelConfig, TrainConfig

#: MNIST's input and classes: the defaults of :func:`build_cnn` and :func:`one_hot`. Other code
#: takes a model's own shapes (:func:`input_shape_of`, :func:`n_classes_of`).
INPUT_SHAPE = (28, 28, 1)
N_CLASSES = 10


def build_cnn(cfg: ModelConfig, name: str | None = None, *,
              input_shape: tuple[int, int, int] = INPUT_SHAPE,
              n_classes: int = N_CLASSES) -> keras.Model:
    """Build the paper's CNN with ``cfg.n_conv`` conv blocks for ``input_shape`` (H, W, C).

    Each block is Conv(ReLU, same padding) → BatchNorm → MaxPool(2). Pooling is skipped once the
    feature map is smaller than 2×2 (28 → 14 → 7 → 3 → 1, so the fifth block has no pooling;
    32 → 16 → 8 → 4 → 2 pools in all five). Then Flatten → Dense(256, ReLU) → Dropout →
    Dense(n_classes) logits.
    """
    layers: list[keras.layers.Layer] = [keras.Input(tuple(input_shape), name="image")]
    size = min(input_shape[0], input_shape[1])
    for i in range(cfg.n_conv):
        layers.append(
            keras.layers.Conv2D(
                cfg.filters[i], cfg.kernel_size, padding="same", activation="relu",
                name=f"conv{i + 1}",
            )
        )
        layers.append(keras.layers.BatchNormalization(name=f"bn{i + 1}"))
        if size >= 2:
            layers.append(keras.layers.MaxPooling2D(2, name=f"pool{i + 1}"))
            size //= 2
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(cfg.dense_units, activation="relu", name="dense"),
        keras.layers.Dropout(cfg.dropout, name="dropout"),
        keras.layers.Dense(n_classes, name="logits"),
    ]
    return keras.Sequential(layers, name=name or f"paper_cnn_{cfg.n_conv}conv")


def make_optimizer(cfg: TrainConfig) -> keras.optimizers.Optimizer:
    """The optimizer named in the training config."""
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(cfg.learning_rate, momentum=0.9)
    return keras.optimizers.Adam(cfg.learning_rate)


def compile_model(model: keras.Model, cfg: TrainConfig) -> keras.Model:
    """Compile with categorical cross-entropy on logits (the paper's loss; one-hot labels).

    The loss object is what ART's ``KerasClassifier.loss_gradient`` differentiates, so the same
    choice drives training, our FGSM and ART's FGSM.
    """
    model.compile(
        optimizer=make_optimizer(cfg),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=cfg.steps_per_execution,
    )
    return model


def to_art(model: keras.Model):  # -> art.estimators.classification.KerasClassifier
    """Wrap a compiled model as an ART ``KerasClassifier`` on logits with clip values (0, 1)."""
    from art.estimators.classification import KerasClassifier

    return KerasClassifier(model=model, use_logits=True, clip_values=(0.0, 1.0))


def input_shape_of(model: keras.Model) -> tuple[int, ...]:
    """The image shape (H, W, C) a model takes, without the batch axis."""
    return tuple(int(d) for d in model.input_shape[1:])


def n_classes_of(model: keras.Model) -> int:
    """The number of classes a model scores (its last axis)."""
    return int(model.output_shape[-1])


def one_hot(y: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Integer labels → float32 one-hot rows (what categorical cross-entropy expects)."""
    return np.eye(n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


def predict_labels(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted class per image (argmax of the logits), in inference mode."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return np.argmax(logits, axis=1)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` with integer labels."""
    return float(np.mean(predict_labels(model, x, batch_size) == y))
