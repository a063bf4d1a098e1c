"""What computed a number: the numerics fingerprint, and the portable mode.

The same code, seed and data give different floats on different machines, because TensorFlow
picks its CPU kernels by machine:

- **oneDNN** kernels run when ``TF_ENABLE_ONEDNN_OPTS=1``, or, unset, when TensorFlow's
  ``DefaultOneDnnPolicy`` turns them on: on x86 only for CPUs with AVX512-VNNI, AVX512-BF16,
  AVX-VNNI or AMX. oneDNN dispatches on the CPU's instruction set and promises nothing across
  CPU generations.
- Otherwise **Eigen** kernels run; Eigen picks its matrix-product blocking (the order in which
  a dot product is summed) from the L1/L2 cache sizes and the number of threads, and TensorFlow
  uses one thread per schedulable core unless told otherwise. On x86 the innermost product of
  Eigen's contractions (matmul, convolution) is itself oneDNN's ``sgemm``, which also dispatches
  on the instruction set, unless ``TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL=0``.

:func:`fingerprint` records what decides these (versions, oneDNN detected as TensorFlow reports
it, CPU model and instruction-set flags, thread counts, cache sizes, platform); every run carries
it as ``numerics.*`` tags and every stage in the cache in its record. ``numerics: portable``
(:func:`prepare` before TensorFlow is imported, :func:`apply` after) turns oneDNN off in both
places (Eigen's own code then computes everything: the same compiled code on every CPU the
wheel runs on), fixes the thread counts and makes ops deterministic, so a run gives the same
bits whatever the core count, and should on any x86 CPU with the same L1d/L2 sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from art_study.errors import ArtStudyError

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
#: TensorFlow's switch for oneDNN's sgemm inside Eigen's contractions (read at first use).
CONTRACTION_ENV = "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL"
#: What portable mode sets before TensorFlow is imported.
PORTABLE_ENV = {ONEDNN_ENV: "0", CONTRACTION_ENV: "0"}
#: CPU flags (``/proc/cpuinfo`` spelling) for which TensorFlow's default turns oneDNN on (x86).
ONEDNN_POLICY_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
                       "amx_int8")
#: The instruction-set flags recorded: what oneDNN's and TensorFlow's kernels dispatch on.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
#: Fingerprint fields that say where and when, not how a number was computed: left out of the id.
NOT_IN_ID = ("platform",)
_PACKAGES = {"tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy",
             "art": "adversarial-robustness-toolbox"}

_mode = "fast"  # what apply() set in this process


def prepare(mode: str) -> None:
    """Set what must be set before TensorFlow is imported: for ``portable``,
    :data:`PORTABLE_ENV` (oneDNN off, in TensorFlow's ops and inside Eigen's contractions).

    Raises :class:`ArtStudyError` when TensorFlow is already imported without them (they are
    read once, at import or first use): a run that says portable must be portable.
    """
    if mode != "portable":
        return
    if "tensorflow" in sys.modules and (onednn_enabled() is True or not _contraction_off()):
        raise ArtStudyError(
            "numerics: portable needs oneDNN off, but TensorFlow was imported without it: set "
            f"{' '.join(f'{k}={v}' for k, v in PORTABLE_ENV.items())} before starting Python")
    os.environ.update(PORTABLE_ENV)


def _contraction_off() -> bool:
    return os.environ.get(CONTRACTION_ENV, "").lower() in ("0", "false")


def apply(mode: str, intra_op_threads: int, inter_op_threads: int) -> None:
    """Configure this process's TensorFlow for ``mode`` (after :func:`prepare`).

    ``portable``: oneDNN off (checked), the given thread counts (TensorFlow takes them before its
    runtime starts; a process already running keeps its first counts, which is checked) and
    deterministic ops. ``fast`` leaves TensorFlow's defaults.
    """
    global _mode
    prepare(mode)
    if mode != "portable":
        _mode = mode
        return
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # already initialised: checked just below
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    got = (tf.config.threading.get_intra_op_parallelism_threads(),
           tf.config.threading.get_inter_op_parallelism_threads())
    if got != (intra_op_threads, inter_op_threads):
        raise ArtStudyError(f"numerics: portable wants {intra_op_threads}/{inter_op_threads} "
                            f"intra/inter-op threads, but TensorFlow already runs with "
                            f"{got[0]}/{got[1]} in this process")
    tf.config.experimental.enable_op_determinism()
    _mode = mode


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN kernels, as TensorFlow itself reports it
    (its policy and ``TF_ENABLE_ONEDNN_OPTS`` applied); None if it cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_info() -> tuple[str, set[str]]:
    """The CPU model name and its feature flags (Linux ``/proc/cpuinfo``; elsewhere the
    platform's processor name and no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags = set(value.split())
            if key in ("flags", "Features") and model:
                break
    return model, flags


def onednn_policy(flags: set[str]) -> bool:
    """Whether TensorFlow turns oneDNN on by default on a CPU with ``flags`` (x86)."""
    return platform.machine().lower() in ("x86_64", "amd64") and \
        any(f in flags for f in ONEDNN_POLICY_FLAGS)


def cache_kib() -> dict[str, str]:
    """Per-core cache sizes of CPU 0 in KiB, ``l1d`` and ``l2`` (Linux sysfs; else unknown):
    what Eigen's matrix-product blocking is chosen from."""
    out = {"l1d": "unknown", "l2": "unknown"}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            level, kind, size = ((index / f).read_text().strip()
                                 for f in ("level", "type", "size"))
            name = {("1", "Data"): "l1d", ("2", "Unified"): "l2"}.get((level, kind))
            scale = {"K": 1, "M": 1024}.get(size[-1:])
            if name and scale:
                out[name] = str(int(size[:-1]) * scale)
    return out


def schedulable_cpus() -> int:
    """The cores this process may run on (its affinity), what TensorFlow's default uses."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_counts() -> tuple[int, int]:
    """TensorFlow's intra- and inter-op thread counts; its default (0) is one per schedulable
    core."""
    import tensorflow as tf

    default = schedulable_cpus()
    return (tf.config.threading.get_intra_op_parallelism_threads() or default,
            tf.config.threading.get_inter_op_parallelism_threads() or default)


def fingerprint() -> dict[str, str]:
    """This process's numerics fingerprint: every field a string, plus ``id``, a short hash of
    all of them but :data:`NOT_IN_ID`. Imports TensorFlow (call it after :func:`prepare`)."""
    model, flags = cpu_info()
    onednn = onednn_enabled()
    intra, inter = thread_counts()
    fp: dict[str, str] = {"mode": _mode,
                          "onednn": {True: "on", False: "off", None: "unknown"}[onednn],
                          "onednn_policy": "on" if onednn_policy(flags) else "off",
                          "onednn_env": os.environ.get(ONEDNN_ENV, "unset"),
                          "contraction": "eigen" if _contraction_off() else "default",
                          "cpu": model, "isa": " ".join(f for f in ISA_FLAGS if f in flags),
                          "intra_op_threads": str(intra), "inter_op_threads": str(inter),
                          **{f"{k}_kib": v for k, v in cache_kib().items()},
                          "machine": platform.machine(), "platform": platform.platform()}
    for name, dist in _PACKAGES.items():
        try:
            fp[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            fp[name] = "absent"
    fp["id"] = fingerprint_id(fp)
    return fp


def fingerprint_id(fp: dict[str, str]) -> str:
    """12 hex digits naming what computed the numbers: equal ids, same kernels and settings."""
    material = {k: v for k, v in fp.items() if k not in (*NOT_IN_ID, "id")}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def tags(fp: dict[str, str]) -> dict[str, str]:
    """The fingerprint as MLflow tags ``numerics.<field>``."""
    return {f"numerics.{k}": v for k, v in fp.items()}


def summary(fp: dict[str, Any]) -> str:
    """One line: the fields that decide the kernels, then the id (``stage<n>.numerics``)."""
    if not fp:
        return "unknown"
    threads = f"{fp.get('intra_op_threads', '?')}/{fp.get('inter_op_threads', '?')}"
    return (f"{fp.get('mode', '?')}, oneDNN {fp.get('onednn', '?')} (contraction "
            f"{fp.get('contraction', '?')}), {fp.get('cpu', '?')} "
            f"[{fp.get('isa', '')}], threads {threads}, L1d {fp.get('l1d_kib', '?')} KiB, "
            f"L2 {fp.get('l2_kib', '?')} KiB, TF {fp.get('tensorflow', '?')}, "
            f"Keras {fp.get('keras', '?')}, numpy {fp.get('numpy', '?')}, "
            f"ART {fp.get('art', '?')} ({fp.get('id', '?')})")


def describe_differs(runs: Any) -> str | None:
    """A sentence when some runs of a DataFrame (``runs.csv`` or ``mlflow.search_runs``
    columns) use parts computed under another fingerprint than the process that finished
    them: a stage from a shared cache, or AutoAttack chunks resumed from checkpoints
    (``stage<n>.numerics_differs``, ``attack.<key>.numerics_differs``), else None."""
    cols = [c for c in runs if str(c).endswith(".numerics_differs")]
    if not cols:
        return None
    n = int(runs[cols].astype(str).eq("true").any(axis=1).sum())
    if not n:
        return None
    return (f"{n} of these runs use parts computed under another numerics fingerprint than "
            "the process that finished them (a stage from the cache, or AutoAttack chunks "
            "resumed from checkpoints: tags `stage<n>.numerics_differs`, "
            "`attack.<key>.numerics_differs`): their figures mix two machines' kernels.")


def describe_mixed(runs: Any) -> str | None:
    """A sentence when the runs of a DataFrame (``runs.csv`` or ``mlflow.search_runs`` columns)
    were computed under more than one numerics fingerprint, else None.

    Runs recorded before fingerprints existed have no ``numerics.id`` and are not counted.
    """
    col = next((c for c in ("numerics.id", "tags.numerics.id") if c in runs), None)
    if col is None:
        return None
    ids = runs[col].dropna()
    ids = ids[ids != ""]
    if ids.nunique() < 2:
        return None
    prefix = col[: -len("id")]
    parts = []
    for fid, group in runs[runs[col].isin(ids.unique())].groupby(col, sort=False):
        first = group.iloc[0]
        parts.append(f"{len(group)} under {fid} (oneDNN {first.get(prefix + 'onednn', '?')}, "
                     f"{first.get(prefix + 'cpu', '?')}, threads "
                     f"{first.get(prefix + 'intra_op_threads', '?')})")
    return (f"These runs were computed under {ids.nunique()} numerics fingerprints: "
            f"{'; '.join(parts)}. Differences between them may come from the kernels, not the "
            "defenses (docs/benchmarks.md, reproducibility).")
