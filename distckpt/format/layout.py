"""The on-disk layout: zarr v3 metadata documents and path names in a store.

Only this module knows what a zarr.json looks like or where a row's files go, so the rest of
the code (and a reader of the docs) has one place to look.
"""

from __future__ import annotations

import json
from typing import Any

from distckpt.format.dtypes import DtypeSpec

FORMAT_VERSION = 3  # major: a reader refuses anything newer (1: an array per large tensor)
# Format 1 manifests said 1, or 2 when they held global (sharded) arrays. Format 2 rows
# (every tensor and global piece of a rank in that rank's one data array) say 3; format 3
# rows (every rank's bytes in one shard of the row's shared data array) say 4, so code that
# predates them refuses the row naming both versions instead of misreading it.
GLOBAL_MANIFEST_VERSION = 2
DATA_MANIFEST_VERSION = 3
SHARED_MANIFEST_VERSION = 4
MANIFEST_VERSION = SHARED_MANIFEST_VERSION  # the newest manifest this reader understands
ROW_INDEX = "index.json"  # rows/<row>/index.json: the coordinator's summary of a whole row
ROW_INDEX_VERSION = 2  # 2: the index names the row's shared data array (format 3)
# Format 3: rows/<row>/data is one (world size x L) uint8 array, one shard file per rank.
DATA_ARRAY = "data"
INNER_CHUNK_MIN = 64 << 10  # the shards' inner chunk: at least this many bytes ...
INNER_CHUNKS_MAX = 16384  # ... and at most this many per shard (its index: 16 B each)
NO_CHUNK = (1 << 64) - 1  # a shard index entry of an inner chunk that is not stored
# Byte alignment of each tensor in a rank's data array: large tensors start on a page (so a
# reader may map or read them directly), small ones on 16 bytes (any dtype's alignment).
PAGE_ALIGN = 4096
SMALL_ALIGN = 16
PAGE_ALIGN_FROM = 1 << 20
GLOBAL_DIR = "global"
ROWS_DIR = "rows"
MANIFESTS_DIR = "manifests"
ZARR_JSON = "zarr.json"
PACKED_ARRAY = "packed"
ROW_DIGITS = 12


def row_name(row: int) -> str:
    return f"{row:0{ROW_DIGITS}d}"


def _ascii_digits(text: str) -> bool:
    """Only 0-9: ``str.isdigit`` also accepts other scripts' digits and superscripts
    ("²"), which ``int`` then rejects or reads as another number."""
    return bool(text) and text.isascii() and text.isdigit()


def parse_row_name(name: str) -> int | None:
    if len(name) == ROW_DIGITS and _ascii_digits(name):
        return int(name)
    return None


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank:06d}"


def parse_rank_dir_name(name: str) -> int | None:
    """The rank of a ``rank_NNNNNN`` name (format 2: also the rank's data array)."""
    if len(name) == 11 and name.startswith("rank_") and name[5:].isdigit():
        return int(name[5:])
    return None


def align_for(nbytes: int) -> int:
    """The alignment of an item of ``nbytes`` in a rank's data array."""
    return PAGE_ALIGN if nbytes >= PAGE_ALIGN_FROM else SMALL_ALIGN


