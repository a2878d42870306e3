"""Retention spread over the ranks: each rank removes its own part of an old row, the
coordinator only what is left, and nothing outside the store is ever touched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.dist.election import row_status
from distckpt.engine.steps import prune
from distckpt.format.shards import Sharded
from distckpt.io.removal import remove_own_part, remove_row_rest
from distckpt.storage.store import Store
from tests.fakes import RecordingFS, SequentialComm, save_as_ranks

WORLD = 2


def _state(rank: int) -> dict[str, Any]:
    """Two replicated global tensors (each written by one rank, chosen per tensor) and a
    rank-private tensor in each rank's own directory."""
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(6, dtype=torch.int64)
    return {
        "model": {
            "a": Sharded(a, (3, 4), (0, 0)),
            "b": Sharded(b, (6,), (0,)),
            "own": torch.full((5,), float(rank)),
        }
    }


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _store_with_rows(tmp_path: Path, rows: int) -> Store:
    store = Store(tmp_path / "store")
    for _ in range(rows):
        save_as_ranks(store, WORLD, _state)
    return store


def test_each_rank_removes_only_its_own_part_and_the_coordinator_the_rest(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, 1)
    row_dir = Path(store.row_dir(0))
    # Format 2: a rank's global pieces lie in its own data array, beside its tensors.
    assert all(store.read_manifest(0, rank).globals for rank in range(WORLD))
    removed: dict[int, list[str]] = {}
    for rank in (1, 0):
        fs = RecordingFS()
        remove_own_part(Store(store.path, fs), 0, rank)
        removed[rank] = [os.path.relpath(p, row_dir) for _, p in fs.events]
        if rank == 1:  # the first removal uncommits the row
            assert not row_status(store, 0).committed
    for rank, paths in removed.items():
        assert paths[0] == os.path.relpath(store.manifest_path(0, rank), row_dir)
        own = os.path.relpath(store.data_file(0, rank), row_dir)
        assert set(paths[1:]) == {own}
    left = _files(row_dir)
    # The row's documents: its group and the row index (prune removes the index first).
    assert left and all(os.path.basename(f) in ("zarr.json", "index.json") for f in left)
    assert not any(f.startswith(os.path.relpath(store.data_dir(0), row_dir) + "/c.") for f in left)
    remove_row_rest(store, 0)
    assert not row_dir.exists() and store.rows() == []


def test_prune_spread_over_ranks_keeps_the_newest_row_loadable(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, 3)
    for rank in range(WORLD):  # the coordinator goes first: it names the rows
        prune(store, SequentialComm(rank, WORLD), 1)
    assert store.rows() == [2]
    for rank in range(WORLD):
        got = distckpt.load(_state(rank), store, comm=SequentialComm(rank, WORLD))
        assert got == 2


def test_a_row_that_links_out_of_the_store_loses_only_the_link(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, 2)
    outside = tmp_path / "elsewhere"
    row_dir = Path(store.row_dir(0))
    shutil.move(row_dir, outside)
    row_dir.symlink_to(outside, target_is_directory=True)
    before = {f: (outside / f).read_bytes() for f in _files(outside)}
    assert row_status(store, 0).committed  # seen through the link: retention picks it
    for rank in range(WORLD):
        prune(store, SequentialComm(rank, WORLD), 1)
    assert not os.path.lexists(row_dir) and store.rows() == [1]
    assert {f: (outside / f).read_bytes() for f in _files(outside)} == before


def test_a_data_directory_that_links_out_is_not_followed(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, 1)
    outside = tmp_path / "elsewhere"
    data_dir = Path(store.data_dir(0))
    shutil.move(data_dir, outside)
    data_dir.symlink_to(outside, target_is_directory=True)
    before = _files(outside)
    remove_own_part(store, 0, 1)
    assert not os.path.exists(store.manifest_path(0, 1))  # its commit is withdrawn
    remove_row_rest(store, 0)
    assert store.rows() == [] and _files(outside) == before
