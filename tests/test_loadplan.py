"""The load plan: pure planning from manifests built in memory (no store, no files)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distckpt.errors import CheckpointStateSchemaError, CorruptCheckpointError
from distckpt.format import tree as codec
from distckpt.format.manifest import ArrayEntry, GlobalEntry, RankManifest, StateRecord
from distckpt.format.shards import Box, Sharded
from distckpt.plan.load import (
    ArrayRead,
    BoxRead,
    Slot,
    Update,
    fill_values,
    plan_load,
    saved_alike,
    saved_tree,
)


def manifest(states: dict[str, object], rank: int = 0, globals_: tuple = ()) -> RankManifest:
    """A rank manifest recording ``states`` as a save would, without writing anything."""
    leaves: list[codec.Leaf] = []
    shards: list = []
    trees = {sid: codec.encode(v, leaves, (sid,), shards) for sid, v in states.items()}
    arrays = tuple(
        ArrayEntry(
            codec.path_str(leaf.path),
            f"rank{rank}/a{i}",
            str(leaf.tensor.dtype).removeprefix("torch."),
            tuple(leaf.tensor.shape),
            leaf.tensor.numel() * leaf.tensor.element_size(),
            0,
            1000 + i,
        )
        for i, leaf in enumerate(leaves)
    )
    assert len(shards) == len(globals_)
    return RankManifest(
        row=3,
        rank=rank,
        world_size=2,
        write_count=0,
        created="2026-01-01T00:00:00",
        arrays=arrays,
        states={sid: StateRecord(t) for sid, t in trees.items()},
        globals=globals_,
    )


def own(m: RankManifest) -> dict[str, object]:
    return saved_tree(dict.fromkeys(m.states, m))


def test_tensors_are_read_into_the_live_tensors_at_their_paths() -> None:
    m = manifest({"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "step": 7}, rank=1)
    live = {"model": {"w": torch.ones(2, 3), "b": torch.ones(3)}, "step": 0}
    plan = plan_load(own(m), live)
    into = {r.path: r for r in plan.reads}
    assert set(into) == {("model", "w"), ("model", "b")}
    w = into[("model", "w")]
    assert w.dest == "live" and isinstance(w.source, ArrayRead)
    assert w.source.rank == 1 and w.source.entry == m.arrays[0]
    assert w.source.entry.crc32c == 1000 and w.source.entry.shape == (2, 3)
    assert plan.updates == (Update(("step",), 7),)


def test_keys_the_live_state_lacks_are_added_as_new_tensors() -> None:
    m = manifest({"optim": {"state": {0: {"m": torch.zeros(4)}}, "lr": 0.1}})
    live: dict[str, object] = {"optim": {"state": {}, "lr": 1.0}}
    plan = plan_load(own(m), live)
    (read,) = plan.reads
    assert read.dest == "new" and read.path == ("optim", "state", 0, "m")
    updates = {u.path: u.value for u in plan.updates}
    assert updates[("optim", "state", 0)] == {"m": Slot(0)}
    assert fill_values(updates[("optim", "state", 0)], {0: "T"}) == {"m": "T"}
    assert updates[("optim", "lr")] == 0.1


def test_a_missing_live_key_raises_or_is_kept() -> None:
    m = manifest({"model": {"w": torch.zeros(2)}})
    live = {"model": {"w": torch.zeros(2), "new_head": torch.zeros(1)}}
    with pytest.raises(CheckpointStateSchemaError, match="model/new_head"):
        plan_load(own(m), live)
    plan = plan_load(own(m), live, strict=False)
    assert plan.kept == ("model/new_head",)
    assert [r.path for r in plan.reads] == [("model", "w")]


@pytest.mark.parametrize(
    ("saved", "live", "words"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), "saved tensor is (2, 3)"),
        (torch.zeros(2), torch.zeros(2, dtype=torch.int64), "torch.int64"),
        ("text", torch.zeros(2), "saved value is a str"),
        (np.zeros(2), torch.zeros(2), "numpy.ndarray"),
    ],
)
def test_values_that_do_not_fit_raise_before_any_read(
    saved: object, live: object, words: str
) -> None:
    m = manifest({"s": {"x": saved}})
    with pytest.raises(CheckpointStateSchemaError, match="s/x") as info:
        plan_load(own(m), {"s": {"x": live}})
    assert words in str(info.value)


def test_numpy_values_come_back_as_new_reads_with_their_dtype() -> None:
    times = np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[s]")
    m = manifest({"coords": {"t": times, "v": np.arange(3)}})
    plan = plan_load(own(m), None)
    reads = {r.path: r.source for r in plan.reads}
    t = reads[("coords", "t")]
    assert isinstance(t, ArrayRead) and t.numpy and t.np_dtype == "datetime64[s]"
    v = reads[("coords", "v")]
    assert isinstance(v, ArrayRead) and v.numpy and v.np_dtype is None


def test_a_global_array_fills_only_the_live_region() -> None:
    entry = GlobalEntry("w", "global/w", "float32", (4, 6), (2, 6))
    m = manifest({"model": {"w": Sharded(torch.zeros(4, 6), (4, 6), (0, 0))}}, globals_=(entry,))
    live = {"model": {"w": Sharded(torch.zeros(2, 3), (4, 6), (2, 3))}}
    (read,) = plan_load(own(m), live).reads
    assert read.dest == "live" and read.source == BoxRead(entry, Box((2, 3), (2, 3)))
    plain = {"model": {"w": torch.zeros(4, 6)}}
    (read,) = plan_load(own(m), plain).reads
    assert read.source == BoxRead(entry, Box((0, 0), (4, 6)))
    (read,) = plan_load(own(m), None).reads
    assert read.dest == "new" and read.source == BoxRead(entry, Box((0, 0), (4, 6)))
    with pytest.raises(CheckpointStateSchemaError, match="global shape"):
        plan_load(own(m), {"model": {"w": torch.zeros(4, 5)}})


def test_states_decoded_in_memory_plan_like_saved_ones() -> None:
    migrated = torch.arange(3.0)
    live = {"s": {"x": torch.zeros(3)}, "t": [1, 2]}
    plan = plan_load({"s": {"x": migrated}, "t": [1, 2, 3]}, live)
    (read,) = plan.reads
    assert read.source is migrated and read.dest == "live"
    assert plan.updates == (Update(("t",), [1, 2, 3]),)


def test_a_state_refering_to_a_missing_array_is_corrupt() -> None:
    m = manifest({"s": {"x": torch.zeros(1)}})
    broken = RankManifest(
        row=m.row, rank=0, world_size=1, write_count=0, created=m.created, states=m.states
    )
    with pytest.raises(CorruptCheckpointError, match="missing array 0"):
        own(broken)


def test_a_state_is_saved_alike_only_when_every_rank_records_one_digest() -> None:
    def with_digests(digests: list[str | None]) -> list[RankManifest]:
        out = []
        for rank, digest in enumerate(digests):
            m = manifest({"s": 1}, rank=rank)
            out.append(dataclasses.replace(m, states={"s": StateRecord({"v": 1}, digest=digest)}))
        return out

    assert saved_alike(with_digests(["a", "a", "a"]), "s")
    assert not saved_alike(with_digests(["a", "b", "a"]), "s")
    assert not saved_alike(with_digests(["a", None]), "s")  # saved before digests existed
    missing = [*with_digests(["a"]), manifest({"t": 1}, rank=1)]
    assert not saved_alike(missing, "s")
