"""The data array of a row (format 3): files per rank bounded, the README's plain-zarr recipe,
the zarr export view, the row index and the election's bounded manifest reads (all in one
process, no launches)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr
from click.testing import CliRunner
from fakes import RecordingFS, replay_job

import distckpt
from distckpt import Store
from distckpt.cli import cli
from distckpt.dist.comm import KnownRanks
from distckpt.dist.election import elect
from distckpt.errors import StoreFormatError
from distckpt.format import checked
from distckpt.format.layout import MANIFEST_VERSION
from distckpt.format.manifest import RankManifest
from distckpt.format.names import escape_component
from distckpt.io import dataio
from distckpt.storage.filesystem import LocalFileSystem

README = Path(__file__).resolve().parents[1] / "README.md"
ROWS = 9  # uneven over 2 ranks (5 + 4) and over 3 (3 + 3 + 3)


def _full(name: str) -> torch.Tensor:
    if name == "w":
        return torch.arange(ROWS * 6, dtype=torch.float32).reshape(ROWS, 6)
    return torch.arange(ROWS, dtype=torch.int64) * 7


def _split(rank: int, world: int) -> tuple[int, int]:
    step = -(-ROWS // world)
    start = min(ROWS, rank * step)
    return start, min(ROWS, start + step)


class _CountingFS(LocalFileSystem):
    def __init__(self) -> None:
        self.opened: list[str] = []

    def read_bytes(self, path: str) -> bytes:
        self.opened.append(path)
        return super().read_bytes(path)


class _ThreadComm(KnownRanks):
    """Ranks as threads of one process: allgather through a shared board."""

    def __init__(self, rank: int, size: int, board: list[Any], barrier: threading.Barrier):
        super().__init__(rank, size)
        self._board, self._barrier = board, barrier

    def barrier(self) -> None:
        self._barrier.wait()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        self._barrier.wait()
        self._board[self._rank] = data
        self._barrier.wait()
        out = list(self._board)
        self._barrier.wait()
        return out

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        got = self.allgather_bytes(data or b"")
        return got[root]


def save_threads(store: Path, world: int, make_state: Any) -> None:
    """One row written by ``world`` ranks running as threads (real gathers between them)."""
    board: list[Any] = [None] * world
    barrier = threading.Barrier(world)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            comm = _ThreadComm(rank, world, board, barrier)
            distckpt.save(make_state(rank), Store(store), comm=comm)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    distckpt.storage.lease.release(Store(store))


def _state(rank: int, world: int, tensors: int = 64) -> dict[str, Any]:
    a, b = _split(rank, world)
    w, v = _full("w"), _full("v")
    return {
        "model": {
            **{f"t{i}": torch.full((4, 4), float(i + rank)) for i in range(tensors)},
            "big": torch.arange(300_000, dtype=torch.float32) + rank,
            "w": distckpt.Sharded(w[a:b].clone(), tuple(w.shape), (a, 0)),
            "v": distckpt.Sharded(v[a:b].clone(), tuple(v.shape), (a,)),
            "half": torch.arange(6, dtype=torch.bfloat16),
        },
        "step": 3,
    }


def test_files_per_rank_stay_bounded_however_many_tensors_and_shards(tmp_path):
    for tensors in (4, 64):
        store = Store(tmp_path / f"s{tensors}")
        save_threads(store.path, 3, lambda r, n=tensors: _state(r, 3, n))
        row_dir = Path(store.row_dir(0))
        shards = [f"c.{rank}.0" for rank in range(3)]
        assert sorted(os.listdir(row_dir / "data")) == [*shards, "zarr.json"]
        # Per row: the row's zarr.json, index.json, manifests/zarr.json, data/zarr.json; per
        # rank 2 files (its shard and its manifest); no directory per rank.
        files = [f for _, _, names in os.walk(row_dir) for f in names]
        dirs = [d for _, names, _ in os.walk(row_dir) for d in names]
        assert (len(files), sorted(dirs)) == (4 + 3 * 2, ["data", "manifests"])


def _recipe() -> str:
    text = README.read_text()
    block = re.search(r"<!-- recipe: plain zarr -->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "the README's plain-zarr recipe is missing"
    return block.group(1)


def test_the_readme_recipe_reads_every_tensor_with_zarr_alone(tmp_path):
    store = tmp_path / "store"
    save_threads(store, 2, lambda r: _state(r, 2))
    code = _recipe()
    # The recipe as written, pointed at this store.
    code, n = re.subn(r'^store = ".*?"', f"store = {str(store)!r}", code, flags=re.M)
    assert n == 1
    scope: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), scope)
    np.testing.assert_array_equal(scope["global_tensor"]("model/w"), _full("w").numpy())
    np.testing.assert_array_equal(scope["global_tensor"]("model/v"), _full("v").numpy())
    for rank in (0, 1):
        got = scope["tensor"]("model/t5", rank)
        np.testing.assert_array_equal(got, np.full((4, 4), 5.0 + rank, dtype=np.float32))
    big = scope["tensor"]("model/big", 1)
    np.testing.assert_array_equal(big, np.arange(300_000, dtype=np.float32) + 1)
    bits = scope["tensor"]("model/half").view(np.uint16)  # bfloat16 (ml_dtypes) or raw words
    assert torch.equal(torch.from_numpy(bits.copy()).view(torch.bfloat16), torch.arange(6.0))


def test_zarr_and_tensorstore_read_the_data_array_alike(tmp_path):
    store = Store(tmp_path / "store")
    save_threads(store.path, 2, lambda r: _state(r, 2, 8))
    path = store.data_dir(0)
    via_zarr = np.asarray(zarr.open_array(path, mode="r")[...])
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    via_ts = ts.open(spec, read=True).result().read().result()
    assert via_zarr.dtype == np.uint8 and np.array_equal(via_zarr, via_ts)
    assert via_zarr.shape[0] == 2
    for rank in range(2):  # each rank's bytes, as its shard file stores them, then zeros
        raw = (Path(path) / f"c.{rank}.0").read_bytes()
        manifest = Store(store.path).read_manifest(0, rank)
        end = max(a.offset + a.nbytes for a in manifest.arrays)
        assert via_zarr[rank, :end].tobytes() == raw[:end]
        assert not via_zarr[rank, len(raw) :].any()


def test_export_writes_one_zarr_array_per_logical_tensor(tmp_path):
    store = tmp_path / "store"
    save_threads(store, 3, lambda r: _state(r, 3, 2))
    dest = tmp_path / "view"
    result = CliRunner().invoke(cli, ["export", str(store), str(dest), "--format", "zarr"])
    assert result.exit_code == 0, result.output
    for name in ("w", "v"):
        got = zarr.open_array(str(dest / escape_component(f"model/{name}")), mode="r")[...]
        np.testing.assert_array_equal(np.asarray(got), _full(name).numpy())
    # rank-private tensors keep their rank
    t1 = zarr.open_array(str(dest / "rank_000002" / escape_component("model/t1")), mode="r")
    np.testing.assert_array_equal(np.asarray(t1[...]), np.full((4, 4), 3.0, dtype=np.float32))
    again = CliRunner().invoke(cli, ["export", str(store), str(dest), "--format", "zarr"])
    assert again.exit_code != 0 and "exists" in again.output


def _mixed(rank: int, world: int) -> dict[str, Any]:
    """w split as torch splits it (the index records the rule), v all on rank 0 (listed)."""
    a, b = _split(rank, world)
    w, v = _full("w"), _full("v")
    held = v if rank == 0 else v[:0]
    return {
        "w": distckpt.Sharded(w[a:b].clone(), tuple(w.shape), (a, 0)),
        "v": distckpt.Sharded(held.clone(), tuple(v.shape), (0 if rank == 0 else ROWS,)),
    }


def test_even_splits_are_indexed_by_their_rule_and_others_by_their_pieces(tmp_path):
    path = tmp_path / "store"
    save_threads(path, 3, lambda r: _mixed(r, 3))
    index = Store(path).read_index(0)
    assert index is not None
    assert index.globals["w"].even == 3 and not index.globals["w"].pieces
    assert not index.globals["v"].even and [p.rank for p in index.globals["v"].pieces] == [0]
    for world in (1, 2, 3):  # restored at other world sizes, read by regions
        for rank, comm in enumerate(replay_job(world)):
            a, b = _split(rank, world)
            target = {
                "w": distckpt.Sharded(torch.zeros(b - a, 6), (ROWS, 6), (a, 0)),
                "v": torch.zeros(ROWS, dtype=torch.int64),
            }
            distckpt.load(target, Store(path), comm=comm)
            assert torch.equal(target["w"].local, _full("w")[a:b])
            assert torch.equal(target["v"], _full("v"))


def test_a_tensor_split_evenly_on_some_ranks_only_has_every_box_checked(tmp_path):
    # rank 0 holds its even split of v, rank 1 the whole of v: the even digests differ,
    # every box is gathered, and the overlap is refused on every rank.
    def state(rank: int) -> dict[str, Any]:
        v = _full("v")
        a, b = _split(0, 2) if rank == 0 else (0, ROWS)
        return {"v": distckpt.Sharded(v[a:b].clone(), tuple(v.shape), (a,))}

    with pytest.raises(distckpt.CheckpointError, match=r"'v'.*overlap"):
        save_threads(tmp_path / "store", 2, state)
    assert distckpt.latest(tmp_path / "store") is None


@pytest.mark.parametrize("saved, restored", [(2, 3), (3, 2)])
def test_a_region_reads_only_the_piece_blocks_it_overlaps(tmp_path, saved, restored, monkeypatch):
    monkeypatch.setattr(dataio, "BLOCK_BYTES", 6 * 4)  # one checksum block per row
    path = tmp_path / "store"
    save_threads(path, saved, lambda r: {"w": _state(r, saved)["model"]["w"]})
    for rank in range(restored):
        a, b = _split(rank, restored)
        target = distckpt.Sharded(torch.zeros(b - a, 6), (ROWS, 6), (a, 0))
        fs = RecordingFS()
        distckpt.load({"w": target}, Store(path, fs=fs))
        assert torch.equal(target.local, _full("w")[a:b])
        data = [n for p, _, n in fs.reads if "/data/c." in p]
        # exactly the region's bytes, nothing around them: checked in a streamed pass, then
        # read straight into the live piece (no staging copy of the region)
        assert sum(data) == 2 * (b - a) * 6 * 4


def _elect_as(store_path: Path, world: int) -> tuple[list[int | None], list[list[str]]]:
    board: list[Any] = [None] * world
    barrier = threading.Barrier(world)
    results: list[int | None] = [None] * world
    opened: list[list[str]] = [[] for _ in range(world)]

    def run(rank: int) -> None:
        fs = _CountingFS()
        results[rank] = elect(Store(store_path, fs=fs), _ThreadComm(rank, world, board, barrier))
        opened[rank] = fs.opened

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, opened


def test_election_reads_one_manifest_per_rank_however_many_rows(tmp_path):
    store = tmp_path / "store"
    for _ in range(6):
        save_threads(store, 2, lambda r: {"x": torch.full((2,), float(r))})
    elected, opened = _elect_as(store, 2)
    assert elected == [5, 5]
    for rank, paths in enumerate(opened):
        manifests = [p for p in paths if "/manifests/" in p]
        assert manifests == [Store(store).manifest_path(5, rank)]


def test_a_damaged_manifest_of_an_indexed_row_is_still_not_elected(tmp_path):
    store = tmp_path / "store"
    for _ in range(3):
        save_threads(store, 2, lambda r: {"x": torch.full((2,), float(r))})
    os.remove(Store(store).manifest_path(2, 1))
    elected, _ = _elect_as(store, 2)
    assert elected == [1, 1]


def test_a_newer_manifest_version_is_refused_naming_both(tmp_path):
    distckpt.save({"x": torch.ones(2)}, tmp_path)
    path = Store(tmp_path).manifest_path(0, 0)
    doc = json.loads(Path(path).read_bytes())
    doc["distckpt_manifest"] = MANIFEST_VERSION + 1
    both = rf"version {MANIFEST_VERSION + 1}.*version {MANIFEST_VERSION}"
    with pytest.raises(StoreFormatError, match=both):
        RankManifest.from_json(checked.seal(doc), where=path)  # a newer writer seals too
