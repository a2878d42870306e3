"""Bad-row marks: a committed row that failed verification while being loaded.

A restart that finds its elected row damaged (a checksum, a missing or unreadable file)
falls back to an older row; without a record of why, the next restart would elect the same
damaged row again and a requeued job would loop. The coordinator of the load that found the
damage therefore writes ``rows/<row>/BAD.json`` (atomically: temp file, fsync, rename) with
the reason; elections, ``distckpt latest`` and retention skip marked rows and ``distckpt
ls`` shows them as bad. The mark lives in the row's directory, so deleting the row (retention,
``gc``) deletes its mark with it, and removing the file (:func:`unmark`) makes the row count
again (after a repair, or when the failure was a passing I/O error).

Reading marks costs one ``stat`` per row asked about (:class:`BadRows` asks lazily, so a
newest-first election that stops at the first good row reads one or two).
"""

from __future__ import annotations

import json
import os
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from distckpt.errors import CheckpointWriteError
from distckpt.logs import get_logger
from distckpt.storage.store import Store, utcnow

log = get_logger(__name__)

BAD_FILE = "BAD.json"
MARK_VERSION = 1
REASON_CHARS = 2000  # a reason is a message, not a log: long ones are cut


@dataclass(frozen=True)
class BadMark:
    """Why a row was marked bad, and when (UTC, ISO 8601)."""

    row: int
    reason: str
    marked: str

    def to_json(self) -> bytes:
        doc = {"distckpt_bad_row": MARK_VERSION, "row": self.row, "reason": self.reason}
        doc["marked"] = self.marked
        return json.dumps(doc, indent=1).encode()


def mark_path(store: Store, row: int) -> str:
    return os.path.join(store.row_dir(row), BAD_FILE)


def mark_bad(store: Store, row: int, reason: str) -> BadMark:
    """Record that ``row`` is damaged (atomically); ``CheckpointWriteError`` naming the file
    when it cannot be written. The row's data is left as it is, for inspection."""
    mark = BadMark(row, reason[:REASON_CHARS], utcnow())
    path = mark_path(store, row)
    try:
        store.fs.atomic_write(path, mark.to_json())
    except OSError as exc:
        raise CheckpointWriteError(
            f"cannot mark row {row} of {store.path} as bad ({path}): {exc}"
        ) from exc
    return mark


def unmark(store: Store, row: int) -> bool:
    """Remove ``row``'s bad mark (it counts again); whether there was one."""
    path = mark_path(store, row)
    if not store.fs.exists(path):
        return False
    store.fs.remove(path)
    return True


def read_mark(store: Store, row: int) -> BadMark | None:
    """``row``'s mark, or None when it has none. A mark file that cannot be read or parsed
    still marks the row (a damaged mark must not make a damaged row count again)."""
    path = mark_path(store, row)
    try:
        raw = store.fs.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return BadMark(row, f"{path} cannot be read: {exc}", "")
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("reason"), str):
        return BadMark(row, f"{path} is not a valid mark", "")
    marked = doc.get("marked")
    return BadMark(row, doc["reason"], marked if isinstance(marked, str) else "")


class BadRows(Container[int]):
    """The marked rows of a store, as a container an election filters with (``row in
    bad``); each row is looked up once, when first asked about."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[int, bool] = {}

    def __contains__(self, row: object) -> bool:
        if not isinstance(row, int):
            return False
        found = self._known.get(row)
        if found is None:
            found = self._known[row] = self.store.fs.exists(mark_path(self.store, row))
        return found

    def add(self, row: int) -> None:
        """Count ``row`` as marked from now on (after this process marked it)."""
        self._known[row] = True


def bad_rows(store: Store) -> BadRows:
    return BadRows(store)
