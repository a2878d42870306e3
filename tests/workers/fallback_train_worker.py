"""A training job's restart: load the newest usable row of a store, train one step, save.

Not a test module: ``tests/test_fallback.py`` runs it under ``scripts/slurm/run.sh`` (srun
and torchrun), as a requeued SLURM job would, with the store's newest row damaged:

    torchrun --nproc-per-node=1 fallback_train_worker.py STORE

Prints ``LOADED rank=R row=ROW step=S`` (row -1 on a fresh start) and ``SAVED rank=R
row=ROW``, one ``os.write`` per line.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import distckpt


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def main(store: str) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = {"w": torch.zeros(16), "step": -1}
    try:
        row = distckpt.load(state, store)
    except distckpt.NoCommittedRowError:
        row = -1
    say(f"LOADED rank={rank} row={row} step={state['step']}")
    state["step"] += 1
    state["w"] += 1
    saved = distckpt.save(state, store)
    say(f"SAVED rank={rank} row={saved}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
