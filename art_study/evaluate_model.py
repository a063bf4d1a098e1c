"""Evaluate one given model, outside any study: ``art-study evaluate MODEL``.

Reads top to bottom: the config's ``evaluation:`` section (default: the paper study's) →
the store, checked → the model, found, loaded safely and made a logits classifier
(:mod:`art_study.model_source`) → the test data → the very
:func:`art_study.evaluation.evaluate` a study's runs go through → one MLflow run with the same
metric names as a study's runs, tagged ``evaluation_only=true``, ``source_model`` and its
sha256, so the MLflow UI compares it with them.

Everything that can be wrong with the input (the model, its shapes, the data, the store) is
checked before the run starts, so a refusal leaves no run behind; an error during the
evaluation ends the run FAILED with its reason, never RUNNING.

The transfer attacks of the config need a model to craft them on (in a study: the control of
the same depth and seed). ``transfer_from`` names one (any MODEL form); without it they are
skipped and the run says so (tag ``transfer``).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from art_study.attacks.checkpoints import Checkpoints
from art_study.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_mapping,
    flatten,
    load_config,
)
from art_study.datasets import DATASETS, MNIST, dataset_evaluation
from art_study.errors import TrackingError
from art_study.model_source import PreparedModel
from art_study.run_page import DataRef, attacked_eps, dataset_name

log = logging.getLogger(__name__)

#: ``configs/paper.yaml``'s ``evaluation:`` section, the default of ``art-study evaluate``.
#: A Python value rather than a file read at run time: an installed package (a wheel, a
#: container) has no ``configs/`` directory beside it, and this travels with the code in every
#: install mode. ``tests/test_evaluate_cli.py`` checks it equals the shipped file's section.
PAPER_EVALUATION: dict = {
    "eps": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
    "xcheck_images": 2000,
    "batch_size": 500,
    "attacks": [
        {"name": "pgd", "eps": [0.1, 0.3], "n_images": 500},
        {"name": "apgd-ce", "eps": [0.3], "n_images": 200},
        {"name": "apgd-dlr", "eps": [0.3], "n_images": 200},
        {"name": "square", "eps": [0.3], "n_images": 200},
    ],
    "transfer": ["fgsm", "pgd"],
    "diagnostics": {"n_images": 200},
}
#: Test images the model's shapes, softmax and input scale are checked on before the run.
N_PROBE = 500
#: The sections of a config an evaluation uses (logged as params and config.yaml).
SECTIONS = ("seed", "data", "evaluation", "tracking")


def evaluation_config(path: str | Path | None, overrides: list[str]) -> ExperimentConfig:
    """The config file's sections (its ``evaluation:``, ``data:``, ``seed``, ``tracking:``), or
    the paper study's evaluation when no file is given, moved to the dataset's ε budgets
    (:func:`art_study.datasets.dataset_evaluation`); ``--set`` overrides apply to either."""
    if path is not None:
        return load_config(path, overrides)
    data = apply_overrides({}, overrides).get("data", {})
    spec = DATASETS.get(data.get("name") if isinstance(data, dict) else None, MNIST)
    raw = {"name": "evaluate",
           "evaluation": dataset_evaluation(spec, copy.deepcopy(PAPER_EVALUATION))}
    return config_from_mapping(apply_overrides(raw, overrides), "(the paper's evaluation)")


@dataclass
class EvaluateOnly:
    """What ``art-study evaluate`` did: its run, the model as evaluated, every figure."""

    run_id: str
    tracking_uri: str
    prepared: PreparedModel
    metrics: dict[str, float]
    tags: dict[str, str]


def evaluate_model(spec: str, cfg: ExperimentConfig, *, unsafe_load: bool = False,
                   transfer_from: str | None = None, progress: bool = True) -> EvaluateOnly:
    """Evaluate the model ``spec`` (a file, an MLflow model URI or a run id of the store) with
    ``cfg.evaluation`` on the test set of ``cfg.data`` and log one evaluation-only run."""
    import mlflow

    from art_study.attacks.registry import validate_attacks
    from art_study.model_source import load, locate, prepare
    from art_study.study.execute import load_data
    from art_study.tracking import (
        environment_tags,
        failure_reason,
        local_store_path,
        log_keras_model,
        prepare_store,
        redact,
        redact_config,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(cfg.tracking.uri)
    local = local_store_path(uri)
    for named in (spec, transfer_from):  # a run or model of the store is read, not created
        if (named is not None and not Path(named).expanduser().exists() and local is not None
                and not local.exists()):
            raise TrackingError(f"no MLflow store at {local}: {named} names a run or model of "
                                "a store that does not exist")
    experiment_id = prepare_store(cfg.tracking.uri, cfg.tracking.experiment)
    evaluation = cfg.evaluation
    with tempfile.TemporaryDirectory(prefix="art-study-model-") as tmp:
        source = locate(spec, Path(tmp) / "model")
        model = load(source, unsafe=unsafe_load)
        data = load_data(cfg, [cfg.seed])[cfg.seed]
        validate_attacks(evaluation, data.spec)  # on the data's shape, before any attack runs
        x_probe, y_probe = data.x_test[:N_PROBE], data.y_test[:N_PROBE]
        prepared = prepare(model, source, x_probe, y_probe, data.spec)
        reference = None
        if evaluation.transfer and transfer_from is not None:
            ref_source = locate(transfer_from, Path(tmp) / "reference")
            reference = prepare(load(ref_source, unsafe=unsafe_load), ref_source, x_probe,
                                y_probe, data.spec)
    for warning in prepared.warnings:
        log.warning(warning)

    tags = {**environment_tags(), **prepared.tags(), "art_study.role": "evaluation",
            "evaluation_only": "true", "data.source": data.source,
            "data.fingerprint": data.fingerprint}
    if evaluation.transfer:
        tags["transfer"] = (f"crafted on {reference.source.uri} (sha256 "
                            f"{reference.source.sha256})" if reference else
                            "skipped: no --transfer-from model to craft the examples on")
    name = f"evaluate {Path(source.spec).name if source.kind == 'file' else source.spec}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name[:250], tags=tags) as run:
        try:
            shown = redact_config(cfg)  # no credentials of the tracking URI in the run
            mlflow.log_params({k: v for k, v in flatten(shown).items()
                               if k.split(".")[0] in SECTIONS})
            mlflow.log_dict(shown.model_dump(mode="json", include=set(SECTIONS)), "config.yaml")
            metrics, verdict = evaluate_in_run(
                prepared.model, data.x_test, data.y_test, cfg, tags,
                DataRef(dataset_name(cfg.data), data.source, data.fingerprint),
                reference=reference.model if reference else None, progress=progress,
                checkpoints=local_checkpoints(cfg))
            if cfg.tracking.log_model:
                log_keras_model(prepared.model, data.x_test[:2])
        except BaseException as exc:
            mlflow.set_tag("failure_reason", failure_reason(exc))
            raise
    return EvaluateOnly(run.info.run_id, redact(uri), prepared, metrics, {**tags, **verdict})


def local_checkpoints(cfg: ExperimentConfig) -> Checkpoints | None:
    """Where this evaluation's AutoAttack saves its finished chunks, so that the same
    ``art-study evaluate`` run again after a stop resumes: ``checkpoints/`` of the stage cache
    of the config's store when that is a directory (none for an object store)."""
    from art_study.study.execute import cache_dir_for
    from art_study.study.object_cache import is_uri

    where = cache_dir_for(cfg)
    return None if is_uri(where) else Checkpoints(Path(where) / "checkpoints")


