"""Member-keyed state at another world size (MemberMapping), in one process: which rank gets
which member's entries, what is read to get them, and what cannot be redistributed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from fakes import RecordingFS, ReplayComm, replay_job, save_as_ranks

import distckpt
from distckpt import Checkpoint, MemberMapping, bind_checkpoint_state
from distckpt.reference import EnsembleConfig
from distckpt.reference.ensemble import assign_members, plan_batches
from distckpt.session.members import MappedView, broadcast_state, elect_any
from distckpt.storage.store import Store

MEMBERS, SAVED = 8, 4
GRID = (4, 8)


def noise_of(m: int) -> torch.Tensor:
    return torch.arange(GRID[0] * GRID[1], dtype=torch.float32).reshape(GRID) * 0.5 + m


def gen_of(m: int) -> torch.Tensor:
    return torch.Generator().manual_seed(1000 + m).get_state()


def x_of(m: int) -> torch.Tensor:
    return torch.full(GRID, float(m), dtype=torch.float32) + torch.linspace(0, 1, GRID[1])


def rank_state(rank: int, world: int = SAVED) -> dict:
    members = assign_members(MEMBERS, rank, world)
    return {
        "noise": {
            "noise": {m: noise_of(m) for m in members},
            "generators": {m: gen_of(m) for m in members},
        },
        "rollout": {
            "step": 3,
            "x": torch.stack([x_of(m) for m in members]),
            "coords": {
                "ensemble": np.array(members),
                "lead_time": np.array([18], dtype="timedelta64[h]"),
            },
            "members": members,
        },
        "weights": {"w": torch.linspace(-1, 1, 256, dtype=torch.bfloat16)},  # same everywhere
        "counter": {"count": rank},  # rank-private, not keyed by member
    }


@pytest.fixture
def row(tmp_path):
    save_as_ranks(tmp_path / "s", SAVED, rank_state, completed_ensembles=[], batch=0)
    return tmp_path / "s"


def view(path, rank: int, world: int, job: list[ReplayComm], mapping=None, fs=None) -> MappedView:
    """Rank ``rank`` of ``job`` (``replay_job(world)``: rank 0 must run first) opens the row."""
    comm = job[rank]
    assert comm.world_size == world
    st = Store(path, fs=fs)
    found = elect_any(st, comm)
    assert found is not None
    return MappedView(st, found[0], comm, mapping or MemberMapping(MEMBERS))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_each_member_moves_to_exactly_one_new_rank(row, world):
    job = replay_job(world)
    held: dict[int, int] = {}
    for rank in range(world):
        state = view(row, rank, world, job).read_state("noise")
        mine = assign_members(MEMBERS, rank, world)
        assert sorted(state["noise"]) == sorted(state["generators"]) == mine
        for m in mine:
            assert torch.equal(state["noise"][m], noise_of(m))
            assert torch.equal(state["generators"][m], gen_of(m))
            assert m not in held, f"member {m} restored on ranks {held[m]} and {rank}"
            held[m] = rank
    assert sorted(held) == list(range(MEMBERS))  # nothing dropped


def test_completed_members_are_not_carried_over(tmp_path):
    save_as_ranks(tmp_path / "s", SAVED, rank_state, completed_ensembles=[0, 5])
    job = replay_job(2)
    state = view(tmp_path / "s", 0, 2, job).read_state("noise")
    assert sorted(state["noise"]) == [2, 4, 6]
    state = view(tmp_path / "s", 1, 2, job).read_state("noise")
    assert sorted(state["noise"]) == [1, 3, 7]


def test_rollout_boundaries_are_reassembled_in_member_order(row):
    job = replay_job(2)
    for rank in range(2):
        b = view(row, rank, 2, job).read_state("rollout")
        mine = assign_members(MEMBERS, rank, 2)
        assert b["members"] == mine and b["step"] == 3
        assert torch.equal(b["x"], torch.stack([x_of(m) for m in mine]))
        assert b["coords"]["ensemble"].tolist() == mine
        assert b["coords"]["lead_time"].tolist() == np.array([18], "timedelta64[h]").tolist()


def test_boundaries_of_finished_members_are_left_behind(tmp_path):
    save_as_ranks(tmp_path / "s", SAVED, rank_state, completed_ensembles=list(range(MEMBERS)))
    b = view(tmp_path / "s", 0, 2, replay_job(2)).read_state("rollout")
    assert (b["step"], b["x"], b["members"]) == (-1, None, [])


def test_a_rank_reads_only_the_entries_of_its_members(row):
    fs, job = RecordingFS(), replay_job(2)
    view(row, 0, 2, job)  # rank 0 runs first (it broadcasts the elected row)
    v = view(row, 1, 2, job, fs=fs)
    fs.reads.clear()
    v.read_state("noise")
    saved = [Store(row).read_manifest(0, q) for q in range(SAVED)]
    wanted = {f"noise/{f}/{m}" for f in ("noise", "generators") for m in (1, 3, 5, 7)}
    expected = {
        (Store(row).data_file(0, m.rank), e.offset, e.nbytes)
        for m in saved
        for e in m.arrays
        if e.name in wanted
    }
    assert set(fs.reads) == expected
    assert len(fs.reads) == len(wanted)  # one ranged read per entry, no packed chunk whole


@pytest.mark.parametrize("declared", [("weights",), ()], ids=["declared", "same-digests"])
def test_replicated_state_is_read_once_and_broadcast(row, declared):
    job = replay_job(2)
    mapping = MemberMapping(MEMBERS, replicated=declared)
    reads = []
    values = []
    for rank in range(2):  # rank 0 first: it reads and broadcasts
        fs = RecordingFS()
        v = view(row, rank, 2, job, mapping, fs=fs)
        reads.append(len(fs.reads))
        values.append(v.read_state("weights")["w"])
    assert reads[0] > 0 and reads[1] == 0
    expected = torch.linspace(-1, 1, 256, dtype=torch.bfloat16)
    assert all(torch.equal(v, expected) and v.dtype == torch.bfloat16 for v in values)


def test_state_not_keyed_by_member_cannot_move(row):
    v = view(row, 0, 2, replay_job(2))
    with pytest.raises(distckpt.WorldSizeMismatchError) as info:
        v.read_state("counter")
    assert "'counter'" in str(info.value)
    assert "saved by 4 ranks and this job has 2" in str(info.value)


@dataclass
class Counter:
    count: int = 0


@dataclass
class Noise:
    noise: dict[int, torch.Tensor] = field(default_factory=dict)
    generators: dict[int, torch.Tensor] = field(default_factory=dict)


def test_checkpoint_restores_member_keyed_state_at_another_world_size(row):
    job = replay_job(2)
    for rank in range(2):
        ck = Checkpoint("s", path=row, comm=job[rank], mapping=MemberMapping(8))
        with ck as session:
            bound = bind_checkpoint_state(Noise(), state_id="noise")
            assert bound.checkpoint_state_loaded
            assert session.entry is not None and session.entry.world_size == SAVED
            assert sorted(bound.noise) == assign_members(MEMBERS, rank, 2)


@pytest.mark.parametrize("mapping", [None, MemberMapping(MEMBERS)], ids=["none", "members"])
def test_checkpoint_refuses_rank_private_state_at_another_world_size(row, mapping):
    ck = Checkpoint("s", path=row, comm=replay_job(2)[0], mapping=mapping)
    with pytest.raises(distckpt.WorldSizeMismatchError, match=r"'counter'.*4 ranks.*has 2"), ck:
        bind_checkpoint_state(Counter(), state_id="counter")


def test_election_takes_the_newest_row_whatever_its_world_size(tmp_path):
    st = Store(tmp_path / "s")
    save_as_ranks(st, 2, lambda r: {"a": {"v": r}})
    assert elect_any(st, replay_job(2)[0]) == (0, 2)
    save_as_ranks(st, 4, lambda r: {"a": {"v": r}})
    assert elect_any(st, replay_job(2)[0]) == (1, 4)
    save_as_ranks(st, 2, lambda r: {"a": {"v": r}})
    assert elect_any(st, replay_job(2)[0]) == (2, 2)


def test_broadcast_state_keeps_dtypes_and_numpy_leaves():
    job = replay_job(2)
    value = {
        "w": torch.randn(3, 5).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
        "a": np.arange(6, dtype=np.int16).reshape(2, 3),
        "n": 3,
    }
    got0 = broadcast_state(job[0], value)
    got1 = broadcast_state(job[1], None)
    for got in (got0, got1):
        assert torch.equal(got["w"], value["w"]) and got["w"].dtype == torch.bfloat16
        assert got["empty"].shape == (0, 4)
        assert np.array_equal(got["a"], value["a"]) and got["a"].dtype == np.int16
        assert got["n"] == 3


CFG = EnsembleConfig(nensemble=8, nsteps=4, batch_size=2)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_fresh_plan_is_round_robin_in_lockstep(world):
    plans = [plan_batches(CFG, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    for r, p in enumerate(plans):
        assert [m for batch in p for m in batch] == assign_members(8, r, world)
        assert all(len(batch) <= CFG.batch_size for batch in p)


CFG16 = EnsembleConfig(nensemble=16, nsteps=4, batch_size=2)


@pytest.mark.parametrize(("saved", "world"), [(4, 2), (4, 8), (2, 4), (4, 3), (4, 4)])
def test_resumed_plan_runs_every_unfinished_member_once(saved, world):
    # The row: saved ranks finished their first batch and are inside their second.
    first = [assign_members(16, q, saved)[:2] for q in range(saved)]
    second = [assign_members(16, q, saved)[2:4] for q in range(saved)]
    completed = {m for b in first for m in b}
    running = {m for b in second for m in b}
    plans = [plan_batches(CFG16, r, world, completed, running) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    planned = sorted(m for p in plans for batch in p for m in batch)
    assert planned == sorted(set(range(16)) - completed)
    for r, p in enumerate(plans):  # members in progress first, together, on their new rank
        assert p[0] == [m for m in assign_members(16, r, world) if m in running]
    if saved == world:  # same size: the batches it had before the restart
        assert [p[0] for p in plans] == second
