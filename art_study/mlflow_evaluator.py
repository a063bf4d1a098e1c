"""``art-robustness``: art-study's evaluation as an MLflow evaluator plugin.

Registered through MLflow's ``mlflow.model_evaluator`` entry point (``pyproject.toml``), so
that::

    mlflow.models.evaluate("runs:/<id>/model", df, targets="label", model_type="classifier",
                           evaluators=["art-robustness"],
                           evaluator_config={"art-robustness": {"config": "configs/paper.yaml"}})

runs the evaluation ``art-study evaluate`` runs (clean, FGSM ours and ART's, the configured
attacks, the diagnostics) on the given rows and logs the same metric names, tags and
gradient-masking verdict into MLflow's run, through the same
:func:`art_study.evaluate_model.evaluate_in_run`.

``evaluator_config`` is ``{"config": PATH}`` (the ``evaluation:`` section and ``seed`` of that
config file) or ``{"evaluation": {...}}`` (the section inline; seed 0, or ``"seed"``). Without
either, the paper study's evaluation. Transfer attacks need a model to craft them on and are
skipped here, as ``art-study evaluate`` does without ``--transfer-from``.

MLflow hands over a pyfunc model and 2-D data (one image per row): the Keras model is reached
through the pyfunc wrapper (``get_raw_model``), each row reshaped to the model's input shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np
from mlflow.models.evaluation import ModelEvaluator
from mlflow.models.evaluation.base import EvaluationResult

from art_study.errors import ArtStudyError

log = logging.getLogger(__name__)

NAME = "art-robustness"
CONFIG_KEYS = {"config", "evaluation", "seed"}


class EvaluatorError(ArtStudyError):
    """The model, the data or the ``evaluator_config`` cannot be evaluated."""


def experiment_config(evaluator_config: dict | None):
    """The config an ``evaluator_config`` names: a file's, an inline ``evaluation`` section,
    or the paper study's evaluation. Refuses unknown keys and both forms at once."""
    from art_study.config import config_from_mapping
    from art_study.evaluate_model import PAPER_EVALUATION, evaluation_config

    given = dict(evaluator_config or {})
    given.pop("col_mapping", None)  # MLflow's own key, read by mlflow.models.evaluate
    unknown = sorted(set(given) - CONFIG_KEYS)
    if unknown:
        raise EvaluatorError(f"{NAME}: unknown evaluator_config keys {unknown}; give "
                             "{'config': PATH} or {'evaluation': {...}}")
    if "config" in given and "evaluation" in given:
        raise EvaluatorError(f"{NAME}: evaluator_config takes 'config' or 'evaluation', not both")
    if "config" in given:
        cfg = evaluation_config(Path(given["config"]), [])
        return cfg if "seed" not in given else cfg.model_copy(update={"seed": given["seed"]})
    raw = {"name": NAME, "seed": given.get("seed", 0),
           "evaluation": given.get("evaluation", PAPER_EVALUATION)}
    return config_from_mapping(raw, "evaluator_config")


def keras_model_of(model):
    """The Keras model behind MLflow's pyfunc wrapper, or a one-line refusal."""
    import keras

    try:
        raw = model.get_raw_model()
    except (AttributeError, NotImplementedError):
        raw = None
    if not isinstance(raw, keras.Model):
        flavor = getattr(getattr(model, "metadata", None), "flavors", None) or {}
        raise EvaluatorError(f"{NAME} evaluates Keras models; this model is "
                             f"{type(raw or model).__name__} (flavors: "
                             f"{', '.join(flavor) or 'unknown'}): log it with mlflow.keras")
    return raw


def images_of(features, model) -> np.ndarray:
    """The 2-D rows MLflow passes, reshaped to the model's input shape, as float32 in [0, 1]."""
    x = np.asarray(features.to_numpy() if hasattr(features, "to_numpy") else features,
                   dtype=np.float32)
    shape = tuple(model.inputs[0].shape[1:])
    size = int(np.prod(shape))
    if x.ndim != 2 or x.shape[1] != size:
        raise EvaluatorError(f"{NAME}: the data has rows of {x.shape[1:]} values; the model "
                             f"takes {shape} images, {size} values per row")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise EvaluatorError(f"{NAME}: pixel values span {x.min():g}..{x.max():g}; art-study "
                             "attacks images with pixels in [0, 1]")
    return x.reshape((len(x), *shape))


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """The data's fingerprint as :mod:`art_study.data` computes it: over the uint8 images and
    the labels."""
    from art_study.data import data_fingerprint

    pixels = np.rint(x[..., 0] * 255 if x.shape[-1] == 1 else x * 255).astype(np.uint8)
    return data_fingerprint(pixels, y)


def weights_sha256(model) -> str:
    """sha256 over the model's weights: what was evaluated (no file exists here to hash)."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


class ArtRobustnessEvaluator(ModelEvaluator):
    """art-study's robustness evaluation of a Keras image classifier."""

    name = NAME

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type == "classifier"

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None,
                 extra_metrics=None, custom_artifacts=None, predictions=None,
                 **kwargs) -> EvaluationResult:
        import mlflow

        from art_study.evaluate_model import evaluate_in_run
        from art_study.model_source import ModelSource, prepare
        from art_study.run_page import DataRef
        from art_study.tracking import environment_tags

        cfg = experiment_config(evaluator_config)
        if model is None:
            raise EvaluatorError(f"{NAME} attacks the model itself: pass a model, not "
                                 "predictions")
        keras_model = keras_model_of(model)
        if not dataset.has_targets:
            raise EvaluatorError(f"{NAME} needs the labels: pass targets=")
        x = images_of(dataset.features_data, keras_model)
        y = np.asarray(dataset.labels_data).astype(np.int64)
        uri = model_uri(model)
        source = ModelSource(uri, "pyfunc", uri, Path(), weights_sha256(keras_model),
                             getattr(model.metadata, "run_id", None))
        prepared = prepare(keras_model, source, x[:500], y[:500])
        for warning in prepared.warnings:
            log.warning(warning)
        tags = {**environment_tags(), **prepared.tags(), "art_study.role": "evaluation",
                "evaluation_only": "true", "art_study.evaluator": NAME,
                "data.source": "mlflow.models.evaluate", "data.fingerprint": fingerprint(x, y)}
        if cfg.evaluation.transfer:
            tags["transfer"] = "skipped: the evaluator has no model to craft the examples on"
        active = mlflow.active_run()
        with (contextlib.nullcontext() if active and active.info.run_id == run_id
              else mlflow.start_run(run_id=run_id)):
            mlflow.set_tags(tags)
            mlflow.log_dict(cfg.model_dump(mode="json", include={"seed", "evaluation"}),
                            f"{NAME}/config.yaml")
            metrics, _ = evaluate_in_run(
                prepared.model, x, y, cfg, tags,
                DataRef(dataset.name or "evaluation data", "mlflow.models.evaluate",
                        tags["data.fingerprint"]), progress=False)
        return EvaluationResult(metrics=metrics, artifacts={})


def model_uri(model) -> str:
    """Where the pyfunc model came from, as an MLflow URI, as far as it says."""
    meta = getattr(model, "metadata", None)
    model_id = getattr(model, "model_id", None) or getattr(meta, "model_id", None)
    if model_id:
        return f"models:/{model_id}"
    run_id, path = getattr(meta, "run_id", None), getattr(meta, "artifact_path", None)
    return f"runs:/{run_id}/{path}" if run_id and path else "(a pyfunc model in memory)"
