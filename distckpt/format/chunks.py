"""The chunk codec: a chunk file is its bytes, then their crc32c as 4 little-endian bytes
(zarr v3's ``crc32c`` codec), or its bytes alone in a row saved with checksums off.

Encoding, checking and verified reads (a whole chunk, a tensor's byte range of the packed
chunk, a streamed check that keeps nothing) live here and nowhere else; every failure is a
:class:`~distckpt.errors.CorruptChunkError` whose fields name the chunk and the problem.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import crc32c

from distckpt.errors import CorruptChunkError
from distckpt.format.layout import chunk_key
from distckpt.format.manifest import ArrayEntry

TRAILER_BYTES = 4  # the crc32c trailer ending every checksummed chunk

Buffer = bytes | bytearray | memoryview


class ChunkFiles(Protocol):
    """The reads a chunk reader needs (``storage.FileSystem`` has them; ``format`` sits
    below ``storage`` and names only the shape)."""

    def size(self, path: str) -> int: ...

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int: ...

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int: ...

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None: ...


# -- encoding -----------------------------------------------------------------------------------
def checksum(data: Buffer, value: int = 0) -> int:
    """crc32c of ``data``, continuing from ``value`` (the checksum of the bytes before it)."""
    return int(crc32c.crc32c(data, value=value))


def trailer(crc: int) -> bytes:
    return crc.to_bytes(TRAILER_BYTES, "little")


def encode(parts: Sequence[Buffer], *, checked: bool = True) -> tuple[list[Buffer], int | None]:
    """The buffers to write, in order, for a chunk holding ``parts`` concatenated (no copy),
    and the chunk's checksum (None when ``checked`` is false: no trailer either)."""
    if not checked:
        return list(parts), None
    crc = 0
    for part in parts:
        crc = checksum(part, crc)
    return [*parts, trailer(crc)], crc


def decode(chunk: Buffer) -> tuple[memoryview, int]:
    """A whole encoded chunk split into (data, stored checksum); the caller checks them
    (:func:`check`). Raises ValueError when ``chunk`` is shorter than its trailer."""
    view = memoryview(chunk).cast("B")
    if len(view) < TRAILER_BYTES:
        raise ValueError(f"a chunk of {len(view)} bytes has no {TRAILER_BYTES}-byte trailer")
    stored = int.from_bytes(view[-TRAILER_BYTES:], "little")
    return view[:-TRAILER_BYTES], stored


# -- where a chunk is, for errors ---------------------------------------------------------------
@dataclass(frozen=True)
class ChunkRef:
    """One chunk of one array of a row, and how messages name it."""

    store: str
    row: int
    rank: int | None  # the saved rank whose manifest lists the chunk (None: not known)
    row_dir: str
    array: str  # the array's directory relative to the row
    chunk: tuple[int, ...]  # grid index: (0,) * ndim for a one-chunk array
    what: str  # e.g. "array 'model/w'", "packed array", "global array 'w', chunk (0, 0)"
    tensor: str | None = None  # the one tensor this read is for, if any

    @property
    def path(self) -> str:
        return os.path.join(self.row_dir, self.array, chunk_key(self.chunk))

    def fail(
        self, problem: str, detail: str, *, lost: Sequence[str] | None = None
    ) -> CorruptChunkError:
        """The error for this chunk; ``lost``: the damage is the whole chunk's (not the one
        tensor's this read is for) and these are the tensors it costs."""
        where = f"row {self.row}" + ("" if self.rank is None else f", rank {self.rank}")
        return CorruptChunkError(
            f"{where}, {self.what} ({self.path}): {detail}",
            store=self.store,
            row=self.row,
            rank=self.rank,
            array=self.array,
            chunk=self.chunk,
            problem=problem,
            detail=detail,
            tensor=self.tensor if lost is None else None,
            tensors=tuple(lost or ()),
            path=self.path,
        )


def store_of(row_dir: str) -> str:
    """The store holding a row directory (``<store>/rows/<row>``)."""
    return os.path.dirname(os.path.dirname(os.path.normpath(row_dir)))


