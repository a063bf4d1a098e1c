"""Import TensorFlow without its start-up notices, and without hiding anything else.

TensorFlow 2.20+ logs through absl before ``absl::InitializeLog()`` is called, so its import
writes, once per shared library, straight to file descriptor 2 and regardless of
``TF_CPP_MIN_LOG_LEVEL``::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1795669602.996902    7821 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1795669602.998289    7821 cudart_stub.cc:31] Could not find cuda drivers ...

The oneDNN line appears only where oneDNN runs: on CPUs for which TensorFlow's policy turns it
on (AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX), or with ``TF_ENABLE_ONEDNN_OPTS=1``; elsewhere
Eigen's kernels run and nothing is printed. Which ones ran is a property of each run, not of a
terminal session: every run records it (tag ``numerics.onednn``, with the rest of the numerics
fingerprint, :mod:`art_study.numerics`; ``art-study runs`` shows it), so the line is dropped here.

No environment variable turns these lines off (``TF_ENABLE_ONEDNN_OPTS=0`` changes the
kernels, which is ``numerics: portable``'s business; ``CUDA_VISIBLE_DEVICES`` does not stop the
CUDA probe). So during the import only, fd 2 goes through a pipe whose reader drops exactly
these INFO lines and forwards every other byte at once: warnings, errors and a crash's last
words still reach the terminal. With ``TF_CPP_MIN_LOG_LEVEL=0`` (the user asks for INFO)
nothing is filtered.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

#: The start-up notices dropped: absl's pre-initialisation banner, the INFO line of a CPU-only
#: machine (no CUDA driver) and the INFO line saying oneDNN runs (recorded on every run as
#: ``numerics.onednn`` instead). Nothing at W, E or F level.
NOTICES = (
    re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are "
               rb"written to STDERR\r?\n"),
    re.compile(rb"I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
               rb"machine, GPU will not be used\.\r?\n"),
    re.compile(rb"I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*\r?\n"),
)


def is_notice(line: bytes) -> bool:
    """True for one of the start-up notices above (a whole line, newline included)."""
    return any(p.fullmatch(line) for p in NOTICES)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Within the block, fd 2 drops :data:`NOTICES` and passes everything else through."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = [line + b"\n" for line in lines if not is_notice(line + b"\n")]
                if pending[:1] not in (b"W", b"I"):  # cannot begin a notice: pass it on now
                    kept.append(pending)
                    pending = b""
                if kept:
                    os.write(saved, b"".join(kept))
            if pending:
                os.write(saved, pending)

    reader = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader drains and stops
        reader.join(timeout=10)
        os.close(saved)


def import_tensorflow() -> None:
    """Import TensorFlow (once per process) with its start-up notices filtered."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        import tensorflow
        return
    with filtered_stderr():
        import tensorflow  # noqa: F401
