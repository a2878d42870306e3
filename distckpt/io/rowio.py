"""Moving one rank's tensors between memory and its zarr arrays in a row directory.

Mechanism only: bytes go straight from tensor memory to files (one writev per chunk file,
checksum trailer included) and come back into freshly allocated tensors, each verified
against the checksum its manifest recorded.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from distckpt.errors import CorruptChunkError
from distckpt.format import chunks
from distckpt.format.chunks import ChunkRef, checksum
from distckpt.format.dtypes import spec_for, stored_itemsize, torch_dtype
from distckpt.format.layout import (
    DATA_ARRAY,
    ZARR_JSON,
    array_document,
    group_document,
    rank_data_chunk,
    single_chunk_key,
)
from distckpt.format.manifest import ArrayEntry
from distckpt.plan.save import PlannedTensor, RankPlan
from distckpt.storage.filesystem import FileSystem, ReadHandles

if TYPE_CHECKING:
    import torch


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


# Ranks on this node, as each launcher says it (SLURM's "2(x3),1": the first count is ours
# on a uniform allocation).
_LOCAL_RANKS_ENV = (
    "LOCAL_WORLD_SIZE",  # torchrun
    "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
    "MPI_LOCALNRANKS",  # MPICH's hydra
    "SLURM_TASKS_PER_NODE",  # srun
)


def local_ranks() -> int:
    """How many ranks share this node (1 when no launcher says)."""
    for name in _LOCAL_RANKS_ENV:
        digits = re.match(r"\d+", os.environ.get(name, ""))
        if digits and int(digits.group()) > 0:
            return int(digits.group())
    return 1


def core_share() -> int:
    """This rank's share of the cores it may run on (the node's ranks share them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // local_ranks())


def _workers() -> int:
    """Threads for chunk writes: writev, fsync and crc32c release the GIL. Two at least
    (a checksum overlaps another chunk's wait on the disk), four at most, and no more than
    this rank's share of the cores beyond that. Reads ask their store
    (:meth:`FileSystem.read_threads`)."""
    return max(2, min(4, core_share()))


def write_rank_arrays(
    fs: FileSystem, row_dir: str, plan: RankPlan, *, checksums: bool = True
) -> list[ArrayEntry]:
    """Write every planned tensor durably; return the entries for the manifest.

    Files are written first and made durable together at the end, then their directories,
    so the whole tree survives a power loss before the manifest (the commit point) is
    published, at one batch of fsyncs instead of one stall per file. Arrays are written by a
    few threads at once (checksum, then ``writev`` of each chunk), so checksumming one
    tensor overlaps copying another into the page cache. ``checksums=False`` records no
    crc32c (entries say None) and writes chunks without the trailer.
    """
    own = [p for p in plan.tensors if not p.packed]
    packed = [p for p in plan.tensors if p.packed]
    crcs: dict[int, int | None] = {}

    def write_own(p: PlannedTensor) -> list[str]:
        parts, crc = chunks.encode([byte_view(p.tensor)], checked=checksums)
        crcs[id(p)] = crc
        return _write_own(fs, row_dir, p, parts, crc is not None)

    def write_pack() -> list[str]:
        views = [byte_view(p.tensor) for p in packed]
        for p, v in zip(packed, views, strict=True):
            crcs[id(p)] = checksum(v) if checksums else None
        return _write_packed(fs, row_dir, packed, views, plan.packed_nbytes, checksums)

    files: list[str] = []
    tasks: list[Callable[[], list[str]]] = [write_pack] if packed else []
    tasks += [functools.partial(write_own, p) for p in own]
    if len(tasks) <= 1:
        for task in tasks:
            files += task()
    else:
        # Largest first, so the pool does not end on one long write.
        order = sorted(own, key=lambda p: p.nbytes, reverse=True)
        tasks = ([write_pack] if packed else []) + [functools.partial(write_own, p) for p in order]
        with ThreadPoolExecutor(max_workers=_workers()) as pool:
            for written in pool.map(lambda t: t(), tasks):
                files += written
    fs.fsync_files(files)
    fs.fsync_dirs(sorted({os.path.dirname(f) for f in files}))
    return [
        ArrayEntry(
            name=p.name,
            array=p.array,
            dtype=p.spec.name,
            shape=tuple(p.tensor.shape),
            nbytes=p.nbytes,
            offset=p.offset,
            crc32c=crcs[id(p)],
        )
        for p in plan.tensors
    ]


