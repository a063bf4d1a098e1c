"""ART's ``KerasClassifier`` with its gradients compiled: the estimator strong attacks and
adversarial training run through.

ART 1.20's ``KerasClassifier`` runs every gradient eagerly and, worse, computes
``compute_loss(reduction="none")`` one image at a time and ``class_gradient`` as a full
``batch_jacobian``; ``fit`` goes through ``model.fit`` even for the single batch that
``AdversarialTrainer`` passes it. On a 2-core CPU that makes APGD about 20× PGD's cost per
iteration, C&W L∞ unfinishable and ART's adversarial training several plain epochs per epoch
(measured in ``benchmarks/``). :class:`CompiledKerasClassifier` keeps ART's class, API and
semantics (it *is* a ``KerasClassifier``: every ART attack and trainer accepts it) and replaces
those four methods with ``tf.function``-traced equivalents with fixed input signatures, so they
trace once per model. ``tests/test_estimator.py`` checks each against ART's own on the same model.

Only the configuration art-study builds is compiled — logits out, categorical cross-entropy,
no ART preprocessing — and anything else falls back to ART's implementation, so the subclass
can never silently compute a different quantity.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from art.estimators.classification import KerasClassifier
from art.utils import check_and_transform_label_format

from art_study.models import input_shape_of, n_classes_of


def dlr_loss(y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Croce & Hein (2020)'s difference-of-logits ratio, per image (larger = closer to wrong):
    ``-(z_y - max_{i≠y} z_i) / (z_(1) - z_(3))``, with ``z_(k)`` the k-th largest logit.

    It is invariant to the logits' scale, which is what defeats the saturated softmax of
    defensive distillation that starves cross-entropy gradients.
    """
    z_y = tf.reduce_sum(y * logits, axis=1)
    z_other = tf.reduce_max(logits - 1e9 * y, axis=1)
    top = tf.math.top_k(logits, k=3).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