def aligned(offset: int, nbytes: int) -> int:
    """Where an item of ``nbytes`` goes when the data array's bytes so far end at ``offset``."""
    step = align_for(nbytes)
    return -(-offset // step) * step


def manifest_name(rank: int) -> str:
    return f"rank_{rank:06d}.json"


def parse_manifest_name(name: str) -> int | None:
    if name.startswith("rank_") and name.endswith(".json"):
        digits = name[5:-5]
        if _ascii_digits(digits) and len(digits) <= 9:
            return int(digits)
    return None


def group_document(attributes: dict[str, Any]) -> bytes:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(doc, separators=(",", ":")).encode()


def array_document(
    shape: tuple[int, ...],
    spec: DtypeSpec,
    attributes: dict[str, Any],
    chunk_shape: tuple[int, ...] | None = None,
    *,
    crc: bool = True,
) -> bytes:
    """A zarr v3 array of one chunk covering ``shape``, bytes little-endian, crc32c-checked
    unless ``crc`` is false (a save with checksums off: then the chunk has no trailer).

    One chunk per array keeps files per array at two; chunk shapes must be positive, so a
    zero-length dimension gets a chunk extent of 1 and no chunk file is written at all.
    Global arrays pass their own ``chunk_shape`` (a regular grid following the shards).
    """
    codecs: list[dict[str, Any]] = [{"name": "bytes"}]
    if spec.itemsize > 1:
        codecs[0]["configuration"] = {"endian": "little"}
    if crc:
        codecs.append({"name": "crc32c"})
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": spec.zarr_type,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [max(1, d) for d in chunk_shape or shape]},
        },
        # "." keeps the chunk beside its zarr.json: no nested directories to create and fsync.
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": spec.fill_value,
        "codecs": codecs,
        "attributes": attributes,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def data_array_document(total: int, attributes: dict[str, Any]) -> bytes:
    """Format 2: a rank's data array, a 1-D ``uint8`` array of one chunk of ``total`` bytes
    holding every tensor and global piece the rank wrote, back to back (aligned).

    No crc32c codec: each tensor's (each piece block's) own checksum is in the manifest, so
    a reader checks exactly the ranges it reads instead of the whole chunk, and the writer
    does not checksum every byte twice.
    """
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [total],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, total)]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}],
        "attributes": attributes,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def inner_chunk_bytes(length: int) -> int:
    """The inner chunk of a shared data array whose ranks hold up to ``length`` bytes: a
    power of two of at least 64 KiB, large enough that a shard indexes at most 16,384 of
    them (its index stays under 256 KiB; a rank pads its bytes by less than one chunk)."""
    inner = INNER_CHUNK_MIN
    while -(-length // inner) > INNER_CHUNKS_MAX:
        inner *= 2
    return inner


def shared_length(most: int) -> tuple[int, int]:
    """(L, inner chunk) of a shared data array whose largest rank holds ``most`` bytes: L is
    ``most`` rounded up to whole inner chunks (at least one)."""
    inner = inner_chunk_bytes(most)
    return max(1, -(-most // inner)) * inner, inner


def shared_data_document(world_size: int, length: int, inner: int) -> bytes:
    """Format 3: the row's data array, ``uint8`` of shape (world size, L), one shard per rank
    (zarr v3 ``sharding_indexed``, index at the end with its crc32c).

    Rank r's shard file ``c.<r>.0`` holds its bytes in order (its inner chunks stored back to
    back, the last padded with zeros) and the shard index; chunks past its bytes are not
    stored and read as zeros. So every rank writes one file, all in one directory that the
    coordinator made, and plain zarr readers see one array of the row.
    """
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [world_size, length],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, length]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, inner],
                    "codecs": [{"name": "bytes"}],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "attributes": {
            "distckpt": {
                "data": "row r holds rank r's bytes: offsets and sizes of its tensors are in "
                "manifests/rank_<r>.json, of global tensors' pieces in index.json"
            }
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def rank_data_chunk(shared: bool, rank: int) -> tuple[str, tuple[int, ...]]:
    """(array, chunk index) holding ``rank``'s bytes in a row: format 3's shared array, or
    format 2's array of the rank's own."""
    return (DATA_ARRAY, (rank, 0)) if shared else (rank_dir_name(rank), (0,))


def single_chunk_key(ndim: int) -> str:
    """Path of the only chunk of a one-chunk array, relative to the array directory."""
    return "c" if ndim == 0 else "c." + ".".join("0" for _ in range(ndim))


def chunk_key(index: tuple[int, ...]) -> str:
    """Path of a chunk of a multi-chunk array ("default" key encoding, "." separator)."""
    return "c" if not index else "c." + ".".join(str(i) for i in index)
