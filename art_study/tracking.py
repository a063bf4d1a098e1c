"""MLflow: where runs go, and what each run records.

The default store is embedded: a sqlite database ``mlruns/mlflow.db`` with artifacts under
``mlruns/artifacts`` in the working directory (MLflow 3 refuses a plain file store). It is
overridden by ``--tracking-uri`` / the config's ``tracking.uri``, then ``MLFLOW_TRACKING_URI``.

The store is checked *before* any run starts (:func:`prepare_store`), so an unwritable or
unreachable location fails with one line and leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import keras
import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from pydantic import BaseModel

from art_study import numerics
from art_study.errors import TrackingError, TrainingError
from art_study.results import RESULTS_ARTIFACT, EvaluationResult, write_table

DEFAULT_STORE_DIR = Path("mlruns")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
_PACKAGES = ("art-study", "tensorflow", "keras", "adversarial-robustness-toolbox", "mlflow",
             "numpy", "pandas")


# ``scheme://user:password@host``: everything between ``//`` and ``@`` is a credential.
_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")
# ``?token=...``-style query parameters (signed URLs, API keys).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:[\w.-]*(?:token|password|passwd|pwd|secret|key|auth|signature|sig|"
    r"credential)[\w.-]*)=)[^&;#\s]*")


def redact(text: str) -> str:
    """``text`` (a URI, or a message quoting one) without credentials: the user-info part of
    any ``scheme://user:password@host`` and secret-looking query values become ``***``.

    The one place credentials are removed from anything art-study records or shows: params and
    ``config.yaml`` of runs, the report, ``ui``'s output and error messages.
    """
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", text))


def redact_config(cfg: BaseModel) -> BaseModel:
    """A copy of an experiment config with its tracking URI redacted, for recording."""
    uri = getattr(getattr(cfg, "tracking", None), "uri", None)
    if not uri or redact(uri) == uri:
        return cfg
    shown = cfg.model_copy(deep=True)
    shown.tracking.uri = redact(uri)
    return shown


def default_tracking_uri(store_dir: Path = DEFAULT_STORE_DIR) -> str:
    """``sqlite:///<abs>/mlruns/mlflow.db``: the embedded store."""
    return f"sqlite:///{(store_dir.resolve() / DB_NAME)}"


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit URI → $MLFLOW_TRACKING_URI → the embedded default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def local_store_path(uri: str) -> Path | None:
    """Filesystem path behind a ``sqlite:///`` or ``file:`` URI, else None (remote store)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(uri[len("sqlite:///"):])) if uri.startswith("sqlite:///") else None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def _check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise TrackingError(
            f"tracking location not writable: {what} {path} ({exc.strerror or exc})"
        ) from None


def artifact_root_for(uri: str) -> str | None:
    """Artifact location for new experiments: beside the sqlite file for a local store."""
    path = local_store_path(uri)
    if path is None or urlparse(uri).scheme != "sqlite":
        return None
    return (path.parent / ARTIFACTS_DIR).resolve().as_uri()


def prepare_store(uri: str | None, experiment: str) -> str:
    """Point MLflow at the store, check it is usable, and return the experiment id.

    Raises :class:`TrackingError` (one line) when the location cannot be written or reached.
    """
    uri = resolve_tracking_uri(uri)
    local = local_store_path(uri)
    if local is not None:
        if urlparse(uri).scheme == "sqlite":
            _check_writable_dir(local.parent, "database directory")
            _check_writable_dir(local.parent / ARTIFACTS_DIR, "artifact directory")
        else:
            raise TrackingError(
                f"tracking URI {redact(uri)} is a plain file store, which MLflow 3 refuses; "
                f"use sqlite:///PATH/mlflow.db or an http(s) tracking server"
            )
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            return mlflow.create_experiment(experiment, artifact_location=artifact_root_for(uri))
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {experiment!r} is deleted in {redact(uri)}; restore or rename")
        return exp.experiment_id
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"tracking store {redact(uri)} cannot be used: {redact(first)}") from None


def environment_tags() -> dict[str, str]:
    """Package versions, Python, platform, git commit and the numerics fingerprint
    (``numerics.*``, :mod:`art_study.numerics`): what reproducing a run needs.

    The first four are computed once per process (two ``git`` calls and a metadata scan), the
    fingerprint at each call: it reports the process's TensorFlow settings as they are now.
    """
    return {**_environment_tags(), **numerics.tags(numerics.fingerprint())}


@functools.cache
def _environment_tags() -> dict[str, str]:
    tags = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    return tags


def is_environment_tag(name: str) -> bool:
    """Whether ``name`` is one of :func:`environment_tags`' own (MLflow's git tag aside), so a
    reader of the store (``runs.csv``) keeps exactly what was recorded for reproducing a run."""
    return name in ("python", "platform", "git_commit") or name.startswith(("version.",
                                                                            "numerics."))


def git_commit() -> str | None:
    """The commit of the art-study checkout (``+dirty`` if it has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


class EpochRecorder(keras.callbacks.Callback):
    """Hands each epoch's Keras logs plus its wall time to ``sink`` (a stage's ``log_epoch``).

    A Keras callback rather than a hand-written loop around ``fit``, as the Keras examples do.
    """

    def __init__(self, sink: Callable[[dict[str, float]], None]):
        super().__init__()
        self.sink = sink
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["epoch_time_s"] = time.perf_counter() - self._t0
        self.sink(metrics)


class RaiseOnNaN(keras.callbacks.Callback):
    """Stop training with a :class:`TrainingError` as soon as the loss is NaN or infinite.

    Keras' ``TerminateOnNaN`` stops silently and leaves a useless model that would then be
    evaluated and logged as if it were a result; this makes the run end FAILED with the reason.
    """

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(f"training diverged: loss is {float(loss)} at batch {batch}")


def log_keras_model(model: keras.Model, x_example: np.ndarray, name: str = "model") -> None:
    """Log the model as an MLflow Keras model that loads back (``mlflow.keras.load_model``); its
    ``data/model.keras`` is the plain Keras file, so it is not logged a second time.

    Pip requirements are given explicitly: MLflow's inference imports the model in a subprocess,
    which costs tens of seconds per run for nothing we do not already know.
    """
    reqs = [f"{p}=={importlib.metadata.version(p)}" for p in ("tensorflow", "keras")]
    signature = infer_signature(x_example, model.predict(x_example, verbose=0))
    mlflow.keras.log_model(model, name=name, pip_requirements=reqs, signature=signature)


def failure_reason(exc: BaseException) -> str:
    """One line describing why a run failed, for the ``failure_reason`` tag."""
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0] if text else ''}")[:4000]


def log_evaluation(result: EvaluationResult) -> None:
    """Log an evaluation's table and per-image verdicts as ``eval/results.parquet`` and
    ``eval/verdicts.npz`` (:mod:`art_study.results`); its metrics are logged with the run's."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_table(result, Path(tmp)):
            mlflow.log_artifact(str(path), artifact_path=str(Path(RESULTS_ARTIFACT).parent))
