"""One rank of a torchrun job checking that asynchronous saves stage every value kind.

Not a test module: ``tests/test_asyncwrite.py`` runs it, e.g.

    torchrun --nproc-per-node=2 staging_worker.py ROOT

For an ``AsyncSaver`` and for a ``Checkpoint(async_write=True)`` session, the state holds
every value kind (plain, packed small, nested, numpy, a DTensor ``Shard(0)`` over all
ranks, a ``Sharded`` piece, CUDA tensors when a GPU is present). Each is changed in place
right after ``save()``/``write()`` returned, then the row is loaded into fresh state and
compared with the values at save time. Lines: ``STAGED OK how=...`` or
``MISMATCH how=... keys``; a mismatch exits with status 1.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

import distckpt

BIG = (1 << 20) // 4 + 10  # float32 elements: over the packing threshold, an array of its own


def say(text: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{text} rank={dist.get_rank()}\n".encode())


def build(mesh: Any, rank: int, world: int, *, zero: bool) -> dict[str, Any]:
    """Every value kind; ``zero`` gives the same structure filled with zeros (a fresh state)."""
    g = torch.Generator().manual_seed(100 + rank)

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.randn(shape, generator=g).to(dtype)
        return torch.zeros_like(x) if zero else x

    full = torch.arange(world * 6 * 3, dtype=torch.float32).reshape(world * 6, 3)
    piece = torch.arange(4, dtype=torch.int64) + 10 * rank
    state: dict[str, Any] = {
        "plain": t(BIG),
        "packed": t(3, 5, dtype=torch.bfloat16),
        "nested": {"list": [t(7), (t(2, 2),)], "deep": {"x": t(9, dtype=torch.float64)}},
        "numpy": np.zeros(6) if zero else np.arange(6, dtype=np.float64) + rank,
        "dtensor": distribute_tensor(torch.zeros_like(full) if zero else full, mesh, [Shard(0)]),
        "sharded": distckpt.Sharded(
            torch.zeros_like(piece) if zero else piece, (4 * world,), (4 * rank,)
        ),
    }
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        state["cuda"] = t(BIG).to(dev)
        state["cuda_small"] = t(5).to(dev)
    return state


def snapshot(value: Any) -> Any:
    """Values only (plain CPU copies), to compare after the live state changed."""
    if isinstance(value, DTensor):
        return value.to_local().detach().cpu().clone()
    if isinstance(value, distckpt.Sharded):
        return value.local.detach().cpu().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [snapshot(v) for v in value]
    return copy.deepcopy(value)


def mutate(value: Any) -> None:
    """What a training step does right after the save returned: change values in place."""
    if isinstance(value, DTensor):
        value.to_local().add_(1)
    elif isinstance(value, distckpt.Sharded):
        value.local.add_(1)
    elif isinstance(value, torch.Tensor):
        value.add_(1)
    elif isinstance(value, np.ndarray):
        value += 1
    elif isinstance(value, dict):
        for v in value.values():
            mutate(v)
    elif isinstance(value, list | tuple):
        for v in value:
            mutate(v)


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    if isinstance(want, dict):
        return [d for k in want for d in differences(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list):
        return [d for i, w in enumerate(want) for d in differences(got[i], w, f"{path}/{i}")]
    if isinstance(want, np.ndarray):
        return [] if np.array_equal(got, want) else [path]
    return [] if torch.equal(snapshot(got), want) else [path]


def check(how: str, got: Any, want: Any) -> int:
    bad = differences(got, want)
    say(f"MISMATCH how={how} {bad}" if bad else f"STAGED OK how={how}")
    return 1 if bad else 0


@dataclasses.dataclass
class Weights:
    plain: Any = None
    packed: Any = None
    nested: Any = None
    numpy: Any = None
    dtensor: Any = None
    sharded: Any = None
    cuda: Any = None
    cuda_small: Any = None


def main() -> int:
    root = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    status = 0

    # AsyncSaver: save, change everything in place, wait.
    state = build(mesh, rank, world, zero=False)
    want = snapshot(state)
    with distckpt.AsyncSaver(os.path.join(root, "saver")) as saver:
        saver.save(state)
        mutate(state)
        row = saver.wait()
    fresh = build(mesh, rank, world, zero=True)
    distckpt.load(fresh, os.path.join(root, "saver"), row=row)
    status |= check("saver", fresh, want)

    # Checkpoint(async_write=True): write, change everything in place, leave the block.
    state = build(mesh, rank, world, zero=False)
    want = snapshot(state)
    path = os.path.join(root, "session")
    with distckpt.Checkpoint("c", path=path, async_write=True, flush_interval=1) as session:
        distckpt.bind_checkpoint_state(Weights(**state), state_id="w")
        assert session.write() is None  # returned before the commit
        mutate(state)
    fresh = {"w": build(mesh, rank, world, zero=True)}
    row = distckpt.load(fresh, path)
    status |= check("session", fresh["w"], want)

    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: gloo's threads can race it (see ckpt_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
