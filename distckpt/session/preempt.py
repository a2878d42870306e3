"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint at the next boundary and stop".

A scheduler warns a job before it ends it (SLURM's ``--signal=USR1@300``, SIGTERM before a
kill, a cloud preemption notice). :class:`PreemptionHandler` installs signal handlers that
only record the signal; the workflow asks :meth:`PreemptionHandler.should_stop` at each
boundary (after a checkpoint write), a collective call on which every rank agrees, so a
signal that reached a single rank stops every rank at the same boundary. Then
:meth:`PreemptionHandler.checkpoint_and_exit` commits the pending row (collectively) and
raises ``SystemExit(REQUEUE_EXIT_CODE)``: exit status 85, "requeue me".

.. code-block:: python

    with PreemptionHandler() as preemption, ckpt as session:
        for step in range(start, n_steps):
            ...
            session.write(lead_time=step)
            preemption.at_boundary(session)  # flushes and exits with 85 once told to stop

Launchers that hide the workers' exit status (torchrun exits with 1 whatever its workers
returned) learn of the requeue from a marker file instead: with ``requeue_file=`` (default:
the ``DISTCKPT_REQUEUE_FILE`` environment variable) rank 0 writes a small JSON document there
once the row is committed, before any rank exits.

Code that cannot take a handler (a script you do not edit) runs under
``python -m distckpt.session.preempt SCRIPT ARGS...``: every ``CheckpointSession.write``,
``distckpt.save`` and ``AsyncSaver.save`` (so every ``CheckpointManager`` save) of that
process becomes a boundary (:func:`watch_boundaries`). ``CheckpointManager`` has a handler of
its own built in (``preemption=True``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import FrameType, TracebackType
from typing import Any, NoReturn

from distckpt.dist.comm import Communicator, resolve
from distckpt.engine import hooks
from distckpt.errors import CheckpointWriteError
from distckpt.logs import current_rank, get_logger
from distckpt.storage.filesystem import LocalFileSystem

#: Exit status meaning "a row was committed on purpose; requeue me and I will resume".
#: 85 is outside the shell's 126-165 range and the codes torchrun, srun and Python use.
REQUEUE_EXIT_CODE = 85
#: Signals handled by default: SLURM's ``--signal=USR1@T`` warning and SIGTERM.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)
#: Environment variables giving the defaults of ``exit_code=`` and ``requeue_file=``.
EXIT_CODE_ENV = "DISTCKPT_REQUEUE_EXIT_CODE"
REQUEUE_FILE_ENV = "DISTCKPT_REQUEUE_FILE"

_REQUESTED = -1  # the local flag when request_stop() was called rather than a signal received

log = get_logger(
    "distckpt.session.preempt"
)  # also when run as __main__ (python -m distckpt.session.preempt)

SignalLike = int | str | signal.Signals


def parse_signal(value: SignalLike) -> signal.Signals:
    """``signal.SIGUSR1``, ``10``, ``"USR1"`` or ``"SIGUSR1"`` -> ``signal.SIGUSR1``."""
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return signal.Signals(int(name))
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal {value!r}") from None
    return signal.Signals(value)


def _describe(flag: int) -> str:
    if flag == _REQUESTED:
        return "request_stop()"
    try:
        return signal.Signals(flag).name
    except ValueError:
        return f"signal {flag}"


class _RankAdapter(logging.LoggerAdapter):
    """Adds the rank to every record (``record.rank``: the rank in the communicator the
    handler agrees over, once known) and to the message, for logs formatted without it."""

    def __init__(self, logger: logging.Logger, handler: PreemptionHandler) -> None:
        super().__init__(logger, {})
        self._handler = handler

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        rank = self._handler.rank
        if rank is not None:  # else the logger's RankFilter fills in its default
            kwargs["extra"] = {"rank": rank, **(kwargs.get("extra") or {})}
        return f"rank {rank if rank is not None else '?'}: {msg}", kwargs


class PreemptionHandler:
    """Signals -> a stop flag; a collective decision at boundaries; commit and exit 85.

    ``signals``: what to handle (numbers, ``signal.Signals`` or names such as ``"USR1"``).
    ``comm``: what the ranks agree over (anything :func:`distckpt.dist.comm.resolve` takes);
    resolved at the first :meth:`should_stop`, so the handler may be installed before the
    process group exists. ``every``: look only at every N-th boundary (one allgather of a
    few bytes per look); every rank must count the same boundaries. ``exit_code``: the
    "requeue me" status (default ``$DISTCKPT_REQUEUE_EXIT_CODE`` or 85). ``requeue_file``:
    where rank 0 records the committed row before exiting (default ``$DISTCKPT_REQUEUE_FILE``,
    unset: nowhere). ``chain``: also call a Python-level handler that was installed before
    (``SIG_DFL``/``SIG_IGN`` are never called: the default action would kill the process).

    Use as a context manager (installs on enter, restores the previous handlers on exit) or
    call :meth:`install` / :meth:`uninstall`. Handlers can be installed from the main thread
    only (a Python rule). The handler itself only stores the signal number.
    """

    def __init__(
        self,
        signals: Iterable[SignalLike] = DEFAULT_SIGNALS,
        *,
        comm: Any = None,
        every: int = 1,
        exit_code: int | None = None,
        requeue_file: str | os.PathLike[str] | None = None,
        chain: bool = True,
    ) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(
            dict.fromkeys(parse_signal(s) for s in signals)
        )
        if not self.signals:
            raise ValueError("no signals to handle")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, not {every!r}")
        if exit_code is None:
            env = os.environ.get(EXIT_CODE_ENV, "").strip()
            exit_code = int(env) if env else REQUEUE_EXIT_CODE
        if isinstance(exit_code, bool) or not 1 <= exit_code <= 255:
            raise ValueError(f"exit_code must be in 1..255, not {exit_code!r}")
        if requeue_file is None:
            requeue_file = os.environ.get(REQUEUE_FILE_ENV) or None
        self.every = every
        self.exit_code = int(exit_code)
        self.requeue_file = os.fspath(requeue_file) if requeue_file is not None else None
        self.chain = chain
        self._comm_arg = comm
        self._comm: Communicator | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False
        self._flag = 0  # written by the signal handler: the first signal number received
        self._boundaries = 0
        self._stop_at: int | None = None
        self._reasons: dict[int, str] = {}
        self._exiting = False
        self.log = _RankAdapter(log, self)

    # -- signals -------------------------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handlers (idempotent); returns self."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in self.signals:
                previous[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            for sig, prev in previous.items():
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            raise
        self._previous = previous
        self._installed = True
        self.log.debug("handling %s", ", ".join(s.name for s in self.signals))
        return self

    def uninstall(self) -> None:
        """Put back the handlers found by :meth:`install` (``SIG_DFL`` where it found one set
        outside Python). A handler someone installed over ours since is left in place.

        After :meth:`checkpoint_and_exit` the handlers stay (they only record), so a second
        signal while the process unwinds cannot turn the requeue status into a signal death."""
        if not self._installed or self._exiting:
            return
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            else:
                self.log.debug("%s: another handler replaced ours; left in place", sig.name)
        self._previous = {}
        self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: record, nothing else (no logging, no I/O).
        if not self._flag:
            self._flag = signum
        if self.chain:
            prev = self._previous.get(signal.Signals(signum))
            if callable(prev) and prev is not signal.default_int_handler:
                prev(signum, frame)

    def request_stop(self) -> None:
        """Ask for a stop from code rather than a signal (e.g. a wall-clock budget)."""
        if not self._flag:
            self._flag = _REQUESTED

    @property
    def received(self) -> signal.Signals | None:
        """The first signal this process received (local; None if none)."""
        return signal.Signals(self._flag) if self._flag > 0 else None

    @property
    def stop_requested(self) -> bool:
        """Whether this process was signalled or asked to stop (local, not agreed)."""
        return self._flag != 0

    # -- the collective decision ------------------------------------------------------------
    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            self._comm = resolve(self._comm_arg)
        return self._comm

    @property
    def rank(self) -> int | None:
        """This process's rank in ``comm`` (before it is resolved: the launcher's)."""
        return self._comm.rank if self._comm is not None else current_rank()

    @property
    def boundaries(self) -> int:
        """Boundaries counted so far (calls of :meth:`should_stop`)."""
        return self._boundaries

    @property
    def stopping(self) -> bool:
        """Whether the ranks agreed to stop (set by :meth:`should_stop`)."""
        return self._stop_at is not None

    @property
    def reasons(self) -> dict[int, str]:
        """Rank -> what it received, for the ranks that triggered the agreed stop."""
        return dict(self._reasons)

    def should_stop(self) -> bool:
        """Collective: True on every rank, at the same boundary, once any rank was signalled.

        Counts a boundary; on every ``every``-th one, allgathers each rank's flag (a few bytes
        over the communicator). Once True it stays True without communicating again.
        """
        if self._stop_at is not None:
            return True
        self._boundaries += 1
        if self._boundaries % self.every:
            return False
        # A plain collective, not a step: nothing on the way to it can raise.
        flags = self.comm.allgather(int(self._flag))
        hits = {rank: _describe(int(f)) for rank, f in enumerate(flags) if f}
        if not hits:
            return False
        self._stop_at = self._boundaries
        self._reasons = hits
        what = ", ".join(f"rank {r}: {why}" for r, why in hits.items())
        self.log.warning("preemption (%s): stopping at boundary %d", what, self._boundaries)
        return True

    def checkpoint_and_exit(self, target: Any = None) -> NoReturn:
        """Collective: commit, record the requeue, raise ``SystemExit(exit_code)``.

        ``target``: a checkpoint session (or anything with ``flush()``: its pending writes
        become a row), a callable (called with no arguments; it may return the row id), or
        None when the last boundary already committed everything (e.g. after
        ``distckpt.save``). Rank 0 then writes the requeue file, if any, and every rank waits
        for it before exiting, so no launcher sees an exit before the record exists.

        From here on the process only exits, and keeps its exit status: the handled signals
        stay recorded-only while ``SystemExit`` unwinds (a launcher such as torchrun sends
        SIGTERM to the other ranks as soon as one exits) and are ignored during interpreter
        teardown; an initialised ``torch.distributed`` process group that nobody destroyed is
        destroyed at exit (``atexit``), since tearing down a live gloo group while the peers
        disconnect can abort the process.
        """
        row = self._commit(target)
        comm = self.comm
        if comm.is_coordinator and self.requeue_file:
            self._write_requeue_file(row, comm.world_size)
        # A plain barrier, not a step: the record's write logs its own errors, never raises.
        comm.barrier()
        self._exiting = True
        atexit.register(_quiet_teardown, self.signals if self._installed else ())
        self.log.warning(
            "row %s committed; exiting with status %d (requeue to resume)",
            row if row is not None else "(none new)",
            self.exit_code,
        )
        raise SystemExit(self.exit_code)

    def at_boundary(self, target: Any = None) -> None:
        """Call at every boundary: ``checkpoint_and_exit(target)`` once the ranks agree."""
        if self.should_stop():
            self.checkpoint_and_exit(target)

    def _commit(self, target: Any) -> int | None:
        """Commit ``target``; the row for the requeue record is the last one the commit
        events reported while it ran (else what the target returned)."""
        if target is None:
            return None
        committed: list[int] = []
        unsubscribe = hooks.subscribe_commits(lambda event: committed.append(event.row))
        try:
            row = self._run_target(target)
        finally:
            unsubscribe()
        return committed[-1] if committed else row

    def _run_target(self, target: Any) -> int | None:
        flush = getattr(target, "flush", None)
        if callable(flush):
            result = flush()
            catalog = getattr(target, "catalog", None)
            if catalog is not None and getattr(catalog, "async_write", False):
                catalog.wait()  # collective: the row is committed before it is recorded
            row = getattr(result, "row", None)
            return row if row is not None else getattr(target, "row", None)
        if callable(target):
            result = target()
            if isinstance(result, int) and not isinstance(result, bool):
                return result
            return getattr(result, "row", None)
        raise TypeError(
            f"checkpoint_and_exit needs a session (flush()), a callable or None, not "
            f"{type(target).__qualname__}"
        )

    def _write_requeue_file(self, row: int | None, world_size: int) -> None:
        assert self.requeue_file is not None
        record = {
            "row": row,
            "exit_code": self.exit_code,
            "boundary": self._boundaries,
            "reasons": {str(r): why for r, why in self._reasons.items()},
            "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            LocalFileSystem().atomic_write(self.requeue_file, json.dumps(record).encode())
        except (OSError, CheckpointWriteError) as exc:
            # The row is committed either way; a driver that misses the record still sees
            # the exit status (or its own forwarded signal).
            self.log.error("could not write the requeue file %s: %s", self.requeue_file, exc)

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        names = ",".join(s.name for s in self.signals)
        return (
            f"PreemptionHandler(signals={names}, every={self.every}, exit_code={self.exit_code}, "
            f"installed={self._installed}, stopping={self.stopping})"
        )


def _quiet_teardown(signals: tuple[signal.Signals, ...]) -> None:
    """atexit, after checkpoint_and_exit: keep the exit status through interpreter teardown.

    Python resets its own signal handlers to SIG_DFL while finalising, so a late SIGTERM
    would kill the process with -15; SIG_IGN survives finalisation.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_IGN)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # teardown of a group whose peers are gone: nothing to save
        log.debug("destroying the process group at exit: %s", exc)


def preemption(
    signals: Iterable[SignalLike] = DEFAULT_SIGNALS,
    *,
    comm: Any = None,
    every: int = 1,
    exit_code: int | None = None,
    requeue_file: str | os.PathLike[str] | None = None,
    chain: bool = True,
) -> PreemptionHandler:
    """``with preemption() as p:`` -- a :class:`PreemptionHandler`, installed by ``with``."""
    return PreemptionHandler(
        signals,
        comm=comm,
        every=every,
        exit_code=exit_code,
        requeue_file=requeue_file,
        chain=chain,
    )


@contextlib.contextmanager
def watch_boundaries(handler: PreemptionHandler) -> Iterator[PreemptionHandler]:
    """Make every ``CheckpointSession.write`` and ``distckpt.save`` of this process a boundary.

    For code that cannot take the handler (an unmodified workflow): after each write the
    handler is asked (collectively) and, once the ranks agree, the session is flushed and the
    process exits with the requeue status. With no explicit ``comm``, the handler agrees over
    the communicator of the first session (or ``save``) it sees. Subscribes to the boundary
    events of :mod:`distckpt.engine.hooks` while the context lasts.
    """

    def on_boundary(event: hooks.Boundary) -> None:
        if handler._comm is None and handler._comm_arg is None:
            handler._comm = event.comm
        if event.session is not None:
            handler.at_boundary(event.session)
        else:
            row = event.row
            handler.at_boundary(lambda: row)

    unsubscribe = hooks.subscribe(on_boundary)
    try:
        yield handler
    finally:
        unsubscribe()


def main(argv: list[str] | None = None) -> int:
    """``python -m distckpt.session.preempt [options] SCRIPT [ARGS...]`` (or ``-m MODULE``)."""
    p = argparse.ArgumentParser(
        prog="python -m distckpt.session.preempt",
        description="Run a Python script or module with a PreemptionHandler installed: every "
        "CheckpointSession.write and distckpt.save is a boundary at which the ranks agree to "
        f"stop once one was signalled; they then commit and exit with {REQUEUE_EXIT_CODE}.",
    )
    p.add_argument(
        "--signals",
        default=",".join(s.name for s in DEFAULT_SIGNALS),
        help="comma-separated signals to handle (default: %(default)s)",
    )
    p.add_argument("--every", type=int, default=1, help="look every N boundaries (default 1)")
    p.add_argument(
        "--exit-code",
        type=int,
        default=None,
        help=f"requeue exit status (default ${EXIT_CODE_ENV} or {REQUEUE_EXIT_CODE})",
    )
    p.add_argument(
        "--requeue-file", default=None, help=f"requeue record (default ${REQUEUE_FILE_ENV})"
    )
    p.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name")
    p.add_argument("target", metavar="SCRIPT", help="the script (or, with -m, the module)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)

    handler = PreemptionHandler(
        [s for s in args.signals.split(",") if s.strip()],
        every=args.every,
        exit_code=args.exit_code,
        requeue_file=args.requeue_file,
    )
    run: Callable[[], Any]
    if args.module:
        sys.argv = [args.target, *args.args]
        run = functools.partial(runpy.run_module, args.target, run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args.target)
        sys.argv = [args.target, *args.args]
        sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` would have it
        run = functools.partial(runpy.run_path, script, run_name="__main__")
    with handler, watch_boundaries(handler):
        run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
