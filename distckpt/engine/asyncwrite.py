"""Asynchronous saves: the caller's state is staged into reusable host buffers and a
background thread commits the row, on a communicator of its own.

``write()`` (or :meth:`AsyncSaver.save`) blocks only to copy the state (CPU tensors: into
reused host buffers; CUDA tensors: into reused pinned buffers with non-blocking copies on a
side stream) and returns. At most ``max_in_flight`` rows are staged or being written; the
next save waits for a slot (back-pressure). A failed row is reported, agreed by every rank,
at the next save, at ``wait()``/``flush()`` and at exit. The commit protocol is unchanged,
so a process killed mid-write leaves a row that is simply not committed.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from distckpt.dist import step
from distckpt.dist.comm import Communicator, resolve
from distckpt.dist.retention import RetentionPolicy, as_policy
from distckpt.engine import hooks
from distckpt.engine import steps as engine
from distckpt.errors import CheckpointError, CheckpointWriteError
from distckpt.format.manifest import RankManifest
from distckpt.io.rowio import byte_view
from distckpt.logs import get_logger
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD, plan_rank, stage
from distckpt.storage.store import Store

log = get_logger(__name__)

Job = Callable[[Communicator], Any]


class StagingBuffers:
    """Host memory for one in-flight row: one byte buffer per tensor position, reused by
    the next row staged into this slot and grown only when a tensor got bigger."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}
        self.event: Any = None  # CUDA event the writer waits on before reading the buffers

    def take(self, key: int, nbytes: int, *, pinned: bool) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes or (pinned and not buf.is_pinned()):
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            self._buffers[key] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())


