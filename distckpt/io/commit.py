"""The commit protocol: the one place that decides in what order bytes become durable.

A rank's part of a row is committed by its manifest: its data file is written and fsynced
first (dataio), then the manifest is created exclusively here (a torn manifest fails its
checksum and commits nothing). The coordinator made the row's directories and fsyncs them
once every rank committed, before the row index: no rank fsyncs a directory. Removal runs
the other way: manifests go first (the row stops counting), data after. A crash at any
instant leaves either a committed row or garbage that the election ignores and GC removes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distckpt.errors import CheckpointWriteError
from distckpt.faults import fault_point
from distckpt.format.layout import (
    ROW_DIGITS,
    ZARR_JSON,
    group_document,
    shared_data_document,
)
from distckpt.format.manifest import MAX_ROW, ArrayEntry, GlobalEntry, RankManifest
from distckpt.format.rowindex import RowIndex
from distckpt.format.shards import Layout
from distckpt.io.dataio import write_rank_data
from distckpt.logs import get_logger
from distckpt.plan.save import RankPlan
from distckpt.storage.store import Store, utcnow

log = get_logger(__name__)


@dataclass(frozen=True)
class DataShape:
    """The row's shared data array: world size, bytes per rank (L), inner chunk bytes."""

    world_size: int
    length: int
    inner: int

    def document(self) -> bytes:
        return shared_data_document(self.world_size, self.length, self.inner)


def prepare_row(store: Store, row: int, data: DataShape) -> None:
    """Create the row's group, manifests directory and data array (coordinator, before any
    rank writes).

    Refuses a row past the row space (12-digit names): its directory would be ignored by
    every election, so the save would look successful and never be resumed from."""
    if not 0 <= row <= MAX_ROW:
        raise CheckpointWriteError(
            f"row {row} is outside the row space of {store.path} (rows 0..{MAX_ROW}, "
            f"directories of {ROW_DIGITS} digits under {store.rows_dir}): remove or rename the "
            "row directories at the top of the row space, or save to a new store"
        )
    fs = store.fs
    row_dir = store.row_dir(row)
    fs.makedirs(store.manifests_dir(row))
    # manifests/ is an (empty) zarr group so zarr readers walking the row see no strangers.
    note = {"distckpt": "rank commit manifests (JSON files), not zarr data"}
    fs.write_file(os.path.join(store.manifests_dir(row), ZARR_JSON), [group_document(note)])
    doc = group_document({"distckpt": {"row": row, "created": utcnow()}})
    fs.write_file(os.path.join(row_dir, ZARR_JSON), [doc])
    make_data_array(store, row, data)
    fs.fsync_dir(row_dir)
    fs.fsync_dir(store.rows_dir)


def make_data_array(store: Store, row: int, data: DataShape) -> None:
    """The row's data directory and its ``zarr.json`` (not fsynced: the commit does that)."""
    data_dir = store.data_dir(row)
    store.fs.makedirs(data_dir)
    store.fs.write_file(os.path.join(data_dir, ZARR_JSON), [data.document()], durable=False)


def open_row_here(store: Store, row: int, name: str, data: DataShape) -> bool:
    """A rank other than the coordinator: make the row's directories where this rank sees
    none (node-local storage: its tree is not the coordinator's). One stat on a shared
    filesystem. Returns whether this rank made them (then it fsyncs them at its commit)."""
    if store.fs.exists(os.path.join(store.data_dir(row), ZARR_JSON)):
        return False
    store.create(name)
    store.fs.makedirs(store.manifests_dir(row))
    make_data_array(store, row, data)
    return True


@dataclass(frozen=True)
class RankWrite:
    """What writing one rank's data produced, for its manifest: the entries of its own
    arrays (with their checksums) and of the global chunks it wrote."""

    row: int
    rank: int
    arrays: tuple[ArrayEntry, ...]
    globals: tuple[GlobalEntry, ...]
    data_bytes: int  # the size of its shard file (0: none written)


def write_rank(
    store: Store,
    plan: RankPlan,
    row: int,
    rank: int,
    layouts: dict[str, Layout] | None,
    data: DataShape,
    *,
    checksums: bool = True,
) -> RankWrite:
    """Write this rank's data durably (files and directories fsynced): the first half of
    the rank's commit; :func:`publish_rank` is the second.

    ``layouts`` (agreed by every rank) says which boxes of the global arrays this rank
    writes. ``checksums`` applies to the rank's tensors; global pieces are always
    checksummed. Everything goes into the rank's one shard of the row's data array
    (``data``: its shape, agreed by every rank; format 3, ``dataio``).
    """
    fault_point("before_data", rank=rank, row=row)
    row_dir = store.row_dir(row)
    entries, shards, size = write_rank_data(
        store.fs, row_dir, plan, layouts or {}, rank, (data.length, data.inner), checksums=checksums
    )
    fault_point("after_data", rank=rank, row=row)
    return RankWrite(row, rank, tuple(entries), tuple(shards), size)


