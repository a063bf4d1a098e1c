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
from art_study.report.reading import StudyData
from art_study.report.tables import CONTROL, attacked_eps, lookup, select, sequence_order
from art_study.results import Kind

N_EXAMPLES = 8


@dataclass(frozen=True)
class Drawn:
    """A figure written to ``path`` and its caption; for an optional figure that could not be
    drawn, ``path`` is None and ``caption`` says why."""

    path: Path | None
    caption: str


def draw_figures(data: StudyData, summary: pd.DataFrame, eps_star: float, out_dir: Path,
                 data_dir: str | None, examples: bool) -> list[Drawn]:
    """Robustness curves per depth, accuracy vs depth, and the adversarial examples grid;
    ``eps_star`` the reference ε (marked in the curves, the depth plot's and the examples')."""
    drawn = []
    order = sequence_order(data.status)
    worst = attacked_eps(data.results)
    for depth in sorted(data.results["depth"].unique()):
        path = out_dir / f"robustness_depth{depth}.png"
        plot_robustness(summary, int(depth), order, data.eps, worst, eps_star, path)
        drawn.append(Drawn(path, f"Accuracy vs ε, {depth} conv layers: our FGSM (lines)"
                           + (", the worst case over every attack where attacks beyond FGSM "
                              "ran (squares, dashed)" if worst else "")
                           + " (bands and bars: 95 % CI over seeds)"))
    path = out_dir / "depth.png"
    plot_depth(summary, order, eps_star, path)
    drawn.append(Drawn(path, f"Accuracy vs number of conv layers, clean and under FGSM at "
                             f"ε = {eps_star:g} (control and single defenses)"))
    if examples:
        drawn.append(examples_figure(data, summary, eps_star, out_dir, data_dir))
    return drawn


def examples_figure(data: StudyData, summary: pd.DataFrame, eps_star: float, out_dir: Path,
                    data_dir: str | None) -> Drawn:
    """The examples grid, or the line saying why it is missing (no model logged, no MNIST)."""
    models = example_models(data.results, summary, eps_star)
    path = out_dir / "examples.png"
    try:
        if not models:
            raise ArtStudyError("no finished control run")
        plot_examples(models, eps_star, data_dir, path)
    except Exception as exc:  # an optional figure: say why it is missing, keep the report
        return Drawn(None, f"Example images skipped: {type(exc).__name__}: {exc}.")
    return Drawn(path, f"The first {N_EXAMPLES} test images, clean and after our FGSM at ε = "
                       f"{eps_star:g} against each model (rows: " + "; ".join(
                           m.label for m in models) + "); titles: the model's prediction, "
                       "green right, red wrong")


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg, off-screen, without pyplot's global state."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _curve(summary: pd.DataFrame, depth: int, seq: str, kind: Kind, eps: list[float]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """ε, mean and CI half-width of one sequence's accuracy under ``kind`` (clean at ε = 0
    for our FGSM), at the ε where it was logged."""
    points = [(0.0, lookup(summary, depth, seq, Kind.CLEAN))] if kind == Kind.FGSM else []
    points += [(e, lookup(summary, depth, seq, kind, e)) for e in eps]
    pts = [(x, r["mean"], r["half"]) for x, r in points if r is not None]
    if not pts:
        return None
    return tuple(np.array(v, dtype=float) for v in zip(*pts, strict=True))


def sequence_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours, one per sequence: Matplotlib's default cycle (tab10) up to 10,
    tab20 beyond (a study with PGD-AT and TRADES beside the paper's ten sequences has 12, and
    the default cycle would give two of them the control's colour)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_robustness(summary: pd.DataFrame, depth: int, order: list[str], eps: list[float],
                    worst_eps: list[float], eps_star: float, path: Path) -> None:
    """Accuracy vs ε (clean at ε = 0), one colour per sequence: our FGSM as a line with 95 %
    CI bands, the per-image worst case over every attack as squares on a dashed line at each ε
    where attacks beyond FGSM ran: how fast each defense gives way, and how much of its FGSM
    robustness is real. The legend, outside the axes, names each colour once and each line
    style once, so that it covers no curve however many sequences there are."""
    from matplotlib.lines import Line2D

    fig = new_figure(10, 5)
    ax = fig.add_subplot()
    handles = [Line2D([], [], color="black", marker="o", ls="-", label="FGSM (ours), 95 % CI"),
               Line2D([], [], color="black", marker="s", ls="--",
                      label="worst case over attacks")]
    for seq, colour in zip(order, sequence_colours(len(order)), strict=True):
        fgsm = _curve(summary, depth, seq, Kind.FGSM, eps)
        if fgsm is not None:
            x, mean, half = fgsm
            ax.plot(x, mean, "-", marker="o", color=colour)
            if np.isfinite(half).any():
                half = np.nan_to_num(half)
                ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.15)
        worst = _curve(summary, depth, seq, Kind.WORST_CASE, worst_eps)
        if worst is not None:
            x, mean, half = worst
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), fmt="--s", color=colour, capsize=3)
        if fgsm is not None or worst is not None:
            handles.append(Line2D([], [], color=colour, lw=6, label=seq))
    ax.axvline(eps_star, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="ε (pixel scale [0, 1]; 0 = clean)", ylabel="accuracy %",
           title=f"Robustness, {depth} conv layers (dotted: the reference ε)", ylim=(0, 101))
    fig.legend(handles=handles, fontsize=7, loc="outside right upper")
    fig.savefig(path)


def plot_depth(summary: pd.DataFrame, order: list[str], eps_star: float, path: Path) -> None:
    """Accuracy vs depth for the control and each single defense, clean and under FGSM at the
    reference ε: does depth buy robustness?"""
    singles = [s for s in order if ">" not in s]
    depths = sorted(int(d) for d in summary["depth"].unique())
    fig = new_figure(10, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (kind, eps), title in ((axes[0], (Kind.CLEAN, None), "clean"),
                                   (axes[1], (Kind.FGSM, eps_star), f"FGSM ε={eps_star:g}")):
        for i, seq in enumerate(singles):
            sel = select(summary, kind, eps, sequence=seq).sort_values("depth")
            dodge = 0.06 * (i - (len(singles) - 1) / 2)  # keep error bars apart
            if not sel.empty:
                ax.errorbar(sel["depth"].astype(float) + dodge, sel["mean"],
                            yerr=sel["half"].fillna(0), marker="o", capsize=3,
                            color=f"C{i % 10}", label=seq)
        ax.set(xlabel="conv layers", title=title, ylim=(0, 101),
               xlim=(depths[0] - 0.5, depths[-1] + 0.5))
        ax.set_xticks(depths)
    axes[0].set_ylabel("accuracy % (mean ± 95 % CI)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path)


@dataclass
class ExampleModel:
    """A model shown in the examples grid: its run, label and whose predictions."""

    run_id: str
    label: str


def example_models(results: pd.DataFrame, summary: pd.DataFrame, eps: float
                   ) -> list[ExampleModel]:
    """The control and the defended sequence most robust to FGSM at ``eps``, at the smallest
    depth with a control, same seed (so the same test images)."""
    runs = results.drop_duplicates("run_id")
    controls = runs[runs["sequence"] == CONTROL]
    if controls.empty:
        return []
    depth = int(controls["depth"].min())
    at_depth = runs[runs["depth"] == depth]
    control = at_depth[at_depth["sequence"] == CONTROL].sort_values("seed")
    ranked = select(summary, Kind.FGSM, eps, depth=depth).sort_values("mean", ascending=False)
    for seq in ranked["sequence"]:
        if seq == CONTROL:
            continue
        for _, c in control.iterrows():
            other = at_depth[(at_depth["sequence"] == seq) & (at_depth["seed"] == c["seed"])]
            if not other.empty:
                return [ExampleModel(c["run_id"], f"control, seed {c['seed']}"),
                        ExampleModel(other.iloc[0]["run_id"], f"{seq}, seed {c['seed']}")]
    return [ExampleModel(c["run_id"], f"control, seed {c['seed']}") for _, c in control[:1]
            .iterrows()]


def example_images(run_id: str, data_dir: str | None
                   ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The first test images the run evaluated, loaded as the run loaded them (its config),
    their labels, and the dataset's class names."""
    from art_study.config import config_from_mapping
    from art_study.data import load_dataset

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    cfg = config_from_mapping(yaml.safe_load(text), "config.yaml")
    data = load_dataset(cfg.data.name, path=cfg.data.path, data_dir=data_dir or cfg.data.dir,
                        n_train=cfg.data.n_train, n_test=cfg.data.n_test, seed=cfg.seed,
                        download=False)
    return data.x_test[:N_EXAMPLES], data.y_test[:N_EXAMPLES], data.spec.class_names


