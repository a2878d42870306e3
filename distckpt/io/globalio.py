"""Global (sharded) arrays: each rank writes its own chunks, any rank reads any region.

A global tensor is one zarr v3 array under ``rows/<row>/global/`` whose regular chunk grid
follows the shards (``shards.chunk_shape``), so every chunk has exactly one writer and is
written whole. Reading a region visits the chunks overlapping it; a chunk inside the
region goes straight into the destination's memory where that memory is contiguous, any
other is read whole (its crc32c covers the whole chunk) and the overlap copied.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distckpt.errors import CorruptCheckpointError, CorruptChunkError
from distckpt.format import chunks
from distckpt.format.chunks import ChunkRef
from distckpt.format.dtypes import spec_for, stored_itemsize, torch_dtype
from distckpt.format.layout import (
    DATA_ARRAY,
    GLOBAL_DIR,
    ZARR_JSON,
    array_document,
    chunk_key,
    rank_data_chunk,
)
from distckpt.format.manifest import GlobalEntry, InvalidManifest, PieceEntry, RankManifest
from distckpt.format.names import escape_component
from distckpt.format.rowindex import IndexedGlobal
from distckpt.format.shards import (
    Box,
    EvenLayout,
    GlobalLayout,
    Layout,
    Region,
    Sharded,
    chunk_box,
    chunk_indices,
    is_even,
    is_global,
    piece,
    plan_layouts,
)
from distckpt.io.dataio import PieceSlot, block_ranges, piece_slots
from distckpt.io.rowio import byte_view, read_checked_span
from distckpt.plan.save import PlannedShard, RankPlan
from distckpt.storage.filesystem import FileSystem, ReadHandles
from distckpt.storage.store import Store

if TYPE_CHECKING:
    import torch


def box_report(plan: RankPlan) -> list[dict[str, Any]]:
    """What this rank holds of each global tensor, box by box."""
    return [_box_item(s) for s in plan.shards]


def _box_item(s: PlannedShard) -> dict[str, Any]:
    return {
        "key": s.name,
        "shape": list(s.piece.global_shape),
        "dtype": s.spec.name,
        "box": s.piece.box.to_json(),
    }


def _evenly_held(plan: RankPlan, rank: int, world: int) -> list[PlannedShard]:
    return [
        s
        for s in plan.shards
        if s.piece.local is not None and is_even(s.piece.box, s.piece.global_shape, rank, world)
    ]


def shard_report(plan: RankPlan, rank: int, world: int) -> dict[str, Any]:
    """What this rank holds of the global tensors, gathered to plan the layouts: the boxes
    of the tensors it does not hold as its even split (:func:`~shards.even_box`), and a
    digest of the names, shapes and dtypes of those it does. A job whose every rank sends
    the same digest (FSDP2, ``Shard(0)``) gathers a few bytes per rank instead of every
    box of every tensor."""
    evenly = _evenly_held(plan, rank, world)
    even = [[s.name, list(s.piece.global_shape), s.spec.name] for s in evenly]
    digest = hashlib.sha256(json.dumps(even, separators=(",", ":")).encode()).hexdigest()
    held = {s.name for s in evenly}
    return {
        "even": digest if even else "",
        "boxes": [_box_item(s) for s in plan.shards if s.name not in held],
    }


def layouts(
    reports: Sequence[dict[str, Any]], plan: RankPlan, rank: int, world: int
) -> dict[str, Layout] | None:
    """Every rank's identical decision from the gathered :func:`shard_report`: the writer of
    each region (or an error). None when the ranks' even splits differ (a tensor split
    evenly on some ranks only, or shapes that disagree): then the caller gathers every box
    (:func:`box_report`) and plans with :func:`layouts_of_boxes`."""
    if len({r["even"] for r in reports}) > 1:
        return None
    out: dict[str, Layout] = {}
    boxes = [r["boxes"] for r in reports]
    if any(boxes):
        out.update(layouts_of_boxes(boxes))
    for s in _evenly_held(plan, rank, world):
        out[s.name] = EvenLayout(s.name, tuple(s.piece.global_shape), s.spec.name, world)
    return out


def layouts_of_boxes(reports: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Layout]:
    """The layouts from every rank's :func:`box_report`: chunk grid and writer of each
    region (or an error)."""
    itemsizes = {
        item["dtype"]: spec_for(torch_dtype(item["dtype"])).itemsize
        for items in reports
        for item in items
    }
    return dict(plan_layouts(reports, itemsizes))


def array_path(key: str) -> str:
    """A global array's directory relative to the row."""
    return f"{GLOBAL_DIR}/{escape_component(key)}"


