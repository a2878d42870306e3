"""Offline verification of rows: every manifest validated, every byte re-read and checked.

Used by ``distckpt verify``. Reading goes through the library's own reader
(``rowio.RankReader``: sizes, per-tensor crc32c, chunk trailers, the packed chunk's whole
checksum), so a row that verifies here is a row ``load`` will accept. Each problem names the
row, rank and array at fault; a damaged chunk's also its chunk, kind and file, taken from the
reader's :class:`~distckpt.errors.CorruptChunkError` fields.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distckpt.dist.election import row_status
from distckpt.errors import CheckpointError, CorruptCheckpointError, CorruptChunkError
from distckpt.format import tree as codec
from distckpt.format.layout import DATA_ARRAY, SHARED_MANIFEST_VERSION, ZARR_JSON, rank_dir_name
from distckpt.format.manifest import InvalidManifest, RankManifest
from distckpt.io.globalio import check_written_chunks, check_written_pieces, written_nbytes
from distckpt.io.rowio import RankReader
from distckpt.storage.store import Store


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a row: where (row, rank, array; chunk and file for damaged
    bytes) and what (``kind``: the ``CorruptChunkError.problem`` of damaged bytes)."""

    row: int
    rank: int | None
    array: str | None  # the tensor's name, or an array path for a packed chunk
    problem: str
    chunk: tuple[int, ...] | None = None
    kind: str | None = None
    path: str | None = None

    @staticmethod
    def of_chunk(exc: CorruptChunkError, *, prefix: str = "") -> Problem:
        """The problem a reader's error describes: the tensor at fault, or the chunk's
        array when the whole chunk (holding several tensors) is damaged."""
        return Problem(
            exc.row,
            exc.rank,
            exc.tensor if exc.tensor is not None else exc.array,
            prefix + exc.detail,
            exc.chunk,
            exc.problem,
            exc.path,
        )

    def __str__(self) -> str:
        where = f"row {self.row}"
        if self.rank is not None:
            where += f", rank {self.rank}"
        if self.array is not None:
            where += f", array {self.array!r}"
        return f"{where}: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "rank": self.rank,
            "array": self.array,
            "problem": self.problem,
            "chunk": None if self.chunk is None else list(self.chunk),
            "kind": self.kind,
            "path": self.path,
        }


@dataclass
class RowReport:
    """What verifying one row found."""

    row: int
    committed: bool
    world_size: int | None
    ranks_checked: int = 0
    arrays_checked: int = 0
    bytes_checked: int = 0
    unchecksummed: int = 0  # tensors saved with checksums off: sizes checked, bytes not
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "ok": self.ok,
            "committed": self.committed,
            "world_size": self.world_size,
            "ranks_checked": self.ranks_checked,
            "arrays_checked": self.arrays_checked,
            "bytes_checked": self.bytes_checked,
            "unchecksummed": self.unchecksummed,
            "problems": [p.to_json() for p in self.problems],
        }


def check_manifest(store: Store, manifest: RankManifest) -> list[Problem]:
    """Everything in a parsed manifest that reading its tensors would not catch."""
    row, rank = manifest.row, manifest.rank
    out: list[Problem] = []
    n = len(manifest.arrays)

    def leaf(index: int, numpy: bool) -> Any:
        """A stand-in for the tensor (the structure is checked here, the bytes elsewhere)."""
        if not 0 <= index < n:
            raise CorruptCheckpointError(f"refers to tensor {index}; the manifest lists {n}")
        return np.zeros(0, dtype=np.int64) if numpy else None

    def shard(index: int) -> Any:
        if not 0 <= index < len(manifest.globals):
            raise CorruptCheckpointError(
                f"refers to global array {index}; the manifest lists {len(manifest.globals)}"
            )
        return None

    for sid, record in manifest.states.items():
        try:
            codec.decode(record.tree, leaf, shard)
        except CheckpointError as exc:
            out.append(Problem(row, rank, None, f"state {sid!r} cannot be decoded: {exc}"))
    for what, node in (("metadata", manifest.metadata), ("lead time", manifest.lead_time)):
        if node is None:
            continue
        try:
            codec.decode_metadata(node)
        except CheckpointError as exc:
            out.append(Problem(row, rank, None, f"{what} cannot be decoded: {exc}"))
    if manifest.format >= SHARED_MANIFEST_VERSION:
        return out + _check_shared(store, manifest)
    prefix = rank_dir_name(rank) + "/"
    names: set[str] = set()
    packs: dict[str, int] = {}
    for g in manifest.globals:  # format 2: pieces lie in the rank's data array
        for pc in g.pieces or ():
            array = rank_dir_name(rank)
            packs[array] = max(packs.get(array, 0), pc.offset + pc.nbytes)
    for entry in manifest.arrays:
        if entry.name in names:
            out.append(Problem(row, rank, entry.name, "listed twice in the manifest"))
        names.add(entry.name)
        if not entry.array.startswith(prefix) and entry.array != rank_dir_name(rank):
            out.append(
                Problem(row, rank, entry.name, f"array {entry.array!r} lies outside {prefix}")
            )
        if entry.packed or entry.ranged:
            packs[entry.array] = max(packs.get(entry.array, 0), entry.offset + entry.nbytes)
        else:
            out += _check_array_document(store, row, rank, entry.name, entry.array, entry.shape)
    for array, size in packs.items():
        out += _check_array_document(store, row, rank, array, array, (size,))
    return out


