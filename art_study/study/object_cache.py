"""The stage cache on object storage (``s3://bucket/prefix``, or any URI ``pyarrow.fs`` opens).

Nodes of a cluster that share no disk share a bucket. An entry is
``<prefix>/<key[:2]>/<key>/`` holding ``model-<sha256[:16]>.h5`` and ``stage.json``. Object
stores cannot rename a directory, but one PUT is atomic, so the local cache's guarantees
(:mod:`art_study.study.cache`) are kept another way:

- a writer uploads the model under a name made from its sha256, then the record last: the
  record (which holds that sha256) is the commit marker, and an entry without one is invisible;
- two writers of one stage: the second finds the first's record and keeps it; if both put their
  record at once, the last one wins and names its own, complete, model: one valid entry either
  way (the other model is a leftover that ``art-study cache --prune`` removes);
- a reader checks the model against the record's sha256; a damaged entry is evicted with a
  one-line warning (record first, so it vanishes at once) and retrained. A process remembers
  the entries it found intact: asked again, it reads the record and lists the model (its size
  and time) instead of downloading it, and checks it again if either changed;
- models load with Keras' ``safe_mode``, from a private temporary copy.

The endpoint, region and credentials come from the environment, as for any AWS client
(``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...),
never from a config or a URI, so nothing secret is logged. Every problem reaching the store
(no such bucket, refused credentials, no answer) stops the study in one line before training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import keras
import pyarrow.fs as pafs

from art_study.attacks.checkpoints import Checkpoints
from art_study.errors import ArtStudyError, ConfigError, TrackingError
from art_study.study.cache import CorruptStage, StageCache, StageRecord

log = logging.getLogger(__name__)

#: Seconds before an S3 request gives up, and attempts per request: an unreachable endpoint
#: fails in seconds, not minutes.
CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, ATTEMPTS = 5.0, 60.0, 3

#: Entries this process found intact: ``(cache root, key) → (model sha256, size, mtime)`` of
#: the model when its checksum was verified. A study asks for the same entry many times; an
#: unchanged one is not downloaded again.
_VERIFIED: dict[tuple[str, str], tuple[str, int, int | None]] = {}


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a scheme (``s3://…``) rather than a local path."""
    return "://" in str(location)


def open_cache(location: str | os.PathLike[str]) -> StageCache | ObjectStageCache:
    """The stage cache at ``location``: a local directory, or an object store by URI."""
    if not is_uri(location):
        return StageCache(location)
    uri = str(location)
    if urlparse(uri).scheme == "file":
        return StageCache(urlparse(uri).path)
    return ObjectStageCache(uri)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of ``uri``; S3's endpoint from the environment."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"study.cache_dir: {uri!r} names no bucket (s3://BUCKET/PREFIX)")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint or None, connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS))
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"study.cache_dir: cannot open {_scrub(uri)!r} as a stage cache "
                          f"({_first_line(exc)}); use a local path or s3://BUCKET/PREFIX"
                          ) from None
    return fs, path.rstrip("/")


class ObjectCheckpoints(Checkpoints):
    """Attack checkpoints as objects: an upload is whole or absent, so a reader never sees half
    of one."""

    def __init__(self, fs: pafs.FileSystem, base: str, scope: str = ""):
        super().__init__(base, scope)
        self.fs, self.base = fs, base

    def _read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(f"{self.base}/{name}") as f:
                return f.read()
        except OSError:  # absent (FileNotFoundError is one) or unreachable: recomputed
            return None

    def _write(self, name: str, blob: bytes) -> None:
        with contextlib.suppress(OSError), self.fs.open_output_stream(
                f"{self.base}/{name}") as f:
            f.write(blob)


