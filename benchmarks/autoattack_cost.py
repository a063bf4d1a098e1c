"""What ``autoattack-standard`` costs on 1 000 test images of a robust model, on this machine.

A robust model is the expensive case: almost no image falls early, so APGD-CE runs 100
iterations, APGD-T 9 × 100 and Square 5 000 queries on nearly every image. Prints the wall and
CPU time of each component with the images it attacked and the robust accuracy after it, the
throughput (image-iterations per second), the bound if *no* image fell (every component on every
image at the measured throughput), and the machine's plain 2-conv epoch time beside them (the
unit costs are stated in, see docs/benchmarks.md). Tracing the compiled loops
(a few seconds) is part of the measured time, as it is in an evaluation.

    PYTHONPATH=. python benchmarks/autoattack_cost.py --model /work/runs-shared/robust-2conv.keras

When ``--model`` is missing, the plain model trained for the epoch timing is attacked: with a
tiny ε (``--eps 0.001``) no image falls, which is exactly the robust model's work (every
component on every clean-correct image), whatever the model. On a loaded machine use fewer
``--images``: the cost is linear in them, and the figures are extrapolated to 1 000.
"""

from __future__ import annotations

import os
import time

from _common import FULL_TRAIN, argument_parser, load_slice, machine_line


def plain_epoch(data, n_conv: int, images: int, batch_size: int):
    """(wall, CPU) seconds of one plain ``fit`` epoch on the full training set (a slice of
    ``images`` timed after a warm-up, extrapolated linearly), and the model it trained."""
    import keras

    from art_study.config import ModelConfig, TrainConfig
    from art_study.models import build_cnn, compile_model, one_hot

    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=n_conv)), TrainConfig(batch_size=batch_size))
    x, y = data.x_train[:images], one_hot(data.y_train[:images])
    model.fit(x[: 10 * batch_size], y[: 10 * batch_size], epochs=1, batch_size=batch_size,
              verbose=0)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)
    scale = FULL_TRAIN / len(x)
    return (time.perf_counter() - t0) * scale, (time.process_time() - c0) * scale, model


def main() -> None:
    p = argument_parser(__doc__, images=1000, batch_size=500)
    p.add_argument("--model", default="/work/runs-shared/robust-2conv.keras")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--epoch-images", type=int, default=12_000)
    p.add_argument("--n-queries", type=int, default=5000)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--plain-epoch", default=None, metavar="WALL,CPU",
                   help="plain-epoch seconds measured earlier (skips the timing; needs --model)")
    args = p.parse_args()

    import keras
    import numpy as np

    import art_study.defenses  # noqa: F401  (custom layers, for loading any saved stage)
    from art_study.attacks.autoattack import COMPONENTS, AutoAttackStandard
    from art_study.models import N_CLASSES

    data = load_slice(args.data_dir, FULL_TRAIN)
    print(machine_line(), flush=True)
    if args.plain_epoch:
        pw, pc = (float(v) for v in args.plain_epoch.split(","))
        plain = None
        print(f"plain 2-conv epoch (given): {pw:.1f} s wall, {pc:.1f} s CPU")
    else:
        pw, pc, plain = plain_epoch(data, 2, args.epoch_images, 128)
        print(f"plain 2-conv epoch (60 000 images, batch 128): {pw:.1f} s wall, {pc:.1f} s CPU",
              flush=True)
    if os.path.exists(args.model):
        model = keras.models.load_model(args.model)
        print(f"model: {args.model}")
    elif plain is None:
        raise SystemExit(f"{args.model} not found (--plain-epoch needs --model)")
    else:
        model = plain
        # one epoch of few steps leaves BatchNorm's running statistics (momentum 0.99) far from
        # the data's: set them to the statistics of 2 000 training images
        bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
        for layer in bns:
            layer.momentum = 0.0
        model(data.x_train[:2000], training=True)
        print(f"model: {args.model} missing; the plain model above (trained on "
              f"{args.epoch_images} images, BatchNorm statistics recalibrated): use a tiny "
              "--eps so that no image falls")

    x, y = data.x_test[: args.images], data.y_test[: args.images]
    clean = np.argmax(model.predict(x, batch_size=500, verbose=0), 1) == y
    print(f"clean accuracy on {len(x)} test images: {clean.mean():.1%}", flush=True)

    aa = AutoAttackStandard(model, max_iter=args.max_iter, n_queries=args.n_queries,
                            batch_size=args.batch_size)
    np.random.seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    fooled, _, after = aa.cascade(x, y, args.eps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    per_image = {"apgd-ce": args.max_iter, "apgd-t": (N_CLASSES - 1) * args.max_iter,
                 "square": args.n_queries}
    bound_wall = bound_cpu = 0.0
    print(f"\nautoattack-standard at ε {args.eps}, batch {args.batch_size}:")
    for name in COMPONENTS:
        w, c, n = aa.costs[name]
        # iterations actually run are at most n × per_image (APGD-T's targets stop early on
        # images already broken): the rates are floors, the bounds ceilings
        work = n * per_image[name]
        if work:
            bound_wall += 1000 * per_image[name] * w / work
            bound_cpu += 1000 * per_image[name] * c / work
        print(f"  {name:8s} {w:7.1f} s wall {c:7.1f} s CPU, {n:4d} images in "
              f"({1e6 * c / max(work, 1):5.0f} µs CPU per image-iteration); "
              f"robust after: {1 - after[name].mean():.1%}")
    print(f"  total    {wall:7.1f} s wall {cpu:7.1f} s CPU; robust accuracy "
          f"{1 - fooled.mean():.1%} (clean {clean.mean():.1%})")
    print(f"  1 000 images, none falling, at these rates: ≈ {bound_wall:.0f} s wall, "
          f"{bound_cpu:.0f} s CPU (= {bound_wall / pw:.1f} / {bound_cpu / pc:.1f} plain epochs)")
    print(machine_line())


if __name__ == "__main__":
    main()
