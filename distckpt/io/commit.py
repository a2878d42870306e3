"""The commit protocol: the one place that decides in what order bytes become durable.

A rank's part of a row is committed by its manifest: data files are written and fsynced
first (rowio), then the manifest is published atomically here. Removal runs the other way:
manifests go first (the row stops counting), data after. A crash at any instant leaves
either a committed row or garbage that the election ignores and GC removes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distckpt.errors import CheckpointWriteError
from distckpt.faults import fault_point
from distckpt.format.layout import ZARR_JSON, group_document
from distckpt.format.manifest import ArrayEntry, GlobalEntry, RankManifest
from distckpt.format.rowindex import RowIndex
from distckpt.format.shards import GlobalLayout
from distckpt.io.dataio import write_rank_data
from distckpt.plan.save import RankPlan
from distckpt.storage.store import Store, utcnow


def prepare_row(store: Store, row: int) -> None:
    """Create the row's group and manifests directory (coordinator, before any rank writes)."""
    fs = store.fs
    row_dir = store.row_dir(row)
    fs.makedirs(store.manifests_dir(row))
    # manifests/ is an (empty) zarr group so zarr readers walking the row see no strangers.
    note = {"distckpt": "rank commit manifests (JSON files), not zarr data"}
    fs.write_file(os.path.join(store.manifests_dir(row), ZARR_JSON), [group_document(note)])
    doc = group_document({"distckpt": {"row": row, "created": utcnow()}})
    fs.write_file(os.path.join(row_dir, ZARR_JSON), [doc])
    fs.fsync_dir(row_dir)
    fs.fsync_dir(store.rows_dir)


@dataclass(frozen=True)
class RankWrite:
    """What writing one rank's data produced, for its manifest: the entries of its own
    arrays (with their checksums) and of the global chunks it wrote."""

    row: int
    rank: int
    arrays: tuple[ArrayEntry, ...]
    globals: tuple[GlobalEntry, ...]


def write_rank(
    store: Store,
    plan: RankPlan,
    row: int,
    rank: int,
    layouts: dict[str, GlobalLayout] | None = None,
    *,
    checksums: bool = True,
) -> RankWrite:
    """Write this rank's data durably (files and directories fsynced): the first half of
    the rank's commit; :func:`publish_rank` is the second.

    ``layouts`` (agreed by every rank) says which boxes of the global arrays this rank
    writes. ``checksums`` applies to the rank's tensors; global pieces are always
    checksummed. Everything goes into the rank's one data array (format 2, ``dataio``).
    """
    fault_point("before_data", rank=rank, row=row)
    row_dir = store.row_dir(row)
    entries, shards = write_rank_data(
        store.fs, row_dir, plan, layouts or {}, rank, checksums=checksums
    )
    fault_point("after_data", rank=rank, row=row)
    return RankWrite(row, rank, tuple(entries), tuple(shards))


def publish_rank(store: Store, written: RankWrite, manifest: RankManifest) -> None:
    """Publish this rank's complete manifest atomically: the rank's commit point.

    Takes the :class:`RankWrite` its data produced, so nothing is published before the data
    it refers to is durable; the manifest must be the one built from that write.
    """
    if (manifest.row, manifest.rank) != (written.row, written.rank) or (
        manifest.arrays != written.arrays or manifest.globals != written.globals
    ):
        raise CheckpointWriteError(
            f"row {written.row}, rank {written.rank} of {store.path}: the manifest to publish "
            f"(row {manifest.row}, rank {manifest.rank}) does not list the data just written"
        )
    store.fs.atomic_write(store.manifest_path(manifest.row, manifest.rank), manifest.to_json())
    fault_point("after_manifest", rank=manifest.rank, row=manifest.row)


def publish_index(store: Store, index: RowIndex) -> None:
    """The coordinator's row index, published atomically once every rank's manifest is:
    its presence says the whole row committed (``election``'s fast path)."""
    store.fs.atomic_write(store.index_path(index.row), index.to_json())


def retract_rank(store: Store, row: int, rank: int) -> None:
    """Withdraw one rank's commit (its row stops counting); data is left for GC."""
    store.fs.remove(store.manifest_path(row, rank))
    if store.fs.exists(store.manifests_dir(row)):
        store.fs.fsync_dir(store.manifests_dir(row))


def delete_row(store: Store, row: int) -> None:
    """Uncommit ``row`` (its index, then every manifest, durably) and only then delete its
    data."""
    store.fs.remove(store.index_path(row))
    mdir = store.manifests_dir(row)
    for name in store.fs.listdir(mdir):
        store.fs.remove(os.path.join(mdir, name))
    if store.fs.exists(mdir):
        store.fs.fsync_dir(mdir)
    store.fs.rmtree(store.row_dir(row))
    store.fs.fsync_dir(store.rows_dir)
