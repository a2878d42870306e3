"""A job resumed on fewer processes than saved it: ``play_ranks`` runs the saved ranks' shares.

Rank-private state (each rank's own generator, not keyed by member) resumes only on the rank
that saved it. ``tests/workers/played_worker.py`` is such a job: every rank runs a random walk
seeded by its rank, bound into one global ``Checkpoint``. A 2-rank torchrun job is SIGKILLed;
one process then plays both saved ranks and finishes both walks, which equal an uninterrupted
2-rank run bit for bit. The rows the one process writes are 2-rank rows: a failure inside it
is resumed again (here by one process; in the ``long`` case by a real 2-rank relaunch after a
SIGKILL of the one process).

The communicator of played ranks is checked in this process: collectives in rank order, over
threads of one process and over several processes (nested), and a played rank that fails or
stops calling collectives ends the others with an error instead of a hang.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from multiproc import WORKERS, run_torchrun

from distckpt import (
    Checkpoint,
    CommunicatorError,
    WorldSizeMismatchError,
    play_ranks,
    saved_world_size,
)
from distckpt.dist.comm import SingleProcessComm
from distckpt.session.played import played_comm

WORKER = WORKERS / "played_worker.py"

_spec = importlib.util.spec_from_file_location("played_worker", WORKER)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
sys.modules["played_worker"] = worker  # dataclasses look their module up
_spec.loader.exec_module(worker)


# -- the communicator of played ranks ---------------------------------------------------------
def collectives(rank: int, world: int) -> dict[str, Any]:
    comm = played_comm()
    assert comm is not None and comm.rank == rank and comm.world_size == world
    assert threading.current_thread() is not threading.main_thread() or world == 1
    comm.barrier()
    twin = comm.duplicate()
    return {
        "gathered": comm.allgather({"rank": rank}),
        "last": comm.broadcast(f"from {rank}", root=world - 1),
        "bytes": comm.allgather_bytes(bytes([rank]) * rank),
        "twin": twin.allgather(rank),
        "big": comm.broadcast_bytes(bytes(range(256)) * 100 if rank == 0 else None),
        "comm": (comm.rank, comm.world_size),
    }


def expected(world: int) -> list[dict[str, Any]]:
    return [
        {
            "gathered": [{"rank": q} for q in range(world)],
            "last": f"from {world - 1}",
            "bytes": [bytes([q]) * q for q in range(world)],
            "twin": list(range(world)),
            "big": bytes(range(256)) * 100,
            "comm": (rank, world),
        }
        for rank in range(world)
    ]


def test_one_process_plays_every_rank_in_rank_order():
    assert play_ranks(collectives, 3) == expected(3)
    assert played_comm() is None  # only inside the played ranks


def test_as_many_processes_as_ranks_run_the_share_on_this_thread():
    assert play_ranks(collectives, 1) == expected(1)


def test_several_processes_each_play_consecutive_ranks():
    # Two "processes" (played ranks themselves) each play 2 of 4 ranks: the collectives
    # cross both levels, in rank order.
    def process(q: int, processes: int) -> list[dict[str, Any]]:
        return play_ranks(collectives, 4, comm=played_comm())

    first, second = play_ranks(process, 2)
    assert first + second == expected(4)


def test_a_world_size_that_is_not_a_multiple_of_the_processes_is_refused():
    def process(q: int, processes: int) -> None:
        play_ranks(collectives, 3, comm=played_comm())

    with pytest.raises(WorldSizeMismatchError, match=r"2 processes .* 3-rank job"):
        play_ranks(process, 2)


def test_a_failing_rank_ends_the_others_and_its_error_is_raised():
    def share(rank: int, world: int) -> None:
        comm = played_comm()
        assert comm is not None
        comm.barrier()
        if rank == 1:
            raise ValueError("rank 1 broke")
        comm.barrier()  # ranks 0 and 2 would wait for rank 1 forever

    with pytest.raises(ValueError, match="rank 1 broke"):
        play_ranks(share, 3)


def test_a_rank_that_stops_calling_collectives_is_named():
    seen: list[BaseException] = []

    def share(rank: int, world: int) -> None:
        comm = played_comm()
        assert comm is not None
        if rank == 1:
            try:
                comm.allgather(rank)  # rank 0 has returned: unequal collective calls
            except CommunicatorError as exc:
                seen.append(exc)
                raise

    with pytest.raises(CommunicatorError, match="played rank 0 of 2 returned"):
        play_ranks(share, 2)
    assert len(seen) == 1


def test_checkpoint_inside_a_played_rank_is_that_rank_of_the_saved_job(tmp_path):
    def share(rank: int, world: int) -> tuple[int, int]:
        checkpoint = Checkpoint("played", path=tmp_path / "s")
        return checkpoint.rank, checkpoint.world_size

    assert play_ranks(share, 2) == [(0, 2), (1, 2)]
    assert Checkpoint("plain", path=tmp_path / "s").comm.world_size == 1  # outside: the job's
    assert isinstance(Checkpoint("plain", path=tmp_path / "s").comm, SingleProcessComm)
    assert saved_world_size(tmp_path / "empty") is None


# -- a killed 2-rank job resumed by one process ----------------------------------------------
def job(tmp: Path, name: str, world: int = 2, **kill: Any) -> dict[str, Any]:
    return {"store": str(tmp / f"{name}.ckpt"), "out": str(tmp / name), "world": world, **kill}


def walks(path: Path, world: int) -> dict[tuple[int, int], np.ndarray]:
    return {
        (rank, step): np.load(path / f"rank_{rank}" / f"step_{step}.npy")
        for rank in range(world)
        for step in range(worker.NSTEPS)
    }


def assert_bit_exact(tmp: Path, world: int = 2) -> None:
    ref, out = walks(tmp / "reference", world), walks(tmp / "run", world)
    assert not np.array_equal(ref[0, 0], ref[1, 0])  # the ranks' states differ
    for key in ref:
        assert np.array_equal(out[key], ref[key]), f"rank {key[0]} step {key[1]} differs"


def killed_two_rank_job(tmp: Path, world: int = 2) -> dict[str, Any]:
    """Runs the reference and a job whose rank 0 is SIGKILLed after its 2nd output (one row
    committed) in one ``world``-rank launch; returns the killed job."""
    killed = job(tmp, "run", world, kill_rank=0, kill_after=2)
    jobs = [job(tmp, "reference", world), killed]
    first = run_torchrun(world, WORKER, [json.dumps(jobs)], timeout=120)
    assert first.returncode != 0, first.describe()
    assert first.ranks("DONE 0") == list(range(world)), first.describe()
    assert not first.lines("DONE 1"), first.describe()
    assert f"exitcode  : -{int(signal.SIGKILL)}" in first.stderr, first.describe()
    assert saved_world_size(killed["store"]) == world
    return {**killed, "kill_rank": None}


@pytest.mark.timeout(300)
def test_two_rank_job_killed_is_finished_by_one_process_bit_for_bit(tmp_path):
    killed = killed_two_rank_job(tmp_path)
    # One process plays both saved ranks; saved rank 1 fails after its 3rd output: the
    # error is the job's own, and both ranks committed step 1's row before it.
    with pytest.raises(RuntimeError, match="rank 1 fails after step 2"):
        worker.run({**killed, "fail_rank": 1, "fail_after": 3})
    assert saved_world_size(killed["store"]) == 2  # the one process wrote 2-rank rows
    # Resumed again by one process: each rank from its own state, at the step it reached.
    assert worker.run(killed) == [2, 2]
    assert_bit_exact(tmp_path)


@pytest.mark.long
@pytest.mark.timeout(400)
def test_one_process_killed_in_turn_is_resumed_by_two_ranks(tmp_path):
    killed = killed_two_rank_job(tmp_path)
    alone = run_torchrun(
        1, WORKER, [json.dumps([{**killed, "kill_rank": 1, "kill_after": 3}])], timeout=120
    )
    assert alone.returncode != 0, alone.describe()
    assert sorted(alone.lines("START 0")) == ["START 0 rank=0 step=1", "START 0 rank=1 step=1"]
    assert f"exitcode  : -{int(signal.SIGKILL)}" in alone.stderr, alone.describe()
    resumed = run_torchrun(2, WORKER, [json.dumps([killed])], timeout=120).check()
    assert sorted(resumed.lines("START 0")) == ["START 0 rank=0 step=2", "START 0 rank=1 step=2"]
    assert resumed.ranks("DONE 0") == [0, 1], resumed.describe()
    assert_bit_exact(tmp_path)


@pytest.mark.long
@pytest.mark.timeout(400)
def test_four_rank_job_killed_is_finished_by_two_processes(tmp_path):
    killed = killed_two_rank_job(tmp_path, world=4)
    resumed = run_torchrun(2, WORKER, [json.dumps([killed])], timeout=120).check()
    # process 0 plays ranks 0 and 1, process 1 ranks 2 and 3: each from its own state
    assert sorted(resumed.lines("START 0")) == [f"START 0 rank={r} step=1" for r in range(4)]
    assert resumed.ranks("DONE 0") == [0, 1, 2, 3], resumed.describe()
    assert saved_world_size(killed["store"]) == 4
    assert_bit_exact(tmp_path, world=4)
