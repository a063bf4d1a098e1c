"""What a run's page in the MLflow UI shows: its robustness at a glance.

Every run that evaluates a model (a study's child, ``art-study evaluate``, the
``art-robustness`` evaluator) calls :func:`log_run_page` once, inside the run, after its
metrics. It logs

- ``robustness/curve.png``: accuracy against ε for each attack, and the per-image worst case;
- ``robustness/attacks.json``: the same points as an MLflow table (``mlflow.log_table``), which
  the artifact view shows as a table;
- the data as an MLflow dataset input (``mlflow.log_input``), its digest the data's
  fingerprint (:mod:`art_study.data`), so the page no longer says "Datasets: None";
- the description (``mlflow.note.content``): one line, clean accuracy, the worst case at the
  headline ε and the gradient-masking verdict.

The figures come from the run's metrics and tags through one function,
:func:`curve_points`: the only place that knows how an evaluation's results are named.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import pandas as pd

CURVE_ARTIFACT = "robustness/curve.png"
TABLE_ARTIFACT = "robustness/attacks.json"
NOTE_TAG = "mlflow.note.content"
WORST_CASE = "worst case"
#: MLflow's stores keep a dataset digest in 36 characters; the full fingerprint goes into the
#: input's tags.
DIGEST_CHARS = 36

# <attack>/accuracy_eps_<ε>, the attack one or two path parts (fgsm_custom, attack/pgd)
_ACCURACY = re.compile(r"^(fgsm_custom|fgsm_art|robust|(?:attack|transfer)/[^/]+)"
                       r"/accuracy_eps_([0-9.e+-]+)$")
_NAMES = {"fgsm_custom": "FGSM (ours)", "fgsm_art": "FGSM (ART)", "robust": WORST_CASE}


@dataclass(frozen=True)
class DataRef:
    """The data a run was trained and evaluated on, as an MLflow dataset input."""

    name: str  # e.g. "mnist"
    source: str  # a path, a URL, or where the arrays came from
    fingerprint: str  # sha256 over the arrays used (art_study.data)
    context: str = "evaluation"  # MLflow's input context: training, evaluation


def dataset_name(data_config: object) -> str:
    """The dataset's name on the run page: the config's ``data.name``."""
    return getattr(data_config, "name", None) or "mnist"


def attacked_eps(metrics: dict[str, float]) -> set[float]:
    """The ε at which one of the config's attacks (PGD, APGD, Square, AutoAttack, ...) ran.

    Only there is the logged worst case (``robust/accuracy_eps_<ε>``) more than FGSM and its
    transfer: at an ε of the FGSM sweep alone it is a single-step attack again, and shown as
    "worst case" beside a real one it reads as if robustness came back at a larger ε (a
    Fashion-MNIST sweep to 0.2 with the attacks at 0.1 would headline FGSM at 0.2). The
    report applies the same rule (:func:`art_study.report.tables.attacked_eps`)."""
    found = (_ACCURACY.match(key) for key in metrics)
    return {float(m.group(2)) for m in found if m and m.group(1).startswith("attack/")}


def curve_points(metrics: dict[str, float]) -> pd.DataFrame:
    """Accuracy per attack and ε: columns ``attack`` (as shown), ``key`` (as in metric names:
    ``fgsm_custom``, ``pgd``, ``transfer/fgsm``, ``robust``), ``eps``, ``accuracy``,
    ``n_images``.

    FGSM (ours and ART's), each configured and transfer attack, and the worst case over them
    (``attack`` = :data:`WORST_CASE`) at the ε where a configured attack ran
    (:func:`attacked_eps`); the diagnostics' checks and cascade components are left out. Rows
    in the order the metrics were logged, ε ascending within an attack.
    """
    attacked = attacked_eps(metrics)
    rows = []
    for key, value in metrics.items():
        found = _ACCURACY.match(key)
        if not found:
            continue
        name, eps = found.groups()
        if name == "robust" and float(eps) not in attacked:
            continue
        key = name.removeprefix("attack/")
        rows.append({"attack": _NAMES.get(name, key), "key": key, "eps": float(eps),
                     "accuracy": float(value), "n_images": _n_images(metrics, name, eps)})
    table = pd.DataFrame(rows, columns=["attack", "key", "eps", "accuracy", "n_images"])
    first = table["attack"].map({a: i for i, a in enumerate(dict.fromkeys(table["attack"]))})
    return table.iloc[sorted(range(len(table)), key=lambda i: (first[i], table["eps"][i]))
                      ].reset_index(drop=True)


def _n_images(metrics: dict[str, float], name: str, eps: str) -> float:
    """How many images the accuracy is over (``nan`` when the run does not say)."""
    key = {"fgsm_custom": "eval/n_images", "fgsm_art": "xcheck/n_images",
           "robust": f"robust/n_images_eps_{eps}"}.get(name, f"{name}/n_images")
    return float(metrics.get(key, float("nan")))


def headline(points: pd.DataFrame) -> tuple[float, float] | None:
    """The headline: the worst case at the largest ε a configured attack ran at, as
    ``(ε, accuracy)``; ``None`` when no attack beyond FGSM ran."""
    worst = points[points["attack"] == WORST_CASE]
    if worst.empty:
        return None
    top = worst.loc[worst["eps"].idxmax()]
    return float(top["eps"]), float(top["accuracy"])


def masking_verdict(tags: dict[str, str]) -> str:
    """``suspected``, ``not suspected`` or ``not checked`` (diagnostics off)."""
    suspected = tags.get("gradient_masking_suspected")
    if suspected is None:
        return "not checked"
    return "suspected" if suspected == "true" else "not suspected"


def summary_line(metrics: dict[str, float], tags: dict[str, str]) -> str:
    """The run's description: clean accuracy, worst case at the headline ε, masking."""
    parts = [f"clean accuracy {metrics['clean/accuracy']:.4f}"]
    top = headline(curve_points(metrics))
    if top is not None:
        parts.append(f"worst case {top[1]:.4f} at ε={top[0]:g}")
    parts.append(f"gradient masking {masking_verdict(tags)}")
    return "; ".join(parts)


def curve_figure(points: pd.DataFrame):
    """Accuracy against ε, one line per attack (a marker where it ran at one ε), the worst
    case bold and black."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for attack, group in points.groupby("attack", sort=False):
        worst = attack == WORST_CASE
        ax.plot(group["eps"], group["accuracy"], marker="o", label=attack,
                color="black" if worst else None, linewidth=3 if worst else 1.5,
                zorder=3 if worst else 2)
    ax.set(xlabel="ε (L∞)", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Robustness: accuracy under attack")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig


def log_dataset(data: DataRef) -> None:
    """The data as the run's dataset input, digest = its fingerprint (cut to the store's
    column), the full fingerprint in the input's tags."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(data.source)
    except Exception:  # not a path or URL MLflow knows (e.g. "keras-download")
        from mlflow.data.code_dataset_source import CodeDatasetSource

        source = CodeDatasetSource({"origin": data.source})
    dataset = MetaDataset(source, name=data.name, digest=data.fingerprint[:DIGEST_CHARS])
    mlflow.log_input(dataset, context=data.context, tags={"fingerprint": data.fingerprint})


def log_run_page(metrics: dict[str, float], tags: dict[str, str], data: DataRef) -> None:
    """Everything :mod:`art_study.run_page` promises, into the active run."""
    import mlflow

    points = curve_points(metrics)
    mlflow.log_table(points, TABLE_ARTIFACT)
    mlflow.log_figure(curve_figure(points), CURVE_ARTIFACT)
    log_dataset(data)
    mlflow.set_tag(NOTE_TAG, summary_line(metrics, tags))
