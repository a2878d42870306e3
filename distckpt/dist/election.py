"""Election: which row every rank restores.

A row counts when every one of its ranks published a manifest that parses, validates and
agrees with the others (world size, row, write count). Online, each rank reports the rows
its own manifest commits, the reports are gathered, and all ranks elect the same newest row
from the same data. Each rank reads rows newest first and stops at the first row that has
a row index (format 2: the coordinator published it once every rank had committed) and
its own valid manifest, so an election costs a few manifest reads per rank, not one per
row; only when the ranks' short reports share no row is every row read. Offline (CLI, no
process group) all manifests of a shared store are read.
A bad manifest makes its row uncommitted; it never raises out of the election. Every
election takes ``skip``: rows not to elect even when committed (rows marked bad, see
``io.marks``); a row any rank skips is elected by none.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.errors import StoreFormatError
from distckpt.format.manifest import InvalidManifest, RankManifest
from distckpt.logs import get_logger
from distckpt.storage.store import Store

log = get_logger(__name__)


@dataclass(frozen=True)
class RowStatus:
    """What the manifests of one row say, read without a process group."""

    row: int
    committed: bool
    world_size: int | None
    write_count: int | None
    valid_ranks: tuple[int, ...]
    missing_ranks: tuple[int, ...]
    problems: tuple[str, ...]
    manifests: tuple[RankManifest, ...] = ()
    #: The problems that are disagreements between valid manifests (also in ``problems``).
    disagreements: tuple[str, ...] = ()


def row_status(store: Store, row: int) -> RowStatus:
    valid: dict[int, RankManifest] = {}
    problems: list[str] = []
    for rank in store.manifest_ranks(row):
        try:
            valid[rank] = store.read_manifest(row, rank)
        except InvalidManifest as exc:
            problems.append(str(exc))
    sizes = {m.world_size for m in valid.values()}
    counts = {m.write_count for m in valid.values()}
    disagreements: list[str] = []
    if len(sizes) > 1:
        disagreements.append(f"manifests disagree on world size: {sorted(sizes)}")
    if len(counts) > 1:
        disagreements.append(f"manifests disagree on write count: {sorted(counts)}")
    problems += disagreements
    world = max(sizes) if sizes else None
    missing = _missing(valid, world) if world else ()
    committed = world is not None and not missing and len(sizes) == 1 and len(counts) == 1
    return RowStatus(
        row=row,
        committed=committed,
        world_size=world,
        write_count=next(iter(counts)) if len(counts) == 1 else None,
        valid_ranks=tuple(sorted(valid)),
        missing_ranks=missing,
        problems=tuple(problems),
        manifests=tuple(valid[r] for r in sorted(valid)),
        disagreements=tuple(disagreements),
    )


MAX_MISSING_LISTED = 100  # a row missing more ranks lists only the first ones


def _missing(valid: dict[int, RankManifest], world: int) -> tuple[int, ...]:
    """The first ranks of ``world`` without a valid manifest: bounded, so a manifest that
    claims a huge world costs no more than a small one."""
    out: list[int] = []
    for rank in range(world):
        if rank not in valid:
            out.append(rank)
            if len(out) == MAX_MISSING_LISTED:
                break
    return tuple(out)


def elect_offline(
    store: Store, *, world_size: int | None = None, skip: Container[int] = ()
) -> int | None:
    """Newest committed row (of ``world_size`` ranks, if given, not in ``skip``) from the
    manifests alone.

    Scans newest first and stops at the first committed row, so its cost does not grow with
    the number of older rows.
    """
    if store.root_attributes() is None:
        return None
    for row in reversed(store.rows()):
        if row in skip:
            continue
        status = row_status(store, row)
        if status.committed and (world_size is None or status.world_size == world_size):
            return row
    return None


def committed_rows_offline(store: Store) -> list[RowStatus]:
    if store.root_attributes() is None:
        return []
    return [s for s in (row_status(store, r) for r in store.rows()) if s.committed]


def local_commits(
    store: Store, rank: int, world_size: int, skip: Container[int] = ()
) -> dict[int, int]:
    """Rows this rank's own manifest commits at ``world_size`` (not in ``skip``): row ->
    write count."""
    return {
        row: m.write_count for row, m in _own_manifests(store, store.rows(), rank, world_size, skip)
    }


def _own_manifests(
    store: Store, rows: Iterable[int], rank: int, world_size: int, skip: Container[int]
) -> Iterator[tuple[int, RankManifest]]:
    """This rank's valid manifests of ``rows`` (in their order) at ``world_size``, skipping
    the rows in ``skip``: what each rank reports to an election."""
    for row in rows:
        if row in skip:
            continue
        try:
            manifest = store.read_manifest(row, rank)
        except InvalidManifest as exc:
            log.debug("row %d not committed by rank %d: %s", row, rank, exc)
            continue
        if manifest.world_size == world_size:
            yield row, manifest


def newest_committed_after(
    store: Store, floor: int | None, skip: Container[int] = ()
) -> int | None:
    """The newest row above ``floor`` committed at any world size (not in ``skip``), from
    all its manifests.

    Needs every rank's manifest to be visible (a shared filesystem); on node-local storage
    the other ranks' manifests are missing, so nothing counts and the caller keeps ``floor``.
    """
    if store.root_attributes() is None:
        return None
    for row in reversed(store.rows()):
        if floor is not None and row <= floor:
            break
        if row not in skip and row_status(store, row).committed:
            return row
    return None


def elect(
    store: Store,
    comm: Communicator,
    *,
    any_world_size: bool = False,
    skip: Container[int] = (),
) -> int | None:
    """Collective: the newest row committed by every rank of ``comm``, same on all ranks.

    With ``any_world_size`` a newer row written by another number of ranks wins if all its
    manifests are present and valid: the coordinator checks them (shared filesystem) and
    broadcasts its finding. The same-size step runs first and unchanged, so node-local
    stores still elect at the same size. A rank that cannot read the store reports why
    instead of leaving the others waiting; then every rank raises the same error.
    """
    if comm.world_size == 1:
        return elect_offline(store, world_size=None if any_world_size else 1, skip=skip)
    same = _elect_same_size(store, comm, skip)
    if not any_world_size:
        return same
    newer = step.decide(
        comm,
        step.ELECT_ANY_SIZE,
        lambda: newest_committed_after(store, same, skip),
        context=f"cannot elect a row of {store.path}",
        fallback=StoreFormatError,
    )
    return same if newer is None else int(newer)


def _recent_commits(
    store: Store, rank: int, world_size: int, skip: Container[int] = ()
) -> tuple[dict[int, int], int]:
    """:func:`local_commits` from the newest row down to the first that has a row index
    of this world size and write count and this rank's valid manifest; and that row (its
    floor: the report is complete above it), or -1 when every row was read."""
    out: dict[int, int] = {}
    for row, manifest in _own_manifests(store, reversed(store.rows()), rank, world_size, skip):
        out[row] = manifest.write_count
        index = store.read_index(row)
        if index is not None and (index.world_size, index.write_count) == (
            world_size,
            manifest.write_count,
        ):
            return out, row
    return out, -1


def _elect_same_size(store: Store, comm: Communicator, skip: Container[int] = ()) -> int | None:
    where = f"cannot elect a row of {store.path}"

    def recent() -> dict[str, Any]:
        if store.root_attributes() is None:
            return {"rows": {}, "floor": -1}
        mine, floor = _recent_commits(store, comm.rank, comm.world_size, skip)
        return {"rows": {str(r): c for r, c in mine.items()}, "floor": floor}

    reports = step.gather(
        comm, step.ELECT_SAME_SIZE, recent, context=where, fallback=StoreFormatError
    )
    # Every rank's report is complete for the rows at or above the highest floor.
    floor = max(int(r["floor"]) for r in reports)
    commits = [{k: c for k, c in r["rows"].items() if int(k) >= floor} for r in reports]
    chosen = _newest_common(commits)
    if chosen is not None or floor < 0:
        return chosen

    def report() -> dict[str, int]:
        if store.root_attributes() is None:
            return {}
        mine = local_commits(store, comm.rank, comm.world_size, skip)
        return {str(r): c for r, c in mine.items()}

    # The short reports share no row (a rank's manifest of an indexed row is damaged):
    # every rank reads all its rows, as without an index.
    full = step.gather(comm, step.ELECT_SAME_SIZE, report, context=where, fallback=StoreFormatError)
    return _newest_common(full)


def _newest_common(commits: list[dict[str, int]]) -> int | None:
    """The newest row every report lists, with one write count."""
    common = set(commits[0])
    for rows in commits[1:]:
        common &= set(rows)
    for key in sorted(common, key=int, reverse=True):
        if len({rows[key] for rows in commits}) == 1:
            return int(key)
        log.warning("row %s: ranks disagree on write count; not elected", key)
    return None
