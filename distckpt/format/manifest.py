"""Rank manifests: the per-rank, per-row commit records, and their JSON form.

A manifest is written last and names everything needed to validate the rank's part of a
row. Parsing is strict: anything malformed raises ``InvalidManifest`` so that the election
can treat the row as uncommitted instead of crashing. A manifest carries a checksum over its
own content (``format.checked``), and every number in it is range-checked against what it
describes before anyone sizes or allocates anything by it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from distckpt.errors import CheckpointError, MalformedStateError, StoreFormatError
from distckpt.format import checked
from distckpt.format.dtypes import stored_itemsize
from distckpt.format.layout import (
    DATA_ARRAY,
    FORMAT_VERSION,
    MANIFEST_VERSION,
    PACKED_ARRAY,
    ROW_DIGITS,
    parse_rank_dir_name,
)
from distckpt.format.tree import check_tree

Json = Any

# Bounds on numbers read from a manifest, checked before anything is sized by them.
MAX_WORLD_SIZE = 1 << 20  # ranks of one job: far above any real job, small enough to loop over
MAX_ROW = 10**ROW_DIGITS - 1  # the largest row a row directory name can hold
MAX_NBYTES = 1 << 60  # bytes of one saved array (an exabyte)
MAX_NDIM = 64


class InvalidManifest(Exception):
    """A manifest that cannot count as a commit (internal: never escapes the election)."""


def is_packed(array: str) -> bool:
    """Whether ``array`` (a directory relative to the row) is a rank's packed array."""
    return array.endswith("/" + PACKED_ARRAY)


def is_data_array(array: str) -> bool:
    """Whether ``array`` holds all of a rank's bytes, read by ranges, each checked against
    its own checksum: the row's shared data array (format 3, the rank's shard of it) or the
    rank's own data array (format 2, ``rank_NNNNNN``)."""
    return array == DATA_ARRAY or parse_rank_dir_name(array) is not None


@dataclass(frozen=True)
class ArrayEntry:
    """Where one saved tensor lives: a zarr array, and a byte range of its single chunk."""

    name: str  # the tensor's state path, for messages and plain-zarr readers
    array: str  # array directory relative to the row directory
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # byte offset inside the chunk (0 unless packed)
    crc32c: int | None  # checksum of exactly this tensor's bytes; None: saved without

    @property
    def packed(self) -> bool:
        """Whether the tensor is a byte range of its rank's packed chunk (shared with other
        small tensors) rather than an array of its own."""
        return is_packed(self.array)

    @property
    def ranged(self) -> bool:
        """Whether the tensor is a byte range of its rank's format-2 data array."""
        return is_data_array(self.array)

    def to_json(self) -> Json:
        return {
            "name": self.name,
            "array": self.array,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "offset": self.offset,
            "crc32c": self.crc32c,
        }

    @staticmethod
    def from_json(doc: Json) -> ArrayEntry:
        entry = ArrayEntry(
            name=_typed(doc, "name", str),
            array=_typed(doc, "array", str),
            dtype=_typed(doc, "dtype", str),
            shape=tuple(_int_list(doc, "shape")),
            nbytes=_typed(doc, "nbytes", int),
            offset=_typed(doc, "offset", int),
            crc32c=None if _is_null(doc, "crc32c") else _typed(doc, "crc32c", int),
        )
        if entry.nbytes < 0 or entry.offset < 0 or any(d < 0 for d in entry.shape):
            raise InvalidManifest(f"array {entry.name!r} has a negative size or offset")
        expected = _array_nbytes(entry.name, entry.dtype, entry.shape)
        if entry.nbytes != expected:
            raise InvalidManifest(
                f"array {entry.name!r} records {entry.nbytes} bytes, but {entry.dtype} of shape "
                f"{list(entry.shape)} holds {expected}"
            )
        if entry.offset > MAX_NBYTES:
            raise InvalidManifest(f"array {entry.name!r} has an offset out of range")
        if entry.crc32c is not None and not 0 <= entry.crc32c < 1 << 32:
            raise InvalidManifest(f"array {entry.name!r} has a checksum out of range")
        if entry.array.startswith("/") or ".." in entry.array.split("/"):
            raise InvalidManifest(f"array {entry.name!r} points outside its row: {entry.array!r}")
        return entry


