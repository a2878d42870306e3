#!/usr/bin/env python3
"""Run the reference ensemble forecast with restart checkpoints; resumes when relaunched.

    python -m torch.distributed.run --standalone --nproc-per-node=2 scripts/ensemble.py \\
        --checkpoint runs/ens/ckpt --output runs/ens/out
    mpiexec -n 4 python scripts/ensemble.py --checkpoint runs/ens/ckpt --output runs/ens/out

A relaunch may use another number of ranks: members move to their new ranks and the output
is the same, bit for bit.

Prints one ``DONE`` line on rank 0 with a digest of the whole output store.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

import torch
import torch.distributed as dist

from distckpt import Checkpoint, MemberMapping
from distckpt.dist.comm import resolve, under_mpi_launcher
from distckpt.reference import (
    EnsembleConfig,
    ForecastStore,
    GaussianPerturbation,
    Persistence,
    StochasticModel,
    initial_condition,
    run_ensemble,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint store directory")
    p.add_argument("--output", required=True, help="forecast output zarr store")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--level", type=int, choices=(0, 1, 2), default=2)
    p.add_argument("--model", choices=("stochastic", "persistence"), default="stochastic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, nargs=2, default=(16, 32), metavar=("LAT", "LON"))
    p.add_argument("--pid-dir", help="each rank writes its process id to DIR/rank_<r>.pid")
    args = p.parse_args(argv)

    logging.basicConfig(level=os.environ.get("DISTCKPT_LOG", "WARNING"))
    torch.set_num_threads(1)
    if "RANK" in os.environ and not under_mpi_launcher() and not dist.is_initialized():
        dist.init_process_group("gloo")
    comm = resolve()
    if args.pid_dir:  # lets a driver (scripts/demo.py) kill one rank's process for real
        os.makedirs(args.pid_dir, exist_ok=True)
        with open(os.path.join(args.pid_dir, f"rank_{comm.rank}.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")

    cfg = EnsembleConfig(nensemble=args.members, nsteps=args.steps, batch_size=args.batch_size)
    x0, coords0 = initial_condition(tuple(args.grid), seed=args.seed)
    output = ForecastStore.create(
        args.output, nensemble=cfg.nensemble, nsteps=cfg.nsteps, shape=tuple(args.grid), comm=comm
    )
    # Member-keyed state (noise, RNG, rollout boundary) follows its members to whichever
    # rank holds them, so the job may be relaunched on another number of ranks.
    ckpt = Checkpoint(
        "ensemble",
        path=args.checkpoint,
        mode="overwrite",
        level=args.level,
        comm=comm,
        mapping=MemberMapping(cfg.nensemble),
    )
    with ckpt as session:
        # Components bind their restart state inside the session: restored on construction.
        if args.model == "stochastic":
            model: StochasticModel | Persistence = StochasticModel(seed=args.seed)
        else:
            model = Persistence()
        perturbation = GaussianPerturbation(std=0.1, seed=args.seed)
        summary = run_ensemble(
            x0=x0,
            coords0=coords0,
            cfg=cfg,
            model=model,
            perturbation=perturbation,
            output=output,
            checkpoint=session,
            comm=comm,
        )
    comm.barrier()
    if comm.rank == 0:
        digest = hashlib.sha256(output.read().tobytes()).hexdigest()[:16]
        print(
            f"DONE world={comm.world_size} resumed_from={summary['resumed_from']} "
            f"rerun_batch={summary['rerun_batch']} digest={digest}",
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
