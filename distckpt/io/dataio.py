"""Format 2: a rank's one data array per row, written in one pass, read by byte ranges.

Each rank writes ``rows/<row>/rank_NNNNNN/`` (a zarr v3 ``uint8`` array of one chunk) holding
its pieces of global (sharded) tensors first, then every tensor of its states, each at an
aligned offset. Files per rank per row are two here (``zarr.json`` and ``c.0``) plus the
manifest, however many tensors the rank saves; both are fsynced through the descriptor that
wrote them, and the rank fsyncs the one directory it created.

Piece offsets depend only on the agreed layouts (which boxes each rank writes), so any rank
can compute where every rank's pieces lie without reading anything (:func:`piece_slots`):
that is what the coordinator's row index records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distckpt.format import chunks
from distckpt.format.chunks import checksum
from distckpt.format.dtypes import stored_itemsize
from distckpt.format.layout import (
    PAGE_ALIGN,
    ZARR_JSON,
    aligned,
    data_array_document,
    rank_dir_name,
    single_chunk_key,
)
from distckpt.format.manifest import ArrayEntry, GlobalEntry, PieceEntry
from distckpt.format.rowindex import IndexedGlobal, IndexedPiece, RowIndex
from distckpt.format.shards import Box, GlobalLayout
from distckpt.io.rowio import byte_view
from distckpt.plan.save import RankPlan
from distckpt.storage.filesystem import FileSystem

BLOCK_BYTES = 4 << 20  # a global piece is checksummed per block of about this many bytes

_ZEROS = bytes(PAGE_ALIGN)


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


def piece_slots(layouts: Mapping[str, GlobalLayout], rank: int) -> list[PieceSlot]:
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


def slots_by_rank(layouts: Mapping[str, GlobalLayout]) -> dict[int, list[PieceSlot]]:
    """:func:`piece_slots` of every writing rank, in one pass over the layouts' regions
    (not one pass per rank: the coordinator's row index at N ranks would cost N times
    every region, hours at 10,000 ranks)."""
    out: dict[int, list[PieceSlot]] = {}
    ends: dict[int, int] = {}
    for key in sorted(layouts):
        lay = layouts[key]
        itemsize = stored_itemsize(lay.dtype)
        for region in lay.regions:
            nbytes = region.box.numel * itemsize
            at = aligned(ends.get(region.writer, 0), nbytes)
            slot = PieceSlot(key, lay.dtype, lay.shape, region.box, at, nbytes)
            out.setdefault(region.writer, []).append(slot)
            ends[region.writer] = at + nbytes
    return out


def tensors_base(slots: Sequence[PieceSlot]) -> int:
    """Where the rank's tensors start in its data array: the page after its pieces."""
    end = max((s.offset + s.nbytes for s in slots), default=0)
    return -(-end // PAGE_ALIGN) * PAGE_ALIGN


def write_rank_data(
    fs: FileSystem,
    row_dir: str,
    plan: RankPlan,
    layouts: Mapping[str, GlobalLayout],
    rank: int,
    *,
    checksums: bool = True,
) -> tuple[list[ArrayEntry], list[GlobalEntry]]:
    """Write this rank's data array durably; the manifest's array and global entries.

    One ``writev`` straight from tensor memory (padding between items from one shared
    zero page) while a few threads checksum the same memory, then ``fsync`` on the same
    descriptor; then the rank's directory (its own) and the row's (the new entry in it).
    Global pieces are always checksummed; ``checksums=False`` skips the tensors' crc32c.
    """
    array = rank_dir_name(rank)
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
    parts: list[chunks.Buffer] = []
    end = 0
    for at, view in items:
        if at > end:
            parts.append(memoryview(_ZEROS)[: at - end])
        parts.append(view)
        end = at + len(view)

    def piece_crcs(item: tuple[PieceSlot, memoryview]) -> tuple[int, ...]:
        slot, view = item
        ranges = block_ranges(slot.box.lengths, stored_itemsize(slot.dtype), slot.rows)
        return tuple(checksum(view[a:b]) for a, b in ranges)

    def tensor_crc(item: tuple[int, memoryview]) -> int | None:
        return checksum(item[1]) if checksums else None

    array_dir = os.path.join(row_dir, array)
    fs.makedirs(array_dir)
    attrs = {"distckpt": _attributes(rank, plan, slots, base)}
    fs.write_file(os.path.join(array_dir, ZARR_JSON), [data_array_document(total, attrs)])
    with ThreadPoolExecutor(max_workers=2) as pool:
        got_pieces = pool.map(piece_crcs, pieces)
        got_tensors = pool.map(tensor_crc, tensors)
        if total:
            fs.write_file(os.path.join(array_dir, single_chunk_key(1)), parts)
        piece_sums = list(got_pieces)
        tensor_sums = list(got_tensors)
    fs.fsync_dir(array_dir)
    fs.fsync_dir(row_dir)
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
            array="",
            dtype=s.spec.name,
            shape=s.piece.global_shape,
            chunk_shape=(),
            pieces=tuple(mine.get(s.name, ())),
        )
        for s in plan.shards
    ]
    return entries, globals_


def _attributes(rank: int, plan: RankPlan, slots: Sequence[PieceSlot], base: int) -> Any:
    """What a plain zarr reader needs to find every tensor and piece in the array."""
    return {
        "rank": rank,
        "tensors": [
            {
                "name": p.name,
                "dtype": p.spec.name,
                "shape": list(p.tensor.shape),
                "offset": base + p.offset,
                "nbytes": p.nbytes,
            }
            for p in plan.tensors
        ],
        "pieces": [
            {
                "name": s.key,
                "dtype": s.dtype,
                "global_shape": list(s.shape),
                "offsets": list(s.box.offsets),
                "lengths": list(s.box.lengths),
                "offset": s.offset,
                "nbytes": s.nbytes,
            }
            for s in slots
        ],
    }


def data_path(row_dir: str, rank: int) -> str:
    """The chunk file of ``rank``'s data array in a row."""
    return os.path.join(row_dir, rank_dir_name(rank), single_chunk_key(1))


def build_index(
    row: int, world_size: int, write_count: int, layouts: Mapping[str, GlobalLayout]
) -> RowIndex:
    """The row index, from the agreed layouts alone (no file is read): every rank's pieces."""
    pieces: dict[str, list[IndexedPiece]] = {key: [] for key in layouts}
    slots = slots_by_rank(layouts)
    for rank in range(world_size):
        for slot in slots.get(rank, ()):
            pieces[slot.key].append(
                IndexedPiece(rank, *_box(slot), slot.offset, slot.nbytes, slot.rows)
            )
    return RowIndex(
        row,
        world_size,
        write_count,
        {
            key: IndexedGlobal(lay.dtype, lay.shape, tuple(pieces[key]))
            for key, lay in sorted(layouts.items())
        },
    )


def _box(slot: PieceSlot) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return slot.box.offsets, slot.box.lengths
