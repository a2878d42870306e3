"""The filesystem seam: every byte distckpt puts on or takes off storage goes through here.

One small interface so a backend (local POSIX, later object stores) is one class. The local
backend writes with few syscalls straight from tensor memory and fsyncs what must be durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from distckpt.errors import CheckpointWriteError

Buffer = bytes | bytearray | memoryview


class FileSystem(ABC):
    """Storage contract used by the store and the commit protocol."""

    @abstractmethod
    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        """Create or replace ``path`` with the concatenation of ``parts``; fsync if durable."""

    @abstractmethod
    def atomic_write(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` all-or-nothing: temp file, fsync, rename, fsync dir."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    @abstractmethod
    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        """Fill ``out`` from ``path`` starting at byte ``offset``; return bytes read."""

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        """Fill ``parts`` in order from consecutive bytes of ``path``; return bytes read.

        Backends may do it in one call (the local one: one ``preadv``)."""
        got = 0
        for part in parts:
            n = self.read_into(path, part, offset + got)
            got += n
            if n < len(part.cast("B")):
                break
        return got

    @abstractmethod
    def size(self, path: str) -> int: ...

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Entry names in ``path``; empty when it does not exist."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete a file; no error when it is already gone."""

    @abstractmethod
    def rmtree(self, path: str) -> None:
        """Delete a directory tree; no error when it is already gone."""

    @abstractmethod
    def fsync_dir(self, path: str) -> None: ...

    @abstractmethod
    def fsync_files(self, paths: Sequence[str]) -> None:
        """Make already written files durable, together (lets the filesystem batch them)."""

    def fsync_dirs(self, paths: Sequence[str]) -> None:
        """Make the entries of several directories durable (in any order)."""
        for path in paths:
            self.fsync_dir(path)


def _advance(views: list[memoryview], n: int) -> None:
    """After a vectored write or read moved ``n`` bytes: drop the buffers it finished and
    trim the one it stopped inside."""
    while n and views:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    views = [memoryview(p).cast("B") for p in parts if len(memoryview(p).cast("B"))]
    total = sum(len(v) for v in views)
    written = 0
    iov_max = 1024
    while views:
        n = os.writev(fd, views[:iov_max])
        written += n
        _advance(views, n)
    assert written == total
    return total


class LocalFileSystem(FileSystem):
    """POSIX files: the shared parallel filesystem or node-local NVMe."""

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            n = _write_all(fd, parts)
            if durable:
                os.fsync(fd)
            return n
        except OSError as exc:
            raise _write_error(path, exc) from exc
        finally:
            os.close(fd)

    def atomic_write(self, path: str, data: bytes) -> None:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            self.write_file(tmp, [data], durable=True)
            os.replace(tmp, path)
        except BaseException:
            self.remove(tmp)
            raise
        self.fsync_dir(directory)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        out = out.cast("B")
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < len(out):
                n = os.preadv(fd, [out[got:]], offset + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        views = [p.cast("B") for p in parts if len(p.cast("B"))]
        total = sum(len(v) for v in views)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while views:
                n = os.preadv(fd, views, offset + got)
                if n == 0:
                    break
                got += n
                _advance(views, n)
            assert got <= total
            return got
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise _write_error(path, exc) from exc

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_files(self, paths: Sequence[str]) -> None:
        def sync(path: str) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _write_error(path, exc) from exc
            finally:
                os.close(fd)

        if len(paths) <= 1:
            for p in paths:
                sync(p)
            return
        # fsync releases the GIL: concurrent syncs let the journal commit them together.
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            list(pool.map(sync, paths))

    def fsync_dirs(self, paths: Sequence[str]) -> None:
        if len(paths) <= 1:
            for p in paths:
                self.fsync_dir(p)
            return
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            list(pool.map(self.fsync_dir, paths))


def _write_error(path: str, exc: OSError) -> CheckpointWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"no space left writing {path}: {exc.strerror}")
    return CheckpointWriteError(f"cannot write {path}: {exc.strerror or exc}")