def write_rank_globals(
    fs: FileSystem, row_dir: str, plan: RankPlan, layout: dict[str, GlobalLayout], rank: int
) -> list[GlobalEntry]:
    """Write this rank's chunks of every global tensor durably; entries for its manifest.

    The array's ``zarr.json`` is written by the lowest-ranked writer of the array. Files are
    fsynced together, then their directories, before the caller publishes the manifest.
    """
    entries: list[GlobalEntry] = []
    files: list[str] = []
    dirs: set[str] = set()
    for shard in plan.shards:
        lay = layout[shard.name]
        array = array_path(shard.name)
        array_dir = os.path.join(row_dir, array)
        mine = lay.writes(rank)
        chunks: list[tuple[tuple[int, ...], int]] = []
        if mine or lay.document_writer == rank:
            fs.makedirs(array_dir)
            dirs.update({array_dir, os.path.dirname(array_dir)})
        if lay.document_writer == rank:
            attrs = {"distckpt": {"name": shard.name, "dtype": shard.spec.name, "global": True}}
            doc = os.path.join(array_dir, ZARR_JSON)
            fs.write_file(
                doc, [array_document(lay.shape, shard.spec, attrs, lay.chunk)], durable=False
            )
            files.append(doc)
        for region in mine:
            written = _write_region(fs, array_dir, shard, region.box, lay.chunk)
            chunks += [(index, crc) for index, crc, _ in written]
            files += [path for _, _, path in written]
        entries.append(
            GlobalEntry(shard.name, array, shard.spec.name, lay.shape, lay.chunk, tuple(chunks))
        )
    fs.fsync_files(files)
    for d in sorted(dirs, key=len, reverse=True):
        fs.fsync_dir(d)
    return entries


def _write_region(
    fs: FileSystem, array_dir: str, shard: PlannedShard, box: Box, chunk: tuple[int, ...]
) -> list[tuple[tuple[int, ...], int, str]]:
    local = shard.piece.local
    assert local is not None and shard.piece.box == box
    out = []
    for index in chunk_indices(box, chunk):
        part = local[chunk_box(index, chunk).slices(box.offsets)]
        if not part.is_contiguous():
            part = part.contiguous()
        parts, crc = chunks.encode([byte_view(part)])
        assert crc is not None
        path = os.path.join(array_dir, chunk_key(index))
        fs.write_file(path, parts, durable=False)
        out.append((index, crc, path))
    return out


