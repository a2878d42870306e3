"""Real multi-process jobs: torchrun (gloo) and mpiexec (mpi4py) writing, crashing, restoring.

Every rank runs ``tests/workers/ckpt_worker.py``; its state differs per rank and per row and
is regenerated to check a restore bit for bit. Crashes use distckpt's fault points
(``DISTCKPT_FAULT``), which SIGKILL one real rank at a named point of the commit protocol.
Each launch has its own timeout (every process of the job is killed and the test fails with
the job's output) below the per-test pytest-timeout.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import WORKERS, LaunchResult, launch, needs_mpiexec

import distckpt
from distckpt import Store

WORKER = WORKERS / "ckpt_worker.py"
ROWS = 3  # rows each write job commits: 0, 1, 2
LAUNCH_TIMEOUT = 90.0
TEST_TIMEOUT = 240  # > two launch timeouts: a hang is reported by the launcher, with output

multiproc = pytest.mark.multiproc
BACKEND_LINE = {
    "torchrun": "START backend=torch comm=TorchDistComm",
    "mpiexec": "START backend=mpi comm=MPIComm",
}


def run_worker(
    launcher: str,
    nproc: int,
    store: Path,
    rows: int,
    mode: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """``ckpt_worker.py STORE ROWS MODE --world NPROC ...`` on ``nproc`` ranks."""
    args = [str(store), str(rows), mode, "--world", str(nproc), *extra]
    return launch(launcher, nproc, WORKER, args, env=env, timeout=LAUNCH_TIMEOUT)


def assert_every_rank(result: LaunchResult, prefix: str, nproc: int) -> list[str]:
    """Exactly one line starting with ``prefix`` from each rank; returns them."""
    assert result.ranks(prefix) == list(range(nproc)), (
        f"expected one {prefix!r} line per rank\n{result.describe()}"
    )
    return result.lines(prefix)


def assert_restored(result: LaunchResult, nproc: int, row: int) -> None:
    lines = assert_every_rank(result, f"RESTORE-CHECK OK row={row} ", nproc)
    digests = {re.search(r"digest=(\w+)", line).group(1) for line in lines}  # type: ignore[union-attr]
    assert len(digests) == nproc, f"ranks restored identical values: {lines}"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    """Stores written by a ROWS-row job, one per (launcher, nproc), shared within the module
    (the world-size test reads the same store as the round-trip test: saves a launch)."""
    cache: dict[tuple[str, int], tuple[Path, LaunchResult]] = {}

    def get(launcher: str, nproc: int) -> tuple[Path, LaunchResult]:
        if (launcher, nproc) not in cache:
            store = tmp_path_factory.mktemp(f"{launcher}{nproc}") / "store"
            result = run_worker(launcher, nproc, store, ROWS, "write").check()
            assert_every_rank(result, BACKEND_LINE[launcher], nproc)
            for row in range(ROWS):
                assert_every_rank(result, f"WROTE row={row} ", nproc)
            cache[launcher, nproc] = (store, result)
        return cache[launcher, nproc]

    return get


JOBS = [
    pytest.param("torchrun", 2, id="torchrun-2"),
    pytest.param("torchrun", 4, id="torchrun-4", marks=pytest.mark.long),
    pytest.param("mpiexec", 2, id="mpiexec-2", marks=needs_mpiexec),
    pytest.param("mpiexec", 4, id="mpiexec-4", marks=[needs_mpiexec, pytest.mark.long]),
]


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize(("launcher", "nproc"), JOBS)
def test_relaunch_restores_elected_row_per_rank(written, launcher: str, nproc: int) -> None:
    store, _ = written(launcher, nproc)
    assert distckpt.latest(store) == ROWS - 1
    st = Store(store)
    for row in range(ROWS):
        assert st.manifest_ranks(row) == list(range(nproc))

    result = run_worker(
        launcher, nproc, store, 0, "restore-check", "--expect-row", str(ROWS - 1)
    ).check()
    assert_every_rank(result, BACKEND_LINE[launcher], nproc)
    assert_restored(result, nproc, ROWS - 1)


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
def test_destroy_process_group_releases_it_after_save(written) -> None:
    """After save() and destroy_process_group() nothing of distckpt's keeps the group alive.

    Reads the output of the 2-rank torchrun write job (no launch of its own).
    """
    _, wrote = written("torchrun", 2)
    assert_every_rank(wrote, "PROCESS-GROUP ", 2)
    assert wrote.ranks("PROCESS-GROUP RELEASED") == [0, 1], wrote.lines("PROCESS-GROUP")


# Each launcher and each kill point runs by default; the other two pairs in the long run.
CRASHES = [
    pytest.param("torchrun", "after_data", id="torchrun-after_data"),
    pytest.param("torchrun", "after_commit", id="torchrun-after_commit", marks=pytest.mark.long),
    pytest.param(
        "mpiexec", "after_data", id="mpiexec-after_data", marks=[needs_mpiexec, pytest.mark.long]
    ),
    pytest.param("mpiexec", "after_commit", id="mpiexec-after_commit", marks=needs_mpiexec),
]


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize(("launcher", "point"), CRASHES)
def test_sigkill_during_commit(tmp_path: Path, launcher: str, point: str) -> None:
    """Rank 1 is SIGKILLed at ``point`` of the last row; a relaunch restores and continues.

    after_data: rank 1's data is durable but its manifest is not -> the row is not committed,
    the previous row is elected. after_commit (every rank published its manifest and the
    ranks agreed, but the job dies before save() returns) -> the row is committed and
    elected even though the job never finished saving it.
    """
    nproc, crash_row = 2, ROWS - 1
    store = tmp_path / "store"
    env = {"DISTCKPT_FAULT": f"{point}@1:{crash_row}"}
    crashed = run_worker(launcher, nproc, store, ROWS, "write", env=env)

    assert crashed.returncode != 0, f"the job survived the fault\n{crashed.describe()}"
    assert re.search(r"SIGKILL|signal:? 9\b|exitcode\s*: -9", crashed.output, re.I), (
        f"no rank was SIGKILLed\n{crashed.describe()}"
    )
    for row in range(crash_row):
        assert_every_rank(crashed, f"WROTE row={row} ", nproc)
    assert 1 not in crashed.ranks(f"WROTE row={crash_row} ")

    st = Store(store)
    assert os.path.isdir(st.data_dir(crash_row)), "the fault fired before the row was made"
    if point == "after_data":
        assert 1 not in st.manifest_ranks(crash_row)
        elected = crash_row - 1
    else:
        assert st.manifest_ranks(crash_row) == list(range(nproc))
        elected = crash_row
    assert distckpt.latest(store) == elected  # offline, as a restart script asks

    resume_past_crash(launcher, nproc, store, "write", elected, crash_row)
    assert distckpt.latest(store) == crash_row + 1


def resume_past_crash(
    launcher: str, nproc: int, store: Path, write: str, elected: int, crash_row: int
) -> None:
    """Relaunch: restore the elected row, keep going past the crashed row, restore again."""
    resumed = run_worker(
        launcher,
        nproc,
        store,
        1,
        f"restore-check,{write},restore-check",
        "--expect-row",
        str(elected),
        "--first-row",
        str(crash_row + 1),
    ).check()
    assert_restored(resumed, nproc, elected)
    assert_every_rank(resumed, f"WROTE row={crash_row + 1} ", nproc)
    assert_restored(resumed, nproc, crash_row + 1)


WORLD_CHANGES = [
    pytest.param("torchrun", 2, 4, id="torchrun-2-to-4"),
    pytest.param("mpiexec", 4, 2, id="mpiexec-4-to-2", marks=needs_mpiexec),
]


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize(("launcher", "wrote", "restoring"), WORLD_CHANGES)
def test_other_world_size_is_a_clear_error(
    written, launcher: str, wrote: int, restoring: int
) -> None:
    store, _ = written(launcher, wrote)
    result = run_worker(
        launcher, restoring, store, 0, "expect-error", "--expect-row", str(ROWS - 1)
    ).check()

    # Elected: rows of another world size never count, on every rank alike (no hang).
    elected = assert_every_rank(result, "EXPECTED-ERROR load[elected] ", restoring)
    kinds = {line.split()[2] for line in elected}
    assert len(kinds) == 1, elected
    assert kinds <= {"NoCommittedRowError:", "WorldSizeMismatchError:"}, elected
    assert all(str(store) in line for line in elected), elected

    # Explicit row: the message says why.
    explicit = assert_every_rank(result, f"EXPECTED-ERROR load[row={ROWS - 1}] ", restoring)
    why = f"written by {wrote} ranks; this job has {restoring}"
    assert all(why in line for line in explicit), explicit
    if restoring < wrote:  # every rank finds its own manifest of the wrong size
        assert all("WorldSizeMismatchError:" in line for line in explicit), explicit


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"WORLD_SIZE": "2", "RANK": "0"}, id="torchrun-vars"),
        pytest.param({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, id="slurm-vars"),
    ],
)
def test_launcher_env_without_process_group_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]
) -> None:
    """One process that the environment calls one of several ranks must not save alone."""
    if dist.is_available() and dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this pytest process")
    for name in list(os.environ):
        if name.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL")) or name in (
            "RANK",
            "WORLD_SIZE",
        ):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "store"

    with pytest.raises(distckpt.CommunicatorError, match="no process group is initialised"):
        distckpt.save({"x": torch.ones(3)}, store)
    assert not store.exists(), "a refused save wrote to the store"
    with pytest.raises(distckpt.CommunicatorError):
        distckpt.load({"x": torch.zeros(3)}, store)


def _load_worker():
    spec = importlib.util.spec_from_file_location("ckpt_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_state_and_checker_are_not_vacuous() -> None:
    """The worker's state has what the suite promises, and its checker sees every bit."""
    w = _load_worker()
    base = w.make_state(0, 1)
    leaves = w.tensor_refs(base)
    sizes = {path: t.numel() * t.element_size() for path, t in leaves.items()}
    assert sizes["/model/big"] > 1 << 20 and sizes["/model/big_bf16"] > 1 << 20
    assert sum(size < 1 << 20 for size in sizes.values()) >= 5
    assert any(t.dtype == torch.bfloat16 and t.numel() < 1000 for t in leaves.values())

    assert w.compare(base, w.make_state(0, 1)) == []
    for other in (w.make_state(1, 1), w.make_state(0, 2)):  # another rank, another row
        different = {m.split(":")[0] for m in w.compare(base, other)}
        assert set(leaves) | {"/numpy"} <= different

    flipped = copy.deepcopy(base)
    special = flipped["model"]["special"]
    assert math.copysign(1.0, float(special[1])) < 0
    special[1] = 0.0  # -0.0 -> +0.0: equal as numbers, different as bits
    assert w.compare(base, flipped) == ["/model/special: 1 of 28 bytes differ"]
    flipped = copy.deepcopy(base)
    flipped["progress"]["pair"] = list(flipped["progress"]["pair"])  # tuple -> list
    assert w.compare(base, flipped)


