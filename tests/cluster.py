"""A real multi-node Ray cluster on this machine for tests: `ray start --head` plus `ray start --address`
nodes, each with logical GPUs, token authentication on, every process in its own session so that the test
stops exactly what it started (by process group) and nothing else."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port

VENV_BIN = str(Path(sys.executable).parent)


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(VENV_BIN) / "ray"), "start", "--block", *args], env=env,
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:  # whatever ignored SIGTERM in our own process groups
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _agent_ports() -> list[str]:
    """Free ports for a node's agents: Ray's fixed defaults (e.g. 52365) may be held by another Ray on this
    machine, such as the embedded one of the test session, and a node whose job agent cannot bind never
    accepts a job."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@contextmanager
def local_cluster(nodes: int = 2, gpus_per_node: int = 1, cpus_per_node: int | tuple[int, ...] = 4,
                  timeout: float = 120):
    """Yield ``{"address", "dashboard", "env", "tmp", "procs"}`` of a running cluster (``procs[i]``: node i's
    ``ray start``, the head first); tear it down on exit. ``cpus_per_node`` is one count for every node or one per
    node, the head first (a test that needs an actor to land on a given node makes only that node big enough)."""
    cpus = (cpus_per_node,) * nodes if isinstance(cpus_per_node, int) else tuple(cpus_per_node)
    assert len(cpus) == nodes, "one CPU count per node"
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths are limited
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs, dash = free_port(), free_port()
    common = [f"--num-gpus={gpus_per_node}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs = [_start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                     "--include-dashboard=true", f"--temp-dir={tmp}", f"--ray-client-server-port={free_port()}",
                     f"--num-cpus={cpus[0]}", *common, *_agent_ports()], env, tmp / "head.log")]
    try:
        _wait_nodes(f"127.0.0.1:{gcs}", 1, env, timeout)
        for i in range(1, nodes):
            procs.append(_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus[i]}", *common, *_agent_ports()],
                                env, tmp / f"node{i}.log"))
        _wait_nodes(f"127.0.0.1:{gcs}", nodes, env, timeout)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "tmp": tmp,
               "procs": procs}
    finally:
        _stop(procs)


def kill_node(cluster: dict, index: int) -> None:
    """Lose node ``index`` (0 is the head) as a machine is lost: SIGKILL to its whole process group (its raylet,
    object store and workers), nothing else."""
    proc = cluster["procs"][index]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_nodes(address: str, count: int, env: dict, timeout: float) -> None:
    code = (
        "import time, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"deadline = time.time() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
        "    assert time.time() < deadline, 'nodes did not come up'\n"
        "    time.sleep(0.5)\n"
    )
    deadline = time.time() + timeout
    while True:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"cluster did not start: {proc.stderr[-2000:]}")
        time.sleep(1)
