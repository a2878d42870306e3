"""Retention policy: which rows a store keeps after a new row commits.

Policy only; deletion itself is ``commit.delete_row``. Invariant: the newest committed row
and anything newer (rows still being written) are never chosen.
"""

from __future__ import annotations

from .election import row_status
from .store import Store


def rows_to_delete(store: Store, keep: int | None) -> list[int]:
    """Committed rows beyond the newest ``keep`` (None: keep all), and uncommitted rows
    older than the newest committed one. Newer uncommitted rows may be in flight: kept."""
    rows = store.rows()
    statuses = {r: row_status(store, r) for r in rows}
    committed = [r for r in rows if statuses[r].committed]
    if not committed:
        return []
    newest = committed[-1]
    doomed = [r for r in rows if r < newest and not statuses[r].committed]
    if keep is not None:
        doomed += committed[: max(0, len(committed) - max(1, keep))]
    return sorted(doomed)
