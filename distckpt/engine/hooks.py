"""Boundaries and commits: the points plug-ins subscribe to instead of wrapping functions.

Cross-cutting features (preemption, bookkeeping) subscribe here instead of wrapping public
functions: ``distckpt.save``, ``AsyncSaver.save`` and ``CheckpointSession.write`` announce a
:class:`Boundary` once they return, and each subscriber runs on the thread that saved, in
subscription order.
Every row committed (by ``save``, an ``AsyncSaver``, a ``Checkpoint`` session, synchronous
or not) announces a :class:`Committed` event, on the thread that committed it.
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
    entry); ``session`` is the session whose write returned, or the ``AsyncSaver`` whose
    save returned (its ``flush()`` commits what it buffered or queued), None for
    ``distckpt.save``.
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


@dataclass(frozen=True)
class Committed:
    """Every rank committed ``row`` of ``store`` (and retention ran), on ``comm``.

    Announced on every rank, on the thread that committed: the caller's for synchronous
    saves, the writer thread for asynchronous ones (``comm`` is then the writer's own).
    """

    store: Any
    row: int
    comm: Communicator


CommitSubscriber = Callable[[Committed], None]

_commit_subscribers: list[CommitSubscriber] = []


def subscribe_commits(fn: CommitSubscriber) -> Callable[[], None]:
    """Call ``fn`` after every row this process commits; returns the unsubscribe function."""
    with _lock:
        _commit_subscribers.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _commit_subscribers:
                _commit_subscribers.remove(fn)

    return unsubscribe


def announce_commit(event: Committed) -> None:
    """Run every commit subscriber on ``event``, in subscription order."""
    with _lock:
        current = list(_commit_subscribers)
    for fn in current:
        fn(event)
