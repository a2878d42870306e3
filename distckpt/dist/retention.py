"""Retention policy: which rows a store keeps after a new row commits.

Policy only; deletion itself is ``commit.delete_row``. A policy is passed in by the caller
(``keep=``, ``history_size=``), in the manner of Orbax's preservation policies: it sees the
committed rows and names those to preserve; :class:`AnyOf` composes policies (a row is kept
when any of them keeps it). Invariant, whatever the policy: the newest committed row and
anything newer (rows still being written) are never chosen.

Rows marked bad (``io.marks``, passed as ``bad``) do not count as committed: ``keep=N``
keeps the newest N rows that are not marked, so the row a restart falls back to is never
deleted in favour of a damaged one; a marked row goes once a newer good row is committed.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from distckpt.dist.election import row_status
from distckpt.storage.store import Store


@runtime_checkable
class RetentionPolicy(Protocol):
    """Which committed rows to preserve after a commit; every other committed row goes."""

    @property
    def horizon(self) -> int | None:
        """How many of the newest committed rows the policy looks at (None: all of them).
        Older rows are deleted unread, so a store of many rows costs a few manifest reads
        per commit, not all of them."""
        ...

    def preserve(self, committed: Sequence[int]) -> set[int]:
        """The rows to keep among ``committed`` (oldest first, at most ``horizon`` newest)."""
        ...


@dataclass(frozen=True)
class KeepLatest:
    """The newest ``n`` committed rows (what ``keep=n`` means)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepLatest needs n >= 1, not {self.n}")

    @property
    def horizon(self) -> int | None:
        return self.n

    def preserve(self, committed: Sequence[int]) -> set[int]:
        return set(committed[-self.n :])


@dataclass(frozen=True)
class KeepAll:
    """Every committed row; only uncommitted rows older than the newest committed go."""

    @property
    def horizon(self) -> int | None:
        return None

    def preserve(self, committed: Sequence[int]) -> set[int]:
        return set(committed)


@dataclass(frozen=True)
class AnyOf:
    """A row is kept when any of ``policies`` keeps it (e.g. newest N and every K-th)."""

    policies: tuple[RetentionPolicy, ...]

    @property
    def horizon(self) -> int | None:
        horizons = [p.horizon for p in self.policies]
        if not horizons or any(h is None for h in horizons):
            return None
        return max(h for h in horizons if h is not None)

    def preserve(self, committed: Sequence[int]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            horizon = policy.horizon
            seen = committed if horizon is None else committed[max(0, len(committed) - horizon) :]
            kept |= policy.preserve(seen)
        return kept


def as_policy(keep: int | RetentionPolicy | None) -> RetentionPolicy | None:
    """``keep=N`` as :class:`KeepLatest` (N below 1 keeps one row); a policy as itself."""
    if keep is None or isinstance(keep, RetentionPolicy):
        return keep
    return KeepLatest(max(1, int(keep)))


def rows_to_delete(
    store: Store, keep: int | RetentionPolicy | None, *, bad: Container[int] = ()
) -> list[int]:
    """Committed rows ``keep`` does not preserve (None: keep all), and uncommitted rows
    older than the newest committed one. Newer uncommitted rows may be in flight: kept.
    Rows in ``bad`` count as uncommitted (see the module's docstring).

    Rows are examined newest first; the scan stops at the policy's ``horizon``-th committed
    row, since every older row goes either way (beyond retention, or garbage).
    """
    policy = as_policy(keep) or KeepAll()
    limit = policy.horizon
    rows = store.rows()
    committed: list[int] = []  # newest first
    doomed: list[int] = []
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if limit is not None and len(committed) == limit:
            doomed.extend(rows[: index + 1])
            break
        if row not in bad and row_status(store, row).committed:
            committed.append(row)
        elif committed:  # older than the newest committed row: a killed or half-deleted write
            doomed.append(row)
    if committed:
        kept = policy.preserve(committed[::-1]) | {committed[0]}
        doomed.extend(r for r in committed if r not in kept)
    return sorted(doomed)
