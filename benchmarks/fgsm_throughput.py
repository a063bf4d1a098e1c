"""FGSM throughput: our compiled GradientTape FGSM against ART's FastGradientMethod.

Same model (the paper CNN, briefly trained), same images and labels, same ε, measured in one
process and interleaved (ours, ART, ours, ART, ...) so a noisy shared machine hits both alike.
Prints images/s of each, the ratio, and checks that both produced the same images.

    .venv/bin/python benchmarks/fgsm_throughput.py [--n-conv 2] [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*PyTorch not found.*")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-conv", type=int, default=2)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=os.environ.get("ART_STUDY_DATA_DIR"))
    args = p.parse_args()

    import keras
    import numpy as np

    from art_study.attacks import FGSM, art_fgsm
    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.models import build_cnn, compile_model, one_hot, to_art

    data = load_mnist(args.data_dir, n_train=5000, n_test=args.images, seed=0)
    keras.utils.set_random_seed(0)
    model = compile_model(build_cnn(ModelConfig(n_conv=args.n_conv)), TrainConfig())
    model.fit(data.x_train, one_hot(data.y_train), epochs=1, batch_size=128, verbose=0)
    x, y = data.x_test, one_hot(data.y_test)
    ours, classifier = FGSM(model, batch_size=args.batch_size), to_art(model)
    ours.warm_up()
    art_fgsm(classifier, x[:10], y[:10], args.eps)  # warm ART's path too

    t_ours, t_art, max_diff = [], [], 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = ours.generate(x, y, args.eps)
        t1 = time.perf_counter()
        b = art_fgsm(classifier, x, y, args.eps, batch_size=args.batch_size)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_art.append(t2 - t1)
        max_diff = max(max_diff, float(np.abs(a - b).max()))

    n = len(x)
    best_ours, best_art = n / min(t_ours), n / min(t_art)
    print(f"paper CNN, {args.n_conv} conv, {n} images, batch {args.batch_size}, ε={args.eps:g}, "
          f"best of {args.repeats}")
    print(f"  ours (compiled GradientTape): {best_ours:8.0f} images/s")
    print(f"  ART FastGradientMethod:       {best_art:8.0f} images/s")
    print(f"  ratio ours/ART: {best_ours / best_art:.2f}x   max|Δ| between them: {max_diff:.1g}")


if __name__ == "__main__":
    main()
