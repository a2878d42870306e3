"""A complete, resumable FSDP2 training loop with distckpt's CheckpointManager.

    torchrun --nproc-per-node=2 examples/train_fsdp2.py CKPT_DIR [--steps 20]

Everything a restart needs goes into the manager's state dict as Stateful values (objects
with ``state_dict()``/``load_state_dict()``): the FSDP2 (``fully_shard``) model and AdamW
optimizer through ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
``set_state_dict``, the LR scheduler, a ``StatefulDataLoader`` (its position in the epoch
and its sampler's generator) and each rank's RNG state (dropout draws from it). Saves are
asynchronous; SIGUSR1 or SIGTERM to any rank saves the current step on every rank and exits
with status 85 ("requeue me"); run the same command again to continue. A relaunch at the
same number of ranks reproduces an uninterrupted run bit for bit; at another number the
sharded model and optimizer are resharded (the data order stays the same, the dropout masks
differ, so losses agree only approximately).

Two RNG pitfalls this example avoids:

- a DataLoader draws the base seed of each new iterator from the *global* torch RNG unless
  it has a ``generator`` of its own: a resumed job (whose global RNG is elsewhere) then
  shuffles differently. Give the loader and its sampler seeded generators and save the
  loader (``StatefulDataLoader`` with torchdata's ``RandomSampler``, which saves its
  generator: torch's own sampler does not), so the position and the shuffle order restore;
- dropout draws from the device's global RNG: save it (``distckpt.rng.capture_global``) and
  restore it, per rank, or the resumed masks differ.

Lines on rank 0's stdout: ``RESUMED step=N world=W`` or ``FRESH world=W``, one
``LOSS step=N loss=HEX`` per step (``float.hex``: exact), ``DONE step=N``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import distckpt
from distckpt import rng


class ModelAndOptimizer:
    """The FSDP2 model and its optimizer as one Stateful value (the pattern DCP documents):
    sharded tensors are saved as global arrays, so a job of another size can reshard them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


class RankRng:
    """This rank's global RNG state (dropout), keyed by rank so that a job of another size
    can merge the saved ranks' states (see ``rng_mapping``); a rank with no saved state of
    its own (a larger job) reseeds from the seed, its rank and the step."""

    def __init__(self, rank: int, seed: int) -> None:
        self.rank = rank
        self.seed = seed
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {str(self.rank): rng.capture_global()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = state.get(str(self.rank))
        if own is not None:
            rng.restore_global(own)
        else:
            torch.manual_seed(self.seed * 1000 + self.rank + 7919 * self.step)


def rng_mapping(state_id: str, saved: int, rank: int, world: int) -> list[int] | None:
    """At another world size: rank r reads the RNG states of saved ranks s with s % world
    == r (every saved rank is read by someone), or saved rank r % saved."""
    if state_id != "rng":
        return None
    mine = [s for s in range(saved) if s % world == rank]
    return mine or [rank % saved]


def make_model(features: int, hidden: int, outputs: int, dropout: float) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, outputs),
    )


def say(line: str) -> None:
    """One line on stdout in one write (ranks share the file)."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="checkpoint directory (created on the first save)")
    p.add_argument("--steps", type=int, default=20, help="training steps in all (default 20)")
    p.add_argument("--save-every", type=int, default=4, help="steps between saves (default 4)")
    p.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model, shuffle")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
        # One process without a launcher: an in-memory rendezvous store.
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by {world} ranks")

    # The same data and initial weights on every rank and at every world size.
    torch.manual_seed(args.seed)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 4))
    model = make_model(8, 16, 4, dropout=0.1).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    # Every rank iterates the same global batches (seeded sampler and loader generators)
    # and trains on its slice of each, so the data order does not depend on the world size.
    # torchdata's RandomSampler saves its generator with the loader's position; torch's
    # does not, and would replay the first epoch's order after a restart.
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(args.seed + 1))
    loader = StatefulDataLoader(
        data,
        batch_size=args.batch,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed + 2),
    )
    torch.manual_seed(args.seed * 1000 + rank)  # this rank's dropout stream
    rank_rng = RankRng(rank, args.seed)

    state = {
        "train": ModelAndOptimizer(model, optimizer),
        "scheduler": scheduler,
        "data": loader,
        "rng": rank_rng,
    }
    with distckpt.CheckpointManager(
        args.store,
        save_interval_steps=args.save_every,
        keep_last=2,
        keep_best=("loss", 1, "min"),
        async_=True,
        preemption=True,
    ) as manager:
        rank_rng.step = manager.latest_step() or 0
        last = manager.restore(state, mapping=distckpt.SourceRanks(rng_mapping))
        start = 0 if last is None else last + 1
        if rank == 0:
            say(f"FRESH world={world}" if last is None else f"RESUMED step={last} world={world}")
        batches = iter(loader)
        for step in range(start, args.steps):
            try:
                x, y = next(batches)
            except StopIteration:  # a new epoch: the sampler's generator goes on
                batches = iter(loader)
                x, y = next(batches)
            x, y = x[rank::world].to(device), y[rank::world].to(device)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # FSDP2 averages the gradients over the ranks
            optimizer.step()
            scheduler.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            mean = total.item() / world
            if rank == 0:
                say(f"LOSS step={step} loss={mean.hex()}")
            if manager.should_save(step):  # True on every rank once any was signalled
                manager.save(step, state, metrics={"loss": mean})  # exits 85 if preempted
        manager.save(args.steps - 1, state, force=True)  # the final state (if not saved)
    if rank == 0:
        say(f"DONE step={args.steps - 1}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