@dataclass(frozen=True)
class PieceEntry:
    """Format 2: one box of a global array that this rank wrote, C-ordered, at ``offset`` of
    its data array. Checksummed in blocks of ``rows`` rows of dimension 0 (the last block may
    be shorter), so a reader of part of the box reads and checks only the blocks it needs."""

    offsets: tuple[int, ...]  # the box's start in the global index space
    lengths: tuple[int, ...]
    offset: int  # byte offset in the rank's data array
    nbytes: int
    rows: int  # rows of dimension 0 per checksum block (1 for a 0-d array)
    crcs: tuple[int, ...]  # crc32c of each block

    def to_json(self) -> Json:
        return {
            "offsets": list(self.offsets),
            "lengths": list(self.lengths),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "rows": self.rows,
            "crcs": list(self.crcs),
        }

    @staticmethod
    def from_json(doc: Json) -> PieceEntry:
        entry = PieceEntry(
            offsets=tuple(_int_list(doc, "offsets")),
            lengths=tuple(_int_list(doc, "lengths")),
            offset=_typed(doc, "offset", int),
            nbytes=_typed(doc, "nbytes", int),
            rows=_typed(doc, "rows", int),
            crcs=tuple(_int_list(doc, "crcs")),
        )
        if len(entry.offsets) != len(entry.lengths) or entry.rows < 1:
            raise InvalidManifest("global piece has a bad box or block size")
        if min((entry.offset, entry.nbytes, *entry.offsets, *entry.lengths), default=0) < 0:
            raise InvalidManifest("global piece has a negative size or offset")
        return entry