def write_rank_group(fs: FileSystem, rank_dir: str, rank: int) -> None:
    fs.makedirs(rank_dir)
    doc = group_document({"distckpt": {"rank": rank}})
    fs.write_file(os.path.join(rank_dir, ZARR_JSON), [doc])


def _write_own(
    fs: FileSystem, row_dir: str, p: PlannedTensor, parts: list[chunks.Buffer], checked: bool
) -> list[str]:
    """An array of its own: ``zarr.json`` and one chunk file (not yet fsynced)."""
    array_dir = os.path.join(row_dir, p.array)
    attrs = {"distckpt": {"name": p.name, "dtype": p.spec.name}}
    shape = tuple(p.tensor.shape)
    fs.makedirs(array_dir)
    doc = os.path.join(array_dir, ZARR_JSON)
    fs.write_file(doc, [array_document(shape, p.spec, attrs, crc=checked)], durable=False)
    if not p.tensor.numel():
        return [doc]
    chunk = os.path.join(array_dir, single_chunk_key(len(shape)))
    fs.write_file(chunk, parts, durable=False)
    return [doc, chunk]


def _write_packed(
    fs: FileSystem,
    row_dir: str,
    tensors: Sequence[PlannedTensor],
    views: Sequence[memoryview],
    total: int,
    checksums: bool,
) -> list[str]:
    """All small tensors of the rank as one 1-D uint8 array of a single chunk.

    The array's attributes list each tensor's name, dtype, shape and byte range, so a plain
    zarr reader can find any tensor without the manifest.
    """
    import torch

    array_dir = os.path.join(row_dir, tensors[0].array)
    index = [
        {
            "name": p.name,
            "dtype": p.spec.name,
            "shape": list(p.tensor.shape),
            "offset": p.offset,
            "nbytes": p.nbytes,
        }
        for p in tensors
    ]
    attrs = {"distckpt": {"packed": index}}
    spec = spec_for(torch.uint8)
    fs.makedirs(array_dir)
    doc = os.path.join(array_dir, ZARR_JSON)
    fs.write_file(doc, [array_document((total,), spec, attrs, crc=checksums)], durable=False)
    if not total:
        return [doc]
    parts, _ = chunks.encode(views, checked=checksums)
    chunk = os.path.join(array_dir, single_chunk_key(1))
    fs.write_file(chunk, parts, durable=False)
    return [doc, chunk]


_T = TypeVar("_T")
_R = TypeVar("_R")
_local = threading.local()
SCRATCH_BYTES = 8 << 20


def _scratch() -> memoryview:
    """This thread's reused buffer for streaming verification."""
    buf = getattr(_local, "scratch", None)
    if buf is None:
        buf = _local.scratch = memoryview(bytearray(SCRATCH_BYTES))
    return buf


BATCH_BYTES = 4 << 20  # small reads are handed to a thread this many bytes at a time
SMALL_BYTES = 64 << 10  # tensors up to this size are verified a span of neighbours at once
SPAN_BYTES = 8 << 20  # ... spans of at most this many bytes
HELD_BYTES = 256 << 20  # verified small tensors kept for the fill that follows, at most


def batched(items: Sequence[_T], size: Callable[[_T], int]) -> list[Sequence[_T]]:
    """``items`` in order, cut into runs of about :data:`BATCH_BYTES` (one item at least)."""
    out: list[Sequence[_T]] = []
    start, held = 0, 0
    for i, item in enumerate(items):
        held += size(item)
        if held >= BATCH_BYTES:
            out.append(items[start : i + 1])
            start, held = i + 1, 0
    if start < len(items):
        out.append(items[start:])
    return out