@dataclass
class GlobalReader:
    """Reads regions of a row's global arrays.

    Format 2 (pieces in each rank's data array): where every piece lies comes from the row
    index (one read), or from every manifest when the row has no index; a piece's checksums
    from its writer's manifest, read only when one of its blocks is. Format 1 (chunked
    arrays): chunk checksums come from every manifest.
    """

    store: Store
    row: int
    world_size: int
    _crcs: dict[str, dict[tuple[int, ...], int]] | None = field(default=None, repr=False)
    _writers: dict[tuple[str, tuple[int, ...]], int] = field(default_factory=dict, repr=False)
    _pieces: dict[str, list[tuple[int, PieceEntry]]] | None = field(default=None, repr=False)
    _owned: dict[int, dict[str, tuple[PieceEntry, ...]]] = field(default_factory=dict, repr=False)
    _sizes: dict[int, int] = field(default_factory=dict, repr=False)
    _shared: bool | None = field(default=None, repr=False)  # format 3: one shared data array
    _data_bytes: dict[int, int | None] = field(default_factory=dict, repr=False)
    _layouts: dict[str, Layout] = field(default_factory=dict, repr=False)  # from the index
    _slots: dict[int, dict[str, PieceSlot]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The data files' reads; pass the rank reader's handles to share its open files.
    files: ReadHandles | None = field(default=None, repr=False)

    @property
    def _files(self) -> ReadHandles:
        """The data files' reads, each file opened once for the reader's life."""
        with self._lock:
            if self.files is None:
                self.files = self.store.fs.open_reads()
            return self.files

    def close(self) -> None:
        """Close the files this reader keeps open (also done when it is collected)."""
        if self.files is not None:
            self.files.close()

    def _manifest(self, rank: int) -> RankManifest:
        try:
            return self.store.read_manifest(self.row, rank)
        except InvalidManifest as exc:
            raise CorruptCheckpointError(
                f"row {self.row}: manifest of saved rank {rank} is needed for the "
                f"global arrays and is not valid: {exc}"
            ) from exc

    def pieces(self, name: str, box: Box | None = None) -> list[tuple[int, PieceEntry]]:
        """The saved ranks' pieces of global array ``name`` (checksums may be absent): all
        of them, or at least those that may intersect ``box``. A tensor the index records
        as split evenly has its pieces computed here, for the ranks a region needs only."""
        with self._lock:
            if self._pieces is None:
                table: dict[str, list[tuple[int, PieceEntry]]] = {}
                index = self.store.read_index(self.row)
                if index is not None and index.world_size == self.world_size:
                    self._shared = index.data_array == DATA_ARRAY
                    self._layouts = index_layouts(index.globals, self.world_size)
                    for key, g in index.globals.items():
                        table[key] = [
                            (p.rank, PieceEntry(*p.box, p.offset, p.nbytes, p.rows, ()))
                            for p in g.pieces
                        ]
                else:
                    for rank in range(self.world_size):
                        owned = self._owned_by(rank)
                        for key, held in owned.items():
                            table.setdefault(key, []).extend((rank, p) for p in held)
                self._pieces = table
            lay = self._layouts.get(name)
            if isinstance(lay, EvenLayout):
                ranks = range(self.world_size) if box is None else lay.writers_of(box)
                return [(r, self._even_piece(r, name)) for r in ranks if lay.writes(r)]
            return self._pieces.get(name, [])

    def _even_piece(self, rank: int, name: str) -> PieceEntry:
        """Rank ``rank``'s piece of an evenly split tensor, where the writer put it (the
        offsets of a rank's pieces follow from the layouts alone, computed once per rank)."""
        slots = self._slots.get(rank)
        if slots is None:
            slots = self._slots[rank] = {s.key: s for s in piece_slots(self._layouts, rank)}
        s = slots[name]
        return PieceEntry(s.box.offsets, s.box.lengths, s.offset, s.nbytes, s.rows, ())

    def _owned_by(self, rank: int) -> dict[str, tuple[PieceEntry, ...]]:
        """The pieces ``rank``'s manifest lists, by global array (its checksums)."""
        owned = self._owned.get(rank)
        if owned is None:
            manifest = self._manifest(rank)
            owned = {g.name: g.pieces for g in manifest.globals if g.pieces is not None}
            self._data_bytes[rank] = manifest.data_bytes
            if self._shared is None and manifest.globals:
                self._shared = any(g.array == DATA_ARRAY for g in manifest.globals)
            self._owned[rank] = owned
        return owned

    def _crcs_of(self, rank: int, name: str, piece: PieceEntry) -> tuple[int, ...]:
        if piece.crcs:
            return piece.crcs
        with self._lock:
            owned = self._owned_by(rank)
        for p in owned.get(name, ()):
            if p.offsets == piece.offsets and p.lengths == piece.lengths:
                return p.crcs
        return ()

    def _size(self, rank: int, ref: ChunkRef) -> int:
        size = self._sizes.get(rank)
        if size is None:
            expected = self._data_bytes.get(rank)
            size = self._sizes[rank] = chunks.span_size(self._files, ref, expected)
        return size

    def _read_pieces(
        self,
        entry: GlobalEntry,
        box: Box,
        dest: torch.Tensor | None,
        *,
        verified: bool = False,
        tiled: bool = False,
    ) -> None:
        """Fill ``dest`` from the pieces overlapping ``box``: only the checksum blocks of
        each piece that the region touches are read (straight into ``dest`` when they are
        exactly a contiguous part of it) and checked. ``dest`` None: check them only (a
        streamed pass, nothing kept); ``verified``: that pass ran, skip the checksums;
        ``tiled`` (with ``dest`` None): check only the blocks this region samples (see
        :func:`sample_point`), the other ranks' regions check the rest."""
        import torch

        dtype = dest.dtype if dest is not None else torch_dtype(entry.dtype)
        itemsize = stored_itemsize(entry.dtype)
        row_dir = self.store.row_dir(self.row)
        covered = 0
        held = self.pieces(entry.name, box)
        shared = bool(self._shared)
        for rank, pc in held:
            whole = Box(pc.offsets, pc.lengths)
            overlap = whole.intersect(box)
            if overlap is None or not overlap.numel:
                continue
            ref = piece_ref(
                self.store.path, self.row, rank, row_dir, entry.name, pc.offsets, shared=shared
            )
            ranges = block_ranges(pc.lengths, itemsize, pc.rows)
            if pc.lengths:
                r0 = overlap.offsets[0] - pc.offsets[0]
                r1 = r0 + overlap.lengths[0]
                b0, b1 = r0 // pc.rows, -(-r1 // pc.rows)
                row0, row1 = b0 * pc.rows, min(b1 * pc.rows, pc.lengths[0])
                sub = Box((pc.offsets[0] + row0, *pc.offsets[1:]), (row1 - row0, *pc.lengths[1:]))
            else:
                b0, b1, sub = 0, 1, whole
            crcs = self._crcs_of(rank, entry.name, pc)
            if len(crcs) != len(ranges):
                raise ref.fail(
                    CorruptChunkError.UNLISTED,
                    "the writer's manifest does not list this piece's checksums",
                )
            target = None if dest is None else dest[overlap.slices(box.offsets)]
            direct = target is not None and overlap == sub and target.is_contiguous()
            if not direct and pc.lengths:
                checks = None
                if tiled and dest is None:
                    checks = [box.contains(sample_point(entry.name, pc, b)) for b in range(b0, b1)]
                self._read_blocks(
                    ref,
                    rank,
                    pc,
                    ranges,
                    crcs,
                    (b0, b1),
                    overlap,
                    box,
                    dest,
                    verified,
                    checks,
                    itemsize,
                )
                covered += overlap.numel
                continue
            buf = target if direct and target is not None else torch.empty(sub.lengths, dtype=dtype)
            start = ranges[b0][0]
            view = byte_view(buf)
            size = self._size(rank, ref)
            if verified:  # the check passed over these blocks (pieces always have checksums)
                read_checked_span(self._files, ref, pc.offset + start, view, size=size)
            else:
                chunks.read_span(
                    self._files, ref, pc.offset + start, view, None, size=size, verify=False
                )
            for b in range(b0, b1) if not verified else ():
                a, e = ranges[b]
                chunks.check(ref, view[a - start : e - start], crcs[b])
            if not direct and target is not None:
                target.copy_(buf[overlap.slices(sub.offsets)])
            covered += overlap.numel
        if covered != box.numel:
            raise CorruptCheckpointError(
                f"row {self.row}, global array {entry.name!r}: the saved pieces cover "
                f"{covered} of the {box.numel} elements of region {box.offsets} {box.lengths}"
            )

    def _read_blocks(
        self,
        ref: ChunkRef,
        rank: int,
        pc: PieceEntry,
        ranges: list[tuple[int, int]],
        crcs: tuple[int, ...],
        blocks: tuple[int, int],
        overlap: Box,
        box: Box,
        dest: torch.Tensor | None,
        verified: bool = False,
        checks: Sequence[bool] | None = None,
        itemsize: int = 1,
    ) -> None:
        """A part of a piece that is not a contiguous part of ``dest`` (another split, a
        column band), block by block: each block checked (all of them, or those ``checks``
        marks), then its overlap copied. Mapped files are checked and copied from in place
        (a column band touches only its own pages); others go through this thread's reused
        buffer (a buffer of the whole part, new for each piece, cost a page fault per 4 KiB:
        most of a resharding load's time)."""
        size = self._size(rank, ref)
        for b in range(*blocks):
            a, e = ranges[b]
            check = not verified and (checks is None or checks[b - blocks[0]])
            first = pc.offsets[0] + b * pc.rows
            rows = min(pc.rows, pc.offsets[0] + pc.lengths[0] - first)
            block = Box((first, *pc.offsets[1:]), (rows, *pc.lengths[1:]))
            part = None if dest is None else block.intersect(overlap)
            if not check and (part is None or not part.numel):
                chunks.span_fits(ref, pc.offset + a, e - a, size)  # read later: fits now
                continue
            lent = chunks.span_parts(self._files, ref, pc.offset + a, e - a, size=size)
            if lent is not None and len(lent) == 1:
                view = lent[0]
            else:
                view = _block_buffer(e - a)
                if lent is None:
                    chunks.read_span(
                        self._files, ref, pc.offset + a, view, None, size=size, verify=False
                    )
                else:  # several response bodies: joined in the reused buffer
                    at = 0
                    for piece in lent:
                        view[at : at + len(piece)] = piece
                        at += len(piece)
            try:
                if check:
                    chunks.check(ref, view, crcs[b])
                if dest is not None and part is not None and part.numel:
                    _copy_part(view, block, part, dest[part.slices(box.offsets)], itemsize)
            finally:
                for piece in lent or ():
                    piece.release()

    def crcs(self, array: str) -> dict[tuple[int, ...], int]:
        if self._crcs is None:
            table: dict[str, dict[tuple[int, ...], int]] = {}
            for rank in range(self.world_size):
                try:
                    manifest = self.store.read_manifest(self.row, rank)
                except InvalidManifest as exc:
                    raise CorruptCheckpointError(
                        f"row {self.row}: manifest of saved rank {rank} is needed for the "
                        f"global arrays and is not valid: {exc}"
                    ) from exc
                for g in manifest.globals:
                    table.setdefault(g.array, {}).update(dict(g.chunks))
                    self._writers.update({(g.array, index): rank for index, _ in g.chunks})
            self._crcs = table
        return self._crcs.get(array, {})

    def verify(self, entry: GlobalEntry, box: Box, *, tiled: bool = False) -> None:
        """Check every byte a later :meth:`read` of ``box`` would read, keeping nothing (a
        block at a time, in mapped memory or a reused buffer): a load verifies a region
        before it reads it straight into the live tensor, instead of staging all of it.

        ``tiled``: every rank of the load verifies its own region of this array and their
        regions cover it (a DTensor's): each checksum block is checked by the one region
        holding its :func:`sample_point`, so a column band read by four ranks is checked
        once, not four times; sizes are still checked for every block ``box`` reads. The
        load's agreed step makes a failure on any rank fail every rank."""
        import torch

        if entry.pieces is not None:
            self._read_pieces(entry, box, None, tiled=tiled)
        else:
            self.read(entry, box, torch.empty(box.lengths, dtype=torch_dtype(entry.dtype)))

    def read(
        self, entry: GlobalEntry, box: Box, dest: torch.Tensor, *, verified: bool = False
    ) -> None:
        """Fill ``dest`` (a CPU tensor shaped like ``box``) with that region of the array
        (``verified``: :meth:`verify` passed for it, the checksums are not computed again;
        format-1 chunked arrays always check them)."""
        import torch

        dtype = torch_dtype(entry.dtype)
        if dest.dtype != dtype or tuple(dest.shape) != box.lengths:
            raise CorruptCheckpointError(
                f"row {self.row}, global array {entry.name!r}: destination is "
                f"{tuple(dest.shape)} {dest.dtype}, region is {box.lengths} {dtype}"
            )
        if entry.pieces is not None:
            self._read_pieces(entry, box, dest, verified=verified)
            return
        crcs = self.crcs(entry.array)
        array_dir = os.path.join(self.store.row_dir(self.row), entry.array)
        for index in chunk_indices(box, entry.chunk_shape):
            whole = chunk_box(index, entry.chunk_shape)
            overlap = whole.intersect(box)
            assert overlap is not None
            target = dest[overlap.slices(box.offsets)]
            if overlap == whole and target.is_contiguous():
                self._read_chunk(entry, index, crcs, array_dir, target)
            else:
                buf = torch.empty(whole.lengths, dtype=dtype)
                self._read_chunk(entry, index, crcs, array_dir, buf)
                target.copy_(buf[overlap.slices(whole.offsets)])

    def _read_chunk(
        self,
        entry: GlobalEntry,
        index: tuple[int, ...],
        crcs: dict[tuple[int, ...], int],
        array_dir: str,
        out: torch.Tensor,
    ) -> None:
        ref = chunk_ref(
            self.store.path,
            self.store.row_dir(self.row),
            self.row,
            self._writers.get((entry.array, index)),
            entry,
            index,
        )
        expected = crcs.get(index)
        if expected is None:
            raise ref.fail(CorruptChunkError.UNLISTED, "no saved rank's manifest lists this chunk")
        chunks.read_chunk(self._files, ref, byte_view(out), expected)


@dataclass(frozen=True)
class GlobalValue:
    """A saved global tensor, not yet read: ``load`` fills live targets from it by region."""

    entry: GlobalEntry
    reader: GlobalReader
    verified: bool = False  # GlobalReader.verify passed for the regions read: no checksums

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.entry.dtype)

    def read(self, box: Box, dest: torch.Tensor) -> None:
        self.reader.read(self.entry, box, dest, verified=self.verified)

    def full(self) -> torch.Tensor:
        """The whole logical tensor (for a target that is a plain tensor or absent)."""
        import torch

        out = torch.empty(self.shape, dtype=self.dtype)
        if math.prod(self.shape):
            self.read(Box((0,) * len(self.shape), self.shape), out)
        return out


