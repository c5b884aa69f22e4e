"""A real one-node Ray cluster for the tests that need one, from the Ray of the `[ray]` extra:
`ray start --head --block` with token authentication and a token of its own (Ray 2.60 refuses a
driver without it; Ray resolves a loopback address to the machine's own, so the cluster listens
there, guarded by the token).

Stopped by its own processes (its temporary folder names them), never by `ray stop`, which would
stop every Ray instance of the machine (another test file's, on another pytest-xdist worker).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port, for train.ray.address / search.ray.address
    head_pid: int  # `ray start`: its raylet (under it) starts the workers
    env: dict[str, str]  # what a driver needs to join it (the token's mode and path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster(num_cpus: int = 2) -> Iterator[RayCluster]:
    """A one-node Ray cluster of ``num_cpus`` CPUs, stopped when the context exits."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    log = temp / "start.log"
    with log.open("w") as out:
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 f"--port={_free_port()}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
                                 "--disable-usage-stats", f"--temp-dir={temp}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"ray start --address='([^']+)'", log.read_text())):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield RayCluster(found.group(1), head.pid, auth)
    finally:
        _stop_all(head.pid, str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _stop_all(head: int, folder: str) -> None:
    """TERM the head, what runs under it and the servers `ray start` left running on their own (their
    command lines name the cluster's folder); KILL what is still there a second later."""
    import psutil

    procs = []
    with suppress(psutil.Error):
        procs = [psutil.Process(head), *psutil.Process(head).children(recursive=True)]
    for p in psutil.process_iter(["cmdline"]):
        if folder in " ".join(p.info["cmdline"] or []) and p not in procs:
            procs.append(p)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=1)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=15)


def train_workers(cluster: RayCluster) -> list:
    """The Ray Train worker processes of ``cluster`` (psutil processes)."""
    import psutil

    found = []
    for p in psutil.Process(cluster.head_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found
