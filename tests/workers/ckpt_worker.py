"""One rank of a real multi-process checkpoint job, launched by torchrun or mpiexec.

Not a test module: ``tests/test_multiproc.py`` runs it as a script, e.g.

    torchrun --nproc-per-node=2 ckpt_worker.py STORE 3 write --first-row 0 --world 2
    mpiexec -n 2 python ckpt_worker.py STORE 0 restore-check --expect-row 2 --world 2

Under torchrun (``RANK``/``WORLD_SIZE`` set, no MPI launcher) it initialises
``torch.distributed`` with gloo; under mpiexec it only imports mpi4py. distckpt is always
called with ``comm=None``, so its communicator auto-detection is under test too.

MODE is a comma-separated list of steps, run in order:

``write``          save ROWS rows, ids ``--first-row`` .. ``--first-row + ROWS - 1``
``write-async``    the same through ``distckpt.AsyncSaver`` (a background writer thread)
``restore-check``  load the elected row into zero-filled targets and compare bit-exactly with
                   values regenerated for (rank, row); ``--expect-row`` (default: the last row
                   this job wrote) must be the elected one
``expect-error``   loading must fail with NoCommittedRowError or WorldSizeMismatchError on
                   every rank (elected row, and ``--expect-row`` explicitly when given)

Each step prints one line per rank starting with ``WROTE``, ``RESTORE-CHECK OK``,
``EXPECTED-ERROR``; a failed check prints ``RESTORE-CHECK MISMATCH`` / ``UNEXPECTED`` and the
process exits with status 1. Under torchrun the last line says whether
``destroy_process_group()`` really released the group (``PROCESS-GROUP RELEASED``/``LEAKED``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import math
import os
import sys
import weakref
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import distckpt
import distckpt.dist.comm
import distckpt.faults
import distckpt.io.commit

_MPI_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")

BIG_SHAPE = (400, 800)  # float32: 1.28 MB, over the 1 MiB pack threshold -> own array
BIG_BF16_NUMEL = 600_000  # bfloat16: 1.2 MB -> own array


# -- launch -----------------------------------------------------------------------------------
class Job:
    """The process group this rank belongs to, however it was launched."""

    def __init__(self) -> None:
        self.backend = "single"
        self._mpi: Any = None
        if any(v in os.environ for v in _MPI_VARS):
            from mpi4py import MPI

            self._mpi = MPI.COMM_WORLD
            self.backend = "mpi"
            self.rank, self.world = self._mpi.Get_rank(), self._mpi.Get_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo", timeout=timedelta(seconds=60))
            self.backend = "torch"
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1

    def barrier(self) -> None:
        if self.backend == "torch":
            dist.barrier()
        elif self.backend == "mpi":
            self._mpi.Barrier()

    def close(self) -> None:
        if self.backend == "torch":
            # Without this barrier a rank that exits right after distckpt's last gloo
            # collective aborts ~40% of the time (4 ranks, 2 cores) with "terminate called
            # without an active exception": gloo's runloop thread drops the finished
            # all_gather work (decref of its Python tensors, needs the GIL) after wait()
            # returned, racing interpreter shutdown. destroy_process_group() alone does not
            # prevent it (a torch/gloo teardown race, not a distckpt bug).
            dist.barrier()
            world = weakref.ref(dist.group.WORLD)
            dist.destroy_process_group()
            gc.collect()
            # distckpt must not keep a destroyed group (and its gloo threads) alive.
            say(self, f"PROCESS-GROUP {'LEAKED' if world() is not None else 'RELEASED'}")


def say(job: Job, text: str) -> None:
    """One line, one write(2): ranks share the launcher's stdout and must not interleave."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{text} rank={job.rank}\n".encode())


