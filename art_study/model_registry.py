"""Registered models carry their robustness: ``art-study register RUN_ID --name NAME``.

A run's model becomes a version of ``NAME`` in the MLflow Model Registry, tagged with what the
run measured (clean accuracy, the worst case at each ε, the gradient-masking verdict, the
attacks and their budgets), so the registry answers "how robust is this version" without the
runs. The alias ``@most-robust`` then points at the version with the highest worst-case
accuracy at its headline ε (:func:`art_study.run_page.headline`) among those no masking check
flags, so ``art-study evaluate models:/NAME@most-robust`` (or any MLflow client) gets it.

A study with ``study.register: true`` registers each of its runs' models under the study's name
once (a run already registered there is not registered again).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from art_study.errors import TrackingError
from art_study.run_page import curve_points, headline, masking_verdict

ALIAS = "most-robust"
PREFIX = "robustness."
HEADLINE_TAG = f"{PREFIX}headline_worst_case"
MASKING_TAG = f"{PREFIX}gradient_masking"


class RegistryError(TrackingError):
    """A run cannot be registered: unknown, without a model, or a store without a registry."""


@dataclass(frozen=True)
class Registered:
    """One registration: the version created (or found), and where the alias points now."""

    name: str
    version: str
    tags: dict[str, str]
    most_robust: str | None  # the version @most-robust names, None if no version qualifies


def robustness_tags(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, str]:
    """A run's robustness as model-version tags (``robustness.*``)."""
    points = curve_points(metrics)
    out = {f"{PREFIX}clean_accuracy": f"{metrics['clean/accuracy']:.4f}",
           MASKING_TAG: masking_verdict(tags)}
    worst = points[points["attack"] == "worst case"]
    for eps, accuracy in zip(worst["eps"], worst["accuracy"], strict=True):
        out[f"{PREFIX}worst_case.eps_{eps:g}"] = f"{accuracy:.4f}"
    top = headline(points)
    if top is not None:
        out[f"{PREFIX}headline_eps"] = f"{top[0]:g}"
        out[HEADLINE_TAG] = f"{top[1]:.4f}"
    attacks = [a for a in dict.fromkeys(points["key"]) if a != "robust"]
    out[f"{PREFIX}attacks"] = ", ".join(attacks)
    for attack in attacks:
        rows = points[points["key"] == attack]
        budget = [f"ε {','.join(f'{e:g}' for e in rows['eps'])}",
                  f"n_images {rows['n_images'].max():.0f}"]
        budget += [f"{k} {v:g}" for k, v in _budget(metrics, attack).items()]
        out[f"{PREFIX}budget.{attack}"] = "; ".join(budget)
    return out


def _budget(metrics: dict[str, float], attack: str) -> dict[str, float]:
    """The budget figures an attack logged beside its accuracies (iterations, restarts...)."""
    prefix = f"attack/{attack}/"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)
            and "/" not in k[len(prefix):] and not k[len(prefix):].startswith("accuracy_")
            and k[len(prefix):] not in ("time_s", "n_images")}


def check_registry(uri: str) -> None:
    """A plain file store has no model registry MLflow 3 serves: say so in one line."""
    from art_study.tracking import redact

    parsed = urlparse(uri)
    if parsed.scheme == "file" or (parsed.scheme == "" and uri):
        raise RegistryError(f"tracking store {redact(uri)} is a plain file store, which has no "
                            "model registry here; use sqlite:///PATH/mlflow.db or a tracking "
                            "server")


def register_run(run_id: str, name: str, tracking_uri: str | None = None) -> Registered:
    """Register run ``run_id``'s model as a version of ``name`` with its robustness tags, and
    move ``@most-robust``. A run already registered under ``name`` keeps its version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from art_study.tracking import redact, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_registry(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no run {run_id} in the store {redact(uri)}") from None
        raise RegistryError(f"cannot read run {run_id}: {_first_line(exc)}") from None
    if "clean/accuracy" not in run.data.metrics:
        raise RegistryError(f"run {run_id} has no evaluation to register (no clean/accuracy)")
    source = f"runs:/{run_id}/model"
    try:
        info = mlflow.models.get_model_info(source)
    except (MlflowException, OSError):
        raise RegistryError(f"run {run_id} has no logged model (was tracking.log_model "
                            "false?)") from None
    if getattr(info, "model_id", None):  # MLflow 3 keeps it as a logged model
        source = f"models:/{info.model_id}"
    tags = robustness_tags(run.data.metrics, run.data.tags)
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = found[0] if found else mlflow.register_model(source, name, tags=tags)
        best = update_alias(client, name)
    except MlflowException as exc:
        raise RegistryError(f"cannot register run {run_id} as {name} in {redact(uri)}: "
                            f"{_first_line(exc)}") from None
    return Registered(name, str(version.version), tags, best)


def update_alias(client, name: str) -> str | None:
    """Point ``@most-robust`` at the version of ``name`` with the highest worst case at its
    headline ε that no masking check flags (the newest on a tie); returns that version."""
    best = None
    for v in client.search_model_versions(f"name = '{name}'"):
        if HEADLINE_TAG not in v.tags or v.tags.get(MASKING_TAG) == "suspected":
            continue
        key = (float(v.tags[HEADLINE_TAG]), int(v.version))
        if best is None or key > best[0]:
            best = (key, str(v.version))
    if best is None:
        return None
    client.set_registered_model_alias(name, ALIAS, best[1])
    return best[1]


def register_study(run_ids: list[str], name: str, tracking_uri: str | None) -> list[Registered]:
    """``study.register: true``: every run of the study, under the study's name."""
    return [register_run(run_id, name, tracking_uri) for run_id in run_ids]


def describe(done: Registered) -> str:
    """What ``art-study register`` prints."""
    t = done.tags
    worst = (f"worst case {t[HEADLINE_TAG]} at ε={t[f'{PREFIX}headline_eps']}"
             if HEADLINE_TAG in t else "no worst case")
    alias = (f"@{ALIAS} → version {done.most_robust}" if done.most_robust else
             f"no version qualifies for @{ALIAS} (each is flagged for gradient masking)")
    return (f"{done.name} version {done.version}: clean {t[f'{PREFIX}clean_accuracy']}, "
            f"{worst}, gradient masking {t[MASKING_TAG]}; {alias}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
