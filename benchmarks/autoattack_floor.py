"""What each component of ``autoattack-standard`` costs against its floor, on this machine.

The floor of a component is the passes its algorithm needs on the images it actually attacked,
times the measured cost of one pass: APGD (CE, and targeted per target class) one forward and
backward pass per iteration plus the first; FAB-T per target a forward and backward pass and
a forward pass per iteration; Square one forward pass per query. The passes are counted at
run time by wrapping each component's compiled loop (images in × iterations of that call), so
images a component skipped as already broken are not in its floor. Square drops broken images
only between its chunks of queries (250), so an image broken mid-chunk still costs, and counts
in the floor for, the rest of that chunk: at most 250 passes per broken image, a ratio that
flatters Square by that much when many images fall (on a robust model, few do). One pass is
timed on a full batch (``--batch-size``, or all the images if fewer), best of ``--rounds``; the
ratio cost / floor is what partial batches, tracing, Python between the compiled loops and the
predictions outside them add.

    PYTHONPATH=. python benchmarks/autoattack_floor.py --model path/to/robust-2conv.keras

Without ``--model`` a plain 2-conv model is trained briefly and attacked at a tiny ε
(``--eps 0.001``): no image falls, which is a robust model's workload (every component on every
clean-correct image, all targets, all 5 000 queries), whatever the model's accuracy.
"""

from __future__ import annotations

import os
import time

from _common import argument_parser, load_slice, machine_line, model_passes


def pass_costs(model, batch_size: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per-image (wall, CPU) seconds of a forward pass and of a forward and backward pass on a
    full batch, each the best of ``rounds`` after a warm-up call."""
    import numpy as np

    forward, forward_backward = model_passes(model, batch_size)
    out = {}
    for name, fn in (("f", forward), ("fb", forward_backward)):
        fn()
        best = (np.inf, np.inf)
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(10):
                fn()
            w, c = (time.perf_counter() - t0) / 10, (time.process_time() - c0) / 10
            best = (min(best[0], w), min(best[1], c))
        out[name] = (best[0] / batch_size, best[1] / batch_size)
    return out


def count_passes(aa) -> dict[str, dict[str, int]]:
    """Wrap each component's compiled loop to count the passes it runs: ``{component: {"f": n,
    "fb": n}}`` (image-passes), filled as the cascade runs."""
    counts: dict[str, dict[str, int]] = {}
    running = [""]  # the cascade's component now running: Square serves "square" and
    component = aa._component  # "plus-square" (its restarts) with one object

    def tracked(name, *args):
        running[0] = name
        return component(name, *args)

    aa._component = tracked

    def wrap(obj, name: str, per_call) -> None:
        run = obj._run

        def counted(*args):
            n = int(args[0].shape[0])
            key = running[0] if name == "square" else name
            for kind, k in per_call(args).items():
                counts.setdefault(key, {"f": 0, "fb": 0})[kind] += n * k
            return run(*args)

        obj._run = counted

    wrap(aa.apgd_ce, "apgd-ce", lambda a: {"fb": aa.apgd_ce.n_iter + 1})
    wrap(aa.apgd_t, "apgd-t", lambda a: {"fb": aa.apgd_t.n_iter + 1})
    wrap(aa.fab_t, "fab-t", lambda a: {"fb": aa.fab_t.n_iter, "f": aa.fab_t.n_iter})
    wrap(aa.square, "square", lambda a: {"f": int(a[6]) - int(a[5])})
    for name, apgd in aa.plus_apgd.items():
        wrap(apgd, name, lambda a, apgd=apgd: {"fb": apgd.n_iter + 1})
    return counts


def main() -> None:
    p = argument_parser(__doc__, images=100, batch_size=500)
    p.add_argument("--model", default=None)
    p.add_argument("--eps", type=float, default=None,
                   help="budget (default 0.3 with --model, 0.001 without)")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--n-queries", type=int, default=5000)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plus-square-restarts", type=int, default=1,
                   help="Square's restarts in the escalation (1: robust.yaml and fashion.yaml)")
    args = p.parse_args()

    import keras
    import numpy as np

    import art_study.defenses  # noqa: F401  (custom layers, for loading any saved stage)
    from art_study.attacks.autoattack import AutoAttackStandard

    data = load_slice(args.data_dir, args.train_images, n_test=max(args.images, 100))
    print(machine_line(), flush=True)
    if args.model:
        if not os.path.exists(args.model):
            raise SystemExit(f"{args.model} not found")
        model = keras.models.load_model(args.model)
        eps = 0.3 if args.eps is None else args.eps
        print(f"model: {args.model}")
    else:
        from autoattack_cost import plain_epoch

        *_, model = plain_epoch(data, args.n_conv, args.train_images, 128)
        for layer in model.layers:  # running statistics of the data, not of a few steps
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        model(data.x_train[:2000], training=True)
        eps = 0.001 if args.eps is None else args.eps
        print(f"model: a plain {args.n_conv}-conv CNN trained one epoch on "
              f"{args.train_images} images, attacked at ε {eps:g} (a robust model's workload)")

    x, y = data.x_test[: args.images], data.y_test[: args.images]
    batch = min(args.batch_size, len(x))  # the batches the cascade runs (at most)
    costs = pass_costs(model, batch, args.rounds)
    aa = AutoAttackStandard(model, max_iter=args.max_iter, n_queries=args.n_queries,
                            batch_size=args.batch_size,
                            plus_square_restarts=args.plus_square_restarts)
    # Square runs its forward passes at its own, larger batch: its floor is timed there
    square_f = pass_costs(model, min(aa.square.batch_size, len(x)), args.rounds)["f"]
    print(f"one pass per image at batch {batch}: forward "
          f"{1e6 * costs['f'][1]:.0f} µs CPU ({1e6 * costs['f'][0]:.0f} wall), forward+backward "
          f"{1e6 * costs['fb'][1]:.0f} µs CPU ({1e6 * costs['fb'][0]:.0f} wall)", flush=True)

    counts = count_passes(aa)
    np.random.seed(0)
    fooled, _, after = aa.cascade(x, y, eps)

    print(f"\nautoattack-standard on {len(x)} images at ε {eps:g} (cost / floor, CPU and wall):")
    tot = np.zeros(4)
    for name, (w, c, n) in aa.costs.items():
        k = counts.get(name, {"f": 0, "fb": 0})
        f = square_f if name.endswith("square") else costs["f"]
        floor_c = k["f"] * f[1] + k["fb"] * costs["fb"][1]
        floor_w = k["f"] * f[0] + k["fb"] * costs["fb"][0]
        tot += (c, w, floor_c, floor_w)
        ratio = (f"{c / floor_c:5.2f}× CPU {w / floor_w:5.2f}× wall" if floor_c else
                 "  no passes")
        print(f"  {name:14s} {n:5d} images, {k['fb']:8d} fwd+bwd {k['f']:9d} fwd; "
              f"{c:7.1f} s CPU vs floor {floor_c:7.1f} s: {ratio}; "
              f"robust after {1 - after[name].mean():.1%}", flush=True)
    print(f"  {'total':14s} {tot[0]:7.1f} s CPU vs floor {tot[2]:7.1f} s: {tot[0] / tot[2]:.2f}× "
          f"CPU, {tot[1]:.1f} s wall vs {tot[3]:.1f} s: {tot[1] / tot[3]:.2f}× wall; "
          f"robust accuracy {1 - fooled.mean():.1%}; Square check "
          f"{'fired (escalated)' if aa.escalated else 'quiet'}")
    print(machine_line())


if __name__ == "__main__":
    main()