# -- the state each rank saves ----------------------------------------------------------------
def make_state(rank: int, row: int) -> dict[str, Any]:
    """Deterministic, different for every (rank, row): regenerated to check a restore."""
    seed = 7919 * (rank + 1) + row
    g = torch.Generator().manual_seed(seed)
    rng = torch.Generator().manual_seed(seed * 31 + 1)
    return {
        "model": {
            "big": torch.randn(BIG_SHAPE, generator=g),
            "big_bf16": torch.randn(BIG_BF16_NUMEL, generator=g).to(torch.bfloat16),
            # small tensors: packed; odd sizes first so later offsets are unaligned
            "mask": torch.rand(9, generator=g) > 0.5,
            "emb_bf16": torch.randn(16, 5, generator=g).to(torch.bfloat16),
            "weight": torch.randn(8, 8, generator=g),
            "bias": torch.randn(8, generator=g, dtype=torch.float64),
            "half": torch.randn(7, generator=g).to(torch.float16),
            "ids": torch.randint(-(2**40), 2**40, (5,), generator=g, dtype=torch.int64),
            "scalar": torch.tensor(float(rank * 1000 + row) + 0.25),
            "special": torch.tensor(
                [math.nan, -0.0, math.inf, -math.inf, 1e-45, float(rank), float(row)],
                dtype=torch.float32,
            ),
        },
        "rng_state": rng.get_state(),
        "numpy": np.arange(6, dtype=np.int32).reshape(2, 3) * (rank + 1) + row,
        "progress": {
            "step": row,
            "rank": rank,
            "lr": 0.1 * (row + 1) / (rank + 1),
            "name": f"rank{rank}-row{row}",
            "flags": [True, False, None],
            "pair": (row, "x", 2.5),
            "deep": {"a": {"b": [rank, row, {"c": -1.5 * rank}]}},
            "big_int": 2**62 + rank,
        },
    }


def make_metadata(rank: int, row: int, world: int) -> dict[str, Any]:
    return {
        "step": row,
        "writer": f"rank{rank}",
        "world": world,
        "when": dt.datetime(2024, 1, 1) + dt.timedelta(hours=row),
        "tags": ["ckpt", row],
    }


def zero_like(value: Any) -> Any:
    """Restore target: tensors zero-filled, Python values replaced by placeholders."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    if isinstance(value, dict):
        return {k: zero_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [zero_like(v) for v in value]
    return None


def tensor_refs(value: Any, path: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {path: value}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(tensor_refs(v, f"{path}/{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(tensor_refs(v, f"{path}/{i}"))
    return out


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare(expected: Any, got: Any, path: str = "") -> list[str]:
    """Bit-exact differences between two state trees (NaN payloads and -0.0 included)."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{where}: expected a tensor, got {type(got).__name__}"]
        if got.dtype != expected.dtype or got.shape != expected.shape:
            return [
                f"{where}: expected {expected.dtype}{tuple(expected.shape)}, "
                f"got {got.dtype}{tuple(got.shape)}"
            ]
        if not torch.equal(raw_bytes(expected), raw_bytes(got)):
            diff = int((raw_bytes(expected) != raw_bytes(got)).sum())
            return [f"{where}: {diff} of {expected.nbytes} bytes differ"]
        return []
    if isinstance(expected, np.ndarray):
        if not isinstance(got, np.ndarray):
            return [f"{where}: expected an ndarray, got {type(got).__name__}"]
        if got.dtype != expected.dtype or got.shape != expected.shape:
            return [
                f"{where}: expected {expected.dtype}{expected.shape}, got {got.dtype}{got.shape}"
            ]
        if got.tobytes() != expected.tobytes():
            return [f"{where}: ndarray bytes differ"]
        return []
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            return [f"{where}: expected keys {sorted(expected)}, got {keys}"]
        return [m for k in expected for m in compare(expected[k], got[k], f"{path}/{k}")]
    if isinstance(expected, list | tuple):
        if type(got) is not type(expected) or len(got) != len(expected):
            return [f"{where}: expected {expected!r}, got {got!r}"]
        out: list[str] = []
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            out += compare(e, g, f"{path}/{i}")
        return out
    if type(got) is not type(expected) or got != expected:
        return [f"{where}: expected {expected!r}, got {got!r}"]
    return []


def digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(raw_bytes(state["model"]["big"]).numpy().tobytes()).hexdigest()[:16]