# -- checking and verified reads ----------------------------------------------------------------
def check(ref: ChunkRef, data: Buffer, crc: int | None) -> None:
    """Raise unless ``data`` has checksum ``crc`` (None: saved without, nothing to check)."""
    if crc is not None and checksum(data) != crc:
        raise ref.fail(CorruptChunkError.CHECKSUM, "checksum mismatch (data corrupted)")


def _size(fs: ChunkFiles, ref: ChunkRef, lost: Sequence[str] | None = None) -> int:
    """The chunk file's size; ``lost`` as for :meth:`ChunkRef.fail`."""
    try:
        return fs.size(ref.path)
    except FileNotFoundError as exc:
        raise ref.fail(CorruptChunkError.MISSING, "chunk file is missing", lost=lost) from exc
    except OSError as exc:
        raise ref.fail(
            CorruptChunkError.UNREADABLE, f"chunk file cannot be read: {exc}", lost=lost
        ) from exc


def _read(
    fs: ChunkFiles,
    ref: ChunkRef,
    parts: Sequence[memoryview],
    offset: int = 0,
    lost: Sequence[str] | None = None,
) -> int:
    """Bytes read into ``parts`` from ``offset``; ``lost`` as for :meth:`ChunkRef.fail`."""
    try:
        if len(parts) == 1:
            return fs.read_into(ref.path, parts[0], offset)
        return fs.read_into_parts(ref.path, parts, offset)
    except FileNotFoundError as exc:
        raise ref.fail(CorruptChunkError.MISSING, "chunk file is missing", lost=lost) from exc
    except OSError as exc:
        raise ref.fail(
            CorruptChunkError.UNREADABLE, f"chunk file cannot be read: {exc}", lost=lost
        ) from exc


def _expect_size(fs: ChunkFiles, ref: ChunkRef, expected: int) -> None:
    size = _size(fs, ref)
    if size != expected:
        raise ref.fail(CorruptChunkError.SIZE, f"chunk file has {size} bytes, expected {expected}")


def _check_trailer(ref: ChunkRef, stored: bytes | bytearray, crc: int) -> None:
    if int.from_bytes(stored, "little") != crc:
        raise ref.fail(
            CorruptChunkError.TRAILER, "chunk checksum trailer does not match the manifest"
        )


def read_chunk(
    fs: ChunkFiles, ref: ChunkRef, dest: memoryview, crc: int | None, *, verify: bool = True
) -> None:
    """Fill ``dest`` (the chunk's data size, bytes) with a whole chunk, in one read with its
    trailer; check the size, the trailer against ``crc`` (the manifest's) and, unless
    ``verify`` is false (checked already, see :func:`verify_chunk`), the data's checksum."""
    dest = dest.cast("B") if dest.format != "B" else dest
    trailer_bytes = 0 if crc is None else TRAILER_BYTES
    _expect_size(fs, ref, len(dest) + trailer_bytes)
    stored = bytearray(trailer_bytes)
    parts = [dest, memoryview(stored)] if trailer_bytes else [dest]
    if _read(fs, ref, parts) != len(dest) + trailer_bytes:
        raise ref.fail(CorruptChunkError.TRUNCATED, "chunk file is truncated")
    if crc is None:
        return
    _check_trailer(ref, stored, crc)
    if verify:
        check(ref, dest, crc)


def verify_chunk(fs: ChunkFiles, ref: ChunkRef, nbytes: int, crc: int, scratch: memoryview) -> None:
    """Check a whole chunk of ``nbytes`` data bytes against ``crc`` without keeping it:
    streamed through ``scratch`` (no allocation of the chunk's size)."""
    _expect_size(fs, ref, nbytes + TRAILER_BYTES)
    running, done = 0, 0
    while done < nbytes:
        part = scratch[: min(len(scratch), nbytes - done)]
        got = _read(fs, ref, [part], done)
        if got != len(part):
            raise ref.fail(CorruptChunkError.TRUNCATED, "chunk file is truncated")
        running = checksum(part, running)
        done += got
    stored = bytearray(TRAILER_BYTES)
    if _read(fs, ref, [memoryview(stored)], nbytes) != TRAILER_BYTES:
        raise ref.fail(CorruptChunkError.TRUNCATED, "chunk file is truncated")
    _check_trailer(ref, stored, crc)
    if running != crc:
        raise ref.fail(CorruptChunkError.CHECKSUM, "checksum mismatch (data corrupted)")


