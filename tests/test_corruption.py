"""Damaged or foreign stores are refused with errors that say what is wrong and where."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.format import checked
from distckpt.format.layout import (
    DATA_ARRAY,
    FORMAT_VERSION,
    MANIFEST_VERSION,
    MANIFESTS_DIR,
    ROWS_DIR,
    manifest_name,
    row_name,
)
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD

ROW = 3  # an explicit row id, so "row 3" in a message cannot be confused with "rank 0"


def make_state() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {
            "big": torch.randn(DEFAULT_PACK_THRESHOLD // 4 + 100, generator=gen),  # own array
            "first": torch.randn(16, generator=gen),  # packed
            "second": torch.arange(40, dtype=torch.int64),  # packed
            "last": torch.randn(8, generator=gen).to(torch.bfloat16),  # packed
        },
        "step": 12,
    }


def zeros_like_state(state: dict) -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "step": 0,
    }


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    assert distckpt.save(make_state(), path, row=ROW) == ROW
    return path


def row_dir(store: Path) -> Path:
    return store / ROWS_DIR / row_name(ROW)


def manifest(store: Path) -> dict:
    return json.loads((row_dir(store) / MANIFESTS_DIR / manifest_name(0)).read_text())


def entry(store: Path, name: str) -> dict:
    (found,) = [a for a in manifest(store)["arrays"] if a["name"] == name]
    return found


def chunk_file(store: Path, name: str) -> Path:
    array = row_dir(store) / entry(store, name)["array"]
    (chunk,) = [p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json"]
    return chunk


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def assert_names_culprit(exc: BaseException, name: str) -> None:
    message = str(exc)
    assert re.search(rf"\brow {ROW}\b", message), message
    assert re.search(r"\brank 0\b", message), message
    assert name in message, message


# -- damaged chunks --------------------------------------------------------------------------


def test_intact_store_loads(store):
    """The baseline the damage tests depart from."""
    live = zeros_like_state(make_state())
    assert distckpt.load(live, store) == ROW
    for k, v in make_state()["model"].items():
        assert torch.equal(live["model"][k], v)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_byte_in_own_array_chunk(store, where):
    chunk = chunk_file(store, "model/big")
    nbytes = entry(store, "model/big")["nbytes"]
    offset = {"start": 0, "middle": nbytes // 2, "end": nbytes - 1}[where]
    flip_byte(chunk, offset)
    with pytest.raises(distckpt.CorruptCheckpointError) as info:
        distckpt.load({}, store)
    assert_names_culprit(info.value, "model/big")


@pytest.mark.parametrize("name", ["model/first", "model/second", "model/last"])
def test_flipped_byte_in_packed_chunk_names_the_tensor_hit(store, name):
    e = entry(store, name)
    assert e["array"] == DATA_ARRAY  # every tensor in the rank's shard of the data array
    flip_byte(chunk_file(store, name), e["offset"] + e["nbytes"] // 2)
    with pytest.raises(distckpt.CorruptCheckpointError) as info:
        distckpt.load({}, store)
    assert_names_culprit(info.value, name)
    others = {"model/first", "model/second", "model/last"} - {name}
    assert not any(f"'{other}'" in str(info.value) for other in others)


@pytest.mark.parametrize("name", ["model/big", "model/last"], ids=["own", "packed"])
@pytest.mark.parametrize("keep", [0, 1, "half", "no_trailer"])
def test_truncated_chunk(store, name, keep):
    chunk = chunk_file(store, name)
    size = chunk.stat().st_size
    new_size = {"half": size // 2, "no_trailer": size - 4}.get(keep, keep)
    os.truncate(chunk, new_size)
    with pytest.raises(distckpt.CorruptCheckpointError) as info:
        distckpt.load({}, store)
    # The manifest records the shard's size, so any cut is refused (also one that only
    # takes the shard index off the end), naming a tensor of the file (all the rank's).
    names = [a["name"] for a in manifest(store)["arrays"]]
    assert any(f"'{n}'" in str(info.value) for n in names), str(info.value)
    assert_names_culprit(info.value, "model/")


@pytest.mark.parametrize("name", ["model/big", "model/first"], ids=["own", "packed"])
def test_deleted_chunk(store, name):
    chunk_file(store, name).unlink()
    with pytest.raises(distckpt.CorruptCheckpointError) as info:
        distckpt.load({}, store)
    # The file held every tensor of the rank: the error names one of them.
    array = entry(store, name)["array"]
    lost = [a["name"] for a in manifest(store)["arrays"] if a["array"] == array]
    assert name in lost and any(f"'{n}'" in str(info.value) for n in lost), str(info.value)


def test_deleted_array_directory(store):
    import shutil

    shutil.rmtree(row_dir(store) / entry(store, "model/big")["array"])
    with pytest.raises(distckpt.CorruptCheckpointError) as info:
        distckpt.load({}, store)
    assert_names_culprit(info.value, "model/big")


@pytest.mark.parametrize(
    "damage",
    ["flip_big", "flip_last_packed", "truncate_packed", "delete_big"],
)
def test_failed_load_leaves_live_state_untouched(store, damage):
    """Load verifies everything before writing: nothing is half-restored."""
    if damage == "flip_big":
        flip_byte(chunk_file(store, "model/big"), 10)
    elif damage == "flip_last_packed":  # read last, after the other tensors were verified
        e = entry(store, "model/last")
        flip_byte(chunk_file(store, "model/last"), e["offset"])
    elif damage == "truncate_packed":
        chunk = chunk_file(store, "model/last")
        os.truncate(chunk, chunk.stat().st_size - 6)
    else:
        chunk_file(store, "model/big").unlink()

    sentinel = {k: torch.full_like(v, 3) for k, v in make_state()["model"].items()}
    live = {"model": {k: v.clone() for k, v in sentinel.items()}, "step": -1}
    tensors_before = {k: v.data_ptr() for k, v in live["model"].items()}
    with pytest.raises(distckpt.CorruptCheckpointError):
        distckpt.load(live, store)
    assert set(live) == {"model", "step"} and live["step"] == -1
    assert set(live["model"]) == set(sentinel)
    for k, v in sentinel.items():
        assert live["model"][k].data_ptr() == tensors_before[k]
        assert torch.equal(live["model"][k], v), f"{k} was modified by a failed load"


# -- foreign and future stores ---------------------------------------------------------------


def set_root_format(store: Path, version: int) -> None:
    root = store / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["distckpt"]["format"] = version
    root.write_text(json.dumps(doc))


def assert_mentions_versions(exc: BaseException, found: int, newest: int = FORMAT_VERSION) -> None:
    message = str(exc)
    assert re.search(rf"\b{found}\b", message), message
    assert re.search(rf"version {newest}\b", message), message


def test_newer_store_format_refused_by_load(store):
    set_root_format(store, 99)
    with pytest.raises(distckpt.StoreFormatError) as info:
        distckpt.load({}, store)
    assert_mentions_versions(info.value, 99)


def test_newer_store_format_refused_by_latest(store):
    set_root_format(store, 99)
    with pytest.raises(distckpt.StoreFormatError) as info:
        distckpt.latest(store)
    assert_mentions_versions(info.value, 99)


def test_newer_store_format_refused_by_save_without_writing(store):
    set_root_format(store, 99)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(distckpt.CheckpointError) as info:
        distckpt.save(make_state(), store)
    assert_mentions_versions(info.value, 99)
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_newer_store_format_refused_by_save_as_store_format_error(store):
    set_root_format(store, 99)
    with pytest.raises(distckpt.StoreFormatError) as info:
        distckpt.save(make_state(), store)
    assert_mentions_versions(info.value, 99)


@pytest.mark.parametrize("call", ["latest", "load"])
def test_newer_manifest_format_refused(store, call):
    path = row_dir(store) / MANIFESTS_DIR / manifest_name(0)
    doc = json.loads(path.read_text())
    doc["distckpt_manifest"] = 99
    path.write_bytes(checked.seal(doc))
    with pytest.raises(distckpt.StoreFormatError) as info:
        if call == "latest":
            distckpt.latest(store)
        else:
            distckpt.load({}, store)
    # Manifests have their own newest version (2: global arrays), above the store's.
    assert_mentions_versions(info.value, 99, MANIFEST_VERSION)


@pytest.fixture
def foreign_dir(tmp_path) -> Path:
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "notes.txt").write_text("not a checkpoint")
    (d / "data").mkdir()
    (d / "data" / "x.bin").write_bytes(b"\x00" * 16)
    return d


def listing(d: Path) -> list[tuple[str, bytes | None]]:
    return sorted(
        (str(p.relative_to(d)), p.read_bytes() if p.is_file() else None) for p in d.rglob("*")
    )


@pytest.mark.parametrize("call", ["load", "latest"])
def test_directory_that_is_not_a_store_is_refused(foreign_dir, call):
    with pytest.raises(distckpt.StoreFormatError, match="not a distckpt store"):
        if call == "load":
            distckpt.load({}, foreign_dir)
        else:
            distckpt.latest(foreign_dir)


def test_save_into_a_directory_that_is_not_a_store_writes_nothing(foreign_dir):
    before = listing(foreign_dir)
    with pytest.raises(distckpt.CheckpointError, match="not a distckpt store"):
        distckpt.save(make_state(), foreign_dir)
    assert listing(foreign_dir) == before


def test_save_into_a_directory_that_is_not_a_store_raises_store_format_error(foreign_dir):
    with pytest.raises(distckpt.StoreFormatError, match="not a distckpt store"):
        distckpt.save(make_state(), foreign_dir)


def test_load_of_missing_store_is_not_a_format_error(tmp_path):
    with pytest.raises(distckpt.NoCommittedRowError):
        distckpt.load({}, tmp_path / "nothing_here")
    assert distckpt.latest(tmp_path / "nothing_here") is None


def test_data_array_is_where_the_manifest_says(store):
    """The damage above hit real files: every tensor lies in the row's data array."""
    for a in manifest(store)["arrays"]:
        assert a["array"] == DATA_ARRAY
        assert (row_dir(store) / a["array"] / "zarr.json").is_file()
