"""What AutoAttack's chunk size costs: the same images attacked in chunks of 1 000, 500, 250.

A long evaluation is resumable per chunk (``chunk_images``, each chunk seeded by itself and
checkpointed), so a process stopped midway loses on average half a chunk of work per task: on a
robust model AutoAttack takes about 1.4 s of this machine per image, 24 min per 1 000-image
chunk, and a study stopped at the end of every working session loses that much each time.
Smaller chunks lose less, but each component then runs on smaller batches. This measures the
second effect: the cascade's CPU time at each chunk size, interleaved in rounds (best round
kept), as a ratio to the first of ``--chunks``. Budgets are cut (``--max-iter``,
``--n-queries``) so a round takes a minute; at the full budget a chunk's fixed costs (tracing,
Python between the loops) weigh less, so the ratios should be closer to 1 (not measured).

    PYTHONPATH=. python benchmarks/autoattack_chunks.py --model path/to/robust-2conv.keras

Without ``--model`` a plain 2-conv model is trained briefly and attacked at a tiny ε (no image
falls: a robust model's workload).
"""

from __future__ import annotations

from _common import argument_parser, interleaved, load_slice, machine_line, print_round


def main() -> None:
    p = argument_parser(__doc__, images=1000, batch_size=500)
    p.add_argument("--model", default=None)
    p.add_argument("--eps", type=float, default=None,
                   help="default 0.3 with --model, else 0.001")
    p.add_argument("--chunks", default="1000,500,250")
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--n-queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import keras
    import numpy as np

    from art_study.attacks.autoattack import AutoAttackStandard
    from art_study.config import ModelConfig, TrainConfig
    from art_study.models import build_cnn, compile_model, one_hot

    data = load_slice(args.data_dir, 4000, n_test=args.images)
    print(machine_line(), flush=True)
    if args.model:
        model = keras.models.load_model(args.model, compile=False)
    else:
        keras.utils.set_random_seed(0)
        model = compile_model(build_cnn(ModelConfig(n_conv=args.n_conv)), TrainConfig())
        model.fit(data.x_train, one_hot(data.y_train), epochs=1, batch_size=128, verbose=0)
    eps = args.eps if args.eps is not None else (0.3 if args.model else 0.001)
    x, y = data.x_test[: args.images], data.y_test[: args.images]
    sizes = [int(c) for c in args.chunks.split(",")]
    robust: dict[int, float] = {}

    def cascade(chunk: int):
        def run() -> None:
            aa = AutoAttackStandard(model, max_iter=args.max_iter, n_queries=args.n_queries,
                                    batch_size=args.batch_size, escalate=False,
                                    chunk_images=chunk)
            np.random.seed(0)
            fooled, _, _ = aa.cascade(x, y, eps)
            robust[chunk] = 1.0 - float(np.mean(fooled))
        return run

    contenders = {f"chunk {c}": cascade(c) for c in sizes}
    for fn in contenders.values():  # trace every compiled loop once, untimed
        fn()
    wall, cpu = interleaved(contenders, args.rounds, print_round)
    base = f"chunk {sizes[0]}"
    print(f"{len(x)} images, ε {eps}, max_iter {args.max_iter}, n_queries {args.n_queries}, "
          f"batch {args.batch_size}; best of {args.rounds} rounds:")
    for c in sizes:
        name = f"chunk {c}"
        print(f"  {name:>10}: CPU {min(cpu[name]):7.1f} s ({min(cpu[name]) / min(cpu[base]):.2f}×)"
              f"  wall {min(wall[name]):7.1f} s ({min(wall[name]) / min(wall[base]):.2f}×)"
              f"  robust {100 * robust[c]:.1f} %")
    print(machine_line())


if __name__ == "__main__":
    main()
