"""The share of a run's wall time spent in MLflow logging.

Runs a config through the real engine (``art_study.study.execute.run_study``, as ``art-study
run`` does) into a fresh sqlite store, with every MLflow entry point wrapped by a timer: the
``mlflow`` fluent API (start/end run, params, metrics, tags, text, tables, artifacts, model
logging), every ``MlflowClient`` method, and art-study's own logging helpers (store
preparation, model and correctness logging, which include the model's serialisation for
logging). Nested calls are counted once (only the outermost timer runs). Prints the logging
time, the wall time and the share, and the top calls.

The share depends on the run's size: MLflow's costs are mostly per run (store, params, tags,
the model), so a tiny config shows a large share and a study-sized run a small one. The
default is the paper's control run (configs/control.yaml: full MNIST, 7 epochs, FGSM sweep),
what one child of the paper's study costs; ``--set data.n_train=...`` makes it shorter.

    .venv/bin/python benchmarks/mlflow_share.py [CONFIG] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time

import _common  # quiets TF before the engine imports it

LOGGED = collections.Counter()
CALLS = collections.Counter()
_depth = [0]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        if _depth[0]:
            return fn(*a, **kw)
        _depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            LOGGED[name] += time.perf_counter() - t0
            CALLS[name] += 1
            _depth[0] -= 1
    return wrapper


def instrument() -> None:
    """Wrap every MLflow entry point the engine can reach."""
    import mlflow
    import mlflow.keras
    from mlflow import MlflowClient

    import art_study.defenses.base as base
    import art_study.defenses.gradient_masking as gm
    import art_study.study.execute as execute
    import art_study.study.executor as executor
    import art_study.tracking as tracking

    fluent = ["start_run", "end_run", "log_metric", "log_metrics", "log_param", "log_params",
              "set_tag", "set_tags", "log_text", "log_table", "log_artifact", "log_artifacts",
              "log_dict", "set_tracking_uri", "get_experiment_by_name", "create_experiment",
              "search_runs", "active_run"]
    for name in fluent:
        if hasattr(mlflow, name):
            setattr(mlflow, name, timed(f"mlflow.{name}", getattr(mlflow, name)))
    mlflow.keras.log_model = timed("mlflow.keras.log_model", mlflow.keras.log_model)
    for name in dir(MlflowClient):
        if not name.startswith("_") and callable(getattr(MlflowClient, name)):
            setattr(MlflowClient, name, timed(f"MlflowClient.{name}", getattr(MlflowClient, name)))
    for name in ("prepare_store", "log_keras_model", "log_evaluation", "environment_tags"):
        wrapped = timed(f"art_study.{name}", getattr(tracking, name))
        for module in (execute, executor, tracking, base, gm):  # the helpers are imported by name
            if hasattr(module, name):
                setattr(module, name, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/control.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()

    instrument()
    from art_study.config import load_config
    from art_study.study.execute import run_study
    from art_study.tracking import prepare_store

    with tempfile.TemporaryDirectory() as tmp:
        # A new, empty store (the stage cache goes beside it: nothing is reused). Creating the
        # sqlite schema is a once-per-store cost, paid before the timed run as a study that
        # appends to an existing store would have paid it; it is reported on its own line.
        cfg = load_config(args.config, [f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                                        *args.overrides])
        t0 = time.perf_counter()
        prepare_store(cfg.tracking.uri, cfg.tracking.experiment)
        store_s = time.perf_counter() - t0
        LOGGED.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        result = run_study(cfg, progress=False)
        wall = time.perf_counter() - t0

    logged = sum(LOGGED.values())
    runs = len(result.runs)
    print(f"{args.config} {' '.join(args.overrides)}: {runs} run(s), "
          f"{result.stages_trained} stage(s) trained; {_common.machine_line()}")
    print(f"  creating the empty store (once per store, not timed below): {store_s:.1f} s")
    print(f"  wall time of run_study:   {wall:8.1f} s")
    print(f"  MLflow logging (timed):   {logged:8.2f} s in {sum(CALLS.values())} calls")
    print(f"  share: {100 * logged / wall:.2f} % (target ≤ 2 %)")
    for name, t in LOGGED.most_common(args.top):
        print(f"    {name:36s} {t:7.2f} s  {CALLS[name]:5d} calls")


if __name__ == "__main__":
    main()
