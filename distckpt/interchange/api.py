"""Import a foreign checkpoint as one new row; export a row to a foreign format.

An import parses and validates the whole source in memory first and only then writes,
through ``distckpt.save``: a source that fails anywhere leaves the store untouched (a store
that did not exist is not created).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distckpt.dist.comm import SingleProcessComm
from distckpt.dist.election import elect_offline
from distckpt.engine.api import StoreLike, committed_part, save
from distckpt.engine.restore import read_part
from distckpt.errors import (
    CheckpointSerializationError,
    ExportFormatError,
    ImportFormatError,
    NoCommittedRowError,
)
from distckpt.format import tree as codec
from distckpt.interchange.dcp import read_dcp
from distckpt.interchange.detect import (
    DCP,
    DISTCKPT,
    EXPORT_FORMATS,
    IMPORT_FORMATS,
    LIGHTNING,
    SAFETENSORS,
    TORCH,
    Detection,
)
from distckpt.interchange.detect import detect as detect_format
from distckpt.interchange.lightning import read_lightning
from distckpt.interchange.records import Exported, Imported
from distckpt.interchange.safetensors import read_safetensors, write_safetensors
from distckpt.interchange.torchfile import read_torch, write_torch
from distckpt.interchange.zarrview import ZARR as ZARR_VIEW
from distckpt.interchange.zarrview import export_zarr
from distckpt.logs import get_logger
from distckpt.storage.store import Store

log = get_logger(__name__)

READERS: dict[str, Callable[[str], Imported]] = {
    TORCH: read_torch,
    LIGHTNING: read_lightning,
    SAFETENSORS: read_safetensors,
    DCP: read_dcp,
}


@dataclass(frozen=True)
class ImportResult:
    """The row an import wrote, what was detected, and what was dropped on the way."""

    row: int
    detection: Detection
    tensors: int
    notes: tuple[str, ...]


def resolve_format(source: str | os.PathLike[str], format: str | None) -> Detection:
    """The detection for ``source``; an explicit ``format`` overrides it, with that said."""
    path = os.fspath(source)
    found = detect_format(path)
    if format is None:
        if found.format == DISTCKPT:
            raise ImportFormatError(f"{path} is already a distckpt store; nothing to import")
        if found.format is None:
            raise ImportFormatError(
                f"{path}: not a checkpoint format distckpt can import ({found.explain()}); "
                f"formats: {', '.join(IMPORT_FORMATS)}"
            )
        return found
    if format not in IMPORT_FORMATS:
        raise ImportFormatError(
            f"unknown import format {format!r}; choose one of {', '.join(IMPORT_FORMATS)}"
        )
    if found.format == format:
        return found
    seen = found.format or "nothing recognised"
    return Detection(format, path, (f"format {format} given explicitly (detected: {seen})",))


def read_source(detection: Detection) -> tuple[Imported, int]:
    """Parse and validate the source completely, in memory; ImportFormatError otherwise.

    Returns what was read and its number of tensors.
    """
    assert detection.format is not None
    imported = READERS[detection.format](detection.path)
    if not imported.state:
        raise ImportFormatError(f"{detection.path}: holds no tensors or values to import")
    leaves: list[codec.Leaf] = []
    try:
        codec.encode(imported.state, leaves)
    except CheckpointSerializationError as exc:
        raise ImportFormatError(f"{detection.path}: {exc}") from None
    return imported, len(leaves)


def import_report(
    source: str | os.PathLike[str],
    store: StoreLike,
    *,
    format: str | None = None,
    **metadata: Any,
) -> ImportResult:
    """Like :func:`import_checkpoint`, returning what was detected and dropped too."""
    detection = resolve_format(source, format)
    imported, tensors = read_source(detection)
    record: dict[str, Any] = {
        "imported_from": os.path.abspath(detection.path),
        "import_format": detection.format,
        "import_evidence": detection.explain(),
        **imported.metadata,
    }
    if imported.notes:
        record["import_notes"] = list(imported.notes)
        for note in imported.notes:
            log.warning("importing %s: %s", detection.path, note)
    record.update(metadata)
    try:
        row = save(imported.state, store, comm=SingleProcessComm(), **record)
    except CheckpointSerializationError as exc:  # e.g. a sparse tensor; nothing was written
        raise ImportFormatError(f"{detection.path}: {exc}") from None
    return ImportResult(row, detection, tensors, imported.notes)


def import_checkpoint(
    source: str | os.PathLike[str],
    store: StoreLike,
    *,
    format: str | None = None,
    **metadata: Any,
) -> int:
    """Import a torch.save file, Lightning ``.ckpt``, safetensors file or DCP directory
    into ``store`` as a new row (single process); returns the row id.

    ``format`` overrides detection (one of ``torch``, ``lightning``, ``safetensors``,
    ``dcp``). The row's metadata records the source path, the format and why it was
    detected, plus ``metadata``. Raises ImportFormatError, writing nothing, for a source
    that is damaged, unknown, or would need code from the file to load.
    """
    return import_report(source, store, format=format, **metadata).row


def read_row(store: StoreLike, row: int | None = None, rank: int = 0) -> tuple[int, Any]:
    """The committed row (default: the latest) and one rank's full state tree, offline."""
    st = store if isinstance(store, Store) else Store(store)
    chosen = elect_offline(st) if row is None else row
    if chosen is None:
        raise NoCommittedRowError(f"no committed row in {st.path} to export")
    view = committed_part(st, chosen, rank)
    return chosen, read_part(view, SingleProcessComm())


def export_row(
    store: StoreLike,
    dest: str | os.PathLike[str],
    *,
    format: str,
    row: int | None = None,
    rank: int = 0,
) -> Exported:
    """Write one rank's state of a committed row (default: the latest) to ``dest``.

    ``safetensors``: tensors under dotted names, the row's whole tree (nesting, non-tensor
    values) as JSON in ``__metadata__``. ``torch``: a ``torch.save`` file that
    ``torch.load(weights_only=True)`` reads. ``zarr``: a directory, a zarr v3 group with
    one array per logical tensor of its global shape (every rank's tensors; ``rank`` is
    not used). ``dest`` appears complete or not at all.
    """
    if format not in EXPORT_FORMATS:
        raise ExportFormatError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    out = os.fspath(dest)
    if format == ZARR_VIEW:
        return export_zarr(store if isinstance(store, Store) else Store(store), out, row=row)
    chosen, tree = read_row(store, row, rank)
    if format == SAFETENSORS:
        count = write_safetensors(tree, out)
        return Exported(out, format, chosen, rank, count)
    leaves: list[codec.Leaf] = []
    codec.encode(tree, leaves)
    try:
        notes = write_torch(tree, out)
    except ExportFormatError as exc:
        raise ExportFormatError(f"cannot export row {chosen} to {out}: {exc}") from None
    return Exported(out, format, chosen, rank, len(leaves), tuple(notes))
