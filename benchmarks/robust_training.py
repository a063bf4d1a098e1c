"""Robust training's cost: the compiled PGD step against ART's trainer, and robust recipes.

Two measurements, each in ONE process so the machine's speed cancels out of the ratios:

``step``: one epoch of ``pgd_adversarial_training`` with ``backend: compiled`` against
``backend: art`` (ART's ``AdversarialTrainerMadryPGD``), same ε, steps, step size, random
start, batch and images, interleaved rounds (best of N, wall and CPU time).

``recipe``: the recipes to choose between, on a validation split held out from the training
set: the last 5 000 training images are never trained on, and the test set is never looked
at (it gives only the study's final figures). Each recipe (``--recipe``, a YAML mapping: the
defense, optionally its epochs, and the settings that differ from ``--config``'s ``defenses:``
section; by default the config's own recipes) is trained by the study's own stage code on the
rest of the training set, with the config's model and training settings. Printed for each:
its cost in plain epochs of the same network (a plain epoch timed before and after all
recipes), clean accuracy on the whole validation split, and AutoAttack-standard at ε 0.3
(APGD-CE → APGD-T → FAB-T → Square, escalated when its Square check fires) on its first
``--n`` images, with each component's figure. ``--save DIR`` keeps each model.

    PYTHONPATH=$PWD nice python benchmarks/robust_training.py step --images 6000 --rounds 2
    PYTHONPATH=$PWD nice python benchmarks/robust_training.py recipe --n 1000 \
        --recipe '{defense: pgd_adversarial_training, epochs: 7, steps: 7}' \
        --recipe '{defense: pgd_adversarial_training}' --recipe '{defense: trades, beta: 6}'
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


#: The last training images, held out of every recipe's training: where recipes are compared.
VALIDATION = 5000
EPS = 0.3


def plain_epoch(x, y, model_cfg, train_cfg) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain training epoch on ``(x, y)`` (the study's ``none``)."""
    from art_study.defenses import DEFENSES

    model = _fresh(model_cfg, train_cfg, seed=1)
    ctx = _ctx(x, y, train_cfg, model_cfg)
    DEFENSES["none"].train(model, ctx, 1, DEFENSES["none"].settings())  # trace, warm
    w0, c0 = _times()
    DEFENSES["none"].train(model, ctx, 1, DEFENSES["none"].settings())
    w1, c1 = _times()
    return w1 - w0, c1 - c0


def recipes(args: argparse.Namespace, cfg) -> list[tuple[str, int, dict]]:
    """(defense, epochs, settings) of each recipe: ``--recipe`` mappings over the config's
    ``defenses:``, else the config's own robust recipes; ``--epochs`` overrides every one."""
    import yaml

    from art_study.study.plan import resolve_settings

    given = [yaml.safe_load(r) for r in args.recipe] or [
        {"defense": d} for d in cfg.defenses if d in ("pgd_adversarial_training", "trades")]
    out = []
    for r in given:
        if not isinstance(r, dict) or "defense" not in r:
            raise SystemExit(f"--recipe needs a mapping with a defense, got {r!r}")
        r = dict(r)
        defense, epochs = r.pop("defense"), r.pop("epochs", cfg.study.stage_epochs[0])
        merged = cfg.model_copy(update={"defenses": {
            **cfg.defenses, defense: {**cfg.defenses.get(defense, {}), **r}}})
        out.append((defense, args.epochs or epochs, resolve_settings(merged, defense)))
    return out


def validation_accuracy(model, x, y, n: int, batch_size: int) -> dict[str, float]:
    """Clean accuracy on all of ``(x, y)``; on its first ``n``: clean, FGSM and
    AutoAttack-standard at ε 0.3 with each component's cumulative figure (the study's
    evaluation code)."""
    from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
    from art_study.config import EvaluationConfig
    from art_study.evaluation import evaluate
    from art_study.models import accuracy
    from art_study.results import Kind

    cfg = EvaluationConfig(
        eps=[EPS], batch_size=batch_size, diagnostics={"enabled": False},
        attacks=[{"name": "autoattack-standard", "eps": [EPS], "n_images": n}])
    result = evaluate(model, x[:n], y[:n], cfg, progress=False)
    out = {"val_clean": accuracy(model, x, y), "val_clean_n": result.find(Kind.CLEAN).accuracy,
           "val_fgsm": result.find(Kind.FGSM, eps=EPS).accuracy,
           "val_autoattack": result.find(Kind.ATTACK, "autoattack-standard", EPS).accuracy}
    for c in (*COMPONENTS, *PLUS_COMPONENTS):
        row = result.find(Kind.ATTACK, "autoattack-standard", EPS, component=c)
        if row is not None:
            out[f"val_{c}"] = row.accuracy
    return out


