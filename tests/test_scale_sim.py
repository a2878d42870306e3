"""The scale simulation (``python -m benchmarks --cases scale``): its counts hold together,
its extrapolation from sampled ranks matches a full run, and the counting backend drops
data bytes while keeping the namespace."""

from __future__ import annotations

import pytest

from benchmarks.scale import METADATA_OPS, format_scale_table, sampled_ranks, simulate
from distckpt.storage.counting import CountingFileSystem


@pytest.fixture(scope="module")
def full() -> dict:
    return simulate(8, layers=0)  # embeddings, final norm and lm_head: 9 global tensors


def test_counts_are_consistent(full: dict) -> None:
    world = 8
    by_ranks = full["save_by_ranks"]
    assert full["files_written_by_ranks"] == by_ranks["creates"] - by_ranks["unlinks"]
    assert full["files_written_by_ranks"] > world * full["tensors"]  # chunks of every tensor
    # election: each rank reads its own manifest; load: its own, then every manifest
    assert full["elect_manifest_reads"] == world
    assert full["load_manifest_reads"] == world + world * world
    # the load planner reads every chunk once (Shard(0) at the same world size) plus each
    # rank's packed array of step counters
    chunk_files = full["files_written_by_ranks"] - 4 * world  # rank group, pack, 2 documents
    assert full["load_data_opens"] == chunk_files - full["tensors"] + world
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
