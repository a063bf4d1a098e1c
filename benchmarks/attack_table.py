"""Accuracy and wall time of every configured attack on trained models from a stage cache.

Evaluates each given stage's model with a config's ``evaluation`` section (the FGSM sweep, the
stronger attacks, transfer from the first model given, the diagnostics) and prints one table:
accuracy per attack and ε, each attack's wall time, and the gradient-masking verdict, e.g. on
the study's fully trained models::

    python benchmarks/attack_table.py --config configs/paper.yaml \\
        --cache-dir /root/art-study-runs/stage-cache control=KEY at=KEY dd=KEY gm=KEY

The first model is the transfer source (give the undefended control first).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from art_study.config import load_config
from art_study.data import load_mnist
from art_study.evaluation import craft_transfer, evaluate
from art_study.models import compile_model
from art_study.study.cache import StageCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/paper.yaml")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("models", nargs="+", help="name=stage_key (the control first)")
    args = ap.parse_args()

    import art_study.defenses  # noqa: F401  (registers the masking layers for loading)

    cfg = load_config(args.config)
    data = load_mnist(args.data_dir)
    cache = StageCache(args.cache_dir)
    rows, crafted = [], None
    for item in args.models:
        name, _, key = item.partition("=")
        model = compile_model(cache.load_model(key), cfg.train)
        t0 = time.perf_counter()
        result = evaluate(model, data.x_test, data.y_test, cfg.evaluation, progress=False,
                          transfer_set=crafted)
        row = {"model": name, "eval_s": round(time.perf_counter() - t0)}
        for k, v in result.metrics.items():
            if "/accuracy_eps_" in k and (k.startswith(("attack/", "transfer/", "diag/pgd"))
                                          or k.endswith(("_0.1", "_0.3"))):
                row[k.replace("/accuracy_eps_", "@")] = round(100 * v, 1)
            elif k.endswith("/time_s") and k.startswith(("attack/", "transfer/", "diag/")):
                row[k] = round(v, 1)
        row["clean"] = round(100 * result.metrics["clean/accuracy"], 2)
        row["suspected"] = result.tags["gradient_masking_suspected"]
        row["reasons"] = result.tags.get("gradient_masking_reasons", "")
        rows.append(row)
        print(f"{name}: done in {row['eval_s']} s", flush=True)
        if crafted is None and cfg.evaluation.transfer:  # the control: craft on it once
            crafted = craft_transfer(model, data.x_test, data.y_test, cfg.evaluation)
    table = pd.DataFrame(rows).set_index("model").T
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 400,
                           "display.width", 250):
        print(table.to_string())


if __name__ == "__main__":
    main()
