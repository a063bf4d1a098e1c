"""The image datasets art-study knows: shape, classes and ε budgets (no data, no numpy).

A study is the same on every dataset; what changes is the input shape the CNN is built for, the
classes it tells apart and the L∞ budgets it is attacked at. Each :class:`DatasetSpec` carries
those, with the field's usual budget as its headline ε (MNIST 0.3, Madry et al. 2018;
Fashion-MNIST 0.1; CIFAR-10 8/255, the RobustBench and AutoAttack budget). Pixels are always
in [0, 1]. Loading the data is :mod:`art_study.data`; this module is what the config, the
models and the evaluation need to know about a dataset without loading it.

ε values may be written as fractions (``8/255``) in configs and ``--set`` values:
:func:`parse_eps` turns them into floats, and :func:`eps_text` writes a float back the short
way when it round-trips (``0.1``) and exactly otherwise (``0.03137254901960784``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator

#: A dataset given by ``data.path`` (an npz or an IDX directory): shape and classes from its
#: arrays, MNIST's ε grid unless the config sets one.
LOCAL = "local"

_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_eps(value: Any) -> Any:
    """``"8/255"`` → 8/255 as a float; anything else is left for pydantic's float check."""
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            num, den = float(match.group(1)), float(match.group(2))
            if den == 0:
                raise ValueError(f"ε {value!r} divides by zero")
            return num / den
    return value


#: A float ε that may be written as a fraction (``8/255``).
Eps = Annotated[float, BeforeValidator(parse_eps)]


def eps_text(eps: float) -> str:
    """ε as it appears in metric names: ``%g`` when that reads back as the same float (every
    decimal budget: ``0.1``, ``0.3``), else the shortest exact form (``8/255`` →
    ``0.03137254901960784``), so a metric name always parses back to the ε it was run at."""
    short = f"{eps:g}"
    return short if math.isfinite(eps) and float(short) == eps else repr(float(eps))


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is to the study: input shape (H, W, C), class names and ε budgets."""

    name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    eps: tuple[float, ...]  # the default ε grid of the FGSM sweep
    headline_eps: float  # the budget results are compared at
    eps_written: str  # the headline as people write it (``0.3``, ``8/255``)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


DIGITS = tuple(str(d) for d in range(10))

MNIST = DatasetSpec("mnist", (28, 28, 1), DIGITS,
                    (0.05, 0.1, 0.15, 0.2, 0.25, 0.3), 0.3, "0.3")
FASHION_MNIST = DatasetSpec(
    "fashion_mnist", (28, 28, 1),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
     "Ankle boot"),
    (0.025, 0.05, 0.075, 0.1, 0.15, 0.2), 0.1, "0.1")
CIFAR10 = DatasetSpec(
    "cifar10", (32, 32, 3),
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255), 8 / 255, "8/255")

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (MNIST, FASHION_MNIST, CIFAR10)}


def local_spec(input_shape: tuple[int, int, int], n_classes: int) -> DatasetSpec:
    """The spec of a local dataset: its own shape and class count, MNIST's budgets."""
    return DatasetSpec(LOCAL, input_shape, tuple(str(c) for c in range(n_classes)),
                       MNIST.eps, MNIST.headline_eps, MNIST.eps_written)


def dataset_evaluation(spec: DatasetSpec, evaluation: dict[str, Any]) -> dict[str, Any]:
    """An MNIST ``evaluation:`` mapping moved to ``spec``'s budgets: the sweep becomes the
    dataset's grid, an attack at MNIST's headline 0.3 runs at the dataset's headline, and one at
    another MNIST grid value at the dataset's grid value of the same rank."""
    if spec.eps == MNIST.eps:
        return evaluation
    rank = dict(zip(MNIST.eps, spec.eps, strict=False))
    rank[MNIST.headline_eps] = spec.headline_eps

    def move(values: list[float]) -> list[float]:
        return sorted({rank.get(float(e), e) for e in values})

    out = {**evaluation, "eps": list(spec.eps)}
    out["attacks"] = [{**a, "eps": move(a["eps"])} if a.get("eps") else a
                      for a in evaluation.get("attacks", [])]
    return out
