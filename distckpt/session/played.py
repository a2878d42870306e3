"""Played ranks: a job of M processes runs an N-rank job's shares (N a multiple of M).

Rank-private state (Earth2Studio's ``Gaussian`` generator, ``Persistence`` rollout) can only
resume on the rank that saved it. :func:`play_ranks` lets a smaller job resume such a row
anyway: each process runs N / M of the saved ranks, one thread each, and every thread is a
real rank of an N-rank job (:class:`PlayedComm`). Rows it writes are ordinary N-rank rows, so
a later relaunch resumes them with N processes, or again with any M dividing N.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from distckpt.dist.comm import Communicator, KnownRanks, resolve
from distckpt.errors import CommunicatorError, WorldSizeMismatchError
from distckpt.logs import get_logger
from distckpt.session.members import elect_any
from distckpt.storage.resolve import is_object_store_path, store_path
from distckpt.storage.store import Store

log = get_logger(__name__)

T = TypeVar("T")

_PLAYED_COMM: ContextVar[Communicator | None] = ContextVar("distckpt_played_comm", default=None)


def played_comm() -> Communicator | None:
    """The communicator of the rank :func:`play_ranks` runs on this thread (None outside).

    ``Checkpoint`` constructed without ``comm=`` uses it; pass it as ``comm=`` to other
    distckpt calls (``save``, ``load``) made inside a played rank.
    """
    return _PLAYED_COMM.get()


@contextmanager
def _playing(comm: Communicator) -> Iterator[None]:
    token = _PLAYED_COMM.set(comm)
    try:
        yield
    finally:
        _PLAYED_COMM.reset(token)


class _Group:
    """The threads of one process playing ranks: a rendezvous that exchanges one Python
    object per thread. Once a thread has ended (returned or raised), a rendezvous it cannot
    join raises in every waiting thread instead of waiting forever."""

    def __init__(self, size: int, family: list[_Group] | None = None) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._slots: list[Any] = [None] * size
        self._arrived = 0
        self._generation = 0
        self._result: list[Any] = []
        self._ended: dict[int, str] = {}
        self.family: list[_Group] = family if family is not None else []
        self.family.append(self)

    def exchange(self, index: int, value: Any, describe: Callable[[int], str]) -> list[Any]:
        with self._cond:
            self._check(describe)
            generation = self._generation
            self._slots[index] = value
            self._arrived += 1
            if self._arrived == self.size:
                self._result, self._slots = self._slots, [None] * self.size
                self._arrived = 0
                self._generation += 1
                self._cond.notify_all()
                return self._result
            while self._generation == generation:
                self._check(describe)
                self._cond.wait()
            return self._result

    def _check(self, describe: Callable[[int], str]) -> None:
        if self._ended:
            index, why = next(iter(self._ended.items()))
            raise CommunicatorError(
                f"played rank {describe(index)} {why} while the other ranks this process "
                "plays wait in a collective step, so it cannot complete"
            )

    def end(self, index: int, why: str) -> None:
        """Thread ``index`` is gone: every group of the family stops waiting for it."""
        for group in self.family:
            with group._cond:
                group._ended.setdefault(index, why)
                group._cond.notify_all()


def _pack(parts: list[bytes]) -> bytes:
    header = struct.pack(f"<I{len(parts)}Q", len(parts), *(len(p) for p in parts))
    return header + b"".join(parts)


def _unpack(data: bytes) -> list[bytes]:
    (count,) = struct.unpack_from("<I", data)
    lengths = struct.unpack_from(f"<{count}Q", data, 4)
    out, offset = [], 4 + 8 * count
    for n in lengths:
        out.append(data[offset : offset + n])
        offset += n
    return out


class PlayedComm(KnownRanks):
    """Rank ``rank`` of ``world_size``, played by a thread of a process that plays ``local``
    consecutive ranks; ``outer`` joins the processes (one per ``local`` ranks).

    Collectives gather within the process first; the process's first thread then exchanges
    with the other processes over ``outer``.
    """

    def __init__(self, rank: int, world_size: int, group: _Group, outer: Communicator) -> None:
        super().__init__(rank, world_size)
        self._group = group
        self._outer = outer
        self._index = rank % group.size
        self._first = rank - self._index

    @property
    def local_ranks(self) -> range:
        """The ranks this process plays."""
        return range(self._first, self._first + self._group.size)

    def _describe(self, index: int) -> str:
        return f"{self._first + index} of {self._size}"

    def _local(self, value: Any) -> list[Any]:
        return self._group.exchange(self._index, value, self._describe)

    def _share(self, value: Any) -> Any:
        """What the process's first thread passes in, on every thread of the process."""
        return self._local(value if self._index == 0 else None)[0]

    def barrier(self) -> None:
        self._local(None)
        if self._outer.world_size > 1:
            if self._index == 0:
                self._outer.barrier()
            self._local(None)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        here = self._local(data)
        if self._outer.world_size == 1:
            return list(here)
        result = None
        if self._index == 0:
            result = [
                p for packed in self._outer.allgather_bytes(_pack(here)) for p in _unpack(packed)
            ]
        return list(self._share(result))

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        here = self._local(data)
        local = self._group.size
        if self._outer.world_size == 1:
            sent = here[root]
            assert sent is not None
            return bytes(sent)
        result = None
        if self._index == 0:
            owner = root // local
            mine = here[root % local] if owner == self._outer.rank else None
            result = self._outer.broadcast_bytes(mine, root=owner)
        return bytes(self._share(result))

    def duplicate(self) -> Communicator:
        """Collective: a new group of the same threads (and a duplicate of ``outer``)."""
        made = None
        if self._index == 0:
            outer = self._outer.duplicate() if self._outer.world_size > 1 else self._outer
            made = (_Group(self._group.size, self._group.family), outer)
        group, outer = self._share(made)
        return PlayedComm(self._rank, self._size, group, outer)