def target_region(live: Any) -> tuple[tuple[int, ...], torch.dtype, Box, torch.Tensor | None]:
    """A live target's global shape, dtype, region and local tensor (None: holds nothing)."""
    if is_global(live):
        held = piece(live, where="target")
        local = live.local if isinstance(live, Sharded) else live._local_tensor
        return held.global_shape, held.dtype, held.box, None if held.local is None else local
    shape = tuple(live.shape)
    return shape, live.dtype, Box((0,) * len(shape), shape), live


def fill(live: Any, saved: GlobalValue) -> None:
    """Read this rank's region of ``saved`` into ``live`` (DTensor, Sharded or tensor).

    Bytes go straight into the live memory when it is a contiguous CPU tensor of the saved
    dtype (no conjugate or negative view bit, which raw bytes would bypass); otherwise
    through a host buffer of the local size (e.g. a CUDA local shard, another dtype).
    """
    import torch

    _, _, box, local = target_region(live)
    if local is None or not box.numel:
        return
    with torch.no_grad():
        dest = local.detach()
        if (
            dest.device.type == "cpu"
            and dest.is_contiguous()
            and not dest.is_conj()
            and not dest.is_neg()
            and dest.dtype == saved.dtype
        ):
            saved.read(box, dest)
        else:
            host = torch.empty(box.lengths, dtype=saved.dtype)
            saved.read(box, host)
            dest.copy_(host)


