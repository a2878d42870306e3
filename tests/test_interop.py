"""Every array of a row is a valid zarr v3 array: zarr-python and tensorstore read the exact bytes.

Arrays are found the documented way: through the rank manifest's ``arrays`` list, each entry
naming its array directory relative to the row directory.
"""

from __future__ import annotations

import contextvars
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr

import distckpt
from distckpt.format.dtypes import supported_dtypes
from distckpt.format.layout import MANIFESTS_DIR, ROWS_DIR, manifest_name, rank_dir_name, row_name
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

DTYPES = supported_dtypes()
NATIVE_ZARR_TYPES = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_zarr(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path), mode="r")[...])


def read_tensorstore(path: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


READERS = [pytest.param(read_zarr, id="zarr"), pytest.param(read_tensorstore, id="tensorstore")]


def as_torch(array: np.ndarray, dtype: torch.dtype, shape) -> torch.Tensor:
    """What a plain reader does with a declared dtype: view the raw ints as that dtype."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if t.dtype != dtype:
        t = t.view(dtype)
    return t.reshape(shape)


@dataclass(frozen=True)
class SavedRow:
    row_dir: Path
    manifest: dict
    state: dict

    def entry(self, name: str) -> dict:
        (found,) = [a for a in self.manifest["arrays"] if a["name"] == name]
        return found

    def array_dir(self, name: str) -> Path:
        return self.row_dir / self.entry(name)["array"]


def open_row(store: Path, row: int, state: dict) -> SavedRow:
    row_dir = store / ROWS_DIR / row_name(row)
    manifest = json.loads((row_dir / MANIFESTS_DIR / manifest_name(0)).read_text())
    return SavedRow(row_dir, manifest, state)


def large_shape(dtype: torch.dtype) -> tuple[int, int]:
    return (DEFAULT_PACK_THRESHOLD // (32 * dtype.itemsize) + 1, 32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SavedRow:
    """One row holding a large and a small tensor of every dtype, plus edge shapes."""
    state: dict = {"large": {}, "small": {}}
    for i, dtype in enumerate(DTYPES):
        state["large"][dtype_id(dtype)] = random_bits(large_shape(dtype), dtype, seed=i)
        state["small"][dtype_id(dtype)] = random_bits((3, 5), dtype, seed=100 + i)
    state["small"]["scalar"] = torch.tensor(-2.5, dtype=torch.float64)
    state["small"]["empty"] = torch.empty(0, 3)
    state["small"]["bf16_scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    store = tmp_path_factory.mktemp("interop") / "store"
    row = distckpt.save(state, store)
    return open_row(store, row, state)


# -- large tensors: arrays of their own ------------------------------------------------------


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_tensor_array_reads_back_exactly(saved, dtype, read):
    name = f"large/{dtype_id(dtype)}"
    want = saved.state["large"][dtype_id(dtype)]
    path = saved.array_dir(name)
    assert not saved.entry(name)["array"].endswith("/packed")

    got = read(path)
    assert got.shape == tuple(want.shape)
    assert np.ascontiguousarray(got).tobytes() == raw(want)
    assert torch.equal(
        as_torch(got, dtype, want.shape).reshape(-1).view(torch.uint8),
        want.reshape(-1).view(torch.uint8),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_array_document_declares_dtype_and_crc32c(saved, dtype):
    name = f"large/{dtype_id(dtype)}"
    doc = json.loads((saved.array_dir(name) / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "array"
    assert doc["attributes"]["distckpt"]["dtype"] == dtype_id(dtype)
    assert doc["attributes"]["distckpt"]["name"] == name
    if dtype in NATIVE_ZARR_TYPES:
        assert doc["data_type"] == NATIVE_ZARR_TYPES[dtype]
    else:  # bfloat16, float8, ...: raw unsigned ints of the same width
        assert doc["data_type"] == f"uint{8 * dtype.itemsize}"
    assert "crc32c" in [c["name"] for c in doc["codecs"]]


def test_every_array_in_the_manifest_declares_crc32c(saved):
    arrays = {a["array"] for a in saved.manifest["arrays"]}
    assert len(arrays) == len(DTYPES) + 1  # every large tensor, plus the pack
    for array in arrays:
        doc = json.loads((saved.row_dir / array / "zarr.json").read_text())
        names = [c["name"] for c in doc["codecs"]]
        assert names[-1] == "crc32c", f"{array}: {names}"


def test_chunk_trailer_is_the_crc32c_of_the_data(saved):
    """The zarr v3 crc32c codec: the last 4 bytes are the little-endian CRC-32C of the rest."""
    name = "large/float32"
    chunk = [p for p in saved.array_dir(name).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunk) == 1
    data = chunk[0].read_bytes()
    assert data[:-4] == raw(saved.state["large"]["float32"])
    assert int.from_bytes(data[-4:], "little") == crc32c.crc32c(data[:-4])


# -- the packed array ------------------------------------------------------------------------


@pytest.mark.parametrize("read", READERS)
def test_packed_array_locates_every_small_tensor(saved, read):
    small = saved.state["small"]
    packed_dirs = {saved.entry(f"small/{k}")["array"] for k in small}
    assert len(packed_dirs) == 1
    (packed,) = packed_dirs
    assert packed.endswith("/packed")

    doc = json.loads((saved.row_dir / packed / "zarr.json").read_text())
    assert doc["data_type"] == "uint8" and len(doc["shape"]) == 1
    index = {e["name"]: e for e in doc["attributes"]["distckpt"]["packed"]}
    assert set(index) == {f"small/{k}" for k in small}

    data = read(saved.row_dir / packed)
    assert data.dtype == np.uint8 and data.ndim == 1
    for key, want in small.items():
        e = index[f"small/{key}"]
        dtype = getattr(torch, e["dtype"])
        assert dtype == want.dtype
        assert e["shape"] == list(want.shape)
        assert e["nbytes"] == want.numel() * want.element_size()
        # The manifest and the array's own attributes agree on where the tensor lies.
        m = saved.entry(f"small/{key}")
        assert (m["offset"], m["nbytes"]) == (e["offset"], e["nbytes"])
        piece = data[e["offset"] : e["offset"] + e["nbytes"]]
        assert piece.tobytes() == raw(want)
        got = as_torch(piece, torch.uint8, (-1,)).view(dtype).reshape(e["shape"])
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("read", READERS)
def test_packed_array_of_only_empty_tensors_is_valid(tmp_path, read):
    state = {"e": {"a": torch.empty(0, 3), "b": torch.empty(2, 0, dtype=torch.bfloat16)}}
    store = tmp_path / "s"
    row = open_row(store, distckpt.save(state, store), state)
    got = read(row.array_dir("e/a"))
    assert got.shape == (0,)


# -- 0-d and empty tensors as arrays of their own ------------------------------------------


@dataclass
class EdgeShapes:
    scalar: torch.Tensor = field(default_factory=lambda: torch.tensor(3.25))
    int_scalar: torch.Tensor = field(default_factory=lambda: torch.tensor(-7, dtype=torch.int64))
    bf16_scalar: torch.Tensor = field(
        default_factory=lambda: torch.tensor(-1.5, dtype=torch.bfloat16)
    )
    empty: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3))
    empty_mid: torch.Tensor = field(default_factory=lambda: torch.empty(3, 0, 2, dtype=torch.int16))
    bool_vec: torch.Tensor = field(default_factory=lambda: torch.tensor([True, False, True]))


def _save_edge_shapes(store: Path) -> int:
    ckpt = distckpt.Checkpoint("edges", path=store, pack_threshold=0)  # every tensor its own array
    with ckpt as session:
        distckpt.bind_checkpoint_state(EdgeShapes(), state_id="edge")
        entry = session.write()
    assert entry is not None
    return entry.row


@pytest.fixture(scope="module")
def edge_row(tmp_path_factory) -> SavedRow:
    store = tmp_path_factory.mktemp("edges") / "store"
    row = contextvars.copy_context().run(_save_edge_shapes, store)
    values = EdgeShapes()
    state = {f"edge/{k}": getattr(values, k) for k in values.__dataclass_fields__}
    return open_row(store, row, state)


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("field_name", list(EdgeShapes.__dataclass_fields__))
def test_zero_dim_and_empty_tensors_are_valid_arrays(edge_row, field_name, read):
    name = f"edge/{field_name}"
    want = edge_row.state[name]
    assert not edge_row.entry(name)["array"].endswith("/packed")
    got = read(edge_row.array_dir(name))
    assert got.shape == tuple(want.shape)
    assert np.ascontiguousarray(got).tobytes() == raw(want)
    assert torch.equal(as_torch(got, want.dtype, want.shape), want)


def test_rank_group_lists_its_arrays(saved):
    group = zarr.open_group(str(saved.row_dir / rank_dir_name(0)), mode="r")
    members = {f"{rank_dir_name(0)}/{name}" for name, _ in group.arrays()}
    assert members == {a["array"] for a in saved.manifest["arrays"]}


@pytest.mark.filterwarnings("ignore:Object at rows is not recognized")
def test_store_root_hierarchy_reaches_every_array(saved):
    store = saved.row_dir.parent.parent
    root = zarr.open_group(str(store), mode="r")
    names = {name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
    row_prefix = f"{ROWS_DIR}/{saved.row_dir.name}/"
    assert {row_prefix + a["array"] for a in saved.manifest["arrays"]} <= names