def publish_rank(store: Store, written: RankWrite, manifest: RankManifest) -> None:
    """Publish this rank's complete manifest: the rank's commit point.

    Takes the :class:`RankWrite` its data produced, so nothing is published before the data
    it refers to is durable; the manifest must be the one built from that write. Created
    exclusively and fsynced, no temporary name (a crash mid-write leaves a manifest that
    fails its checksum: no commit); its directory entry is made durable by
    :func:`seal_row` (or by :func:`publish_index`'s caller) once every rank committed.
    """
    if (manifest.row, manifest.rank) != (written.row, written.rank) or (
        manifest.arrays != written.arrays
        or manifest.globals != written.globals
        or manifest.data_bytes != written.data_bytes
    ):
        raise CheckpointWriteError(
            f"row {written.row}, rank {written.rank} of {store.path}: the manifest to publish "
            f"(row {manifest.row}, rank {manifest.rank}) does not list the data just written"
        )
    # Create-only: a second writer of this row (a stale job, a retried rank) can never
    # replace a committed manifest (on object stores: a PUT with If-None-Match: *).
    store.fs.create_exclusive(store.manifest_path(manifest.row, manifest.rank), manifest.to_json())
    fault_point("after_manifest", rank=manifest.rank, row=manifest.row)


def seal_row(store: Store, row: int) -> None:
    """Make the directory entries of a row's data files and manifests durable: one fsync
    each of the data and manifests directories, by whoever made them, after every rank
    committed (not one per rank)."""
    store.fs.fsync_dirs([store.data_dir(row), store.manifests_dir(row)])


def publish_index(store: Store, index: RowIndex) -> None:
    """The coordinator's row index, published atomically and create-only once every rank's
    manifest is (and :func:`seal_row` made them durable): its presence says the whole row
    committed (``election``'s fast path). Like a manifest it is never replaced: on object
    stores a PUT with ``If-None-Match: *``; ``FileExistsError`` if one is there."""
    store.fs.publish_exclusive(store.index_path(index.row), index.to_json())


def retract_rank(store: Store, row: int, rank: int) -> None:
    """Withdraw one rank's commit (its row stops counting); data is left for GC.

    Idempotent: a manifest that is not there (the publish failed before its rename) is
    fine. Removing the file is what withdraws the commit; a failing fsync of the directory
    afterwards is only logged (the removal is visible to every reader already), so that a
    failing disk cannot leave a row committed that its save reported as not committed.
    ``CheckpointWriteError`` naming the manifest when it cannot be removed."""
    path = store.manifest_path(row, rank)
    try:
        if store.fs.exists(path):
            store.fs.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CheckpointWriteError(
            f"row {row}, rank {rank} of {store.path}: cannot retract the manifest {path} "
            f"({exc}); the row may still be elected"
        ) from exc
    try:
        if store.fs.exists(store.manifests_dir(row)):
            store.fs.fsync_dir(store.manifests_dir(row))
    except OSError as exc:
        log.warning("row %d of %s: fsync after retracting rank %d: %s", row, store.path, rank, exc)


def delete_row(store: Store, row: int) -> None:
    """Uncommit ``row`` (its index, then every manifest, durably) and only then delete its
    data.

    A row directory or manifest directory that is a symbolic link is removed as the link:
    nothing is ever deleted through a link, so a link out of the store leaves its target
    untouched."""
    mdir = store.manifests_dir(row)
    if store.fs.is_link(store.row_dir(row)) or store.fs.is_link(mdir):
        if not store.fs.is_link(store.row_dir(row)):
            store.fs.rmtree(mdir)  # the link (uncommits the row), not its target
        store.fs.rmtree(store.row_dir(row))
        store.fs.fsync_dir(store.rows_dir)
        return
    store.fs.remove(store.index_path(row))
    for name in store.fs.listdir(mdir):
        store.fs.remove(os.path.join(mdir, name))
    if store.fs.exists(mdir):
        store.fs.fsync_dir(mdir)
    store.fs.rmtree(store.row_dir(row))
    store.fs.fsync_dir(store.rows_dir)