@multiproc
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("launcher", "timeout"),
    [
        pytest.param("torchrun", 8.0, id="torchrun"),
        pytest.param("mpiexec", 4.0, id="mpiexec", marks=needs_mpiexec),
    ],
)
def test_launch_timeout_kills_every_rank(tmp_path: Path, launcher: str, timeout: float) -> None:
    """A hung job fails the test with its output, and none of its processes survives it
    (torchrun starts each worker in a session of its own: killing a group is not enough)."""
    prefix = tmp_path / "pid"
    with pytest.raises(pytest.fail.Exception, match="timed out") as failed:
        launch(launcher, 2, WORKERS / "hang_worker.py", [str(prefix)], timeout=timeout)
    assert "HANGING pid=" in str(failed.value)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid.*")]
    assert len(pids) == 2, f"the ranks had not started yet: {failed.value}"
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state in ("Z", "X"), f"rank pid {pid} survived the timeout (state {state})"


ASYNC_CRASHES = [  # after_data runs by default under mpiexec, in the long run under torchrun
    pytest.param("torchrun", "after_data", id="torchrun-after_data", marks=pytest.mark.long),
    pytest.param("torchrun", "after_commit", id="torchrun-after_commit"),
    # MPI: the writer thread collects on a Dup'ed communicator beside the caller's.
    pytest.param("mpiexec", "after_data", id="mpiexec-after_data", marks=needs_mpiexec),
]


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize(("launcher", "point"), ASYNC_CRASHES)
def test_sigkill_in_the_background_writer(tmp_path: Path, launcher: str, point: str) -> None:
    """As above, with ``AsyncSaver``: the fault fires in rank 1's writer thread mid-row.

    The job zeroes each state as soon as ``save()`` returns, so the restored rows also show
    that the writer committed the staged copy, not the live (since changed) tensors.
    """
    nproc, crash_row = 2, ROWS - 1
    store = tmp_path / "store"
    env = {"DISTCKPT_FAULT": f"{point}@1:{crash_row}"}
    crashed = run_worker(launcher, nproc, store, ROWS, "write-async", env=env)

    assert crashed.returncode != 0, f"the job survived the fault\n{crashed.describe()}"
    for row in range(crash_row):
        assert_every_rank(crashed, f"WROTE row={row} ", nproc)
    assert 1 not in crashed.ranks(f"WROTE row={crash_row} ")
    st = Store(store)
    elected = crash_row - 1 if point == "after_data" else crash_row
    assert (1 in st.manifest_ranks(crash_row)) == (point == "after_commit")
    assert distckpt.latest(store) == elected

    resume_past_crash(launcher, nproc, store, "write-async", elected, crash_row)
