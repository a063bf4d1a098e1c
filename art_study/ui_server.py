"""``art-study ui``'s MLflow server, stopped with it however it is stopped.

``mlflow server`` runs its workers as child processes. Started in a process group of its own,
the whole group is stopped when ``art-study ui`` is interrupted (Ctrl-C), terminated
(``kill``, a process manager's SIGTERM) or hung up on, so no worker is left serving the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

#: Seconds the server gets to stop on SIGTERM before its group is killed (it holds no state
#: of its own: the store commits each request).
STOP_TIMEOUT_S = 10
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def serve(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` (the server) until it exits or this process is stopped; then stop its whole
    process group. Returns the server's exit status, 0 when stopped by a signal."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group led by ``proc``, SIGKILL if it is still there after
    ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
            os.killpg(proc.pid, signal.SIGKILL)
