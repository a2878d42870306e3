"""An in-memory filesystem backend: the whole seam, no disk.

For tests, and for trying a job's save and restore logic quickly in one process. It keeps
every promise of :class:`~distckpt.storage.filesystem.FileSystem` that one process can
observe (missing parents, exclusive create, atomic replace, idempotent removal); durability
calls are no-ops, since nothing outlives the process. Shared by the threads of one process.
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
import time
from collections.abc import Sequence

from distckpt.storage.filesystem import (
    Buffer,
    FileSystem,
    _conflict,
    _content_version,
    _write_error,
)


class MemoryFileSystem(FileSystem):
    """Files and directories held in dictionaries; paths are normalised POSIX paths."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        self._dirs: dict[str, set[str]] = {"/": set()}  # directory -> entry names
        self._mtimes: dict[str, float] = {"/": time.time()}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MemoryFileSystem({len(self._files)} files, {len(self._dirs)} directories)"

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _norm(path: str) -> str:
        return posixpath.normpath(posixpath.join("/", os.fspath(path)))

    def _parent_dir(self, path: str) -> str:
        """The existing parent directory of ``path``; FileNotFoundError when there is none."""
        parent = posixpath.dirname(path)
        if parent not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", parent)
        return parent

    def _add(self, path: str) -> None:
        parent = self._parent_dir(path)
        self._dirs[parent].add(posixpath.basename(path))
        now = time.time()
        self._mtimes[parent] = now
        self._mtimes[path] = now

    def _drop(self, path: str) -> None:
        parent = posixpath.dirname(path)
        self._dirs[parent].discard(posixpath.basename(path))
        self._mtimes[parent] = time.time()
        self._mtimes.pop(path, None)

    def _file(self, path: str) -> bytes:
        p = self._norm(path)
        data = self._files.get(p)
        if data is None:
            if p in self._dirs:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return data

    # -- writing -----------------------------------------------------------------------------
    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        data = b"".join(memoryview(p).cast("B") for p in parts)
        p = self._norm(path)
        with self._lock:
            try:
                if p in self._dirs:
                    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
                if p not in self._files:
                    self._add(p)
            except OSError as exc:
                raise _write_error(path, exc) from exc
            self._files[p] = data
            self._mtimes[p] = time.time()
        return len(data)

    def create_exclusive(self, path: str, data: bytes) -> None:
        p = self._norm(path)
        with self._lock:
            if p in self._files or p in self._dirs:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            self._add(p)
            self._files[p] = bytes(data)

    def publish_exclusive(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        self.create_exclusive(path, b"".join(memoryview(p).cast("B") for p in parts))

    def write_if_version(self, path: str, data: bytes, version: str | None) -> str:
        p = self._norm(path)
        with self._lock:
            current = self._files.get(p)
            if (None if current is None else _content_version(current)) != version:
                raise _conflict(path, version)
            self.write_file(p, [data])
        return _content_version(bytes(data))

    def rename(self, src: str, dst: str) -> None:
        s, d = self._norm(src), self._norm(dst)
        with self._lock:
            data = self._file(s)
            if d in self._dirs:
                raise IsADirectoryError(errno.EISDIR, "is a directory", dst)
            if s == d:
                return
            if d not in self._files:
                self._add(d)
            self._files[d] = data
            self._mtimes[d] = self._mtimes.get(s, time.time())
            del self._files[s]
            self._drop(s)

    def link(self, src: str, dst: str) -> None:
        s, d = self._norm(src), self._norm(dst)
        with self._lock:
            data = self._file(s)
            if d in self._files or d in self._dirs:
                raise FileExistsError(errno.EEXIST, "file exists", dst)
            self._add(d)
            self._files[d] = data  # bytes are immutable: sharing them is a link

    def makedirs(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            if p in self._files:
                raise _write_error(path, FileExistsError(errno.EEXIST, "is a file", path))
            missing: list[str] = []
            while p not in self._dirs:
                if p in self._files:
                    raise _write_error(path, NotADirectoryError(errno.ENOTDIR, "not a dir", p))
                missing.append(p)
                p = posixpath.dirname(p)
            for d in reversed(missing):
                self._add(d)
                self._dirs[d] = set()

    # -- reading -----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            return self._file(path)

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        with self._lock:
            data = self._file(path)
        out = out.cast("B")
        chunk = data[offset : offset + len(out)]
        out[: len(chunk)] = chunk
        return len(chunk)

    # -- inspecting --------------------------------------------------------------------------
    def size(self, path: str) -> int:
        with self._lock:
            return len(self._file(path))

    def mtime(self, path: str) -> float:
        p = self._norm(path)
        with self._lock:
            if p not in self._files and p not in self._dirs:
                raise FileNotFoundError(errno.ENOENT, "no such file or directory", path)
            return self._mtimes[p]

    def exists(self, path: str) -> bool:
        p = self._norm(path)
        with self._lock:
            return p in self._files or p in self._dirs

    def is_dir(self, path: str) -> bool:
        with self._lock:
            return self._norm(path) in self._dirs

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            return sorted(self._dirs.get(self._norm(path), ()))

    def _walk(self, top: str) -> list[str]:
        """Every directory under ``top`` (included), parents before children."""
        out = [top]
        i = 0
        while i < len(out):
            d = out[i]
            children = (posixpath.join(d, n) for n in sorted(self._dirs[d]))
            out.extend(c for c in children if c in self._dirs)
            i += 1
        return out

    def disk_usage(self, path: str) -> int:
        p = self._norm(path)
        with self._lock:
            if p not in self._dirs:
                return 0
            return sum(
                len(self._files[posixpath.join(d, n)])
                for d in self._walk(p)
                for n in self._dirs[d]
                if posixpath.join(d, n) in self._files
            )

    # -- removing ----------------------------------------------------------------------------
    def remove(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            if p in self._dirs:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            if self._files.pop(p, None) is not None:
                self._drop(p)

    def rmtree(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            if p not in self._dirs or p == "/":
                return
            for d in reversed(self._walk(p)):
                for n in self._dirs[d]:
                    child = posixpath.join(d, n)
                    self._files.pop(child, None)
                    self._mtimes.pop(child, None)
                del self._dirs[d]
            self._drop(p)

    # -- durability: nothing outlives the process --------------------------------------------
    def fsync_dir(self, path: str) -> None:
        if not self.is_dir(path):
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)

    def fsync_files(self, paths: Sequence[str]) -> None:
        for path in paths:
            self.size(path)  # a missing file fails as it does on disk
