"""Asynchronous saves: staging, the background writer, back-pressure and error reporting.

The multi-process crash tests of the writer thread are in ``test_multiproc.py``
(``test_sigkill_in_the_background_writer``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from fakes import FullDiskFS
from multiproc import WORKERS, run_torchrun

import distckpt
from distckpt import Store
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD
from distckpt.storage.filesystem import Buffer, LocalFileSystem

BIG = DEFAULT_PACK_THRESHOLD // 4 + 10


def make_state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(BIG, generator=gen),
        "small": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(6) + seed,
        "step": seed,
    }


def snapshot(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def assert_loads(store, row: int, want: dict) -> None:
    live = {k: torch.zeros_like(v) if torch.is_tensor(v) else None for k, v in want.items()}
    assert distckpt.load(live, store, row=row) == row
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(live[k].view(torch.uint8), v.view(torch.uint8)), k
        else:
            assert live[k] == v


class GatedFS(LocalFileSystem):
    """Every chunk write waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        if os.path.basename(path).startswith("c"):  # a chunk, not a zarr.json
            self.waiting.set()
            self.gate.wait()
        return super().write_file(path, parts, durable=durable)


def test_saved_row_holds_the_state_as_it_was_when_save_returned(tmp_path):
    state = make_state(1)
    want = snapshot(state)
    with distckpt.AsyncSaver(tmp_path / "s") as saver:
        saver.save(state, step=1)
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v.zero_()  # the training loop moves on at once
        assert saver.wait() == 0
    assert_loads(tmp_path / "s", 0, want)
    assert distckpt.metadata(tmp_path / "s") == {"step": 1}


def kinds() -> dict:
    """One of each value kind a single process can hold (CUDA ones when a GPU is present)."""
    gen = torch.Generator().manual_seed(7)
    state = {
        "plain": torch.randn(BIG, generator=gen),
        "packed": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "nested": {"list": [torch.randn(7, generator=gen), (torch.arange(4),)]},
        "numpy": np.arange(6, dtype=np.float64),
        "sharded": distckpt.Sharded(torch.arange(8, dtype=torch.int64), (8,), (0,)),
    }
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        state["cuda"] = torch.randn(BIG, generator=gen).to(dev)
        state["cuda_sharded"] = distckpt.Sharded(torch.ones(4, device=dev), (4,), (0,))
    return state


def values(value):
    """Plain CPU copies of every tensor in a state (the values at save time)."""
    if isinstance(value, distckpt.Sharded):
        return value.local.cpu().clone()
    if isinstance(value, torch.Tensor):
        return value.cpu().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: values(v) for k, v in value.items()}
    return [values(v) for v in value]


def mutate(value) -> None:
    if isinstance(value, distckpt.Sharded):
        value.local.add_(1)
    elif isinstance(value, torch.Tensor | np.ndarray):
        value += 1
    elif isinstance(value, dict):
        for v in value.values():
            mutate(v)
    else:
        for v in value:
            mutate(v)


def zeros(value):
    if isinstance(value, distckpt.Sharded):
        return distckpt.Sharded(torch.zeros_like(value.local), value.global_shape, value.offsets)
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    if isinstance(value, dict):
        return {k: zeros(v) for k, v in value.items()}
    return type(value)(zeros(v) for v in value)


@pytest.mark.parametrize("kind", ["plain", "packed", "nested", "numpy", "sharded", "cuda"])
def test_every_value_kind_is_copied_before_save_returns(tmp_path, kind):
    state = kinds()
    if kind not in state:
        pytest.skip("needs a CUDA device")
    state = {k: v for k, v in state.items() if k == kind or (kind == "cuda" and "cuda" in k)}
    want = values(state)
    with distckpt.AsyncSaver(tmp_path / "s") as saver:
        saver.save(state)
        mutate(state)  # in place, right after save() returned
        row = saver.wait()
    fresh = zeros(state)
    distckpt.load(fresh, tmp_path / "s", row=row)
    assert_same(values(fresh), want)


def assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, np.ndarray):
        assert np.array_equal(got, want)
    elif isinstance(want, dict):
        for k in want:
            assert_same(got[k], want[k])
    else:
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)


@pytest.mark.multiproc
def test_every_value_kind_is_staged_at_two_ranks_with_a_dtensor(tmp_path):
    """AsyncSaver and Checkpoint(async_write=True) under torchrun: DTensor Shard(0) local
    shards, Sharded pieces, numpy, nested, packed and plain tensors changed in place right
    after the save returned are stored as they were."""
    result = run_torchrun(2, WORKERS / "staging_worker.py", [str(tmp_path)], timeout=300)
    result.check()
    for how in ("saver", "session"):
        assert result.ranks(f"STAGED OK how={how}") == [0, 1], result.describe()