def read_packed(fs: ChunkFiles, ref: ChunkRef, members: Sequence[ArrayEntry]) -> memoryview:
    """The data of a packed chunk holding ``members`` (all of it, trailer excluded), checked
    whole against its trailer. Errors concern the whole chunk (``tensor`` is None) and list
    in ``tensors`` the members lost: all of them, or those whose own checksums fail."""
    checked = any(e.crc32c is not None for e in members)
    trailer_bytes = TRAILER_BYTES if checked else 0
    expected = max(e.offset + e.nbytes for e in members) + trailer_bytes
    names = [e.name for e in members]
    held = ", ".join(repr(n) for n in names[:5]) + (
        f" +{len(names) - 5} more" if len(names) > 5 else ""
    )
    whole = dataclasses.replace(ref, what=f"{ref.what} holding {held}")
    size = _size(fs, whole, lost=names)
    if size != expected:
        raise whole.fail(
            CorruptChunkError.SIZE,
            f"chunk has {size} bytes, manifest expects {expected}",
            lost=names,
        )
    buf = memoryview(bytearray(size))
    if _read(fs, whole, [buf], lost=names) != size:
        raise whole.fail(CorruptChunkError.TRUNCATED, "chunk file is truncated", lost=names)
    if not checked:
        return buf
    data, stored = decode(buf)
    if checksum(data) != stored:
        bad = [
            e.name
            for e in members
            if e.crc32c is not None and checksum(data[e.offset : e.offset + e.nbytes]) != e.crc32c
        ]
        if bad:
            problem, detail = CorruptChunkError.CHECKSUM, f"corrupted tensors {bad}"
        else:
            problem, detail = CorruptChunkError.TRAILER, "checksum trailer damaged"
        raise ref.fail(problem, f"chunk fails its checksum: {detail}", lost=bad)
    return data


def read_range(fs: ChunkFiles, ref: ChunkRef, entry: ArrayEntry, dest: memoryview) -> None:
    """Fill ``dest`` with one tensor's byte range of a packed chunk and check that range
    only (against ``entry.crc32c``): the rest of the chunk is neither read nor checked."""
    dest = dest.cast("B") if dest.format != "B" else dest
    trailer_bytes = 0 if entry.crc32c is None else TRAILER_BYTES
    size = _size(fs, ref)
    if entry.offset + entry.nbytes > size - trailer_bytes:
        raise ref.fail(CorruptChunkError.SIZE, "byte range lies beyond the packed chunk")
    if _read(fs, ref, [dest], entry.offset) != entry.nbytes:
        raise ref.fail(CorruptChunkError.TRUNCATED, "packed chunk file is truncated")
    check(ref, dest, entry.crc32c)


# -- format 2: byte ranges of a rank's data array, each with its own checksum ---------------------
def span_size(fs: ChunkFiles, ref: ChunkRef, expected: int | None = None) -> int:
    """The data array's chunk size (a reader asks once per array, not once per tensor);
    ``expected``: the size its writer recorded (format 3), any other size is damage."""
    size = _size(fs, ref)
    if expected is not None and size != expected:
        raise ref.fail(
            CorruptChunkError.SIZE,
            f"the file is {size} bytes, its writer's manifest says {expected}",
        )
    return size


def span_fits(ref: ChunkRef, offset: int, nbytes: int, size: int) -> None:
    """Refuse a byte range that lies past the end of its data array of ``size`` bytes."""
    if offset + nbytes > size:
        raise ref.fail(
            CorruptChunkError.SIZE,
            f"bytes {offset}..{offset + nbytes} lie beyond the data array's {size} bytes",
        )


