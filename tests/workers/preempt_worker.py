"""One rank of a preemptible job: writes a checkpoint boundary every step, stops when told.

Not a test module: ``tests/test_preempt.py`` and ``tests/test_slurm_scripts.py`` run it, e.g.

    torchrun --nproc-per-node=2 preempt_worker.py STORE --pid-dir DIR [--steps N] [--every K]

Under torchrun (``RANK`` set) it initialises ``torch.distributed`` with gloo; otherwise it
runs as a single process. It writes ``DIR/rank<N>.pid`` (atomically), then resumes from the
elected row if there is one, and loops: each step updates a per-rank tensor, records a
boundary with ``session.write`` (a row is committed every ``--flush-interval`` writes) and
asks the :class:`~distckpt.session.preempt.PreemptionHandler` whether to stop. Once told, it commits
the pending writes with ``checkpoint_and_exit`` (exit status 85, "requeue me").

Lines on stdout, one per rank and event: ``RESUMED rank= row= step=`` (or ``FRESH rank=``),
``STOP rank= step= boundary= reasons=``, ``EXIT rank= code=`` (a ``SystemExit`` on its way
out), ``DONE rank= step=``. A restored tensor that does not match the value expected at its
step exits with status 1 (``RESTORE MISMATCH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from distckpt import Checkpoint, PreemptionHandler, bind_checkpoint_state
from distckpt.dist.comm import resolve


@dataclass
class Progress:
    step: int = 0  # the next step to run
    x: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))


def say(line: str) -> None:
    """One line on stdout in one write: the ranks share the file, print() could interleave."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def expected(rank: int, next_step: int) -> torch.Tensor:
    """x after steps 0 .. next_step - 1: rank + the sum of (step + 1)."""
    return torch.full((4,), float(rank + next_step * (next_step + 1) // 2), dtype=torch.float64)


def run(args: argparse.Namespace) -> int:
    comm = resolve()
    rank = comm.rank
    os.makedirs(args.pid_dir, exist_ok=True)
    tmp = os.path.join(args.pid_dir, f".rank{rank}.pid.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(args.pid_dir, f"rank{rank}.pid"))

    ckpt = Checkpoint(
        "preempt-worker",
        path=args.store,
        mode="append",
        flush_interval=args.flush_interval,
        comm=comm,
    )
    with PreemptionHandler(every=args.every) as preemption, ckpt as session:
        state = bind_checkpoint_state(
            Progress(x=torch.full((4,), float(rank), dtype=torch.float64))
        )
        if session.exists:
            if not torch.equal(state.x, expected(rank, state.step)):
                say(f"RESTORE MISMATCH rank={rank} step={state.step} x={state.x.tolist()}")
                return 1
            say(f"RESUMED rank={rank} row={session.row} step={state.step}")
        else:
            say(f"FRESH rank={rank}")
        for step in range(state.step, args.steps):
            state.x += step + 1
            state.step = step + 1
            session.write(lead_time=step, step=step)
            if preemption.should_stop():
                reasons = json.dumps(preemption.reasons, sort_keys=True).replace(" ", "")
                say(
                    f"STOP rank={rank} step={step} boundary={preemption.boundaries} "
                    f"reasons={reasons}"
                )
                preemption.checkpoint_and_exit(session)
        session.flush()
        say(f"DONE rank={rank} step={state.step}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--pid-dir", required=True)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--flush-interval", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        code = run(args)
    except SystemExit as exc:
        say(f"EXIT rank={rank} code={exc.code}")
        raise
    if dist.is_initialized():
        dist.destroy_process_group()  # exiting with a live gloo group can abort the process
    return code


if __name__ == "__main__":
    sys.exit(main())
