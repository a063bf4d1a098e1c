"""Who is running a study: a lease with a heartbeat, recorded as tags on the study's parent run.

Two ``art-study run`` of one study on one store must not both resume it: the second would
delete the first's live child runs as "left over from a kill", and both would then log the same
runs. The process running a study therefore holds a lease, written as tags on the parent run
(owner id, host, pid, heartbeat time) and refreshed by a background thread. Another process
finds a fresh heartbeat and refuses in one line; it takes the study over only once the heartbeat
is older than the staleness limit (``$ART_STUDY_LEASE_STALE_S``, default 120 s), or at once if
the holder ran on this machine (same host name and pid namespace) and its pid is gone. That is
how a SIGKILLed study is told from a live one (:func:`liveness`).

MLflow tags have no compare-and-set, so taking a lease is *write, wait, read back*: of two
processes that claim at once, the last write wins and the other, reading it back after
``settle_s``, backs off. A process that loses its lease anyway (frozen longer than the staleness
limit, then taken over) notices at its next heartbeat and stops at the next run boundary without
touching the parent run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities import RunTag

from art_study.errors import ArtStudyError

log = logging.getLogger(__name__)

PREFIX = "art_study.lease"
OWNER, HOST, PID, PIDNS, HEARTBEAT = (
    f"{PREFIX}.{k}" for k in ("owner", "host", "pid", "pidns", "heartbeat"))
STALE_AFTER = f"{PREFIX}.stale_after_s"  # the holder's limit, so readers judge it the same way
STALE_ENV = "ART_STUDY_LEASE_STALE_S"
DEFAULT_STALE_S = 120.0


class StudyBusy(ArtStudyError):
    """The study is being run by another live process (its lease is fresh)."""


class LeaseLost(StudyBusy):
    """This process's lease was taken over (it was frozen past the staleness limit)."""


@dataclass(frozen=True)
class LeasePolicy:
    """How old a heartbeat may be before the lease counts as abandoned, and how long a claim
    waits before reading itself back."""

    stale_after_s: float = DEFAULT_STALE_S
    settle_s: float = 1.0

    @property
    def heartbeat_s(self) -> float:
        """A heartbeat every quarter of the limit: three may be late before the lease is stale."""
        return self.stale_after_s / 4

    @classmethod
    def from_env(cls) -> LeasePolicy:
        raw = os.environ.get(STALE_ENV)
        if raw is None:
            return cls()
        try:
            stale = float(raw)
        except ValueError:
            stale = -1.0
        if not stale > 0:
            raise ArtStudyError(f"${STALE_ENV} must be a positive number of seconds, got {raw!r}")
        return cls(stale_after_s=stale, settle_s=min(1.0, stale / 10))


Liveness = Literal["live", "stale", "unleased"]


