"""Test doubles: a communicator that plays several ranks one after another in one process,
and a filesystem that fails on chosen writes."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from distckpt.dist.comm import RankInTurnComm
from distckpt.storage.filesystem import Buffer, LocalFileSystem


class SequentialComm(RankInTurnComm):
    """Rank ``rank`` of ``world_size`` ranks that run one after another, sharing one record
    of broadcasts across instances (the root must run first). Enough to write multi-rank
    rows in one process."""

    _sent: dict[int, bytes] = {}  # noqa: RUF012

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, SequentialComm._sent)


def save_as_ranks(store: Any, world_size: int, make_state: Any, **metadata: Any) -> int:
    """Write one row as ``world_size`` ranks in turn; returns the row id."""
    import distckpt

    row = -1
    for rank in range(world_size):
        row = distckpt.save(
            make_state(rank), store, comm=SequentialComm(rank, world_size), **metadata
        )
    distckpt.storage.lease.release(store)  # the writing "job" is over
    return row


class FullDiskFS(LocalFileSystem):
    """Raises ENOSPC once ``budget`` bytes have been written."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.written = 0

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        size = sum(len(memoryview(p).cast("B")) for p in parts)
        if self.written + size > self.budget:
            from distckpt.storage.filesystem import _write_error

            raise _write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        self.written += size
        return super().write_file(path, parts, durable=durable)


class RecordingFS(LocalFileSystem):
    """Records removals, tree deletions and data reads (path, offset, length) in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        self.reads.append((path, offset, len(out.cast("B"))))
        return super().read_into(path, out, offset)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        self.reads.append((path, offset, sum(len(p.cast("B")) for p in parts)))
        return super().read_into_parts(path, parts, offset)

    def remove(self, path: str) -> None:
        self.events.append(("remove", path))
        super().remove(path)

    def rmtree(self, path: str) -> None:
        self.events.append(("rmtree", path))
        super().rmtree(path)


class ReplayComm(SequentialComm):
    """Like SequentialComm, but broadcasts are replayed in order: for a collective call that
    broadcasts more than once. Make one job's ranks with :func:`replay_job`."""

    def __init__(self, rank: int, world_size: int, log: list[bytes]) -> None:
        super().__init__(rank, world_size)
        self._log = log
        self._cursor = 0

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        if self._rank == root:
            assert data is not None
            self._log.append(data)
            return data
        self._cursor += 1
        return self._log[self._cursor - 1]


def replay_job(world_size: int) -> list[ReplayComm]:
    """The ranks of one sequential job, sharing the coordinator's broadcasts (run rank 0 first)."""
    log: list[bytes] = []
    return [ReplayComm(rank, world_size, log) for rank in range(world_size)]
