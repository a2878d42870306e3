"""CheckpointManager in one process, and the retention policies it composes.

What a training loop relies on: saves at the interval, the step and metrics recorded with
each row, newest N + one per K steps + best k kept (a union), never the newest row or a row
being read; restore returns the saved step; a preemption signal saves the current step, then
exits with the requeue status; ``python -m distckpt.session.preempt`` sees AsyncSaver saves.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import (
    AnyOf,
    CheckpointManager,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    PreemptionHandler,
)
from distckpt.dist.comm import SingleProcessComm
from distckpt.dist.retention import reading, rows_to_delete
from distckpt.session.preempt import watch_boundaries
from distckpt.storage.store import Store


@pytest.fixture
def no_atexit(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record what checkpoint_and_exit registers at exit instead of registering it in pytest."""
    registered: list[Any] = []
    monkeypatch.setattr(
        "distckpt.session.preempt.atexit.register", lambda f, *a: registered.append((f, a))
    )
    return registered


def losses(n: int) -> list[float]:
    """A loss per step that is not monotone, so 'best' differs from 'newest'."""
    return [float((7 * s) % 11) for s in range(n)]


def test_policies_compose_as_a_union_over_row_metadata(tmp_path: Path) -> None:
    path = tmp_path / "s"
    loss = losses(12)
    for step in range(12):  # rows 0..11 hold steps 0, 5, 10, ..., 55
        distckpt.save({"x": torch.tensor(step)}, path, step=5 * step, metrics={"loss": loss[step]})
    store = Store(path)
    every = KeepEveryNSteps(20)  # first row in [0,20), [20,40), [40,60): steps 0, 20, 40
    best = KeepBest("loss", k=2, mode="min")  # loss 0 at rows 0 and 11 (7 * 11 % 11)
    assert sorted(set(range(12)) - set(rows_to_delete(store, every))) == [0, 4, 8, 11]
    assert sorted(set(range(12)) - set(rows_to_delete(store, best))) == [0, 11]
    assert sorted(set(range(12)) - set(rows_to_delete(store, KeepBest("loss", 3)))) == [0, 8, 11]
    high = KeepBest("loss", k=1, mode="max")  # loss 10 at row 3 (7*3 % 11 == 10)
    assert sorted(set(range(12)) - set(rows_to_delete(store, high))) == [3, 11]
    union = AnyOf((KeepLatest(2), every, best))
    assert sorted(set(range(12)) - set(rows_to_delete(store, union))) == [0, 4, 8, 10, 11]
    with reading(Store(tmp_path / "." / "s"), 5):  # a row being read is never deleted meanwhile
        assert 5 not in rows_to_delete(store, union)
    assert 5 in rows_to_delete(store, union)
    with pytest.raises(ValueError):
        KeepEveryNSteps(0)
    with pytest.raises(ValueError):
        KeepBest("loss", mode="lowest")  # type: ignore[arg-type]


def test_manager_saves_at_the_interval_keeps_what_it_is_told_and_resumes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s"
    loss = losses(30)
    model = torch.nn.Linear(3, 2)
    with CheckpointManager(
        path,
        save_interval_steps=3,
        keep_last=2,
        keep_every_n_steps=10,
        keep_best=("loss", 1, "min"),
        preemption=False,
        comm=SingleProcessComm(),
    ) as mgr:
        for step in range(20):
            with torch.no_grad():
                model.weight.fill_(step)
            if mgr.should_save(step):
                assert mgr.should_save(step)  # asked twice: same answer
                assert mgr.save(step, {"model": model}, metrics={"loss": torch.tensor(loss[step])})
            else:
                assert not mgr.save(step, {"model": model})  # not due: nothing saved
        mgr.wait()
    kept = sorted(CheckpointManager(path, preemption=False).steps().values())
    # saved 0,3,...,18; newest 2: 15, 18; per 10 steps: 0, 12; best loss: step 0 (loss 0)
    assert kept == [0, 12, 15, 18]

    fresh = torch.nn.Linear(3, 2)
    with CheckpointManager(path, save_interval_steps=3, preemption=False) as mgr:
        assert mgr.latest_step() == 18
        assert mgr.restore({"model": fresh}) == 18
        assert torch.all(fresh.weight == 18)
        assert not mgr.should_save(18)  # the restored step is not saved again
        assert not mgr.save(18, {"model": fresh}, force=True)
        assert mgr.restore({"model": fresh}, step=12) == 12
        assert torch.all(fresh.weight == 12)
    assert CheckpointManager(tmp_path / "empty", preemption=False).restore({"m": fresh}) is None


@pytest.mark.parametrize("async_", [True, False])
def test_a_signal_saves_the_current_step_then_exits_with_the_requeue_status(
    tmp_path: Path, no_atexit: list[Any], monkeypatch: pytest.MonkeyPatch, async_: bool
) -> None:
    marker = tmp_path / "requeue.json"
    monkeypatch.setenv("DISTCKPT_REQUEUE_FILE", str(marker))
    path = tmp_path / "s"
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    mgr = CheckpointManager(path, save_interval_steps=5, async_=async_, comm=SingleProcessComm())
    with pytest.raises(SystemExit) as exited, mgr:
        for step in range(20):
            if step == 7:
                os.kill(os.getpid(), signal.SIGUSR1)
            if mgr.should_save(step):
                mgr.save(step, {"x": torch.tensor(step)})
    assert exited.value.code == distckpt.REQUEUE_EXIT_CODE == 85
    assert mgr.reached_preemption
    assert CheckpointManager(path, preemption=False).steps() == {0: 0, 1: 5, 2: 7}
    assert json.loads(marker.read_text())["row"] == 2
    assert [f for f, _ in no_atexit if getattr(f, "__name__", "") == "_quiet_teardown"]
    for sig, handler in previous.items():  # the handlers stay recording after the exit
        signal.signal(sig, handler)


def test_without_exit_a_preemption_saves_once_and_says_so(tmp_path: Path) -> None:
    handler = PreemptionHandler(comm=SingleProcessComm())
    with CheckpointManager(
        tmp_path / "s",
        save_interval_steps=100,
        preemption=handler,
        exit_on_preemption=False,
        async_=False,
        comm=SingleProcessComm(),
    ) as mgr:
        saved = []
        for step in range(1, 6):
            if step == 3:
                handler.request_stop()
            if mgr.should_save(step):
                mgr.save(step, {"x": torch.tensor(step)})
                saved.append(step)
        assert mgr.reached_preemption
    assert saved == [3]
    assert mgr.latest_step() == 3


def test_the_preemption_runner_stops_at_async_saves(tmp_path: Path, no_atexit: list[Any]) -> None:
    """What ``python -m distckpt.session.preempt`` does: every AsyncSaver.save is a boundary;
    once stopped, the queued row is committed (flush) before the exit."""
    handler = PreemptionHandler(comm=SingleProcessComm())
    saver = distckpt.AsyncSaver(tmp_path / "s", comm=SingleProcessComm())
    with pytest.raises(SystemExit) as exited, saver, watch_boundaries(handler):
        for step in range(10):
            if step == 4:
                handler.request_stop()
            saver.save({"x": torch.tensor(step)}, step=step)
    assert exited.value.code == 85
    row = distckpt.latest(tmp_path / "s")
    assert row == 4 and saver.row == 4
    assert distckpt.metadata(tmp_path / "s", row=row)["step"] == 4
