"""What every benchmark shares: quiet TF, the data, and interleaved best-of-N timing.

The machine is shared and loaded, so a benchmark never times one contender after the other: it
runs them in rounds (A, B, C, A, B, C, ...) and keeps each one's best round, which is the
figure least disturbed by the neighbours. Absolute figures are printed with the ratios.

Each round records wall time and the process's CPU time (user + system, all threads). On a
loaded machine the wall time swings with the neighbours (a contender can be descheduled for
seconds), while the CPU time measures the work done; both are printed, and where they disagree
the CPU-time ratio is the more trustworthy comparison (it does not credit a contender for a
quiet moment). On an idle machine they tell the same story.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*PyTorch not found.*")

FULL_TRAIN = 60_000  # MNIST's training set: the study's epoch


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int,
                on_round: Callable[[int, dict[str, tuple[float, float]]], None] | None = None
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, CPU seconds) of each contender in every round, run in turn each round."""
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        this_round = {}
        for name, fn in contenders.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            this_round[name] = (time.perf_counter() - t0, time.process_time() - c0)
            wall[name].append(this_round[name][0])
            cpu[name].append(this_round[name][1])
        if on_round is not None:
            on_round(r, this_round)
    return wall, cpu


def print_round(r: int, seconds: dict[str, tuple[float, float]]) -> None:
    """One line per round (wall / CPU seconds), so a reader sees the noise best-of hides."""
    print(f"  round {r + 1}: " + "  ".join(f"{k} {w:.2f}/{c:.2f}s" for k, (w, c) in
                                          seconds.items()), flush=True)


def argument_parser(doc: str, *, images: int, batch_size: int | None = 128
                    ) -> argparse.ArgumentParser:
    """The options every model benchmark takes: depth, images, batch size and the data."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--n-conv", type=int, default=2)
    p.add_argument("--images", type=int, default=images)
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--data-dir", default=os.environ.get("ART_STUDY_DATA_DIR"))
    return p


def load_slice(data_dir: str | None, n_train: int, n_test: int = 100, seed: int = 0):
    """A class-stratified MNIST slice (the full training set when ``n_train`` is 60 000)."""
    from art_study.data import load_mnist

    if n_train >= FULL_TRAIN:
        return load_mnist(data_dir, seed=seed)
    return load_mnist(data_dir, n_train=n_train, n_test=n_test, seed=seed)


def machine_line() -> str:
    """CPU count and load, printed with every result (the figures depend on both)."""
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def model_passes(model, batch_size: int):
    """The two passes every attack is made of, compiled, on a fixed batch of uniform images:
    ``(forward, forward_backward)``, each a no-argument call that returns a NumPy array
    (so the timing includes the wait for the result). The loss is computed in float32 whatever
    the model's compute type, as the attacks do."""
    import numpy as np
    import tensorflow as tf

    shape, n_classes = model.input_shape[1:], model.output_shape[-1]
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (batch_size, *shape)), tf.float32)
    y = tf.one_hot(tf.zeros(batch_size, tf.int32), n_classes)

    @tf.function
    def forward(v):
        return model(v, training=False)

    @tf.function
    def forward_backward(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = tf.cast(model(v, training=False), tf.float32)
            loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, v)

    return (lambda: forward(x).numpy()), (lambda: forward_backward(x).numpy())
