"""S3-compatible object storage behind the FileSystem seam (AWS S3, Ceph RGW, MinIO,
SeaweedFS, R2), on ``obstore`` (the optional extra ``distckpt[s3]``).

Paths are ``s3://bucket/key`` URLs. Object stores have no directories, rename or fsync, but
since 2024 they have conditional writes, which is what the commit protocol needs: data
objects go up with plain (multipart, parallel) PUTs, each manifest with a create-only PUT
(``If-None-Match: *``) so no second writer can replace a committed row, and the writer lease
with PUTs conditional on its ETag (``If-Match``). A server that ignores either condition is
found by a probe before the first conditional write and refused, never written unsafely.

Why obstore: it wraps Rust's ``object_store`` (the client of zarr-python's ``ObjectStore``
and of Earth2Studio's IO), exposes both conditional PUT modes, uploads large objects as
multipart with parts in parallel, takes Python buffers (tensor memory) without copying them,
and releases the GIL while requests run.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import posixpath
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

from distckpt.errors import (
    CheckpointWriteError,
    StorageUnavailableError,
    UnsupportedStorageError,
    VersionConflictError,
)
from distckpt.storage.filesystem import Buffer, FileSystem

SCHEME = "s3://"
MULTIPART_CHUNK = 16 << 20  # part size of multipart uploads and of parallel ranged reads
MAX_CONCURRENCY = 8  # parts in flight per object
_MESSAGE_CHARS = 300  # of a server's error text kept in our messages

# storage_options keys that configure obstore's HTTP client and its retries; the others
# are S3 settings (endpoint, access_key_id, region, ...).
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "timeout",
        "read_timeout",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "user_agent",
    }
)
_RETRY_KEYS = frozenset({"max_retries", "retry_timeout"})
_OWN_KEYS = frozenset({"multipart_chunk_size", "max_concurrency"})


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (the key normalised, no slashes at the
    ends; ``.`` segments removed)."""
    if not url.startswith(SCHEME):
        raise ValueError(f"{url} is not an s3:// URL")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url} names no bucket")
    key = posixpath.normpath("/" + key).lstrip("/")
    return bucket, "" if key == "." else key


