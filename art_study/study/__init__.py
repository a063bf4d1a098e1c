"""Study plan and execution: config → plan → data → model → defense stages → evaluation → MLflow."""

from art_study.study.execute import StudyIncomplete, run_experiment, run_study
from art_study.study.executor import RunResult, StudyResult
from art_study.study.plan import RunSpec, StageSpec, distinct_stages, plan_runs

__all__ = [
    "RunResult",
    "RunSpec",
    "StageSpec",
    "StudyIncomplete",
    "StudyResult",
    "distinct_stages",
    "plan_runs",
    "run_experiment",
    "run_study",
]
