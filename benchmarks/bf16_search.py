"""Would bfloat16 make the attacks' search cheaper here? One pass of the paper CNN in float32
against the same weights under Keras' ``mixed_bfloat16`` policy, as a ratio.

Issue 27 allows a faster numeric type for the search only (every reported verdict checked again
in float32). The attacks' cost is passes of the model: APGD and FAB a forward and backward pass
per iteration (the gradient with respect to the input), Square a forward pass per query. So the
lever is worth building only if those two passes are clearly cheaper in bfloat16 on the CPUs
that run the study. This times both, interleaved (float32, bfloat16, float32, ...), best of
``--rounds``, on a batch of the attacks' size, and prints float32 / bfloat16 (> 1: bfloat16 is
faster) with the CPU's bfloat16 instruction sets, which decide whether oneDNN can use it.

    PYTHONPATH=. python benchmarks/bf16_search.py
"""

from __future__ import annotations

from _common import argument_parser, interleaved, machine_line, model_passes, print_round


def main() -> None:
    p = argument_parser(__doc__, images=500, batch_size=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="passes per round")
    args = p.parse_args()

    import keras

    from art_study.config import ModelConfig
    from art_study.models import build_cnn
    from art_study.numerics import fingerprint

    def build(policy: str) -> keras.Model:
        keras.mixed_precision.set_global_policy(policy)
        try:
            return build_cnn(ModelConfig(n_conv=args.n_conv))
        finally:
            keras.mixed_precision.set_global_policy("float32")

    f32, bf16 = build("float32"), build("mixed_bfloat16")
    bf16.set_weights(f32.get_weights())
    (f32_fwd, f32_grad), (bf_fwd, bf_grad) = (model_passes(f32, args.images),
                                              model_passes(bf16, args.images))
    for warm_up in (f32_fwd, f32_grad, bf_fwd, bf_grad):  # trace outside the timing
        warm_up()

    def repeat(fn):
        return lambda: [fn() for _ in range(args.calls)]

    wall, cpu = interleaved({"f32 fwd": repeat(f32_fwd), "bf16 fwd": repeat(bf_fwd),
                             "f32 grad": repeat(f32_grad), "bf16 grad": repeat(bf_grad)},
                            args.rounds, print_round)
    numerics = fingerprint()
    print(f"{machine_line()}; {numerics['cpu']}; ISA {numerics['isa']}; "
          f"oneDNN {numerics['onednn']}")
    for what in ("fwd", "grad"):
        w32, wbf = min(wall[f"f32 {what}"]), min(wall[f"bf16 {what}"])
        c32, cbf = min(cpu[f"f32 {what}"]), min(cpu[f"bf16 {what}"])
        n = args.calls
        print(f"{what:>4} on {args.images} images: float32 {w32 / n * 1e3:.1f} ms, bfloat16 "
              f"{wbf / n * 1e3:.1f} ms wall; float32 / bfloat16 = {w32 / wbf:.2f}x wall, "
              f"{c32 / cbf:.2f}x CPU")


if __name__ == "__main__":
    main()
