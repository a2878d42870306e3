"""A store: one directory holding one named run as a zarr v3 hierarchy of rows.

Paths, the root document and manifest reading live here; what a commit is lives in
``commit``, which rows count in ``election``, and which to keep in ``retention``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections import OrderedDict
from collections.abc import Iterator

from distckpt.errors import StoreFormatError
from distckpt.format import checked
from distckpt.format.layout import (
    DATA_ARRAY,
    FORMAT_VERSION,
    MANIFESTS_DIR,
    ROW_INDEX,
    ROWS_DIR,
    ZARR_JSON,
    chunk_key,
    group_document,
    manifest_name,
    parse_manifest_name,
    parse_row_name,
    rank_data_chunk,
    rank_dir_name,
    row_name,
)
from distckpt.format.manifest import InvalidManifest, RankManifest
from distckpt.format.rowindex import RowIndex
from distckpt.storage.filesystem import FileSystem
from distckpt.storage.resolve import filesystem_for, store_path

_PARSED_MANIFESTS = 4  # parsed manifests a Store keeps (see Store.read_manifest)


def utcnow() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


class Store:
    """Handle on a store directory; cheap to create, reads nothing until asked.

    ``path`` is a directory or an ``s3://bucket/prefix`` URL; without ``fs`` its backend
    comes from :func:`~distckpt.storage.resolve.filesystem_for` (``storage_options``: S3
    settings over the AWS environment variables)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fs: FileSystem | None = None,
        *,
        storage_options: dict[str, object] | None = None,
    ) -> None:
        self.path = store_path(path)
        self.fs = fs if fs is not None else filesystem_for(path, storage_options)
        # The last few parsed manifests, by (row, rank), with the bytes they were parsed from:
        # a restore reads its own manifest in the election and again to open the row, and a
        # manifest of 10,000 entries takes ~0.1 s to parse. Equal bytes, equal manifest.
        self._parsed: OrderedDict[tuple[int, int], tuple[bytes, RankManifest]] = OrderedDict()
        self._pinned: dict[str, bytes] | None = None  # see pinned()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Within it, each manifest and row index is read from storage once.

        They are create-only: a committed row's documents never change, they only
        disappear (retraction, retention), and a load reads them in its election, to open
        its part and for the global pieces. Outside a load, every read goes to storage
        again (a session's store would otherwise miss a retracted manifest)."""
        if self._pinned is not None:
            yield
            return
        self._pinned = {}
        try:
            yield
        finally:
            self._pinned = None

    def _document(self, path: str) -> bytes:
        pinned = self._pinned
        if pinned is None:
            return self.fs.read_bytes(path)
        data = pinned.get(path)
        if data is None:
            data = pinned[path] = self.fs.read_bytes(path)
        return data

    # -- root ------------------------------------------------------------------------------
    @property
    def rows_dir(self) -> str:
        return os.path.join(self.path, ROWS_DIR)

    def root_attributes(self) -> dict[str, object] | None:
        """The root's ``distckpt`` attributes; None when the store does not exist yet.

        Refuses a directory that is not a distckpt store and a newer format version.
        """
        root = os.path.join(self.path, ZARR_JSON)
        try:
            raw = self.fs.read_bytes(root)
        except FileNotFoundError:
            # A store being created right now holds only rows/ and the root's temp file.
            foreign = [
                n
                for n in self.fs.listdir(self.path)
                if n != ROWS_DIR and not (n.startswith(f".{ZARR_JSON}.") and n.endswith(".tmp"))
            ]
            if foreign:
                raise StoreFormatError(
                    f"{self.path} exists but is not a distckpt store (no {ZARR_JSON}; "
                    f"found {sorted(foreign)[:3]})"
                ) from None
            if self.rows():  # rows are written only after the root: it was lost since
                raise StoreFormatError(
                    f"store {self.path} is damaged: its root {ZARR_JSON} is missing but it "
                    f"holds rows under {self.rows_dir}; restore {root} (or copy the rows to "
                    "a new store) rather than start over"
                ) from None
            return None
        except NotADirectoryError:
            raise StoreFormatError(
                f"{self.path} is not a directory, so not a distckpt store"
            ) from None
        except OSError as exc:
            raise StoreFormatError(
                f"the root {root} of store {self.path} cannot be read: {exc.strerror or exc}"
            ) from exc
        try:
            attrs = checked.loads_strict(raw)["attributes"]["distckpt"]
            fmt = attrs["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreFormatError(f"{root} is not a distckpt store root") from exc
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise StoreFormatError(
                f"store {self.path} has format version {fmt}; this distckpt reads up to "
                f"version {FORMAT_VERSION}: upgrade distckpt to read it"
            )
        return dict(attrs)

    def exists(self) -> bool:
        return self.root_attributes() is not None

    def create(self, name: str = "") -> None:
        """Create the root if missing; idempotent, and safe for several ranks at once
        (each publishes an equivalent root document atomically)."""
        if self.root_attributes() is not None:
            return
        self.fs.makedirs(self.rows_dir)
        rows_doc = os.path.join(self.rows_dir, ZARR_JSON)
        if not self.fs.exists(rows_doc):
            self.fs.atomic_write(rows_doc, group_document({}))
        doc = group_document(
            {"distckpt": {"format": FORMAT_VERSION, "name": name, "created": utcnow()}}
        )
        self.fs.atomic_write(os.path.join(self.path, ZARR_JSON), doc)
        self.fs.fsync_dir(self.path)

    # -- rows ------------------------------------------------------------------------------
    def rows(self) -> list[int]:
        """Row ids with a directory, ascending (committed or not)."""
        try:
            names = self.fs.listdir(self.rows_dir)
        except NotADirectoryError:
            raise StoreFormatError(
                f"store {self.path} is damaged: {self.rows_dir} is not a directory"
            ) from None
        except OSError as exc:
            raise StoreFormatError(
                f"the rows of store {self.path} cannot be listed ({self.rows_dir}: "
                f"{exc.strerror or exc})"
            ) from exc
        ids = (parse_row_name(n) for n in names)
        return sorted(i for i in ids if i is not None)

    def row_dir(self, row: int) -> str:
        return os.path.join(self.rows_dir, row_name(row))

    def rank_dir(self, row: int, rank: int) -> str:
        return os.path.join(self.row_dir(row), rank_dir_name(rank))

    def manifests_dir(self, row: int) -> str:
        return os.path.join(self.row_dir(row), MANIFESTS_DIR)

    def data_dir(self, row: int) -> str:
        """The row's shared data array (format 3)."""
        return os.path.join(self.row_dir(row), DATA_ARRAY)

    def data_file(self, row: int, rank: int) -> str:
        """Rank ``rank``'s shard of the row's data array: all its bytes of the row."""
        array, index = rank_data_chunk(True, rank)
        return os.path.join(self.row_dir(row), array, chunk_key(index))

    def manifest_path(self, row: int, rank: int) -> str:
        return os.path.join(self.manifests_dir(row), manifest_name(rank))

    def manifest_ranks(self, row: int) -> list[int]:
        """Ranks with a manifest file in ``row`` (valid or not)."""
        try:
            names = self.fs.listdir(self.manifests_dir(row))
        except NotADirectoryError:
            return []  # a file where the row or its manifests directory belongs: no commit
        ranks = (parse_manifest_name(n) for n in names)
        return sorted(r for r in ranks if r is not None)

    def read_manifest(self, row: int, rank: int) -> RankManifest:
        """This rank's manifest of ``row``; InvalidManifest if missing or not a valid commit."""
        path = self.manifest_path(row, rank)
        try:
            raw = self._document(path)
        except FileNotFoundError:
            raise InvalidManifest(f"{path} is missing") from None
        except OSError as exc:
            raise InvalidManifest(f"{path} cannot be read: {exc}") from exc
        cached = self._parsed.get((row, rank))
        if cached is not None and cached[0] == raw:
            self._parsed.move_to_end((row, rank))
            return cached[1]
        manifest = RankManifest.from_json(raw, where=path)
        if manifest.row != row or manifest.rank != rank:
            raise InvalidManifest(
                f"{path} claims row {manifest.row} rank {manifest.rank}, "
                f"expected row {row} rank {rank}"
            )
        self._parsed[(row, rank)] = (raw, manifest)
        while len(self._parsed) > _PARSED_MANIFESTS:
            self._parsed.popitem(last=False)
        return manifest

    def index_path(self, row: int) -> str:
        return os.path.join(self.row_dir(row), ROW_INDEX)

    def read_index(self, row: int) -> RowIndex | None:
        """The row's index (format 2), or None when it has none or it is not valid (then
        the manifests say everything it would have said)."""
        path = self.index_path(row)
        try:
            index = RowIndex.from_json(self._document(path), where=path)
        except (OSError, InvalidManifest):
            return None
        return index if index.row == row else None

    def disk_usage(self, row: int) -> int:
        """Bytes of the files of ``row`` (0 when it has no directory)."""
        return self.fs.disk_usage(self.row_dir(row))