def _check_shared(store: Store, manifest: RankManifest) -> list[Problem]:
    """Format 3: every byte range lies in the rank's shard of the row's data array, whose
    document has one row per rank and room for them."""
    row, rank = manifest.row, manifest.rank
    out: list[Problem] = []
    names: set[str] = set()
    end = 0
    for entry in manifest.arrays:
        if entry.name in names:
            out.append(Problem(row, rank, entry.name, "listed twice in the manifest"))
        names.add(entry.name)
        if entry.array != DATA_ARRAY:
            out.append(Problem(row, rank, entry.name, f"array {entry.array!r} is not {DATA_ARRAY}"))
        end = max(end, entry.offset + entry.nbytes)
    for g in manifest.globals:
        for pc in g.pieces or ():
            end = max(end, pc.offset + pc.nbytes)
    found = _array_document(store, row, rank, DATA_ARRAY, DATA_ARRAY)
    if isinstance(found, Problem):
        return [*out, found]
    shape = found.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and shape[0] == manifest.world_size
        and isinstance(shape[1], int)
        and shape[1] >= end
    ):
        out.append(
            Problem(
                row,
                rank,
                DATA_ARRAY,
                f"{DATA_ARRAY}/{ZARR_JSON} has shape {shape}: not one row of at least {end} "
                f"bytes for each of {manifest.world_size} ranks",
            )
        )
    return out


def _array_document(
    store: Store, row: int, rank: int, label: str, array: str
) -> dict[str, Any] | Problem:
    """The array's zarr.json, or the problem with it (missing, unreadable, not an array)."""
    path = os.path.join(store.row_dir(row), array, ZARR_JSON)
    try:
        doc = json.loads(store.fs.read_bytes(path))
    except FileNotFoundError:
        return Problem(row, rank, label, f"{ZARR_JSON} is missing ({path})")
    except (OSError, ValueError) as exc:
        return Problem(row, rank, label, f"{ZARR_JSON} is unreadable ({path}): {exc}")
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        return Problem(row, rank, label, f"{path} is not a zarr array document")
    return doc


def _check_array_document(
    store: Store, row: int, rank: int, label: str, array: str, shape: tuple[int, ...]
) -> list[Problem]:
    """The array's zarr.json exists, is a zarr v3 array and has the manifest's shape."""
    doc = _array_document(store, row, rank, label, array)
    if isinstance(doc, Problem):
        return [doc]
    if doc.get("shape") != list(shape):
        path = os.path.join(store.row_dir(row), array, ZARR_JSON)
        return [
            Problem(
                row,
                rank,
                label,
                f"{path} has shape {doc.get('shape')}, manifest says {list(shape)}",
            )
        ]
    return []


