"""Kill-anywhere with asynchronous saves and sharded state.

A job whose state holds a DTensor (``Shard(0)``, uneven) and a rank-private array commits a
row after every step through ``AsyncSaver`` or a ``Checkpoint(async_write=True)`` session
(``tests/workers/async_kill_worker.py``). One launch is SIGKILLed on one rank at an aimed
fault point of one row (in the background writer thread); the next launch resumes from
whatever the store elects and runs to the end. Every rank's final state must equal, bit for
bit, that of an uninterrupted run (predicted in this process by the worker's own update
rule). The default run has one kill per launcher; the long run (``DISTCKPT_LONG_TESTS=1``)
kills 4-rank jobs at every point under both launchers and both writers.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from multiproc import WORKERS, launch, mpi_unavailable

WORKER = WORKERS / "async_kill_worker.py"
DONE = re.compile(r"^DONE resumed=(\d+) digest=(\w+) rank=(\d+)\s*$", re.M)
SIGKILLED = re.compile(r"SIGKILL|signal:? 9\b|exitcode\s*: -9|killed", re.I)
POINTS = ("before_data", "after_data", "after_manifest", "after_commit")
TIMEOUT = 240.0

multiproc = pytest.mark.multiproc


def worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("async_kill_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its module by name
    spec.loader.exec_module(module)
    return module


def needs(launcher: str) -> None:
    if launcher == "mpiexec" and mpi_unavailable() is not None:
        pytest.skip(str(mpi_unavailable()))


def killed_then_finished(tmp_path: Path, launcher: str, nproc: int, how: str, fault: str) -> None:
    needs(launcher)
    store = tmp_path / "store"
    args = [str(store), how]
    killed = launch(launcher, nproc, WORKER, args, env={"DISTCKPT_FAULT": fault}, timeout=TIMEOUT)
    described = killed.describe()
    assert killed.returncode != 0, f"the fault {fault} did not fire\n{described}"
    assert not DONE.search(killed.stdout), described
    final = launch(launcher, nproc, WORKER, args, timeout=TIMEOUT)
    described = final.describe()
    assert final.returncode == 0, described
    done = {int(m[3]): (int(m[1]), m[2]) for m in DONE.finditer(final.stdout)}
    assert sorted(done) == list(range(nproc)), described
    worker = worker_module()
    resumed = {r for r, _ in done.values()}
    assert len(resumed) == 1, f"ranks resumed from different steps: {done}"
    # Row k holds step k + 1. The aimed row is never restored half-written: the job resumes
    # from the row before it (step ``row``), or from the row itself once every rank's
    # manifest was published (after_commit; after_manifest when the others had published).
    row = int(fault.rpartition(":")[2])
    assert row <= resumed.pop() <= row + 1, described
    for rank, (_, got) in done.items():
        assert got == worker.expected_digest(nproc, rank), f"rank {rank}: {described}"


@multiproc
def test_async_saver_with_a_dtensor_killed_mid_row_torchrun(tmp_path):
    killed_then_finished(tmp_path, "torchrun", 2, "saver", "after_data@1:3")


@multiproc
@pytest.mark.long  # the torchrun AsyncSaver case runs by default
def test_async_session_with_a_dtensor_killed_mid_row_mpiexec(tmp_path):
    killed_then_finished(tmp_path, "mpiexec", 2, "session", "after_manifest@0:2")


@multiproc
@pytest.mark.long
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("how", ["saver", "session"])
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_four_ranks_killed_at_every_point(tmp_path, launcher, how, point):
    killed_then_finished(
        tmp_path, launcher, 4, how, f"{point}@{3 if point != 'after_data' else 2}:3"
    )