def test_rows_are_committed_in_order_and_staging_buffers_are_reused(tmp_path):
    with distckpt.AsyncSaver(tmp_path / "s", keep=2) as saver:
        sizes = []
        wants = []
        for seed in range(4):
            state = make_state(seed)
            wants.append(snapshot(state))
            saver.save(state)
            sizes.append(saver.staging_nbytes)
        assert saver.wait() == 3
    assert saver.committed == [0, 1, 2, 3]
    assert len(set(sizes)) == 1 and sizes[0] >= BIG * 4  # one slot, reused
    assert Store(tmp_path / "s").rows() == [2, 3]  # keep=2 pruned by the writer
    assert_loads(tmp_path / "s", 3, wants[3])
    assert_loads(tmp_path / "s", 2, wants[2])


def test_a_failed_row_is_raised_at_wait_and_leaves_no_commit(tmp_path):
    store = Store(tmp_path / "s", fs=FullDiskFS(budget=10_000))
    saver = distckpt.AsyncSaver(store)
    saver.save(make_state(1))  # returns: the failure is the writer's
    with pytest.raises(distckpt.CheckpointWriteError, match="no space left"):
        saver.wait()
    assert distckpt.latest(tmp_path / "s") is None


def test_a_failed_row_is_raised_by_the_next_save_which_is_not_queued(tmp_path):
    fs = FullDiskFS(budget=10_000)
    store = Store(tmp_path / "s", fs=fs)
    saver = distckpt.AsyncSaver(store)
    saver.save(make_state(1))
    with pytest.raises(distckpt.CheckpointWriteError, match="asynchronous save failed"):
        saver.save(make_state(2))
    fs.budget = 1 << 40
    saver.save(make_state(3))  # a failure is reported once; the writer keeps going
    assert saver.close() == 1  # row 0 was started, never committed: ids are not reused
    assert distckpt.latest(tmp_path / "s") == 1
    assert_loads(tmp_path / "s", 1, make_state(3))


def test_unstorable_state_is_refused_by_save_itself(tmp_path):
    with distckpt.AsyncSaver(tmp_path / "s") as saver:
        with pytest.raises(distckpt.CheckpointSerializationError, match="object"):
            saver.save({"x": object()})
        saver.save(make_state(1))
        assert saver.wait() == 0


def test_next_save_waits_for_a_free_slot(tmp_path):
    """Back-pressure: with one row in flight, the next save() cannot stage over its buffers."""
    fs = GatedFS()
    saver = distckpt.AsyncSaver(Store(tmp_path / "s", fs=fs), max_in_flight=1)
    saver.save(make_state(1))
    assert fs.waiting.wait(timeout=30)  # the writer is stuck inside row 0
    second = threading.Thread(target=saver.save, args=(make_state(2),))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "a second row was staged while the first one was in flight"
    assert saver.writer.in_flight == 1
    fs.gate.set()
    second.join(timeout=60)
    assert not second.is_alive()
    assert saver.close() == 1
    assert_loads(tmp_path / "s", 1, make_state(2))


def test_two_rows_in_flight_use_two_slots(tmp_path):
    fs = GatedFS()
    saver = distckpt.AsyncSaver(Store(tmp_path / "s", fs=fs), max_in_flight=2)
    saver.save(make_state(1))
    saver.save(make_state(2))  # does not wait: a second slot is free
    assert saver.writer.in_flight == 2
    fs.gate.set()
    assert saver.close() == 1
    assert_loads(tmp_path / "s", 0, make_state(1))


def test_checksums_off_applies_to_async_saves(tmp_path):
    with distckpt.AsyncSaver(tmp_path / "s", checksums=False) as saver:
        saver.save(make_state(1))
    manifest = Store(tmp_path / "s").read_manifest(0, 0)
    assert all(a.crc32c is None for a in manifest.arrays)
    assert_loads(tmp_path / "s", 0, make_state(1))


# -- Checkpoint(async_write=True) ------------------------------------------------------------


@dataclasses.dataclass
class Model:
    weight: torch.Tensor
    step: int = 0


def test_checkpoint_async_write_commits_by_the_end_of_the_block(tmp_path):
    with distckpt.Checkpoint("c", path=tmp_path, async_write=True, flush_interval=1) as session:
        model = Model(torch.randn(BIG))
        distckpt.bind_checkpoint_state(model)
        saved = []
        for step in range(3):
            model.step = step
            model.weight.add_(1.0)
            assert session.write(lead_time=step) is None  # returns before the commit
            saved.append(model.weight.clone())
            model.weight.add_(100.0)  # changes after write() returned are not in the row
        assert session.catalog.staging_nbytes >= BIG * 4
    with distckpt.Checkpoint("c", path=tmp_path) as session:
        restored = Model(torch.zeros(BIG))
        distckpt.bind_checkpoint_state(restored)
        assert session.lead_time == 2 and session.write_count == 3
        assert restored.step == 2
        assert torch.equal(restored.weight, saved[2])


def test_checkpoint_async_write_error_is_raised_at_exit(tmp_path):
    cat = distckpt.Checkpoint("c", path=tmp_path, async_write=True)
    cat.store = Store(tmp_path, fs=FullDiskFS(budget=5_000))
    with pytest.raises(distckpt.CheckpointWriteError, match="no space left"), cat as session:
        distckpt.bind_checkpoint_state(Model(torch.randn(BIG)))
        session.write()
    assert distckpt.latest(tmp_path) is None