class ObjectStageCache:
    """Stage outputs in an object store under ``<prefix>/<key[:2]>/<key>/``."""

    RECORD = "stage.json"

    def __init__(self, uri: str):
        self.root = _scrub(uri.rstrip("/"))
        self.fs, self.base = _filesystem(uri)
        self._probe()

    @property
    def location(self) -> str:
        """What another process (a Ray worker) opens to reach the same cache."""
        return self.root

    def _probe(self) -> None:
        """Fail in one line, before any training, if the store cannot be used."""
        bucket = self.base.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type
            if found != pafs.FileType.NotFound:
                self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except OSError as exc:
            if "ACCESS_DENIED" in str(exc) or "HTTP status 403" in str(exc):
                raise TrackingError(f"stage cache {self.root}: access denied at {_endpoint()} "
                                    "(are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                    "AWS_PROFILE, the store's?)") from None
            raise TrackingError(f"stage cache {self.root} unreachable at {_endpoint()}: "
                                f"{_first_line(exc)}") from None
        if found == pafs.FileType.NotFound:
            raise TrackingError(f"stage cache {self.root}: no bucket {bucket!r} at "
                                f"{_endpoint()} (create it first)")

    @property
    def checkpoints(self) -> ObjectCheckpoints:
        """Where long attacks save their finished chunks: ``checkpoints/`` under the cache's
        prefix (never a stage entry), so an evaluation stopped on one node resumes on any."""
        return ObjectCheckpoints(self.fs, f"{self.base}/checkpoints")

    def _dir(self, key: str) -> str:
        return f"{self.base}/{key[:2]}/{key}"

    def _model(self, key: str, sha256: str) -> str:
        return f"{self._dir(key)}/model-{sha256[:16]}.h5"

    # -- reading, checked ----------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether a complete, intact entry for ``key`` is present; a damaged one is evicted
        (one-line warning) and reported absent, so the caller retrains it.

        The record is read every time (an entry evicted or replaced elsewhere is seen); the
        model is downloaded and checked only if this process has not verified it yet under
        the record's sha256, or if its listed size or time changed since."""
        try:
            record = self.record(key)
        except FileNotFoundError:
            _VERIFIED.pop((self.root, key), None)
            return False
        stamp = self._stamp(record)
        if stamp is not None and _VERIFIED.get((self.root, key)) == (record.model_sha256,
                                                                      *stamp):
            return True
        problem = self._check(record, self._read_model(record))
        if problem is None:
            if stamp is not None:
                _VERIFIED[(self.root, key)] = (record.model_sha256, *stamp)
            return True
        self.evict(key, problem)
        return False

    def _stamp(self, record: StageRecord) -> tuple[int, int | None] | None:
        """The model object's listed (size, mtime in ns), or None if there is none."""
        if not record.model_sha256:
            return None
        try:
            info = self.fs.get_file_info(self._model(record.key, record.model_sha256))
        except OSError as exc:
            raise TrackingError(f"stage cache {self.root}: {_first_line(exc)}") from None
        return (info.size, info.mtime_ns) if info.type == pafs.FileType.File else None

    def record(self, key: str) -> StageRecord:
        return StageRecord(**json.loads(self._read(f"{self._dir(key)}/{self.RECORD}")))

    def load_model(self, key: str) -> keras.Model:
        """The stage's model, checked against its sha256; a damaged entry is evicted and raises
        :class:`~art_study.study.cache.CorruptStage`."""
        try:
            record = self.record(key)
        except FileNotFoundError:
            raise ArtStudyError(f"stage {key[:12]} is not in the stage cache {self.root}"
                                ) from None
        blob = self._read_model(record)
        problem = self._check(record, blob)
        if problem is None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.h5"
                path.write_bytes(blob)
                try:
                    return keras.models.load_model(path, compile=False, safe_mode=True)
                except Exception as exc:
                    problem = f"model does not load: {_first_line(exc)}"
        self.evict(key, problem)
        raise CorruptStage(f"stage cache entry {key[:12]} in {self.root} was corrupt "
                           f"({problem}); it was evicted: rerun to retrain it")

    def _read_model(self, record: StageRecord) -> bytes | None:
        if not record.model_sha256:
            return None
        try:
            return self._read(self._model(record.key, record.model_sha256))
        except FileNotFoundError:
            return None

    @staticmethod
    def _check(record: StageRecord, blob: bytes | None) -> str | None:
        if blob is None:
            return "its model is missing"
        if hashlib.sha256(blob).hexdigest() != record.model_sha256:
            return "the model does not match its sha256"
        return None

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "NoSuchKey" in str(exc) or "Path does not exist" in str(exc):
                raise FileNotFoundError(path) from None
            raise TrackingError(f"stage cache {self.root}: {_first_line(exc)}") from None

    def evict(self, key: str, reason: str) -> None:
        """Remove a damaged entry: its record first (the entry is gone at once), then the rest."""
        log.warning("stage cache entry %s is damaged (%s): evicted, it will be retrained",
                    key[:12], reason)
        _VERIFIED.pop((self.root, key), None)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(f"{self._dir(key)}/{self.RECORD}")
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self._dir(key))

    # -- writing -------------------------------------------------------------------------------
    def save(self, model: keras.Model, record: StageRecord) -> str:
        """Upload the model, then the record (the commit marker); keep another writer's entry
        if it completed first. Returns the model's object path."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.h5"
            model.save(path, include_optimizer=False)
            blob = path.read_bytes()
        record = dataclasses.replace(record, model_sha256=hashlib.sha256(blob).hexdigest())
        target = self._model(record.key, record.model_sha256)
        self._write(target, blob)
        if self.has(record.key):  # a concurrent writer finished first
            return self._model(record.key, self.record(record.key).model_sha256)
        self._write(f"{self._dir(record.key)}/{self.RECORD}",
                    json.dumps(record.__dict__, indent=1).encode())
        return target

    def _write(self, path: str, blob: bytes) -> None:
        try:
            with self.fs.open_output_stream(path) as f:
                f.write(blob)
        except OSError as exc:
            raise TrackingError(f"stage cache {self.root}: cannot write: {_first_line(exc)}"
                                ) from None

    # -- inventory (``art-study cache``) ---------------------------------------------------------
    def _objects(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def entries(self) -> Iterator[tuple[str, str]]:
        """Every committed entry as (key, its prefix)."""
        for info in sorted(self._objects(), key=lambda i: i.path):
            if info.base_name == self.RECORD:
                key = info.path.rsplit("/", 2)[-2]
                yield key, self._dir(key)

    def size(self, item: str) -> int:
        """Bytes under an entry's prefix, or of one object."""
        return sum(i.size for i in self._objects() if i.path == item
                   or i.path.startswith(f"{item}/"))

    def leftovers(self, min_age_s: float = 3600.0) -> list[str]:
        """Models no record names (a writer killed before its record, or the loser of two
        writers) older than ``min_age_s`` (a writer elsewhere may still be uploading)."""
        objects = self._objects()
        named = set()
        for info in objects:
            if info.base_name == self.RECORD:
                named.add(self._model(*self._named(info.path)))
        now = time.time()
        return [i.path for i in objects
                if i.base_name.startswith("model-") and i.path not in named
                and now - (i.mtime.timestamp() if i.mtime else now) >= min_age_s]

    def _named(self, record_path: str) -> tuple[str, str]:
        key = record_path.rsplit("/", 2)[-2]
        try:
            return key, self.record(key).model_sha256
        except (FileNotFoundError, ValueError, TypeError):
            return key, ""

    def prune(self, keep: set[str]) -> tuple[list[str], int]:
        """Remove every entry whose key is not in ``keep``, and the leftovers; return the removed
        keys and the bytes freed."""
        removed, freed = [], 0
        for key, prefix in list(self.entries()):
            if key not in keep:
                freed += self.size(prefix)
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.delete_file(f"{prefix}/{self.RECORD}")
                    self.fs.delete_dir(prefix)
                removed.append(key)
        for path in self.leftovers():
            freed += self.size(path)
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.delete_file(path)
        return removed, freed


def _endpoint() -> str:
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS's default endpoint")


def _scrub(uri: str) -> str:
    """``uri`` without any ``user:password@`` part."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.hostname or "").geturl()
    return uri


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
