"""How close to the machine's limit training runs: GFLOP/s of a training step vs a big matmul.

FLOPs are counted from the model's layers (a multiply-add is 2 FLOPs):

- Conv2D: 2 · H_out · W_out · C_out · (k_h · k_w · C_in) per image, plus the bias;
- Dense: 2 · n_in · n_out per image, plus the bias;
- BatchNorm, ReLU, MaxPool, Dropout: a few FLOPs per element (counted: 4 per BN element, 1 per
  ReLU, 3 per pooled output); small next to the convolutions but not nothing at 28×28.

A training step costs the forward pass, the weight gradients (as many FLOPs as the forward
pass for a conv/dense layer) and the input gradients (the same again, except for the first
layer, whose input gradient is not needed): 3 × forward − first layer's forward, plus 2 × the
forward count of the element-wise layers. The optimizer's update is counted as 10 FLOPs per
weight per step (Adam).

The step is timed as an epoch of ``model.fit`` on ``--images`` training images (what the study
runs), the reference as ``tf.matmul`` of two ``--matmul-n``² float32 matrices (2n³ FLOPs) in a
``tf.function``, interleaved in rounds; best round of each.

    .venv/bin/python benchmarks/train_gflops.py [--n-conv 2] [--images 12000] [--rounds 3]
"""

from __future__ import annotations

from _common import argument_parser, interleaved, load_slice, machine_line, print_round


def forward_flops(model) -> tuple[float, float, float]:
    """Per image: (FLOPs of conv/dense layers, of the first such layer, of element-wise layers)."""
    import keras

    heavy = first = elementwise = 0.0
    for layer in model.layers:
        out = layer.output.shape[1:]
        n_out = float(__import__("math").prod(out))
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            f = n_out * (2.0 * kh * kw * c_in + 1.0)
        elif isinstance(layer, keras.layers.Dense):
            f = n_out * (2.0 * layer.input.shape[-1] + 1.0)
        else:
            if isinstance(layer, keras.layers.BatchNormalization):
                elementwise += 4.0 * n_out
            elif isinstance(layer, keras.layers.MaxPooling2D):
                elementwise += 3.0 * n_out
            elif isinstance(layer, keras.layers.Dropout):
                elementwise += n_out
            continue
        if getattr(layer, "activation", None) is keras.activations.relu:
            elementwise += n_out
        if first == 0.0:
            first = f
        heavy += f
    return heavy, first, elementwise


def main() -> None:
    p = argument_parser(__doc__, images=12_000)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=20, help="products per timed matmul round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import keras
    import tensorflow as tf

    from art_study.config import ModelConfig, TrainConfig
    from art_study.models import build_cnn, compile_model, one_hot

    data = load_slice(args.data_dir, args.images)
    x, y = data.x_train, one_hot(data.y_train)
    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=args.n_conv)),
                          TrainConfig(batch_size=args.batch_size))
    heavy, first, elementwise = forward_flops(model)
    n_weights = sum(int(__import__("math").prod(w.shape)) for w in model.trainable_weights)
    per_image = 3.0 * heavy - first + 3.0 * elementwise
    steps = -(-len(x) // args.batch_size)
    epoch_flops = per_image * len(x) + 10.0 * n_weights * steps

    n = args.matmul_n
    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)

    @tf.function
    def products(a, b):
        out = tf.zeros((n, n))
        for _ in tf.range(args.matmul_reps):
            out += tf.matmul(a, b)
        return out

    def matmul_round():
        products(a, b).numpy()

    def train_round():
        model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)

    products(a, b).numpy()  # trace
    model.fit(x[: 4 * args.batch_size], y[: 4 * args.batch_size], batch_size=args.batch_size,
              epochs=1, verbose=0)
    print(f"paper CNN, {args.n_conv} conv: forward {heavy / 1e6:.2f} MFLOP/image in conv/dense "
          f"(+{elementwise / 1e6:.2f} element-wise), training step {per_image / 1e6:.2f} "
          f"MFLOP/image, {n_weights} weights; epoch of {len(x)} images, batch "
          f"{args.batch_size}; matmul {n}² float32 × {args.matmul_reps}; best of "
          f"{args.rounds}; {machine_line()}", flush=True)
    wall, cpu = interleaved({"matmul": matmul_round, "train": train_round}, args.rounds,
                            print_round)
    matmul_gflops = 2.0 * n**3 * args.matmul_reps / min(wall["matmul"]) / 1e9
    train_gflops = epoch_flops / min(wall["train"]) / 1e9
    # Per CPU-second (all threads): the same work against the same core time, load-proof.
    matmul_cpu = 2.0 * n**3 * args.matmul_reps / min(cpu["matmul"]) / 1e9
    train_cpu = epoch_flops / min(cpu["train"]) / 1e9
    print(f"  float32 matmul {n}²:        {matmul_gflops:7.1f} GFLOP/s wall  "
          f"({matmul_cpu:6.1f} GFLOP per CPU-second)")
    print(f"  training (model.fit epoch): {train_gflops:7.1f} GFLOP/s wall  "
          f"({train_cpu:6.1f} GFLOP per CPU-second; {len(x) / min(wall['train']):.0f} images/s, "
          f"{min(wall['train']):.2f} s/epoch)")
    print(f"  ratio training/matmul: {train_gflops / matmul_gflops:.3f} wall, "
          f"{train_cpu / matmul_cpu:.3f} per CPU-second")

if __name__ == "__main__":
    main()
