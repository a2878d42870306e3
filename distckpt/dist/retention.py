"""Retention policy: which rows a store keeps after a new row commits.

Policy only; deletion itself is ``commit.delete_row``. A policy is passed in by the caller
(``keep=``, ``history_size=``), in the manner of Orbax's preservation policies: it sees the
committed rows and names those to preserve; :class:`AnyOf` composes policies (a row is kept
when any of them keeps it). Policies that judge rows by what was saved with them
(:class:`KeepEveryNSteps`, :class:`KeepBest`) also get each row's metadata. Invariant,
whatever the policy: the newest committed row, anything newer (rows still being written) and
rows this process is reading (:func:`reading`) are never chosen.

Rows marked bad (``io.marks``, passed as ``bad``) do not count as committed: ``keep=N``
keeps the newest N rows that are not marked, so the row a restart falls back to is never
deleted in favour of a damaged one; a marked row goes once a newer good row is committed.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from distckpt.dist.election import RowStatus, row_status
from distckpt.errors import CheckpointSerializationError
from distckpt.format.tree import decode_metadata
from distckpt.storage.store import Store

#: A committed row's metadata (what ``save(**metadata)`` recorded on rank 0).
RowMetadata = Callable[[int], Mapping[str, Any]]


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
class KeepEveryNSteps:
    """One row per window of ``n`` training steps: the first row saved at or after each
    multiple of ``n`` (Orbax's ``EveryNSteps``, kept when saves miss the exact multiple).

    The step is the row's ``key`` metadata entry (``CheckpointManager`` and
    ``save(..., step=N)`` record it); rows without one are not kept by this policy. Asked
    without metadata (a plain ``preserve``), the row id stands for the step.
    """

    n: int
    key: str = "step"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"KeepEveryNSteps needs an int n >= 1, not {self.n!r}")

    @property
    def horizon(self) -> int | None:
        return None

    def preserve(self, committed: Sequence[int]) -> set[int]:
        return self._first_per_window({row: row for row in committed})

    def preserve_with(self, committed: Sequence[int], metadata: RowMetadata) -> set[int]:
        steps = {}
        for row in committed:
            value = metadata(row).get(self.key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                steps[row] = value
        return self._first_per_window(steps)

    def _first_per_window(self, steps: Mapping[int, int]) -> set[int]:
        first: dict[int, tuple[int, int]] = {}  # window -> (step, row) of its first row
        for row, at in steps.items():
            window = at // self.n
            if window not in first or (at, row) < first[window]:
                first[window] = (at, row)
        return {row for _, row in first.values()}


@dataclass(frozen=True)
class KeepBest:
    """The ``k`` rows with the best value of ``metric`` (``mode`` "min": lowest first,
    "max": highest first); ties go to the newer row.

    The value is the row's ``metrics[metric]`` metadata entry (``CheckpointManager.save(...,
    metrics=...)``) or else its top-level ``metric`` entry; rows without a finite number there
    are not kept by this policy (so do not count towards ``k``). Asked without metadata (a
    plain ``preserve``) it cannot judge and keeps every row.
    """

    metric: str
    k: int = 1
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"KeepBest needs an int k >= 1, not {self.k!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest mode must be 'min' or 'max', not {self.mode!r}")

    @property
    def horizon(self) -> int | None:
        return None

    def preserve(self, committed: Sequence[int]) -> set[int]:
        return set(committed)

    def preserve_with(self, committed: Sequence[int], metadata: RowMetadata) -> set[int]:
        scored = []
        for row in committed:
            value = metric_value(metadata(row), self.metric)
            if value is not None:
                scored.append((value if self.mode == "min" else -value, -row))
        return {-neg_row for _, neg_row in sorted(scored)[: self.k]}


def metric_value(metadata: Mapping[str, Any], metric: str) -> float | None:
    """``metrics[metric]`` (else ``metric``) of a row's metadata as a finite float, or None."""
    metrics = metadata.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, Mapping) else None
    if value is None:
        value = metadata.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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

    def preserve_with(self, committed: Sequence[int], metadata: RowMetadata) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            horizon = policy.horizon
            seen = committed if horizon is None else committed[max(0, len(committed) - horizon) :]
            kept |= preserve(policy, seen, metadata)
        return kept


def preserve(policy: RetentionPolicy, committed: Sequence[int], metadata: RowMetadata) -> set[int]:
    """``policy``'s rows to keep, given each row's metadata where the policy reads it."""
    judge = getattr(policy, "preserve_with", None)
    if callable(judge):
        return set(judge(committed, metadata))
    return set(policy.preserve(committed))


# Rows this process is reading, per store path: retention never deletes them meanwhile.
_reading: Counter[tuple[str, int]] = Counter()
_reading_lock = threading.Lock()


@contextlib.contextmanager
def reading(store: Store, row: int) -> Iterator[None]:
    """While the context lasts, retention run by this process (an asynchronous writer's
    included) keeps ``row`` of ``store``. Readers in other processes are not seen."""
    key = (_where(store), row)
    with _reading_lock:
        _reading[key] += 1
    try:
        yield
    finally:
        with _reading_lock:
            _reading[key] -= 1
            if _reading[key] <= 0:
                del _reading[key]


def rows_being_read(store: Store) -> set[int]:
    where = _where(store)
    with _reading_lock:
        return {row for (path, row), n in _reading.items() if path == where and n > 0}


def _where(store: Store) -> str:
    """One name per store however its path was spelled (URLs as they are)."""
    return store.path if "://" in store.path else os.path.realpath(store.path)


def _metadata_of(statuses: Mapping[int, RowStatus]) -> RowMetadata:
    """A row's rank-0 metadata, decoded from the manifests already read (cached)."""
    cache: dict[int, Mapping[str, Any]] = {}

    def lookup(row: int) -> Mapping[str, Any]:
        if row not in cache:
            manifests = statuses[row].manifests
            try:
                cache[row] = decode_metadata(manifests[0].metadata) if manifests else {}
            except CheckpointSerializationError:
                cache[row] = {}  # unreadable metadata: judged as a row without any
        return cache[row]

    return lookup


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
    statuses: dict[int, RowStatus] = {}
    doomed: list[int] = []
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if limit is not None and len(committed) == limit:
            doomed.extend(rows[: index + 1])
            break
        status = row_status(store, row)
        if row not in bad and status.committed:
            committed.append(row)
            statuses[row] = status
        elif committed:  # older than the newest committed row: a killed or half-deleted write
            doomed.append(row)
    if committed:
        kept = preserve(policy, committed[::-1], _metadata_of(statuses)) | {committed[0]}
        doomed.extend(r for r in committed if r not in kept)
    pinned = rows_being_read(store)
    return sorted(r for r in doomed if r not in pinned)
