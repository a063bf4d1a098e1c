"""What ``numerics: portable`` costs: portable / fast time of a plain epoch, a PGD-AT epoch and
AutoAttack, each mode in a process of its own (oneDNN is chosen when TensorFlow is imported).

Each child process trains and attacks the paper's 2-conv CNN with the study's own code:

- a plain epoch (the ``none`` defense) on ``--epoch-images`` training images, after a warm-up
  epoch, extrapolated to the 60 000 of MNIST;
- a PGD-AT epoch (``pgd_adversarial_training``, ε 0.3, 10 steps, compiled) on
  ``--pgd-images`` images, after a warm-up, extrapolated likewise;
- ``autoattack-standard`` on the first ``--n`` test images of the plain model at ε
  ``--eps`` (default tiny, so that no image falls and every component runs on every image: the
  robust model's work, whatever the model).

The parent runs the children in turn, ``--rounds`` times (fast, portable, fast, ...), keeps
each mode's best round and prints the ratios, wall and CPU. On a shared machine the ratio is
the figure that travels; absolute seconds depend on the neighbours.

    PYTHONPATH=$PWD nice python benchmarks/numerics_portable.py              # n 1000
    PYTHONPATH=$PWD nice python benchmarks/numerics_portable.py --n 200 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import FULL_TRAIN, argument_parser, machine_line

MODES = ("fast", "portable")
#: A contender for the cost's breakdown, not a mode: oneDNN's ops off (what fast mode runs on a
#: CPU without VNNI/AMX) but its sgemm still inside Eigen's contractions, threads fixed.
OPS_OFF = "ops-off"
PORTABLE_ENV = ("TF_ENABLE_ONEDNN_OPTS", "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL")
PARTS = ("plain_epoch", "pgd_at_epoch", "autoattack")


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def child(mode: str, args) -> dict:
    """One mode's timings (wall, CPU seconds) and its numerics fingerprint."""
    from art_study import numerics

    if mode == OPS_OFF:
        os.environ[numerics.ONEDNN_ENV] = "0"
    else:
        numerics.prepare(mode)
    import mlflow
    import numpy as np

    from art_study.attacks.autoattack import AutoAttackStandard
    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.defenses import DEFENSES, StageContext
    from art_study.models import build_cnn, compile_model
    from art_study.study.stages import seed_everything

    if mode == OPS_OFF:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    else:
        numerics.apply(mode, args.threads, args.threads)
    # the defenses log their epochs to MLflow: to a throw-away store, not ./mlflow.db
    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp(prefix='numerics-bench-')}/m.db")
    n_train = max(args.epoch_images, args.pgd_images)
    data = load_mnist(args.data_dir, n_train=n_train, n_test=max(args.n, 10), seed=0)
    model_cfg, train_cfg = ModelConfig(n_conv=2), TrainConfig(batch_size=128)
    out: dict = {"fingerprint": numerics.fingerprint()}

    def epoch(defense: str, images: int, model, **settings) -> tuple[float, float]:
        d = DEFENSES[defense]
        ctx = StageContext(data.x_train[:images], data.y_train[:images], model_cfg, train_cfg, 0,
                           progress=False)
        d.train(model, ctx, 1, d.settings(**settings))  # trace and warm
        wall, cpu = _timed(lambda: d.train(model, ctx, 1, d.settings(**settings)))
        scale = FULL_TRAIN / images
        return wall * scale, cpu * scale

    seed_everything(0)
    plain = compile_model(build_cnn(model_cfg), train_cfg)
    out["plain_epoch"] = epoch("none", args.epoch_images, plain)
    seed_everything(0)
    robust = compile_model(build_cnn(model_cfg), train_cfg)
    out["pgd_at_epoch"] = epoch("pgd_adversarial_training", args.pgd_images, robust, eps=0.3,
                                steps=10)
    aa = AutoAttackStandard(plain, max_iter=args.max_iter, n_queries=args.n_queries,
                            batch_size=500)
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    np.random.seed(0)
    out["autoattack"] = _timed(lambda: aa.cascade(x, y, args.eps))
    return out


def main() -> None:
    p = argument_parser(__doc__, images=1000, batch_size=None)
    p.add_argument("--n", type=int, default=1000, help="test images AutoAttack attacks")
    p.add_argument("--epoch-images", type=int, default=6000)
    p.add_argument("--pgd-images", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.001)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--n-queries", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2, help="portable mode's thread counts")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ops-off", action="store_true",
                   help=f"also time {OPS_OFF!r}: oneDNN's ops off, its sgemm in Eigen kept")
    p.add_argument("--child", choices=(*MODES, OPS_OFF), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    print(machine_line(), flush=True)
    modes = (*MODES, OPS_OFF) if args.ops_off else MODES
    best: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in modes}
    fingerprints = {}
    for r in range(args.rounds):
        for mode in modes:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
            env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
            line = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=env).stdout.strip().splitlines()[-1]
            got = json.loads(line)
            fingerprints[mode] = got.pop("fingerprint")
            print(f"  round {r + 1} {mode:8s} " + "  ".join(
                f"{k} {w:.1f}/{c:.1f}s" for k, (w, c) in got.items()), flush=True)
            for k, v in got.items():
                if k not in best[mode] or v[0] < best[mode][k][0]:
                    best[mode][k] = tuple(v)
    for mode in modes:
        fp = fingerprints[mode]
        print(f"{mode}: oneDNN {fp['onednn']}, contraction {fp['contraction']}, threads "
              f"{fp['intra_op_threads']}/{fp['inter_op_threads']} ({fp['id']})")
    print(f"ratios to fast (best of {args.rounds}; epochs per 60 000 images, AutoAttack on "
          f"{args.n} images, {args.max_iter} iterations, {args.n_queries} queries):")
    for k in PARTS:
        fw, fc = best["fast"][k]
        line = f"  {k:13s} fast {fw:7.1f} s wall {fc:7.1f} s CPU"
        for mode in modes[1:]:
            w, c = best[mode][k]
            line += f" | {mode} {w:.1f} / {c:.1f} s: {w / fw:.2f}x wall, {c / fc:.2f}x CPU"
        print(line)
    print(machine_line())


if __name__ == "__main__":
    main()
