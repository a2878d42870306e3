"""Moving one rank's tensors between memory and its zarr arrays in a row directory.

Mechanism only: bytes go straight from tensor memory to files (one writev per chunk file,
checksum trailer included) and come back into freshly allocated tensors, each verified
against the checksum its manifest recorded.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from distckpt.errors import CorruptCheckpointError
from distckpt.format.dtypes import spec_for, torch_dtype
from distckpt.format.layout import (
    CRC_BYTES,
    PACKED_ARRAY,
    ZARR_JSON,
    array_document,
    checksum,
    crc_trailer,
    group_document,
    single_chunk_key,
)
from distckpt.format.manifest import ArrayEntry
from distckpt.plan.save import PlannedTensor, RankPlan
from distckpt.storage.filesystem import FileSystem


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _workers() -> int:
    """Threads for chunk writes and reads: writev, preadv, fsync and crc32c release the GIL.

    Two at least (so checksumming overlaps I/O), four at most, and no more than this
    rank's share of the cores when several ranks share a node (``LOCAL_WORLD_SIZE``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    share = (cpus or 1) // max(1, int(local) if local.isdigit() else 1)
    return max(2, min(4, share))


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
        crc = checksum(byte_view(p.tensor)) if checksums else None
        crcs[id(p)] = crc
        return _write_own(fs, row_dir, p, crc)

    def write_pack() -> list[str]:
        views = [byte_view(p.tensor) for p in packed]
        for p, v in zip(packed, views, strict=True):
            crcs[id(p)] = checksum(v) if checksums else None
        return _write_packed(fs, row_dir, packed, views, plan.packed_nbytes, checksums)

    files: list[str] = []
    tasks: list[Callable[[], list[str]]] = [write_pack] if packed else []
    tasks += [functools.partial(write_own, p) for p in own]
    if len(tasks) <= 1 or _workers() == 1:
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


def _write_own(fs: FileSystem, row_dir: str, p: PlannedTensor, crc: int | None) -> list[str]:
    """An array of its own: ``zarr.json`` and one chunk file (not yet fsynced)."""
    array_dir = os.path.join(row_dir, p.array)
    attrs = {"distckpt": {"name": p.name, "dtype": p.spec.name}}
    shape = tuple(p.tensor.shape)
    fs.makedirs(array_dir)
    doc = os.path.join(array_dir, ZARR_JSON)
    fs.write_file(doc, [array_document(shape, p.spec, attrs, crc=crc is not None)], durable=False)
    if not p.tensor.numel():
        return [doc]
    chunk = os.path.join(array_dir, single_chunk_key(len(shape)))
    trailer = [] if crc is None else [crc_trailer(crc)]
    fs.write_file(chunk, [byte_view(p.tensor), *trailer], durable=False)
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
    trailer: list[bytes] = []
    if checksums:
        crc = 0
        for v in views:
            crc = checksum(v, crc)
        trailer = [crc_trailer(crc)]
    chunk = os.path.join(array_dir, single_chunk_key(1))
    fs.write_file(chunk, [*views, *trailer], durable=False)
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


def _map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    if len(items) <= 1 or _workers() == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        return list(pool.map(fn, items))


def _is_packed(entry: ArrayEntry) -> bool:
    return entry.array.endswith("/" + PACKED_ARRAY)