def evaluate_in_run(model, x, y, cfg: ExperimentConfig, tags: dict[str, str], data: DataRef,
                    *, reference=None, progress: bool = True,
                    checkpoints: Checkpoints | None = None
                    ) -> tuple[dict[str, float], dict[str, str]]:
    """Inside the active run: evaluate ``model`` on ``x``, ``y`` with ``cfg.evaluation`` (seeded
    by ``cfg.seed``; the transfer attacks crafted on ``reference`` when given; AutoAttack's
    finished chunks saved in ``checkpoints``), then log the metrics, the verdict's tags, the
    results table and the run page. Returns the metrics and the verdict's tags.
    ``art-study evaluate`` and the ``art-robustness`` MLflow evaluator both come through
    here."""
    import mlflow

    from art_study.evaluation import craft_transfer, evaluate
    from art_study.run_page import log_run_page
    from art_study.study.stages import seed_everything
    from art_study.tracking import log_evaluation

    t0 = time.perf_counter()
    crafted = None
    if reference is not None:
        seed_everything(cfg.seed)
        crafted = craft_transfer(reference, x, y, cfg.evaluation)
    seed_everything(cfg.seed)
    result = evaluate(model, x, y, cfg.evaluation, progress=progress, transfer_set=crafted,
                      checkpoints=checkpoints)
    metrics = {**result.metrics, "eval/time_s": time.perf_counter() - t0}
    mlflow.log_metrics(metrics)
    mlflow.set_tags(result.tags)
    log_evaluation(result)
    log_run_page(metrics, {**tags, **result.tags}, data)
    return metrics, result.tags


