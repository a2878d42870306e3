"""The filesystem seam: every byte distckpt puts on or takes off storage goes through here.

One small interface so a backend (local POSIX, later object stores) is one class. The local
backend writes with few syscalls straight from tensor memory and fsyncs what must be durable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import stat
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from distckpt.errors import CheckpointWriteError, VersionConflictError

Buffer = bytes | bytearray | memoryview
# link(2) errors of filesystems without hard links (publish_exclusive then claims the name).
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})


class FileSystem(ABC):
    """Storage contract used by the store, the commit protocol, the lease and the tools.

    Paths are plain strings joined with ``os.path.join``. Reading or sizing a missing file
    raises ``FileNotFoundError``; a failed write raises ``CheckpointWriteError`` naming the
    file (``no space left`` when the device is full). Removals are idempotent.
    """

    #: False on object stores: a directory is implied by the paths of its files, so
    #: ``makedirs`` creates nothing, a write never fails for a missing parent, an empty
    #: directory does not exist, and the fsync calls are no-ops (a finished PUT is durable).
    real_directories: bool = True
    #: True where :meth:`write_if_version` is atomic by itself (a conditional PUT on the
    #: object's ETag), so the writer lease needs no lock file around its changes.
    native_compare_and_swap: bool = False

    @property
    def stage_verified_reads(self) -> bool:
        """Whether a verified load should read each byte once, into staging (checked
        there, then copied into live memory), rather than stream a checksum pass and read
        again: true where every read is a request to a remote store (no page cache)."""
        return not self.real_directories

    # -- writing -----------------------------------------------------------------------------
    @abstractmethod
    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        """Create or replace ``path`` with the concatenation of ``parts``; fsync if durable.

        The parent directory must exist. Returns the bytes written."""

    def atomic_write(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        """Publish ``data`` at ``path`` all-or-nothing and durably: readers see the old
        content or the new one, never a part. The package's one atomic-write helper.

        Temp file beside ``path``, fsync, rename over ``path``, fsync of the directory; the
        temp file is removed when any step fails."""
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            self.write_file(tmp, parts, durable=True)
            self.rename(tmp, path)
        except BaseException:
            self.remove(tmp)
            raise
        self.fsync_dir(directory or ".")

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data`` (durably) only if no entry of that name exists.

        Of several processes creating the same path at once exactly one succeeds; the others
        get ``FileExistsError``. ``FileNotFoundError`` when the parent directory is missing.
        The lease lock relies on this."""

    def publish_exclusive(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        """Publish ``data`` at ``path`` all-or-nothing and durably, only if no entry of that
        name exists (``FileExistsError`` otherwise, the existing content kept): a commit that
        a second writer can never overwrite.

        Temp file beside ``path``, fsync, hard link to ``path`` (atomic and exclusive), temp
        file removed, directory fsynced. Where the filesystem has no hard links, an empty
        file claims the name exclusively first and the temp file is renamed over it (readers
        may see it empty for a moment: an empty manifest is no commit). Object stores: one
        create-only conditional PUT."""
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            self.write_file(tmp, parts, durable=True)
            try:
                self.link(tmp, path)
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                self.create_exclusive(path, b"")
                self.rename(tmp, path)
        finally:
            self.remove(tmp)
        self.fsync_dir(directory or ".")

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """The content of ``path`` and an opaque version of it, for
        :meth:`write_if_version`; ``FileNotFoundError`` when missing. The default version is
        a digest of the content; object stores use the ETag."""
        data = self.read_bytes(path)
        return data, _content_version(data)

    @abstractmethod
    def write_if_version(self, path: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap: replace ``path`` with ``data`` (atomically, durably) only if its
        version is still ``version`` (None: only if ``path`` does not exist); returns the new
        version. ``VersionConflictError`` when the file changed meanwhile, leaving the
        winner's content. Of several writers holding the same version exactly one wins."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` atomically, replacing a file at ``dst``.

        ``FileNotFoundError`` when ``src`` is missing."""

    @abstractmethod
    def link(self, src: str, dst: str) -> None:
        """Give the file ``src`` the second name ``dst`` (a hard link, or a copy where the
        backend has no links); ``FileExistsError`` if ``dst`` exists, never replacing it."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create ``path`` and its missing parents; no error when it exists."""

    # -- reading -----------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole content of the file ``path``."""

    @abstractmethod
    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        """Fill ``out`` from ``path`` starting at byte ``offset``; return bytes read (fewer
        than ``len(out)`` only at the end of the file)."""

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``path`` from ``offset`` (fewer at the end of the file)."""
        buf = bytearray(length)
        n = self.read_into(path, memoryview(buf), offset)
        return bytes(buf[:n])

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

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None:
        """Bytes ``[offset, offset + nbytes)`` of ``path`` (fewer at its end) as buffers the
        backend already holds, in order, without a copy into a caller's buffer (an object
        store's response bodies); None where it has none to lend (read with
        :meth:`read_into`)."""
        return None

    def read_threads(self, cores: int) -> int:
        """Threads one reader uses on a rank with ``cores`` cores to itself. Reads served
        from memory (the page cache) are copies and checksums, CPU work: no more threads
        than cores (two ranks of two threads each on two cores loaded 10-15% slower than
        one thread each). Backends whose reads wait on a network override it."""
        return max(1, min(4, cores))

    def open_reads(self) -> ReadHandles:
        """A reader-scoped view for the reads of one load: each file is opened once for
        all the sizes and byte ranges asked of it (a parallel filesystem's metadata server
        pays per open), instead of once per read. The default opens nothing itself and
        passes every call on (object stores: each read is one ranged GET anyway)."""
        return ReadHandles(self)

    # -- inspecting --------------------------------------------------------------------------
    @abstractmethod
    def size(self, path: str) -> int:
        """Bytes in the file ``path``."""

    @abstractmethod
    def mtime(self, path: str) -> float:
        """Last modification of the file or directory ``path``, seconds since the epoch."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory ``path`` exists."""

    @abstractmethod
    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory (False when missing or a file)."""

    def is_link(self, path: str) -> bool:
        """Whether ``path`` itself is a symbolic link (backends without links: never).
        Deleting code asks first, so that it removes a link and never what it points to."""
        return False

    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Entry names in ``path`` (files and directories, any order); empty when it does
        not exist."""

    def identity(self, path: str) -> str:
        """A key equal for every spelling of the same entry on this storage, and different
        for entries of other backends or instances (keys per-process tables of stores)."""
        return f"{type(self).__name__}@{id(self):x}:{os.path.normpath(path)}"

    @abstractmethod
    def disk_usage(self, path: str) -> int:
        """Bytes of the files under the directory ``path`` (0 when missing); links are
        counted as themselves, never followed."""

    # -- removing ----------------------------------------------------------------------------
    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete a file; no error when it is already gone."""

    @abstractmethod
    def rmtree(self, path: str) -> None:
        """Delete a directory tree; no error when it is already gone. Never follows a
        symbolic link out of the tree (a link is removed, not its target). Removes all it
        can, then raises an ``OSError`` naming the first path it could not remove."""

    # -- durability --------------------------------------------------------------------------
    @abstractmethod
    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (creations, renames, removals) durable."""

    @abstractmethod
    def fsync_files(self, paths: Sequence[str]) -> None:
        """Make already written files durable, together (lets the filesystem batch them)."""

    def fsync_dirs(self, paths: Sequence[str]) -> None:
        """Make the entries of several directories durable (in any order)."""
        for path in paths:
            self.fsync_dir(path)


class ReadHandles:
    """The reads of one reader (sizes and byte ranges of data files), by path.

    This default passes each call to its file system. Backends whose reads cost an open
    keep the files open until :meth:`close` (or until the handles are collected), so a
    load opens each data file it reads once. Files must not be replaced while a reader
    holds them (a committed row's files never are).
    """

    #: Whether :meth:`borrow` lends bytes already in this process's memory (mapped pages):
    #: borrowing them again costs no request.
    lends_in_memory: bool = False

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def size(self, path: str) -> int:
        return self.fs.size(path)

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        return self.fs.read_into(path, out, offset)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        return self.fs.read_into_parts(path, parts, offset)

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None:
        """:meth:`FileSystem.borrow` through these handles: local files lend their mapped
        page cache (a checksum or a strided copy reads the bytes in place), object stores
        their response bodies; None: copy out with :meth:`read_into`."""
        return self.fs.borrow(path, offset, nbytes)

    def close(self) -> None:
        """Release what the handles hold; later reads open files again."""


_READS = ("size", "read_into", "read_into_parts")

# "0": local reads copy into buffers instead of reading mapped files in place.
MAPPED_READS_ENV = "DISTCKPT_MAPPED_READS"

# Files a local reader keeps open at once (format 2 reads one data file per saved rank;
# format 1 rows have a file per tensor, each read once or twice, so a small LRU serves both).
OPEN_FILES = 64


class _LocalReadHandles(ReadHandles):
    """Local files opened once (``O_NOFOLLOW``, regular files only, as every read here),
    sized by ``fstat`` and read by ``preadv`` on the kept descriptor; safe across threads:
    a descriptor in use is never closed (least recently used idle ones are)."""

    def __init__(self, fs: FileSystem) -> None:
        super().__init__(fs)
        self._lock = threading.Lock()
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, users]
        self._maps: dict[str, mmap.mmap] = {}
        # A page that fails to read through a mapping is SIGBUS, not an error: sites whose
        # filesystem may fail reads (client evictions) can turn mapping off.
        self._map_files = os.environ.get(MAPPED_READS_ENV, "1") != "0"
        self.lends_in_memory = self._map_files
        self._finalizer = weakref.finalize(self, _close_all, self._open, self._lock)

    def _acquire(self, path: str) -> int:
        with self._lock:
            held = self._open.get(path)
            if held is not None:
                held[1] += 1
                self._open.move_to_end(path)
                return held[0]
            # Opened under the lock: threads asking for the same file at once share one open.
            fd = _open_regular(path)
            self._open[path] = [fd, 1]
            idle = [p for p, (_, users) in self._open.items() if not users]
            for p in idle[: max(0, len(self._open) - OPEN_FILES)]:
                os.close(self._open.pop(p)[0])
        return fd

    def _release(self, path: str) -> None:
        with self._lock:
            self._open[path][1] -= 1

    def size(self, path: str) -> int:
        fd = self._acquire(path)
        try:
            return os.fstat(fd).st_size
        finally:
            self._release(path)

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        return self.read_into_parts(path, [out], offset)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        fd = self._acquire(path)
        try:
            return _preadv_all(fd, parts, offset)
        finally:
            self._release(path)

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None:
        whole = self._mapping(path)
        if whole is None:
            return None
        with whole:
            return [whole[offset : offset + nbytes]]

    def _mapping(self, path: str) -> memoryview | None:
        """Mapped once per file for the handles' life (a committed row's files never change;
        readers check the size first, so no access lies past the end)."""
        if not self._map_files:
            return None
        with self._lock:
            held = self._maps.get(path)
        if held is None:
            fd = self._acquire(path)
            try:
                size = os.fstat(fd).st_size
                if not size:
                    return None  # an empty file cannot be mapped (and holds nothing)
                held = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            finally:
                self._release(path)
            with self._lock:
                held = self._maps.setdefault(path, held)
        return memoryview(held)

    def close(self) -> None:
        _close_all(self._open, self._lock)
        with self._lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            with contextlib.suppress(BufferError):  # a view still in use: unmapped when freed
                m.close()


