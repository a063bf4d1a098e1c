"""A study's results, read back from MLflow and written as a report people can read.

The path reads top to bottom, one module per job:

1. ``reading.py``: find the study's parent run (by name or id), read its plan and child runs,
   and every run's results table (:mod:`art_study.results`) into one long frame;
2. ``statistics.py``: per-seed accuracies → mean ± 95 % confidence interval; paired t-test over
   seeds, McNemar's test over test images (plain functions, no MLflow);
3. ``tables.py``: every table, from that frame: headline, results, stronger attacks, cost,
   significance, missing runs;
4. ``figures.py``: robustness curves, accuracy vs depth, adversarial examples;
5. ``paper.py``: the optional comparison with Kim (2025), for a study of the paper's defenses;
6. ``document.py``: one Markdown file (PNGs beside it) and one self-contained HTML file, logged
   to the parent run under ``report/`` (:func:`write_report`).

The names below are loaded from their module on first use, so that ``statistics.py`` can be
imported (and tested) on its own, without MLflow or TensorFlow.
"""

import importlib

#: what the CLI and the tests use, by the module that defines it
_EXPORTS = {
    "write_report": "document", "ReportFiles": "document",
    "DEFAULT_EXPERIMENT": "reading", "Verdicts": "reading", "study_runs": "reading",
    "SeedDiscordance": "statistics", "ci95_half_width": "statistics",
    "clustered_mcnemar": "statistics", "mcnemar": "statistics",
    "_ci_row": "tables", "fmt_ci": "tables", "fmt_p": "tables",
    "significance_table": "tables", "summarise": "tables",
    "choose_comparison_eps": "paper",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """``art_study.report.<name>``, imported from its module when first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