def sample_point(name: str, pc: PieceEntry, block: int) -> tuple[int, ...]:
    """The element of a piece's checksum block whose holder checks the block in a tiled
    load: spread over the block (a crc32 of its names, the same on every rank), so ranks
    reading column bands of the same rows share the checking evenly."""
    first = pc.offsets[0] + block * pc.rows
    rows = min(pc.rows, pc.offsets[0] + pc.lengths[0] - first)
    lengths = (rows, *pc.lengths[1:])
    starts = (first, *pc.offsets[1:])
    return tuple(
        o + zlib.crc32(f"{name}|{pc.offsets}|{block}|{d}".encode()) % n
        for d, (o, n) in enumerate(zip(starts, lengths, strict=True))
    )


def _copy_part(view: memoryview, block: Box, part: Box, into: torch.Tensor, itemsize: int) -> None:
    """Copy ``part`` of a block's bytes (row-major, shaped ``block``) into ``into``, byte
    for byte (any dtype, bfloat16 too; the source may be read-only mapped memory)."""
    import numpy as np
    import torch

    src = np.frombuffer(view, dtype=np.uint8).reshape(
        (*block.lengths[:-1], block.lengths[-1] * itemsize)
    )
    cut = part.slices(block.offsets)
    last = cut[-1]
    cut = (*cut[:-1], slice(last.start * itemsize, last.stop * itemsize))
    np.copyto(into.view(torch.uint8).numpy(), src[cut])


