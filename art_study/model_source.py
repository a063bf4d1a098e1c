"""A model from outside a study, made ready for evaluation: found, loaded safely, checked, and
turned into a logits classifier.

``art-study evaluate MODEL`` accepts a ``.keras`` or ``.h5`` file, an MLflow model URI
(``runs:/<id>/model``, ``models:/<name>/<version or @alias>``) or the id of a run of the
store. Every form ends as one local Keras file, whose sha256 identifies what was evaluated.

Loading never runs code from the file: Keras' ``safe_mode`` stays on (a ``Lambda`` layer
with Python code is refused) unless the user passes ``unsafe=True`` (``--unsafe-load``).

Our attacks and ART's estimator differentiate cross-entropy *on logits*. A model that ends in
a softmax is evaluated on its logits when the softmax is a separable last layer (a ``Dense``
with ``activation="softmax"`` becomes the same ``Dense`` without it, a final ``Softmax`` or
``Activation("softmax")`` layer is dropped); the conversion is checked to give the same
probabilities. A softmax that cannot be separated is evaluated as is, with a warning and the
tag ``gradient_attacks_weakened=true``: the loss then sees saturated probabilities, so
gradient-based attacks are weaker than they should be (Carlini & Wagner 2016).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from art_study.datasets import MNIST, DatasetSpec
from art_study.errors import ArtStudyError

#: The inputs every attack, estimator and diagnostic of art-study assumes: channels last,
#: pixels in [0, 1]; the shape and classes are the dataset's (MNIST's by default).
INPUT_SHAPE = MNIST.input_shape
N_CLASSES = MNIST.n_classes
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
RUN_ID = re.compile(r"[0-9a-f]{32}")
#: At or below this clean accuracy on [0, 1] inputs (chance is 0.1) the model does not
#: classify MNIST in our input format: a model trained on [0, 255] pixels sees near-black
#: images and answers one class. Kept low so that a weak but working model is never refused.
MIN_CLEAN_ACCURACY = 0.25
#: Largest |Δ| between the source's probabilities and softmax(logits) of the converted model.
CONVERSION_TOLERANCE = 1e-4


class ModelError(ArtStudyError):
    """The given model cannot be found, loaded or evaluated as a classifier of the dataset."""


@dataclass(frozen=True)
class ModelSource:
    """What the user named (``spec``), where it resolved to (``uri``: an absolute path or an
    MLflow URI), the local Keras file that was loaded and its sha256."""

    spec: str
    kind: str  # "file", "mlflow" (runs:/ or models:/ URI) or "run" (a run id of the store)
    uri: str
    path: Path
    sha256: str
    run_id: str | None = None  # the store's run the model came from, when known


@dataclass
class PreparedModel:
    """A loaded model ready for :func:`art_study.evaluation.evaluate`: logits out, compiled.

    ``output`` says what the source model returned: ``logits``, ``softmax_removed`` (its
    separable softmax was taken off) or ``probabilities`` (kept: attacks are weakened).
    """

    model: object  # keras.Model (keras is imported lazily: the CLI answers fast without it)
    source: ModelSource
    output: str
    warnings: list[str] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        return {
            "source_model": self.source.uri,
            "source_model_sha256": self.source.sha256,
            "source_model_kind": self.source.kind,
            "source_model_output": self.output,
            "gradient_attacks_weakened": str(self.output == "probabilities").lower(),
            **({"source_run_id": self.source.run_id} if self.source.run_id else {}),
        }


# -- finding the file ----------------------------------------------------------------------------
def locate(spec: str, workdir: Path) -> ModelSource:
    """Resolve ``spec`` (a file, an MLflow model URI or a run id) to a local Keras file in
    ``workdir``. MLflow forms read the store MLflow currently points at."""
    path = Path(spec).expanduser()
    if path.exists():
        return local_file(path.resolve(), spec, "file", str(path.resolve()))
    if spec.startswith(("runs:/", "models:/")):
        return from_mlflow(spec, spec, "mlflow", workdir)
    if RUN_ID.fullmatch(spec):
        return from_run_id(spec, workdir)
    if path.suffix.lower() in KERAS_SUFFIXES or "/" in spec:
        raise ModelError(f"model file {spec} not found")
    raise ModelError(f"{spec!r} is not a model file, an MLflow model URI (runs:/<id>/model, "
                     "models:/<name>/<version>) or a run id")


def local_file(path: Path, spec: str, kind: str, uri: str, run_id: str | None = None
               ) -> ModelSource:
    """A local ``.keras``/``.h5`` file, checked to be the container its suffix claims."""
    if path.is_dir():
        raise ModelError(f"{spec} is a directory, not a .keras or .h5 model file")
    suffix = path.suffix.lower()
    if suffix not in KERAS_SUFFIXES:
        raise ModelError(f"{spec} is not a Keras model file (expected .keras or .h5)")
    import h5py

    ok = zipfile.is_zipfile(path) if suffix == ".keras" else h5py.is_hdf5(path)
    if not ok:
        container = "a zip archive" if suffix == ".keras" else "an HDF5 file"
        raise ModelError(f"{spec} is not a Keras model: not {container}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return ModelSource(spec, kind, uri, path, digest.hexdigest(), run_id)


def from_run_id(run_id: str, workdir: Path) -> ModelSource:
    """The model logged by run ``run_id`` of the store (``runs:/<id>/model``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelError(f"no run {run_id} in the store {mlflow.get_tracking_uri()}") from None
        raise ModelError(f"cannot read run {run_id}: {_first_line(exc)}") from None
    return from_mlflow(f"runs:/{run_id}/model", run_id, "run", workdir, run_id=run_id)


def from_mlflow(uri: str, spec: str, kind: str, workdir: Path,
                run_id: str | None = None) -> ModelSource:
    """Download an MLflow Keras model and return its ``.keras`` file.

    The file is loaded by :func:`load` with ``safe_mode``; ``mlflow.keras.load_model`` is
    not used because it gives no control over that.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if run_id is None and uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                         dst_path=str(workdir)))
    except MlflowException as exc:
        raise ModelError(f"cannot fetch the model {uri}: {_first_line(exc)}") from None
    except OSError as exc:
        raise ModelError(f"cannot fetch the model {uri}: {exc.strerror or exc}") from None
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise ModelError(f"{uri} is not an MLflow model (no MLmodel file)")
    import yaml

    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    if "keras" not in flavors:
        raise ModelError(f"{uri} is an MLflow model without the keras flavor "
                         f"(flavors: {', '.join(flavors) or 'none'})")
    files = sorted((local / flavors["keras"].get("data", "data")).glob("*.keras"))
    if not files:
        raise ModelError(f"{uri} holds no .keras file (a SavedModel export cannot be attacked "
                         "through its gradients here)")
    return local_file(files[0], spec, kind, uri, run_id)


# -- loading ------------------------------------------------------------------------------------
def load(source: ModelSource, *, unsafe: bool = False):
    """Load the file with Keras' ``safe_mode`` (unless ``unsafe``), uncompiled.

    art-study's own custom layers (the gradient-masking defense's) are registered first, so
    models of this project's runs load; any other custom class is refused by name.
    """
    import keras

    import art_study.defenses  # noqa: F401  (registers UnitMask and GradientNoise)

    try:
        return keras.saving.load_model(source.path, compile=False, safe_mode=not unsafe)
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError, KeyError...
        text = str(exc)
        if "safe_mode=False" in text:
            raise ModelError(f"{source.spec} contains Python code (a Lambda layer) that loading "
                             "would run; refused. If you trust the file, pass --unsafe-load"
                             ) from None
        unknown = _unknown_classes(source.path) or re.findall(r"Unknown \w+: '([^']+)'", text)
        if unknown:
            raise ModelError(f"{source.spec} uses custom classes art-study cannot rebuild "
                             f"safely: {', '.join(sorted(set(unknown)))}") from None
        raise ModelError(f"{source.spec} is not a loadable Keras model: "
                         f"{_first_line(exc)}") from None


def _unknown_classes(path: Path) -> list[str]:
    """Classes named in a ``.keras`` file's config that Keras does not know (custom layers)."""
    if path.suffix.lower() != ".keras":
        return []
    import keras

    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            module, name = node.get("module"), node.get("class_name")
            if isinstance(module, str) and isinstance(name, str) and not module.startswith(
                    "keras"):
                registered = node.get("registered_name") or name
                if keras.saving.get_registered_object(registered) is None:
                    found.append(registered)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


