"""Ensemble members move between ranks: the reference workflow (``scripts/ensemble.py``),
SIGKILLed part-way at one world size and relaunched at another, ends bit for bit equal to an
uninterrupted 4-rank run.

Eight members, one per batch (``--batch-size 1``): on 4 ranks each rank runs two batches, and
the kill comes inside the second one (level 2), so the row holds finished members, members in
progress (noise, RNG and rollout boundary per member) and members not started.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from multiproc import (
    ENSEMBLE_SCRIPT,
    WORKERS,
    LaunchResult,
    ensemble_args,
    launch,
    needs_mpiexec,
    run_torchrun,
)

import distckpt

SCRIPT = ENSEMBLE_SCRIPT
MEMBERS, STEPS, GRID, BATCH = 8, 4, (8, 16), 1
ROWS_PER_BATCH = STEPS + 1
LAUNCH_TIMEOUT = 120.0
FAULT_ROW = ROWS_PER_BATCH + 2  # on 4 ranks: second batch, step 2, committed then killed

multiproc = pytest.mark.multiproc


def run(
    launcher: str, nproc: int, root: Path, fault: str | None = None, level: int = 2
) -> LaunchResult:
    args = ensemble_args(
        root, members=MEMBERS, steps=STEPS, grid=GRID, batch_size=BATCH, level=level
    )
    env = {"DISTCKPT_FAULT": fault} if fault else None
    return launch(launcher, nproc, SCRIPT, args, env=env, timeout=LAUNCH_TIMEOUT)


def output(root: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(root / "out" / "x"), mode="r")[...])


def done_line(result: LaunchResult) -> str:
    lines = result.lines("DONE ")
    assert len(lines) == 1, result.describe()
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The uninterrupted 4-rank run."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run("torchrun", 4, root).check()
    assert "resumed_from=None" in done_line(result)
    array = output(root)
    assert not np.isnan(array).any()
    assert not np.array_equal(array[0], array[1])  # members differ: not a vacuous match
    return array


def killed(launcher: str, nproc: int, root: Path, row: int, level: int = 2) -> None:
    """Run until ``row`` is committed, then SIGKILL rank 1; check what the row holds."""
    result = run(launcher, nproc, root, fault=f"after_commit@1:{row}", level=level)
    assert result.returncode != 0 and not result.lines("DONE "), result.describe()
    assert distckpt.latest(root / "ckpt") == row, result.describe()
    meta = distckpt.metadata(root / "ckpt", row=row)
    assert meta["completed_ensembles"] and meta["in_progress"], meta  # part-way: both kinds


@pytest.fixture(scope="module")
def killed_on_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("killed4")
    killed("torchrun", 4, root, FAULT_ROW)
    return root


def assert_resumed_bit_exactly(result: LaunchResult, root: Path, ref: np.ndarray, row: int, n: int):
    result.check()
    assert done_line(result).startswith(f"DONE world={n} resumed_from={row} rerun_batch=None")
    assert "re-running batch" not in result.stderr  # level 2: resumed inside the rollout
    array = output(root)
    assert not np.isnan(array).any(), "output steps left unwritten"
    assert np.array_equal(array.view(np.uint32), ref.view(np.uint32)), (
        f"{int((array.view(np.uint32) != ref.view(np.uint32)).sum())} values differ"
    )
    meta = distckpt.metadata(root / "ckpt")
    assert sorted(meta["completed_ensembles"]) == list(range(MEMBERS))


RELAUNCH = [
    pytest.param("torchrun", 2, id="4to2-torchrun", marks=pytest.mark.long),
    pytest.param("torchrun", 8, id="4to8-torchrun", marks=pytest.mark.long),
    pytest.param("mpiexec", 2, id="4to2-mpiexec", marks=[needs_mpiexec, pytest.mark.long]),
]


@multiproc
@pytest.mark.timeout(int(4 * LAUNCH_TIMEOUT))
@pytest.mark.parametrize(("launcher", "nproc"), RELAUNCH)
def test_killed_on_4_ranks_finishes_on_another_number(
    reference, killed_on_4, tmp_path, launcher, nproc
):
    root = tmp_path / "run"
    shutil.copytree(killed_on_4, root)
    result = run(launcher, nproc, root)
    assert_resumed_bit_exactly(result, root, reference, FAULT_ROW, nproc)


@multiproc
@pytest.mark.timeout(int(4 * LAUNCH_TIMEOUT))
def test_killed_on_2_ranks_finishes_on_4(reference, tmp_path):
    # On 2 ranks each rank runs four batches: killed inside the third.
    row = 2 * ROWS_PER_BATCH + 2
    killed("torchrun", 2, tmp_path, row)
    result = run("torchrun", 4, tmp_path)
    assert_resumed_bit_exactly(result, tmp_path, reference, row, 4)


@multiproc
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
def test_rank_private_state_refuses_to_move_and_weights_are_read_once(tmp_path):
    """Written on 2 ranks, restored on 3: members' noise moves, the replicated weights are
    read by rank 0 alone and broadcast, and the rank-private counter raises on every rank,
    naming the state and both world sizes."""
    worker = WORKERS / "members_worker.py"
    store = str(tmp_path / "ckpt")
    wrote = run_torchrun(2, worker, [store, "write"], timeout=LAUNCH_TIMEOUT).check()
    assert wrote.ranks("WROTE") == [0, 1], wrote.describe()
    result = run_torchrun(3, worker, [store, "restore"], timeout=LAUNCH_TIMEOUT).check()
    restored = result.lines("RESTORED")
    assert result.ranks("RESTORED") == [0, 1, 2], result.describe()
    read = {int(re.search(r"rank=(\d+)", x)[1]): int(x.split("weight_bytes=")[1]) for x in restored}
    once = 300_000 * 4  # the weights' byte range of one saved rank's data array
    assert read == {0: once, 1: 0, 2: 0}, result.describe()
    errors = result.lines("EXPECTED-ERROR")
    assert result.ranks("EXPECTED-ERROR") == [0, 1, 2], result.describe()
    assert all("'counter'" in e and "saved by 2 ranks and this job has 3" in e for e in errors)


@multiproc
@pytest.mark.timeout(int(4 * LAUNCH_TIMEOUT))
@pytest.mark.long
def test_killed_again_after_moving_finishes_on_an_uneven_number(reference, killed_on_4, tmp_path):
    """4 ranks killed, 2 ranks resume and are killed in turn (their first row committed),
    3 ranks finish: members move twice, the second time from a row written after a move."""
    root = tmp_path / "run"
    shutil.copytree(killed_on_4, root)
    killed("torchrun", 2, root, FAULT_ROW + 1)
    result = run("torchrun", 3, root)
    assert_resumed_bit_exactly(result, root, reference, FAULT_ROW + 1, 3)


@multiproc
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
@pytest.mark.long
@pytest.mark.parametrize("level", [0, 1])
def test_below_level_2_members_in_progress_rerun_on_their_new_rank(reference, tmp_path, level):
    """A level-0/1 row holds no rollout state: on 2 ranks the members that were in progress
    on 4 re-run from lead time zero (with the re-run warning), to the same bytes."""
    killed("torchrun", 4, tmp_path, FAULT_ROW, level=level)
    result = run("torchrun", 2, tmp_path, level=level).check()
    assert done_line(result).startswith(f"DONE world=2 resumed_from={FAULT_ROW} rerun_batch=1")
    assert "re-running batch 1 from lead time zero" in result.stderr
    array = output(tmp_path)
    assert np.array_equal(array.view(np.uint32), reference.view(np.uint32))
