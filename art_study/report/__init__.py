"""A study's results, read back from MLflow and written as a report people can read."""

from art_study.report.document import (
    DEFAULT_EXPERIMENT,
    ReportFiles,
    SeedDiscordance,
    _ci_row,
    choose_comparison_eps,
    ci95_half_width,
    clustered_mcnemar,
    fmt_ci,
    fmt_p,
    load_correctness,
    mcnemar,
    significance_table,
    study_runs,
    summarise,
    write_report,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ReportFiles",
    "SeedDiscordance",
    "_ci_row",
    "choose_comparison_eps",
    "ci95_half_width",
    "clustered_mcnemar",
    "fmt_ci",
    "fmt_p",
    "load_correctness",
    "mcnemar",
    "significance_table",
    "study_runs",
    "summarise",
    "write_report",
]
