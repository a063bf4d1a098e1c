"""Robust training's cost: the compiled PGD step against ART's trainer, and a whole recipe.

Two measurements, each in ONE process so the machine's speed cancels out of the ratios:

``step``: one epoch of ``pgd_adversarial_training`` with ``backend: compiled`` against
``backend: art`` (ART's ``AdversarialTrainerMadryPGD``), same ε, steps, step size, random
start, batch and images, interleaved rounds (best of N, wall and CPU time).

``recipe``: the plain epoch of the same network on full MNIST (the study's control training,
timed before and after), then a robust recipe trained by the study's own stage code (a
``pgd_adversarial_training`` or ``trades`` stage), its cost in plain epochs, then clean accuracy
on the test set and PGD-100 (ART's ``ProjectedGradientDescent``, ε 0.3, step 0.01, one random
start) on the first 1 000 test images. The model is saved (``--save``) for AutoAttack.

    PYTHONPATH=$PWD nice python benchmarks/robust_training.py step --images 6000 --rounds 2
    PYTHONPATH=$PWD nice python benchmarks/robust_training.py recipe \
        --defense pgd_adversarial_training --epochs 7 --set eps_warmup=0.25 \
        --set lr_schedule=onecycle --set peak_lr=0.002 ...
"""

from __future__ import annotations

import argparse
import json
import time

from _common import FULL_TRAIN, interleaved, machine_line, print_round


