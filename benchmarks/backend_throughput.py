"""A study's wall time in-process vs on a local Ray instance (two tasks at once on this machine).

Why: one in-process study leaves part of a 2-core machine idle (a plain 2-conv epoch keeps
about 1.4 cores busy: 40.6 s CPU in 28.6 s wall), and the Ray backend runs independent stages
and evaluations side by side with results bit-identical to in-process (each task keeps
TensorFlow's default thread count; ``tests/test_ray_backend.py``). This measures what that
buys on a whole study, and checks here too that both backends logged the same metrics.

Each contender runs the same study (default: ``configs/paper.yaml``'s depth-2 block, one seed, a
stratified ``--n-train``/``--n-test`` slice) into a fresh store and stage cache of its own, so
nothing is shared between them; rounds alternate the contenders (in-process first). Ray's own
start and stop are inside its time: a user pays them. Only wall time is compared: Ray's
workers are not children of this process, so its CPU time would leave them out. The plain
2-conv epoch of this machine (full training set, extrapolated) is printed beside the figures.

    .venv/bin/python benchmarks/backend_throughput.py [CONFIG] [--seed 0]
        [--n-train 12000] [--n-test 2000] [--rounds 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import interleaved, machine_line, print_round

DEPTH2 = "study.blocks=[{depths: [2], sequences: [control, singles, pairs]}]"


def comparable(uri: str) -> dict[str, dict[str, float]]:
    """Every child's metrics but times and throughputs, by run key."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("art-study")
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`art_study.role` != 'study'",
                                  max_results=5000):
        key = run.data.tags.get("run_key")
        if key:
            out[key] = {k: v for k, v in run.data.metrics.items()
                        if "time" not in k and "per_s" not in k}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/paper.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=12_000)
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"more config overrides (default block: {DEPTH2!r})")
    p.add_argument("--data-dir", default=os.environ.get("ART_STUDY_DATA_DIR"))
    args = p.parse_args()

    from study_floor import measure_plain_epochs

    from art_study.config import load_config
    from art_study.study import run_study
    from art_study.study.execute import load_data
    from art_study.study.ray_backend import RayOptions

    base = [DEPTH2, f"study.seeds=[{args.seed}]", f"data.n_train={args.n_train}",
            f"data.n_test={args.n_test}", *args.overrides]
    if args.data_dir:
        base.append(f"data.dir={args.data_dir}")
    work = Path(tempfile.mkdtemp(prefix="backend-throughput-"))
    stores: dict[str, list[str]] = {"inprocess": [], "ray": []}

    def contender(name: str):
        def run() -> None:
            where = work / f"{name}-{len(stores[name])}"
            uri = f"sqlite:///{where / 'mlflow.db'}"
            cfg = load_config(args.config, [*base, f"tracking.uri={uri}",
                                            f"study.cache_dir={where / 'stage-cache'}"])
            run_study(cfg, progress=False, ray_options=RayOptions() if name == "ray" else None)
            stores[name].append(uri)
        return run

    cfg = load_config(args.config, base)
    full = load_config(args.config, [f"study.seeds=[{args.seed}]"] +
                       ([f"data.dir={args.data_dir}"] if args.data_dir else []))
    print(f"{args.config} with {base[:-1] if args.data_dir else base}: "
          f"{machine_line()}", flush=True)
    plain = measure_plain_epochs([cfg.model.n_conv], load_data(full, [args.seed])[args.seed],
                                 full, 12_000, 1)[cfg.model.n_conv]
    print(f"plain {cfg.model.n_conv}-conv epoch here: {plain:.1f} s (60 000 images)", flush=True)

    wall, _ = interleaved({"inprocess": contender("inprocess"), "ray": contender("ray")},
                          args.rounds, print_round)
    local, ray = comparable(stores["inprocess"][0]), comparable(stores["ray"][0])
    differ = sorted(k for k in local if local[k] != ray.get(k))
    print(f"runs: {len(local)} in-process, {len(ray)} on Ray; metrics identical: "
          f"{'yes' if not differ and local.keys() == ray.keys() else f'NO ({len(differ)} differ)'}")
    a, b = min(wall["inprocess"]), min(wall["ray"])
    print(f"study wall time (best of {args.rounds}): in-process {a / 60:.1f} min, Ray {b / 60:.1f} "
          f"min: Ray is {a / b:.2f}× as fast; {machine_line()}; stores under {work}")


if __name__ == "__main__":
    main()
