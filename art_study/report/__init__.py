"""A study's results, read back from MLflow and written as a report people can read.

The path reads top to bottom, one module per job:

1. ``reading.py``: find the study's parent run (by name or id), read its plan and child runs,
   and the per-seed scores;
2. ``statistics.py``: per-seed accuracies → mean ± 95 % confidence interval; paired t-test over
   seeds, McNemar's test over test images (plain functions, no MLflow);
3. ``tables.py``: the ε at which to compare with the paper (the paper never states its ε), and
   every table: headline, results, stronger attacks, significance, missing runs;
4. ``figures.py``: robustness curves, accuracy vs depth, adversarial examples;
5. ``document.py``: one Markdown file (PNGs beside it) and one self-contained HTML file, logged
   to the parent run under ``report/`` (:func:`write_report`).

The names below are loaded from their module on first use, so that ``statistics.py`` can be
imported (and tested) on its own, without MLflow or TensorFlow.
"""

import importlib

#: what the CLI and the tests use, by the module that defines it
_EXPORTS = {
    "write_report": "document", "ReportFiles": "document",
    "DEFAULT_EXPERIMENT": "reading", "load_correctness": "reading", "study_runs": "reading",
    "SeedDiscordance": "statistics", "ci95_half_width": "statistics",
    "clustered_mcnemar": "statistics", "mcnemar": "statistics",
    "_ci_row": "tables", "choose_comparison_eps": "tables", "fmt_ci": "tables", "fmt_p": "tables",
    "significance_table": "tables", "summarise": "tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """``art_study.report.<name>``, imported from its module when first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
