"""Format 3: a rank's bytes of a row, one shard file of the row's shared data array.

The coordinator makes ``rows/<row>/data/`` (a zarr v3 ``uint8`` array of shape (world size,
L), one shard per rank, see ``layout.shared_data_document``); rank r writes one file there,
``c.<r>.0``: its pieces of global (sharded) tensors first, then every tensor of its states,
each at an aligned offset, padded to whole inner chunks and followed by the shard index. One
file per rank per row plus the manifest, however many tensors the rank saves, fsynced
through the descriptor that wrote it; the rank creates no directory (the coordinator fsyncs
the row's directories once, before the row index).

Piece offsets depend only on the agreed layouts (which boxes each rank writes), so any rank
can compute where every rank's pieces lie without reading anything (:func:`piece_slots`):
that is what the coordinator's row index records. Rows of format 2 (an array per rank,
``rows/<row>/rank_NNNNNN/``) are read the same way; only their paths differ.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distckpt.errors import CheckpointWriteError
from distckpt.format import chunks
from distckpt.format.chunks import checksum
from distckpt.format.dtypes import stored_itemsize
from distckpt.format.layout import (
    DATA_ARRAY,
    NO_CHUNK,
    PAGE_ALIGN,
    aligned,
    chunk_key,
    rank_data_chunk,
)
from distckpt.format.manifest import ArrayEntry, GlobalEntry, PieceEntry
from distckpt.format.rowindex import IndexedGlobal, IndexedPiece, RowIndex
from distckpt.format.shards import Box, EvenLayout, Layout
from distckpt.io.rowio import batched, byte_view
from distckpt.plan.save import RankPlan
from distckpt.storage.filesystem import FileSystem

BLOCK_BYTES = 4 << 20  # a global piece is checksummed per block of about this many bytes

_ZEROS = bytes(1 << 20)  # padding is sliced from this, never allocated per write


@dataclass(frozen=True)
class PieceSlot:
    """Where one box of a global tensor lies in its writer's data array."""

    key: str  # the global tensor's name
    dtype: str
    shape: tuple[int, ...]  # global shape
    box: Box
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows of dimension 0 per checksum block."""
        return block_rows(self.box.lengths, stored_itemsize(self.dtype))


def block_rows(lengths: Sequence[int], itemsize: int) -> int:
    """Rows of dimension 0 per checksum block of a piece of ``lengths``."""
    if not lengths:
        return 1
    row_bytes = math.prod(lengths[1:]) * itemsize
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def block_ranges(lengths: Sequence[int], itemsize: int, rows: int) -> list[tuple[int, int]]:
    """The (byte start, byte end) of each checksum block of a piece, relative to it."""
    total = math.prod(lengths) * itemsize
    if not lengths:
        return [(0, total)]
    row_bytes = math.prod(lengths[1:]) * itemsize
    step = rows * row_bytes
    if step == 0:
        return [(0, 0)]
    return [(start, min(start + step, total)) for start in range(0, total, step)] or [(0, 0)]


def piece_slots(layouts: Mapping[str, Layout], rank: int) -> list[PieceSlot]:
    """The boxes ``rank`` writes, in the order and at the offsets of its data array
    (global tensors by name, boxes in layout order): the same on every rank."""
    slots: list[PieceSlot] = []
    end = 0
    for key in sorted(layouts):
        lay = layouts[key]
        itemsize = stored_itemsize(lay.dtype)
        for region in lay.writes(rank):
            nbytes = region.box.numel * itemsize
            at = aligned(end, nbytes)
            slots.append(PieceSlot(key, lay.dtype, lay.shape, region.box, at, nbytes))
            end = at + nbytes
    return slots


def tensors_base(slots: Sequence[PieceSlot]) -> int:
    """Where the rank's tensors start in its data array: the page after its pieces."""
    end = max((s.offset + s.nbytes for s in slots), default=0)
    return -(-end // PAGE_ALIGN) * PAGE_ALIGN


def bound_bytes(plan: RankPlan) -> int:
    """At least the bytes this rank's data will hold, known before the layouts are agreed
    (whichever of its boxes it ends up writing): every box it holds, each aligned, then its
    tensors from the next page. Every rank's bound, gathered, sizes the shared array."""
    pieces = sum(
        s.piece.box.numel * s.spec.itemsize + PAGE_ALIGN
        for s in plan.shards
        if s.piece.local is not None
    )
    tensors = max((p.offset + p.nbytes for p in plan.tensors), default=0)
    return pieces + PAGE_ALIGN + tensors


def shard_index(nbytes: int, length: int, inner: int) -> bytes:
    """The shard index ending a rank's file: its first ``ceil(nbytes / inner)`` inner chunks
    stored back to back from offset 0, the rest not stored; little-endian, then its crc32c
    (the array's ``index_codecs``)."""
    import numpy as np

    count = length // inner
    stored = -(-nbytes // inner)
    table = np.full((count, 2), NO_CHUNK, dtype="<u8")
    table[:stored, 0] = np.arange(stored, dtype="<u8") * inner
    table[:stored, 1] = inner
    raw = table.tobytes()
    return raw + checksum(raw).to_bytes(4, "little")


def write_rank_data(
    fs: FileSystem,
    row_dir: str,
    plan: RankPlan,
    layouts: Mapping[str, Layout],
    rank: int,
    shape: tuple[int, int],
    *,
    checksums: bool = True,
) -> tuple[list[ArrayEntry], list[GlobalEntry], int]:
    """Write this rank's shard of the row's data array durably; the manifest's array and
    global entries and the file's size. ``shape`` is the array's (L, inner chunk), agreed
    by every rank.

    One ``writev`` straight from tensor memory (padding from one shared zero page, then the
    shard index) while a few threads checksum the same memory, then ``fsync`` on the same
    descriptor. A rank with no bytes writes no file (zarr reads its row as zeros).
    Global pieces are always checksummed; ``checksums=False`` skips the tensors' crc32c.
    """
    length, inner = shape
    array = DATA_ARRAY
    slots = piece_slots(layouts, rank)
    base = tensors_base(slots)
    by_key: dict[str, Any] = {s.name: s for s in plan.shards}
    pieces: list[tuple[PieceSlot, memoryview]] = []
    for slot in slots:
        shard = by_key[slot.key]
        local = shard.piece.local
        assert local is not None and shard.piece.box == slot.box
        pieces.append((slot, byte_view(local)))
    tensors = [(base + p.offset, byte_view(p.tensor)) for p in plan.tensors]
    items = [(s.offset, v) for s, v in pieces] + tensors
    total = max((at + len(v) for at, v in items), default=0)
    if total > length:
        raise CheckpointWriteError(
            f"rank {rank}'s data ({total} bytes) does not fit the row's data array "
            f"({length} bytes per rank) agreed before writing"
        )
    parts: list[chunks.Buffer] = []
    end = 0
    for at, view in items:
        _pad(parts, at - end)
        parts.append(view)
        end = at + len(view)
    if total:
        _pad(parts, -total % inner)
        parts.append(shard_index(total, length, inner))

    def piece_crcs(item: tuple[PieceSlot, memoryview]) -> tuple[int, ...]:
        slot, view = item
        ranges = block_ranges(slot.box.lengths, stored_itemsize(slot.dtype), slot.rows)
        return tuple(checksum(view[a:b]) for a, b in ranges)

    def tensor_crcs(batch: Sequence[tuple[int, memoryview]]) -> list[int | None]:
        return [checksum(view) if checksums else None for _, view in batch]

    with ThreadPoolExecutor(max_workers=2) as pool:
        got_pieces = pool.map(piece_crcs, pieces)
        # Small tensors by the batch: one hand-off per tensor cost more than its checksum.
        got_tensors = pool.map(tensor_crcs, batched(tensors, lambda t: len(t[1])))
        written = fs.write_file(data_path(row_dir, rank), parts) if total else 0
        piece_sums = list(got_pieces)
        tensor_sums = [crc for batch in got_tensors for crc in batch]
    entries = [
        ArrayEntry(
            name=p.name,
            array=array,
            dtype=p.spec.name,
            shape=tuple(p.tensor.shape),
            nbytes=p.nbytes,
            offset=base + p.offset,
            crc32c=crc,
        )
        for p, crc in zip(plan.tensors, tensor_sums, strict=True)
    ]
    mine: dict[str, list[PieceEntry]] = {}
    for (slot, _), crcs in zip(pieces, piece_sums, strict=True):
        mine.setdefault(slot.key, []).append(
            PieceEntry(*_box(slot), slot.offset, slot.nbytes, slot.rows, crcs)
        )
    globals_ = [
        GlobalEntry(
            name=s.name,
            array=DATA_ARRAY,
            dtype=s.spec.name,
            shape=s.piece.global_shape,
            chunk_shape=(),
            pieces=tuple(mine.get(s.name, ())),
        )
        for s in plan.shards
    ]
    return entries, globals_, written


def _pad(parts: list[chunks.Buffer], n: int) -> None:
    """Append ``n`` zero bytes (views of one shared zero buffer)."""
    while n > 0:
        step = min(n, len(_ZEROS))
        parts.append(memoryview(_ZEROS)[:step])
        n -= step


def data_path(row_dir: str, rank: int) -> str:
    """The file holding ``rank``'s bytes in a row: its shard of the row's data array."""
    array, index = rank_data_chunk(True, rank)
    return os.path.join(row_dir, array, chunk_key(index))


def build_index(
    row: int, world_size: int, write_count: int, layouts: Mapping[str, Layout]
) -> RowIndex:
    """The row index, from the agreed layouts alone (no file is read). A tensor split evenly
    over the ranks is recorded by its rule (readers compute any rank's piece and offset from
    the index), any other by every piece: the index stays O(tensors) for FSDP2-style jobs
    instead of O(ranks x tensors). Offsets are computed for the ranks writing listed pieces
    only, each in one pass over the layouts."""
    listed = {key for key, lay in layouts.items() if not isinstance(lay, EvenLayout)}
    pieces: dict[str, list[IndexedPiece]] = {key: [] for key in listed}
    writers = sorted({r.writer for key in listed for r in layouts[key].regions})
    for rank in writers:
        for slot in piece_slots(layouts, rank):
            if slot.key in listed:
                pieces[slot.key].append(
                    IndexedPiece(rank, *_box(slot), slot.offset, slot.nbytes, slot.rows)
                )
    return RowIndex(
        row,
        world_size,
        write_count,
        {
            key: IndexedGlobal(
                lay.dtype,
                lay.shape,
                tuple(pieces.get(key, ())),
                lay.world if isinstance(lay, EvenLayout) else 0,
            )
            for key, lay in sorted(layouts.items())
        },
    )


def _box(slot: PieceSlot) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return slot.box.offsets, slot.box.lengths
