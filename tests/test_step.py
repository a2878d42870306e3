"""The collective step primitive (``distckpt.dist.step``), over in-process communicators.

``ThreadJob`` runs the ranks of one job as threads over a real exchange, so every rank sees
what the others reported; ``SequentialComm`` plays ranks one after another.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fakes import SequentialComm
from multiproc import LAUNCHERS, WORKERS, launch

import distckpt
from distckpt import Communicator, SingleProcessComm, faults
from distckpt.dist import step
from distckpt.errors import (
    CheckpointError,
    CheckpointWriteError,
    CollectiveStepError,
    CorruptCheckpointError,
    CorruptChunkError,
    RankFailure,
)

HANG_GUARD_S = 30.0  # a broken barrier fails the test instead of hanging it
FAULT_KINDS = ("PermissionError", "ENOSPC", "EIO", "MemoryError", "KeyError")  # the worker's


class ThreadComm(Communicator):
    """One rank of a job whose ranks are threads sharing ``slots`` and a barrier."""

    def __init__(self, rank: int, slots: list[bytes | None], barrier: threading.Barrier):
        self._rank, self._slots, self._barrier = rank, slots, barrier

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self._slots)

    def barrier(self) -> None:
        self._barrier.wait(HANG_GUARD_S)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        self._slots[self._rank] = data
        self.barrier()
        out = [s for s in self._slots if s is not None]
        self.barrier()
        return out

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        if self._rank == root:
            self._slots[root] = data
        self.barrier()
        out = self._slots[root]
        self.barrier()
        assert out is not None
        return out


def run_job(world_size: int, body: Callable[[Communicator], Any]) -> list[Any]:
    """Run ``body`` on every rank (threads); each rank's result or raised exception."""
    slots: list[bytes | None] = [None] * world_size
    barrier = threading.Barrier(world_size)
    out: list[Any] = [None] * world_size

    def rank_main(rank: int) -> None:
        try:
            out[rank] = body(ThreadComm(rank, slots, barrier))
        except BaseException as exc:
            out[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S * 4)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
    return out


def fails_on(ranks: dict[int, BaseException], value: Any = None) -> Callable[[Communicator], Any]:
    """A step body (run by ``step.run``) that raises ``ranks[rank]`` on the listed ranks."""

    def body(comm: Communicator) -> Any:
        def work() -> Any:
            if comm.rank in ranks:
                raise ranks[comm.rank]
            return value if value is not None else comm.rank * 10

        return step.run(comm, step.SAVE_COMMIT, work, context="row 7 of /s")

    return body


def test_success_passes_each_rank_result_through() -> None:
    assert run_job(3, fails_on({})) == [0, 10, 20]


def test_gather_gives_every_rank_all_results_in_rank_order() -> None:
    got = run_job(3, lambda c: step.gather(c, step.SAVE_SHARDS, lambda: {"r": c.rank}))
    assert got == [[{"r": 0}, {"r": 1}, {"r": 2}]] * 3


def test_decide_runs_on_the_root_only_and_every_rank_gets_its_value() -> None:
    ran: list[int] = []

    def body(c: Communicator) -> Any:
        def pick() -> int:
            ran.append(c.rank)
            return 41 + c.rank

        return step.decide(c, step.SAVE_OPEN, pick, root=1)

    assert run_job(3, body) == [42, 42, 42]
    assert ran == [1]


def test_an_ordinary_error_on_one_rank_raises_on_every_rank() -> None:
    got = run_job(3, fails_on({1: KeyError("weights")}))
    assert all(isinstance(e, CollectiveStepError) for e in got), got
    for e in got:
        assert e.step == "save.commit"
        assert dict(e.failures) == {1: RankFailure("KeyError", "'weights'", False)}
        assert str(e) == "row 7 of /s: step save.commit failed; rank 1: KeyError: 'weights'"
    assert isinstance(got[1].__cause__, KeyError)  # the failing rank chains its own error
    assert got[0].__cause__ is None


def test_errors_on_several_ranks_are_all_named() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    got = run_job(3, fails_on({1: full, 2: MemoryError("staging")}))
    for e in got:
        assert isinstance(e, CollectiveStepError)
        assert sorted(e.failures) == [1, 2]
        assert e.failures[2] == RankFailure("MemoryError", "staging", False)
        assert "rank 1: OSError: [Errno 28]" in str(e)
        assert "rank 2: MemoryError: staging" in str(e)


def test_the_lowest_failing_rank_decides_the_class_when_it_is_a_distckpt_error() -> None:
    got = run_job(3, fails_on({1: CorruptCheckpointError("chunk 0 bad"), 2: KeyError("k")}))
    for e in got:
        assert type(e) is CorruptCheckpointError
        assert e.step == "save.commit"
        assert e.failures[1] == RankFailure("CorruptCheckpointError", "chunk 0 bad", True)
        assert e.failures[2].type == "KeyError"
    got = run_job(3, fails_on({1: KeyError("k"), 2: CorruptCheckpointError("chunk 0 bad")}))
    assert all(type(e) is CollectiveStepError for e in got), got


def test_fallback_class_is_kept_alongside_collective_step_error() -> None:
    def body(c: Communicator) -> Any:
        def work() -> None:
            if c.rank == 0:
                raise PermissionError("read-only store")

        return step.run(c, step.SAVE_COMMIT, work, fallback=CheckpointWriteError)

    for e in run_job(2, body):
        assert isinstance(e, CheckpointWriteError) and isinstance(e, CollectiveStepError)
        assert e.failures == {0: RankFailure("PermissionError", "read-only store", False)}