def play_ranks(fn: Callable[[int, int], T], world_size: int, *, comm: Any = None) -> list[T]:
    """Run ``fn(rank, world_size)`` for the ranks of a ``world_size``-rank job this process
    plays; returns their results in rank order.

    With as many processes as ``world_size``, ``fn`` runs once, on this thread, as this
    process's rank. With fewer (``world_size`` a multiple of them), process q runs ranks
    ``q*k .. q*k+k-1`` (k = ``world_size`` / processes) on k threads at once: collectives
    (``write``, ``flush``) need every rank, so the ranks cannot run one after another.
    ``Checkpoint`` constructed inside ``fn`` without ``comm=`` is the played rank's.

    Collective over ``comm`` (default: the job's communicator). If a played rank raises, the
    others stop at their next collective step and the first failure is raised here.
    """
    job = resolve(comm)
    processes = job.world_size
    if world_size < 1 or world_size % processes:
        raise WorldSizeMismatchError(
            f"a job of {processes} processes cannot play the ranks of a {world_size}-rank "
            f"job: {world_size} is not a multiple of {processes}"
        )
    if world_size == processes:
        with _playing(job):
            return [fn(job.rank, world_size)]
    local = world_size // processes
    first = job.rank * local
    group = _Group(local)
    results: dict[int, T] = {}
    failures: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        rank = first + index
        played = PlayedComm(rank, world_size, group, job)
        try:
            with _playing(played):
                results[rank] = fn(rank, world_size)
        except BaseException as exc:
            with lock:
                failures.append((rank, exc))
            group.end(index, f"failed ({type(exc).__name__}: {exc})")
            return
        group.end(index, "returned")

    threads = [
        threading.Thread(target=run, args=(i,), name=f"distckpt-rank-{first + i}", daemon=True)
        for i in range(local)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        for index in range(local):  # stop the played ranks at their next collective step
            group.end(index, "was interrupted")
        raise
    if failures:
        _, first_failure = failures[0]
        for other, exc in failures[1:]:
            log.debug("played rank %d also failed: %r", other, exc)
        raise first_failure
    return [results[first + i] for i in range(local)]


def saved_world_size(path: str | os.PathLike[str], *, comm: Any = None) -> int | None:
    """The number of ranks that wrote the row a relaunch would resume (the newest committed
    row of any world size); None when the store holds none. Collective over ``comm``."""
    location: Path | str = store_path(path) if is_object_store_path(path) else Path(path)
    store = Store(location)
    job = resolve(comm)
    # The coordinator's answer for every rank: a rank that already went on may be creating
    # the store while another still asks.
    if not job.broadcast(store.exists() if job.is_coordinator else None):
        return None
    found = elect_any(store, job)
    return None if found is None else found[1]


__all__ = ["PlayedComm", "play_ranks", "played_comm", "saved_world_size"]
