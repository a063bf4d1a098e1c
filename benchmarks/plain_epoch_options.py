"""What makes a plain epoch of the paper CNN faster on this CPU: threading, input pipeline,
steps per execution, batch size, layer order. Each option against the study's default path.

In-process contenders (one model each, same init), one epoch each per round, interleaved:

- ``default``: ``compile_model`` + ``model.fit`` on NumPy arrays, batch 128, ``shuffle=True`` —
  exactly the ``none`` stage;
- ``spe<K>``: the same with ``compile(steps_per_execution=K)``: K steps per call of the compiled
  function, so less Python per step. Same ops in the same order: the script checks that one
  epoch from the same init and seed gives bit-identical weights;
- ``tfdata``: a ``tf.data`` pipeline built once from tensors (shuffle, batch, prefetch
  AUTOTUNE) instead of Keras' adapter over NumPy: another shuffle, so other numerics;
- ``batch<B>``: larger batches (fewer, bigger steps; other training dynamics);
- ``pool_first``: Conv → MaxPool → BatchNorm instead of Conv → BatchNorm → MaxPool (the
  paper names both layers without an order; BatchNorm then runs on a 4× smaller map).

Threading (``tf.config.threading`` intra/inter-op pools) can only be set before TF starts, so
each setting runs in its own process, rounds interleaved across processes; each process warms
up and times one default epoch.

    .venv/bin/python benchmarks/plain_epoch_options.py [--n-conv 2] [--images 6000] [--rounds 3]
        [--no-threads]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import FULL_TRAIN, argument_parser, interleaved, load_slice, machine_line, print_round


def build(n_conv: int, pool_first: bool = False):
    import keras

    from art_study.config import ModelConfig
    from art_study.models import build_cnn

    model = build_cnn(ModelConfig(n_conv=n_conv))
    if not pool_first:
        return model
    layers = [la for la in model.layers]
    order = []
    i = 0
    while i < len(layers):  # swap each (bn, pool) pair into (pool, bn)
        la = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(la, keras.layers.BatchNormalization) and isinstance(
                nxt, keras.layers.MaxPooling2D):
            order += [nxt, la]
            i += 2
        else:
            order.append(la)
            i += 1
    return keras.Sequential([keras.Input((28, 28, 1)), *order], name="pool_first")


def one_threading_epoch(args) -> None:
    """Child process: set the pools, then warm up and print one default epoch's seconds."""
    import tensorflow as tf

    intra, inter = (int(v) for v in args.child.split(","))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras

    from art_study.config import TrainConfig
    from art_study.models import compile_model, one_hot

    data = load_slice(args.data_dir, args.images)
    x, y = data.x_train, one_hot(data.y_train)
    keras.utils.set_random_seed(0)
    model = compile_model(build(args.n_conv), TrainConfig())
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=1, shuffle=True, verbose=0)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def threading_rounds(args) -> dict[str, float]:
    settings = ["0,0", "2,1", "2,2", "1,2", "1,1"]  # 0 = TF's default (all cores)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        line = []
        for s in settings:
            out = subprocess.run([sys.executable, __file__, "--child", s, "--images",
                                  str(args.images), "--n-conv", str(args.n_conv)]
                                 + (["--data-dir", args.data_dir] if args.data_dir else []),
                                 capture_output=True, text=True, check=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            best[s] = min(best.get(s, t), t)
            line.append(f"intra,inter={s} {t:.2f}s")
        print(f"  round {r + 1}: " + "  ".join(line), flush=True)
    return best


def main() -> None:
    p = argument_parser(__doc__, images=6_000, batch_size=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spe", type=int, default=16, help="steps_per_execution to try")
    p.add_argument("--batches", type=int, nargs="*", default=[256, 512])
    p.add_argument("--no-threads", action="store_true", help="skip the threading processes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        one_threading_epoch(args)
        return

    import keras
    import numpy as np
    import tensorflow as tf

    from art_study.config import TrainConfig
    from art_study.models import compile_model, make_optimizer, one_hot

    data = load_slice(args.data_dir, args.images)
    x, y = data.x_train, one_hot(data.y_train)
    cfg = TrainConfig()

    def fresh(pool_first: bool = False, spe: int = 1) -> keras.Model:
        keras.utils.set_random_seed(0)
        model = compile_model(build(args.n_conv, pool_first), cfg)
        if spe > 1:
            model.compile(optimizer=make_optimizer(cfg), loss=model.loss, metrics=["accuracy"],
                          steps_per_execution=spe)
        return model

    # Same numerics? One epoch of 1024 images from the same init and seed.
    def one_epoch_weights(spe: int) -> list[np.ndarray]:
        model = fresh(spe=spe)
        keras.utils.set_random_seed(1)
        model.fit(x[:1024], y[:1024], batch_size=128, epochs=1, shuffle=True, verbose=0)
        return model.get_weights()

    same = all(np.array_equal(a, b) for a, b in zip(one_epoch_weights(1),
                                                     one_epoch_weights(args.spe), strict=True))

    models = {"default": fresh(), f"spe{args.spe}": fresh(spe=args.spe), "tfdata": fresh(),
              **{f"batch{b}": fresh() for b in args.batches}, "pool_first": fresh(True)}
    ds = (tf.data.Dataset.from_tensor_slices((tf.constant(x), tf.constant(y)))
          .shuffle(len(x), seed=0, reshuffle_each_iteration=True)
          .batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))

    def epoch(name: str, batch: int = 128, sl=slice(None)):
        model = models[name]
        if name == "tfdata":
            return lambda: model.fit(ds if sl == slice(None) else ds.take(4), epochs=1,
                                     verbose=0)
        return lambda: model.fit(x[sl], y[sl], batch_size=batch, epochs=1, shuffle=True,
                                 verbose=0)

    contenders = {name: epoch(name, int(name[5:]) if name.startswith("batch") else 128)
                  for name in models}
    for name in models:  # warm-up: trace
        epoch(name, int(name[5:]) if name.startswith("batch") else 128, slice(0, 1024))()

    print(f"paper CNN, {args.n_conv} conv; epoch of {len(x)} images (× {FULL_TRAIN / len(x):g} "
          f"→ full MNIST), best of {args.rounds} interleaved rounds; {machine_line()}",
          flush=True)
    wall, cpu = interleaved(contenders, args.rounds, print_round)
    base, base_cpu = min(wall["default"]), min(cpu["default"])
    print("in-process options, best round (full-epoch seconds extrapolated; speed-up vs "
          "default, wall and CPU):")
    for name in wall:
        t, c = min(wall[name]), min(cpu[name])
        print(f"  {name:12s} {t:6.2f} s ({c:6.2f} s CPU) → {t * FULL_TRAIN / len(x):6.1f} "
              f"s/epoch   ×{base / t:.2f} (CPU ×{base_cpu / c:.2f})")
    print(f"  spe{args.spe}: weights after one epoch bit-identical to default: {same}")

    if not args.no_threads:
        print("threading (intra_op, inter_op; 0 = TF default), one process per setting:",
              flush=True)
        best = threading_rounds(args)
        for s, t in best.items():
            print(f"  intra,inter={s}  {t:6.2f} s → {t * FULL_TRAIN / len(x):6.1f} s/epoch   "
                  f"×{best['0,0'] / t:.2f} vs TF default")


if __name__ == "__main__":
    main()
