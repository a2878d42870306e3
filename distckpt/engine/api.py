"""The functional API for training loops, in the manner of torch.distributed.checkpoint.

``save`` writes each rank's ``state_dict`` as a new row; ``load`` fills a live
``state_dict`` in place from the elected row, onto the devices of the live tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from distckpt.dist import step
from distckpt.dist.comm import resolve
from distckpt.dist.election import elect, elect_offline, row_status
from distckpt.dist.retention import RetentionPolicy, as_policy, reading
from distckpt.engine import hooks
from distckpt.engine import steps as engine
from distckpt.engine.redistribute import (
    StateMapping,
    mapped_states,
    open_part_agreed,
    read_states,
)
from distckpt.engine.restore import execute
from distckpt.errors import (
    CheckpointError,
    CheckpointStateSchemaError,
    CollectiveStepError,
    CorruptCheckpointError,
    MigrationError,
    NoCommittedRowError,
)
from distckpt.io.marks import BadRows, bad_rows, mark_bad, mark_path
from distckpt.logs import get_logger
from distckpt.migrate.migrations import AppliedMigration, MigrationRegistry, migrate_states
from distckpt.plan.load import LoadPlan, plan_load, saved_tree
from distckpt.plan.stateful import Restorer, to_live
from distckpt.storage.store import Store

log = get_logger(__name__)

LOAD_FALLBACK = step.register("load.fallback")  # the coordinator marks a damaged row bad

StoreLike = str | os.PathLike[str] | Store
Versions = int | Mapping[str, int]


def _store(store: StoreLike) -> Store:
    return store if isinstance(store, Store) else Store(store)


def save(
    state_dict: dict[str, Any],
    store: StoreLike,
    *,
    row: int | None = None,
    comm: Any = None,
    keep: int | RetentionPolicy | None = None,
    version: Versions | None = None,
    checksums: bool = True,
    **metadata: Any,
) -> int:
    """Collective: commit every rank's ``state_dict`` as one new row; returns the row id.

    Each rank's values are its own (ranks may hold different tensors under one key).
    ``keep`` retains only the newest N committed rows afterwards (or those a
    :class:`~distckpt.dist.retention.RetentionPolicy` preserves). ``version`` is the user
    schema version of every state (top-level key), or a mapping state -> version; a later
    ``load(..., version=M)`` migrates older states to M. ``metadata`` must be JSON-like
    (scalars, lists, dicts, datetimes) and comes back from :func:`metadata`.
    ``checksums=False`` skips crc32c (the row records that; loads then cannot detect
    corrupted bytes). For saves that return before the bytes are written, see
    :class:`AsyncSaver`.
    """
    st = _store(store)
    c = resolve(comm)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"state_dict must be a dict, not {type(state_dict).__qualname__}")
    content = engine.RowContent(
        states=dict(state_dict),
        schemas={},
        metadata=metadata,
        versions=state_versions(version, state_dict, "save"),
    )
    # A state that cannot be stored is refused before the store is created or leased.
    plan = engine.plan_row(c, content)
    guard = engine.writer_lease(st, c)  # taken at this process's first save, then renewed
    manifest = engine.commit_row(
        st,
        c,
        content,
        row=row,
        checksums=checksums,
        guard=guard,
        retention=as_policy(keep),
        plan=plan,
        agreed=True,
    )
    hooks.announce(hooks.Boundary(c, manifest.row))
    return manifest.row


def load(
    state_dict: dict[str, Any],
    store: StoreLike,
    *,
    row: int | None = None,
    comm: Any = None,
    strict: bool = True,
    version: Versions | None = None,
    migrations: MigrationRegistry | None = None,
    mapping: StateMapping | None = None,
    in_place: bool = False,
    fallback: bool = True,
) -> int:
    """Collective: fill ``state_dict`` in place from the elected (or given) row.

    Tensors are copied into the live tensors (so they keep their device, e.g. ``cuda:N``);
    shapes and dtypes must match. Keys present in the row but not in ``state_dict`` are
    added (a fresh optimizer has no state yet); keys missing from the row raise unless
    ``strict=False``. With ``version`` (as in :func:`save`), states saved at an older
    version are first migrated in memory by the chain in ``migrations`` (default: the
    registry of ``register_migration``); a newer saved version is refused. Everything is
    read (or streamed and checked: sizes, byte ranges, checksums), migrated and verified on
    every rank before any live tensor is modified, so a load that raises leaves the live
    state as it was; global (sharded) tensors are read by region, whatever layout saved
    them, into staging buffers, then copied into the live DTensor, ``Sharded`` piece or
    tensor.
    A row written by another number of ranks is restored when its state can be
    redistributed: states every rank saved alike come from any rank; rank-private ones need
    ``mapping`` (a :class:`distckpt.StateMapping`) or raise ``WorldSizeMismatchError``.

    A value with ``state_dict()`` and ``load_state_dict()`` (module, optimizer, scheduler,
    ``StatefulDataLoader``, user class) is filled through its state dict, then given it
    with ``load_state_dict`` once the whole row is read and checked.

    ``in_place=True`` reads each tensor straight into its live CPU tensor when dtype and
    shape match (no second copy of the state in memory, no extra copy): faster, but if a
    checksum then fails the load raises with those live tensors holding the row's bytes,
    or part of them (everything else is untouched); load again from a good row.

    ``fallback``: when the elected row turns out damaged while it is read (a checksum, a
    missing or unreadable file), every rank agrees to mark it bad (``rows/<row>/BAD.json``,
    with the reason; later elections, ``distckpt latest`` and retention pass over it, and
    ``distckpt ls`` shows it) and to load the newest older committed row instead, with a
    warning naming the bad row and the problem; if none is left, the newest damaged row's
    error is raised (a ``CorruptCheckpointError`` naming the row, rank and file, with a note
    listing the damaged rows). ``fallback=False`` raises the damaged row's error at once
    (nothing is marked). A row named with ``row=`` never falls back.
    Returns the row id.
    """
    st = _store(store)
    c = resolve(comm)
    with st.pinned():  # each manifest and the row index read once in the whole load
        return _load(
            st, c, state_dict, row, strict, version, migrations, mapping, in_place, fallback
        )


def _load(
    st: Store,
    c: Any,
    state_dict: dict[str, Any],
    row: int | None,
    strict: bool,
    version: Versions | None,
    migrations: MigrationRegistry | None,
    mapping: StateMapping | None,
    in_place: bool,
    fallback: bool,
) -> int:
    bad = bad_rows(st)
    damaged: list[tuple[int, CorruptCheckpointError]] = []
    while True:
        try:
            chosen = engine.choose_row(st, c, row, any_world_size=True, skip=bad)
        except CheckpointError:  # nothing committed remains (at any world size)
            if not damaged:
                raise
            raise _nothing_usable(st, damaged) from None
        try:
            with reading(st, chosen):  # retention run by this process keeps the row meanwhile
                restorer = _load_row(
                    st, c, chosen, state_dict, strict, version, migrations, mapping, in_place
                )
        except CorruptCheckpointError as exc:
            if row is not None or not fallback or not _row_is_damaged(exc):
                raise
            _give_up_row(st, c, chosen, exc, bad)
            damaged.append((chosen, exc))
            continue
        restorer.restore()
        return chosen


def _load_row(
    st: Store,
    c: Any,
    chosen: int,
    state_dict: dict[str, Any],
    strict: bool,
    version: Versions | None,
    migrations: MigrationRegistry | None,
    mapping: StateMapping | None,
    in_place: bool,
) -> Restorer:
    """Collective: fill ``state_dict`` from row ``chosen``; what restores its Stateful values."""
    view = open_part_agreed(st, c, chosen)
    # At the same world size the plan reads this rank's own part straight from the
    # manifest (global arrays included), at another world size from the saved ranks'
    # parts the mapping names; migration decodes states first, then plans from them.
    # Every rank takes the same branch (the row's world size and ``version`` are the same
    # on all of them), so their collective steps stay in step.
    saved: dict[str, Any] = {}
    readers = {view.rank: view.reader}
    if view.saved_world_size == c.world_size and version is None:
        saved = step.run(
            c,
            step.LOAD_STAND_INS,
            lambda: saved_tree(dict.fromkeys(view.manifest.states, view.manifest)),
            context=f"cannot restore row {chosen}",
            fallback=CorruptCheckpointError,
        )
    elif version is None:  # another world size: reads of several saved ranks' parts
        saved, readers = mapped_states(st, c, chosen, mapping, view=view)
    else:
        saved = read_states(st, c, chosen, mapping, view=view)
        saved, _ = migrate_row_states(
            view, saved, state_versions(version, saved, "load"), migrations, c
        )
    plan, filled, restorer = _agreed_plan(c, st, chosen, saved, state_dict, strict)
    execute(
        plan,
        filled,
        c,
        row=chosen,
        readers=readers,
        globals_=view.globals_reader,
        in_place=in_place,
    )
    kept = plan.kept
    if kept:  # nothing is skipped silently
        log.warning(
            "row %d of %s has no value for %d live key(s), which kept their values: %s",
            chosen,
            st.path,
            len(kept),
            ", ".join(kept[:20]) + (" ..." if len(kept) > 20 else ""),
        )
    return restorer


def _row_is_damaged(exc: CorruptCheckpointError) -> bool:
    """Whether a failed load says the row's files are damaged (a checksum, a missing or
    unreadable file, a manifest that does not decode): then an older row may serve. A
    failure that is not the row's (out of memory, a bug: the step reports it as a
    ``CollectiveStepError``) is raised, and never marks a good row bad."""
    return not isinstance(exc, CollectiveStepError)


def _give_up_row(st: Store, comm: Any, row: int, exc: CorruptCheckpointError, bad: BadRows) -> None:
    """Collective (every rank saw the same failed step): the coordinator marks ``row`` bad
    so later elections pass over it, and every rank passes over it from now on. A mark that
    cannot be written is logged; the fallback goes on (the row stays unmarked on disk)."""

    def mark() -> str | None:
        try:
            mark_bad(st, row, str(exc))
        except CheckpointError as failure:
            return str(failure)
        return None

    failed = step.decide(
        comm,
        LOAD_FALLBACK,
        mark,
        context=f"cannot fall back from row {row} of {st.path}",
        fallback=CorruptCheckpointError,
    )
    bad.add(row)
    if comm.is_coordinator:
        log.warning(
            "row %d of %s is damaged and was marked bad (%s); falling back to an older row: %s",
            row,
            st.path,
            "the mark could not be written: " + failed if failed else mark_path(st, row),
            exc,
        )


def _nothing_usable(
    st: Store, damaged: list[tuple[int, CorruptCheckpointError]]
) -> CorruptCheckpointError:
    """The newest damaged row's own error (its class and fields: what is wrong, where),
    noting that no older committed row was left to fall back to."""
    rows = ", ".join(str(r) for r, _ in damaged)
    first = damaged[0][1]
    first.add_note(
        f"no usable row in {st.path}: row(s) {rows} are damaged (marked bad) and no older "
        "committed row remains to fall back to"
    )
    return first


def state_versions(
    version: Versions | None, states: Mapping[str, Any], what: str
) -> dict[str, int]:
    """``version`` as a mapping state -> version (an int applies to every state)."""
    if version is None:
        return {}
    if isinstance(version, Mapping):
        unknown = sorted(set(version) - set(states))
        if unknown:
            where = "the state_dict" if what == "save" else "the row"
            raise CheckpointError(f"{what}: version given for states not in {where}: {unknown}")
        return {str(k): int(v) for k, v in version.items()}
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{what}: version must be an int or a mapping, not {version!r}")
    return {str(sid): version for sid in states}


def migrate_row_states(
    view: engine.RowView,
    saved: dict[str, Any],
    targets: Mapping[str, int],
    registry: MigrationRegistry | None,
    comm: Any,
) -> tuple[dict[str, Any], tuple[AppliedMigration, ...]]:
    """Collective: migrate this rank's saved states to ``targets``; all ranks raise together
    (a newer saved version as SchemaVersionError, a missing step as MigrationError)."""
    saved, applied = step.run(
        comm,
        step.LOAD_MIGRATE,
        lambda: migrate_states(saved, view.manifest.states, targets, registry),
        context=f"row {view.row} of {view.store.path} cannot be read",
        fallback=MigrationError,
    )
    for record in applied:
        log.info(
            "row %d: migrated state %r from version %d to %d",
            view.row,
            record.state,
            record.from_version,
            record.to_version,
        )
    return saved, applied


def latest(store: StoreLike, *, comm: Any = None) -> int | None:
    """The row a restart would elect, or None. Offline unless ``comm`` is given."""
    st = _store(store)
    bad = bad_rows(st)  # rows marked bad are passed over, as load passes over them
    if comm is None:
        return elect_offline(st, skip=bad)
    return elect(st, resolve(comm), any_world_size=True, skip=bad)  # what load elects


def metadata(store: StoreLike, *, row: int | None = None, rank: int = 0) -> dict[str, Any]:
    """The metadata a rank saved with a row (default: the latest row, rank 0)."""
    st = _store(store)
    chosen = elect_offline(st, skip=bad_rows(st)) if row is None else row
    if chosen is None:
        return {}
    return committed_part(st, chosen, rank).metadata


def committed_part(st: Store, row: int, rank: int) -> engine.RowView:
    """Offline: saved rank ``rank``'s part of ``row``, which must be committed."""
    status = row_status(st, row)
    if not status.committed:
        raise NoCommittedRowError(f"row {row} of {st.path} is not committed")
    if rank not in status.valid_ranks:
        raise CheckpointError(
            f"row {row} of {st.path} has ranks 0..{len(status.valid_ranks) - 1}; no rank {rank}"
        )
    return engine.RowView(st, status.manifests[status.valid_ranks.index(rank)])


def _agreed_plan(
    comm: Any, st: Store, row: int, saved: dict[str, Any], live: dict[str, Any], strict: bool
) -> tuple[LoadPlan, dict[str, Any], Restorer]:
    """Collective: the plan filling ``live``; every rank raises if any rank's does not fit.

    Stateful values of ``live`` are planned as their state dicts (the dict returned, the
    one to fill), which the Restorer hands back to them once filled."""

    def fit() -> tuple[LoadPlan, dict[str, Any], Restorer]:
        filled, restorer = to_live(live)
        return plan_load(saved, filled, strict=strict), filled, restorer

    return step.run(
        comm,
        step.LOAD_FIT,
        fit,
        context=f"row {row} of {st.path} does not fit the live state",
        fallback=CheckpointStateSchemaError,
    )