def _close_all(files: OrderedDict[str, list[int]], lock: threading.Lock) -> None:
    with lock:
        while files:
            os.close(files.popitem()[1][0])


def _preadv_all(fd: int, parts: Sequence[memoryview], offset: int) -> int:
    """Fill ``parts`` from ``offset`` (fewer bytes only at the end of the file)."""
    views = [p.cast("B") for p in parts if len(p.cast("B"))]
    got = 0
    while views:
        n = os.preadv(fd, views, offset + got)
        if n == 0:
            break
        got += n
        _advance(views, n)
    return got


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

    def create_exclusive(self, path: str, data: bytes) -> None:
        # O_EXCL: exclusive on the server also on NFSv3+ and Lustre.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, [data])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.remove(path)
            raise
        os.close(fd)

    def write_if_version(self, path: str, data: bytes, version: str | None) -> str:
        if version is None:
            try:
                self.publish_exclusive(path, data)
            except FileExistsError:
                raise _conflict(path, version) from None
            return _content_version(data)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _conflict(path, version) from None
        try:
            # Writers of this file serialise on a lock of the inode they opened; one that
            # waited finds the name now points at a new inode (the winner's) and loses.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same or _content_version(_read_fd(fd)) != version:
                raise _conflict(path, version)
            self.atomic_write(path, data)
            return _content_version(data)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def read_bytes(self, path: str) -> bytes:
        fd = _open_regular(path)
        try:
            size = os.fstat(fd).st_size
            chunks: list[bytes] = []
            while True:  # to the end, also if the file grew since fstat
                chunk = os.read(fd, max(size, 1 << 16))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        finally:
            os.close(fd)

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        fd = _open_regular(path)
        try:
            return _preadv_all(fd, [out], offset)
        finally:
            os.close(fd)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        fd = _open_regular(path)
        try:
            return _preadv_all(fd, parts, offset)
        finally:
            os.close(fd)

    def open_reads(self) -> ReadHandles:
        cls = type(self)
        if any(getattr(cls, m) is not getattr(LocalFileSystem, m) for m in _READS):
            return ReadHandles(self)  # a subclass that watches or alters reads sees each one
        return _LocalReadHandles(self)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def mtime(self, path: str) -> float:
        return os.stat(path).st_mtime

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_link(self, path: str) -> bool:
        return os.path.islink(path)

    def identity(self, path: str) -> str:
        return os.path.realpath(path)  # one file system: every handle names the same files

    def disk_usage(self, path: str) -> int:
        total = 0
        for dirpath, _, files in os.walk(path):  # never descends into linked directories
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

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
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            # A link: the link itself, never what it points to; a file where a tree was
            # expected: that file.
            self.remove(path)
            return
        failed: list[OSError] = []

        def note(function: object, where: str, info: tuple[type, BaseException, object]) -> None:
            exc = info[1]
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                if exc.filename is None:
                    exc.filename = where
                failed.append(exc)

        # shutil's fd-based walk unlinks links inside the tree instead of following them.
        # It goes on past what it cannot remove (freeing what it can: on a full disk the
        # rest may need the space); the first failure is then raised, naming its path.
        shutil.rmtree(path, onerror=note)
        if failed:
            raise failed[0]

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as exc:  # os.fsync's error names no file: name the directory
            raise _write_error(path, exc) from exc
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


