"""The report as a document: its sections in order, rendered as Markdown and as one HTML file.

:class:`Doc` holds the blocks (heading, paragraph, table, image) and renders them twice; the
section functions say what each table and figure means and place them; :func:`write_report`
writes both files (PNGs beside the Markdown) and logs them to the study's parent run under
``report/``.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd

from art_study.numerics import describe_differs, describe_mixed
from art_study.report import paper
from art_study.report.figures import draw_figures
from art_study.report.reading import StudyData, find_study, gather, open_store, runs_table
from art_study.report.statistics import EXACT_MCNEMAR_BELOW, wilson_half_width
from art_study.report.tables import (
    attack_cost_table,
    attack_table,
    attacked_eps,
    comparison_pairs,
    headline_table,
    missing_table,
    reference_eps,
    results_table,
    select,
    sequence_order,
    significance_table,
    summarise,
)
from art_study.results import Kind
from art_study.tracking import DEFAULT_STORE_DIR, redact

REPORT_ARTIFACT_DIR = "report"
RUNS_CSV = "runs.csv"


# -- the document: Markdown and self-contained HTML from the same blocks ------------------------
@dataclass
class Doc:
    """The report as a list of blocks (heading, paragraph, table, image), rendered twice."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        """A section title (level 2) or sub-section (3)."""
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        """A paragraph; `code` and **bold** are the only markup it may use."""
        self.blocks.append(("para", text))

    def table(self, df: pd.DataFrame) -> None:
        """A table of already formatted cells (strings), columns as they should read."""
        self.blocks.append(("table", df))

    def image(self, path: Path, caption: str) -> None:
        """A PNG already written to ``path``: linked from Markdown, embedded in HTML."""
        self.blocks.append(("image", path, caption))

    def markdown(self) -> str:
        """Markdown with the PNGs linked by file name (they sit beside the .md file)."""
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "para":
                out += [block[1], ""]
            elif kind == "table":
                out += [markdown_table(block[1]), ""]
            else:
                out += [f"![{block[2]}]({block[1].name})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        """One HTML file, the PNGs embedded as base64 data URIs: mail it, open it anywhere."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{inline_html(block[2])}</h{block[1]}>")
            elif kind == "para":
                body.append(f"<p>{inline_html(block[1])}</p>")
            elif kind == "table":
                body.append(block[1].to_html(index=False, border=0, classes="results"))
            else:
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" '
                            f'alt="{html.escape(block[2])}"><figcaption>'
                            f"{html.escape(block[2])}</figcaption></figure>")
        return HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; }}
table.results {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }}
table.results th, table.results td {{ border: 1px solid #ccc; padding: 3px 6px;
                                      text-align: left; }}