def _map(
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    size: Callable[[_T], int] | None = None,
    *,
    workers: int,
) -> list[_R]:
    """``fn`` of every item, in order, on ``workers`` threads. With ``size``, consecutive
    items go to a thread together, about :data:`BATCH_BYTES` at a time: a hand-off costs
    tens of microseconds, so 10,000 tensors of 4 KiB one per task spent seconds in the pool."""
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    batches = [[item] for item in items] if size is None else batched(items, size)
    if len(batches) == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda batch: [fn(item) for item in batch], batches)
        return [result for batch in done for result in batch]


def copy_parts(dest: memoryview, parts: Sequence[memoryview]) -> None:
    """``parts`` one after another into ``dest``, then released (lent mapped pages are
    unmapped once no view holds them). numpy's copy: a memoryview slice assignment of
    large buffers measured 20-40% slower."""
    out = np.frombuffer(dest, dtype=np.uint8)
    at = 0
    try:
        for part in parts:
            n = len(part)
            np.copyto(out[at : at + n], np.frombuffer(part, dtype=np.uint8))
            at += n
    finally:
        for part in parts:
            part.release()


def read_checked_span(
    files: ReadHandles, ref: ChunkRef, offset: int, dest: memoryview, *, size: int
) -> None:
    """Bytes a check has just passed over, into ``dest``: copied out of the pages the files
    hold in memory (the check mapped them in; a copy in user space ran 10-40% faster here
    than the kernel's ``preadv`` of the same page-cache bytes), else read again, without a
    checksum. Mapping pages costs about 17 ms per 256 MiB here, so only checked bytes,
    already mapped, are worth copying this way."""
    lent = None
    if files.lends_in_memory:
        lent = chunks.span_parts(files, ref, offset, len(dest), size=size)
    if lent is None:
        chunks.read_span(files, ref, offset, dest, None, size=size, verify=False)
    else:
        copy_parts(dest, lent)


def fits_directly(entry: ArrayEntry, live: torch.Tensor) -> bool:
    """Whether ``live`` can receive the entry's bytes straight from the file."""
    import torch

    return (
        live.device.type == "cpu"
        and live.is_contiguous()
        and not live.is_conj()
        and not live.is_neg()
        and type(live) in (torch.Tensor, torch.nn.Parameter)
        and live.layout == torch.strided
        and str(live.dtype).removeprefix("torch.") == entry.dtype
        and tuple(live.shape) == entry.shape
    )