# -- making it a logits classifier of our inputs -------------------------------------------------
def prepare(model, source: ModelSource, x_probe: np.ndarray, y_probe: np.ndarray,
            dataset: DatasetSpec = MNIST) -> PreparedModel:
    """Check the input and output shapes against ``dataset``, take a separable softmax off,
    check the model classifies ``x_probe`` (its test images in [0, 1]) and compile it for the
    attacks."""
    from art_study.config import TrainConfig
    from art_study.models import compile_model

    check_shapes(model, source.spec, dataset)
    prepared = to_logits(model, source, x_probe)
    check_input_scale(prepared.model, source.spec, x_probe, y_probe, dataset)
    compile_model(prepared.model, TrainConfig())
    return prepared


def check_shapes(model, spec: str, dataset: DatasetSpec = MNIST) -> None:
    """One input of the dataset's shape (MNIST: 28×28×1) and one score per class, or a
    one-line refusal.

    A 28×28 input without the channel axis is refused too rather than wrapped in a Reshape:
    the evaluated model would then not be the file's, and its sha256 would not describe it.
    """
    if getattr(model, "inputs", None) is None or getattr(model, "outputs", None) is None:
        raise ModelError(f"{spec} is a subclassed model without a graph of layers; save it as "
                         "a Sequential or functional Keras model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{spec} has {len(model.inputs)} inputs and {len(model.outputs)} "
                         "outputs; art-study evaluates one image input and one output")
    shape = tuple(model.inputs[0].shape[1:])
    want, name = tuple(dataset.input_shape), _display(dataset)
    if shape != want:
        h, w, c = want
        channels = "one channel" if c == 1 else f"{c} channels"
        raise ModelError(f"{spec} takes inputs of shape {shape}; art-study evaluates {name} as "
                         f"{want} ({h}×{w}, {channels} last, pixels in [0, 1])")
    out = tuple(model.outputs[0].shape[1:])
    if out != (dataset.n_classes,):
        raise ModelError(f"{spec} outputs shape {out}; a {name} classifier outputs "
                         f"({dataset.n_classes},) scores")