@dataclass(frozen=True)
class GlobalEntry:
    """A global (sharded) array a rank's state refers to, and the chunks this rank wrote.

    The array lives at ``array`` (relative to the row, under ``global/``); its chunk grid is
    regular with ``chunk_shape``. A reader gathers ``chunks`` from every rank's manifest to
    find each chunk's checksum; together they name every chunk of the array exactly once.
    """

    name: str  # the tensor's state path
    array: str
    dtype: str
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], int], ...] = ()  # (chunk index, crc32c) written here
    # Formats 2 and 3 (``array`` is "" or "data", ``chunk_shape`` and ``chunks`` empty): the
    # boxes this rank wrote into its own data array or shard. None: a format-1 array.
    pieces: tuple[PieceEntry, ...] | None = None

    def to_json(self) -> Json:
        doc = {
            "name": self.name,
            "array": self.array,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunk_shape": list(self.chunk_shape),
            "chunks": [[list(i), c] for i, c in self.chunks],
        }
        if self.pieces is not None:
            doc["pieces"] = [p.to_json() for p in self.pieces]
        return doc

    @staticmethod
    def from_json(doc: Json) -> GlobalEntry:
        chunks = []
        for item in _typed(doc, "chunks", list):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)):
                raise InvalidManifest("global array chunk entries are not [index, crc32c]")
            chunks.append((tuple(_int_list({"i": item[0]}, "i")), item[1]))
        pieces = doc.get("pieces") if isinstance(doc, dict) else None
        if pieces is not None:
            if not isinstance(pieces, list):
                raise InvalidManifest("global array pieces are not a list")
            entry = GlobalEntry(
                name=_typed(doc, "name", str),
                array=DATA_ARRAY if doc.get("array") == DATA_ARRAY else "",
                dtype=_typed(doc, "dtype", str),
                shape=tuple(_int_list(doc, "shape")),
                chunk_shape=(),
                pieces=tuple(PieceEntry.from_json(p) for p in pieces),
            )
            if any(d < 0 for d in entry.shape):
                raise InvalidManifest(f"global array {entry.name!r} has a negative size")
            if any(len(p.lengths) != len(entry.shape) for p in entry.pieces or ()):
                raise InvalidManifest(f"global array {entry.name!r}: a piece's rank differs")
            return entry
        entry = GlobalEntry(
            name=_typed(doc, "name", str),
            array=_typed(doc, "array", str),
            dtype=_typed(doc, "dtype", str),
            shape=tuple(_int_list(doc, "shape")),
            chunk_shape=tuple(_int_list(doc, "chunk_shape")),
            chunks=tuple(chunks),
        )
        if len(entry.chunk_shape) != len(entry.shape) or any(c < 1 for c in entry.chunk_shape):
            raise InvalidManifest(f"global array {entry.name!r} has a bad chunk shape")
        if any(d < 0 for d in entry.shape):
            raise InvalidManifest(f"global array {entry.name!r} has a negative size")
        _array_nbytes(entry.name, entry.dtype, entry.shape)
        grid = [-(-d // c) for d, c in zip(entry.shape, entry.chunk_shape, strict=True)]
        for index, crc in entry.chunks:
            inside = len(index) == len(grid) and all(
                0 <= i < g for i, g in zip(index, grid, strict=True)
            )
            if not inside:
                raise InvalidManifest(
                    f"global array {entry.name!r} lists chunk {list(index)} outside its grid"
                )
            if not 0 <= crc < 1 << 32:
                raise InvalidManifest(f"global array {entry.name!r} has a checksum out of range")
        if entry.array.startswith("/") or ".." in entry.array.split("/"):
            raise InvalidManifest(f"array {entry.name!r} points outside its row: {entry.array!r}")
        return entry


@dataclass(frozen=True)
class StateRecord:
    """One saved state: its encoded value tree, schema hash and user schema version."""

    tree: Json
    schema: str | None = None
    version: int = 0
    fields: dict[str, str] | None = None  # field name -> annotation, for schema messages
    # Digest of the value (tree and tensor bytes): when every rank's is equal, a job of
    # another size may restore the state from any rank's part (redistribute).
    digest: str | None = None

    def to_json(self) -> Json:
        doc = {"tree": self.tree, "schema": self.schema, "version": self.version}
        if self.fields is not None:
            doc["fields"] = self.fields
        if self.digest is not None:
            doc["digest"] = self.digest
        return doc

    @staticmethod
    def from_json(doc: Json) -> StateRecord:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if schema is not None and not isinstance(schema, str):
            raise InvalidManifest("state schema is not a string")
        fields = doc.get("fields")
        if fields is not None and not (
            isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())
        ):
            raise InvalidManifest("state fields are not a name -> annotation mapping")
        return StateRecord(
            tree=_typed(doc, "tree", dict),
            schema=schema,
            version=_typed(doc, "version", int),
            fields=fields,
            digest=doc["digest"] if isinstance(doc.get("digest"), str) else None,
        )


@dataclass(frozen=True)
class RankManifest:
    """The commit record of one rank for one row."""

    row: int
    rank: int
    world_size: int
    write_count: int
    created: str
    name: str = ""
    level: int | None = None
    lead_time: Json = None  # encoded value node, or None
    arrays: tuple[ArrayEntry, ...] = ()
    states: dict[str, StateRecord] = field(default_factory=dict)
    metadata: Json = field(default_factory=lambda: {"dict": []})
    format: int = FORMAT_VERSION
    globals: tuple[GlobalEntry, ...] = ()  # referred to by {"global": i} tree nodes
    #: Format 3: the size of the rank's shard file (0: it wrote none); readers refuse a
    #: file of any other size (truncated, or extended past its index).
    data_bytes: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def to_json(self) -> bytes:
        doc = {
            "distckpt_manifest": self.format,
            "row": self.row,
            "rank": self.rank,
            "world_size": self.world_size,
            "write_count": self.write_count,
            "created": self.created,
            "name": self.name,
            "level": self.level,
            "lead_time": self.lead_time,
            "arrays": [a.to_json() for a in self.arrays],
            "states": {k: v.to_json() for k, v in self.states.items()},
            "metadata": self.metadata,
        }
        if self.globals:
            doc["globals"] = [g.to_json() for g in self.globals]
        if self.data_bytes is not None:
            doc["data_bytes"] = self.data_bytes
        return checked.seal(doc)

    @staticmethod
    def from_json(data: bytes, *, where: str = "manifest") -> RankManifest:
        """Parse and validate; raise StoreFormatError for a newer format, else InvalidManifest.

        The checksum is checked when present (manifests written before it have none)."""
        try:
            doc = checked.loads_strict(data)
            if not isinstance(doc, dict):
                raise checked.MalformedDocument("is not a JSON object")
            fmt = doc.get("distckpt_manifest")
            newer = isinstance(fmt, int) and fmt > MANIFEST_VERSION
            try:
                # First: a damaged version field must not pass for a newer format.
                doc = checked.verify(doc)
            except checked.UnknownChecksum:
                if not newer:
                    raise
        except checked.MalformedDocument as exc:
            raise InvalidManifest(f"{where} {exc.problem}") from exc
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise InvalidManifest(f"{where} has no format version")
        if newer:
            raise StoreFormatError(
                f"{where} was written by format version {fmt}; this distckpt reads up to "
                f"version {MANIFEST_VERSION}: upgrade distckpt to read it"
            )
        try:
            states = doc.get("states", {})
            if not isinstance(states, dict):
                raise InvalidManifest("states is not an object")
            level = doc.get("level")
            if level is not None and not isinstance(level, int):
                raise InvalidManifest("level is not an integer")
            manifest = RankManifest(
                format=fmt,
                row=_typed(doc, "row", int),
                rank=_typed(doc, "rank", int),
                world_size=_typed(doc, "world_size", int),
                write_count=_typed(doc, "write_count", int),
                created=_typed(doc, "created", str),
                name=doc.get("name", "") if isinstance(doc.get("name", ""), str) else "",
                level=level,
                lead_time=doc.get("lead_time"),
                arrays=tuple(ArrayEntry.from_json(a) for a in _typed(doc, "arrays", list)),
                states={str(k): StateRecord.from_json(v) for k, v in states.items()},
                metadata=_typed(doc, "metadata", dict),
                globals=tuple(GlobalEntry.from_json(g) for g in doc.get("globals", [])),
                data_bytes=_data_bytes(doc),
            )
            _check_trees(manifest)
            _check_ranges(manifest)
        except InvalidManifest as exc:
            raise InvalidManifest(f"{where}: {exc}") from exc
        except (AttributeError, TypeError, ValueError, OverflowError, CheckpointError) as exc:
            raise InvalidManifest(f"{where}: malformed ({exc})") from exc
        if not 1 <= manifest.world_size <= MAX_WORLD_SIZE:
            raise InvalidManifest(
                f"{where}: world size {manifest.world_size} out of range (1..{MAX_WORLD_SIZE})"
            )
        if not 0 <= manifest.rank < manifest.world_size:
            raise InvalidManifest(
                f"{where}: rank {manifest.rank} outside world size {manifest.world_size}"
            )
        if not 0 <= manifest.row <= MAX_ROW:
            raise InvalidManifest(f"{where}: row {manifest.row} out of range (0..{MAX_ROW})")
        return manifest


def _data_bytes(doc: dict[str, Any]) -> int | None:
    value = doc.get("data_bytes")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise InvalidManifest("data_bytes is not a size")
    return value


def _typed(doc: Json, key: str, kind: type) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise InvalidManifest(f"missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidManifest(f"field {key!r} is not of type {kind.__name__}")
    return value


def _check_ranges(manifest: RankManifest) -> None:
    """Format 2: the byte ranges of a rank's data array (its tensors and global pieces) do
    not overlap, so no edit of an offset can make one tensor read another's bytes, with or
    without checksums. Sorting keeps this O(n log n) for manifests of many tensors."""
    spans: list[tuple[int, int, str]] = [
        (a.offset, a.offset + a.nbytes, repr(a.name)) for a in manifest.arrays if a.ranged
    ]
    for g in manifest.globals:
        spans.extend(
            (p.offset, p.offset + p.nbytes, f"a piece of {g.name!r}") for p in g.pieces or ()
        )
    spans = [s for s in spans if s[1] > s[0]]
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise InvalidManifest(f"{first} and {second} overlap in the rank's data array")


def _check_trees(manifest: RankManifest) -> None:
    """Every encoded tree in the manifest has the codec's structure and refers only to
    arrays the manifest lists (MalformedStateError otherwise)."""
    arrays, globals_ = len(manifest.arrays), len(manifest.globals)
    refs: list[tuple[str, str, int]] = []
    for sid, record in manifest.states.items():
        try:
            check_tree(record.tree, leaves=arrays, globals_=globals_, root=(sid,), refs=refs)
        except MalformedStateError as exc:
            raise InvalidManifest(f"state {sid!r}: {exc}") from exc
    # Each array records the state path it was saved from. A reference whose array was
    # saved at the path of another reference is a swapped (or duplicated) reference: the
    # checksum cannot catch it when the edit was resealed, and same-shape tensors would
    # load each other's values without any other error.
    at = {(kind, path) for kind, path, _ in refs}
    for kind, path, index in refs:
        entries = manifest.arrays if kind == "leaf" else manifest.globals
        saved_at = entries[index].name
        if saved_at != path and (kind, saved_at) in at:
            raise InvalidManifest(
                f"the state tree refers at {path!r} to the array saved from {saved_at!r} "
                "(tensor references swapped or duplicated)"
            )
    check_tree(manifest.metadata, leaves=0, globals_=0)
    if manifest.lead_time is not None:
        check_tree(manifest.lead_time, leaves=0, globals_=0)


def _array_nbytes(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a ``dtype`` array of ``shape``; InvalidManifest when the dtype is unknown or
    the size is out of range (checked before any product can overflow a C integer)."""
    try:
        itemsize = stored_itemsize(dtype)
    except CheckpointError:
        raise InvalidManifest(f"array {name!r} has unknown dtype {dtype!r}") from None
    if len(shape) > MAX_NDIM:
        raise InvalidManifest(f"array {name!r} has {len(shape)} dimensions (at most {MAX_NDIM})")
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_NBYTES or (shape and max(shape) > MAX_NBYTES):
        raise InvalidManifest(f"array {name!r} of shape {list(shape)[:8]} is out of range")
    return nbytes


def _is_null(doc: Json, key: str) -> bool:
    """The field is present and null (absent stays an error)."""
    return isinstance(doc, dict) and key in doc and doc[key] is None


def _int_list(doc: Json, key: str) -> list[int]:
    values = _typed(doc, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidManifest(f"field {key!r} is not a list of integers")
    return values
