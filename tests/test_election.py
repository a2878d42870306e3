"""Election: the newest row every rank committed, and nothing a bad manifest can crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import SequentialComm, save_as_ranks

import distckpt
from distckpt import Store
from distckpt.dist.election import elect, elect_offline, row_status
from distckpt.format import checked


def _state(rank: int) -> dict:
    return {"x": torch.full((4,), float(rank))}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    for _ in range(3):
        save_as_ranks(s, 2, _state)
    return s


def test_newest_fully_committed_row_is_elected(store):
    assert store.rows() == [0, 1, 2]
    assert elect_offline(store) == 2
    assert distckpt.latest(store.path) == 2
    assert elect(store, SequentialComm(0, 2)) == 2


def _damage(store, row, rank, how):
    path = store.manifest_path(row, rank)
    if how == "missing":
        import os

        os.remove(path)
    elif how == "truncated":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        Path(path).write_bytes(b"\x00\xffnot json at all")
    elif how == "empty":
        Path(path).write_bytes(b"")
    elif how == "other_world_size":
        doc = json.loads(Path(path).read_bytes())
        doc["world_size"] = 4
        Path(path).write_bytes(checked.seal(doc))
    elif how == "wrong_row":
        doc = json.loads(Path(path).read_bytes())
        doc["row"] = row - 1
        Path(path).write_bytes(checked.seal(doc))
    elif how == "wrong_types":
        doc = json.loads(Path(path).read_bytes())
        doc["write_count"] = "three"
        doc["arrays"] = {"not": "a list"}
        Path(path).write_bytes(checked.seal(doc))
    elif how == "escaping_array_path":
        doc = json.loads(Path(path).read_bytes())
        doc["arrays"][0]["array"] = "../../../etc"
        Path(path).write_bytes(checked.seal(doc))


DAMAGE = [
    "missing",
    "truncated",
    "garbage",
    "empty",
    "other_world_size",
    "wrong_row",
    "wrong_types",
    "escaping_array_path",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_bad_manifest_uncommits_its_row_without_crashing(store, how):
    _damage(store, 2, 1, how)
    status = row_status(store, 2)
    assert not status.committed
    assert elect_offline(store) == 1
    assert elect(store, SequentialComm(1, 2)) == 1
    assert distckpt.latest(store.path) == 1


def test_disagreeing_write_counts_are_not_committed(store):
    path = store.manifest_path(2, 0)
    doc = json.loads(Path(path).read_bytes())
    doc["write_count"] = 7
    Path(path).write_bytes(checked.seal(doc))
    assert not row_status(store, 2).committed
    assert elect_offline(store) == 1


def test_row_status_names_missing_ranks(store):
    _damage(store, 2, 1, "missing")
    status = row_status(store, 2)
    assert status.missing_ranks == (1,)
    assert status.valid_ranks == (0,)


def test_empty_and_absent_stores_elect_nothing(tmp_path):
    assert distckpt.latest(tmp_path / "nothing-here") is None
    (tmp_path / "empty").mkdir()
    assert distckpt.latest(tmp_path / "empty") is None


def test_rank_private_state_of_another_world_size_is_not_restored(store):
    # The 2-rank row is elected by a 3-rank job, but each rank saved its own "x".
    expected = r"row 2 .* written by 2 ranks; this job has 3: rank-private state 'x'"
    with pytest.raises(distckpt.WorldSizeMismatchError, match=expected):
        distckpt.load({"x": torch.zeros(4)}, store.path, comm=SequentialComm(0, 3))


def test_restoring_a_named_row_of_another_world_size_is_refused(store):
    with pytest.raises(distckpt.WorldSizeMismatchError, match="2 ranks"):
        distckpt.load({"x": torch.zeros(4)}, store.path, row=1)


def test_each_rank_restores_its_own_values(store):
    for rank in range(2):
        target = {"x": torch.zeros(4)}
        assert distckpt.load(target, store.path, comm=SequentialComm(rank, 2)) == 2
        assert torch.equal(target["x"], torch.full((4,), float(rank)))


def test_election_scans_newest_first(store, monkeypatch):
    reads = []
    original = Store.read_manifest

    def counting(self, row, rank):
        reads.append(row)
        return original(self, row, rank)

    monkeypatch.setattr(Store, "read_manifest", counting)
    assert elect_offline(store) == 2
    assert set(reads) == {2}
