"""A load that fails leaves the live state as it was (default ``in_place=False``).

Each case damages one thing of a saved row (a manifest number, a chunk's bytes, a file) and
checks that ``load`` raises a distckpt error while every live tensor, including those read
before the damaged one, still holds its value from before the load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CheckpointError
from distckpt.format import checked
from distckpt.format.layout import MANIFESTS_DIR, ROWS_DIR, manifest_name, row_name
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD
from distckpt.storage.store import Store

ROW = 5


def make_state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    return {
        "model": {
            # Own arrays (above the pack threshold), filled straight into live memory.
            "w_big": torch.randn(DEFAULT_PACK_THRESHOLD // 4 + 64, generator=gen),
            "w_big2": torch.randn(DEFAULT_PACK_THRESHOLD // 4 + 32, generator=gen),
            # Packed: one chunk shared by several small tensors.
            "a": torch.randn(16, generator=gen),
            "b": torch.arange(24, dtype=torch.int64),
            "z": torch.randn(8, generator=gen),
        },
        "step": 7,
    }


def sentinel_state() -> dict[str, Any]:
    """A live state of the same structure holding other values than the row's."""
    return {
        "model": {k: torch.full_like(v, 3) for k, v in make_state()["model"].items()},
        "step": -1,
    }


def manifest_path(store: Path) -> Path:
    return store / ROWS_DIR / row_name(ROW) / MANIFESTS_DIR / manifest_name(0)


def edit_entry(store: Path, name: str, **changes: Any) -> None:
    """Change fields of one manifest entry (a JSON-valid edit, as a hostile user would)."""
    path = manifest_path(store)
    doc = json.loads(path.read_text())
    (entry,) = [a for a in doc["arrays"] if a["name"] == name]
    entry.update(changes)
    path.write_bytes(checked.seal(doc))  # resealed: the checksum does not catch this edit


def chunk_of(store: Path, name: str) -> Path:
    doc = json.loads(manifest_path(store).read_text())
    (entry,) = [a for a in doc["arrays"] if a["name"] == name]
    array = store / ROWS_DIR / row_name(ROW) / entry["array"]
    (chunk,) = [p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json"]
    return chunk


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def damage(store: Path, how: str) -> None:
    if how == "nbytes_zero_packed":  # the case that used to overwrite model/w_big
        edit_entry(store, "model/z", nbytes=0)
    elif how == "nbytes_zero_own":
        edit_entry(store, "model/w_big2", nbytes=0)
    elif how == "offset_beyond_pack":
        edit_entry(store, "model/z", offset=1 << 20)
    elif how == "wrong_shape":
        doc = json.loads(manifest_path(store).read_text())
        (entry,) = [a for a in doc["arrays"] if a["name"] == "model/z"]
        edit_entry(store, "model/z", shape=[2, 4], nbytes=entry["nbytes"])
    elif how == "checksum_own":
        flip(chunk_of(store, "model/w_big2"), 100)
    elif how == "checksum_packed":
        doc = json.loads(manifest_path(store).read_text())
        (entry,) = [a for a in doc["arrays"] if a["name"] == "model/z"]
        flip(chunk_of(store, "model/z"), entry["offset"])
    elif how == "missing_file":
        chunk_of(store, "model/w_big2").unlink()
    elif how == "truncated_own":
        chunk = chunk_of(store, "model/w_big2")
        os.truncate(chunk, chunk.stat().st_size // 2)
    elif how == "truncated_pack":
        chunk = chunk_of(store, "model/z")
        os.truncate(chunk, chunk.stat().st_size - 6)
    else:
        raise AssertionError(how)


def assert_unchanged(live: dict[str, Any], before: dict[str, Any]) -> None:
    assert live["step"] == before["step"]
    assert set(live["model"]) == set(before["model"])
    for k, v in before["model"].items():
        assert torch.equal(live["model"][k], v), f"{k} was modified by a failed load"


CASES = [
    "nbytes_zero_packed",
    "nbytes_zero_own",
    "offset_beyond_pack",
    "wrong_shape",
    "checksum_own",
    "checksum_packed",
    "missing_file",
    "truncated_own",
    "truncated_pack",
]


# A row saved without checksums cannot detect flipped bytes: those cases need checksums.
MATRIX = [
    pytest.param(how, checksums, id=f"{how}-{'crc' if checksums else 'nocrc'}")
    for how in CASES
    for checksums in (True, False)
    if checksums or not how.startswith("checksum")
]


@pytest.mark.parametrize(("how", "checksums"), MATRIX)
def test_failed_load_leaves_every_live_tensor_as_it_was(tmp_path, how, checksums):
    store = tmp_path / "s"
    distckpt.save(make_state(), store, row=ROW, checksums=checksums)
    damage(store, how)
    live = sentinel_state()
    before = {"model": {k: v.clone() for k, v in live["model"].items()}, "step": -1}
    with pytest.raises(CheckpointError):
        distckpt.load(live, store, row=ROW)
    assert_unchanged(live, before)


def test_the_nbytes_case_is_refused_by_verify_before_any_read_into_live(tmp_path):
    """The packed entry with ``nbytes`` 0 names the tensor; the big array keeps its value."""
    store = tmp_path / "s"
    distckpt.save(make_state(), store, row=ROW)
    edit_entry(store, "model/z", nbytes=0)
    live = sentinel_state()
    with pytest.raises(CheckpointError, match="model/z"):
        distckpt.load(live, store, row=ROW)
    assert torch.equal(live["model"]["w_big"], sentinel_state()["model"]["w_big"])


def test_failed_load_of_global_arrays_leaves_the_first_one_as_it_was(tmp_path):
    """Global regions are staged and verified before any is copied into live memory."""
    store = tmp_path / "s"
    first = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    second = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    distckpt.save(
        {
            "a": distckpt.Sharded(first, (4, 3), (0, 0)),
            "b": distckpt.Sharded(second, (4, 2), (0, 0)),
        },
        store,
    )
    # b's piece is a byte range of rank 0's shard of the row's data array.
    (piece,) = next(g for g in Store(store).read_manifest(0, 0).globals if g.name == "b").pieces
    chunk = Path(Store(store).data_file(0, 0))
    flip(chunk, piece.offset)
    live = {"a": torch.full((4, 3), 9.0), "b": torch.full((4, 2), 9.0)}
    with pytest.raises(CheckpointError, match="'b'"):
        distckpt.load(live, store, row=0)
    assert torch.equal(live["a"], torch.full((4, 3), 9.0))
    assert torch.equal(live["b"], torch.full((4, 2), 9.0))
    flip(chunk, piece.offset)  # repaired: the same live state now loads
    distckpt.load(live, store, row=0)
    assert torch.equal(live["a"], first) and torch.equal(live["b"], second)
