"""``distckpt export --format zarr``: a per-tensor zarr v3 view of a committed row.

A row stores each rank's bytes in one data array (format 2), which keeps files per rank
bounded but is not what someone opening weights with zarr or xarray wants. The view is a
zarr v3 group with one array per logical tensor, of its global shape: a global (sharded)
tensor assembled from every rank's pieces, a tensor of a state saved alike on every rank
once, and any other tensor under ``rank_NNNNNN/``. Arrays are one chunk, crc32c-checked,
the same documents as format 1's arrays; names are escaped state paths
(``model%2Fw``). The view is written beside ``dest`` and renamed into place, so it
appears complete or not at all.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

from distckpt.dist.election import elect_offline, row_status
from distckpt.errors import ExportFormatError, NoCommittedRowError
from distckpt.format import chunks
from distckpt.format.dtypes import spec_for, torch_dtype
from distckpt.format.layout import (
    ZARR_JSON,
    array_document,
    group_document,
    rank_dir_name,
    single_chunk_key,
)
from distckpt.format.manifest import ArrayEntry, RankManifest
from distckpt.format.names import escape_component
from distckpt.interchange.records import Exported
from distckpt.io.digests import _tensor_indices
from distckpt.io.globalio import GlobalReader, GlobalValue
from distckpt.io.rowio import RankReader, byte_view
from distckpt.plan.load import saved_alike
from distckpt.storage.filesystem import LocalFileSystem
from distckpt.storage.store import Store

ZARR = "zarr"  # the same name as ``detect.ZARR``


def export_zarr(store: Store, dest: str, *, row: int | None = None) -> Exported:
    """Write the per-tensor view of ``row`` (default: the latest committed) to ``dest``."""
    chosen = elect_offline(store) if row is None else row
    if chosen is None:
        raise NoCommittedRowError(f"no committed row in {store.path} to export")
    status = row_status(store, chosen)
    if not status.committed or status.world_size is None:
        raise NoCommittedRowError(f"row {chosen} of {store.path} is not committed")
    if os.path.exists(dest):
        raise ExportFormatError(f"{dest} exists; the zarr view is written to a new directory")
    manifests = list(status.manifests)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dest)), f".{uuid.uuid4().hex}.tmp")
    fs = LocalFileSystem()
    fs.makedirs(tmp)
    attrs = {"distckpt_export": {"store": store.path, "row": chosen}}
    fs.write_file(os.path.join(tmp, ZARR_JSON), [group_document(attrs)])
    count = 0
    try:
        for where, name, tensor in _tensors(store, chosen, status.world_size, manifests):
            _write_array(fs, os.path.join(tmp, where), name, tensor)
            count += 1
        fs.rename(tmp, dest)
    except BaseException:
        fs.rmtree(tmp)
        raise
    return Exported(dest, ZARR, chosen, 0, count)


def _tensors(
    store: Store, row: int, world_size: int, manifests: list[RankManifest]
) -> Iterator[tuple[str, str, Any]]:
    """(relative array path, state path, tensor) for every logical tensor of the row."""
    reader = GlobalReader(store, row, world_size)
    seen: set[str] = set()
    for m in manifests:
        for g in m.globals:
            if g.name not in seen:
                seen.add(g.name)
                yield escape_component(g.name), g.name, GlobalValue(g, reader).full()
    alike = {sid for sid in manifests[0].states if saved_alike(manifests, sid)}
    for m in manifests:
        rows = RankReader(
            store.fs,
            store.row_dir(row),
            row=row,
            rank=m.rank,
            entries=m.arrays,
            ranged=True,
            data_bytes=m.data_bytes,
        )
        for sid, record in m.states.items():
            shared = sid in alike
            if shared and m.rank != manifests[0].rank:
                continue
            for index in _tensor_indices(record.tree):
                entry: ArrayEntry = m.arrays[index]
                where = escape_component(entry.name)
                if not shared:
                    where = os.path.join(rank_dir_name(m.rank), where)
                yield where, entry.name, rows.read(entry)


def _write_array(fs: LocalFileSystem, array_dir: str, name: str, tensor: Any) -> None:
    parent = os.path.dirname(array_dir)
    if not os.path.exists(os.path.join(parent, ZARR_JSON)):
        fs.makedirs(parent)
        fs.write_file(os.path.join(parent, ZARR_JSON), [group_document({})])
    spec = spec_for(torch_dtype(str(tensor.dtype).removeprefix("torch.")))
    shape = tuple(tensor.shape)
    fs.makedirs(array_dir)
    attrs = {"distckpt": {"name": name, "dtype": spec.name}}
    fs.write_file(os.path.join(array_dir, ZARR_JSON), [array_document(shape, spec, attrs)])
    if tensor.numel():
        parts, _ = chunks.encode([byte_view(tensor.contiguous())])
        fs.write_file(os.path.join(array_dir, single_chunk_key(len(shape))), parts)
