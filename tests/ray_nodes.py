"""A multi-node Ray cluster on this machine for the tests: one ``ray start --block`` process per
node, each with its own temp dir, its own ports and its own environment, as on separate machines.

Each node is a process group of its own (``ray start --block`` keeps the raylet, its agents and
its workers as descendants), so a node is killed by killing its group, and only this test's
nodes are ever touched. The cluster is reached by the address of its head, never found through
``/tmp/ray`` (another test's ``ray.init()`` must not stumble on it).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from s3_server import free_ports

# The ports a node would otherwise take at fixed defaults (two nodes on one machine collide).
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


def ray_exe() -> str:
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class RayNode:
    """One node: its ``ray start --block`` process and its temp dir."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    address: str = ""  # a head's GCS address, which workers join

    def processes(self) -> list[int]:
        """The pids of this node: its ``ray start`` and every descendant (raylet, workers)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill(self) -> None:
        """SIGKILL the node (as a machine that dies), and any descendant that left its group."""
        pids = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


@dataclass
class RayCluster:
    """A head and workers started by :func:`start_node`; ``address`` is the head's GCS."""

    address: str
    nodes: list[RayNode] = field(default_factory=list)

    env: dict[str, str] = field(default_factory=dict)

    def wait_for(self, n: int, timeout_s: float = 180) -> None:
        """Until ``n`` nodes are alive, asked of the GCS by a separate process (which holds the
        cluster's token; this one may be another cluster's driver)."""
        probe = ("import sys, time\n"
                 "from ray._raylet import GcsClient\n"
                 "deadline = time.time() + float(sys.argv[3])\n"
                 "while time.time() < deadline:\n"
                 "    try:\n"
                 "        nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)\n"
                 "        if sum(i.state == 0 for i in nodes.values()) == int(sys.argv[2]):\n"
                 "            sys.exit(0)\n"
                 "    except Exception:\n"
                 "        pass\n"
                 "    time.sleep(1)\n"
                 "sys.exit(1)\n")
        done = subprocess.run([sys.executable, "-c", probe, self.address, str(n), str(timeout_s)],
                              env=self.env, capture_output=True, timeout=timeout_s + 60)
        dead = [n.log for n in self.nodes if n.proc.poll() is not None]
        if done.returncode != 0 or dead:
            raise RuntimeError(f"the Ray cluster did not reach {n} nodes in {timeout_s} s "
                               f"(exited: {dead}); see {[n.log for n in self.nodes]}")

    def add_node(self, env: dict[str, str]) -> RayNode:
        node = start_node(env, head_address=self.address)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Kill every node, workers first, check none of their processes is left, and remove
        the nodes' temp dirs."""
        pids = [pid for node in self.nodes for pid in node.processes()]
        for node in reversed(self.nodes):
            node.kill()
        deadline = time.time() + 30
        while alive := [p for p in pids if _alive(p)]:
            if time.time() > deadline:
                raise RuntimeError(f"Ray processes {alive} outlived their node")
            time.sleep(0.2)
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def start_node(env: dict[str, str], head_address: str | None = None,
               num_cpus: int = 1) -> RayNode:
    """``ray start --block`` for a head (``head_address`` None) or a worker joining it, on
    127.0.0.1 with ``num_cpus`` CPUs; returns at once (see :meth:`RayCluster.wait_for`)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    ports = free_ports(len(NODE_PORTS) + 2, rng)
    temp_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))  # short: Ray's socket paths
    args = [ray_exe(), "start", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", "--object-store-memory=200000000",
            *[f"--{name}={port}" for name, port in zip(NODE_PORTS, ports, strict=False)]]
    if head_address is None:
        args += ["--head", f"--port={ports[-2]}", "--include-dashboard=false",
                 f"--ray-client-server-port={ports[-1]}"]
    else:
        args += [f"--address={head_address}"]
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return RayNode(proc, temp_dir, log, f"127.0.0.1:{ports[-2]}" if head_address is None else "")


def start_cluster(env: dict[str, str], workers: int = 1) -> RayCluster:
    """A head and ``workers`` worker nodes of 1 CPU each, all alive."""
    head = start_node(env)
    cluster = RayCluster(head.address, [head], env)
    try:
        cluster.wait_for(1)
        for _ in range(workers):
            cluster.add_node(env)
        cluster.wait_for(1 + workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def task_title(pid: int) -> str:
    """A Ray worker's title (``ray::<task name>`` while it runs a task), else ''."""
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                .decode(errors="replace"))
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