def fits_directly(entry: ArrayEntry, live: torch.Tensor) -> bool:
    """Whether ``live`` can receive the entry's bytes straight from the file."""
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
    """Reads and verifies the tensors of one rank's manifest, sharing one read of the pack."""

    def __init__(
        self, fs: FileSystem, row_dir: str, *, row: int, rank: int, entries: Sequence[ArrayEntry]
    ) -> None:
        self._fs = fs
        self._row_dir = row_dir
        self._row = row
        self._rank = rank
        self._entries = entries
        self._packs: dict[str, torch.Tensor] = {}
        self._pack_lock = threading.Lock()  # reads may run on several threads

    def _fail(self, entry: ArrayEntry, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"row {self._row}, rank {self._rank}, array {entry.name!r} "
            f"({os.path.join(self._row_dir, entry.array)}): {problem}"
        )

    def verify(self, entry: ArrayEntry) -> None:
        """Check the entry's bytes on storage against its checksum without keeping them:
        streamed through a small reused buffer (no allocation of the tensor's size)."""
        if entry.nbytes == 0 or entry.crc32c is None:
            return
        if entry.array.endswith("/" + PACKED_ARRAY):
            pack = self._pack(entry)
            if entry.offset + entry.nbytes > pack.numel():
                raise self._fail(entry, "byte range lies beyond the packed chunk")
            piece = pack[entry.offset : entry.offset + entry.nbytes].numpy()
            if checksum(memoryview(piece)) != entry.crc32c:  # type: ignore[arg-type]
                raise self._fail(entry, "checksum mismatch (data corrupted)")
            return
        chunk = os.path.join(self._row_dir, entry.array, single_chunk_key(len(entry.shape)))
        try:
            size = self._fs.size(chunk)
        except FileNotFoundError as exc:
            raise self._fail(entry, "chunk file is missing") from exc
        if size != entry.nbytes + CRC_BYTES:
            raise self._fail(entry, f"chunk file has {size} bytes, expected {entry.nbytes + 4}")
        scratch = _scratch()
        crc, done = 0, 0
        while done < entry.nbytes:
            part = scratch[: min(len(scratch), entry.nbytes - done)]
            got = self._fs.read_into(chunk, part, offset=done)
            if got != len(part):
                raise self._fail(entry, "chunk file is truncated")
            crc = checksum(part, crc)
            done += got
        trailer = bytearray(CRC_BYTES)
        self._fs.read_into(chunk, memoryview(trailer), offset=entry.nbytes)
        if int.from_bytes(trailer, "little") != entry.crc32c:
            raise self._fail(entry, "chunk checksum trailer does not match the manifest")
        if crc != entry.crc32c:
            raise self._fail(entry, "checksum mismatch (data corrupted)")

    def read(
        self, entry: ArrayEntry, into: torch.Tensor | None = None, *, verified: bool = False
    ) -> torch.Tensor:
        """The entry's tensor, verified against its checksum (when the row has one).

        ``into`` (a CPU contiguous tensor of the entry's dtype and shape, see
        :func:`fits_directly`) receives the bytes straight from the file, without a fresh
        allocation or a copy; if verification then fails it holds the row's bad bytes.
        ``verified``: :meth:`verify` passed already, skip the checksum (sizes are checked).
        """
        dtype = torch_dtype(entry.dtype)
        out = into if into is not None else torch.empty(entry.shape, dtype=dtype)
        expected = out.numel() * out.element_size()
        if expected != entry.nbytes:
            raise self._fail(entry, f"manifest says {entry.nbytes} bytes, shape needs {expected}")
        if expected == 0:
            return out
        dest = byte_view(out)
        if entry.array.endswith("/" + PACKED_ARRAY):
            pack = self._pack(entry)
            if entry.offset + entry.nbytes > pack.numel():
                raise self._fail(entry, "byte range lies beyond the packed chunk")
            out.reshape(-1).view(torch.uint8).copy_(
                pack[entry.offset : entry.offset + entry.nbytes]
            )
        else:
            chunk = os.path.join(self._row_dir, entry.array, single_chunk_key(len(entry.shape)))
            self._read_chunk(entry, chunk, dest)
        if not verified and entry.crc32c is not None and checksum(dest) != entry.crc32c:
            raise self._fail(entry, "checksum mismatch (data corrupted)")
        return out

    def read_many(
        self, jobs: Sequence[tuple[ArrayEntry, torch.Tensor | None]], *, verified: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`read` for each (entry, into) pair, on a few threads: one file's ``preadv``
        overlaps another's checksum (packed slices stay on this thread: no hand-off)."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        own = [i for i, (e, _) in enumerate(jobs) if not _is_packed(e)]
        got = _map(lambda i: self.read(*jobs[i], verified=verified), own)
        for i, tensor in zip(own, got, strict=True):
            out[i] = tensor
        for i, (entry, into) in enumerate(jobs):  # slices of one pack: no thread hand-off
            if out[i] is None:
                out[i] = self.read(entry, into, verified=verified)
        return [t for t in out if t is not None]

    def verify_many(self, entries: Sequence[ArrayEntry]) -> None:
        """:meth:`verify` for each entry, own arrays on a few threads."""
        _map(self.verify, [e for e in entries if not _is_packed(e)])
        for entry in entries:
            if _is_packed(entry):
                self.verify(entry)

    def _read_chunk(self, entry: ArrayEntry, chunk: str, dest: memoryview) -> None:
        trailer_bytes = 0 if entry.crc32c is None else CRC_BYTES
        try:
            size = self._fs.size(chunk)
        except FileNotFoundError as exc:
            raise self._fail(entry, "chunk file is missing") from exc
        if size != len(dest) + trailer_bytes:
            raise self._fail(
                entry, f"chunk file has {size} bytes, expected {len(dest) + trailer_bytes}"
            )
        if entry.crc32c is None:
            if self._fs.read_into(chunk, dest) != len(dest):
                raise self._fail(entry, "chunk file is truncated")
            return
        # Data and trailer in one preadv.
        trailer = bytearray(CRC_BYTES)
        got = self._fs.read_into_parts(chunk, [dest, memoryview(trailer)])
        if got != len(dest) + CRC_BYTES:
            raise self._fail(entry, "chunk file is truncated")
        if int.from_bytes(trailer, "little") != entry.crc32c:
            raise self._fail(entry, "chunk checksum trailer does not match the manifest")

    def _fail_pack(
        self, array: str, problem: str, *, all_lost: bool = True
    ) -> CorruptCheckpointError:
        """An error for the packed chunk; names every tensor in it when all are lost."""
        if not all_lost:
            return CorruptCheckpointError(
                f"row {self._row}, rank {self._rank}, packed array "
                f"({os.path.join(self._row_dir, array)}): {problem}"
            )
        names = [e.name for e in self._entries if e.array == array]
        held = ", ".join(repr(n) for n in names[:5]) + (
            f" +{len(names) - 5} more" if len(names) > 5 else ""
        )
        return CorruptCheckpointError(
            f"row {self._row}, rank {self._rank}, packed array holding {held} "
            f"({os.path.join(self._row_dir, array)}): {problem}"
        )

    def _pack(self, entry: ArrayEntry) -> torch.Tensor:
        """The packed chunk's data, read once and checked whole against its trailer."""
        with self._pack_lock:
            return self._pack_locked(entry)

    def _pack_locked(self, entry: ArrayEntry) -> torch.Tensor:
        pack = self._packs.get(entry.array)
        if pack is not None:
            return pack
        members = [e for e in self._entries if e.array == entry.array]
        checked = any(e.crc32c is not None for e in members)
        trailer_bytes = CRC_BYTES if checked else 0
        expected = max(e.offset + e.nbytes for e in members) + trailer_bytes
        chunk = os.path.join(self._row_dir, entry.array, single_chunk_key(1))
        try:
            size = self._fs.size(chunk)
        except FileNotFoundError as exc:
            raise self._fail_pack(entry.array, "chunk file is missing") from exc
        if size != expected:
            raise self._fail_pack(
                entry.array, f"chunk has {size} bytes, manifest expects {expected}"
            )
        buf = np.empty(size, dtype=np.uint8)
        got = self._fs.read_into(chunk, memoryview(buf))  # type: ignore[arg-type]
        if got != size:
            raise self._fail_pack(entry.array, "chunk file is truncated")
        data = buf[: size - trailer_bytes]
        stored = int.from_bytes(buf[-CRC_BYTES:].tobytes(), "little")
        if checked and checksum(memoryview(data)) != stored:  # type: ignore[arg-type]
            bad = [
                e.name
                for e in members
                if checksum(memoryview(data[e.offset : e.offset + e.nbytes])) != e.crc32c  # type: ignore[arg-type]
            ]
            problem = f"corrupted tensors {bad}" if bad else "checksum trailer damaged"
            raise self._fail_pack(
                entry.array, f"chunk fails its checksum: {problem}", all_lost=False
            )
        pack = torch.from_numpy(data)
        self._packs[entry.array] = pack
        return pack
