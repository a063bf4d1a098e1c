"""Study plan and execution: config → plan → data → model → defense stages → evaluation → MLflow."""

from art_study.study.execute import RunResult, run_experiment

__all__ = ["RunResult", "run_experiment"]
