"""Every array of a row is a valid zarr v3 array: zarr-python and tensorstore read the exact bytes.

Format 2: a rank's tensors are byte ranges of its one data array (``rank_NNNNNN``, 1-D uint8);
its attributes and the manifest agree on where each tensor lies.

Arrays are found the documented way: through the rank manifest's ``arrays`` list, each entry
naming its array directory relative to the row directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr

import distckpt
from distckpt.format.dtypes import supported_dtypes
from distckpt.format.layout import DATA_ARRAY, MANIFESTS_DIR, ROWS_DIR, manifest_name, row_name
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


# -- the row's data array -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(saved: SavedRow) -> dict[str, np.ndarray]:
    """Rank 0's row of the row's data array, as each plain reader sees it."""
    path = saved.row_dir / DATA_ARRAY
    return {"zarr": read_zarr(path)[0], "tensorstore": read_tensorstore(path)[0]}


@pytest.mark.parametrize("read", ["zarr", "tensorstore"])
@pytest.mark.parametrize("kind", ["large", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_tensor_reads_back_exactly_from_its_range(saved, data, dtype, kind, read):
    name = f"{kind}/{dtype_id(dtype)}"
    want = saved.state[kind][dtype_id(dtype)]
    t = saved.entry(name)  # the manifest says where the tensor lies
    assert t["array"] == DATA_ARRAY and t["dtype"] == dtype_id(dtype)
    assert t["shape"] == list(want.shape)
    piece = data[read][t["offset"] : t["offset"] + t["nbytes"]]
    assert piece.tobytes() == raw(want)
    got = as_torch(piece, torch.uint8, (-1,)).view(dtype).reshape(t["shape"])
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_large_tensors_start_on_a_page(saved):
    for dtype in DTYPES:
        assert saved.entry(f"large/{dtype_id(dtype)}")["offset"] % 4096 == 0


def test_data_array_is_one_uint8_shard_of_raw_bytes_per_rank(saved, data):
    doc = json.loads((saved.row_dir / DATA_ARRAY / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "array"
    assert doc["data_type"] == "uint8" and doc["shape"][0] == 1  # one row per rank
    assert doc["chunk_grid"]["configuration"]["chunk_shape"] == doc["shape"]
    (sharding,) = doc["codecs"]
    inner = sharding["configuration"]["chunk_shape"][1]
    assert sharding["name"] == "sharding_indexed" and doc["shape"][1] % inner == 0
    shard = (saved.row_dir / DATA_ARRAY / "c.0.0").read_bytes()
    assert data["zarr"].tobytes() == data["tensorstore"].tobytes()
    # The shard file is the rank's bytes as they are (whole inner chunks), then its index.
    stored = len(shard) - (doc["shape"][1] // inner) * 16 - 4
    assert stored % inner == 0 and shard[:stored] == data["zarr"][:stored].tobytes()
    assert not data["zarr"][stored:].any()


@pytest.mark.parametrize("read", READERS)
def test_a_row_of_only_empty_tensors_has_a_valid_empty_array(tmp_path, read):
    state = {"e": {"a": torch.empty(0, 3), "b": torch.empty(2, 0, dtype=torch.bfloat16)}}
    store = tmp_path / "s"
    row = open_row(store, distckpt.save(state, store), state)
    got = read(row.array_dir("e/a"))
    assert got.shape[0] == 1 and not got.any()  # no bytes: no shard file, zeros


@pytest.mark.parametrize("read", READERS)
def test_zero_dim_and_empty_tensors_read_back(tmp_path, read):
    state = {
        "scalar": torch.tensor(3.25),
        "bf16_scalar": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty_mid": torch.empty(3, 0, 2, dtype=torch.int16),
        "bool_vec": torch.tensor([True, False, True]),
    }
    store = tmp_path / "s"
    row = open_row(store, distckpt.save(state, store), state)
    array = read(row.row_dir / DATA_ARRAY)[0]
    for name, want in state.items():
        e = row.entry(name)
        piece = array[e["offset"] : e["offset"] + e["nbytes"]]
        assert piece.tobytes() == raw(want)


@pytest.mark.filterwarnings("ignore:Object at")
def test_store_root_hierarchy_reaches_every_data_array(saved):
    store = saved.row_dir.parent.parent
    root = zarr.open_group(str(store), mode="r")
    names = {name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
    row_prefix = f"{ROWS_DIR}/{saved.row_dir.name}/"
    assert {row_prefix + a["array"] for a in saved.manifest["arrays"]} <= names
