"""One of two writers of one store with the same launcher job id (two job steps of one
SLURM allocation), each saving rows as fast as it can.

Not a test module: ``tests/test_atomic_save.py`` starts two at once, e.g.

    SLURM_JOB_ID=77 python twin_writer_worker.py STORE A 12 &
    SLURM_JOB_ID=77 python twin_writer_worker.py STORE B 12

Each save stores the writer's name and the attempt's number in its metadata and in a
tensor. A save either returns a row (printed ``SAVED writer=W n=N row=R``) or raises a
distckpt error (``REFUSED writer=W n=N <type>``: the other writer took the lease over);
anything else prints ``UNEXPECTED`` and exits 1. One ``os.write`` per line: the two
writers share stdout.
"""

from __future__ import annotations

import os
import sys

import torch

import distckpt


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def main(store: str, writer: str, count: int) -> int:
    code = ord(writer[0])
    for n in range(count):
        state = {"w": torch.full((64,), float(code * 1000 + n)), "writer": writer, "n": n}
        try:
            row = distckpt.save(state, store, writer=writer, n=n)
        except distckpt.CheckpointError as exc:
            say(f"REFUSED writer={writer} n={n} {type(exc).__name__}")
            continue
        except Exception as exc:
            say(f"UNEXPECTED writer={writer} n={n} {type(exc).__name__}: {exc}")
            return 1
        say(f"SAVED writer={writer} n={n} row={row}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
