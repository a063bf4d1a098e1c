"""Epoch time: plain Keras training vs ART's AdversarialTrainer vs adversarial_training_fast.

Same paper CNN (fresh weights per contender, same seed), same images, batch 128, FGSM ε 0.3 and
ratio 0.5 for both adversarial paths. Contenders, each timed for one epoch per round, in turn:

- ``plain``: ``model.fit`` as the ``none`` stage runs it (models.compile_model);
- ``art``: ART's ``AdversarialTrainer`` + ``FastGradientMethod`` on the stock
  ``art.estimators.classification.KerasClassifier`` built directly (ART's reference path);
- ``art_to_art`` (``--with-ours``): the same trainer on ``art_study.models.to_art(model)``,
  and ``art_compiled``: on ``art_study.estimator.CompiledKerasClassifier`` where that module
  exists (what the ``adversarial_training`` stage uses): ART's trainer through our estimators;
- ``fast``: ``adversarial_training_fast``'s compiled step (``FGSMTrainer``) under ``fit``.

By default an epoch is a fixed slice of ``--images`` training images and the full-MNIST epoch is
extrapolated linearly (× 60 000 / images: all three loops are per batch, so their cost is
proportional to the number of batches); ``--images 60000`` times real full epochs. Each
contender first runs a short warm-up epoch (tracing), then ``--rounds`` interleaved epochs;
the best round counts.

    .venv/bin/python benchmarks/epoch_time.py [--n-conv 2] [--images 12000] [--rounds 3]
        [--with-ours]
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

from _common import FULL_TRAIN, argument_parser, interleaved, load_slice, machine_line, print_round


@contextlib.contextmanager
def quiet_art():
    """ART's trainer opens a progress bar per epoch; silence it (not part of the work)."""
    from art.defences.trainer import adversarial_trainer
    from tqdm.auto import tqdm, trange

    with mock.patch.multiple(adversarial_trainer,
                             tqdm=functools.partial(tqdm, disable=True),
                             trange=functools.partial(trange, disable=True)):
        yield


def main() -> None:
    p = argument_parser(__doc__, images=12_000)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--with-ours", action="store_true",
                   help="also time ART's trainer on art-study's estimators (to_art, compiled)")
    args = p.parse_args()

    import keras
    import numpy as np
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import KerasClassifier

    from art_study.config import ModelConfig, TrainConfig
    from art_study.defenses import adversarial_training_fast as atf
    from art_study.models import build_cnn, compile_model, one_hot, to_art

    data = load_slice(args.data_dir, args.images)
    x, y = data.x_train, one_hot(data.y_train)
    warm = slice(0, 4 * args.batch_size)
    train_cfg = TrainConfig(batch_size=args.batch_size)

    def fresh() -> keras.Model:
        keras.utils.set_random_seed(0)
        return compile_model(build_cnn(ModelConfig(n_conv=args.n_conv)), train_cfg)

    plain = fresh()

    def plain_epoch(sl=slice(None)):
        plain.fit(x[sl], y[sl], batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)

    def art_trainer(classifier):
        attack = FastGradientMethod(classifier, norm=np.inf, eps=args.eps, eps_step=args.eps,
                                    batch_size=args.batch_size)
        trainer = AdversarialTrainer(classifier, attacks=attack, ratio=args.ratio)

        def epoch(sl=slice(None)):
            with quiet_art():
                trainer.fit(x[sl], y[sl], nb_epochs=1, batch_size=args.batch_size)
        return epoch

    art_epoch = art_trainer(KerasClassifier(model=fresh(), use_logits=True,
                                            clip_values=(0.0, 1.0)))
    ours: dict = {}
    if args.with_ours:
        ours["art_to_art"] = art_trainer(to_art(fresh()))
        try:
            from art_study.estimator import CompiledKerasClassifier
        except ImportError:
            print("(art_study.estimator not found: no art_compiled contender)")
        else:
            ours["art_compiled"] = art_trainer(CompiledKerasClassifier(fresh()))

    fast_model = fresh()
    fast = atf.FGSMTrainer(fast_model, atf.Settings(eps=args.eps, ratio=args.ratio), seed=0)
    fast.compile(optimizer=fast_model.optimizer, loss=fast_model.loss, metrics=["accuracy"])

    def fast_epoch(sl=slice(None)):
        fast.fit(x[sl], y[sl], batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)

    contenders = {"plain": plain_epoch, "art": art_epoch, "fast": fast_epoch, **ours}
    for fn in contenders.values():  # warm-up: trace every compiled function once
        fn(warm)

    n = len(x)
    scale = FULL_TRAIN / n
    print(f"paper CNN, {args.n_conv} conv, batch {args.batch_size}, ε {args.eps:g}, ratio "
          f"{args.ratio:g}; epoch of {n} images, best of {args.rounds} interleaved rounds; "
          f"{machine_line()}", flush=True)
    wall, cpu = interleaved(contenders, args.rounds, print_round)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    labels = {"plain": "plain Keras fit", "art": "ART AdversarialTrainer (stock KerasClassifier)",
              "art_to_art": "ART AdversarialTrainer (art_study to_art)",
              "art_compiled": "ART AdversarialTrainer (CompiledKerasClassifier)",
              "fast": "adversarial_training_fast"}
    extrap = "" if n >= FULL_TRAIN else f", ×{scale:g} → full-MNIST epoch (extrapolated)"
    print(f"epoch time, best round: wall (CPU){extrap}:")
    for k, t in best.items():
        print(f"  {labels[k]:48s} {t:7.2f} s ({best_cpu[k]:6.2f} s CPU) → {t * scale:7.1f} s/epoch"
              f"  {n / t:6.0f} images/s  ×{t / best['plain']:.2f} plain "
              f"(CPU ×{best_cpu[k] / best_cpu['plain']:.2f})")

    def ratio(a: str, b: str) -> str:
        return f"{best[a] / best[b]:.2f}x (CPU {best_cpu[a] / best_cpu[b]:.2f}x)"

    print(f"ratios: ART/plain {ratio('art', 'plain')}   fast/plain {ratio('fast', 'plain')} "
          f"[target ≤ 2.2x]   ART/fast {ratio('art', 'fast')}")

if __name__ == "__main__":
    main()