_thread = threading.local()


def _block_buffer(nbytes: int) -> memoryview:
    """This thread's reused buffer for one checksum block (grown when needed, never freed
    between reads: fresh memory per block would fault in every page)."""
    buf = getattr(_thread, "block", None)
    if buf is None or len(buf) < nbytes:
        buf = _thread.block = bytearray(max(nbytes, 4 << 20))
    return memoryview(buf)[:nbytes]


def index_layouts(globals_: dict[str, IndexedGlobal], world: int) -> dict[str, Layout]:
    """The layouts a row index records: what :func:`~dataio.piece_slots` needs to place any
    rank's pieces (evenly split tensors by their rule, others by their listed pieces)."""
    out: dict[str, Layout] = {}
    for key, g in globals_.items():
        if g.even:
            out[key] = EvenLayout(key, g.shape, g.dtype, world)
        else:
            regions = tuple(Region(Box(*p.box), (p.rank,), p.rank) for p in g.pieces)
            out[key] = GlobalLayout(key, g.shape, g.dtype, (), regions, ())
    return out


def written_nbytes(entry: GlobalEntry) -> int:
    """Bytes of the chunks one rank wrote of a global array (chunks are never clipped: the
    grid divides the global shape)."""
    if entry.pieces is not None:
        return sum(p.nbytes for p in entry.pieces)
    itemsize = stored_itemsize(entry.dtype)
    return len(entry.chunks) * math.prod(entry.chunk_shape) * itemsize


