"""A job whose ranks each hold rank-private state, resumable on fewer processes.

Not a test module: ``tests/test_played_ranks.py`` runs it under torchrun, e.g.

    torchrun --nproc-per-node=2 played_worker.py '[JOB, JOB, ...]'

and imports it to resume in its own process. Every rank runs the same loop over its own
component: a random walk whose generator is seeded by the rank (as Earth2Studio's ``Gaussian``
is in docs/earth2studio.md, "Several ranks"), bound into one global ``Checkpoint``. The
component is not keyed by member, so only the rank that saved it can resume it; a job with
fewer processes plays the saved ranks (``distckpt.play_ranks``) to resume every one of them.

Each JOB is a JSON object: ``store``, ``out``, ``world`` (the job's size when the store holds
no row yet), ``kill_rank`` and ``kill_after``: that rank SIGKILLs its process right after its
``kill_after``-th output, before the output's row (null: run to the end); ``fail_rank`` and
``fail_after`` raise ``RuntimeError`` there instead. Rank r writes step
s's output to ``<out>/rank_<r>/step_<s>.npy``. Every played rank prints ``START <job> rank=<r>
step=<s>`` (the step it resumes at) and ``DONE <job> rank=<r>``; a failing job prints
``FAILED <job> <ExceptionClass>: ...`` and exits with 3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distckpt import Checkpoint, bind_checkpoint_state, play_ranks, saved_world_size

NSTEPS = 4
SIZE = 64


@dataclass
class Walker:
    """One rank's component: its generator state, position and next step."""

    generator: torch.Tensor | None = None
    x: torch.Tensor | None = None
    step: int = 0


# One schema whether the worker runs as a script (``__main__``) or is imported by the test.
Walker.__module__ = "played_worker"


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def share(job: dict[str, Any], index: int, rank: int, world: int) -> int:
    """Rank ``rank``'s work; returns the step it started (or resumed) at."""
    out = os.path.join(job["out"], f"rank_{rank}")
    os.makedirs(out, exist_ok=True)
    with Checkpoint("walk", path=job["store"], level=1) as session:
        state = bind_checkpoint_state(Walker(), state_id="walker")
        generator = torch.Generator().manual_seed(100 + rank)
        x = torch.zeros(SIZE, dtype=torch.float64)
        if state.checkpoint_state_loaded:
            generator.set_state(state.generator)
            x = state.x
        start = state.step
        say(f"START {index} rank={rank} step={start}")
        for step in range(start, NSTEPS):
            x = x + torch.randn(SIZE, generator=generator, dtype=torch.float64)
            np.save(os.path.join(out, f"step_{step}.npy"), x.numpy())
            if rank == job.get("kill_rank") and step + 1 == job.get("kill_after"):
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == job.get("fail_rank") and step + 1 == job.get("fail_after"):
                raise RuntimeError(f"rank {rank} fails after step {step}")
            state.generator, state.x, state.step = generator.get_state(), x.clone(), step + 1
            session.write(lead_time=step)
    say(f"DONE {index} rank={rank}")
    return start


def run(job: dict[str, Any], index: int = 0, comm: Any = None) -> list[int]:
    """The relaunch recipe: play the ranks of the job that saved the store (or, for a new
    store, ``job["world"]``); returns each played rank's start step."""
    world = saved_world_size(job["store"], comm=comm) or job["world"]
    return play_ranks(lambda rank, size: share(job, index, rank, size), world, comm=comm)


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    jobs = json.loads(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for index, job in enumerate(jobs):
        try:
            run(job, index)
        except Exception as exc:
            say(f"FAILED {index} {type(exc).__name__}: {exc}".replace("\n", " "))
            sys.exit(3)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
