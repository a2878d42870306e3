"""Earth2Studio's own workflows on distckpt, in a process that SIGKILLs itself on cue.

Not a test module: ``tests/test_e2s_workflows.py`` runs it, e.g.

    python e2s_workflow_worker.py '[JOB, JOB, ...]'

Each JOB is a JSON object: ``workflow`` (deterministic, diagnostic or ensemble), ``model``
(persistence or fcn), ``level``, ``store`` (the distckpt checkpoint), ``out`` (the
``ZarrBackend`` directory, reopened without overwrite by a relaunch) and ``kill_after``: the
number of outputs after which the process kills itself with SIGKILL, right after writing that
output and before its checkpoint row (null: run to the end). Jobs run in order, each in a
fresh ``with Checkpoint(...)`` block with freshly built components, so one launch can resume
the job an earlier launch was killed in and then run (and be killed in) the next one.

The models run at their native 720 x 1440 grid: ``Persistence`` over FCN's 26 variables, and
``FCN`` around a randomly initialised 1x1 convolution (seeded, so every launch builds the
same network; no weights are downloaded). The initial condition is seeded noise. Outputs are
restricted to two variables to keep the zarr writes small. Prints ``DONE <job index>`` after
each finished job.
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

from distckpt import Checkpoint
from distckpt.compat.earth2studio import use_distckpt

TIME = "2024-01-01T00"
NSTEPS = 2
NENSEMBLE = 2
OUTPUT_VARIABLES = np.array(["u10m", "t2m"])


def say(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


class Source:
    """One seeded initial condition on FCN's grid and variables (an Earth2Studio source)."""

    def __init__(self, variables: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> None:
        import xarray as xr

        rng = np.random.default_rng(0)
        data = rng.standard_normal((1, len(variables), len(lat), len(lon)), dtype=np.float32)
        self.da = xr.DataArray(
            data,
            dims=["time", "variable", "lat", "lon"],
            coords={
                "time": np.array([np.datetime64(TIME)]),
                "variable": variables,
                "lat": lat,
                "lon": lon,
            },
        )

    def __call__(self, time: Any, variable: Any) -> Any:
        return self.da.sel(time=np.asarray(time), variable=np.asarray(variable))


def build_model(kind: str) -> Any:
    from earth2studio.models.px import FCN, Persistence
    from earth2studio.models.px.fcn import VARIABLES

    n = len(VARIABLES)
    torch.manual_seed(0)
    core = torch.nn.Conv2d(n, n, kernel_size=1)
    with torch.no_grad():
        core.weight.mul_(0.1)
    fcn = FCN(core, center=torch.zeros(1, n, 1, 1), scale=torch.ones(1, n, 1, 1))
    if kind == "fcn":
        return fcn
    coords = fcn.input_coords()
    domain = OrderedDict(lat=coords["lat"], lon=coords["lon"])
    return Persistence(list(VARIABLES), domain)


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


def run_job(job: dict[str, Any]) -> None:
    import earth2studio.run as run
    from earth2studio.models.dx import DerivedWS
    from earth2studio.perturbation import Gaussian

    io = killing_io(job["out"], job.get("kill_after"))
    with Checkpoint(job["workflow"], path=job["store"], level=job["level"]) as session:
        model = build_model(job["model"])
        coords = model.input_coords()
        data = Source(coords["variable"], coords["lat"], coords["lon"])
        common = {
            "output_coords": OrderedDict(variable=OUTPUT_VARIABLES),
            "device": torch.device("cpu"),
            "checkpoint": session,
        }
        if job["workflow"] == "deterministic":
            run.deterministic([TIME], NSTEPS, model, data, io, **common)
        elif job["workflow"] == "diagnostic":
            # DerivedWS takes any grid (empty lat/lon coordinates), and the workflow would
            # size the output by them: give the grid explicitly.
            common["output_coords"] = OrderedDict(
                variable=np.array(["ws10m"]), lat=coords["lat"], lon=coords["lon"]
            )
            run.diagnostic([TIME], NSTEPS, model, DerivedWS(levels=["10m"]), data, io, **common)
        else:
            perturbation = Gaussian(noise_amplitude=0.1, seed=1)
            run.ensemble(
                [TIME], NSTEPS, NENSEMBLE, model, data, io, perturbation, batch_size=1, **common
            )


def main(argv: list[str]) -> None:
    jobs = json.loads(argv[1])
    use_distckpt()  # before any Earth2Studio component is built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import earth2studio.run  # noqa: F401
    from loguru import logger

    logger.disable("earth2studio")
    for index, job in enumerate(jobs):
        run_job(job)
        say(f"DONE {index}")


if __name__ == "__main__":
    main(sys.argv)
