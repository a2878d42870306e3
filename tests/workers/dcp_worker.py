"""Writes a torch.distributed.checkpoint directory from every rank of a torchrun job: a
DTensor sharded by rows over the ranks, a replicated tensor, and a plain value."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh


def main(path: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3).to(torch.bfloat16)
    state = {
        "model": {"sharded": distribute_tensor(full, mesh, [Shard(0)]), "bias": torch.ones(3)},
        "step": 5,
    }
    dcp.save(state, checkpoint_id=path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