def recipe(args: argparse.Namespace) -> None:
    """Each recipe's training cost in plain epochs and its accuracy on the validation split."""
    import keras
    import mlflow

    from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
    from art_study.config import load_config
    from art_study.data import load_mnist
    from art_study.defenses import DEFENSES
    from art_study.models import compile_model

    cfg = load_config(args.config)
    todo = recipes(args, cfg)
    mlflow.set_tracking_uri(args.tracking_uri)
    data = load_mnist(args.data_dir, seed=0)  # all 60 000 training images, in file order
    x_val, y_val = data.x_train[-VALIDATION:], data.y_train[-VALIDATION:]
    x_fit = data.x_train[:-VALIDATION][: args.images]
    y_fit = data.y_train[:-VALIDATION][: args.images]
    model_cfg = cfg.model.model_copy(update={"n_conv": args.n_conv})
    train_cfg = cfg.train
    print(f"training on {len(x_fit)} images, validating on the last {VALIDATION} training "
          f"images (AutoAttack on the first {min(args.n, VALIDATION)}); {machine_line()}",
          flush=True)
    rows = []
    with mlflow.start_run(run_name="bench-recipes"):
        pw0, pc0 = plain_epoch(x_fit, y_fit, model_cfg, train_cfg)
        print(f"plain epoch (before): {pw0:.1f} s wall / {pc0:.1f} s CPU", flush=True)
        trained = []
        for i, (defense, epochs, settings) in enumerate(todo):
            print(f"[{i}] {defense} × {epochs} epochs {settings}", flush=True)
            model = _fresh(model_cfg, train_cfg, seed=args.seed)
            ctx = _ctx(x_fit, y_fit, train_cfg, model_cfg, seed=args.seed)
            ctx.progress = args.progress
            w0, c0 = _times()
            DEFENSES[defense].train(model, ctx, epochs, DEFENSES[defense].settings(**settings))
            w1, c1 = _times()
            trained.append((compile_model(model, train_cfg), w1 - w0, c1 - c0))
        pw1, pc1 = plain_epoch(x_fit, y_fit, model_cfg, train_cfg)
    print(f"plain epoch (after): {pw1:.1f} s wall / {pc1:.1f} s CPU; {machine_line()}",
          flush=True)
    pw, pc = (pw0 + pw1) / 2, (pc0 + pc1) / 2
    for i, ((defense, epochs, settings), (model, wall, cpu)) in enumerate(
            zip(todo, trained, strict=True)):
        if args.save:
            model.save(f"{args.save}/recipe-{i}.keras")
        keras.utils.set_random_seed(0)
        row = {"recipe": i, "defense": defense, "epochs": epochs, "settings": settings,
               "train_wall_s": wall, "plain_epochs_wall": wall / pw, "plain_epochs_cpu": cpu / pc,
               **validation_accuracy(model, x_val, y_val, args.n, train_cfg.batch_size)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\nvalidation split (last {VALIDATION} training images), ε {EPS}, %; cost in plain "
          "epochs (CPU / wall):")
    for r in rows:
        parts = " → ".join(f"{r[f'val_{c}'] * 100:.1f}" for c in (*COMPONENTS, *PLUS_COMPONENTS)
                           if f"val_{c}" in r)
        print(f"  [{r['recipe']}] {r['defense']} × {r['epochs']}: "
              f"{r['plain_epochs_cpu']:.1f} / {r['plain_epochs_wall']:.1f} plain epochs; clean "
              f"{r['val_clean'] * 100:.2f}; on the first {args.n}: clean "
              f"{r['val_clean_n'] * 100:.1f}, AutoAttack {r['val_autoattack'] * 100:.1f} "
              f"({parts})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["step", "recipe"])
    p.add_argument("--n-conv", type=int, default=2)
    p.add_argument("--images", type=int, default=FULL_TRAIN,
                   help="step: training images; recipe: the first of the training split")
    p.add_argument("--batch-size", type=int, default=128, help="step: the batch")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tracking-uri", default="sqlite:///bench-robust.db")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="step: PGD steps of both trainers")
    p.add_argument("--set", action="append", default=[], help="step: a setting key=value")
    p.add_argument("--config", default="configs/robust.yaml",
                   help="recipe: the model, training and defense settings recipes start from")
    p.add_argument("--recipe", action="append", default=[],
                   help="recipe: a YAML mapping {defense: ..., epochs: ..., <setting>: ...}")
    p.add_argument("--epochs", type=int, default=None, help="recipe: every recipe's epochs")
    p.add_argument("--n", type=int, default=1000,
                   help="recipe: validation images AutoAttack attacks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="recipe: save each model in this directory")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    from art_study.errors import ArtStudyError

    try:
        step(args) if args.mode == "step" else recipe(args)
    except ArtStudyError as err:  # a bad config or recipe: one line, not a traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
