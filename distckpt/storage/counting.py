"""A filesystem backend that counts metadata operations and keeps no data bytes.

For simulating jobs of thousands of ranks on one machine (``benchmarks/scale.py``): the
namespace (files, sizes, directories) is kept exactly, so the real writer, commit, election
and load planner run unchanged, while the bytes of data files are dropped, so a 7B-parameter
state costs no memory. Each call is priced as the POSIX calls the local backend makes for
it: what a parallel filesystem's metadata server would see.

Files for which ``keep(path)`` is true (by default the JSON documents: manifests,
``zarr.json``, the lease, and their temporary names) keep their bytes and read back
exactly; any other file reads back as zeros of its recorded size. That is the one
exemption from the FileSystem contract (``tests/test_fs_contract.py`` runs the contract on
an instance that keeps everything).
"""

from __future__ import annotations

import errno
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from distckpt.storage.filesystem import Buffer, ReadHandles, _write_error
from distckpt.storage.memory import MemoryFileSystem

# The operations counted, in the order reports show them.
OPERATIONS = (
    "creates",  # a new file (write_file of a new name, create_exclusive, link)
    "mkdirs",  # a directory created
    "opens",  # a file or directory opened (to write, read or fsync)
    "fsyncs",  # fsync of a file or a directory
    "renames",
    "stats",  # size, mtime, exists, is_dir, is_link, and the check of every makedirs
    "unlinks",  # a file removed (or a removal attempted)
    "rmdirs",  # a directory removed
    "listdirs",
    "bytes_written",
    "bytes_read",
)


def keep_documents(path: str) -> bool:
    """Keep the bytes of JSON documents (manifests, ``zarr.json``, the lease) and of the
    temporary files they are published from; drop everything else."""
    name = posixpath.basename(path)
    return name.endswith(".json") or ".json." in name or name.endswith(".lock")


@dataclass(frozen=True)
class OpCounts:
    """A snapshot of the counters: operations by kind, reads by kind of file."""

    ops: dict[str, int]
    reads: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            {k: self.ops.get(k, 0) + other.ops.get(k, 0) for k in OPERATIONS},
            {
                k: self.reads.get(k, 0) + other.reads.get(k, 0)
                for k in set(self.reads) | set(other.reads)
            },
        )

    def __sub__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            {k: self.ops.get(k, 0) - other.ops.get(k, 0) for k in OPERATIONS},
            {
                k: self.reads.get(k, 0) - other.reads.get(k, 0)
                for k in set(self.reads) | set(other.reads)
            },
        )


