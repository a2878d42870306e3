"""One rank of a torchrun job whose S3 server disappears in the middle of a save.

Not a test module: ``tests/test_s3.py`` runs it as

    torchrun --nproc-per-node=2 s3_vanish_worker.py s3://bucket/prefix SERVER_PID

Row 0 is saved normally. During row 1, rank 0 SIGKILLs the server just before its first
data object goes up; every rank must then raise (retries are bounded: a few seconds), and
prints ``FAILED rank=R <error>``. Lines: ``WROTE row=0``, ``FAILED ...`` or ``SAVED row=1``.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import distckpt
from distckpt import Store
from distckpt.storage.s3 import S3FileSystem, split_url

# Small client limits: a dead server must fail a request in seconds, not minutes.
OPTIONS = {
    "connect_timeout": "1s",
    "timeout": "5s",
    "max_retries": "1",
    "retry_timeout": "3",
}


def say(text: str) -> None:
    os.write(sys.stdout.fileno(), f"{text}\n".encode())


class KillsServerMidRow(S3FileSystem):
    """Kills the server (rank 0 only) before the first data object of row 1."""

    armed = False

    def write_file(self, path, parts, *, durable=True):  # type: ignore[no-untyped-def]
        if self.armed and "/data/c." in path:  # the rank's shard of the row's data
            self.armed = False
            os.kill(SERVER_PID, signal.SIGKILL)
        return super().write_file(path, parts, durable=durable)


def main() -> None:
    url, pid = sys.argv[1], int(sys.argv[2])
    global SERVER_PID
    SERVER_PID = pid
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    options = {**OPTIONS, "endpoint": os.environ["AWS_ENDPOINT_URL"], "allow_http": "true"}
    fs = KillsServerMidRow(split_url(url)[0], options)
    store = Store(url, fs=fs)
    state = {"w": torch.full((1024,), float(rank)), "step": 0}
    distckpt.save(state, store)
    say(f"WROTE row=0 rank={rank}")
    fs.armed = rank == 0
    try:
        row = distckpt.save(state, store)
    except Exception as exc:
        say(f"FAILED rank={rank} {type(exc).__name__}: {' '.join(str(exc).split())[:600]}")
    else:
        say(f"SAVED row={row} rank={rank}")
    dist.barrier()
    dist.destroy_process_group()


SERVER_PID = 0

if __name__ == "__main__":
    main()