def _display(dataset: DatasetSpec) -> str:
    return {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}.get(
        dataset.name, "the local dataset")


def _is_softmax(fn: object) -> bool:
    import keras

    return fn is keras.activations.softmax or getattr(fn, "__name__", "") == "softmax"


def to_logits(model, source: ModelSource, x_probe: np.ndarray) -> PreparedModel:
    """The model on logits: its final softmax removed where it is a separable last layer."""
    import keras

    last = model.outputs[0]._keras_history.operation
    is_layer_softmax = isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and _is_softmax(last.activation))
    has_softmax_activation = not is_layer_softmax and _is_softmax(getattr(last, "activation",
                                                                          None))
    if is_layer_softmax or has_softmax_activation:
        if is_layer_softmax:
            logits = last.input
        else:
            linear = type(last).from_config({**last.get_config(), "activation": "linear",
                                             "name": f"{last.name}_logits"})
            logits = linear(last.input)
            linear.set_weights(last.get_weights())
        converted = keras.Model(model.inputs, logits, name=f"{model.name}_logits")
        probs = model.predict(x_probe, verbose=0)
        again = keras.ops.convert_to_numpy(keras.ops.softmax(converted.predict(x_probe,
                                                                               verbose=0)))
        diff = float(np.abs(probs - again).max())
        if diff > CONVERSION_TOLERANCE:  # a bug here, not the user's: keep the traceback
            raise RuntimeError(f"logits conversion of {source.spec} changed its outputs "
                               f"(max |Δ| {diff:.2g})")
        return PreparedModel(converted, source, "softmax_removed")
    probs = model.predict(x_probe, verbose=0)
    if np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        return PreparedModel(model, source, "probabilities", [
            f"{source.spec} outputs probabilities from a softmax that is not a separable last "
            "layer: evaluated as is, gradient-based attacks are weakened (saturated softmax); "
            "save the model without its softmax for a sound evaluation"])
    return PreparedModel(model, source, "logits")


def check_input_scale(model, spec: str, x: np.ndarray, y: np.ndarray,
                      dataset: DatasetSpec = MNIST) -> None:
    """Refuse a model that does not classify the dataset in [0, 1], naming the scale it wants:
    [0, 255], [-1, 1], or standardised by the test images' own per-channel mean and standard
    deviation (for MNIST these are the usual 0.1307 and 0.3081)."""
    def acc(inputs: np.ndarray) -> float:
        return float(np.mean(np.argmax(model.predict(inputs, verbose=0), axis=1) == y))

    clean = acc(x)
    if clean > MIN_CLEAN_ACCURACY:
        return
    mean, std = _channel_stats(x, dataset)
    text = ", ".join(f"{m:.4f}" for m in mean), ", ".join(f"{s:.4f}" for s in std)
    scales = {"[0, 255]": x * 255.0, "[-1, 1]": x * 2.0 - 1.0,
              f"standardised (x - {text[0]}) / {text[1]}": (x - mean) / std}
    better = {name: acc(v) for name, v in scales.items()}
    name, best = max(better.items(), key=lambda kv: kv[1])
    hint = (f"; it scores {best:.0%} on pixels {name}: rescale inside the model"
            if best > MIN_CLEAN_ACCURACY and best > clean + 0.2 else "")
    raise ModelError(f"{spec} classifies only {clean:.0%} of {len(x)} {_display(dataset)} test "
                     f"images with pixels in [0, 1] (the input art-study attacks){hint}")


#: The published normalisation of each dataset (per channel), the scale a model trained with
#: the usual torchvision or Keras recipe expects; a local dataset's comes from its images.
NORMALISATION = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,)),
                 "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


def _channel_stats(x: np.ndarray, dataset: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation: the dataset's published ones, else ``x``'s."""
    if dataset.name in NORMALISATION:
        mean, std = NORMALISATION[dataset.name]
        return np.array(mean, np.float32), np.array(std, np.float32)
    return (x.mean(axis=(0, 1, 2)).astype(np.float32),
            np.maximum(x.std(axis=(0, 1, 2)), 1e-6).astype(np.float32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