class _Hole:
    """A data file's recorded size, standing in for its bytes."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class CountingFileSystem(MemoryFileSystem):
    """The in-memory namespace, counting every operation; data bytes are not stored.

    ``classify(path)`` names the kind of file a read is counted under in
    ``OpCounts.reads`` (default: ``json`` or ``data``).
    """

    def __init__(
        self,
        keep: Callable[[str], bool] = keep_documents,
        classify: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        self._keep = keep
        self._classify = classify or (lambda p: "json" if keep_documents(p) else "data")
        self._ops: Counter[str] = Counter()
        self._reads: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"CountingFileSystem({len(self._files)} files, {len(self._dirs)} directories)"

    def counts(self) -> OpCounts:
        with self._lock:
            return OpCounts({k: self._ops[k] for k in OPERATIONS}, dict(self._reads))

    def files(self) -> int:
        """Files present now."""
        return len(self._files)

    def directories(self) -> int:
        """Directories present now (the root included)."""
        return len(self._dirs)

    def _count(self, **ops: int) -> None:
        with self._lock:
            self._ops.update(ops)

    def _read(self, path: str, n: int, *, opened: bool = False) -> None:
        with self._lock:
            self._ops.update(opens=int(not opened), bytes_read=n)
            self._reads[self._classify(path)] += 1

    def open_reads(self) -> ReadHandles:
        return _CountingReads(self)

    # -- writing -----------------------------------------------------------------------------
    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        p = self._norm(path)
        n = sum(memoryview(x).nbytes for x in parts)
        with self._lock:
            try:
                if p in self._dirs:
                    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
                new = p not in self._files
                if new:
                    self._add(p)
            except OSError as exc:
                raise _write_error(path, exc) from exc
            if self._keep(p):
                self._files[p] = b"".join(memoryview(x).cast("B") for x in parts)
            else:
                self._files[p] = _Hole(n)  # type: ignore[assignment]
            self._mtimes[p] = time.time()
            self._ops.update(creates=int(new), opens=1, fsyncs=int(durable), bytes_written=n)
        return n

    def create_exclusive(self, path: str, data: bytes) -> None:
        super().create_exclusive(path, data)
        self._count(creates=1, opens=1, fsyncs=1, bytes_written=len(data))

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self._count(renames=1)

    def link(self, src: str, dst: str) -> None:
        super().link(src, dst)
        self._count(creates=1)

    def makedirs(self, path: str) -> None:
        with self._lock:
            before = len(self._dirs)
            super().makedirs(path)
            self._ops.update(stats=1, mkdirs=len(self._dirs) - before)

    # -- reading -----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            data = self._file(path)
            self._read(path, len(data))
        return bytes(len(data)) if isinstance(data, _Hole) else data

    def read_into(
        self, path: str, out: memoryview, offset: int = 0, *, opened: bool = False
    ) -> int:
        out = out.cast("B")
        with self._lock:
            data = self._file(path)
            n = max(0, min(len(out), len(data) - offset))
            self._read(path, n, opened=opened)
        if isinstance(data, _Hole):
            out[:n] = bytes(n)
        else:
            out[:n] = data[offset : offset + n]
        return n

    def read_into_parts(
        self, path: str, parts: Sequence[memoryview], offset: int = 0, *, opened: bool = False
    ) -> int:
        got = 0
        with self._lock:
            data = self._file(path)
            self._read(path, 0, opened=opened)
        for part in parts:
            view = part.cast("B")
            n = max(0, min(len(view), len(data) - offset - got))
            if isinstance(data, _Hole):
                view[:n] = bytes(n)
            else:
                view[:n] = data[offset + got : offset + got + n]
            got += n
            if n < len(view):
                break
        self._count(bytes_read=got)
        return got

    # -- inspecting --------------------------------------------------------------------------
    def size(self, path: str) -> int:
        self._count(stats=1)
        return super().size(path)

    def mtime(self, path: str) -> float:
        self._count(stats=1)
        return super().mtime(path)

    def exists(self, path: str) -> bool:
        self._count(stats=1)
        return super().exists(path)

    def is_dir(self, path: str) -> bool:
        self._count(stats=1)
        return super().is_dir(path)

    def is_link(self, path: str) -> bool:
        self._count(stats=1)
        return False

    def listdir(self, path: str) -> list[str]:
        self._count(listdirs=1)
        return super().listdir(path)

    # -- removing ----------------------------------------------------------------------------
    def remove(self, path: str) -> None:
        super().remove(path)
        self._count(unlinks=1)

    def rmtree(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            if p in self._dirs and p != "/":
                dirs = self._walk(p)
                files = sum(
                    1 for d in dirs for n in self._dirs[d] if posixpath.join(d, n) in self._files
                )
                # a walk opens and lists each directory, then unlinks and removes them
                self._ops.update(
                    opens=len(dirs), listdirs=len(dirs), unlinks=files, rmdirs=len(dirs)
                )
            else:
                self._ops.update(stats=1)
            super().rmtree(path)

    # -- durability --------------------------------------------------------------------------
    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self._count(opens=1, fsyncs=1)

    def fsync_files(self, paths: Sequence[str]) -> None:
        with self._lock:
            for path in paths:
                self._file(path)  # a missing file fails as it does on disk
            self._ops.update(opens=len(paths), fsyncs=len(paths))

    def fsync_dirs(self, paths: Sequence[str]) -> None:
        for path in paths:
            self.fsync_dir(path)


class _CountingReads(ReadHandles):
    """What the local backend's reader-scoped handles cost: one open per file on its
    first size or read (no stat: ``fstat`` of the open file), none for later reads."""

    fs: CountingFileSystem

    def __init__(self, fs: CountingFileSystem) -> None:
        super().__init__(fs)
        self._opened: set[str] = set()

    def _open(self, path: str) -> None:
        with self.fs._lock:
            self.fs._file(path)  # a missing file fails as the open does
            p = self.fs._norm(path)
            if p not in self._opened:
                self._opened.add(p)
                self.fs._ops.update(opens=1)

    def size(self, path: str) -> int:
        self._open(path)
        return MemoryFileSystem.size(self.fs, path)

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        self._open(path)
        return self.fs.read_into(path, out, offset, opened=True)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        self._open(path)
        return self.fs.read_into_parts(path, parts, offset, opened=True)

    def close(self) -> None:
        self._opened.clear()
