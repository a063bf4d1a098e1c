"""Read a study's runs back from MLflow as a pandas table.

The study's child runs carry ``sequence``, ``depth`` and ``seed`` tags and flat metric names, so
``mlflow.search_runs`` already returns the table; this module only selects, renames and
aggregates over seeds.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from art_study.evaluation import eps_key


def study_runs(parent_run_id: str) -> pd.DataFrame:
    """One row per child run of the study: tags, status and every metric."""
    parent = mlflow.get_run(parent_run_id)
    df = mlflow.search_runs([parent.info.experiment_id],
                            f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if df.empty:
        return df
    df = df.rename(columns={"tags.sequence": "sequence", "tags.depth": "depth",
                            "tags.seed": "seed"})
    df["depth"] = df["depth"].astype(int)
    df["seed"] = df["seed"].astype(int)
    return df


def results_table(runs: pd.DataFrame, eps: list[float]) -> pd.DataFrame:
    """Clean and FGSM accuracy (ours) per sequence and depth: mean over seeds and seed count."""
    cols = {"metrics.clean/accuracy": "clean"}
    cols |= {f"metrics.fgsm_custom/accuracy_{eps_key(e)}": f"fgsm@{e:g}" for e in eps}
    finished = runs[runs["status"] == "FINISHED"]
    present = {k: v for k, v in cols.items() if k in finished}
    table = finished.groupby(["depth", "sequence"])[list(present)].mean().rename(columns=present)
    table["seeds"] = finished.groupby(["depth", "sequence"]).size()
    return table.sort_index()
