"""A save commits its row on every rank or on none, and says which.

A save that raises leaves the previously elected row the elected one (what was published is
retracted, also when the failure came after the manifest was created); row ids are allocated
under the writer lease, so two writers are never given the same row; a transient failure
while the lease is published does not lock the same process out of its own lease.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sys
from typing import Any

import pytest
import torch
from multiproc import WORKERS, run_command
from test_step import run_job

import distckpt
from distckpt.dist.comm import Communicator
from distckpt.errors import CheckpointError, CheckpointWriteError
from distckpt.format.layout import MANIFESTS_DIR
from distckpt.storage import lease
from distckpt.storage.filesystem import LocalFileSystem
from distckpt.storage.lease import LEASE_FILE
from distckpt.storage.store import Store


class FsyncFailsAfterRename(LocalFileSystem):
    """EIO on the directory fsync right after a rename or hard link onto a file named like
    ``target`` (``atomic_write``: temp file, fsync, rename, then the directory's fsync;
    ``publish_exclusive``: the same with a link), ``times`` times."""

    def __init__(self, target: str, times: int = 1_000_000) -> None:
        self.target = target
        self.times = times
        self.renamed: str | None = None
        self.failed = 0

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.renamed = dst

    def link(self, src: str, dst: str) -> None:
        super().link(src, dst)
        self.renamed = dst

    def fsync_dir(self, path: str) -> None:
        hit = self.renamed is not None and re.search(self.target, self.renamed)
        self.renamed = None
        if hit and self.failed < self.times:
            self.failed += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        super().fsync_dir(path)


class FailsAfterCreate(LocalFileSystem):
    """EIO from ``create_exclusive`` of a file named like ``target`` after the file was
    created and written (its fsync failed and the name could not be taken back), ``times``
    times: the manifest is visible although its publish raised."""

    def __init__(self, target: str, times: int = 1_000_000) -> None:
        self.target = target
        self.times = times
        self.failed = 0

    def create_exclusive(self, path: str, data: bytes) -> None:
        super().create_exclusive(path, data)
        if re.search(self.target, path) and self.failed < self.times:
            self.failed += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)


def state(value: float) -> dict[str, Any]:
    return {"w": torch.full((8,), value), "step": int(value)}


MANIFEST = rf"/{MANIFESTS_DIR}/rank_\d+\.json$"


def test_eio_after_the_manifest_is_created_leaves_the_previous_row_elected(tmp_path):
    for value in (0.0, 1.0):
        distckpt.save(state(value), tmp_path)
    fs = FailsAfterCreate(MANIFEST)
    with pytest.raises(CheckpointWriteError, match=r"row 2 .*was not committed"):
        distckpt.save(state(2.0), Store(tmp_path, fs=fs))
    assert fs.failed == 1
    assert distckpt.latest(tmp_path) == 1  # not the row save said was not committed
    live = state(-1.0)
    assert distckpt.load(live, tmp_path) == 1 and torch.equal(live["w"], state(1.0)["w"])
    # The next save works and is elected.
    assert distckpt.save(state(3.0), tmp_path) == 3 and distckpt.latest(tmp_path) == 3


def test_a_commit_failing_on_one_rank_is_retracted_on_every_rank(tmp_path):
    """Rank 1's manifest is created, then its publish fails: both ranks raise, and neither
    rank's manifest of the row stays (the row is not elected)."""

    def body(c: Communicator) -> Any:
        distckpt.save(state(c.rank), tmp_path, comm=c)
        fs = FailsAfterCreate(MANIFEST) if c.rank == 1 else LocalFileSystem()
        try:
            distckpt.save(state(10.0 + c.rank), Store(tmp_path, fs=fs), comm=c)
        except CheckpointError as exc:
            return exc
        return None

    errors = run_job(2, body)
    assert all(isinstance(e, CheckpointWriteError) for e in errors), errors
    lease.release(tmp_path)
    st = Store(tmp_path)
    assert st.manifest_ranks(1) == []
    assert distckpt.latest(tmp_path) == 0


def test_eio_on_the_fsync_after_the_lease_is_published_does_not_lock_the_process_out(tmp_path):
    distckpt.save(state(0.0), tmp_path)
    lease.release(tmp_path)
    fs = FsyncFailsAfterRename(rf"/{LEASE_FILE}$", times=1)
    st = Store(tmp_path, fs=fs)
    with pytest.raises(CheckpointError):
        distckpt.save(state(1.0), st)
    assert fs.failed == 1
    assert distckpt.latest(tmp_path) == 0
    # The same process saves again at once (it used to be refused for 300 s: "leased by
    # this process").
    assert distckpt.save(state(2.0), st) == 1  # the failed save opened no row
    assert distckpt.latest(tmp_path) == 1
    # Another process's lease is still refused: the take-back is only of this process's own.
    with pytest.raises(distckpt.LeaseHeldError):
        lease.Lease.acquire(tmp_path, same_job_takeover=False, job_id="other")
    lease.release(tmp_path)


def test_lease_critical_section_refuses_a_lease_taken_over(tmp_path):
    distckpt.save(state(0.0), tmp_path)
    lease.release(tmp_path)
    first = lease.Lease.acquire(tmp_path, job_id="77")
    assert first.critical(lambda: 5) == 5
    # Another job step of the same job takes the lease over (its own token and pid).
    other = dataclasses.replace(first.info, token="f" * 32, pid=first.info.pid + 1)
    Store(tmp_path).fs.atomic_write(str(tmp_path / LEASE_FILE), other.to_json())
    ran: list[int] = []
    with pytest.raises(distckpt.LeaseLostError):
        first.critical(lambda: ran.append(6))
    assert ran == []  # nothing ran under a lease that is not this one


@pytest.mark.multiproc
def test_two_writers_with_the_same_slurm_job_id_never_get_the_same_row(tmp_path):
    """Two job steps of one allocation save 12 rows each at once: the second takes the
    lease over (same-job takeover), the first's later saves are refused; every row a save
    returned is distinct and holds that save's values."""
    store = tmp_path / "store"
    distckpt.save(state(0.0), store)  # the store exists before either writer starts
    lease.release(store)
    worker = WORKERS / "twin_writer_worker.py"
    py = sys.executable
    script = f"{py} {worker} {store} A 12 & {py} {worker} {store} B 12 & wait"
    result = run_command(["bash", "-c", script], env={"SLURM_JOB_ID": "77"}, timeout=120)
    assert result.returncode == 0 and "UNEXPECTED" not in result.stdout, result.describe()
    saved = [
        (m[1], int(m[2]), int(m[3]))
        for m in re.finditer(r"SAVED writer=(\w) n=(\d+) row=(\d+)", result.stdout)
    ]
    refused = re.findall(r"REFUSED writer=(\w)", result.stdout)
    assert len(saved) + len(refused) == 24, result.describe()
    rows = [row for _, _, row in saved]
    assert len(rows) == len(set(rows)), f"a row was given to two saves: {saved}"
    assert {w for w, _, _ in saved} >= {"B"} or {w for w, _, _ in saved} >= {"A"}
    for writer, n, row in saved:
        live = {"w": torch.zeros(64), "writer": "", "n": -1}
        assert distckpt.load(live, store, row=row) == row
        value = float(ord(writer) * 1000 + n)
        assert (live["writer"], live["n"]) == (writer, n)
        assert torch.equal(live["w"], torch.full((64,), value))
    assert distckpt.latest(store) == max(rows)
