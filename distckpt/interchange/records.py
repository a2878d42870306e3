"""Records shared by the format readers and writers: what an import produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Imported:
    """A foreign checkpoint parsed and validated in memory, ready to become one row.

    ``state`` is the row's state tree; ``metadata`` is recorded with the row (JSON-like);
    ``notes`` say what was dropped or changed on the way, so nothing is lost silently.
    """

    state: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Exported:
    """What :func:`distckpt.interchange.export_row` wrote."""

    path: str
    format: str
    row: int
    rank: int
    tensors: int
    notes: tuple[str, ...] = ()
