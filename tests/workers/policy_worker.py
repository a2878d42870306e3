"""One rank of a 2-rank job checking that ``load_model`` fails on every rank together.

Not a test module: ``tests/test_policies.py`` runs it as

    torchrun --nproc-per-node=2 policy_worker.py STORE OUTDIR

Both ranks save an encoder ``Linear(10, 5)`` + decoder ``Linear(5, 3)``; then rank 1 loads
into a model whose decoder is ``Linear(5, 7)`` under the strict policy. Each rank writes
``OUTDIR/rank_N.txt`` (its own file, so the ranks' lines cannot interleave):
``RAISED: message`` when the load raised (exit 0), ``LOADED`` otherwise (exit 1).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import distckpt


def model(out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, out))


def main() -> int:
    store, outdir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        distckpt.save({"model": model(3).state_dict()}, store)
        live = model(7 if rank == 1 else 3)
        try:
            distckpt.load_model(live, store)
        except distckpt.CheckpointStateSchemaError as exc:
            (outdir / f"rank_{rank}.txt").write_text(f"RAISED: {exc}")
            return 0
        (outdir / f"rank_{rank}.txt").write_text("LOADED")
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: gloo's threads can race it and abort the process after a
    # successful run ("terminate called without an active exception"; see ckpt_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