class Stager:
    """``plan_rank``'s stager: the one copy step of every tensor a row holds (plain, packed,
    nested, numpy, DTensor local shards, ``Sharded`` pieces, CUDA) into the slot's buffers,
    so the caller may change its state as soon as ``write()`` returns."""

    def __init__(self, buffers: StagingBuffers) -> None:
        self.buffers = buffers
        self._next = 0
        self._stream: Any = None

    def __call__(self, tensor: torch.Tensor, where: str) -> torch.Tensor:
        key = self._next
        self._next += 1
        if tensor.device.type == "cuda" and type(tensor) in (torch.Tensor, torch.nn.Parameter):
            return self._from_cuda(key, tensor)
        staged = stage(tensor, where=where)  # validates; CPU tensors come back uncopied
        nbytes = staged.numel() * staged.element_size()
        buf = self.buffers.take(key, nbytes, pinned=False)
        if nbytes:
            # A plain memcpy on this thread: torch's copy_ fans out to the intra-op thread
            # pool, which is several times slower when the cores are busy (training).
            byte_view(buf)[:] = byte_view(staged)
        return self._view(buf, staged)

    @staticmethod
    def _view(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buf.view(like.dtype).reshape(like.shape)

    def _from_cuda(self, key: int, tensor: torch.Tensor) -> torch.Tensor:
        src = tensor.detach()
        if src.is_conj():
            src = src.resolve_conj()
        if src.is_neg():
            src = src.resolve_neg()
        src = src.contiguous()
        if self._stream is None:
            self._stream = _side_stream(src.device)
            self._stream.wait_stream(torch.cuda.current_stream(src.device))
        nbytes = src.numel() * src.element_size()
        out = self._view(self.buffers.take(key, nbytes, pinned=True), src)
        with torch.cuda.stream(self._stream), torch.no_grad():
            out.copy_(src, non_blocking=True)
        src.record_stream(self._stream)  # the allocator keeps it until the copy ran
        return out

    def finish(self) -> None:
        """Record the copies' completion for the writer; later work on the caller's stream
        waits for them too (so the next step cannot overwrite a tensor being copied)."""
        if self._stream is None:
            self.buffers.event = None
            return
        event = torch.cuda.Event()
        event.record(self._stream)
        torch.cuda.current_stream(self._stream.device).wait_event(event)
        self.buffers.event = event


_streams: dict[int, Any] = {}


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


def _as_exception(failure: BaseException) -> Exception:
    """The writer thread's failure as something a collective step reports (the thread also
    records ``SystemExit`` and the like, which must not skip the agreement)."""
    if isinstance(failure, Exception):
        return failure
    error = CheckpointWriteError(f"the writer thread stopped: {failure!r}")
    error.__cause__ = failure
    return error


class BackgroundWriter:
    """One writer thread, its own communicator, and ``max_in_flight`` staging slots.

    Creating one is collective (it duplicates ``comm``); so are :meth:`submit` and
    :meth:`drain`: every rank calls them the same number of times, in the same order.
    """

    def __init__(self, comm: Communicator, *, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
        self.comm = comm
        self.writer_comm = comm.duplicate()
        self.max_in_flight = max_in_flight
        self.slots = [StagingBuffers() for _ in range(max_in_flight)]
        self.last_blocked_s = 0.0  # time the last submit() held the caller
        self._queue: queue.Queue[tuple[int, Job] | None] = queue.Queue()
        self._cv = threading.Condition()
        self._submitted = 0
        self._completed = 0
        self._reported = 0
        self._failures: dict[int, BaseException] = {}
        self._results: dict[int, Any] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="distckpt-writer", daemon=True)
        self._thread.start()
        # At exit, finish what is queued; a weak reference, so the hook keeps nothing alive.
        self._exit_hook = functools.partial(_call_if_alive, weakref.WeakMethod(self._at_exit))
        atexit.register(self._exit_hook)

    @property
    def staging_nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    @property
    def in_flight(self) -> int:
        with self._cv:
            return self._submitted - self._completed

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            seq, job = item
            result: Any = None
            failure: BaseException | None = None
            try:
                event = self.slots[seq % self.max_in_flight].event
                if event is not None:
                    event.synchronize()
                result = job(self.writer_comm)
            except BaseException as exc:  # reported to the caller's thread, never lost
                failure = exc
                log.error("asynchronous save %d failed: %s", seq, exc)
            with self._cv:
                if failure is not None:
                    self._failures[seq] = failure
                else:
                    self._results[seq] = result
                self._completed += 1
                self._cv.notify_all()

    def _wait(self, upto: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._completed >= upto)

    def _take(self, upto: int) -> tuple[list[Any], BaseException | None]:
        """Results and the first failure of the rows before ``upto`` not yet reported."""
        with self._cv:
            seqs = range(self._reported, max(self._reported, upto))
            failures = [self._failures.pop(s) for s in seqs if s in self._failures]
            results = [self._results.pop(s) for s in seqs if s in self._results]
            self._reported = max(self._reported, upto)
        return results, (failures[0] if failures else None)

    def submit(self, prepare: Callable[[StagingBuffers], Job]) -> list[Any]:
        """Collective: wait for a free slot, stage with ``prepare`` (in this thread), queue
        the job it returns. Raises on every rank if an earlier row or this staging failed.
        Returns the results of rows that finished since the last report."""
        if self._closed:
            raise CheckpointWriteError("the asynchronous writer is closed")
        t0 = time.perf_counter()
        seq = self._submitted
        upto = seq - self.max_in_flight + 1
        self._wait(upto)
        results, failure = self._take(upto)

        def stage() -> Job:
            if failure is not None:  # an earlier row failed in the writer thread
                raise _as_exception(failure)
            return prepare(self.slots[seq % self.max_in_flight])

        job = step.run(
            self.comm,
            step.ASYNC_SUBMIT,
            stage,
            context="asynchronous save failed",
            fallback=CheckpointWriteError,
        )
        self._submitted += 1
        self._queue.put((seq, job))
        self.last_blocked_s = time.perf_counter() - t0
        return results

    def drain(self) -> list[Any]:
        """Collective: wait for every queued row; raise (every rank) if any failed."""
        self._wait(self._submitted)
        results, failure = self._take(self._submitted)

        def report() -> None:
            if failure is not None:  # a row failed in the writer thread
                raise _as_exception(failure)

        step.run(
            self.comm,
            step.ASYNC_DRAIN,
            report,
            context="asynchronous save failed",
            fallback=CheckpointWriteError,
        )
        return results

    def wait_local(self) -> list[BaseException]:
        """Wait for every queued row without coordinating (an exception is unwinding);
        returns the failures instead of raising them."""
        self._wait(self._submitted)
        with self._cv:
            failures = list(self._failures.values())
            self._failures.clear()
            self._results.clear()
            self._reported = self._submitted
        return failures

    def close(self, *, coordinated: bool = True) -> list[Any]:
        """Drain and stop the thread (collective unless ``coordinated`` is false)."""
        if self._closed:
            return []
        try:
            if coordinated:
                return self.drain()
            for failure in self.wait_local():
                log.error("asynchronous save failed: %s", failure)
            return []
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            atexit.unregister(self._exit_hook)

    def _at_exit(self) -> None:
        """At interpreter exit: finish what is queued (never leave it half done by choice)."""
        if not self._closed:
            self.close(coordinated=False)


def _call_if_alive(ref: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = ref()
    if method is not None:
        method()


class AsyncSaver:
    """Saves for training loops that return once the state is staged.

    ``save()`` is collective like :func:`distckpt.save` but returns as soon as this rank's
    state is copied into the saver's staging buffers; a background thread commits the row.
    ``wait()`` (or ``flush()``; collective) returns the newest committed row and raises, on
    every rank, if a row failed; so do the next ``save()`` and ``close()``. Each ``save()``
    is a boundary (:mod:`distckpt.engine.hooks`) as ``distckpt.save`` is, so
    ``python -m distckpt.session.preempt`` stops a job at its asynchronous saves too. Use as
    a context manager, or call ``close()`` before the process exits (at exit, queued rows
    are still finished).
    Creating one is collective (it takes the store's writer lease, ``LeaseHeldError`` if
    another job holds it, and creates a communicator for the writer thread).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store,
        *,
        comm: Any = None,
        max_in_flight: int = 1,
        keep: int | RetentionPolicy | None = None,
        checksums: bool = True,
        pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.comm = resolve(comm)
        # The writer lease, taken now: a second job is refused before it trains or stages.
        self.lease = engine.writer_lease(self.store, self.comm)
        self.keep = as_policy(keep)
        self.checksums = checksums
        self.pack_threshold = pack_threshold
        self.writer = BackgroundWriter(self.comm, max_in_flight=max_in_flight)
        self.committed: list[int] = []  # rows committed by this saver, in order
        # Bookkeeping subscribes to commit events: the writer thread's commits, on its own
        # communicator, are this saver's (and no other's).
        self._unsubscribe = hooks.subscribe_commits(self._on_commit)

    @property
    def staging_nbytes(self) -> int:
        """Bytes of host memory held for staging (reused from row to row)."""
        return self.writer.staging_nbytes

    @property
    def last_blocked_s(self) -> float:
        """Seconds the last ``save()`` held the caller (waiting for a slot, staging)."""
        return self.writer.last_blocked_s

    def save(self, state_dict: dict[str, Any], *, row: int | None = None, **metadata: Any) -> None:
        """Collective: stage ``state_dict`` and queue it as a new row."""
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"state_dict must be a dict, not {type(state_dict).__qualname__}")
        store, keep, checksums, guard = self.store, self.keep, self.checksums, self.lease
        rank, threshold = self.comm.rank, self.pack_threshold

        def prepare(buffers: StagingBuffers) -> Job:
            stager = Stager(buffers)
            plan = plan_rank(dict(state_dict), rank=rank, pack_threshold=threshold, stager=stager)
            stager.finish()
            content = engine.RowContent(states={}, schemas={}, metadata=copy.deepcopy(metadata))

            def job(wcomm: Communicator) -> RankManifest:
                return engine.commit_row(
                    store,
                    wcomm,
                    content,
                    row=row,
                    checksums=checksums,
                    plan=plan,
                    guard=guard,
                    retention=keep,
                )

            return job

        self.writer.submit(prepare)
        # A boundary, as for distckpt.save: a preemption runner (watch_boundaries) may stop
        # here, committing what is queued through flush().
        hooks.announce(hooks.Boundary(self.comm, None, session=self))

    def _on_commit(self, event: hooks.Committed) -> None:
        if event.comm is self.writer.writer_comm:
            self.committed.append(event.row)  # one writer thread: appends are ordered

    def wait(self) -> int | None:
        """Collective: wait for every queued row; the newest committed row id."""
        self.writer.drain()
        return self.committed[-1] if self.committed else None

    def flush(self) -> int | None:
        """Collective: commit every queued row (:meth:`wait`); what a
        :class:`~distckpt.session.preempt.PreemptionHandler` calls before exiting."""
        return self.wait()

    @property
    def row(self) -> int | None:
        """The newest row this saver committed (None before the first)."""
        return self.committed[-1] if self.committed else None

    def close(self) -> int | None:
        """Collective: :meth:`wait`, then stop the writer thread."""
        try:
            self.writer.close()
        finally:
            self._unsubscribe()
        return self.committed[-1] if self.committed else None

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Unwinding an exception on this rank only: finish locally, do not coordinate.
        try:
            self.writer.close(coordinated=exc_type is None)
        finally:
            self._unsubscribe()
