"""Rows written by N ranks, elected and restored by a job of M ranks (one process, fakes)."""

from __future__ import annotations

import pytest
import torch
from fakes import SequentialComm, replay_job, save_as_ranks

import distckpt
from distckpt.dist.election import elect
from distckpt.engine import steps as engine
from distckpt.storage.store import Store


def _state(rank: int) -> dict:
    return {
        "members": {f"m{rank}": torch.full((3,), float(rank))},  # rank-private
        "step": {"n": 7, "lr": torch.tensor([0.5, 0.25])},  # the same on every rank
    }


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    save_as_ranks(s, 2, _state)
    save_as_ranks(s, 2, _state)
    return s


def _load_all(store, world, mapping=None):
    """Restore on every rank of a ``world``-rank job (coordinator first); per-rank targets."""
    out = []
    for comm in replay_job(world):
        target: dict = {"step": {"n": 0, "lr": torch.zeros(2)}, "members": {}}
        distckpt.load(target, store.path, comm=comm, mapping=mapping)
        out.append(target)
    return out


def test_a_row_of_n_ranks_is_elected_by_m_ranks_only_when_asked(store):
    assert elect(store, SequentialComm(0, 3)) is None  # same-size election, as before
    assert elect(store, SequentialComm(0, 3), any_world_size=True) == 1
    assert elect(store, SequentialComm(0, 1), any_world_size=True) == 1
    assert engine.choose_row(store, SequentialComm(0, 4), 0, any_world_size=True) == 0


def test_a_row_missing_one_manifest_is_not_elected_at_another_size(store):
    store.fs.remove(store.manifest_path(1, 1))
    assert elect(store, SequentialComm(0, 3), any_world_size=True) == 0
    with pytest.raises(distckpt.NoCommittedRowError, match=r"row 1 .*missing ranks: 1"):
        engine.choose_row(store, SequentialComm(0, 3), 1, any_world_size=True)


def test_any_saved_part_can_be_opened(store):
    view = engine.open_rank(store, 1, 1)
    assert (view.rank, view.saved_world_size) == (1, 2)
    assert torch.equal(view.read_state("members")["m1"], torch.full((3,), 1.0))
    assert engine.open_part(store, 1, 3).rank == 1  # rank 3 of 4 reads saved part 3 % 2
    with pytest.raises(distckpt.CorruptCheckpointError, match="saved rank 5"):
        engine.open_rank(store, 1, 5)


def test_state_equal_on_every_rank_restores_at_any_size(store):
    members = distckpt.SourceRanks(lambda s, n, r, m: range(n) if s == "members" else None)
    for target in _load_all(store, 3, mapping=members):
        assert target["step"]["n"] == 7
        assert torch.equal(target["step"]["lr"], torch.tensor([0.5, 0.25]))


@pytest.mark.parametrize("checksums", [True, False])
def test_equal_and_private_states_are_told_apart_with_checksums_on_or_off(tmp_path, checksums):
    """The digests that decide which states may move come from the write's checksums, or
    from the tensors themselves when the save skipped checksums: either way a value that
    differs between ranks only in its bytes is private, an equal one is shared."""
    st = Store(tmp_path / "s")
    save_as_ranks(
        st,
        2,
        lambda rank: {"shared": torch.arange(4.0), "bytes_differ": torch.full((4,), rank)},
        checksums=checksums,
    )
    digests = [
        {sid: rec.digest for sid, rec in st.read_manifest(0, rank).states.items()}
        for rank in (0, 1)
    ]
    assert digests[0]["shared"] == digests[1]["shared"]
    assert digests[0]["bytes_differ"] != digests[1]["bytes_differ"]
    with pytest.raises(distckpt.WorldSizeMismatchError, match="'bytes_differ'"):
        distckpt.load({"shared": torch.zeros(4)}, st.path, comm=SequentialComm(0, 1))


def test_rank_private_state_needs_a_mapping_policy(store):
    with pytest.raises(distckpt.WorldSizeMismatchError) as info:
        distckpt.load({}, store.path, comm=SequentialComm(0, 1))
    message = str(info.value)
    assert "'members'" in message and "2 ranks; this job has 1" in message
    assert "'step'" not in message  # the uniform state is not the problem


def test_a_mapping_policy_merges_the_parts_it_names(store):
    members = distckpt.SourceRanks(lambda s, n, r, m: [0, 1] if s == "members" else None)
    (target,) = _load_all(store, 1, mapping=members)
    assert sorted(target["members"]) == ["m0", "m1"]
    assert torch.equal(target["members"]["m1"], torch.full((3,), 1.0))


def test_a_mapping_policy_may_not_drop_a_saved_rank(store):
    with pytest.raises(distckpt.WorldSizeMismatchError, match=r"saved ranks \[1\].*'members'"):
        _load_all(store, 1, mapping=distckpt.SourceRanks(lambda s, n, r, m: [0]))


def test_a_mapping_policy_may_not_duplicate_a_key(tmp_path):
    st = Store(tmp_path / "dup")
    save_as_ranks(st, 2, lambda rank: {"members": {"m0": torch.full((2,), float(rank))}})
    with pytest.raises(distckpt.CheckpointError, match="'m0' is held by saved ranks 0 and 1"):
        _load_all(st, 1, mapping=distckpt.SourceRanks(lambda s, n, r, m: [0, 1]))


class SplitMembers:
    """A policy splitting member ``mK`` to rank ``K % M``, whoever saved it."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.world = 0

    def sources(self, state_id, saved_world_size, rank, world_size):
        self.world = world_size
        return range(saved_world_size) if state_id == "members" else None

    def combine(self, state_id, parts):
        out = {}
        for view in parts.values():
            for key, value in view.read_state(state_id).items():
                if int(key[1:]) % self.world == self.rank:
                    out[key] = value
        return out


def test_a_policy_may_split_the_state_of_a_one_rank_row(tmp_path):
    st = Store(tmp_path / "one")
    members = {f"m{k}": torch.full((2,), float(k)) for k in range(4)}
    save_as_ranks(st, 1, lambda rank: {"members": members})
    got = []
    for comm in replay_job(2):
        target: dict = {"members": {}}
        distckpt.load(target, st.path, comm=comm, mapping=SplitMembers(comm.rank))
        got.append(sorted(target["members"]))
    assert got == [["m0", "m2"], ["m1", "m3"]]
    # Without a policy, a 1-rank row's states count as saved alike: every rank gets all.
    target = {"members": {}}
    distckpt.load(target, st.path, comm=replay_job(2)[0])
    assert sorted(target["members"]) == ["m0", "m1", "m2", "m3"]
