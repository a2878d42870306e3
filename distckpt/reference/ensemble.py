"""The reference ensemble workflow, in the manner of ``earth2studio.run.ensemble``.

Members are spread over ranks (round robin) and run in batches; every rank runs the same
number of batches and steps (a rank without members in a batch still takes part in each
row), so the collective checkpoint writes stay in lockstep. Each step's output is written,
then a checkpoint boundary is recorded.

Resume, by the level of the row found (the row may have been written at another world
size: members are then re-batched, see ``plan_batches``):
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

from distckpt.dist.comm import Communicator
from distckpt.errors import CheckpointError
from distckpt.faults import active as faults_active
from distckpt.faults import fault_point
from distckpt.logs import get_logger
from distckpt.reference.output import ForecastStore
from distckpt.session.checkpoint import CheckpointSession, NullCheckpoint
from distckpt.session.members import round_robin
from distckpt.session.preempt import PreemptionHandler
from distckpt.session.rollout import Coords

log = get_logger(__name__)


@dataclass(frozen=True)
class EnsembleConfig:
    nensemble: int = 8
    nsteps: int = 12
    batch_size: int = 2


def assign_members(nensemble: int, rank: int, world_size: int) -> list[int]:
    """Round robin: rank r runs members r, r + W, r + 2W, ..."""
    return round_robin(nensemble, rank, world_size)


def batches_per_rank(cfg: EnsembleConfig, world_size: int) -> int:
    return math.ceil(math.ceil(cfg.nensemble / world_size) / cfg.batch_size)


def plan_batches(
    cfg: EnsembleConfig,
    rank: int,
    world_size: int,
    completed: set[int] | frozenset[int] = frozenset(),
    in_progress: set[int] | frozenset[int] = frozenset(),
) -> list[list[int]]:
    """This rank's remaining batches; every rank gets the same number (lockstep).

    Members not yet completed, in round robin order at ``world_size``. Members
    ``in_progress`` (resumed inside their rollout) come first, together as one batch (all
    stopped at the same step); the rest follow in batches of ``cfg.batch_size``. A rank
    with fewer batches than another is padded with empty ones. On a fresh run this is the
    plain round robin batching; resumed at the world size that wrote the row, the same
    batches as before the restart.
    """

    def split(r: int) -> tuple[list[int], list[list[int]]]:
        mine = [m for m in assign_members(cfg.nensemble, r, world_size) if m not in completed]
        head = [m for m in mine if m in in_progress]
        rest = [m for m in mine if m not in in_progress]
        return head, [rest[i : i + cfg.batch_size] for i in range(0, len(rest), cfg.batch_size)]

    everyone = [split(r) for r in range(world_size)]
    resuming = any(head for head, _ in everyone)
    nfresh = max(len(rest) for _, rest in everyone)
    head, rest = everyone[rank]
    return ([head] if resuming else []) + rest + [[] for _ in range(nfresh - len(rest))]


def _in_progress(ckpt: Any, meta: dict[str, Any], cfg: EnsembleConfig) -> set[int]:
    """Members of every rank's batch at the row (rows written before ``in_progress`` was
    recorded: derived from the round robin batching at the row's world size)."""
    if "in_progress" in meta:
        return {int(m) for m in meta["in_progress"]}
    saved_world = ckpt.entry.world_size if ckpt.entry is not None else 1
    b = int(meta.get("batch", 0))
    return {
        m
        for q in range(saved_world)
        for m in assign_members(cfg.nensemble, q, saved_world)[
            b * cfg.batch_size : (b + 1) * cfg.batch_size
        ]
    }


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

    The row may come from a job of another world size (restored through a
    :class:`~distckpt.MemberMapping`): completed members are skipped, members in progress
    continue on whichever rank now holds them (level 2) or re-run from lead time zero.

    With ``preemption``, every boundary asks (collectively) whether a rank was signalled;
    then the row just written is flushed and the process exits with the requeue status.
    """
    checkpoint = NullCheckpoint() if checkpoint is None else checkpoint
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
        restart_step = -1
        running: set[int] = set()
        if in_batch:
            row_level = ckpt.level if ckpt.level is not None else 0
            if row_level >= 2 and min(row_level, ckpt.catalog.level) >= 2:
                restart_step = ckpt.write_count - 1
                running = _in_progress(ckpt, meta, cfg)
            else:
                warnings.warn(
                    f"checkpoint row {ckpt.row} was written at level {row_level}: re-running "
                    f"batch {start_batch} from lead time zero",
                    UserWarning,
                    stacklevel=2,
                )
                summary["rerun_batch"] = start_batch
                ckpt.write_count = 0
        batches = plan_batches(cfg, comm.rank, comm.world_size, completed, running)
        for i, batch in enumerate(batches):
            b = start_batch + i
            if tracking and not (i == 0 and in_batch):
                ckpt.write_count = 0  # a new batch (a resumed one keeps the row's count)
            _run_batch(
                b,
                batch,
                restart_step if i == 0 else -1,
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
    # Every rank's members of this batch: recorded in each row as in progress, then as
    # completed at the batch's last write, so any rank's row (and a restart at another
    # world size) knows the whole set.
    running = sorted(m for members in comm.allgather(batch) for m in members)

    def boundary(step: int) -> None:
        if step == cfg.nsteps:
            completed.update(running)
        done = b + 1 if step == cfg.nsteps else b
        if faults_active() and tracking:
            rows = ckpt.catalog.store.rows()
            fault_point("after_output", rank=comm.rank, row=(rows[-1] if rows else -1) + 1)
        ckpt.write(
            lead_time=np.timedelta64(6 * step, "h"),
            completed_ensembles=sorted(completed),
            in_progress=[] if step == cfg.nsteps else running,
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
