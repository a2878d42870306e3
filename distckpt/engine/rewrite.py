"""Writing a migrated copy of a committed row, offline: as a new row or into a new store.

A row is never rewritten in place. Every rank's part of the source row is read, verified
and migrated in memory before anything is written; then this one process writes each
rank's part in turn, through the same commit protocol a job uses, so the new row counts
only once every rank's manifest is published.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from distckpt.dist.comm import RankInTurnComm, SingleProcessComm
from distckpt.dist.election import elect_offline, row_status
from distckpt.engine import steps as engine
from distckpt.engine.restore import read_part
from distckpt.errors import CheckpointError, MigrationError, NoCommittedRowError, StoreFormatError
from distckpt.io.commit import retract_rank
from distckpt.migrate.migrations import (
    AppliedMigration,
    MigrationRegistry,
    metadata_after,
    migrate_states,
)
from distckpt.storage import lease
from distckpt.storage.store import Store


@dataclass(frozen=True)
class MigratedRow:
    """What ``migrate_row`` wrote (``row`` is None when every state was already current)."""

    source: str
    source_row: int
    store: str
    row: int | None
    world_size: int
    applied: tuple[AppliedMigration, ...]  # rank 0's chain (every rank runs the same steps)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def migrate_row(
    source: Store,
    to_version: int,
    *,
    state: str | None = None,
    row: int | None = None,
    out: Store | None = None,
    registry: MigrationRegistry | None = None,
) -> MigratedRow:
    """Migrate ``row`` (default: the latest committed) of ``source`` to ``to_version``.

    ``state`` names the one state to migrate (default: every state of the row). The
    result is a new row of ``source``, or the first row of the new store ``out``; its
    metadata is the source row's (after any metadata operations) plus ``migrated_from``:
    the source store and row and, per state, the versions and the operations applied.
    """
    chosen = elect_offline(source) if row is None else row
    if chosen is None:
        raise NoCommittedRowError(f"no committed row in {source.path} to migrate")
    status = row_status(source, chosen)
    if not status.committed or status.world_size is None:
        raise NoCommittedRowError(f"row {chosen} of {source.path} is not committed")
    dest = out or source
    if out is not None:
        if _same_path(out.path, source.path):
            raise MigrationError(
                f"the output store {out.path} is the source store: rows are never rewritten "
                "in place (name no output store to add the migrated row to the source)"
            )
        if out.fs.exists(out.path) and out.exists() and out.rows():
            raise StoreFormatError(
                f"{out.path} already holds rows; migrate into a new (empty) store"
            )
    contents: list[engine.RowContent] = []
    applied: tuple[AppliedMigration, ...] = ()
    changed = False
    names = []
    for manifest in status.manifests:
        view = engine.RowView(source, manifest)
        if state is not None and state not in manifest.states:
            raise MigrationError(
                f"row {chosen} of {source.path}, rank {manifest.rank}, has no state {state!r} "
                f"(it holds {sorted(manifest.states)})"
            )
        wanted = [state] if state is not None else list(manifest.states)
        saved = read_part(view, SingleProcessComm(), replicas=True)
        try:
            migrated, rank_applied = migrate_states(
                saved, manifest.states, dict.fromkeys(wanted, to_version), registry
            )
        except CheckpointError as exc:
            raise type(exc)(f"row {chosen} of {source.path}, rank {manifest.rank}: {exc}") from exc
        if manifest.rank == 0:
            applied = rank_applied
        changed = changed or bool(rank_applied)
        contents.append(_content(source, chosen, view, migrated, rank_applied))
        names.append(manifest.name)
    world = status.world_size
    if not changed:
        return MigratedRow(source.path, chosen, dest.path, None, world, ())
    sent: dict[int, bytes] = {}
    new_row = -1
    done: list[int] = []
    try:
        for rank, content in enumerate(contents):
            written = engine.save_row(
                dest, RankInTurnComm(rank, world, sent), content, name=names[rank]
            )
            new_row = written.row
            done.append(rank)
    except BaseException:
        # Ranks written so far retract their manifests: the row never looks committed.
        for rank in done:
            retract_rank(dest, new_row, rank)
        raise
    finally:
        lease.release(dest)  # this offline writer is done
    return MigratedRow(source.path, chosen, dest.path, new_row, world, applied)


def _content(
    source: Store,
    row: int,
    view: engine.RowView,
    states: dict[str, Any],
    applied: tuple[AppliedMigration, ...],
) -> engine.RowContent:
    manifest = view.manifest
    done = {a.state: a for a in applied}
    schemas = {}
    versions = {}
    for sid, record in manifest.states.items():
        if sid in done:
            # The new schema's fields and digest belong to code this tool does not import:
            # only the version is recorded, and a binding class checks its own fields.
            versions[sid] = done[sid].to_version
        elif record.schema is not None and record.fields is not None:
            schemas[sid] = engine.StateSchema(record.schema, record.version, dict(record.fields))
        else:
            versions[sid] = record.version
    metadata = metadata_after(view.metadata, applied)
    metadata["migrated_from"] = {
        "store": os.path.abspath(source.path),
        "row": row,
        "states": [a.to_json() for a in applied],
    }
    return engine.RowContent(
        states=states,
        schemas=schemas,
        metadata=metadata,
        write_count=manifest.write_count,
        lead_time=view.lead_time,
        level=manifest.level,
        versions=versions,
    )


__all__ = ["MigratedRow", "migrate_row"]