def _true(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


class S3FileSystem(FileSystem):
    """One bucket of an S3-compatible server; paths are ``s3://<bucket>/<key>`` URLs.

    ``options`` are flat ``storage_options``: S3 settings (``endpoint``,
    ``access_key_id``, ``secret_access_key``, ``session_token``, ``region``, ...), HTTP
    client settings (``allow_http``, ``timeout``, ``connect_timeout``, ...), retries
    (``max_retries``, ``retry_timeout`` in seconds) and this backend's own
    ``multipart_chunk_size`` and ``max_concurrency``. ``store`` replaces the obstore store
    (tests).
    """

    real_directories = False
    native_compare_and_swap = True

    def __init__(
        self, bucket: str, options: Mapping[str, Any] | None = None, *, store: Any = None
    ) -> None:
        opts = dict(options or {})
        self.bucket = bucket
        self.endpoint = str(opts.get("endpoint", "")) or "aws"
        self.chunk_size = int(opts.pop("multipart_chunk_size", MULTIPART_CHUNK))
        self.max_concurrency = int(opts.pop("max_concurrency", MAX_CONCURRENCY))
        if store is None:
            from obstore.store import S3Store  # lazily: `distckpt ls` must stay light

            client: dict[str, Any] = {k: opts.pop(k) for k in list(opts) if k in _CLIENT_KEYS}
            if "allow_http" in client:
                client["allow_http"] = _true(client["allow_http"])
            retry: dict[str, Any] = {}
            if "max_retries" in opts:
                retry["max_retries"] = int(opts.pop("max_retries"))
            if "retry_timeout" in opts:
                retry["retry_timeout"] = timedelta(seconds=float(opts.pop("retry_timeout")))
            if retry:
                retry.setdefault("max_retries", 10)
                retry.setdefault("retry_timeout", timedelta(minutes=3))
                retry["backoff"] = {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=15),
                    "base": 2,
                }
            config: Any = {k: str(v) for k, v in opts.items() if k not in _OWN_KEYS}
            store = S3Store(
                bucket,
                config=config,
                client_options=client or None,  # type: ignore[arg-type]
                retry_config=retry or None,  # type: ignore[arg-type]
            )
        self.store = store
        self._probed = False
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3FileSystem({self.bucket!r} at {self.endpoint})"

    # -- paths and errors --------------------------------------------------------------------
    def _key(self, path: str) -> str:
        bucket, key = split_url(str(path))
        if bucket != self.bucket:
            raise ValueError(f"{path} is not in bucket {self.bucket} of {self!r}")
        return key

    def _url(self, key: str) -> str:
        return f"{SCHEME}{self.bucket}/{key}"

    @staticmethod
    def _errors() -> Any:
        import obstore.exceptions

        return obstore.exceptions

    def _missing(self, exc: BaseException) -> bool:
        """Whether obstore said the object does not exist (it raises FileNotFoundError)."""
        return isinstance(exc, FileNotFoundError | self._errors().NotFoundError)

    def _read_error(self, path: str, exc: Exception, operation: str = "read") -> Exception:
        """FileNotFoundError for a missing object; StorageUnavailableError otherwise."""
        if self._missing(exc):
            return FileNotFoundError(errno.ENOENT, "no such object", path)
        return StorageUnavailableError(
            f"cannot {operation} {path} at {self.endpoint}: {_short(exc)}",
            store=path,
            operation=operation,
        )

    def _write_error(self, path: str, exc: Exception) -> CheckpointWriteError:
        return CheckpointWriteError(f"cannot write {path} at {self.endpoint}: {_short(exc)}")

    # -- writing -----------------------------------------------------------------------------
    def _put(self, key: str, parts: Sequence[Buffer], mode: Any = None) -> Any:
        """One PUT of the concatenated ``parts``: multipart with parallel parts when large
        (plain PUTs only; conditional ones are single requests), straight from the buffers."""
        import obstore

        views = [memoryview(p).cast("B") for p in parts]  # TypeError before any request
        views = [v for v in views if len(v)]
        total = sum(len(v) for v in views)
        body: Any
        if mode is not None or total <= self.chunk_size:
            body = views[0] if len(views) == 1 else b"".join(views)
            return obstore.put(self.store, key, body, mode=mode, use_multipart=False)
        body = views[0] if len(views) == 1 else iter(views)
        return obstore.put(
            self.store,
            key,
            body,
            use_multipart=True,
            chunk_size=self.chunk_size,
            max_concurrency=self.max_concurrency,
        )

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        key = self._key(path)
        try:
            self._put(key, parts)
        except TypeError:
            raise
        except Exception as exc:
            raise self._write_error(path, exc) from exc
        return sum(len(memoryview(p).cast("B")) for p in parts)

    def atomic_write(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        # A PUT is atomic: readers see the old object or the new one, never a part.
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        self.write_file(path, parts)

    def _conditional(self, path: str, data: Buffer, mode: Any) -> dict[str, Any]:
        self.check_conditional_writes(path)
        errors = self._errors()
        try:
            return self._put(self._key(path), [data], mode)
        except (errors.AlreadyExistsError, errors.PreconditionError):
            raise
        except Exception as exc:
            raise self._write_error(path, exc) from exc

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self._conditional(path, data, "create")
        except self._errors().AlreadyExistsError:
            raise FileExistsError(errno.EEXIST, "object exists", path) from None

    def publish_exclusive(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        body = b"".join(memoryview(p).cast("B") for p in parts)
        self.create_exclusive(path, body)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        import obstore

        try:
            result = obstore.get(self.store, self._key(path))
            data = bytes(result.bytes())
        except Exception as exc:
            raise self._read_error(path, exc) from exc
        etag = result.meta.get("e_tag")
        if not etag:
            raise UnsupportedStorageError(
                f"{path} at {self.endpoint} has no ETag: the server cannot guard the writer "
                "lease with conditional writes (If-Match)",
                store=path,
                feature="ETag",
            )
        return data, str(etag)

    def write_if_version(self, path: str, data: bytes, version: str | None) -> str:
        errors = self._errors()
        mode: Any = "create" if version is None else {"e_tag": version}
        try:
            result = self._conditional(path, data, mode)
        except (
            errors.AlreadyExistsError,
            errors.PreconditionError,
            errors.NotFoundError,
            FileNotFoundError,
        ):
            msg = (
                f"{path} exists: it was created by another writer"
                if version is None
                else f"{path} changed since it was read (ETag {version}): another writer "
                "replaced it"
            )
            raise VersionConflictError(msg, path, version) from None
        return str(result.get("e_tag") or "")

    def check_conditional_writes(self, where: str) -> None:
        """Probe once that the server honours ``If-None-Match: *`` and ``If-Match``, beside
        ``where``; ``UnsupportedStorageError`` naming the missing one otherwise. A server
        that ignored them would let a second writer overwrite a committed row silently."""
        if self._probed:
            return
        with self._probe_lock:
            if self._probed:
                return
            self._probe(where)
            self._probed = True

    def _probe(self, where: str) -> None:
        import obstore

        errors = self._errors()
        probe = f".distckpt-probe-{uuid.uuid4().hex}"
        key = posixpath.join(posixpath.dirname(self._key(where)), probe)

        def refuse(feature: str, why: str) -> UnsupportedStorageError:
            return UnsupportedStorageError(
                f"the S3 server at {self.endpoint} (bucket {self.bucket}) does not support "
                f"conditional writes ({feature}): {why}. distckpt needs them to commit rows "
                "safely on object storage and will not write without them",
                store=self._url(posixpath.dirname(key)),
                feature=feature,
            )

        try:
            first = self._put(key, [b"1"], "create")
            try:
                self._put(key, [b"2"], "create")
            except errors.AlreadyExistsError:
                pass
            else:
                raise refuse("If-None-Match: *", "a create-only PUT replaced an existing object")
            try:
                self._put(key, [b"3"], {"e_tag": '"distckpt-not-the-etag"'})
            except errors.PreconditionError:
                pass
            else:
                raise refuse("If-Match", "a PUT conditional on a wrong ETag succeeded")
            if not first.get("e_tag"):
                raise refuse("ETag", "a PUT returned no ETag")
        except errors.NotSupportedError as exc:
            raise refuse("conditional PUT", _short(exc)) from exc
        except UnsupportedStorageError:
            raise
        except Exception as exc:
            raise self._write_error(self._url(key), exc) from exc
        finally:
            with contextlib.suppress(Exception):
                obstore.delete(self.store, key)

    def rename(self, src: str, dst: str) -> None:
        """Server-side copy, then delete: not atomic on object stores (the package renames
        only temp files on filesystems; this backend publishes with single PUTs instead)."""
        import obstore

        try:
            obstore.copy(self.store, self._key(src), self._key(dst))
        except Exception as exc:
            raise self._read_error(src, exc, "rename") from exc
        self.remove(src)

    def link(self, src: str, dst: str) -> None:
        data = self.read_bytes(src)
        self.create_exclusive(dst, data)

    def makedirs(self, path: str) -> None:
        self._key(path)  # directories are implied by the objects' keys

    # -- reading -----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self.store, self._key(path)).bytes())
        except Exception as exc:
            raise self._read_error(path, exc) from exc

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        return self.read_into_parts(path, [out], offset)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        # One ranged GET for all the parts (a chunk and its trailer), or parallel ranges
        # when large, each copied once into place.
        views = [p.cast("B") if p.format != "B" else p for p in parts]
        total = sum(len(v) for v in views)
        if total == 0:
            self.size(path)  # a missing object fails as a read of it would
            return 0
        starts = [0]
        for v in views:
            starts.append(starts[-1] + len(v))
        got = 0
        for pos, data in self._fetch(path, offset, total):
            got += len(data)
            i = bisect.bisect_right(starts, pos) - 1
            while len(data) and i < len(views):
                at = pos - starts[i]
                k = min(len(views[i]) - at, len(data))
                views[i][at : at + k] = data[:k]
                data, pos, i = data[k:], pos + k, i + 1
        return got

    def read_threads(self, cores: int) -> int:
        # A GET waits on the server: two in flight at least, whatever the cores.
        return max(2, min(4, cores))

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None:
        # The response bodies themselves: a verified load checks them and copies them into
        # live memory once, with no staging buffer between.
        if nbytes == 0:
            self.size(path)  # a missing object fails as a read of it would
            return []
        return [data for _, data in self._fetch(path, offset, nbytes)]

    def _fetch(self, path: str, offset: int, n: int) -> list[tuple[int, memoryview]]:
        """Bytes ``[offset, offset + n)`` of ``path`` (fewer at its end) as (position from
        ``offset``, bytes) pieces: one GET, or ranges of ``chunk_size`` in parallel when
        ``n`` is large (one stream is slower than the link)."""
        import obstore

        key = self._key(path)
        if n > 2 * self.chunk_size:
            end = min(offset + n, self.size(path))
            if end <= offset:
                return []
            starts = list(range(offset, end, self.chunk_size))
            lengths = [min(self.chunk_size, end - s) for s in starts]
            try:
                datas = obstore.get_ranges(self.store, key, starts=starts, lengths=lengths)
            except Exception as exc:
                raise self._read_error(path, exc) from exc
            return [
                (s - offset, memoryview(d).cast("B")) for s, d in zip(starts, datas, strict=True)
            ]
        try:
            data = obstore.get_range(self.store, key, start=offset, length=n)
        except Exception as exc:
            if not self._missing(exc) and offset >= self.size(path):
                return []  # a range past the end: nothing to read, as on a file
            raise self._read_error(path, exc) from exc
        return [(0, memoryview(data).cast("B"))]

    # -- inspecting --------------------------------------------------------------------------
    def _head(self, path: str) -> dict[str, Any]:
        import obstore

        try:
            return obstore.head(self.store, self._key(path))  # type: ignore[return-value]
        except Exception as exc:
            raise self._read_error(path, exc, "inspect") from exc

    def size(self, path: str) -> int:
        return int(self._head(path)["size"])

    def mtime(self, path: str) -> float:
        return float(self._head(path)["last_modified"].timestamp())

    def exists(self, path: str) -> bool:
        try:
            self._head(path)
        except FileNotFoundError:
            return self.is_dir(path)
        return True

    def is_dir(self, path: str) -> bool:
        import obstore

        key = self._key(path)
        try:
            for batch in obstore.list(self.store, key or None, chunk_size=1):
                return any(m["path"] != key for m in batch)
        except Exception as exc:
            raise self._read_error(path, exc, "list") from exc
        return False

    def listdir(self, path: str) -> list[str]:
        import obstore

        key = self._key(path)
        try:
            listing = obstore.list_with_delimiter(self.store, key or None)
        except Exception as exc:
            raise self._read_error(path, exc, "list") from exc
        names = {posixpath.basename(p.rstrip("/")) for p in listing["common_prefixes"]}
        names.update(posixpath.basename(m["path"]) for m in listing["objects"] if m["path"] != key)
        return sorted(names)

    def _objects(self, path: str) -> Iterator[dict[str, Any]]:
        import obstore

        key = self._key(path)
        try:
            for batch in obstore.list(self.store, key or None, chunk_size=1000):
                yield from (m for m in batch if m["path"] != key)  # type: ignore[misc]
        except Exception as exc:
            raise self._read_error(path, exc, "list") from exc

    def identity(self, path: str) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/{self._key(path)}"

    def disk_usage(self, path: str) -> int:
        return sum(int(m["size"]) for m in self._objects(path))

    # -- removing ----------------------------------------------------------------------------
    def remove(self, path: str) -> None:
        import obstore

        try:
            obstore.delete(self.store, self._key(path))
        except Exception as exc:
            if not self._missing(exc):
                raise self._write_error(path, exc) from exc

    def rmtree(self, path: str) -> None:
        import obstore

        keys = [m["path"] for m in self._objects(path)]
        for i in range(0, len(keys), 1000):
            try:
                obstore.delete(self.store, keys[i : i + 1000])
            except Exception as exc:
                if not self._missing(exc):
                    raise self._write_error(path, exc) from exc

    # -- durability: a PUT that returned is durable ------------------------------------------
    def fsync_dir(self, path: str) -> None:
        pass

    def fsync_files(self, paths: Sequence[str]) -> None:
        pass

    def fsync_dirs(self, paths: Sequence[str]) -> None:
        pass
