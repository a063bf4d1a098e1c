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
its cost in plain epochs of the 2-conv network (a plain epoch timed in the process that
trained the recipe), clean accuracy on the whole validation split, and AutoAttack-standard at
ε 0.3 (APGD-CE → APGD-T → FAB-T → Square, escalated when its Square check fires) on its first
``--n`` images, with each component's figure and compute time; then each recipe against the
first on those images, paired (McNemar's test on the images only one of the two keeps).
``--save DIR`` keeps each recipe's model, its training times, its figures and its per-image
verdicts, named by the recipe: run the same command again after a stop and it resumes
(AutoAttack from its last finished chunk). A recipe may set ``n_conv``.

    PYTHONPATH=$PWD nice python benchmarks/robust_training.py step --images 6000 --rounds 2
    PYTHONPATH=$PWD nice python benchmarks/robust_training.py recipe --n 1000 \
        --recipe '{defense: pgd_adversarial_training, epochs: 7, steps: 7}' \
        --recipe '{defense: pgd_adversarial_training}' --recipe '{defense: trades, beta: 6}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
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
#: The figures file's format, part of its name: a saved recipe evaluated by an older form of
#: this benchmark is read again from its AutoAttack checkpoints (seconds), not misread.
FIGURES_FORMAT = 2


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


def recipes(args: argparse.Namespace, cfg) -> list[tuple[str, int, dict, int]]:
    """(defense, epochs, settings, conv blocks) of each recipe: ``--recipe`` mappings over the
    config's ``defenses:``, else the config's own robust recipes; ``--epochs`` overrides every
    one, ``n_conv`` in a recipe its depth (default ``--n-conv``)."""
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
        n_conv = int(r.pop("n_conv", args.n_conv))
        merged = cfg.model_copy(update={"defenses": {
            **cfg.defenses, defense: {**cfg.defenses.get(defense, {}), **r}}})
        out.append((defense, args.epochs or epochs, resolve_settings(merged, defense), n_conv))
    return out


def validation_accuracy(model, x, y, n: int, batch_size: int, aa_args: dict,
                        checkpoints=None) -> tuple[dict[str, float], np.ndarray]:
    """Clean accuracy on all of ``(x, y)``; on its first ``n``: clean, FGSM and
    AutoAttack-standard at ε 0.3 (settings ``aa_args``) with each component's cumulative figure
    and compute time (the study's evaluation code; ``checkpoints`` lets a stopped AutoAttack
    resume). Also AutoAttack's per-image verdict, which pairs recipes on the same images."""
    from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
    from art_study.config import EvaluationConfig
    from art_study.evaluation import evaluate
    from art_study.models import accuracy
    from art_study.results import Kind

    cfg = EvaluationConfig(
        eps=[EPS], batch_size=batch_size, diagnostics={"enabled": False},
        attacks=[{"name": "autoattack-standard", "eps": [EPS], "n_images": n,
                  "args": aa_args}])
    result = evaluate(model, x[:n], y[:n], cfg, progress=False, checkpoints=checkpoints)
    out = {"val_clean": accuracy(model, x, y), "val_clean_n": result.find(Kind.CLEAN).accuracy,
           "val_fgsm": result.find(Kind.FGSM, eps=EPS).accuracy,
           "val_autoattack": result.find(Kind.ATTACK, "autoattack-standard", EPS).accuracy}
    component_seconds: dict[str, float] = {}
    for c in (*COMPONENTS, *PLUS_COMPONENTS):
        row = result.find(Kind.ATTACK, "autoattack-standard", EPS, component=c)
        if row is not None:
            out[f"val_{c}"] = row.accuracy
            component_seconds[c] = row.seconds
    # AutoAttack's time from its components' recorded times: a chunk read back from a
    # checkpoint brings the time it took, so a resumed evaluation is not reported as cheap
    out["component_seconds"] = component_seconds
    out["autoattack_s"] = sum(component_seconds.values())
    verdict = result.find(Kind.ATTACK, "autoattack-standard", EPS).verdict
    return out, np.asarray(verdict, dtype=bool)


def paired(a: np.ndarray, b: np.ndarray) -> str:
    """McNemar's test between two recipes' AutoAttack verdicts on the same images: the images
    only A keeps, only B keeps, and the two-sided p-value (the report's test)."""
    from art_study.report.statistics import mcnemar

    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p, how = mcnemar(a_only, b_only)
    return f"{a_only} / {b_only} images kept by one only, McNemar p = {p:.2g} ({how})"


def recipe_dir(root: Path, defense: str, epochs: int, settings: dict, n_conv: int,
               args: argparse.Namespace, cfg) -> Path:
    """Where a recipe's model and figures are kept: named by everything that decides the
    model, the config's network and training settings included (its figures are named by
    the evaluation's images and settings inside). Settings added later are left out at the
    value that trains as before, as in stage keys, so saved recipes keep their folders."""
    import hashlib

    from art_study.defenses import DEFENSES
    from art_study.study.plan import key_settings

    settings = key_settings(DEFENSES[defense].settings, settings)
    ident = json.dumps([defense, epochs, settings, n_conv, args.seed, args.images,
                        cfg.model.model_dump(),
                        cfg.train.model_dump(exclude={"steps_per_execution"})],
                       sort_keys=True, default=str)
    return root / f"{defense}-{n_conv}conv-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def autoattack_args(cfg) -> dict:
    """The settings the config's own ``autoattack-standard`` runs with (the study's budget),
    so recipes are judged as the study will judge the winner."""
    return next((dict(a.args) for a in cfg.evaluation.attacks
                 if a.name == "autoattack-standard"), {})


def recipe(args: argparse.Namespace) -> None:
    """Each recipe's training cost in plain epochs and its accuracy on the validation split.

    Resumable with ``--save DIR``: a recipe whose model is saved there is not trained again, one
    whose figures are saved is not evaluated again, and AutoAttack resumes from its checkpoints;
    run the same command again after a stop."""
    import hashlib
    import tempfile

    import keras
    import mlflow

    from art_study import numerics
    from art_study.attacks.autoattack import COMPONENTS, PLUS_COMPONENTS
    from art_study.attacks.checkpoints import Checkpoints
    from art_study.config import load_config
    from art_study.data import load_mnist
    from art_study.defenses import DEFENSES
    from art_study.models import compile_model

    cfg = load_config(args.config)
    todo = recipes(args, cfg)
    root = Path(args.save or tempfile.mkdtemp(prefix="recipes-"))
    mlflow.set_tracking_uri(args.tracking_uri)
    data = load_mnist(args.data_dir, seed=0)  # all 60 000 training images, in file order
    x_val, y_val = data.x_train[-VALIDATION:], data.y_train[-VALIDATION:]
    x_fit = data.x_train[:-VALIDATION][: args.images]
    y_fit = data.y_train[:-VALIDATION][: args.images]
    train_cfg = cfg.train
    print(f"training on {len(x_fit)} images, validating on the last {VALIDATION} training "
          f"images (AutoAttack on the first {min(args.n, VALIDATION)}); kept in {root}; "
          f"{machine_line()}", flush=True)
    plain: tuple[float, float] | None = None  # this process's 2-conv plain epoch, if needed
    rows = []
    with mlflow.start_run(run_name="bench-recipes"):
        for defense, epochs, settings, n_conv in todo:
            where = recipe_dir(root, defense, epochs, settings, n_conv, args, cfg)
            model_cfg = cfg.model.model_copy(update={"n_conv": n_conv})
            print(f"{where.name}: {defense} × {epochs} epochs, {n_conv} conv, {settings}",
                  flush=True)
            if not (where / "train.json").is_file():
                if plain is None:
                    plain = plain_epoch(x_fit, y_fit, cfg.model.model_copy(
                        update={"n_conv": 2}), train_cfg)
                    print(f"plain 2-conv epoch: {plain[0]:.1f} s wall / {plain[1]:.1f} s CPU",
                          flush=True)
                model = _fresh(model_cfg, train_cfg, seed=args.seed)
                ctx = _ctx(x_fit, y_fit, train_cfg, model_cfg, seed=args.seed)
                ctx.progress = args.progress
                w0, c0 = _times()
                DEFENSES[defense].train(model, ctx, epochs,
                                        DEFENSES[defense].settings(**settings))
                w1, c1 = _times()
                where.mkdir(parents=True, exist_ok=True)
                compile_model(model, train_cfg).save(where / "model.keras")
                (where / "train.json").write_text(json.dumps({
                    "train_wall_s": w1 - w0, "train_cpu_s": c1 - c0,
                    "plain_epoch_wall_s": plain[0], "plain_epoch_cpu_s": plain[1],
                    "machine": machine_line(), "numerics": numerics.fingerprint()}, indent=1))
            trained = json.loads((where / "train.json").read_text())
            aa_args = autoattack_args(cfg)
            figures_file = where / (
                "val-" + hashlib.sha256(json.dumps([args.n, aa_args, FIGURES_FORMAT],
                                                   sort_keys=True).encode()
                                        ).hexdigest()[:10] + ".json")
            verdict_file = figures_file.with_suffix(".npy")
            if not (figures_file.is_file() and verdict_file.is_file()):
                model = keras.models.load_model(where / "model.keras")
                keras.utils.set_random_seed(0)
                figures, verdict = validation_accuracy(
                    model, x_val, y_val, args.n, train_cfg.batch_size, aa_args,
                    Checkpoints(where / "checkpoints"))
                np.save(verdict_file, verdict)
                figures_file.write_text(json.dumps({"n": args.n, "autoattack_args": aa_args,
                                                    **figures}, indent=1))
            row = {"recipe": where.name, "defense": defense, "epochs": epochs,
                   "n_conv": n_conv, "settings": settings,
                   "plain_epochs_wall": trained["train_wall_s"] / trained["plain_epoch_wall_s"],
                   "plain_epochs_cpu": trained["train_cpu_s"] / trained["plain_epoch_cpu_s"],
                   **trained, **json.loads(figures_file.read_text())}
            print(json.dumps(row, default=str), flush=True)
            rows.append({**row, "verdict": np.load(verdict_file)})
    print(f"\nvalidation split (last {VALIDATION} training images), ε {EPS}, %; cost in plain "
          "2-conv epochs (CPU / wall), each timed in the process that trained the recipe:")
    for r in rows:
        parts = " → ".join(f"{r[f'val_{c}'] * 100:.1f}" for c in (*COMPONENTS, *PLUS_COMPONENTS)
                           if f"val_{c}" in r)
        print(f"  {r['recipe']}: {r['defense']} × {r['epochs']}, {r['n_conv']} conv: "
              f"{r['plain_epochs_cpu']:.1f} / {r['plain_epochs_wall']:.1f} plain epochs; clean "
              f"{r['val_clean'] * 100:.2f}; on the first {args.n}: clean "
              f"{r['val_clean_n'] * 100:.1f}, AutoAttack {r['val_autoattack'] * 100:.1f} "
              f"({parts}) in {r['autoattack_s'] / 60:.1f} min")
    for r in rows[1:]:
        print(f"  {r['recipe']} against {rows[0]['recipe']}: "
              f"{paired(r['verdict'], rows[0]['verdict'])}")


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
    p.add_argument("--save", default=None,
                   help="recipe: keep each model and its figures here (and resume from them)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    from art_study.errors import ArtStudyError

    try:
        step(args) if args.mode == "step" else recipe(args)
    except ArtStudyError as err:  # a bad config or recipe: one line, not a traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
