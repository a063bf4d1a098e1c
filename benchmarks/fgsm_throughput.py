"""FGSM throughput: our compiled GradientTape FGSM against ART's FastGradientMethod.

Same model (the paper CNN, briefly trained), same images and labels, same ε, measured in one
process and interleaved (ours, ART, ours, ART, ...) so a noisy shared machine hits both alike.
Prints images/s of each (best round, wall and per CPU-second), the ratio against the ≥ 2.5×
target, and checks that both produced the same images.

The reference is ART's ``FastGradientMethod`` on ART's stock ``KerasClassifier``, built here
directly: not through ``art_study.models.to_art`` or ``art_study.estimator``, which may wrap
the model in art-study's own faster estimator and would then not measure ART.

With ``--sweep``: the evaluation's FGSM sweep instead, our one-gradient ``FGSM.sweep`` over the
study's six ε against one ``FGSM.generate`` per ε (what the evaluation did before), checked
bit-identical.

    .venv/bin/python benchmarks/fgsm_throughput.py [--n-conv 2] [--images 10000] [--repeats 5]
        [--sweep]
"""

from __future__ import annotations

from _common import argument_parser, interleaved, machine_line, print_round


def main() -> None:
    p = argument_parser(__doc__, images=10_000, batch_size=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true",
                   help="the six-ε sweep: one gradient for all ε vs one per ε")
    args = p.parse_args()

    import keras
    import numpy as np
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import KerasClassifier

    from art_study.attacks import FGSM
    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.models import build_cnn, compile_model, one_hot

    data = load_mnist(args.data_dir, n_train=5000, n_test=args.images, seed=0)
    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=args.n_conv)), TrainConfig())
    model.fit(data.x_train, one_hot(data.y_train), epochs=1, batch_size=128, verbose=0)
    x, y = data.x_test, one_hot(data.y_test)
    ours = FGSM(model, batch_size=args.batch_size)
    classifier = KerasClassifier(model=model, use_logits=True, clip_values=(0.0, 1.0))
    art = FastGradientMethod(classifier, norm=np.inf, eps=args.eps, eps_step=args.eps,
                             targeted=False, num_random_init=0, batch_size=args.batch_size,
                             minimal=False)
    ours.warm_up()
    if args.sweep:
        return sweep(ours, x, y, args)
    art.generate(x=x[:10], y=y[:10])  # warm ART's path too

    out: dict[str, np.ndarray] = {}
    wall, cpu = interleaved(
        {"ours": lambda: out.__setitem__("ours", ours.generate(x, y, args.eps)),
         "art": lambda: out.__setitem__("art", art.generate(x=x, y=y).astype(np.float32))},
        args.repeats, print_round)
    max_diff = float(np.abs(out["ours"] - out["art"]).max())

    n = len(x)
    best_ours, best_art = n / min(wall["ours"]), n / min(wall["art"])
    cpu_ours, cpu_art = n / min(cpu["ours"]), n / min(cpu["art"])
    print(f"paper CNN, {args.n_conv} conv, {n} images, batch {args.batch_size}, ε={args.eps:g}, "
          f"best of {args.repeats}; {machine_line()}")
    print(f"  ours (compiled GradientTape): {best_ours:8.0f} images/s  "
          f"({cpu_ours:6.0f} per CPU-second)")
    print(f"  ART FastGradientMethod:       {best_art:8.0f} images/s  "
          f"({cpu_art:6.0f} per CPU-second)")
    print(f"  ratio ours/ART: {best_ours / best_art:.2f}x wall, {cpu_ours / cpu_art:.2f}x CPU "
          f"(target ≥ 2.5x)   max|Δ| between them: {max_diff:.1g}")


def sweep(ours, x, y, args) -> None:
    """One gradient for every ε against one per ε, the study's default ε, same images."""
    import numpy as np

    from art_study.config import DEFAULT_EPS

    eps_values = list(DEFAULT_EPS)
    ours.warm_up(sweep=True)  # trace the gradient-only function too
    if not ours.gradient_repeats(x[: args.batch_size], y[: args.batch_size]):
        raise SystemExit("the model's gradient is not a function of its input: no sweep")
    out: dict[str, dict] = {}
    wall, cpu = interleaved(
        {"one gradient": lambda: out.__setitem__("one", ours.sweep(x, y, eps_values)),
         "one per ε": lambda: out.__setitem__(
             "per", {e: ours.generate(x, y, e) for e in eps_values})},
        args.repeats, print_round)
    same = all(np.array_equal(out["one"][e], out["per"][e]) for e in eps_values)
    print(f"paper CNN, {args.n_conv} conv, {len(x)} images × {len(eps_values)} ε, batch "
          f"{args.batch_size}, best of {args.repeats}; {machine_line()}")
    for name in wall:
        print(f"  {name:13s} {min(wall[name]):6.2f} s wall  {min(cpu[name]):6.2f} s CPU")
    print(f"  speed-up: {min(wall['one per ε']) / min(wall['one gradient']):.2f}x wall, "
          f"{min(cpu['one per ε']) / min(cpu['one gradient']):.2f}x CPU; bit-identical "
          f"images: {same}")


if __name__ == "__main__":
    main()
