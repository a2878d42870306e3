"""The scale simulation (``python -m benchmarks --cases scale``): its counts hold together,
its extrapolation from sampled ranks matches a full run, and the counting backend drops
data bytes while keeping the namespace."""

from __future__ import annotations

import pytest

from benchmarks.scale import METADATA_OPS, _report, format_scale_table, sampled_ranks, simulate
from distckpt.format.rowindex import RowIndex
from distckpt.format.shards import EvenLayout
from distckpt.io import globalio
from distckpt.io.dataio import build_index, piece_slots
from distckpt.io.globalio import index_layouts
from distckpt.storage.counting import CountingFileSystem


@pytest.fixture(scope="module")
def full() -> dict:
    return simulate(8, layers=0)  # embeddings, final norm and lm_head: 9 global tensors


def test_counts_are_consistent(full: dict) -> None:
    world = 8
    by_ranks = full["save_by_ranks"]
    # format 3: each rank creates its shard of the row's data array and its manifest and
    # no directory, however many tensors it saves (9 global, 3 own here); it fsyncs the
    # two files, no directory, and stats at most one path (is the row made here?)
    most = full["save_rank_max"]
    assert (most["creates"], most["mkdirs"], most["fsyncs"], most["stats"]) == (2, 0, 2, 1)
    assert full["files_written_by_ranks"] == by_ranks["creates"] - by_ranks["unlinks"] + 1
    # election: one manifest and one row index read per rank, not one per row or rank
    assert full["elect_manifest_reads"] == world and full["elect_index_reads"] == world
    # load: O(1) manifest and index reads per rank (not every rank's manifest)
    assert full["load_manifest_reads"] == world and full["load_index_reads"] == world
    # every rank reads its piece of each global tensor once, and its own small tensors (a
    # step counter per parameter, side by side) in one span, verified and filled from it
    assert full["load_data_opens"] == world * (full["tensors"] + 1)
    assert full["files_left"] == 2  # retention removed the row: the store's documents remain
    assert full["save_mds_s"] > 0 and not full["extrapolated"]
    assert "| 8 | distckpt |" in format_scale_table([full | {"load_mds_s": 0.0}])


def test_sampled_ranks_extrapolate_to_the_full_count(full: dict) -> None:
    sampled = simulate(8, sample=3, layers=0)
    assert sampled["extrapolated"] and sampled["simulated_ranks"] == 3
    assert sampled["save"]["bytes_written"] == pytest.approx(full["save"]["bytes_written"])
    for op in METADATA_OPS:  # bytes read (documents with timestamps, ...) are not estimated
        assert sampled["save"][op] == pytest.approx(full["save"][op]), op
        assert sampled["load"][op] == pytest.approx(full["load"][op]), op
        assert sampled["elect"][op] == pytest.approx(full["elect"][op]), op
    weights = sampled_ranks(10_000, 64)
    assert len(weights) == 64 and weights[0] == 1 and sum(weights.values()) == 10_000


def test_counting_backend_keeps_sizes_not_bytes() -> None:
    fs = CountingFileSystem()
    fs.makedirs("/s/d")
    fs.write_file("/s/d/c.0", [b"x" * 1000])
    fs.write_file("/s/d/zarr.json", [b"{}"], durable=False)
    assert fs.size("/s/d/c.0") == 1000 and fs.read_bytes("/s/d/c.0") == bytes(1000)
    assert fs.read_bytes("/s/d/zarr.json") == b"{}"
    ops = fs.counts().ops
    assert (ops["creates"], ops["mkdirs"], ops["fsyncs"], ops["bytes_written"]) == (2, 2, 1, 1002)
    fs.rmtree("/s")
    after = fs.counts().ops
    assert (after["unlinks"], after["rmdirs"]) == (2, 2) and fs.files() == 0


@pytest.mark.parametrize("even", [(), ("b", "c"), ("a", "b", "c")], ids=["listed", "mixed", "even"])
def test_the_row_index_places_every_piece_where_its_writer_put_it(even) -> None:
    # Whether the index lists a tensor's pieces or records its even split, the pieces a
    # reader places from it are exactly where each rank's own writer put them: uneven torch
    # splits, ranks holding nothing.
    keys = [("a", (10, 3)), ("b", (4097,)), ("c", (3, 5))]
    world = 7
    listed = [(k, s) for k, s in keys if k not in even]
    reports = [[_report(k, s, r, world) for k, s in listed] for r in range(world)]
    layouts = dict(globalio.layouts_of_boxes(reports)) if listed else {}
    layouts.update({k: EvenLayout(k, s, "float32", world) for k, s in keys if k in even})
    index = build_index(0, world, 0, layouts)
    assert all(bool(index.globals[k].even) == (k in even) for k, _ in keys)
    assert all(not index.globals[k].pieces for k in even)  # O(tensors), not O(ranks x tensors)
    placed = index_layouts(RowIndex.from_json(index.to_json()).globals, world)
    for rank in range(world):
        assert piece_slots(placed, rank) == piece_slots(layouts, rank), rank
    # torch splits 10 rows by 2 and 3 by 1: rank 6 holds only the last 581 of 4097
    assert [(s.key, s.box.lengths) for s in piece_slots(layouts, 6)] == [("b", (581,))]
