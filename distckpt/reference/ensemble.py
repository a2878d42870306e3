"""The reference ensemble workflow, in the manner of ``earth2studio.run.ensemble``.

Members are spread over ranks (round robin) and run in batches; every rank runs the same
number of batches and steps (a rank without members in a batch still takes part in each
row), so the collective checkpoint writes stay in lockstep. Each step's output is written,
then a checkpoint boundary is recorded.

Resume, by the level of the row found:
- the row's batch is finished: continue with the next batch;
- level 2, inside a batch: continue the rollout after its boundary;
- level 0 or 1, inside a batch: re-run that batch from lead time zero (with a warning);
  level 1 keeps the perturbation's generator state, level 0 re-seeds it (the same draws
  here, since generators are seeded per member).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointSession, NullCheckpoint
from ..comm import Communicator
from ..errors import CheckpointError
from ..faults import active as faults_active
from ..faults import fault_point
from ..logs import get_logger
from ..preempt import PreemptionHandler
from ..rollout import Coords
from .output import ForecastStore

log = get_logger(__name__)


@dataclass(frozen=True)
class EnsembleConfig:
    nensemble: int = 8
    nsteps: int = 12
    batch_size: int = 2


def assign_members(nensemble: int, rank: int, world_size: int) -> list[int]:
    """Round robin: rank r runs members r, r + W, r + 2W, ..."""
    return list(range(rank, nensemble, world_size))


def batches_per_rank(cfg: EnsembleConfig, world_size: int) -> int:
    return math.ceil(math.ceil(cfg.nensemble / world_size) / cfg.batch_size)


def run_ensemble(
    *,
    x0: torch.Tensor,
    coords0: Coords,
    cfg: EnsembleConfig,
    model: Any,
    perturbation: Any,
    output: ForecastStore,
    checkpoint: Any = None,
    comm: Communicator,
    preemption: PreemptionHandler | None = None,
) -> dict[str, Any]:
    """Run (or resume) the ensemble; returns a summary of what this call did.

    With ``preemption``, every boundary asks (collectively) whether a rank was signalled;
    then the row just written is flushed and the process exits with the requeue status.
    """
    checkpoint = NullCheckpoint() if checkpoint is None else checkpoint
    members = assign_members(cfg.nensemble, comm.rank, comm.world_size)
    nbatches = batches_per_rank(cfg, comm.world_size)
    summary: dict[str, Any] = {"resumed_from": None, "rerun_batch": None, "batches_run": 0}
    with checkpoint as ckpt:
        tracking = isinstance(ckpt, CheckpointSession)
        meta = ckpt.metadata if tracking else {}
        completed = {int(m) for m in meta.get("completed_ensembles", [])}
        start_batch = int(meta.get("batches_done", 0))
        in_batch = (
            tracking and ckpt.exists and ckpt.write_count > 0 and meta.get("batch") == start_batch
        )
        if tracking and ckpt.exists:
            summary["resumed_from"] = ckpt.row
        for b in range(start_batch, nbatches):
            batch = members[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            restart_step = -1
            if b == start_batch and in_batch:
                row_level = ckpt.level if ckpt.level is not None else 0
                if row_level >= 2 and min(row_level, ckpt.catalog.level) >= 2:
                    restart_step = ckpt.write_count - 1
                else:
                    warnings.warn(
                        f"checkpoint row {ckpt.row} was written at level {row_level}: re-running "
                        f"batch {b} from lead time zero",
                        UserWarning,
                        stacklevel=2,
                    )
                    summary["rerun_batch"] = b
                    ckpt.write_count = 0
            elif tracking:
                ckpt.write_count = 0
            _run_batch(
                b,
                batch,
                restart_step,
                x0,
                coords0,
                cfg,
                model,
                perturbation,
                output,
                ckpt,
                completed,
                comm,
                preemption,
            )
            summary["batches_run"] += 1
        ckpt.flush()
    return summary


def _run_batch(
    b: int,
    batch: list[int],
    restart_step: int,
    x0: torch.Tensor,
    coords0: Coords,
    cfg: EnsembleConfig,
    model: Any,
    perturbation: Any,
    output: ForecastStore,
    ckpt: Any,
    completed: set[int],
    comm: Communicator,
    preemption: PreemptionHandler | None,
) -> None:
    tracking = isinstance(ckpt, CheckpointSession)

    def boundary(step: int) -> None:
        if step == cfg.nsteps:
            # Every rank finishes batch b at this same write: record all ranks' members, so
            # any rank's row (and a restart at another world size) knows the whole set.
            for members in comm.allgather(batch):
                completed.update(members)
        done = b + 1 if step == cfg.nsteps else b
        if faults_active() and tracking:
            rows = ckpt.catalog.store.rows()
            fault_point("after_output", rank=comm.rank, row=(rows[-1] if rows else -1) + 1)
        ckpt.write(
            lead_time=np.timedelta64(6 * step, "h"),
            completed_ensembles=sorted(completed),
            batch=b,
            batches_done=done,
        )
        if preemption is not None:
            preemption.at_boundary(ckpt)

    first = restart_step + 1
    if not batch:  # this rank has no members in batch b: keep the rows in lockstep
        for step in range(first, cfg.nsteps + 1):
            boundary(step)
        return
    coords = dict(coords0)
    coords["ensemble"] = np.array(batch)
    x = x0.repeat(len(batch), *([1] * (x0.dim() - 1)))
    if restart_step >= 0:
        resumable = getattr(model, "resume_step", lambda c: None)(coords)
        if resumable != restart_step:
            # Never label a re-yielded initial condition as a later step.
            raise CheckpointError(
                f"checkpoint row {ckpt.row} ends batch {b} at step {restart_step}, but the "
                f"model resumes members {batch} at {resumable}: its rollout state was not "
                "restored (bind the model inside the checkpoint session)"
            )
    else:
        x, coords = perturbation(x, coords)
    iterator = model.create_iterator(x, coords)
    for step in range(first, cfg.nsteps + 1):
        x, coords = next(iterator)
        output.write(x, batch, step)
        boundary(step)
