"""Boundaries: the points where a save or a session write has returned, for plug-ins.

Cross-cutting features (preemption, bookkeeping) subscribe here instead of wrapping public
functions: ``distckpt.save`` and ``CheckpointSession.write`` announce a :class:`Boundary`
once they return, and each subscriber runs on the thread that saved, in subscription order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distckpt.dist.comm import Communicator


@dataclass(frozen=True)
class Boundary:
    """A save or a session write returned; the job may stop here.

    ``row`` is the row the call committed (None when a session write only buffered its
    entry); ``session`` is the session whose write returned (its ``flush()`` commits what
    it buffered), None for ``distckpt.save``.
    """

    comm: Communicator
    row: int | None
    session: Any = None


Subscriber = Callable[[Boundary], None]

_lock = threading.Lock()
_subscribers: list[Subscriber] = []


def subscribe(fn: Subscriber) -> Callable[[], None]:
    """Call ``fn`` at every boundary of this process; returns the function that unsubscribes."""
    with _lock:
        _subscribers.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _subscribers:
                _subscribers.remove(fn)

    return unsubscribe


def announce(event: Boundary) -> None:
    """Run every subscriber on ``event`` (a subscriber may exit the process)."""
    with _lock:
        current = list(_subscribers)
    for fn in current:
        fn(event)
