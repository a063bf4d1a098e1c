"""The cache of stage outputs: each distinct stage's model (the ``.h5`` hand-off file) and record.

An entry is ``root/<key[:2]>/<key>/`` holding ``model.h5`` and ``stage.json``. The cache may be
shared (a team's disk, the nodes of a Ray cluster), so it trusts nothing it did not check:

- entries are written to a temporary directory, flushed to disk (fsync) and renamed into place,
  so a writer killed at any moment (SIGKILL, power loss) leaves a complete entry or none;
- two writers of the same stage compute the same content: the second finds the entry complete
  and uses it;
- ``stage.json`` records the sha256 of ``model.h5``; an entry whose file does not match it
  (truncated, a flipped bit, replaced) is evicted with a one-line warning and retrained;
- models load with Keras' ``safe_mode`` (which keras>=3.11.3 applies to ``.h5`` too), so a
  planted file with a ``Lambda`` layer is refused, not run;
- files and directories get the umask's permissions, so a group can share the cache;
- the ``.h5`` file holds weights only, no optimizer state: every stage compiles its model afresh
  (``train_stage``), so the optimizer slots (two thirds of the file for Adam) were never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from art_study.attacks.checkpoints import Checkpoints
from art_study.attacks.checkpoints import prune as prune_checkpoints
from art_study.errors import ArtStudyError, TrackingError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # a writer's directory: .tmp-<host>-<pid>-<random>
TRASH_PREFIX = ".evicted-"


class CorruptStage(ArtStudyError):
    """A cache entry failed its check; it has been evicted and is retrained on the next run."""


@dataclass(frozen=True)
class StageRecord:
    """What a stage produced besides its model: per-epoch history and timing."""

    key: str
    defense: str
    epochs: int
    history: list[dict[str, float]]
    train_time_s: float
    extra: dict[str, Any]
    model_sha256: str = ""  # of model.h5; empty in entries written before checksums existed

    @property
    def numerics(self) -> dict[str, str]:
        """The numerics fingerprint of the process that trained the stage (``extra``, so that
        older code sharing the cache still reads the record); empty for older entries."""
        return self.extra.get("numerics", {})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (a rename is only durable once both are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class StageCache:
    """Stage outputs under ``root/<key[:2]>/<key>/`` as ``model.h5`` + ``stage.json``."""

    MODEL = "model.h5"
    RECORD = "stage.json"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"stage cache not writable: {self.root} ({exc.strerror or exc})"
            ) from None

    @property
    def location(self) -> str:
        """What another process (a Ray worker) opens to reach the same cache."""
        return str(self.root.resolve())

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    @property
    def checkpoints(self) -> Checkpoints:
        """Where long attacks save their finished chunks (``checkpoints/``, beside the stage
        entries and never one of them), so that a stopped evaluation resumes."""
        return Checkpoints(self.root / "checkpoints")

    def model_path(self, key: str) -> Path:
        return self._dir(key) / self.MODEL

    # -- reading, checked ----------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether a complete, intact entry for ``key`` is present. A damaged one is evicted
        (with a one-line warning) and reported absent, so the caller retrains it."""
        if not (self._dir(key) / self.RECORD).is_file():
            return False
        problem = self.check(key)
        if problem is None:
            return True
        self.evict(key, problem)
        return False

    def check(self, key: str) -> str | None:
        """What is wrong with the entry of ``key`` (None: nothing). An entry from before
        checksums is checked by loading it once, then given its checksum."""
        try:
            record = self.record(key)
            digest = sha256_file(self.model_path(key))
        except (OSError, ValueError, TypeError) as exc:
            return f"unreadable: {exc}"
        if record.model_sha256:
            return None if digest == record.model_sha256 else "model.h5 does not match its sha256"
        try:
            self._load(key)
        except Exception as exc:
            return f"model.h5 does not load: {_first_line(exc)}"
        with contextlib.suppress(OSError):  # another user's entry: checked by loading each time
            self._write_record(self._dir(key), dataclasses.replace(record, model_sha256=digest))
        return None

    def record(self, key: str) -> StageRecord:
        return StageRecord(**json.loads((self._dir(key) / self.RECORD).read_text()))

    def load_model(self, key: str) -> keras.Model:
        """The stage's model, loaded back from its ``.h5`` file (uncompiled), after checking its
        checksum; a damaged or unsafe entry is evicted and raises :class:`CorruptStage`."""
        if not (self._dir(key) / self.RECORD).is_file():
            raise ArtStudyError(f"stage {key[:12]} is not in the stage cache {self.root}")
        problem = self.check(key)
        if problem is None:
            try:
                return self._load(key)
            except Exception as exc:
                problem = f"model.h5 does not load: {_first_line(exc)}"
        self.evict(key, problem)
        raise CorruptStage(f"stage cache entry {key[:12]} in {self.root} was corrupt "
                           f"({problem}); it was evicted: rerun to retrain it")

    def _load(self, key: str) -> keras.Model:
        return keras.models.load_model(self.model_path(key), compile=False, safe_mode=True)

    def evict(self, key: str, reason: str) -> None:
        """Remove a damaged entry (moved aside first, so no reader sees it half-deleted)."""
        log.warning("stage cache entry %s is damaged (%s): evicted, it will be retrained",
                    key[:12], reason)
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- writing -------------------------------------------------------------------------------
    def save(self, model: keras.Model, record: StageRecord) -> Path:
        """Write the model as ``.h5`` and the record durably and atomically; return the model
        path. If another writer completed the same entry meanwhile, its entry is kept."""
        final = self._dir(record.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # mode from the umask (mkdtemp would make it 0700: unreadable to a team)
        try:
            model.save(tmp / self.MODEL, include_optimizer=False)
            _fsync(tmp / self.MODEL)
            record = dataclasses.replace(record, model_sha256=sha256_file(tmp / self.MODEL))
            self._write_record(tmp, record)
            _fsync(tmp)
            self._publish(tmp, final, record.key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final / self.MODEL

    def _publish(self, tmp: Path, final: Path, key: str) -> None:
        for _ in range(3):
            if self.has(key):  # a concurrent writer finished first: the same content
                return
            try:
                os.replace(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # it appeared between the check and the rename: check it
            _fsync(final.parent)
            return
        raise TrackingError(f"stage cache entry {key[:12]} in {self.root} keeps changing under "
                            "this writer")

    def _write_record(self, where: Path, record: StageRecord) -> None:
        part = where / f".{self.RECORD}.{uuid.uuid4().hex[:8]}"
        _write_durable(part, json.dumps(record.__dict__, indent=1))
        os.replace(part, where / self.RECORD)

    # -- inventory (``art-study cache``) ---------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, Path]]:
        """Every entry as (key, directory)."""
        for shard in sorted(self.root.glob("??")):
            for entry in sorted(shard.iterdir()):
                if entry.is_dir() and not entry.name.startswith("."):
                    yield entry.name, entry

    @staticmethod
    def size(path: Path) -> int:
        """Bytes of an entry or a leftover."""
        return dir_size(path)

    def leftovers(self, min_age_s: float = 3600.0) -> list[Path]:
        """Directories left by killed writers (or evictions): a writer of this host whose pid is
        gone, or any older than ``min_age_s`` (a writer elsewhere that stopped)."""
        out = []
        host = socket.gethostname()
        now = time.time()
        for path in self.root.glob(".*-*"):
            if not path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            name = path.name[len(TMP_PREFIX):]
            writer_host, _, rest = name.rpartition("-")[0].rpartition("-")
            dead = (path.name.startswith(TMP_PREFIX) and writer_host == host
                    and not _pid_alive(rest))
            with contextlib.suppress(FileNotFoundError):
                if dead or now - path.stat().st_mtime > min_age_s:
                    out.append(path)
        return out


    def prune(self, keep: set[str]) -> tuple[list[str], int]:
        """Remove every entry whose key is not in ``keep``, and the leftovers of killed
        writers; return the removed keys and the bytes freed."""
        removed, freed = [], 0
        for key, path in list(self.entries()):
            if key not in keep:
                freed += dir_size(path)
                trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                    removed.append(key)
        for path in self.leftovers():
            freed += dir_size(path)
            shutil.rmtree(path, ignore_errors=True)
        freed += prune_checkpoints(self.checkpoints.root)[1]
        return removed, freed


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
