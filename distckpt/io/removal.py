"""Deleting rows spread over the ranks that wrote them, never following a link out of the store.

Retention used to delete a whole row from the coordinator alone: at 1,000 ranks millions of
unlinks by one client, while every rank waited. Here each rank removes its own part (its
manifest first, so the row stops counting, then its shard of the row's data array, or in
older rows its rank directory and the global chunks its manifest lists), all ranks at once;
the coordinator then removes what is left (the row's documents, emptied directories,
anything a killed writer left behind).

A store may hold symbolic links where it should not (a row directory replaced by a link to
elsewhere). Removal never descends through one: a path whose directories below ``rows/``
include a link is not touched by the ranks, and the coordinator's ``rmtree`` removes the
link itself, never its target.
"""

from __future__ import annotations

import os

from distckpt.format.layout import SHARED_MANIFEST_VERSION, chunk_key
from distckpt.format.manifest import InvalidManifest
from distckpt.logs import get_logger
from distckpt.storage.store import Store

log = get_logger(__name__)


def linked_below(store: Store, path: str, checked: set[str] | None = None) -> str | None:
    """The first directory between ``rows/`` and ``path`` (included) that is a symbolic
    link, or None. Paths outside ``rows/`` are refused as if linked. ``checked`` holds
    paths already found not to be links (and gains those found now): one stat per
    directory, however many files below it are removed."""
    rows = os.path.normpath(store.rows_dir)
    rel = os.path.relpath(os.path.normpath(path), rows)
    if rel == os.curdir or rel.startswith(os.pardir):
        return path
    seen = checked if checked is not None else set()
    current = rows
    for part in rel.split(os.sep):
        current = os.path.join(current, part)
        if current in seen:
            continue
        if store.fs.is_link(current):
            return current
        seen.add(current)
    return None


def remove_index(store: Store, row: int) -> None:
    """The coordinator's first act on a row retention gives up: remove its row index, so
    that no election takes the row's fast path while its ranks remove their parts."""
    path = store.index_path(row)
    if linked_below(store, path) is None:
        store.fs.remove(path)


def remove_own_part(store: Store, row: int, rank: int) -> int:
    """Remove rank ``rank``'s files of ``row``: its manifest (durably) first, then its rank
    directory and the global chunks its manifest lists. Returns the files and trees removed.

    Idempotent; a part already gone, or a row whose path passes through a link, is left to
    :func:`remove_row_rest`.
    """
    fs = store.fs
    manifest_path = store.manifest_path(row, rank)
    if linked_below(store, manifest_path) is not None:
        log.warning("row %d of %s passes through a link: left to the coordinator", row, store.path)
        return 0
    shared: bool | None = None  # format 3 (a shard of the row's data array), 2 or older
    try:
        manifest = store.read_manifest(row, rank)
        shared = manifest.format >= SHARED_MANIFEST_VERSION
        chunks = [
            os.path.join(g.array, chunk_key(index))
            for g in manifest.globals
            for index, _ in g.chunks
        ]
    except (InvalidManifest, FileNotFoundError):
        chunks = []  # nothing committed by this rank: its files are garbage for the coordinator
    removed = 0
    if fs.exists(manifest_path):
        fs.remove(manifest_path)
        fs.fsync_dir(store.manifests_dir(row))  # uncommitted before any data goes
        removed += 1
    if shared is not False:
        own = store.data_file(row, rank)
        if fs.exists(own) and linked_below(store, own) is None:
            fs.remove(own)
            removed += 1
    rank_dir = store.rank_dir(row, rank)
    if not shared and fs.exists(rank_dir) and linked_below(store, rank_dir) is None:
        fs.rmtree(rank_dir)
        removed += 1
    row_dir = store.row_dir(row)
    checked: set[str] = set()
    safe: dict[str, bool] = {}  # array directory -> no link on its path (checked once)
    for rel in chunks:
        path = os.path.join(row_dir, rel)
        parent = os.path.dirname(path)
        if parent not in safe:
            safe[parent] = linked_below(store, parent, checked) is None
        if safe[parent]:
            fs.remove(path)
            removed += 1
    return removed


def remove_row_rest(store: Store, row: int) -> None:
    """The coordinator's part, after every rank removed its own: every manifest still
    there (durably), then the rest of the row's tree (``rmtree`` removes links, never what
    they point to), then the row's entry in ``rows/``."""
    fs = store.fs
    row_dir = store.row_dir(row)
    if linked_below(store, row_dir) is None:
        mdir = store.manifests_dir(row)
        names = fs.listdir(mdir) if linked_below(store, mdir) is None else []
        for name in names:
            fs.remove(os.path.join(mdir, name))
        if names:
            fs.fsync_dir(mdir)
    fs.rmtree(row_dir)
    fs.fsync_dir(store.rows_dir)
