"""The report's figures: robustness curves, accuracy vs depth, and the adversarial examples.

Each plot is a function writing one PNG with an Agg figure (no pyplot state);
:func:`draw_figures` draws them all and gives each a caption, which ``document.py`` places in
order. Adding a plot touches this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from art_study.errors import ArtStudyError
from art_study.evaluation import eps_key
from art_study.report.reading import StudyData, metric_names
from art_study.report.tables import (
    CONTROL,
    PAPER_CLEAN,
    PAPER_CONTROL_FGSM,
    PAPER_FGSM,
    Comparison,
    lookup,
    sequence_order,
)

N_EXAMPLES = 8


@dataclass(frozen=True)
class Drawn:
    """A figure written to ``path`` and its caption; for an optional figure that could not be
    drawn, ``path`` is None and ``caption`` says why."""

    path: Path | None
    caption: str


def draw_figures(data: StudyData, summary: pd.DataFrame, cmp: Comparison, out_dir: Path,
                 data_dir: str | None, examples: bool) -> list[Drawn]:
    """Robustness curves per depth, accuracy vs depth, and the adversarial examples grid."""
    drawn = []
    order = sequence_order(data.status)
    for depth in sorted(data.scores["depth"].unique()):
        path = out_dir / f"robustness_depth{depth}.png"
        plot_robustness(summary, int(depth), order, data.eps, cmp.eps, path)
        drawn.append(Drawn(path, f"Accuracy vs FGSM ε, {depth} conv layers "
                                 "(bands: 95 % CI over seeds)"))
    path = out_dir / "depth.png"
    plot_depth(summary, order, cmp.eps, path)
    drawn.append(Drawn(path, f"Accuracy vs number of conv layers, clean and at ε = {cmp.eps:g} "
                             "(control and single defenses; crosses: the paper)"))
    if examples:
        drawn.append(examples_figure(data, summary, cmp, out_dir, data_dir))
    return drawn


def examples_figure(data: StudyData, summary: pd.DataFrame, cmp: Comparison, out_dir: Path,
                    data_dir: str | None) -> Drawn:
    """The examples grid, or the line saying why it is missing (no model logged, no MNIST)."""
    models = example_models(data.scores, summary, cmp)
    path = out_dir / "examples.png"
    try:
        if not models:
            raise ArtStudyError("no finished control run")
        plot_examples(models, cmp.eps, data_dir, path)
    except Exception as exc:  # an optional figure: say why it is missing, keep the report
        return Drawn(None, f"Example images skipped: {type(exc).__name__}: {exc}.")
    return Drawn(path, f"The first {N_EXAMPLES} test images, clean and after our FGSM at ε = "
                       f"{cmp.eps:g} against each model (rows: " + "; ".join(
                           m.label for m in models) + "); titles: the model's prediction, "
                       "green right, red wrong")


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg, off-screen, without pyplot's global state."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_robustness(summary: pd.DataFrame, depth: int, order: list[str], eps: list[float],
                    eps_star: float, path: Path) -> None:
    """Accuracy vs ε (clean at ε = 0), one line per sequence, 95 % CI bands with ≥ 2 seeds:
    how fast each defense gives way as the budget grows."""
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    xs = [0.0, *eps]
    for i, seq in enumerate(order):
        rows = [lookup(summary, depth, seq, m) for m in metric_names(eps)]
        pts = [(x, r["mean"], r["half"]) for x, r in zip(xs, rows, strict=True) if r is not None]
        if not pts:
            continue
        x, mean, half = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
        style = "--" if ">" in seq else "-"
        (line,) = ax.plot(x, mean, style, marker="o", color=f"C{i % 10}", label=seq)
        if np.isfinite(half).any():
            half = np.nan_to_num(half)
            ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.axvline(eps_star, color="grey", lw=0.8, ls=":")
    ax.axhline(PAPER_CONTROL_FGSM, color="grey", lw=0.8, ls="-.", label="paper control 29.15 %")
    ax.set(xlabel="FGSM ε (pixel scale [0, 1]; 0 = clean)", ylabel="accuracy %",
           title=f"Robustness, {depth} conv layers (ours FGSM; dotted: comparison ε)",
           ylim=(0, 101))
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path)


def plot_depth(summary: pd.DataFrame, order: list[str], eps_star: float, path: Path) -> None:
    """Accuracy vs depth for the control and each single defense, clean and at the comparison ε,
    with the paper's numbers as crosses: does depth buy robustness, as the paper says?"""
    singles = [s for s in order if ">" not in s]
    depths = sorted(int(d) for d in summary["depth"].unique())
    fig = new_figure(10, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, paper, title in (
            (axes[0], "clean", PAPER_CLEAN, "clean"),
            (axes[1], eps_key(eps_star), PAPER_FGSM, f"FGSM ε={eps_star:g}")):
        for i, seq in enumerate(singles):
            sel = summary[(summary["sequence"] == seq) & (summary["metric"] == metric)]
            sel = sel.sort_values("depth")
            dodge = 0.06 * (i - (len(singles) - 1) / 2)  # keep error bars apart
            if not sel.empty:
                ax.errorbar(sel["depth"].astype(float) + dodge, sel["mean"],
                            yerr=sel["half"].fillna(0), marker="o", capsize=3,
                            color=f"C{i % 10}", label=seq)
            for d in depths:
                if (seq, d) in paper:
                    ax.plot(d + dodge, paper[(seq, d)], "x", ms=9, mew=2, color=f"C{i % 10}")
        ax.set(xlabel="conv layers", title=title, ylim=(0, 101),
               xlim=(depths[0] - 0.5, depths[-1] + 0.5))
        ax.set_xticks(depths)
    axes[0].set_ylabel("accuracy % (mean ± 95 % CI; × = paper)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path)


@dataclass
class ExampleModel:
    """A model shown in the examples grid: its run, label and whose predictions."""

    run_id: str
    label: str


def example_models(scores: pd.DataFrame, summary: pd.DataFrame, cmp: Comparison
                   ) -> list[ExampleModel]:
    """The control and the most robust defended sequence at the base depth, same seed (so the
    same test images)."""
    depth = cmp.base_depth
    if depth is None:
        return []
    at_depth = scores[scores["depth"] == depth]
    control = at_depth[at_depth["sequence"] == CONTROL].sort_values("seed")
    metric = eps_key(cmp.eps)
    ranked = (summary[(summary["depth"] == depth) & (summary["sequence"] != CONTROL)
                      & (summary["metric"] == metric)].sort_values("mean", ascending=False))
    for seq in ranked["sequence"]:
        for _, c in control.iterrows():
            other = at_depth[(at_depth["sequence"] == seq) & (at_depth["seed"] == c["seed"])]
            if not other.empty:
                return [ExampleModel(c["run_id"], f"control, seed {c['seed']}"),
                        ExampleModel(other.iloc[0]["run_id"], f"{seq}, seed {c['seed']}")]
    return [ExampleModel(c["run_id"], f"control, seed {c['seed']}") for _, c in control[:1]
            .iterrows()]


def example_images(run_id: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The first test images the run evaluated, loaded as the run loaded them (its config)."""
    from art_study.config import config_from_mapping
    from art_study.data import load_mnist

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    cfg = config_from_mapping(yaml.safe_load(text), "config.yaml")
    data = load_mnist(data_dir or cfg.data.dir, n_train=cfg.data.n_train,
                      n_test=cfg.data.n_test, seed=cfg.seed, download=False)
    return data.x_test[:N_EXAMPLES], data.y_test[:N_EXAMPLES]


def plot_examples(models: list[ExampleModel], eps: float, data_dir: str | None,
                  path: Path) -> None:
    """Clean and FGSM images with each model's predictions (green right, red wrong): what the
    attack does to a digit, and what a defense changes about it."""
    import keras

    import art_study.defenses  # noqa: F401  (registers the gradient-masking layers for loading)
    from art_study.attacks import FGSM
    from art_study.models import one_hot, predict_labels

    x, y = example_images(models[0].run_id, data_dir)
    fig = new_figure(1.3 * N_EXAMPLES, 1.5 * 2 * len(models))
    axes = fig.subplots(2 * len(models), N_EXAMPLES, squeeze=False)
    for m, spec in enumerate(models):
        model = mlflow.keras.load_model(f"runs:/{spec.run_id}/model",
                                        load_model_kwargs={"compile": False})
        keras.utils.set_random_seed(0)
        x_adv = FGSM(model, batch_size=N_EXAMPLES).generate(x, one_hot(y), eps)
        for r, (images, kind) in enumerate(((x, "clean"), (x_adv, f"FGSM ε={eps:g}"))):
            preds = predict_labels(model, images)
            for j in range(N_EXAMPLES):
                ax = axes[2 * m + r, j]
                ax.imshow(images[j, :, :, 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"pred {preds[j]}", fontsize=8,
                             color="green" if preds[j] == y[j] else "red")
            axes[2 * m + r, 0].set_ylabel(f"{spec.label}\n{kind}", fontsize=7)
    fig.suptitle(f"True labels: {' '.join(str(v) for v in y)}", fontsize=9)
    fig.savefig(path)