def liveness(tags: Mapping[str, str], now: float | None = None,
             default_stale_s: float = DEFAULT_STALE_S) -> Liveness:
    """Whether the lease in a run's ``tags`` is held by a live process.

    ``unleased``: no lease tags (a run made before leases existed, or never owned). For a
    RUNNING run, ``stale`` means its process is gone (killed, machine down): ``report`` and
    ``runs`` should show it as such, and the next ``art-study run`` takes it over.
    """
    beat = tags.get(HEARTBEAT)
    if beat is None:
        return "unleased"
    if _died_here(tags):
        return "stale"
    try:
        age = (time.time() if now is None else now) - float(beat)
        limit = float(tags.get(STALE_AFTER, default_stale_s))
    except ValueError:
        return "stale"
    return "live" if age <= limit else "stale"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _died_here(tags: Mapping[str, str]) -> bool:
    """The holder ran on this machine, in this pid namespace, and its process is gone."""
    if tags.get(HOST) != socket.gethostname() or not tags.get(PIDNS) or \
            tags.get(PIDNS) != _pid_namespace():
        return False
    try:
        os.kill(int(tags.get(PID, "")), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(tags: Mapping[str, str], now: float | None = None) -> str:
    """``pid 123 on host h, heartbeat 4 s ago``: who holds the lease in ``tags``."""
    try:
        age = f"{(time.time() if now is None else now) - float(tags[HEARTBEAT]):.0f} s ago"
    except (KeyError, ValueError):
        age = "unknown"
    return f"pid {tags.get(PID, '?')} on host {tags.get(HOST, '?')}, heartbeat {age}"


class Lease:
    """This process's claim on one parent run, kept fresh by a daemon thread."""

    def __init__(self, client: MlflowClient, policy: LeasePolicy | None = None):
        self.client = client
        self.policy = policy or LeasePolicy.from_env()
        self.owner = uuid.uuid4().hex
        self.run_id: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.error: Exception | None = None  # the store failed under the heartbeat

    def tags(self) -> dict[str, str]:
        """The lease as tags, with a heartbeat of now."""
        return {OWNER: self.owner, HOST: socket.gethostname(), PID: str(os.getpid()),
                PIDNS: _pid_namespace(), HEARTBEAT: f"{time.time():.3f}",
                STALE_AFTER: f"{self.policy.stale_after_s:g}"}

    def held_by_other(self, tags: Mapping[str, str], status: str) -> bool:
        """A RUNNING run whose lease is live and not ours."""
        return (status == "RUNNING" and tags.get(OWNER) not in (None, self.owner)
                and liveness(tags) == "live")

    def claim(self, run_id: str, study: str) -> None:
        """Take the lease on ``run_id`` (an existing parent run), or raise :class:`StudyBusy`."""
        run = self.client.get_run(run_id)
        if self.held_by_other(run.data.tags, run.info.status):
            raise busy(study, run_id, run.data.tags, self.policy)
        self._write(run_id)
        self.confirm(run_id, study)

    def adopt(self, run_id: str) -> None:
        """Hold the lease on a parent run this process has just created with :meth:`tags`."""
        self.run_id = run_id

    def confirm(self, run_id: str, study: str) -> None:
        """After ``settle_s``, read the lease back: a concurrent claim that wrote last wins."""
        time.sleep(self.policy.settle_s)
        tags = self.client.get_run(run_id).data.tags
        if tags.get(OWNER) != self.owner:
            raise busy(study, run_id, tags, self.policy)
        self.run_id = run_id

    def start(self) -> None:
        """Begin the heartbeat thread."""
        self._thread = threading.Thread(target=self._beat, name="art-study-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another process has taken the study over."""
        if self.lost:
            raise LeaseLost(f"this process lost the lease on parent run {self.run_id}: another "
                            "process took the study over while this one was not heartbeating")

    def release(self) -> None:
        """Stop the heartbeat (the parent's end status says the study is no longer running)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _write(self, run_id: str) -> None:
        tags = [RunTag(k, v) for k, v in self.tags().items()]
        self.client.log_batch(run_id, tags=tags)

    def _beat(self) -> None:
        while not self._stop.wait(self.policy.heartbeat_s):
            try:
                if self.client.get_run(self.run_id).data.tags.get(OWNER) != self.owner:
                    self.lost = True
                    return
                self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.3f}")
            except Exception as exc:  # the store is unreachable: the main thread reports it
                self.error = exc
                log.debug("lease heartbeat failed: %s", exc)


def busy(study: str, run_id: str, tags: Mapping[str, str], policy: LeasePolicy) -> StudyBusy:
    """The one-line refusal: who holds the study and when to retry."""
    limit = tags.get(STALE_AFTER, f"{policy.stale_after_s:g}")
    return StudyBusy(
        f"study {study!r} is being run by another process ({describe(tags)}; parent run "
        f"{run_id}); wait for it to finish, or rerun once its heartbeat is older than "
        f"{limit} s if that process is gone")