class CompiledKerasClassifier(KerasClassifier):
    """``KerasClassifier(model, use_logits=True, clip_values=(0, 1))`` with compiled gradients.

    ``loss="dlr"`` makes ``loss_gradient``/``compute_loss`` use :func:`dlr_loss` instead of the
    model's cross-entropy: ART's APGD with ``loss_type=None`` then runs APGD-DLR on a
    ``KerasClassifier`` (ART builds its own DLR loss only on a ``TensorFlowV2Classifier``,
    through uncompiled eager calls). Training (``fit``) always uses the model's own loss.
    """

    def __init__(self, model: keras.Model, loss: str = "ce"):
        super().__init__(model=model, use_logits=True, clip_values=(0.0, 1.0))
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss_name = loss
        self._compiled = (
            isinstance(model.loss, keras.losses.CategoricalCrossentropy)
            and model.loss.get_config().get("from_logits", False)
            and len(model.input_shape) == 4
            and self.preprocessing_defences is None
            and self.postprocessing_defences is None
        )
        if loss == "dlr" and not self._compiled:
            raise ValueError("the DLR loss needs a model compiled with cross-entropy on logits")
        ce_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        ce = dlr_loss if loss == "dlr" else ce_fn
        x_spec = tf.TensorSpec((None, *input_shape_of(model)), tf.float32)
        y_spec = tf.TensorSpec((None, n_classes_of(model)), tf.float32)

        @tf.function(input_signature=[x_spec, y_spec])
        def per_image_loss(x, y):
            return ce(y, model(x, training=False))

        def make_loss_gradient(training: bool):
            @tf.function(input_signature=[x_spec, y_spec])
            def loss_gradient(x, y):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = tf.reduce_sum(ce(y, model(x, training=training)))
                return tape.gradient(loss, x)

            return loss_gradient

        @tf.function(input_signature=[x_spec, tf.TensorSpec((None,), tf.int32)])
        def label_gradient(x, labels):
            # d logit[label_i] / d x_i for every image at once: images are independent in
            # inference mode, so the gradient of the sum is each image's own gradient.
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = model(x, training=False)
                picked = tf.gather(logits, labels, axis=1, batch_dims=1)
            return tape.gradient(picked, x)

        @tf.function(input_signature=[x_spec])
        def jacobian(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = model(x, training=False)
            return tape.batch_jacobian(logits, x)

        self._per_image_loss = per_image_loss
        self._loss_gradient_fn = {False: make_loss_gradient(False), True: make_loss_gradient(True)}
        self._label_gradient = label_gradient
        self._jacobian = jacobian

    # -- gradients and losses -------------------------------------------------------------------
    def _onehot(self, y: np.ndarray) -> tf.Tensor:
        y = check_and_transform_label_format(y, nb_classes=self.nb_classes)
        return tf.constant(np.asarray(y, dtype=np.float32))

    def loss_gradient(self, x: np.ndarray, y: np.ndarray, training_mode: bool = False,
                      **kwargs) -> np.ndarray:
        if not self._compiled:
            return super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
        fn = self._loss_gradient_fn[bool(training_mode)]
        grad = fn(tf.constant(x, tf.float32), self._onehot(y)).numpy()
        return grad.astype(x.dtype, copy=False)

    def compute_loss(self, x: np.ndarray, y: np.ndarray, reduction: str = "none",
                     **kwargs) -> np.ndarray:
        if not self._compiled:
            return super().compute_loss(x, y, reduction=reduction, **kwargs)
        losses = self._per_image_loss(tf.constant(x, tf.float32), self._onehot(y)).numpy()
        if reduction == "none":
            return losses
        if reduction == "mean":
            return np.float32(losses.mean())
        if reduction == "sum":
            return np.float32(losses.sum())
        raise ValueError(f"unknown reduction {reduction!r} (none, mean, sum)")

    def class_gradient(self, x: np.ndarray, label=None, training_mode: bool = False,
                       **kwargs) -> np.ndarray:
        if not self._compiled or training_mode:
            return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
        xt = tf.constant(x, tf.float32)
        if label is None:
            return self._jacobian(xt).numpy()
        if isinstance(label, int | np.integer):
            if not 0 <= label < self.nb_classes:
                raise ValueError(f"Label {label} is out of range.")
            labels = np.full(len(x), label, dtype=np.int32)
        else:
            labels = np.asarray(label)
            if labels.ndim != 1 or labels.shape[0] != len(x) or (labels >= self.nb_classes).any():
                raise ValueError(f"Label {label} is out of range.")
            labels = labels.astype(np.int32)
        return self._label_gradient(xt, tf.constant(labels))[:, None].numpy()

    # -- training: the single batches AdversarialTrainer passes ---------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray, batch_size: int = 128, nb_epochs: int = 20,
            verbose: bool = False, **kwargs) -> None:
        """One ``train_on_batch`` step when ``x`` is a single batch trained for one epoch.

        ``AdversarialTrainer`` calls ``fit`` once per mixed batch; ``model.fit`` then builds a
        data adapter, an epoch loop and callbacks around one optimizer step (~0.1 s on a CPU).
        The step itself is the same compiled ``train_function``. Callbacks passed by the caller
        see ``on_train_batch_end`` with the batch's logs, as they would under ``model.fit``.
        """
        single = nb_epochs == 1 and len(x) <= batch_size and set(kwargs) <= {"callbacks"}
        if not (self._compiled and single):
            return super().fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs,
                               verbose=verbose, **kwargs)
        y1h = np.asarray(check_and_transform_label_format(y, nb_classes=self.nb_classes),
                         dtype=np.float32)
        logs = self._model.train_on_batch(x, y1h, return_dict=True)
        callbacks = kwargs.get("callbacks") or []
        for cb in callbacks:
            cb.set_model(self._model)
            cb.on_train_batch_end(0, logs)


def to_tensorflow_v2(model: keras.Model):
    """ART's ``TensorFlowV2Classifier`` on the same Keras model (logits, CE, clip (0, 1)).

    APGD's DLR loss and AutoAttack build their losses only on this estimator; it wraps the very
    same model object, so every attack still sees the weights the study trained.
    """
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=model, nb_classes=n_classes_of(model), input_shape=input_shape_of(model),
        loss_object=keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )


class Estimators(dict):
    """The ART estimators an attack may ask for by kind, all on the very same Keras model, each
    built the first time it is asked for (and kept: its compiled functions trace once).

    ``keras``: :class:`CompiledKerasClassifier` on cross-entropy; ``keras-dlr``: the same on the
    DLR loss; ``tensorflow``: ART's ``TensorFlowV2Classifier`` (:func:`to_tensorflow_v2`).
    """

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.model = model

    def __missing__(self, kind: str):
        makers = {"keras": lambda: CompiledKerasClassifier(self.model),
                  "keras-dlr": lambda: CompiledKerasClassifier(self.model, loss="dlr"),
                  "tensorflow": lambda: to_tensorflow_v2(self.model)}
        self[kind] = makers[kind]()
        return self[kind]