class RankReader:
    """Reads and verifies the tensors of one rank's manifest, sharing one read of the pack.

    Every failure is a :class:`~distckpt.errors.CorruptChunkError` naming the row, rank,
    array and chunk (``chunks`` checks the bytes)."""

    def __init__(
        self,
        fs: FileSystem,
        row_dir: str,
        *,
        row: int,
        rank: int,
        entries: Sequence[ArrayEntry],
        store: str | None = None,
        ranged: bool = False,
        files: ReadHandles | None = None,
        data_bytes: int | None = None,
    ) -> None:
        # ``data_bytes``: the size of the rank's shard file its manifest records (format 3).
        self._data_bytes = data_bytes
        # ``ranged``: a packed entry is read by its own byte range and checksum, not with
        # its whole pack (a rank reading a few entries of another rank's data).
        self._ranged = ranged
        self._fs = fs
        # Every size and byte range goes through one set of handles (``files``: shared with
        # the row's global reader): a data file is opened once, not once per tensor read.
        self._files: ReadHandles = files if files is not None else fs.open_reads()
        self._row_dir = row_dir
        self._store = store if store is not None else chunks.store_of(row_dir)
        self._row = row
        self._rank = rank
        self._entries = entries
        self._packs: dict[str, np.ndarray] = {}
        self._pack_lock = threading.Lock()  # reads may run on several threads
        self._sizes: dict[str, int] = {}  # format 2: each data array's size, stat'ed once
        # Bytes verified and kept (by offset) for the fill, not read twice: small tensors
        # verified in spans, and every tensor a remote store lent (``verify(hold=True)``).
        self._held: dict[int, list[memoryview]] = {}
        self._held_bytes = 0
        self._threads = fs.read_threads(core_share())

    def _size(self, entry: ArrayEntry) -> int:
        size = self._sizes.get(entry.array)
        if size is None:
            expected = self._data_bytes if entry.array == DATA_ARRAY else None
            size = chunks.span_size(self._files, self.ref(entry), expected)
            self._sizes[entry.array] = size
        return size

    def ref(self, entry: ArrayEntry) -> ChunkRef:
        """The chunk holding ``entry``'s bytes, for reads and errors about this tensor."""
        return ChunkRef(
            store=self._store,
            row=self._row,
            rank=self._rank,
            row_dir=self._row_dir,
            array=entry.array,
            chunk=self._chunk(entry),
            what=f"array {entry.name!r}",
            tensor=entry.name,
        )

    def _chunk(self, entry: ArrayEntry) -> tuple[int, ...]:
        if entry.array == DATA_ARRAY:  # format 3: this rank's shard of the row's array
            return rank_data_chunk(True, self._rank)[1]
        return (0,) if entry.packed or entry.ranged else (0,) * len(entry.shape)

    def _pack_ref(self, array: str) -> ChunkRef:
        """The packed chunk as a whole."""
        return ChunkRef(
            store=self._store,
            row=self._row,
            rank=self._rank,
            row_dir=self._row_dir,
            array=array,
            chunk=(0,),
            what="packed array",
        )

    def _nbytes(self, entry: ArrayEntry) -> int:
        """The entry's byte count, refused when its shape and dtype need another."""
        expected = math.prod(entry.shape) * stored_itemsize(entry.dtype)
        if expected != entry.nbytes:
            raise self.ref(entry).fail(
                CorruptChunkError.SIZE,
                f"manifest says {entry.nbytes} bytes, shape needs {expected}",
            )
        return expected

    def verify(self, entry: ArrayEntry, *, hold: bool = False) -> None:
        """Check everything a later :meth:`read` would check (the byte count against shape
        and dtype, the byte range or file size, the checksum) without keeping the bytes: in
        the bytes the files lend (mapped pages) or streamed through a small reused buffer
        (no allocation of the tensor's size). A
        load runs this before it touches live memory, so whatever :meth:`read` would refuse
        must be refused here first. ``hold``: keep the bytes the files lend (an object
        store's response bodies) for :meth:`read` with ``verified``, which copies them into
        place: each byte fetched once, checked once, copied once, with no staging tensor."""
        if self._nbytes(entry) == 0:
            return
        if entry.ranged and hold:
            ref, size = self.ref(entry), self._size(entry)
            lent = chunks.span_parts(self._files, ref, entry.offset, entry.nbytes, size=size)
            if lent is None:  # nothing lent: read once into a buffer of its own, kept
                lent = [memoryview(bytearray(entry.nbytes))]
                chunks.read_span(self._files, ref, entry.offset, lent[0], None, size=size)
            chunks.check_parts(ref, lent, entry.crc32c)
            with self._pack_lock:
                self._held[entry.offset] = lent
            return
        if entry.ranged:
            size = self._size(entry)
            ref = self.ref(entry)
            chunks.verify_span(
                self._files, ref, entry.offset, entry.nbytes, entry.crc32c, _scratch(), size=size
            )
            return
        if entry.packed and self._ranged:
            self.read(entry)
            return
        if entry.packed:
            chunks.check(self.ref(entry), self._slice(entry).data, entry.crc32c)
            return
        if entry.crc32c is None:  # saved without checksums: the file size is what is left
            ref = self.ref(entry)
            try:
                size = self._files.size(ref.path)
            except OSError as exc:
                kind = (
                    CorruptChunkError.MISSING
                    if isinstance(exc, FileNotFoundError)
                    else CorruptChunkError.UNREADABLE
                )
                raise ref.fail(kind, f"chunk file cannot be read: {exc}") from exc
            if size != entry.nbytes:
                raise ref.fail(
                    CorruptChunkError.SIZE, f"chunk file has {size} bytes, expected {entry.nbytes}"
                )
            return
        chunks.verify_chunk(self._files, self.ref(entry), entry.nbytes, entry.crc32c, _scratch())

    def check(self, entry: ArrayEntry) -> None:
        """What :meth:`read` checks (shape and dtype against the byte count, the bytes
        against the checksum), without building the tensor: ``distckpt verify`` needs no
        torch."""
        expected = self._nbytes(entry)
        if expected == 0:
            return
        if entry.ranged:
            size = self._size(entry)
            ref = self.ref(entry)
            chunks.verify_span(
                self._files, ref, entry.offset, entry.nbytes, entry.crc32c, _scratch(), size=size
            )
        elif entry.packed:
            chunks.check(self.ref(entry), self._slice(entry).data, entry.crc32c)
        elif entry.crc32c is not None:
            chunks.verify_chunk(
                self._files, self.ref(entry), entry.nbytes, entry.crc32c, _scratch()
            )
        else:  # saved without checksums: the size is all there is to check
            chunks.read_chunk(self._files, self.ref(entry), memoryview(bytearray(expected)), None)

    def read(
        self, entry: ArrayEntry, into: torch.Tensor | None = None, *, verified: bool = False
    ) -> torch.Tensor:
        """The entry's tensor, verified against its checksum (when the row has one).

        ``into`` (a CPU contiguous tensor of the entry's dtype and shape, see
        :func:`fits_directly`) receives the bytes straight from the file, without a fresh
        allocation or a copy; if verification then fails it holds the row's bad bytes.
        ``verified``: :meth:`verify` passed already, skip the checksum (sizes are checked).
        """
        import torch

        dtype = torch_dtype(entry.dtype)
        out = into if into is not None else torch.empty(entry.shape, dtype=dtype)
        expected = out.numel() * out.element_size()
        if expected != entry.nbytes:
            raise self.ref(entry).fail(
                CorruptChunkError.SIZE,
                f"manifest says {entry.nbytes} bytes, shape needs {expected}",
            )
        if expected == 0:
            return out
        dest = byte_view(out)
        held = self._held.pop(entry.offset, None) if verified and entry.ranged else None
        if held is not None and sum(len(p) for p in held) == len(dest):
            copy_parts(dest, held)  # verified already (with neighbours, or as lent): no read
        elif entry.ranged and verified and entry.crc32c is not None:  # checked: pages mapped
            size = self._size(entry)
            read_checked_span(self._files, self.ref(entry), entry.offset, dest, size=size)
        elif entry.ranged:
            chunks.read_span(
                self._files,
                self.ref(entry),
                entry.offset,
                dest,
                entry.crc32c,
                size=self._size(entry),
                verify=not verified,
            )
        elif entry.packed and self._ranged:
            chunks.read_range(self._files, self.ref(entry), entry, dest)
        elif entry.packed:
            out.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(self._slice(entry)))
            if not verified:
                chunks.check(self.ref(entry), dest, entry.crc32c)
        else:
            chunks.read_chunk(self._files, self.ref(entry), dest, entry.crc32c, verify=not verified)
        return out

    def read_many(
        self, jobs: Sequence[tuple[ArrayEntry, torch.Tensor | None]], *, verified: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`read` for each (entry, into) pair, on a few threads: one file's ``preadv``
        overlaps another's checksum (packed slices stay on this thread: no hand-off)."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        if verified:  # small ones verified with their neighbours: copies, no hand-off
            for i, (entry, into) in enumerate(jobs):  # (large held bodies: copied on threads)
                if entry.ranged and entry.nbytes <= SMALL_BYTES and entry.offset in self._held:
                    out[i] = self.read(entry, into, verified=True)
        own = [i for i, (e, _) in enumerate(jobs) if not e.packed and out[i] is None]
        got = _map(
            lambda i: self.read(*jobs[i], verified=verified),
            own,
            lambda i: jobs[i][0].nbytes,
            workers=self._threads,
        )
        for i, tensor in zip(own, got, strict=True):
            out[i] = tensor
        for i, (entry, into) in enumerate(jobs):  # slices of one pack: no thread hand-off
            if out[i] is None:
                out[i] = self.read(entry, into, verified=verified)
        return [t for t in out if t is not None]

    def verify_many(self, entries: Sequence[ArrayEntry], *, hold: bool = False) -> None:
        """:meth:`verify` for each entry, own arrays on a few threads. Small tensors lying
        side by side in the data array are read as one span, checked tensor by tensor and
        kept for the fill (:meth:`read` with ``verified``): 10,000 tensors of 4 KiB cost a
        few reads, not 20,000. ``hold`` as for :meth:`verify`."""
        small = sorted(
            (e for e in entries if e.ranged and 0 < e.nbytes <= SMALL_BYTES),
            key=lambda e: e.offset,
        )
        spans: list[list[ArrayEntry]] = []
        for e in small:
            if spans and e.offset - spans[-1][0].offset + e.nbytes <= SPAN_BYTES:
                last = spans[-1][-1]
                if e.offset - (last.offset + last.nbytes) <= SMALL_BYTES:
                    spans[-1].append(e)
                    continue
            spans.append([e])
        grouped = {id(e) for span in spans for e in span}
        rest = [e for e in entries if not e.packed and id(e) not in grouped]
        threads = self._threads
        _map(self._verify_span, spans, lambda s: sum(e.nbytes for e in s), workers=threads)
        _map(functools.partial(self.verify, hold=hold), rest, lambda e: e.nbytes, workers=threads)
        for entry in entries:
            if entry.packed:
                self.verify(entry)

    def _verify_span(self, span: Sequence[ArrayEntry]) -> None:
        """Verify neighbouring small tensors with one read: each against its own size and
        checksum (an error names the tensor at fault, as :meth:`verify` would)."""
        for e in span:  # as verify(): sizes first, then the file; the first bad one named
            self._nbytes(e)
        size = self._size(span[0])
        for e in span:
            chunks.span_fits(self.ref(e), e.offset, e.nbytes, size)
        start = span[0].offset
        buf = memoryview(bytearray(max(e.offset + e.nbytes for e in span) - start))
        chunks.read_span(self._files, self.ref(span[0]), start, buf, None, size=size, verify=False)
        views = {e.offset: buf[e.offset - start : e.offset - start + e.nbytes] for e in span}
        for e in span:
            chunks.check(self.ref(e), views[e.offset], e.crc32c)
        with self._pack_lock:
            if self._held_bytes + len(buf) <= HELD_BYTES:
                self._held_bytes += len(buf)
                self._held.update((offset, [v]) for offset, v in views.items())

    def close(self) -> None:
        """Close the files this reader keeps open (also done when it is collected)."""
        self._files.close()

    def _slice(self, entry: ArrayEntry) -> np.ndarray:
        """The entry's bytes in the packed chunk (read once, checked whole)."""
        pack = self._pack(entry)
        if entry.offset + entry.nbytes > pack.size:
            raise self.ref(entry).fail(
                CorruptChunkError.SIZE, "byte range lies beyond the packed chunk"
            )
        return pack[entry.offset : entry.offset + entry.nbytes]

    def _pack(self, entry: ArrayEntry) -> np.ndarray:
        """The packed chunk's data, read once and checked whole against its trailer."""
        with self._pack_lock:
            pack = self._packs.get(entry.array)
            if pack is None:
                members = [e for e in self._entries if e.array == entry.array]
                data = chunks.read_packed(self._files, self._pack_ref(entry.array), members)
                pack = np.frombuffer(data, dtype=np.uint8)
                self._packs[entry.array] = pack
            return pack
