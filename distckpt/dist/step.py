"""Named collective steps: the one place where ranks agree on whether a step failed.

Every collective step of save, load, election, retention and the asynchronous writer runs
through :func:`run`, :func:`gather` or :func:`decide`. Each rank's work is caught (any
``Exception``: ``OSError``, ``MemoryError`` and ``KeyError`` as much as distckpt's own), one
small JSON report per rank crosses the communicator, and if any rank failed every rank
raises the same error naming the step and each failing rank, so no rank is left waiting in
a collective for a peer that already raised. ``KeyboardInterrupt``, ``SystemExit`` and
``GeneratorExit`` are not caught: they end the process, not the step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from distckpt import faults
from distckpt.dist.comm import Communicator
from distckpt.errors import CheckpointError, CollectiveStepError, RankFailure

T = TypeVar("T")

# -- the steps, by name (tests enumerate them; fault injection is keyed by them) ----------
SAVE_LEASE = "save.lease"  # the coordinator creates the store and takes the writer lease
SAVE_PLAN = "save.plan"  # every rank plans its write: nothing touches the disk yet
SAVE_SHARDS = "save.shards"  # every rank learns every rank's boxes of global arrays
SAVE_OPEN = "save.open"  # the coordinator renews the lease and creates the row
SAVE_OPEN_LOCAL = "save.open_local"  # the other ranks create the row's directories
SAVE_COMMIT = "save.commit"  # every rank writes its data and manifest
SAVE_RETAIN = "save.retain"  # the coordinator deletes rows beyond retention
ELECT_SAME_SIZE = "elect.same_size"  # every rank reports the rows it committed
ELECT_ANY_SIZE = "elect.any_size"  # the coordinator looks for a newer row of another size
LOAD_CHECK_ROW = "load.check_row"  # an explicitly named row: every rank reads its manifest
LOAD_CHECK_ANY_SIZE = "load.check_any_size"  # ... or the coordinator reads all of them
LOAD_OPEN = "load.open"  # every rank opens its part of the chosen row
LOAD_STAND_INS = "load.stand_ins"  # decode the saved structure without reading bytes
LOAD_FIT = "load.fit"  # the saved structure fits the live state_dict
LOAD_VERIFY = "load.verify"  # verify bytes bound for live tensors, read the others
LOAD_FILL = "load.fill"  # read into live tensors
LOAD_READ = "load.read"  # decode every state (migration, redistribution, sessions)
LOAD_MIGRATE = "load.migrate"  # migrate saved states to the live versions
LOAD_KINDS = "load.kinds"  # the coordinator classifies states as uniform or rank-private
LOAD_MAPPING = "load.mapping"  # every rank asks the mapping policy where states come from
LOAD_REDISTRIBUTE = "load.redistribute"  # read states of a row of another world size
LOAD_MODEL = "load.model"  # plan what load_model puts into the model
MEMBERS_OPEN = "members.open"  # every rank reads every manifest of a row
MEMBERS_REPLICATED = "members.replicated"  # the coordinator decodes a replicated state
ASYNC_SUBMIT = "async.submit"  # earlier rows finished and this row was staged
ASYNC_DRAIN = "async.drain"  # every queued row finished
SESSION_PENDING = "session.pending"  # whether any rank has writes to commit

STEPS: dict[str, str] = {
    name: name.partition(".")[0]
    for name in (
        SAVE_LEASE,
        SAVE_PLAN,
        SAVE_SHARDS,
        SAVE_OPEN,
        SAVE_OPEN_LOCAL,
        SAVE_COMMIT,
        SAVE_RETAIN,
        ELECT_SAME_SIZE,
        ELECT_ANY_SIZE,
        LOAD_CHECK_ROW,
        LOAD_CHECK_ANY_SIZE,
        LOAD_OPEN,
        LOAD_STAND_INS,
        LOAD_FIT,
        LOAD_VERIFY,
        LOAD_FILL,
        LOAD_READ,
        LOAD_MIGRATE,
        LOAD_KINDS,
        LOAD_MAPPING,
        LOAD_REDISTRIBUTE,
        LOAD_MODEL,
        MEMBERS_OPEN,
        MEMBERS_REPLICATED,
        ASYNC_SUBMIT,
        ASYNC_DRAIN,
        SESSION_PENDING,
    )
}
"""Every step name -> its group (save, elect, load, members, async, session)."""

def register(name: str) -> str:
    """Add a step name for code above the library (a workflow's own collective step, such
    as the reference ensemble's output store); returns it. Names are ``group.what``."""
    group, dot, what = name.partition(".")
    if not (group and dot and what):
        raise ValueError(f"a step name is 'group.what', not {name!r}")
    STEPS.setdefault(name, group)
    return name


# The steps ``distckpt.save(..., keep=N)`` runs, in order, and those ``distckpt.load`` runs
# on a row written at this world size (election included).
SAVE_STEPS = (SAVE_PLAN, SAVE_LEASE, SAVE_SHARDS, SAVE_OPEN, SAVE_OPEN_LOCAL, SAVE_COMMIT, SAVE_RETAIN)
LOAD_STEPS = (
    ELECT_SAME_SIZE,
    ELECT_ANY_SIZE,
    LOAD_OPEN,
    LOAD_STAND_INS,
    LOAD_FIT,
    LOAD_VERIFY,
    LOAD_FILL,
)


def run(
    comm: Communicator,
    name: str,
    fn: Callable[[], T],
    *,
    context: str = "",
    fallback: type[CheckpointError] = CollectiveStepError,
) -> T:
    """Collective: every rank runs ``fn``; returns this rank's result once all succeeded.

    ``context`` starts the error's message (what failed, e.g. the row and store);
    ``fallback`` is the distckpt class the error also has when the first failure is not
    distckpt's own (it is then a :class:`CollectiveStepError` as well).
    """
    result, failure = _attempt(comm, name, fn)
    _agree(comm, name, failure, context, fallback)
    return result  # type: ignore[return-value]  # None only where a failure raised


def gather(
    comm: Communicator,
    name: str,
    fn: Callable[[], T],
    *,
    context: str = "",
    fallback: type[CheckpointError] = CollectiveStepError,
) -> list[T]:
    """Collective: every rank runs ``fn`` (a small JSON-able result); every rank gets the
    list of all ranks' results, in rank order."""
    result, failure = _attempt(comm, name, fn)
    sent = {"value": result} if failure is None else {"failure": _report(failure)}
    reports = comm.allgather(sent)
    _raise_if_failed(comm, name, reports, failure, context, fallback)
    return [r["value"] for r in reports]


def decide(
    comm: Communicator,
    name: str,
    fn: Callable[[], T],
    *,
    root: int = 0,
    context: str = "",
    fallback: type[CheckpointError] = CollectiveStepError,
) -> T:
    """Collective: rank ``root`` runs ``fn`` (a small JSON-able result) and every rank gets
    it; the other ranks only take part in agreeing (a fault may still be injected there)."""
    result, failure = _attempt(comm, name, fn if comm.rank == root else _nothing)
    _agree(comm, name, failure, context, fallback)
    value: T = comm.broadcast(result if comm.rank == root else None, root)
    return value


def _nothing() -> Any:
    return None


def _attempt(
    comm: Communicator, name: str, fn: Callable[[], T]
) -> tuple[T | None, Exception | None]:
    if name not in STEPS:
        raise ValueError(f"unknown collective step {name!r}")  # a programming error
    try:
        faults.step_fault(name, rank=comm.rank)
        return fn(), None
    except Exception as exc:  # any rank's failure becomes every rank's
        return None, exc


def _agree(
    comm: Communicator,
    name: str,
    failure: Exception | None,
    context: str,
    fallback: type[CheckpointError],
) -> None:
    reports = comm.allgather(None if failure is None else {"failure": _report(failure)})
    _raise_if_failed(comm, name, reports, failure, context, fallback)


def _report(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    report = {
        "type": cls.__name__,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "message": str(exc),
        "ours": isinstance(exc, CheckpointError),
    }
    fields = getattr(exc, "fields", None)
    if isinstance(exc, CheckpointError) and callable(fields):
        report["fields"] = fields()  # an error with fields keeps them on every rank
    return report


def _raise_if_failed(
    comm: Communicator,
    name: str,
    reports: list[Any],
    own: Exception | None,
    context: str,
    fallback: type[CheckpointError],
) -> None:
    found = {
        rank: r["failure"] for rank, r in enumerate(reports) if r is not None and "failure" in r
    }
    if not found:
        return
    failures = {
        rank: RankFailure(f["type"], f["message"], bool(f["ours"])) for rank, f in found.items()
    }
    first = min(found)
    if first == comm.rank and own is not None:
        cls: type | None = type(own)
    else:
        cls = _resolve(found[first]["class"]) if found[first]["ours"] else None
    fields = found[first].get("fields")
    raise combined_error(name, failures, cls, context, fallback, fields) from own


def combined_error(
    name: str,
    failures: dict[int, RankFailure],
    kept: type | None,
    context: str = "",
    fallback: type[CheckpointError] = CollectiveStepError,
    fields: dict[str, Any] | None = None,
) -> CheckpointError:
    """The error every rank raises for step ``name``: of class ``kept`` when that is a
    distckpt error class, else a :class:`CollectiveStepError` (that is also ``fallback``).
    ``fields`` (the first failure's, when its class has them) are rebuilt with
    ``kept.from_fields`` so every rank's error names what the failing rank found."""
    detail = "; ".join(f"rank {rank}: {f.type}: {f.message}" for rank, f in sorted(failures.items()))
    message = f"step {name} failed; {detail}"
    if context:
        message = f"{context}: {message}"
    error: CheckpointError | None = None
    if isinstance(kept, type) and issubclass(kept, CheckpointError):
        rebuild = getattr(kept, "from_fields", None)
        try:
            if fields is not None and callable(rebuild):
                error = rebuild(message, fields)
            else:
                error = kept(message)
        except (TypeError, KeyError, ValueError):  # needs more than a message, or bad fields
            error = None
    if error is None:
        error = _fallback_class(fallback)(message)
    error.step = name
    error.failures = failures
    return error


_COMBINED: dict[type[CheckpointError], type[CollectiveStepError]] = {}


def _fallback_class(base: type[CheckpointError]) -> type[CollectiveStepError]:
    """CollectiveStepError, or one subclass of it and ``base`` (so that e.g. a save that
    failed with ``OSError`` is still a ``CheckpointWriteError``)."""
    if issubclass(base, CollectiveStepError):
        return base
    found = _COMBINED.get(base)
    if found is None:
        found = _COMBINED[base] = type(
            f"Collective{base.__name__}",
            (CollectiveStepError, base),
            {"__module__": __name__, "__doc__": f"A failed collective step; a {base.__name__}."},
        )
    return found


def _resolve(path: str) -> type | None:
    """The class a peer raised, if this process has its module loaded (same code base)."""
    module, _, qualname = path.partition(":")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None