def _settings(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for p in pairs:
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _ctx(x, y, train_cfg, model_cfg, seed: int = 0):
    from art_study.defenses import StageContext

    return StageContext(x, y, model_cfg, train_cfg, seed, progress=False)


def _fresh(model_cfg, train_cfg, seed: int = 0):
    import keras

    from art_study.models import build_cnn, compile_model

    keras.utils.set_random_seed(seed)
    return compile_model(build_cnn(model_cfg), train_cfg)


def _times() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def step(args: argparse.Namespace) -> None:
    """Per-epoch time of the compiled PGD step against ART's AdversarialTrainerMadryPGD."""
    import mlflow

    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.defenses import DEFENSES

    mlflow.set_tracking_uri(args.tracking_uri)
    data = load_mnist(args.data_dir, n_train=args.images, n_test=100, seed=0)
    model_cfg = ModelConfig(n_conv=args.n_conv)
    train_cfg = TrainConfig(batch_size=args.batch_size, steps_per_execution=16)
    defense = DEFENSES["pgd_adversarial_training"]
    base = {"eps": 0.3, "steps": args.steps, **_settings(args.set)}
    models = {b: _fresh(model_cfg, train_cfg) for b in ("compiled", "art")}

    def epoch(backend: str):
        ctx = _ctx(data.x_train, data.y_train, train_cfg, model_cfg)
        defense.train(models[backend], ctx, 1, defense.settings(**base, backend=backend))

    with mlflow.start_run(run_name="bench-pgd-step"):
        for b in models:  # trace and warm both before timing
            epoch(b)
        wall, cpu = interleaved({b: (lambda b=b: epoch(b)) for b in models}, args.rounds,
                                print_round)
    print(machine_line())
    w = {b: min(v) for b, v in wall.items()}
    c = {b: min(v) for b, v in cpu.items()}
    print(f"PGD-AT epoch on {args.images} images, {args.steps} steps, batch {args.batch_size}: "
          f"compiled {w['compiled']:.1f} s wall / {c['compiled']:.1f} s CPU, "
          f"ART {w['art']:.1f} s / {c['art']:.1f} s -> ART/compiled "
          f"{w['art'] / w['compiled']:.2f}x wall, {c['art'] / c['compiled']:.2f}x CPU")


def plain_epoch(data, model_cfg, train_cfg) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain training epoch on ``data`` (the study's ``none``)."""
    from art_study.defenses import DEFENSES

    model = _fresh(model_cfg, train_cfg, seed=1)
    ctx = _ctx(data.x_train, data.y_train, train_cfg, model_cfg)
    DEFENSES["none"].train(model, ctx, 1, DEFENSES["none"].settings())  # trace, warm
    w0, c0 = _times()
    DEFENSES["none"].train(model, ctx, 1, DEFENSES["none"].settings())
    w1, c1 = _times()
    return w1 - w0, c1 - c0


def pgd_accuracy(model, x, y, eps: float, steps: int, step_size: float) -> float:
    """ART's PGD (one random start) through the repo's compiled classifier."""
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    from art_study.estimator import CompiledKerasClassifier
    from art_study.models import accuracy

    clf = CompiledKerasClassifier(model)
    attack = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=step_size,
                                      max_iter=steps, num_random_init=1, batch_size=500,
                                      verbose=False)
    x_adv = attack.generate(x, y=np.eye(10, dtype=np.float32)[y])
    return accuracy(model, x_adv, y)


def recipe(args: argparse.Namespace) -> None:
    """A robust recipe's training cost in plain epochs, its clean and PGD-100 accuracy."""
    import keras
    import mlflow

    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.defenses import DEFENSES
    from art_study.models import accuracy, compile_model

    mlflow.set_tracking_uri(args.tracking_uri)
    data = load_mnist(args.data_dir, n_train=args.images if args.images < FULL_TRAIN else None,
                      seed=0)
    model_cfg = ModelConfig(n_conv=args.n_conv, dropout=args.dropout)
    train_cfg = TrainConfig(batch_size=args.batch_size, steps_per_execution=16)
    defense = DEFENSES[args.defense]
    settings = defense.settings(**_settings(args.set))
    print(f"{args.defense} {settings.model_dump()} epochs {args.epochs}", flush=True)
    with mlflow.start_run(run_name=f"bench-recipe-{args.defense}"):
        pw0, pc0 = plain_epoch(data, model_cfg, train_cfg)
        print(f"plain epoch (before): {pw0:.1f} s wall / {pc0:.1f} s CPU", flush=True)
        model = _fresh(model_cfg, train_cfg, seed=args.seed)
        ctx = _ctx(data.x_train, data.y_train, train_cfg, model_cfg, seed=args.seed)
        ctx.progress = args.progress
        w0, c0 = _times()
        defense.train(model, ctx, args.epochs, settings)
        w1, c1 = _times()
        pw1, pc1 = plain_epoch(data, model_cfg, train_cfg)
    print(f"plain epoch (after): {pw1:.1f} s wall / {pc1:.1f} s CPU; {machine_line()}",
          flush=True)
    for h in ctx.history:
        print("  epoch", {k: round(v, 4) for k, v in h.items()}, flush=True)
    pw, pc = (pw0 + pw1) / 2, (pc0 + pc1) / 2
    out = {"defense": args.defense, "settings": settings.model_dump(), "epochs": args.epochs,
           "train_wall_s": w1 - w0, "train_cpu_s": c1 - c0, "plain_epoch_wall_s": pw,
           "plain_epoch_cpu_s": pc, "plain_epochs_wall": (w1 - w0) / pw,
           "plain_epochs_cpu": (c1 - c0) / pc}
    print(f"training: {out['train_wall_s'] / 60:.1f} min wall = {out['plain_epochs_wall']:.1f} "
          f"plain epochs (wall), {out['plain_epochs_cpu']:.1f} (CPU)", flush=True)
    model = compile_model(model, train_cfg)
    if args.save:
        model.save(args.save)
        print(f"saved {args.save}", flush=True)
    keras.utils.set_random_seed(0)
    out["clean"] = accuracy(model, data.x_test, data.y_test)
    n = args.eval_images
    out["pgd100_eps0.3"] = pgd_accuracy(model, data.x_test[:n], data.y_test[:n], 0.3, 100, 0.01)
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["step", "recipe"])
    p.add_argument("--n-conv", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5, help="recipe: the network's dropout")
    p.add_argument("--images", type=int, default=FULL_TRAIN)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tracking-uri", default="sqlite:///bench-robust.db")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="step: PGD steps of both trainers")
    p.add_argument("--defense", default="pgd_adversarial_training")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="a defense setting key=value")
    p.add_argument("--save", default=None, help="save the trained model here (.keras)")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    step(args) if args.mode == "step" else recipe(args)


if __name__ == "__main__":
    main()