def read_rank(
    store: Store, manifest: RankManifest, on_bytes: Callable[[int], None] | None = None
) -> tuple[list[Problem], int]:
    """Read and check every tensor of one rank; returns (problems, tensors read)."""
    row, rank = manifest.row, manifest.rank
    row_dir = store.row_dir(row)
    reader = RankReader(
        store.fs,
        row_dir,
        row=row,
        rank=rank,
        entries=manifest.arrays,
        store=store.path,
        data_bytes=manifest.data_bytes,
    )
    problems: list[Problem] = []
    failed_packs: set[str] = set()
    count = 0
    for entry in manifest.arrays:
        if entry.array not in failed_packs:
            count += 1
            try:
                reader.check(entry)
            except CorruptChunkError as exc:
                whole = {CorruptChunkError.MISSING, CorruptChunkError.UNREADABLE}
                if manifest.data_bytes is not None:  # its shard's size: the whole file's
                    whole.add(CorruptChunkError.SIZE)
                if exc.tensor is None or (entry.ranged and exc.problem in whole):
                    # The whole chunk is bad: report it once, not once per tensor in it.
                    failed_packs.add(entry.array)
                problems.append(Problem.of_chunk(exc))
            except (OSError, CheckpointError) as exc:
                problems.append(Problem(row, rank, entry.name, f"cannot be read: {exc}"))
        if on_bytes is not None:
            on_bytes(entry.nbytes)
    for g in manifest.globals:  # the chunks of global arrays this rank wrote
        count += 1
        if g.pieces is not None:
            found = check_written_pieces(
                store.fs,
                row_dir,
                g,
                store=store.path,
                row=row,
                rank=rank,
                data_bytes=manifest.data_bytes,
            )
            problems += [Problem.of_chunk(bad, prefix=f"{label}: ") for label, bad in found]
        else:
            for bad in check_written_chunks(
                store.fs, row_dir, g, store=store.path, row=row, rank=rank
            ):
                problems.append(Problem.of_chunk(bad, prefix=f"chunk {bad.chunk}: "))
        if on_bytes is not None:
            on_bytes(written_nbytes(g))
    return problems, count


def _written(manifest: RankManifest) -> int:
    """Bytes one rank wrote to a row: its own arrays and its chunks of global arrays."""
    return manifest.nbytes + sum(written_nbytes(g) for g in manifest.globals)


class Verification:
    """Verification of some rows, planned (manifests read) before any data is read.

    ``total_bytes`` is known after construction, for a progress bar; :meth:`run` reads.
    """

    def __init__(self, store: Store, rows: Sequence[int]) -> None:
        self.store = store
        self.reports: dict[int, RowReport] = {}
        self.tasks: list[RankManifest] = []
        for row in rows:
            status = row_status(store, row)
            report = RowReport(row, status.committed, status.world_size)
            self.reports[row] = report
            for rank in store.manifest_ranks(row):
                try:
                    manifest = store.read_manifest(row, rank)
                except InvalidManifest as exc:
                    report.problems.append(Problem(row, rank, None, f"invalid manifest: {exc}"))
                    continue
                report.ranks_checked += 1
                report.problems += check_manifest(store, manifest)
                self.tasks.append(manifest)
            for rank in status.missing_ranks:
                if rank not in store.manifest_ranks(row):
                    report.problems.append(
                        Problem(row, rank, None, "manifest missing: this rank did not commit")
                    )
            if status.world_size is None and not status.problems:
                report.problems.append(Problem(row, None, None, "no rank committed this row"))
            for problem in status.disagreements:
                report.problems.append(Problem(row, None, None, problem))
        self.total_bytes = sum(_written(m) for m in self.tasks)

    def run(
        self, *, jobs: int = 1, on_bytes: Callable[[int], None] | None = None
    ) -> list[RowReport]:
        """Read every planned rank (``jobs`` at a time); ``on_bytes`` is called from the
        calling thread only, with the bytes read since the last call."""
        done = 0
        reported = 0
        mutex = threading.Lock()

        def count(n: int) -> None:
            nonlocal done
            with mutex:
                done += n

        def flush() -> None:
            nonlocal reported
            with mutex:
                delta, reported = done - reported, done
            if on_bytes is not None and delta:
                on_bytes(delta)

        def finish(manifest: RankManifest, result: tuple[list[Problem], int]) -> None:
            report = self.reports[manifest.row]
            report.problems += result[0]
            report.arrays_checked += result[1]
            report.bytes_checked += _written(manifest)
            report.unchecksummed += sum(1 for a in manifest.arrays if a.crc32c is None)

        if jobs <= 1:
            for manifest in self.tasks:
                finish(manifest, read_rank(self.store, manifest, count))
                flush()
        else:
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                futures = {pool.submit(read_rank, self.store, m, count): m for m in self.tasks}
                pending = set(futures)
                while pending:
                    finished, pending = concurrent.futures.wait(pending, timeout=0.2)
                    for future in finished:
                        finish(futures[future], future.result())
                    flush()
        flush()
        for report in self.reports.values():
            report.problems.sort(
                key=lambda p: (p.rank if p.rank is not None else -1, p.array or "", p.problem)
            )
        return [self.reports[r] for r in sorted(self.reports)]
