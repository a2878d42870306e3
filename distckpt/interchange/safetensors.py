"""safetensors files, parsed and validated here before a byte of tensor data is read.

Layout: an 8-byte little-endian header length N, N bytes of JSON header (tensor name ->
dtype, shape, [begin, end) offsets into the data section, plus an optional string map
``__metadata__``), then the data. A header longer than the file or than 100 MB, offsets
out of bounds, overlapping or leaving gaps, sizes that disagree with shapes, or unknown
dtypes are refused, naming the file and the tensor.

distckpt's exports keep a row's full tree (nesting, non-tensor values) as JSON in
``__metadata__["distckpt.tree"]``, so an export imports back as the same row.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from distckpt.errors import CheckpointSerializationError, ExportFormatError, ImportFormatError
from distckpt.format import tree as codec
from distckpt.interchange.records import Imported
from distckpt.io.rowio import byte_view
from distckpt.storage.filesystem import LocalFileSystem

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
TREE_KEY = "distckpt.tree"  # __metadata__ entry: the row's tree as codec JSON
LEAVES_KEY = "distckpt.leaves"  # __metadata__ entry: tensor name of each leaf index
METADATA_KEY = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order and where the data section starts."""

    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]


def read_header(path: str) -> Header:
    """Parse and validate the header of ``path``; reads no tensor data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ImportFormatError(
                f"{path}: {size} bytes, too short for a safetensors header length (8 bytes)"
            )
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES:
            raise ImportFormatError(
                f"{path}: safetensors header length {n} bytes exceeds the {MAX_HEADER_BYTES}-"
                "byte limit (damaged, or not a safetensors file); refused before reading it"
            )
        if n > size - 8:
            raise ImportFormatError(
                f"{path}: safetensors header length {n} bytes exceeds the file's "
                f"{size - 8} bytes after the length field (truncated?)"
            )
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImportFormatError(f"{path}: safetensors header cannot be parsed: {exc}") from None
    if not isinstance(doc, dict):
        raise ImportFormatError(f"{path}: safetensors header is not a JSON object")
    meta = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ImportFormatError(f"{path}: safetensors {METADATA_KEY} is not a map of strings")
    tensors = tuple(_tensor_info(path, name, entry) for name, entry in doc.items())
    _check_layout(path, tensors, size - 8 - n)
    return Header(data_start=8 + n, tensors=tensors, metadata=meta)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key twice is refused (which one would be meant?)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def _tensor_info(path: str, name: str, entry: Any) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ImportFormatError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise ImportFormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ImportFormatError(f"{where}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ImportFormatError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise ImportFormatError(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; "
            f"{dtype} {shape} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: str, tensors: tuple[TensorInfo, ...], data_bytes: int) -> None:
    """Offsets must tile the data section exactly: in bounds, no overlap, no gap."""
    expected = 0
    previous: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.end > data_bytes:
            raise ImportFormatError(
                f"{path}: tensor {t.name!r} ends at byte {t.end} of a {data_bytes}-byte data "
                "section (out of bounds: truncated file?)"
            )
        if t.begin < expected:
            assert previous is not None
            raise ImportFormatError(
                f"{path}: tensors {previous.name!r} [{previous.begin}, {previous.end}) and "
                f"{t.name!r} [{t.begin}, {t.end}) overlap"
            )
        if t.begin > expected:
            raise ImportFormatError(
                f"{path}: bytes [{expected}, {t.begin}) before tensor {t.name!r} belong to no "
                "tensor"
            )
        expected = t.end
        if t.end > t.begin:
            previous = t
    if expected != data_bytes:
        raise ImportFormatError(
            f"{path}: tensors cover {expected} of the {data_bytes}-byte data section"
        )


def read_safetensors(path: str) -> Imported:
    """Validate the header, then read every tensor into memory of its own."""
    header = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for info in header.tensors:
            t = torch.empty(info.shape, dtype=DTYPES[info.dtype])
            view = byte_view(t)
            f.seek(header.data_start + info.begin)
            if f.readinto(view) != info.end - info.begin:
                raise ImportFormatError(f"{path}: tensor {info.name!r} is truncated")
            tensors[info.name] = t
    meta = dict(header.metadata)
    tree, leaves = meta.pop(TREE_KEY, None), meta.pop(LEAVES_KEY, None)
    metadata: dict[str, Any] = {"safetensors_metadata": meta} if meta else {}
    if tree is None:
        return Imported(state=tensors, metadata=metadata)
    return Imported(state=_rebuild(path, tree, leaves, tensors), metadata=metadata)


def _rebuild(path: str, tree: str, leaves: str | None, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested row tree an export recorded, its leaves taken from the tensors."""
    try:
        names = json.loads(leaves or "null")
        node = json.loads(tree)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{LEAVES_KEY} is not a list of names")

        def leaf(index: int, as_numpy: bool) -> Any:
            if not 0 <= index < len(names) or names[index] not in tensors:
                raise ValueError(f"{TREE_KEY} refers to a tensor the file does not hold")
            t = tensors[names[index]]
            return t.numpy() if as_numpy else t

        state = codec.decode(node, leaf)
    except (ValueError, CheckpointSerializationError) as exc:
        raise ImportFormatError(f"{path}: damaged {TREE_KEY} metadata: {exc}") from None
    if not isinstance(state, dict):
        raise ImportFormatError(f"{path}: {TREE_KEY} metadata does not hold a dict")
    return state


def write_safetensors(tree: dict[str, Any], dest: str) -> int:
    """Write ``tree``'s tensors under dotted names, its full tree in ``__metadata__``.

    Atomic (temp file, fsync, rename). Returns the number of tensors written.
    """
    leaves: list[codec.Leaf] = []
    try:
        node = codec.encode(tree, leaves)
    except CheckpointSerializationError as exc:
        raise ExportFormatError(f"cannot export to {dest}: {exc}") from None
    names: list[str] = []
    entries: dict[str, Any] = {}
    datas: list[memoryview] = []
    offset = 0
    for leaf in leaves:
        name = ".".join(str(p) for p in leaf.path)
        if name in entries or name == METADATA_KEY:
            raise ExportFormatError(
                f"cannot export to {dest}: two values flatten to the tensor name {name!r}"
            )
        dtype = _NAMES.get(leaf.tensor.dtype)
        if dtype is None:
            raise ExportFormatError(
                f"cannot export to {dest}: tensor {name!r} has dtype {leaf.tensor.dtype}, "
                "which safetensors cannot hold"
            )
        data = byte_view(leaf.tensor.detach().cpu().contiguous())
        entries[name] = {
            "dtype": dtype,
            "shape": list(leaf.tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        names.append(name)
        datas.append(data)
        offset += data.nbytes
    meta = {"format": "pt", TREE_KEY: json.dumps(node), LEAVES_KEY: json.dumps(names)}
    header = json.dumps({METADATA_KEY: meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data starts 8-byte aligned
    # Straight from tensor memory; appears whole or not at all.
    LocalFileSystem().atomic_write(dest, [struct.pack("<Q", len(header)), header, *datas])
    return len(leaves)
