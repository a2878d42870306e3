"""Moving one rank's tensors between memory and its zarr arrays in a row directory.

Mechanism only: bytes go straight from tensor memory to files (one writev per chunk file,
checksum trailer included) and come back into freshly allocated tensors, each verified
against the checksum its manifest recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .dtypes import spec_for, torch_dtype
from .errors import CorruptCheckpointError
from .format import (
    CRC_BYTES,
    PACKED_ARRAY,
    ZARR_JSON,
    array_document,
    checksum,
    crc_trailer,
    group_document,
    single_chunk_key,
)
from .fs import FileSystem
from .manifest import ArrayEntry
from .plan import PlannedTensor, RankPlan


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_rank_arrays(fs: FileSystem, row_dir: str, plan: RankPlan) -> list[ArrayEntry]:
    """Write every planned tensor durably; return the entries for the manifest.

    Files are written first and made durable together at the end, then their directories,
    so the whole tree survives a power loss before the manifest (the commit point) is
    published, at one batch of fsyncs instead of one stall per file.
    """
    entries: list[ArrayEntry] = []
    crcs = [checksum(byte_view(p.tensor)) for p in plan.tensors]
    packed = [(p, c) for p, c in zip(plan.tensors, crcs, strict=True) if p.packed]
    files: list[str] = []
    if packed:
        files += _write_packed(fs, row_dir, [p for p, _ in packed], plan.packed_nbytes)
    for planned, crc in zip(plan.tensors, crcs, strict=True):
        if not planned.packed:
            files += _write_own(fs, row_dir, planned, crc)
        entries.append(
            ArrayEntry(
                name=planned.name,
                array=planned.array,
                dtype=planned.spec.name,
                shape=tuple(planned.tensor.shape),
                nbytes=planned.nbytes,
                offset=planned.offset,
                crc32c=crc,
            )
        )
    fs.fsync_files(files)
    for d in sorted({os.path.dirname(f) for f in files}, key=len, reverse=True):
        fs.fsync_dir(d)
    return entries


def write_rank_group(fs: FileSystem, rank_dir: str, rank: int) -> None:
    fs.makedirs(rank_dir)
    doc = group_document({"distckpt": {"rank": rank}})
    fs.write_file(os.path.join(rank_dir, ZARR_JSON), [doc])


def _write_own(fs: FileSystem, row_dir: str, p: PlannedTensor, crc: int) -> list[str]:
    """An array of its own: ``zarr.json`` and one chunk file (not yet fsynced)."""
    array_dir = os.path.join(row_dir, p.array)
    attrs = {"distckpt": {"name": p.name, "dtype": p.spec.name}}
    shape = tuple(p.tensor.shape)
    fs.makedirs(array_dir)
    doc = os.path.join(array_dir, ZARR_JSON)
    fs.write_file(doc, [array_document(shape, p.spec, attrs)], durable=False)
    if not p.tensor.numel():
        return [doc]
    chunk = os.path.join(array_dir, single_chunk_key(len(shape)))
    fs.write_file(chunk, [byte_view(p.tensor), crc_trailer(crc)], durable=False)
    return [doc, chunk]


def _write_packed(
    fs: FileSystem, row_dir: str, tensors: Sequence[PlannedTensor], total: int
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
    fs.write_file(doc, [array_document((total,), spec, attrs)], durable=False)
    if not total:
        return [doc]
    views = [byte_view(p.tensor) for p in tensors]
    crc = 0
    for v in views:
        crc = checksum(v, crc)
    chunk = os.path.join(array_dir, single_chunk_key(1))
    fs.write_file(chunk, [*views, crc_trailer(crc)], durable=False)
    return [doc, chunk]


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

    def _fail(self, entry: ArrayEntry, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"row {self._row}, rank {self._rank}, array {entry.name!r} "
            f"({os.path.join(self._row_dir, entry.array)}): {problem}"
        )

    def read(self, entry: ArrayEntry) -> torch.Tensor:
        dtype = torch_dtype(entry.dtype)
        out = torch.empty(entry.shape, dtype=dtype)
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
        if checksum(dest) != entry.crc32c:
            raise self._fail(entry, "checksum mismatch (data corrupted)")
        return out

    def _read_chunk(self, entry: ArrayEntry, chunk: str, dest: memoryview) -> None:
        try:
            size = self._fs.size(chunk)
        except FileNotFoundError as exc:
            raise self._fail(entry, "chunk file is missing") from exc
        if size != len(dest) + CRC_BYTES:
            raise self._fail(entry, f"chunk file has {size} bytes, expected {len(dest) + 4}")
        got = self._fs.read_into(chunk, dest)
        if got != len(dest):
            raise self._fail(entry, "chunk file is truncated")
        trailer = bytearray(CRC_BYTES)
        self._fs.read_into(chunk, memoryview(trailer), offset=len(dest))
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
        pack = self._packs.get(entry.array)
        if pack is not None:
            return pack
        members = [e for e in self._entries if e.array == entry.array]
        expected = max(e.offset + e.nbytes for e in members) + CRC_BYTES
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
        data = buf[: size - CRC_BYTES]
        if checksum(memoryview(data)) != int.from_bytes(buf[-CRC_BYTES:].tobytes(), "little"):  # type: ignore[arg-type]
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