def _content_version(data: bytes) -> str:
    return f"{len(data)}-{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _conflict(path: str, version: str | None) -> VersionConflictError:
    if version is None:
        return VersionConflictError(f"{path} exists: it was created by another writer", path)
    return VersionConflictError(
        f"{path} changed since it was read (version {version}): another writer replaced it",
        path,
        version,
    )


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_regular(path: str) -> int:
    """Open a file of the store for reading, refusing what is not a plain file.

    ``O_NONBLOCK``: opening a FIFO would otherwise wait for a writer forever (and a device
    may block); ``O_NOFOLLOW``: distckpt never writes links inside a store, so a link where
    a file belongs is damage (or an attempt to read through it), not data. Raises an
    ``OSError`` naming ``path``, which readers already treat as an unreadable file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENXIO and _is_special(path)):
            kind = "a symbolic link" if os.path.islink(path) else "not a regular file"
            raise OSError(exc.errno, f"{kind}: refusing to read it", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else f"a {_kind(mode)}"
            raise OSError(errno.EINVAL, f"{kind}, not a regular file: refusing to read it", path)
        os.set_blocking(fd, True)  # a regular file: clearing O_NONBLOCK changes nothing else
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_special(path: str) -> bool:
    with contextlib.suppress(OSError):
        return not stat.S_ISREG(os.lstat(path).st_mode)
    return False


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _write_error(path: str, exc: OSError) -> CheckpointWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"no space left writing {path}: {exc.strerror}")
    return CheckpointWriteError(f"cannot write {path}: {exc.strerror or exc}")
