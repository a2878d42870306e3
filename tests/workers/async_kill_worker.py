"""One rank of a training job that saves asynchronously and may be SIGKILLed anywhere.

Not a test module: ``tests/test_async_kill.py`` runs it under torchrun or mpiexec, e.g.

    DISTCKPT_FAULT=after_data@1:3 torchrun --nproc-per-node=2 async_kill_worker.py STORE saver
    mpiexec -n 2 python async_kill_worker.py STORE session

The state: a DTensor sharded over all ranks (``Shard(0)``, uneven), a rank-private tensor
large enough for an array of its own, and the step count. The job resumes from the store's
elected row (a fresh start without one), then runs the remaining of ``STEPS`` steps,
committing a row after each through ``AsyncSaver`` (``saver``) or a
``Checkpoint(async_write=True)`` session (``session``). A fault armed with
``DISTCKPT_FAULT`` SIGKILLs a rank in the writer thread. The last line of each rank is
``DONE rank=R resumed=S digest=HEX``: the digest of the full DTensor and the rank's tensor
after the last step, which :func:`expected_digest` predicts for an uninterrupted run. One
``os.write`` per line: the ranks share stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

STEPS = 6
ROWS = 3  # global rows of the DTensor per rank, plus one: uneven shards
COLS = 5
OWN = (1 << 20) // 4 + 8  # float32 elements: over the pack threshold


def say(rank: int, text: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{text} rank={rank}\n".encode())


def initial(world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full DTensor value and this rank's own tensor before the first step."""
    full = torch.arange((ROWS * world + 1) * COLS, dtype=torch.float32).reshape(-1, COLS) / 7
    own = torch.arange(OWN, dtype=torch.float32) * (rank + 1) / 1000
    return full, own


def step_update(full_or_local: torch.Tensor, own: torch.Tensor, step: int) -> None:
    """One training step, elementwise (so a shard updates like the full tensor)."""
    full_or_local.mul_(0.75).add_(step + 0.5)
    own.mul_(0.5).add_(step)


def digest(full: torch.Tensor, own: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (full, own):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def expected_digest(world: int, rank: int) -> str:
    """What an uninterrupted run prints for ``rank`` of ``world`` ranks."""
    full, own = initial(world, rank)
    for step in range(STEPS):
        step_update(full, own, step)
    return digest(full, own)


@dataclasses.dataclass
class Train:
    w: Any = None
    own: Any = None
    step: int = 0


def init() -> tuple[int, int]:
    """A gloo process group under torchrun (env://) or mpiexec (bootstrapped over MPI)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    else:
        import socket

        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        port = None
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        port = comm.bcast(port, root=0)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=comm.Get_rank(),
            world_size=comm.Get_size(),
            timeout=timedelta(seconds=60),
        )
    return dist.get_rank(), dist.get_world_size()


def main(store: str, how: str) -> int:
    import distckpt

    rank, world = init()
    mesh = init_device_mesh("cpu", (world,))
    full, own = initial(world, rank)
    train = Train(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None), own, 0)

    def advance(save: Any) -> None:
        for step in range(train.step, STEPS):
            assert isinstance(train.w, DTensor)
            step_update(train.w.to_local(), train.own, step)
            train.step = step + 1
            save()

    if how == "saver":
        state = dataclasses.asdict(train)
        with contextlib.suppress(distckpt.NoCommittedRowError):  # a fresh start
            distckpt.load(state, store)
        train = Train(**state)
        resumed = train.step
        with distckpt.AsyncSaver(store, keep=2) as saver:
            advance(lambda: saver.save(dataclasses.asdict(train)))
            saver.wait()
    elif how == "session":
        checkpoint = distckpt.Checkpoint(
            "train", path=store, async_write=True, mode="append", history_size=2
        )
        with checkpoint as session:
            distckpt.bind_checkpoint_state(train, state_id="train")
            if not isinstance(train.w, DTensor):
                # A session restores a global array's field as the whole tensor (binding
                # rebuilds fields, it does not fill live placements): shard it again.
                train.w = distribute_tensor(train.w, mesh, [Shard(0)], src_data_rank=None)
            resumed = train.step
            advance(session.write)
    else:
        raise SystemExit(f"unknown mode {how!r}")
    assert isinstance(train.w, DTensor)
    whole = train.w.full_tensor()
    say(rank, f"DONE resumed={resumed} digest={digest(whole, train.own)}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: gloo's threads can race it (see ckpt_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
