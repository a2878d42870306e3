"""Named fault points in the commit path, used by the crash tests to SIGKILL a real process.

``DISTCKPT_FAULT="point[@rank][:row]"`` kills this process with SIGKILL when it reaches
``point``; unset (the normal case) it costs one comparison. Points, in order: ``before_data``,
``after_data`` (data durable, manifest not yet written), ``after_manifest`` (this rank's
manifest published; others may still be writing) and ``after_commit`` (every rank published
and the ranks agreed; ``save`` has not returned yet).

Tests also make a named collective step (``distckpt.dist.step``) raise an ordinary error on
chosen ranks with :func:`raising_at_step`, to prove that no rank is left waiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

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


_STEP_FAULTS: dict[str, tuple[int | None, Callable[[], BaseException]]] = {}


@contextlib.contextmanager
def raising_at_step(
    step: str, error: Callable[[], BaseException], *, rank: int | None = None
) -> Iterator[None]:
    """Test only: while active, step ``step`` raises ``error()`` on ``rank`` (None: every
    rank) before its own work, as if that work had raised it."""
    _STEP_FAULTS[step] = (rank, error)
    try:
        yield
    finally:
        _STEP_FAULTS.pop(step, None)


def step_fault(step: str, *, rank: int) -> None:
    """Raise the error armed for ``step`` on this rank, if any (one dict lookup otherwise)."""
    armed = _STEP_FAULTS.get(step)
    if armed is not None and armed[0] in (None, rank):
        raise armed[1]()
