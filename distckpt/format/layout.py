"""The on-disk layout: zarr v3 metadata documents and path names in a store.

Only this module knows what a zarr.json looks like or where a row's files go, so the rest of
the code (and a reader of the docs) has one place to look.
"""

from __future__ import annotations

import json
from typing import Any

from distckpt.format.dtypes import DtypeSpec

FORMAT_VERSION = 1  # major: a reader refuses anything newer
# Manifests holding global (sharded) arrays say 2: a reader that predates them refuses the
# row loudly instead of failing on a tree node it does not know. Other manifests stay 1.
GLOBAL_MANIFEST_VERSION = 2
MANIFEST_VERSION = GLOBAL_MANIFEST_VERSION  # the newest manifest this reader understands
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


def single_chunk_key(ndim: int) -> str:
    """Path of the only chunk of a one-chunk array, relative to the array directory."""
    return "c" if ndim == 0 else "c." + ".".join("0" for _ in range(ndim))


def chunk_key(index: tuple[int, ...]) -> str:
    """Path of a chunk of a multi-chunk array ("default" key encoding, "." separator)."""
    return "c" if not index else "c." + ".".join(str(i) for i in index)
