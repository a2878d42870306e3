"""The fast I/O path: the checksum switch, in-place loads, concurrent chunk reads/writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr
from click.testing import CliRunner

import distckpt
from distckpt.cli import cli
from distckpt.format.layout import MANIFESTS_DIR, ROWS_DIR, manifest_name, row_name
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD

BIG = DEFAULT_PACK_THRESHOLD // 4 + 10  # float32 elements: an array of its own


def make_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "big": torch.randn(BIG, generator=gen),
            "big2": torch.randn(3, BIG, generator=gen).to(torch.bfloat16),
            "small": torch.randn(5, 7, generator=gen),
            "ints": torch.arange(11, dtype=torch.int64) * (seed + 1),
        },
        "step": seed,
    }


def zeros_like(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": -1}


def manifest(store: Path, row: int) -> dict:
    path = store / ROWS_DIR / row_name(row) / MANIFESTS_DIR / manifest_name(0)
    return json.loads(path.read_text())


def chunk_of(store: Path, row: int, name: str) -> Path:
    (entry,) = [a for a in manifest(store, row)["arrays"] if a["name"] == name]
    array = store / ROWS_DIR / row_name(row) / entry["array"]
    (chunk,) = [p for p in array.iterdir() if p.name != "zarr.json"]
    return chunk


def corrupt_big_chunk(store: Path) -> None:
    """Save a row, then flip one byte of its ``model/big`` chunk."""
    row = distckpt.save(make_state(5), store)
    chunk = chunk_of(store, row, "model/big")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x5A
    chunk.write_bytes(bytes(data))


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- checksums off ---------------------------------------------------------------------------


def test_save_without_checksums_records_none_and_round_trips(tmp_path):
    state = make_state(1)
    row = distckpt.save(state, tmp_path / "s", checksums=False)
    assert all(a["crc32c"] is None for a in manifest(tmp_path / "s", row)["arrays"])
    live = zeros_like(state)
    distckpt.load(live, tmp_path / "s")
    assert live["step"] == 1
    for k, v in state["model"].items():
        assert torch.equal(live["model"][k], v)


def test_chunks_without_checksums_have_no_trailer_and_stay_valid_zarr(tmp_path):
    state = make_state(2)
    store = tmp_path / "s"
    row = distckpt.save(state, store, checksums=False)
    chunk = chunk_of(store, row, "model/big")
    doc = json.loads((chunk.parent / "zarr.json").read_text())
    (sharding,) = doc["codecs"]  # no crc32c over the data: each range has its own
    assert sharding["configuration"]["codecs"] == [{"name": "bytes"}]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(chunk.parent)}}
    got_ts = np.asarray(ts.open(spec, read=True).result().read().result())[0]
    got_zarr = np.asarray(zarr.open_array(str(chunk.parent), mode="r")[...])[0]
    stored = (
        manifest(store, row)["data_bytes"]
        - (doc["shape"][1] // sharding["configuration"]["chunk_shape"][1]) * 16
        - 4
    )
    assert got_ts.tobytes() == got_zarr.tobytes()
    assert got_zarr[:stored].tobytes() == chunk.read_bytes()[:stored]  # the bytes as written
    index = {e["name"]: e for e in manifest(store, row)["arrays"]}
    for name in ("big", "ints"):
        e = index[f"model/{name}"]
        assert got_zarr[e["offset"] : e["offset"] + e["nbytes"]].tobytes() == raw(
            state["model"][name]
        )


def test_rows_with_and_without_checksums_mix_in_one_store(tmp_path):
    store = tmp_path / "s"
    distckpt.save(make_state(1), store, checksums=False)
    row = distckpt.save(make_state(2), store)
    assert all(isinstance(a["crc32c"], int) for a in manifest(store, row)["arrays"])
    live = zeros_like(make_state(0))
    distckpt.load(live, store, row=row - 1)
    assert torch.equal(live["model"]["ints"], make_state(1)["model"]["ints"])


def test_verify_says_a_row_without_checksums_cannot_be_verified(tmp_path):
    store = tmp_path / "s"
    distckpt.save(make_state(1), store, checksums=False)
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    assert "checksums off" in result.output and "4 tensors" in result.output
    result = CliRunner().invoke(cli, ["verify", str(store), "--json"])
    assert json.loads(result.output)["rows"][0]["unchecksummed"] == 4


def test_truncated_chunk_is_still_caught_without_checksums(tmp_path):
    store = tmp_path / "s"
    row = distckpt.save(make_state(1), store, checksums=False)
    chunk = chunk_of(store, row, "model/big")
    (big,) = [a for a in manifest(store, row)["arrays"] if a["name"] == "model/big"]
    chunk.write_bytes(chunk.read_bytes()[: big["offset"] + big["nbytes"] - 8])
    with pytest.raises(distckpt.CorruptCheckpointError, match=r"the file is .* manifest says"):
        distckpt.load(zeros_like(make_state(0)), store)


# -- in-place loads --------------------------------------------------------------------------


def test_in_place_load_fills_the_live_tensors_memory(tmp_path):
    state = make_state(3)
    distckpt.save(state, tmp_path / "s")
    live = zeros_like(state)
    pointers = {k: v.data_ptr() for k, v in live["model"].items()}
    distckpt.load(live, tmp_path / "s", in_place=True)
    for k, v in state["model"].items():
        assert live["model"][k].data_ptr() == pointers[k]
        assert torch.equal(live["model"][k], v)
    assert live["step"] == 3


def test_in_place_load_into_non_contiguous_target_goes_through_a_copy(tmp_path):
    state = {"w": torch.randn(64, 32)}
    distckpt.save(state, tmp_path / "s")
    base = torch.zeros(32, 64)
    live = {"w": base.t()}  # a strided view: cannot take the file's bytes directly
    distckpt.load(live, tmp_path / "s", in_place=True)
    assert torch.equal(base.t(), state["w"])


def test_in_place_load_refuses_a_misfit_before_touching_anything(tmp_path):
    state = make_state(4)
    distckpt.save(state, tmp_path / "s")
    live = zeros_like(state)
    live["model"]["small"] = torch.zeros(5, 8)  # wrong shape, listed after "big"
    with pytest.raises(distckpt.CheckpointStateSchemaError, match="model/small"):
        distckpt.load(live, tmp_path / "s", in_place=True)
    assert not live["model"]["big"].any() and not live["model"]["small"].any()


def test_in_place_load_of_a_corrupted_chunk_raises(tmp_path):
    store = tmp_path / "s"
    corrupt_big_chunk(store)
    live = zeros_like(make_state(0))
    with pytest.raises(distckpt.CorruptCheckpointError, match="model/big"):
        distckpt.load(live, store, in_place=True)
    assert live["step"] == -1  # non-tensor values are only merged after every check


def test_default_load_of_a_corrupted_chunk_leaves_live_tensors_untouched(tmp_path):
    store = tmp_path / "s"
    corrupt_big_chunk(store)
    live = zeros_like(make_state(0))
    with pytest.raises(distckpt.CorruptCheckpointError):
        distckpt.load(live, store)
    assert all(not v.any() for v in live["model"].values())


def test_many_arrays_read_concurrently_come_back_in_their_places(tmp_path):
    gen = torch.Generator().manual_seed(7)
    state = {f"t{i}": torch.randn(BIG + i, generator=gen) for i in range(9)}
    distckpt.save(state, tmp_path / "s")
    for in_place in (False, True):
        live = {k: torch.zeros_like(v) for k, v in state.items()}
        distckpt.load(live, tmp_path / "s", in_place=in_place)
        for k, v in state.items():
            assert torch.equal(live[k], v), (k, in_place)