# -- steps ------------------------------------------------------------------------------------
def step_write_async(job: Job, store: str, rows: int, first: int) -> int | None:
    """The same rows through ``AsyncSaver``: each state is zeroed as soon as ``save()``
    returns (the row must hold the staged copy); WROTE is printed once a row is reported
    committed (at the next save, or at ``wait()``)."""
    said = 0
    with distckpt.AsyncSaver(store) as saver:
        for row in range(first, first + rows):
            state = make_state(job.rank, row)
            saver.save(state, row=row, **make_metadata(job.rank, row, job.world))
            for t in tensor_refs(state).values():
                t.zero_()
            for done in saver.committed[said:]:
                say(job, f"WROTE row={done}")
            said = len(saver.committed)
        saver.wait()
        for done in saver.committed[said:]:
            say(job, f"WROTE row={done}")
    return saver.committed[-1] if saver.committed else None


def step_write(job: Job, store: str, rows: int, first: int) -> int | None:
    last = None
    for row in range(first, first + rows):
        state = make_state(job.rank, row)
        got = distckpt.save(state, store, row=row, **make_metadata(job.rank, row, job.world))
        if got != row:
            say(job, f"UNEXPECTED row: save returned {got}, asked for {row}")
            sys.exit(1)
        say(job, f"WROTE row={row}")
        last = row
    return last


def step_restore_check(job: Job, store: str, expect_row: int | None) -> None:
    # The row to regenerate is the elected one; the template is the same shape for any row.
    template = make_state(job.rank, 0)
    target = zero_like(template)
    refs = tensor_refs(target)
    row = distckpt.load(target, store)
    problems: list[str] = []
    if expect_row is not None and row != expect_row:
        problems.append(f"elected row {row}, expected {expect_row}")
    expected = make_state(job.rank, row)
    problems += compare(expected, target)
    for path, ref in tensor_refs(target).items():
        if refs.get(path) is not ref:
            problems.append(f"{path}: live tensor replaced instead of filled in place")
    meta = distckpt.metadata(store, row=row, rank=job.rank)
    problems += [f"metadata {m}" for m in compare(make_metadata(job.rank, row, job.world), meta)]
    if problems:
        say(job, f"RESTORE-CHECK MISMATCH row={row}: " + "; ".join(problems[:10]))
        sys.exit(1)
    say(job, f"RESTORE-CHECK OK row={row} world={job.world} digest={digest(expected)}")


def step_expect_error(job: Job, store: str, row: int | None) -> None:
    target = zero_like(make_state(job.rank, 0))
    attempts: list[tuple[str, int | None]] = [("elected", None)]
    if row is not None:
        attempts.append((f"row={row}", row))
    for label, which in attempts:
        try:
            got = distckpt.load(target, store, row=which)
        except (distckpt.NoCommittedRowError, distckpt.WorldSizeMismatchError) as exc:
            one_line = str(exc).replace("\n", " ")
            say(job, f"EXPECTED-ERROR load[{label}] {type(exc).__name__}: {one_line} |")
        else:
            say(job, f"UNEXPECTED success: load[{label}] restored row {got}")
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("store")
    p.add_argument("rows", type=int, help="rows to write in a write step")
    p.add_argument("mode", help="comma-separated steps: write, restore-check, expect-error")
    p.add_argument("--first-row", type=int, default=0)
    p.add_argument("--expect-row", type=int, default=None)
    p.add_argument("--world", type=int, default=None, help="fail unless the job has this size")
    args = p.parse_args(argv)

    job = Job()
    comm = distckpt.dist.comm.resolve()
    say(job, f"START backend={job.backend} comm={type(comm).__name__} world={job.world}")
    if args.world is not None and job.world != args.world:
        say(job, f"UNEXPECTED world size {job.world}, expected {args.world}")
        return 1
    expect_row = args.expect_row
    for step in args.mode.split(","):
        if step == "write":
            last = step_write(job, args.store, args.rows, args.first_row)
            expect_row = last if last is not None else expect_row
        elif step == "write-async":
            last = step_write_async(job, args.store, args.rows, args.first_row)
            expect_row = last if last is not None else expect_row
        elif step == "restore-check":
            step_restore_check(job, args.store, expect_row)
        elif step == "expect-error":
            step_expect_error(job, args.store, expect_row)
        else:
            p.error(f"unknown step {step!r}")
    say(job, "DONE")
    job.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