def chunk_ref(
    store: str, row_dir: str, row: int, rank: int | None, entry: GlobalEntry, index: tuple[int, ...]
) -> ChunkRef:
    """Chunk ``index`` of a global array (``rank``: the saved rank that wrote it)."""
    return ChunkRef(
        store=store,
        row=row,
        rank=rank,
        row_dir=row_dir,
        array=entry.array,
        chunk=tuple(index),
        what=f"global array {entry.name!r}, chunk {tuple(index)}",
        tensor=entry.name,
    )


def check_written_chunks(
    fs: FileSystem, row_dir: str, entry: GlobalEntry, *, store: str, row: int, rank: int
) -> list[CorruptChunkError]:
    """Re-read the chunks one rank wrote (``entry.chunks``), streamed; an error per bad chunk
    (format 2: see :func:`check_written_pieces`)."""
    if entry.pieces is not None:
        found = check_written_pieces(fs, row_dir, entry, store=store, row=row, rank=rank)
        return [exc for _, exc in found]
    problems = []
    nbytes = written_nbytes(entry) // max(1, len(entry.chunks))
    scratch = memoryview(bytearray(min(nbytes, 8 << 20)))
    files = fs.open_reads()
    try:
        for index, crc in entry.chunks:
            ref = chunk_ref(store, row_dir, row, rank, entry, index)
            try:
                chunks.verify_chunk(files, ref, nbytes, crc, scratch)
            except CorruptChunkError as exc:
                problems.append(exc)
    finally:
        files.close()
    return problems


def check_written_pieces(
    fs: FileSystem,
    row_dir: str,
    entry: GlobalEntry,
    *,
    store: str,
    row: int,
    rank: int,
    data_bytes: int | None = None,
) -> list[tuple[str, CorruptChunkError]]:
    """Re-read the pieces one rank wrote, streamed: (which piece, error) per bad one
    (``data_bytes``: the size of its shard file its manifest records)."""
    problems = []
    itemsize = stored_itemsize(entry.dtype)
    scratch = memoryview(bytearray(8 << 20))
    size: int | None = None
    files = fs.open_reads()  # one open of the shard; its pieces checked in mapped memory
    try:
        for pc in entry.pieces or ():
            ref = piece_ref(
                store, row, rank, row_dir, entry.name, pc.offsets, shared=entry.array == DATA_ARRAY
            )
            ranges = block_ranges(pc.lengths, itemsize, pc.rows)
            try:
                if size is None:
                    size = chunks.span_size(files, ref, data_bytes)
                if len(ranges) != len(pc.crcs) or pc.nbytes != math.prod(pc.lengths) * itemsize:
                    raise ref.fail(
                        CorruptChunkError.SIZE, "the piece's size or checksums are wrong"
                    )
                for (a, e), crc in zip(ranges, pc.crcs, strict=True):
                    chunks.verify_span(files, ref, pc.offset + a, e - a, crc, scratch, size=size)
            except CorruptChunkError as exc:
                problems.append((f"piece at {pc.offsets}", exc))
    finally:
        files.close()
    return problems


def piece_ref(
    store: str,
    row: int,
    rank: int,
    row_dir: str,
    name: str,
    offsets: tuple[int, ...],
    *,
    shared: bool,
) -> ChunkRef:
    """Where a piece of global array ``name`` lies: a byte range of ``rank``'s shard of the
    row's data array (``shared``, format 3) or of its own data array (format 2), named in
    errors by the piece's offsets."""
    array, index = rank_data_chunk(shared, rank)
    return ChunkRef(
        store=store,
        row=row,
        rank=rank,
        row_dir=row_dir,
        array=array,
        chunk=index,
        what=f"global array {name!r}, piece at {offsets}",
        tensor=name,
    )