def plot_examples(models: list[ExampleModel], eps: float, data_dir: str | None,
                  path: Path) -> None:
    """Clean and FGSM images with each model's predictions (green right, red wrong): what the
    attack does to an image, and what a defense changes about it. Labels by the dataset's
    class names (MNIST's are its digits)."""
    import keras

    import art_study.defenses  # noqa: F401  (registers the gradient-masking layers for loading)
    from art_study.attacks import FGSM
    from art_study.models import one_hot, predict_labels

    x, y, names = example_images(models[0].run_id, data_dir)
    fig = new_figure(1.3 * N_EXAMPLES, 1.5 * 2 * len(models))
    axes = fig.subplots(2 * len(models), N_EXAMPLES, squeeze=False)
    for m, spec in enumerate(models):
        model = mlflow.keras.load_model(f"runs:/{spec.run_id}/model",
                                        load_model_kwargs={"compile": False})
        keras.utils.set_random_seed(0)
        x_adv = FGSM(model, batch_size=N_EXAMPLES).generate(
            x, one_hot(y, int(model.output_shape[-1])), eps)
        for r, (images, kind) in enumerate(((x, "clean"), (x_adv, f"FGSM ε={eps:g}"))):
            preds = predict_labels(model, images)
            for j in range(N_EXAMPLES):
                ax = axes[2 * m + r, j]
                image = images[j, :, :, 0] if images.shape[-1] == 1 else images[j]
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)  # (cmap unused for colour)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"pred {names[preds[j]]}", fontsize=8,
                             color="green" if preds[j] == y[j] else "red")
            axes[2 * m + r, 0].set_ylabel(f"{spec.label}\n{kind}", fontsize=7)
    sep = " " if all(len(names[v]) == 1 for v in y) else ", "  # digits, or class names
    fig.suptitle(f"True labels: {sep.join(names[v] for v in y)}", fontsize=9)
    fig.savefig(path)
