"""Named fault points in the commit path, used by the crash tests to SIGKILL a real process.

``DISTCKPT_FAULT="point[@rank][:row]"`` kills this process with SIGKILL when it reaches
``point``; unset (the normal case) it costs one comparison. Points, in order: ``before_data``,
``after_data`` (data durable, manifest not yet written), ``after_manifest`` (this rank's
manifest published; others may still be writing) and ``after_commit`` (every rank published
and the ranks agreed; ``save`` has not returned yet).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("DISTCKPT_FAULT", "")


def _parse(spec: str) -> tuple[str, int | None, int | None] | None:
    if not spec:
        return None
    point, _, rest = spec.partition("@")
    rank_s, _, row_s = rest.partition(":")
    if not rest and ":" in point:
        point, _, row_s = point.partition(":")
    return point, int(rank_s) if rank_s else None, int(row_s) if row_s else None


_PARSED = _parse(_SPEC)


def active() -> bool:
    """Whether a fault is armed (lets callers skip work that only serves fault targeting)."""
    return _PARSED is not None


def fault_point(point: str, *, rank: int, row: int) -> None:
    if _PARSED is None:
        return
    want_point, want_rank, want_row = _PARSED
    if want_point != point:
        return
    if want_rank is not None and want_rank != rank:
        return
    if want_row is not None and want_row != row:
        return
    os.kill(os.getpid(), signal.SIGKILL)
