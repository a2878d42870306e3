"""The forecast output store: a zarr v3 group with one chunk per member and step.

Each rank writes only its own members' chunks, so no chunk is shared between writers. A
chunk is rewritten whole when a step is re-run after a restart, so the store ends with
every step exactly once whatever happened; progress is never read from it (the checkpoint
says what is done), so a chunk torn by a kill beyond the restored boundary is simply
written again.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import zarr

from distckpt.dist import step
from distckpt.dist.comm import Communicator

OPEN_STEP = step.register("output.open")


class ForecastStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._array: Any = None

    @staticmethod
    def create(
        path: str | os.PathLike[str],
        *,
        nensemble: int,
        nsteps: int,
        shape: tuple[int, ...],
        comm: Communicator,
    ) -> ForecastStore:
        """Collective: the coordinator creates the store if missing; then all open it."""
        store = ForecastStore(path)

        def make() -> None:
            if not comm.is_coordinator or os.path.exists(os.path.join(store.path, "zarr.json")):
                return
            group = zarr.open_group(store.path, mode="a")
            group.create_array(
                "x",
                shape=(nensemble, nsteps + 1, *shape),
                chunks=(1, 1, *shape),
                dtype="float32",
                fill_value=np.nan,
                dimension_names=("ensemble", "step", "lat", "lon")[: 2 + len(shape)],
            )

        # The coordinator's failure (a full disk, say) is every rank's: no rank waits on.
        step.run(comm, OPEN_STEP, make, context=f"cannot create the forecast store {store.path}")
        return store

    @property
    def array(self) -> Any:
        if self._array is None:
            self._array = zarr.open_array(os.path.join(self.path, "x"), mode="r+")
        return self._array

    def write(self, x: torch.Tensor, members: list[int], step: int) -> None:
        values = x.detach().to("cpu", torch.float32).numpy()
        for i, m in enumerate(members):
            self.array[m, step] = values[i]

    def read(self) -> np.ndarray:
        return np.asarray(zarr.open_array(os.path.join(self.path, "x"), mode="r")[...])
