"""Retention policy: which rows a store keeps after a new row commits.

Policy only; deletion itself is ``commit.delete_row``. Invariant: the newest committed row
and anything newer (rows still being written) are never chosen.
"""

from __future__ import annotations

from distckpt.dist.election import row_status
from distckpt.storage.store import Store


def rows_to_delete(store: Store, keep: int | None) -> list[int]:
    """Committed rows beyond the newest ``keep`` (None: keep all), and uncommitted rows
    older than the newest committed one. Newer uncommitted rows may be in flight: kept.

    Rows are examined newest first; with ``keep`` the scan stops at the ``keep``-th
    committed row, since every older row goes either way (beyond retention, or garbage).
    A store of many rows therefore costs a few manifest reads per commit, not all of them.
    """
    rows = store.rows()
    kept: list[int] = []
    doomed: list[int] = []
    limit = None if keep is None else max(1, keep)
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if limit is not None and len(kept) == limit:
            doomed.extend(rows[: index + 1])
            break
        if row_status(store, row).committed:
            kept.append(row)
        elif kept:  # older than the newest committed row: a killed or half-deleted write
            doomed.append(row)
    return sorted(doomed)