def test_a_distckpt_class_that_needs_more_than_a_message_becomes_collective() -> None:
    class NeedsTwo(CheckpointError):
        def __init__(self, message: str, extra: int) -> None:
            super().__init__(message)

    got = run_job(2, fails_on({0: NeedsTwo("x", 1)}))
    assert all(type(e) is CollectiveStepError for e in got)
    assert got[1].failures[0] == RankFailure("NeedsTwo", "x", True)


def test_interrupts_are_not_caught() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        step.run(SingleProcessComm(), step.LOAD_READ, interrupted)


def test_unknown_step_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown collective step"):
        step.run(SingleProcessComm(), "save.nonsense", lambda: None)


def test_an_injected_fault_fires_on_its_rank_only_and_every_rank_raises() -> None:
    calls: list[int] = []

    def body(c: Communicator) -> Any:
        return step.decide(c, step.ELECT_ANY_SIZE, lambda: calls.append(c.rank) or 5)

    with faults.raising_at_step(step.ELECT_ANY_SIZE, lambda: OSError(errno.EIO, "io"), rank=1):
        got = run_job(2, body)
    assert calls == [0]
    for e in got:
        assert isinstance(e, CollectiveStepError) and e.step == "elect.any_size"
        assert e.failures == {1: RankFailure("OSError", "[Errno 5] io", False)}
    assert run_job(2, body) == [5, 5]  # disarmed on leaving the block


def test_one_process_playing_ranks_in_turn_gets_the_root_decision() -> None:
    got = []
    for rank in range(2):
        value = 3 if rank == 0 else 9  # only the root's counts
        got.append(step.decide(SequentialComm(rank, 2), step.SAVE_OPEN, lambda v=value: v))
    assert got == [3, 3]


def test_save_and_load_steps_are_registered_and_exported() -> None:
    assert set(step.SAVE_STEPS) | set(step.LOAD_STEPS) <= set(step.STEPS)
    assert {step.STEPS[s] for s in step.SAVE_STEPS} == {"save"}
    assert distckpt.CollectiveStepError is CollectiveStepError
    assert distckpt.RankFailure is RankFailure


def test_one_rank_unable_to_read_fails_load_on_every_rank(tmp_path: Any) -> None:
    """The motivating case: rank 1's filesystem refuses reads during load()."""
    import torch

    from distckpt.storage.filesystem import LocalFileSystem

    class Refuses(LocalFileSystem):
        def read_into(self, path: str, out: Any, offset: int = 0) -> int:
            raise PermissionError(f"permission denied: {path}")

        def read_into_parts(self, path: str, parts: Any, offset: int = 0) -> int:
            raise PermissionError(f"permission denied: {path}")

    def body(c: Communicator) -> Any:
        distckpt.save({"x": torch.full((4,), float(c.rank))}, tmp_path, comm=c)
        fs = Refuses() if c.rank == 1 else LocalFileSystem()
        target = {"x": torch.zeros(4)}
        return distckpt.load(target, distckpt.Store(tmp_path, fs=fs), comm=c)

    got = run_job(2, body)
    for e in got:
        # The chunk codec reports an unreadable chunk as damage, naming the chunk and the
        # PermissionError, so a restart can fall back to an older row.
        assert isinstance(e, CorruptChunkError), got
        assert e.problem == CorruptChunkError.UNREADABLE and e.rank == 1
        assert list(e.failures) == [1] and "permission denied" in e.failures[1].message
        assert e.step in step.LOAD_STEPS
    assert got[0].fields() == got[1].fields()


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("launcher", "nproc"),
    [
        *[pytest.param(launcher, 2, id=f"{launcher}-2") for launcher in LAUNCHERS],
        *[
            pytest.param(launcher, 4, id=f"{launcher}-4", marks=pytest.mark.long)
            for launcher in LAUNCHERS
        ],
    ],
)
def test_real_ranks_raise_together_when_rank_1_fails_at_any_step(
    tmp_path: Any, launcher: str, nproc: int
) -> None:
    """Every step of save and load, five ordinary errors on rank 1 only: one launch per
    world; every rank raises the same error naming rank 1."""
    result = launch(launcher, nproc, WORKERS / "step_fault_worker.py", [str(tmp_path)], timeout=600)
    assert result.returncode == 0, result.output
    expected = {(s, kind) for s in (*step.SAVE_STEPS, *step.LOAD_STEPS) for kind in FAULT_KINDS}
    for rank in range(nproc):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        assert report["world_size"] == nproc
        cases = report["cases"]
        assert {(c["step"], c["error"]) for c in cases} == expected
        for c in cases:
            where = f"rank {rank}, fault {c['error']} at {c['step']}: {c}"
            assert c["collective"] and c["failed_step"] == c["step"], where
            assert c["failures"] == {"1": c["expected_type"]}, where
            assert f"step {c['step']} failed; rank 1: {c['expected_type']}: " in c["message"]
            assert c["seconds"] < 30, where  # gloo's 20 s group timeout would end a wait


def test_workflow_steps_register_and_run_like_the_library_s() -> None:
    name = step.register("workflow.open")
    assert step.STEPS[name] == "workflow"
    with pytest.raises(ValueError, match=r"group\.what"):
        step.register("nodot")

    def boom() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(CollectiveStepError) as info:
        step.run(SingleProcessComm(), name, boom, context="cannot open the output")
    assert info.value.step == name and info.value.failures[0].type == "OSError"
