"""The load plan: pure planning from manifests built in memory (no store, no files)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distckpt import MemberMapping, SourceRanks
from distckpt.errors import (
    CheckpointError,
    CheckpointStateSchemaError,
    CorruptCheckpointError,
    WorldSizeMismatchError,
)
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
from distckpt.plan.mapping import Part, Placement, finish, mapped_tree


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


# -- the mapping protocol: both families place parts and plan reads of several ranks ------
def reads_by_rank(saved: dict[str, object]) -> dict[int, set[str]]:
    """Saved rank -> names of the entries the plan reads from it."""
    out: dict[int, set[str]] = {}
    for item in plan_load(saved, None).reads:
        assert isinstance(item.source, ArrayRead)
        out.setdefault(item.source.rank, set()).add(item.source.entry.name)
    return out


def test_source_ranks_place_whole_parts_and_merge_their_reads() -> None:
    rows = [
        manifest({"counts": {"a": torch.zeros(2)}}, rank=0),
        manifest({"counts": {"b": torch.zeros(3)}}, rank=1),
    ]
    policy = SourceRanks(lambda s, n, r, m: range(n))
    placement = policy.place("counts", rows, 0, 1)
    assert placement == Placement("counts", (Part(0), Part(1)), "merge")
    tree = mapped_tree(rows, placement)
    assert tree["a"] == ArrayRead(0, rows[0].arrays[0])
    assert tree["b"] == ArrayRead(1, rows[1].arrays[0])
    assert reads_by_rank({"counts": tree}) == {0: {"counts/a"}, 1: {"counts/b"}}
    one = SourceRanks(lambda s, n, r, m: [1]).place("counts", rows, 0, 4)
    assert one is not None and one.join == "one"
    assert reads_by_rank({"counts": mapped_tree(rows, one)}) == {1: {"counts/b"}}
    assert SourceRanks(lambda s, n, r, m: None).place("counts", rows, 0, 1) is None


def test_source_ranks_refuse_unknown_ranks_and_duplicated_keys() -> None:
    rows = [manifest({"s": {"k": torch.zeros(1)}}, rank=r) for r in range(2)]
    with pytest.raises(CheckpointError, match=r"saved ranks \[5\] of state 's'"):
        SourceRanks(lambda s, n, r, m: [5]).place("s", rows, 0, 1)
    both = SourceRanks(lambda s, n, r, m: [0, 1]).place("s", rows, 0, 1)
    assert both is not None
    with pytest.raises(CheckpointError, match="'k' is held by saved ranks 0 and 1"):
        mapped_tree(rows, both)


def member_rows(states: list[dict[str, object]], done: list[int] | None = None) -> list:
    rows = [manifest(s, rank=r) for r, s in enumerate(states)]
    if done is not None:
        meta = codec.encode_metadata({"completed_ensembles": done})
        rows[0] = dataclasses.replace(rows[0], metadata=meta)
    return rows


@pytest.mark.parametrize(
    ("rank", "world", "done", "expected"),
    [
        (0, 1, None, {0: {"noise/n/0", "noise/n/2"}, 1: {"noise/n/1", "noise/n/3"}}),
        (1, 4, None, {1: {"noise/n/1"}}),  # member 1 only, from the rank that held it
        (0, 3, None, {0: {"noise/n/0"}, 1: {"noise/n/3"}}),
        (0, 1, [2, 3], {0: {"noise/n/0"}, 1: {"noise/n/1"}}),  # finished members dropped
    ],
)
def test_member_mapping_reads_each_members_entries_from_its_saved_rank(
    rank: int, world: int, done: list[int] | None, expected: dict[int, set[str]]
) -> None:
    rows = member_rows(
        [
            {"noise": {"n": {0: torch.zeros(2), 2: torch.zeros(2)}}},
            {"noise": {"n": {1: torch.zeros(2), 3: torch.zeros(2)}}},
        ],
        done,
    )
    placement = MemberMapping(4).place("noise", rows, rank, world)
    assert placement.join == "members"
    tree = mapped_tree(rows, placement)
    assert reads_by_rank({"noise": tree}) == expected
    wanted = set(MemberMapping(4).members_of(rank, world)) - set(done or ())
    assert set(tree["n"]) == wanted


def test_member_mapping_reassembles_a_rollout_boundary_from_several_ranks() -> None:
    def boundary(members: list[int]) -> dict[str, object]:
        x = torch.tensor([[float(m)] * 2 for m in members])
        coords = {"ensemble": np.array(members, dtype=np.int32)}
        return {"step": 5, "x": x, "coords": coords, "members": members}

    rows = member_rows([{"b": boundary([0, 2])}, {"b": boundary([1, 3])}])
    placement = MemberMapping(4).place("b", rows, 1, 2)  # members 1 and 3 stay on rank 1
    assert placement.parts == (Part(1, (1, 3)),) and placement.order == (1, 3)
    placement = MemberMapping(4).place("b", rows, 0, 1)
    assert placement.join == "boundary" and placement.order == (0, 1, 2, 3)
    tree = mapped_tree(rows, placement)
    assert tree["x"] == [ArrayRead(0, rows[0].arrays[0]), ArrayRead(1, rows[1].arrays[0])]
    # The reads done, each part's rows of the wanted members are stacked in order.
    read = dict(tree, x=[torch.tensor([[0.0, 0], [2, 2]]), torch.tensor([[1.0, 1], [3, 3]])])
    read["coords"] = {"ensemble": np.array([0, 2], dtype=np.int32)}
    value = finish(rows, placement, read)
    assert value["x"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert value["members"] == [0, 1, 2, 3] and value["step"] == 5
    assert value["coords"]["ensemble"].tolist() == [0, 1, 2, 3]
    assert value["coords"]["ensemble"].dtype == np.int32


def test_member_mapping_refuses_a_state_not_keyed_by_member() -> None:
    rows = member_rows([{"counter": {"n": torch.zeros(1)}} for _ in range(2)])
    with pytest.raises(WorldSizeMismatchError, match=r"'counter'.*2 ranks.*has 3"):
        MemberMapping(4).place("counter", rows, 0, 3)
