"""One rank of a 2-rank job checking that an ordinary error on rank 1, at any collective step
of save or load, is raised on every rank instead of leaving rank 0 waiting.

Not a test module: ``tests/test_step.py`` runs it as

    torchrun --nproc-per-node=2 step_fault_worker.py WORKDIR
    mpiexec -n 2 python step_fault_worker.py WORKDIR

For every step of ``distckpt.dist.step.SAVE_STEPS`` and ``LOAD_STEPS`` and every error kind
below, rank 1 raises that error at that step (``faults.raising_at_step``), on a fresh store.
Each rank writes ``WORKDIR/report_N.json``: one record per case with what this rank raised
and how long it took. The gloo group's timeout is 20 s, so a rank left waiting fails its
case (a gloo error, not distckpt's) instead of hanging the job.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt import faults, lease
from distckpt.dist import step

ERRORS: dict[str, Callable[[], BaseException]] = {
    "PermissionError": lambda: PermissionError(errno.EACCES, "permission denied", "/x"),
    "ENOSPC": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "EIO": lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
    "MemoryError": lambda: MemoryError("cannot allocate the staging buffer"),
    "KeyError": lambda: KeyError("missing key"),
}
TYPE_NAMES = {"ENOSPC": "OSError", "EIO": "OSError"}
FAULTY_RANK = 1


def connect() -> Any:
    """This rank's communicator: mpi4py under mpiexec, else gloo under torchrun."""
    if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
        return distckpt.MPIComm()
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    return distckpt.TorchDistComm()


def state(rank: int) -> dict[str, Any]:
    return {"w": torch.arange(6, dtype=torch.float32) + rank, "step": rank}


def run_case(comm: Any, store: Path, name: str, kind: str) -> dict[str, Any]:
    """Arm ``kind`` at step ``name`` on rank 1 and run the save or load that reaches it."""
    is_save = name in step.SAVE_STEPS
    if not is_save:
        distckpt.save(state(comm.rank), store, comm=comm)
    record: dict[str, Any] = {"step": name, "error": kind, "raised": None}
    t0 = time.monotonic()
    try:
        with faults.raising_at_step(name, ERRORS[kind], rank=FAULTY_RANK):
            if is_save:
                distckpt.save(state(comm.rank), store, comm=comm, keep=1)
            else:
                distckpt.load({"w": torch.zeros(6), "step": -1}, store, comm=comm)
    except Exception as exc:
        record["raised"] = type(exc).__name__
        record["message"] = str(exc)
        record["distckpt"] = isinstance(exc, distckpt.CheckpointError)
        record["collective"] = isinstance(exc, distckpt.CollectiveStepError)
        record["failed_step"] = getattr(exc, "step", None)
        failures = getattr(exc, "failures", {})
        record["failures"] = {str(r): f.type for r, f in failures.items()}
    finally:
        lease.release_all()
    record["seconds"] = time.monotonic() - t0
    record["expected_type"] = TYPE_NAMES.get(kind, kind)
    return record


def main() -> int:
    workdir = Path(sys.argv[1])
    comm = connect()
    records = []
    for name in (*step.SAVE_STEPS, *step.LOAD_STEPS):
        for kind in ERRORS:
            store = workdir / f"store_{name}_{kind}"
            records.append(run_case(comm, store, name, kind))
    out = workdir / f"report_{comm.rank}.json"
    out.write_text(json.dumps({"world_size": comm.world_size, "cases": records}, indent=1))
    comm.barrier()  # both reports exist before either rank exits
    if isinstance(comm, distckpt.TorchDistComm):
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
