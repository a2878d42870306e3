"""Earth2Studio's ``run.ensemble`` with its members spread over ranks, one global checkpoint.

Not a test module: ``tests/test_e2s_ranks.py`` runs it under torchrun, e.g.

    torchrun --nproc-per-node=2 e2s_ranks_worker.py '[JOB, JOB, ...]'

This is the recipe of docs/earth2studio.md ("Several ranks"): every rank runs Earth2Studio's
own ``run.ensemble`` over its share of the members (``NENSEMBLE // world_size``, so every rank
writes equally many rows: ``write``/``flush`` are collective), with ``Gaussian`` seeded by
its rank and a ``ZarrBackend`` of its own (``<out>/rank_<r>.zarr``); rank r's local member i
is global member ``r + i * world_size`` (``distckpt.round_robin``). All ranks bind their
components into one ``Checkpoint`` store: a row counts once every rank committed it. A
relaunch plays the ranks that saved the store (``distckpt.play_ranks``): with as many
processes, each runs its own share as before; with fewer (1), each process runs several
saved ranks' shares at once, each from its own saved state.

Each JOB is a JSON object: ``level``, ``store``, ``out``, ``kill_after`` and ``kill_rank``
(default 0): that rank kills its process with SIGKILL right after its ``kill_after``-th
output, before that output's row (null: run to the end). ``Persistence`` over two variables
at the native 720 x 1440 grid; the initial condition is seeded noise. Every played rank
prints ``WROTE <job index> rank=<r> outputs=<n>`` (the outputs this launch wrote) and
``DONE <job index> rank=<r>`` after each finished job; a failing job prints
``FAILED <job index> rank=<r> <ExceptionClass>: ...`` and exits with 3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distckpt import Checkpoint, play_ranks, saved_world_size
from distckpt.compat.earth2studio import use_distckpt

TIME = "2024-01-01T00"
NSTEPS = 2
NENSEMBLE = 4
BATCH_SIZE = 1
VARIABLES = ["u10m", "t2m"]
LAT = np.linspace(90.0, -90.0, 720, endpoint=False)
LON = np.linspace(0.0, 360.0, 1440, endpoint=False)


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


class Source:
    """One seeded initial condition (an Earth2Studio data source), the same on every rank."""

    def __init__(self) -> None:
        import xarray as xr

        rng = np.random.default_rng(0)
        data = rng.standard_normal((1, len(VARIABLES), len(LAT), len(LON)), dtype=np.float32)
        self.da = xr.DataArray(
            data,
            dims=["time", "variable", "lat", "lon"],
            coords={
                "time": np.array([np.datetime64(TIME)]),
                "variable": np.array(VARIABLES),
                "lat": LAT,
                "lon": LON,
            },
        )

    def __call__(self, time: Any, variable: Any) -> Any:
        return self.da.sel(time=np.asarray(time), variable=np.asarray(variable))


def killing_io(path: str, kill_after: int | None) -> Any:
    from earth2studio.io import ZarrBackend

    class KillingZarr(ZarrBackend):
        writes = 0

        def write(self, x: Any, coords: Any, array_name: Any) -> None:
            super().write(x, coords, array_name)
            self.writes += 1
            if kill_after is not None and self.writes >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    return KillingZarr(file_name=path, backend_kwargs={"overwrite": False})


def run_share(job: dict[str, Any], rank: int, world_size: int) -> int:
    """Rank ``rank``'s share of the ensemble (a saved rank's, when played); returns how many
    outputs this launch wrote (fewer than a whole share when it resumed)."""
    import earth2studio.run as run
    from earth2studio.models.px import Persistence
    from earth2studio.perturbation import Gaussian

    if NENSEMBLE % world_size:  # unequal shares would write unequally many (collective) rows
        raise ValueError(f"{NENSEMBLE} members do not divide over {world_size} ranks")
    os.makedirs(job["out"], exist_ok=True)
    kill_after = job.get("kill_after") if rank == job.get("kill_rank", 0) else None
    io = killing_io(os.path.join(job["out"], f"rank_{rank}.zarr"), kill_after)
    with Checkpoint("ensemble", path=job["store"], level=job["level"]) as session:
        model = Persistence(VARIABLES, OrderedDict(lat=LAT, lon=LON))
        perturbation = Gaussian(noise_amplitude=0.1, seed=1 + rank)
        run.ensemble(
            [TIME],
            NSTEPS,
            NENSEMBLE // world_size,
            model,
            Source(),
            io,
            perturbation,
            batch_size=BATCH_SIZE,
            device=torch.device("cpu"),
            verbose=False,
            checkpoint=session,
        )
    return int(io.writes)


def run_job(job: dict[str, Any], index: int) -> None:
    """The relaunch recipe of docs/earth2studio.md: play the ranks that saved the store
    (a new store: this job's own ranks)."""
    world = saved_world_size(job["store"]) or dist.get_world_size()

    def share(rank: int, world_size: int) -> None:
        written = run_share(job, rank, world_size)
        say(f"WROTE {index} rank={rank} outputs={written}")
        say(f"DONE {index} rank={rank}")

    play_ranks(share, world)


def main(argv: list[str]) -> None:
    jobs = json.loads(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    use_distckpt()  # before any Earth2Studio component is built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import earth2studio.run  # noqa: F401
    from loguru import logger

    logger.disable("earth2studio")
    for index, job in enumerate(jobs):
        try:
            run_job(job, index)
        except Exception as exc:
            say(f"FAILED {index} rank={rank} {type(exc).__name__}: {exc}".replace("\n", " "))
            sys.exit(3)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
