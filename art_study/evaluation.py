"""Evaluate a trained model: clean accuracy, FGSM per ε with both implementations, cross-check.

Reads top to bottom like RobustBench's ``benchmark``: clean accuracy → for each ε, our FGSM and
ART's FGSM on the same images and labels → accuracies, agreement between the two, throughput.
Every number is returned as a flat ``metric name → value`` dict ready for MLflow, and which test
images each model got right (clean and under our FGSM per ε), for paired per-example tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np
from tqdm.auto import tqdm

from art_study.attacks import FGSM, art_fgsm
from art_study.config import EvaluationConfig
from art_study.models import one_hot, predict_labels, to_art


@dataclass(frozen=True)
class CrossCheck:
    """How far our FGSM and ART's FGSM are from each other on the same inputs."""

    max_abs_diff: float
    pixel_diff_share: float
    prediction_agreement: float


def cross_check(x_ours: np.ndarray, x_art: np.ndarray, pred_ours: np.ndarray,
                pred_art: np.ndarray) -> CrossCheck:
    """Max |Δ| between the adversarial batches, share of differing pixels, share of agreeing
    predictions."""
    diff = np.abs(x_ours - x_art)
    return CrossCheck(
        max_abs_diff=float(diff.max()),
        pixel_diff_share=float(np.mean(diff > 0)),
        prediction_agreement=float(np.mean(pred_ours == pred_art)),
    )


def eps_key(eps: float) -> str:
    """Metric-name suffix for an ε (``0.1`` → ``eps_0.1``)."""
    return f"eps_{eps:g}"


@dataclass
class EvaluationResult:
    """All figures of one evaluation, named as they are logged to MLflow.

    ``correct`` holds one boolean per evaluated image: ``clean`` and ``fgsm_eps_<ε>`` (ours), so
    two models evaluated on the same images can be compared image by image (McNemar's test).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    def fgsm_accuracy(self, eps: float, impl: str = "custom") -> float:
        return self.metrics[f"fgsm_{impl}/accuracy_{eps_key(eps)}"]


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: EvaluationConfig,
             progress: bool = True) -> EvaluationResult:
    """Clean and FGSM accuracy (ours and ART's) on the first ``cfg.n_attack`` test images."""
    if cfg.n_attack is not None:
        x, y = x[: cfg.n_attack], y[: cfg.n_attack]
    y1h = one_hot(y)
    result = EvaluationResult()
    m = result.metrics

    result.correct["clean"] = predict_labels(model, x) == y
    m["clean/accuracy"] = float(np.mean(result.correct["clean"]))
    m["eval/n_images"] = float(len(x))

    ours = FGSM(model, batch_size=cfg.batch_size, progress=progress)
    classifier = to_art(model)
    ours.warm_up()  # trace once so the timings measure throughput, not tracing
    t_ours = t_art = 0.0
    first: np.ndarray | None = None
    for eps in tqdm(cfg.eps, desc="FGSM sweep (ours + ART)", disable=not progress, leave=False):
        k = eps_key(eps)
        t0 = time.perf_counter()
        x_ours = ours.generate(x, y1h, eps)
        t1 = time.perf_counter()
        x_art = art_fgsm(classifier, x, y1h, eps, batch_size=cfg.batch_size)
        t2 = time.perf_counter()
        t_ours, t_art = t_ours + (t1 - t0), t_art + (t2 - t1)
        first = x_ours if first is None else first

        pred_ours, pred_art = predict_labels(model, x_ours), predict_labels(model, x_art)
        result.correct[f"fgsm_{k}"] = pred_ours == y
        m[f"fgsm_custom/accuracy_{k}"] = float(np.mean(result.correct[f"fgsm_{k}"]))
        m[f"fgsm_art/accuracy_{k}"] = float(np.mean(pred_art == y))
        cc = cross_check(x_ours, x_art, pred_ours, pred_art)
        m[f"xcheck/max_abs_diff_{k}"] = cc.max_abs_diff
        m[f"xcheck/pixel_diff_share_{k}"] = cc.pixel_diff_share
        m[f"xcheck/prediction_agreement_{k}"] = cc.prediction_agreement

    # Our FGSM again on the same inputs: on a deterministic model it is bit-identical. When it
    # is not, the model's gradients are randomised (e.g. a gradient-noise layer), and any
    # disagreement with ART above comes from the model, not from either implementation.
    repeat = ours.generate(x, y1h, cfg.eps[0])
    m["xcheck/repeat_max_abs_diff"] = float(np.abs(repeat - first).max())

    n = len(x) * len(cfg.eps)
    m["fgsm_custom/images_per_s"] = n / max(t_ours, 1e-9)
    m["fgsm_art/images_per_s"] = n / max(t_art, 1e-9)
    m["xcheck/max_abs_diff"] = max(m[f"xcheck/max_abs_diff_{eps_key(e)}"] for e in cfg.eps)
    return result