table.results th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figcaption {{ font-style: italic; font-size: 0.9em; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head>
<body>
{body}
</body></html>
"""


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table (pandas' ``to_markdown`` needs the optional ``tabulate``)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = [[cell(c) for c in df.columns], *([cell(v) for v in r] for r in df.itertuples(
        index=False))]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Escape, then the two bits of Markdown the paragraphs use: ``code`` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


# -- the sections --------------------------------------------------------------------------------
def intro(doc: Doc, data: StudyData, uri: str) -> None:
    """What was studied, where it is recorded, and how to read the numbers."""
    st, p = data.status, data.parent
    done = int((st["status"] == "FINISHED").sum())
    doc.para(f"Study **{data.name}**, parent run `{p.info.run_id}` (status {p.info.status}) in "
             f"the MLflow store `{uri}`. Report written "
             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.")
    doc.para(f"Dataset `{data.dataset}`; {done} of {len(st)} planned runs finished; depths "
             f"{', '.join(str(d) for d in sorted(st['depth'].unique()))}; seeds "
             f"{', '.join(str(s) for s in sorted(st['seed'].unique()))}; FGSM ε sweep "
             f"{', '.join(f'{e:g}' for e in data.eps) or '—'}.")
    for describe in (describe_mixed, describe_differs):
        if data.finished is not None and (sentence := describe(data.finished)):
            doc.para(sentence)
    doc.para("Accuracies are in % on the evaluated test images, as mean ± half-width of the 95 % "
             "Student-t confidence interval over seeds (one seed: the value and n=1, no "
             "interval). FGSM is ours (a `tf.GradientTape` attack, metric "
             "`fgsm_custom/accuracy_eps_<ε>`), white-box against each model with the true "
             "labels. ★ marks the reference ε, at which the depth plot and the significance "
             "tests compare FGSM accuracies. `ours vs ART max|Δ|` is "
             "the largest pixel difference between our FGSM and ART's on the same inputs; "
             "`repeat max|Δ|` is ours run twice: non-zero means the model's gradients are "
             "randomised (gradient noise), so the attack itself is noisy — a sign of gradient "
             "masking, not of robustness.")


def _images_note(results: pd.DataFrame) -> str:
    """On how many test images the worst case and FGSM were measured, when they differ: the
    headline's gap between them then also mixes two image sets."""
    def counts(rows: pd.DataFrame) -> str:
        """The distinct image counts of ``rows``, e.g. ``200/500``."""
        values = sorted({int(v) for v in rows["n_images"].dropna()})
        return "/".join(f"{v:,}".replace(",", " ") for v in values)
    worst = counts(results[(results["kind"] == Kind.WORST_CASE)
                           & results["eps"].isin(attacked_eps(results))])
    fgsm = counts(select(results, Kind.CLEAN))
    if not worst or not fgsm or worst == fgsm:
        return ""
    return (f" The worst case is measured on the first {worst} test images of each run (those "
            f"every attack ran on), FGSM on {fgsm}: their gap also mixes the two image sets.")


INTERVALS_NOTE = (
    "Two intervals answer two questions. `± x` after a mean is the 95 % Student-t interval "
    "over seeds: how much the figure moves when the same recipe is trained again (the spread "
    "of training). Every seed is measured on the same test images, so it says nothing of how "
    "the figure would move on other images. The `binomial 95 % per model` column says that "
    "for one model: the Wilson score interval of one seed's accuracy on the n images it was "
    "measured on (each image robust or not), shown as its half-width, a range where the "
    "seeds differ. It shrinks only with more images: a claim about one model near 89 % is "
    "± {on_1k:.1f} points on 1 000 images and ± {on_10k:.1f} on 10 000; and since the seeds "
    "share their images, averaging over seeds does not remove it.")


def headline_section(doc: Doc, data: StudyData, eps_star: float) -> None:
    """The number to compare defenses by: the worst case over attacks when the runs logged it,
    else FGSM, saying which."""
    table, worst_case = headline_table(data.results, data.status, eps_star)
    if table.empty:
        return
    doc.heading("Headline: robust accuracy")
    if worst_case:
        doc.para("Robust accuracy is the **per-image worst case over every attack** a run "
                 "evaluated at that ε (metric `robust/accuracy_eps_<ε>`), at each ε where one "
                 "of the config's attacks beyond FGSM ran: an image counts only "
                 "if the model classifies it correctly, clean and under each attack. This is "
                 "the number a leaderboard reports and the one to compare defenses by. FGSM at "
                 "the largest of these ε is shown beside it: the gap is what FGSM alone "
                 "overstates. A cell marked `(FGSM only)` comes from runs evaluated before the "
                 "worst case was logged." + _images_note(data.results))
    else:
        doc.para("No run logged a worst case over attacks (`robust/accuracy_eps_<ε>`), so the "
                 f"headline falls back to **FGSM at ε = {eps_star:g}** (the reference ε), "
                 "which overstates the robustness of a defense that hides its gradients: see "
                 "the stronger attacks and the gradient-masking verdict below.")
    doc.para(INTERVALS_NOTE.format(on_1k=wilson_half_width(0.89, 1000) * 100,
                                   on_10k=wilson_half_width(0.89, 10000) * 100))
    doc.table(table)


def teacher_note(finished: pd.DataFrame | None) -> str | None:
    """What "X → distillation" rows are: by default the distillation of X's model as trained
    (a T = 1 teacher), not Papernot's defensive distillation (``train_teacher: true``)."""
    if finished is None or finished.empty or "sequence" not in finished:
        return None
    later = finished[finished["sequence"].fillna("").str.contains(">distillation", regex=False)]
    if later.empty:
        return None
    col = "params.defenses.distillation.train_teacher"
    at_t = (later[col].astype(str).str.lower() == "true") if col in later else \
        pd.Series(False, index=later.index)
    from_t1 = sorted(set(later.loc[~at_t, "sequence"]))
    trained = sorted(set(later.loc[at_t, "sequence"]))
    parts = []
    if from_t1:
        parts.append(f"{', '.join(f'`{s}`' for s in from_t1)}: **distillation from a T = 1 "
                     "teacher**. The first stage's model, trained at T = 1, is the teacher and "
                     "its logits are only softened at T for the soft labels; Papernot et al.'s "
                     "defensive distillation trains the teacher at T, which is what saturates "
                     "the student (set `defenses.distillation.train_teacher: true` for that).")
    if trained:
        parts.append(f"{', '.join(f'`{s}`' for s in trained)}: the first stage's model was "
                     "trained further at T before distilling (`train_teacher: true`), "
                     "Papernot's teacher.")
    return "Sequences ending in distillation after another defense. " + " ".join(parts)


def attacks_section(doc: Doc, data: StudyData) -> None:
    """Stronger attacks, transfer, and whether each defense's robustness is real."""
    if data.finished is None or data.finished.empty:
        return
    order = sequence_order(data.status)
    tables = [(d, attack_table(data.results, data.finished, int(d), order))
              for d in sorted(data.status["depth"].unique())]
    tables = [(d, t) for d, t in tables if t is not None]
    if not tables:
        return
    doc.heading("Beyond FGSM: stronger attacks and the gradient-masking verdict")
    doc.para("Accuracy in % on the first test images each attack was given (its budget is "
             "logged with the run: `attack/<name>/n_images`, `max_iter`, ...). `transfer` "
             "examples are crafted on the undefended control of the same depth and seed. "
             "`masking suspected` counts the seeds whose model failed at least one of the "
             "checks of Carlini et al. (2019) (see docs/attacks.md): robustness that "
             "FGSM shows but PGD, APGD, Square or the transfer attack take away is hidden "
             "gradients, not robustness. For an ensemble (AutoAttack) the `after` column "
             "gives the mean robust accuracy left after each component in turn (cumulative: "
             "an image broken by an earlier component stays broken), so it shows which "
             "component does the work. `AutoAttack unreliable` counts the seeds where "
             "AutoAttack's own Square check fired (Square, black-box, still broke images the "
             "white-box components left): the gradients the white-box attacks followed are "
             "suspect, and the figure shown includes the stronger attacks the check escalates "
             "to (unless `escalate` was turned off). Beside each stronger attack's mean ± "
             "seed interval, `binomial 95 % per model` is one model's Wilson interval on the "
             "images that attack was given (see the headline).")
    for depth, table in tables:
        doc.heading(f"{depth} conv layers", level=3)
        doc.table(table)
    cost = attack_cost_table(data.results)
    if cost is not None:
        doc.heading("Evaluation budget and wall time", level=3)
        doc.para("What each attack was given and what it cost, per evaluated model (`diag` are "
                 "the extra attacks of the gradient-masking checks). A transfer attack's time is "
                 "that of classifying the control's examples; crafting them, once per control, "
                 "is logged as `transfer/<name>/craft_time_s` (in runs recorded before that "
                 "metric existed it is part of the first defended model's time).")
        doc.table(cost)


def significance_section(doc: Doc, data: StudyData, eps_star: float) -> None:
    """Paired t-test over seeds and McNemar over images, defense vs control and between
    defenses: on the worst case at each attacked ε, then on FGSM at the reference ε."""
    vs_control, between = comparison_pairs(data.results, data.status)
    fingerprints = dict(zip(data.finished["run_id"],
                            data.finished.get("tags.data.fingerprint",
                                              pd.Series(None, index=data.finished.index)),
                            strict=True))
    # The worst case at every ε where attacks beyond FGSM ran, not only at the reference ε:
    # where every defense falls to 0 there, a smaller ε still tells them apart.
    measures = [(Kind.WORST_CASE, eps, f"worst case over attacks, ε = {eps:g}")
                for eps in attacked_eps(data.results)]
    measures.append((Kind.FGSM, eps_star, f"FGSM, ε = {eps_star:g}"))
    doc.heading("Significance")
    doc.para("Paired t-test: the accuracies of A and B paired by seed (same seed, same data "
             "order and test images), two-sided; it needs at least 2 seeds. McNemar's test: on "
             "the same test images, the images only A classifies correctly (A✓B✗) against those "
             f"only B does (A✗B✓), per seed: exact binomial below {EXACT_MCNEMAR_BELOW} "
             "discordant images, χ² with continuity correction above. Over seeds the counts are "
             "not summed: the seeds are evaluated on the same test images, so their discordant "
             "pairs are not independent. `McNemar p over seeds` takes each test image as the "
             "unit, with its net discordance over the seeds (Σ A✓B✗ − A✗B✓), and tests that it "
             "is symmetric about 0: Durkalski et al. (2003)'s clustered McNemar χ² from "
             f"{EXACT_MCNEMAR_BELOW} images with a non-zero net, a sign-flip permutation test "
             "below. With one seed it is McNemar's test. p-values are not corrected for the "
             "number of comparisons. Where the runs logged the per-image worst case over "
             "attacks, the tests are made on it first (the accuracy to judge a defense by), at "
             "each ε where attacks beyond FGSM ran, then on FGSM at the reference ε.")
    for kind, eps, label in measures:
        for title, pairs in (("Each defense vs the control", vs_control),
                             ("Between defenses", between)):
            doc.heading(f"{title}: {label}", 3)
            if pairs:
                doc.table(significance_table(data.results, data.verdicts, pairs, eps, kind,
                                             fingerprints))
            else:
                doc.para("No pair of sequences with finished runs.")


def plots_section(doc: Doc, data: StudyData, summary: pd.DataFrame, eps_star: float,
                  out_dir: Path, data_dir: str | None, examples: bool) -> list[Path]:
    """The figures of ``figures.py``, in order; a line instead of one that could not be drawn."""
    doc.heading("Plots")
    written = []
    for figure in draw_figures(data, summary, eps_star, out_dir, data_dir, examples):
        if figure.path is None:
            doc.para(figure.caption)
        else:
            doc.image(figure.path, figure.caption)
            written.append(figure.path)
    return written


# -- putting it together --------------------------------------------------------------------------
def build_doc(data: StudyData, uri: str, out_dir: Path, data_dir: str | None,
              examples: bool) -> tuple[Doc, list[Path]]:
    """All sections of the report, plots written into ``out_dir`` as it goes."""
    doc = Doc(f"art-study report: {data.name}")
    intro(doc, data, uri)
    pngs: list[Path] = []
    if data.results.empty:
        doc.para("No run of this study has finished yet: no results to show.")
    else:
        summary = summarise(data.results)
        # the paper's numbers are MNIST's: compared only for a study of its defenses on MNIST
        of_paper = paper.applies(data.results["sequence"])
        cmp = (paper.choose_comparison_eps(summary, data.eps)
               if of_paper and data.dataset == "mnist" else None)
        eps_star = cmp.eps if cmp is not None else reference_eps(data.eps, data.dataset)
        headline_section(doc, data, eps_star)
        if cmp is not None:  # the optional section: a study of the paper's defenses
            paper.section(doc, summary, data.status, cmp)
        elif of_paper:
            doc.para(f"Kim (2025) studied MNIST only: its numbers are not compared with this "
                     f"study's on `{data.dataset}`. ★ marks ε = {eps_star:g}, this dataset's "
                     "usual budget (or the sweep's largest ε).")
        for depth in sorted(data.status["depth"].unique()):
            doc.heading(f"Results: {depth} conv layers")
            doc.table(results_table(summary, data.finished, data.status, int(depth), data.eps,
                                    eps_star))
        note = teacher_note(data.finished)
        if note:
            doc.para(note)
        attacks_section(doc, data)
        significance_section(doc, data, eps_star)
    doc.heading("Missing or failed runs")
    missing = missing_table(data.status)
    if missing.empty:
        doc.para(f"None: all {len(data.status)} planned runs finished.")
    else:
        doc.para(f"{len(missing)} of {len(data.status)} planned runs have not finished "
                 "(failed, still running, or not started); the results count finished runs "
                 "only (see the seed counts). Once the study has stopped, rerunning its command "
                 "resumes it: finished runs are kept, the others are run again.")
        doc.table(missing)
    if not data.results.empty:
        pngs = plots_section(doc, data, summary, eps_star, out_dir, data_dir, examples)
    return doc, pngs


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written, and the parent run it was logged to."""

    study: str
    parent_run_id: str
    markdown: Path
    html: Path | None  # None for an export
    images: list[Path]
    logged: bool


def write_report(study: str | None = None, *, tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, data_dir: str | None = None,
                 log: bool = True, examples: bool = True, export: bool = False) -> ReportFiles:
    """Write the report of ``study`` (name, parent run id, or None: the most recent study).

    ``export`` writes what a repository keeps (``results/<study>/``): the Markdown, its PNGs
    and ``runs.csv`` (one row per finished run: tags, resolved config, every metric), but not
    the HTML (it embeds the PNGs again) and nothing logged to the store; regenerated by one
    command, never edited by hand.

    Args:
        study: the study's name (its most recent parent run) or its parent run id.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI``, then ./mlruns).
        out_dir: where the files go (default: ``mlruns/reports/<study name>``).
        data_dir: MNIST for the example images (default: where the runs loaded it).
        log: also log the files to the parent run under ``report/``.
        examples: draw the example images (loads two models and attacks 8 images).

    Raises:
        ArtStudyError: no store, no such study.
    """
    uri = open_store(tracking_uri)
    data = gather(find_study(study))
    out = Path(out_dir) if out_dir else DEFAULT_STORE_DIR / "reports" / safe_name(data.name)
    out.mkdir(parents=True, exist_ok=True)
    doc, pngs = build_doc(data, redact(uri), out, data_dir, examples)
    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.markdown(), encoding="utf-8")
    if export:
        runs_table(data.finished).to_csv(out / RUNS_CSV, index=False)
        page.unlink(missing_ok=True)  # a stale one from an earlier write
        return ReportFiles(data.name, data.parent.info.run_id, md, None, pngs, False)
    page.write_text(doc.html(), encoding="utf-8")
    if log:
        client = mlflow.MlflowClient()
        for path in (md, page, *pngs):
            client.log_artifact(data.parent.info.run_id, str(path), REPORT_ARTIFACT_DIR)
    return ReportFiles(data.name, data.parent.info.run_id, md, page, pngs, log)


def safe_name(name: str) -> str:
    """A study name usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