BORROW_BYTES = 64 << 20  # a streamed check borrows this much at a time (memory stays bounded)


def span_parts(
    fs: ChunkFiles, ref: ChunkRef, offset: int, nbytes: int, *, size: int
) -> list[memoryview] | None:
    """The ``nbytes`` at ``offset`` of a data array of ``size`` bytes as buffers the files
    lend (mapped pages, response bodies; see ``FileSystem.borrow``), or None where they lend
    none (read into a buffer instead)."""
    span_fits(ref, offset, nbytes, size)
    try:
        parts = fs.borrow(ref.path, offset, nbytes)
    except FileNotFoundError as exc:
        raise ref.fail(CorruptChunkError.MISSING, "chunk file is missing") from exc
    except (OSError, ValueError) as exc:  # ValueError: mmap of a file that shrank to nothing
        raise ref.fail(CorruptChunkError.UNREADABLE, f"chunk file cannot be read: {exc}") from exc
    if parts is not None and sum(len(p) for p in parts) != nbytes:
        raise ref.fail(CorruptChunkError.TRUNCATED, "data array file is truncated")
    return parts


def check_parts(ref: ChunkRef, parts: Sequence[memoryview], crc: int | None) -> None:
    """:func:`check` of the concatenation of ``parts``."""
    if crc is None:
        return
    running = 0
    for part in parts:
        running = checksum(part, running)
    if running != crc:
        raise ref.fail(CorruptChunkError.CHECKSUM, "checksum mismatch (data corrupted)")


def _lent_checksum(
    fs: ChunkFiles, ref: ChunkRef, offset: int, nbytes: int, size: int
) -> int | None:
    """The crc32c of the ``nbytes`` at ``offset`` computed in the bytes the files lend (no
    copy), :data:`BORROW_BYTES` at a time; None where they lend none."""
    running, done = 0, 0
    while done < nbytes:
        parts = span_parts(fs, ref, offset + done, min(BORROW_BYTES, nbytes - done), size=size)
        if parts is None:
            return None
        for part in parts:
            running = checksum(part, running)
            done += len(part)
            part.release()
    return running


def read_span(
    fs: ChunkFiles,
    ref: ChunkRef,
    offset: int,
    dest: memoryview,
    crc: int | None,
    *,
    size: int,
    verify: bool = True,
) -> None:
    """Fill ``dest`` with the bytes at ``offset`` of a data array of ``size`` bytes and,
    unless ``verify`` is false (checked already), check them against ``crc``."""
    dest = dest.cast("B") if dest.format != "B" else dest
    span_fits(ref, offset, len(dest), size)
    if _read(fs, ref, [dest], offset) != len(dest):
        raise ref.fail(CorruptChunkError.TRUNCATED, "data array file is truncated")
    if verify:
        check(ref, dest, crc)


def verify_span(
    fs: ChunkFiles,
    ref: ChunkRef,
    offset: int,
    nbytes: int,
    crc: int | None,
    scratch: memoryview,
    *,
    size: int,
) -> None:
    """Check the ``nbytes`` at ``offset`` against ``crc`` without keeping them (in the bytes
    the files lend, else streamed through ``scratch``); with no checksum only that they lie
    inside the array."""
    span_fits(ref, offset, nbytes, size)
    if crc is None:
        return
    running = _lent_checksum(fs, ref, offset, nbytes, size)
    if running is None:  # nothing lent: streamed through ``scratch``
        running, done = 0, 0
        while done < nbytes:
            part = scratch[: min(len(scratch), nbytes - done)]
            if _read(fs, ref, [part], offset + done) != len(part):
                raise ref.fail(CorruptChunkError.TRUNCATED, "data array file is truncated")
            running = checksum(part, running)
            done += len(part)
    if running != crc:
        raise ref.fail(CorruptChunkError.CHECKSUM, "checksum mismatch (data corrupted)")