def accuracy_table(metrics: dict[str, float]):
    """Accuracy per attack (rows, in the order logged) and ε (columns): every
    ``<attack>/accuracy_eps_<ε>`` metric, as a pandas DataFrame; the worst case (``robust``)
    only where a configured attack ran (:func:`~art_study.run_page.attacked_eps`)."""
    import pandas as pd

    attacked = attacked_eps(metrics)
    rows: dict[str, dict[float, float]] = {}
    for key, value in metrics.items():
        attack, sep, eps = key.partition("/accuracy_eps_")
        if sep and not attack.startswith("xcheck") and (
                attack != "robust" or float(eps) in attacked):
            rows.setdefault(attack, {})[float(eps)] = value
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[sorted(table.columns)]
    table.columns = [f"ε={e:g}" for e in table.columns]
    return table


def summary(done: EvaluateOnly) -> str:
    """What the command prints: the model, clean accuracy, the accuracy table, the verdict."""
    m, t, src = done.metrics, done.tags, done.prepared.source
    lines = [f"model {src.uri} (sha256 {src.sha256[:12]}…, output {done.prepared.output}); "
             f"clean accuracy {m['clean/accuracy']:.4f} on {m['eval/n_images']:.0f} test images"]
    table = accuracy_table(m)
    lines.append(table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="—"))
    suspected = t.get("gradient_masking_suspected")
    if suspected is None:
        lines.append("gradient masking: not checked (evaluation.diagnostics.enabled is false)")
    elif suspected == "true":
        lines.append("gradient masking suspected: "
                     + t.get("gradient_masking_reasons", "").replace("; ", "\n  "))
    else:
        masking = {k[len("diag."):]: v for k, v in t.items()
                   if k.startswith("diag.") and not k.startswith("diag.autoattack_")}
        passed = sorted(k for k, v in masking.items() if v.startswith("pass"))
        unchecked = sorted(k for k, v in masking.items() if v.startswith("not evaluated"))
        lines.append(f"gradient masking: not suspected (passed: {', '.join(passed)}"
                     + (f"; not evaluated: {', '.join(unchecked)}" if unchecked else "") + ")")
    if "evaluation_unreliable" in t:  # AutoAttack's own verdict, apart from the masking checks
        detail = t.get("diag.autoattack_square", "").partition(": ")[2]
        detail = detail.removeprefix("evaluation unreliable: ")
        verdict = "UNRELIABLE" if t["evaluation_unreliable"] == "true" else "not flagged"
        lines.append(f"AutoAttack's Square check: evaluation {verdict} ({detail})")
    if "autoattack_warnings" in t:
        lines.append("AutoAttack warnings: " + t["autoattack_warnings"].replace("; ", "\n  "))
    if "transfer" in t and t["transfer"].startswith("skipped"):
        lines.append(f"transfer attacks {t['transfer']}")
    if t.get("gradient_attacks_weakened") == "true":
        lines.append("warning: the model outputs probabilities; gradient-based attacks are "
                     "weakened (tag gradient_attacks_weakened=true)")
    lines.append(f"run {done.run_id} (evaluation_only) in {done.tracking_uri}")
    return "\n".join(lines)
