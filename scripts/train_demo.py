"""A small training loop that checkpoints every step with distckpt and resumes bit-exactly.

Run under torchrun (CPU, gloo), e.g.::

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        scripts/train_demo.py --store runs/demo/store --steps 12

Each rank trains its own MLP with its own Adam optimizer and its own random stream (per-rank
seeds), like ensemble members: the ranks hold different values under the same keys, and each
gets its own back. After every step all ranks commit one row; on start, a run resumes from the
newest row that every rank committed. At the end each rank writes its final state into a store
of its own (``<out>/final/rank_N``) so that runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import distckpt

SEED = 1234


def build(rank: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    """The live objects; a resumed run builds them exactly like a fresh one, then loads."""
    torch.manual_seed(SEED + rank)
    # The first layer's weight (and its two Adam moments) are 1 MiB each: those get zarr
    # arrays of their own; everything smaller is packed into one array per rank per row.
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.Tanh(),
        torch.nn.Linear(1024, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 8),
    )
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED * 1000 + rank)
    return model, optim, gen


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, gen: torch.Generator) -> float:
    # Data and label noise both come from the rank's own generator: its state is part of the
    # checkpoint, so a resumed run draws exactly the batches the uninterrupted one drew.
    x = torch.randn(64, 256, generator=gen)
    y = torch.sin(x[:, :8] * 3.0) + 0.05 * torch.randn(64, 8, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optim.zero_grad()
    loss.backward()
    optim.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="checkpoint store directory")
    parser.add_argument("--steps", type=int, default=12, help="number of training steps")
    parser.add_argument(
        "--out", help="directory for pid files and final states (default: STORE.out)"
    )
    parser.add_argument(
        "--step-time", type=float, default=0.1, help="seconds each step takes at least"
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out or f"{args.store}.out")
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank_{rank}.pid").write_text(f"{os.getpid()}\n")

    def say(msg: str) -> None:
        if rank == 0:
            print(f"[demo] {msg}", flush=True)

    model, optim, gen = build(rank)
    start = 0
    # Offline look-up: every rank reads the same manifests of the shared store. The barrier
    # keeps rank 0 from creating the store (first save) while another rank still looks.
    row = distckpt.latest(args.store)
    dist.barrier()
    if row is not None:
        # Built from the live objects: tensors are copied into them in place (model weights,
        # the RNG state tensor); the optimizer's per-parameter state is added, then applied.
        state = {
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "rng": gen.get_state(),
            "step": -1,
        }
        loaded = distckpt.load(state, args.store)
        optim.load_state_dict(state["optim"])
        gen.set_state(state["rng"])
        start = state["step"] + 1
        say(f"resumed from row {loaded} (step {state['step']} done); continuing at step {start}")
    else:
        say(f"fresh start: {world} ranks, {args.steps} steps, store {args.store}")

    loss = float("nan")
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        loss = train_step(model, optim, gen)
        state = {
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "rng": gen.get_state(),
            "step": step,
        }
        distckpt.save(state, args.store, keep=2, step=step)
        time.sleep(max(0.0, args.step_time - (time.perf_counter() - t0)))

    # Final state, one single-rank store per rank, so a plain (non-distributed) reader can
    # load any rank's part. new_group is collective: every rank creates every group.
    groups = [dist.new_group([r]) for r in range(world)]
    final = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "rng": gen.get_state(),
        "step": args.steps - 1,
    }
    distckpt.save(final, out / "final" / f"rank_{rank}", comm=groups[rank])
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, torch.tensor([loss]))
    say(
        f"finished {args.steps} steps; last loss per rank: "
        + ", ".join(f"{float(v):.6f}" for v in losses)
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
