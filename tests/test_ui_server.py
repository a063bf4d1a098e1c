"""``art-study ui`` stopped with SIGTERM (``kill``, a process manager) stops MLflow's server and
every worker it started: nothing is left serving the port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from art_study.tracking import prepare_store


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_server_and_its_workers(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri, "art-study")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("art-study")
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port), "--tracking-uri", uri],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/health"
    below: set[int] = set()
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, "art-study ui exited"
                assert time.time() < deadline, "the UI did not answer within 180 s"
                time.sleep(1)
        below = descendants(proc.pid)
        assert below, "the MLflow server runs as a child process"

        os.kill(proc.pid, signal.SIGTERM)  # art-study alone, as `kill PID` does
        code = proc.wait(timeout=60)
        deadline = time.time() + 30
        while any(alive(p) for p in below) and time.time() < deadline:
            time.sleep(0.5)
        assert not [p for p in below if alive(p)], "server processes outlived art-study ui"
        try:
            urllib.request.urlopen(url, timeout=5)
        except OSError:
            pass
        else:
            raise AssertionError(f"port {port} still served after SIGTERM")
        assert code == 0  # a stop asked for, not a crash
    finally:  # the server's group too, found now if the UI never answered (else it would
        below |= descendants(proc.pid)  # outlive the test, serving and using the CPU)
        for pid in [proc.pid, *below]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        proc.wait(timeout=30)
