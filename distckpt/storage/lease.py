"""The writer lease: at most one job writes rows into a store at a time.

A lease is the JSON file ``<store>/lease.json``: who holds it (host, pid, launcher job id),
a random token, when it was acquired and when its holder last renewed it (the heartbeat).
The writing job's coordinator acquires it before its first row, renews it at every commit
and releases it at exit; offline tools (``distckpt gc``) check it before deleting anything.

Who may take a lease over:

- nobody, while the holder's heartbeat is younger than the holder's own ``timeout_s``
  (recorded in the file) and its process may be alive: ``LeaseHeldError`` names the holder;
- anyone, once the heartbeat is older than that timeout (a warning is logged);
- anyone at once, when the holder ran on this host and its process is gone (its pid does not
  exist, belongs to a newer process, or the host rebooted since);
- a writer of the same launcher job id at once (a requeued SLURM job keeps its id, and a
  launcher never runs two incarnations of a job together), unless ``same_job_takeover=False``.

Races. Every change of ``lease.json`` (acquire, renew, release) happens inside a short
critical section guarded by ``<store>/lease.lock``, created with ``O_CREAT | O_EXCL``: of two
processes creating it at once exactly one succeeds, also on NFSv3+ and Lustre, which make
exclusive creation atomic on the server. Inside the section the lease is read, judged,
published with the store's ``FileSystem.atomic_write`` (temp file, fsync, rename) and read
back: a lease whose token is not ours after the write was lost to someone else. A lock left
by a crashed process is broken when it belongs to a dead process of this host, or when the
same lock (same token) has been seen for ``LOCK_STALE_S`` seconds of our own monotonic clock
(so clock skew between nodes does not matter for locks).

On object stores (``FileSystem.native_compare_and_swap``) there is no lock file: the lease's
ETag is read when the section opens and the lease is published with a PUT conditional on
it (``If-Match``; ``If-None-Match: *`` when there was none), so of two writers that judged
the same lease only one can publish. Release checks the token and deletes (S3 has no
conditional delete): only a takeover in those milliseconds could lose its new lease, and
its owner's read-back notices.

Limits: heartbeat ages compare the holder's wall clock with the reader's, so node clocks must
agree to well within ``timeout_s`` (NTP does this). NFSv2 has no exclusive create. Breaking a
stale lock is itself a rename race; two processes breaking the same stale lock at the same
instant are told apart by the token they read, and the read-back after the write is the last
guard. Liveness by pid needs the same host, boot and pid namespace; across hosts only the
heartbeat counts. The lease protects against a second *job*, not against a second process of
the same job: only the coordinator takes it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from distckpt.errors import (
    CheckpointError,
    CheckpointWriteError,
    LeaseHeldError,
    LeaseLostError,
    StoreFormatError,
    VersionConflictError,
)
from distckpt.logs import get_logger
from distckpt.storage.store import Store

log = get_logger(__name__)

LEASE_FILE = "lease.json"
LOCK_FILE = "lease.lock"
LEASE_VERSION = 1
DEFAULT_TIMEOUT_S = 300.0
LOCK_STALE_S = 10.0  # a critical section takes milliseconds; a lock this old is left over
LOCK_WAIT_S = 30.0

# Launcher variables naming the job, in order of preference.
JOB_ID_VARIABLES = (
    "SLURM_JOB_ID",
    "PBS_JOBID",
    "LSB_JOBID",
    "FLUX_JOB_ID",
    "COBALT_JOBID",
    "JOB_ID",  # Grid Engine
)  # not TORCHELASTIC_RUN_ID: standalone torchrun runs all share the id "none"

Clock = Callable[[], float]
_T = TypeVar("_T")
LeaseState = Literal["free", "held", "stale", "dead", "invalid"]


def job_id_from_environment() -> str | None:
    for name in JOB_ID_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LeaseInfo:
    """The content of ``lease.json``: who holds the lease, and since when."""

    token: str
    host: str
    pid: int
    job: str | None
    purpose: str
    acquired: float  # wall-clock seconds since the epoch
    heartbeat: float
    timeout_s: float
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None

    def to_json(self) -> bytes:
        doc = {
            "distckpt_lease": LEASE_VERSION,
            "token": self.token,
            "host": self.host,
            "pid": self.pid,
            "job": self.job,
            "purpose": self.purpose,
            "acquired": self.acquired,
            "heartbeat": self.heartbeat,
            "acquired_utc": _iso(self.acquired),
            "heartbeat_utc": _iso(self.heartbeat),
            "timeout_s": self.timeout_s,
            "boot_id": self.boot_id,
            "pid_ns": self.pid_ns,
            "pid_start": self.pid_start,
        }
        return json.dumps(doc, indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> LeaseInfo:
        """Parse a lease file; ValueError when it is not one."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("distckpt_lease"), int):
            raise ValueError("not a distckpt lease")

        def opt(key: str, kind: type) -> Any:
            value = doc.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        try:
            return LeaseInfo(
                token=str(doc["token"]),
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                job=None if doc.get("job") is None else str(doc["job"]),
                purpose=str(doc.get("purpose", "writer")),
                acquired=float(doc["acquired"]),
                heartbeat=float(doc["heartbeat"]),
                timeout_s=float(doc.get("timeout_s", DEFAULT_TIMEOUT_S)),
                boot_id=opt("boot_id", str),
                pid_ns=opt("pid_ns", str),
                pid_start=opt("pid_start", int),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed lease ({exc})") from exc

    def describe(self, now: float) -> str:
        job = f", job {self.job}" if self.job else ""
        purpose = "" if self.purpose == "writer" else f" ({self.purpose})"
        return (
            f"host {self.host}, pid {self.pid}{job}{purpose}, last heartbeat "
            f"{_age(now - self.heartbeat)} ago (taken over after {self.timeout_s:g}s)"
        )


def _iso(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat()


def _age(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _holder_process_gone(info: LeaseInfo) -> str | None:
    """Why the holder's process certainly no longer exists, or None when it may be alive."""
    if info.host != socket.gethostname():
        return None
    boot = _boot_id()
    if info.boot_id and boot and info.boot_id != boot:
        return f"host {info.host} rebooted since"
    ns = _pid_namespace()
    if info.pid_ns and ns and info.pid_ns != ns:
        return None  # another container on this host: its pids mean nothing here
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return f"process {info.pid} on {info.host} has exited"
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return None
    start = _process_start(info.pid)
    if info.pid_start is not None and start is not None and start != info.pid_start:
        return f"process {info.pid} on {info.host} has exited (pid reused)"
    return None


@dataclass(frozen=True)
class LeaseStatus:
    """What ``lease.json`` says now, judged from here.

    ``state``: ``free`` (no lease file), ``held`` (a live holder), ``stale`` (heartbeat older
    than the holder's timeout), ``dead`` (holder's process gone), ``invalid`` (unreadable
    file). Only ``held`` blocks an acquirer.
    """

    path: str
    state: LeaseState
    holder: LeaseInfo | None
    heartbeat_age_s: float | None
    reason: str

    @property
    def held(self) -> bool:
        return self.state == "held"

    def to_json(self) -> dict[str, Any]:
        h = self.holder
        return {
            "state": self.state,
            "reason": self.reason,
            "host": h.host if h else None,
            "pid": h.pid if h else None,
            "job": h.job if h else None,
            "purpose": h.purpose if h else None,
            "acquired_utc": _iso(h.acquired) if h else None,
            "heartbeat_utc": _iso(h.heartbeat) if h else None,
            "heartbeat_age_s": self.heartbeat_age_s,
            "timeout_s": h.timeout_s if h else None,
        }


def _as_store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _judge(path: str, raw: bytes | None, now: float) -> LeaseStatus:
    if raw is None:
        return LeaseStatus(path, "free", None, None, "no lease")
    try:
        info = LeaseInfo.from_json(raw)
    except ValueError as exc:
        return LeaseStatus(path, "invalid", None, None, f"{path} is unreadable: {exc}")
    age = max(0.0, now - info.heartbeat)
    gone = _holder_process_gone(info)
    if gone is not None:
        return LeaseStatus(path, "dead", info, age, gone)
    if age > info.timeout_s:
        return LeaseStatus(
            path, "stale", info, age, f"no heartbeat for {_age(age)} (timeout {info.timeout_s:g}s)"
        )
    return LeaseStatus(path, "held", info, age, f"held by {info.describe(now)}")


def _read_lease(store: Store) -> bytes | None:
    path = os.path.join(store.path, LEASE_FILE)
    try:
        return store.fs.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a FIFO, a link, a directory, EIO: name it, never a raw OSError
        raise StoreFormatError(
            f"the lease {path} of store {store.path} cannot be read: {exc.strerror or exc}"
        ) from exc


def lease_status(store: Store | str | os.PathLike[str], *, clock: Clock = time.time) -> LeaseStatus:
    """The store's lease as it stands now (reads one file; takes no lock)."""
    st = _as_store(store)
    return _judge(os.path.join(st.path, LEASE_FILE), _read_lease(st), clock())


_UNREADABLE = "<unreadable>"
_UNREADABLE_GRACE_S = 0.2  # a lock file still not JSON after this was not written by us
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _lock_error(path: str, store: str, exc: OSError) -> CheckpointWriteError:
    what = "no space left" if exc.errno in _NO_SPACE else "cannot write"
    return CheckpointWriteError(
        f"{what} creating the lease lock {path} of store {store}: {exc.strerror or exc}"
    )


class _LockFile:
    """The ``O_EXCL`` lock around every change of the lease file (held for milliseconds).

    Where the backend has native compare-and-swap, no lock file: entering records the
    lease's version, and :meth:`Lease._publish` writes conditionally on it."""

    def __init__(self, store: Store, *, wait_s: float, stale_s: float) -> None:
        self.path = os.path.join(store.path, LOCK_FILE)
        self.store = store
        self.wait_s = wait_s
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex
        self.cas = store.fs.native_compare_and_swap
        self.version: str | None = None  # the lease's version when entered (cas only)

    def __enter__(self) -> _LockFile:
        if self.cas:
            try:
                _, self.version = self.store.fs.read_versioned(
                    os.path.join(self.store.path, LEASE_FILE)
                )
            except FileNotFoundError:
                self.version = None
            return self
        body = json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid()}
        ).encode()
        deadline = time.monotonic() + self.wait_s
        seen: tuple[str, float] | None = None  # (token, monotonic time first seen)
        unreadable_since: float | None = None
        delay = 0.002
        while True:
            try:
                self.store.fs.create_exclusive(self.path, body)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise StoreFormatError(f"store {self.store.path} does not exist") from None
            except OSError as exc:  # ENOSPC, EIO, EROFS...: name the file, never a raw OSError
                raise _lock_error(self.path, self.store.path, exc) from exc
            else:
                return self
            other = self._read()
            now = time.monotonic()
            if other is None or other.get("token") != _UNREADABLE:
                unreadable_since = None
            elif unreadable_since is None:
                unreadable_since = now  # perhaps a lock being written this instant: look again
            elif now - unreadable_since > _UNREADABLE_GRACE_S:
                # Not a lock distckpt wrote (it writes one small JSON object at once): waiting
                # longer would not change it, and breaking it would hide what put it there.
                raise StoreFormatError(
                    f"the lease lock {self.path} of store {self.store.path} is not a distckpt "
                    "lock file (not a JSON object, or not a readable file): remove it if no "
                    "distckpt process is writing to the store"
                )
            if other is not None:
                token = str(other.get("token"))
                if seen is None or seen[0] != token:
                    seen = (token, now)
                if self._holder_dead(other) or now - seen[1] > self.stale_s:
                    self._break(token)
                    continue
            if now > deadline:
                raise CheckpointError(
                    f"cannot take the lease lock {self.path} of store {self.store.path}: "
                    f"held for over {self.wait_s:g}s by {other}"
                )
            time.sleep(delay)
            delay = min(0.05, delay * 2)

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.store.fs.read_bytes(self.path) or b"{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"token": _UNREADABLE}
        return doc if isinstance(doc, dict) else {"token": _UNREADABLE}

    @staticmethod
    def _holder_dead(doc: dict[str, Any]) -> bool:
        if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
            return False
        try:
            os.kill(doc["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _break(self, token: str) -> None:
        """Remove a left-over lock, but only the one we judged (by its token)."""
        fs = self.store.fs
        aside = f"{self.path}.{uuid.uuid4().hex}.broken"
        try:
            fs.rename(self.path, aside)
        except FileNotFoundError:
            return  # its owner released it meanwhile
        doc: Any = None
        try:
            doc = json.loads(fs.read_bytes(aside) or b"{}")
            moved = str(doc.get("token")) if isinstance(doc, dict) else _UNREADABLE
        except (OSError, ValueError):
            moved = _UNREADABLE
        if moved != token:
            # A fresh lock replaced the stale one between our read and the rename: put it
            # back (link fails if yet another one appeared; its owner's read-back decides).
            with contextlib.suppress(OSError):
                fs.link(aside, self.path)
        else:
            log.warning("broke a left-over lease lock of %s (%s)", self.store.path, doc)
        with contextlib.suppress(OSError):
            fs.remove(aside)

    def still_mine(self) -> bool:
        if self.cas:
            return True  # no lock: the conditional publish decides
        doc = self._read()
        return doc is not None and doc.get("token") == self.token

    def __exit__(self, *exc: object) -> None:
        if not self.cas and self.still_mine():
            try:
                self.store.fs.remove(self.path)
            except OSError as err:
                raise CheckpointWriteError(
                    f"cannot remove the lease lock {self.path} of store {self.store.path}: "
                    f"{err.strerror or err}"
                ) from err


class Lease:
    """A held writer lease on one store. Create with :meth:`Lease.acquire`.

    ``renew()`` records a heartbeat, ``release()`` gives the lease up; both check first that
    the lease is still this one (its token) and raise ``LeaseLostError`` otherwise. Usable as
    a context manager (released on exit).
    """

    def __init__(
        self,
        store: Store,
        info: LeaseInfo,
        *,
        clock: Clock = time.time,
        lock_wait_s: float = LOCK_WAIT_S,
        lock_stale_s: float = LOCK_STALE_S,
    ) -> None:
        self.store = store
        self.info = info
        self._clock = clock
        self._lock_wait_s = lock_wait_s
        self._lock_stale_s = lock_stale_s
        self._released = False
        self._mutex = threading.Lock()
        self._heartbeat_stop: threading.Event | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_error: CheckpointError | None = None
        self._pid = os.getpid()
        _LIVE.add(self)

    # -- acquiring -------------------------------------------------------------------------
    @classmethod
    def acquire(
        cls,
        store: Store | str | os.PathLike[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_s: float = 0.0,
        job_id: str | None = None,
        purpose: str = "writer",
        same_job_takeover: bool = True,
        clock: Clock = time.time,
        lock_wait_s: float = LOCK_WAIT_S,
        lock_stale_s: float = LOCK_STALE_S,
    ) -> Lease:
        """Take the store's lease, or raise ``LeaseHeldError`` naming its live holder.

        ``timeout_s``: this holder promises to renew at least this often; others may take the
        lease over once its heartbeat is older (recorded in the file, so every reader judges
        by the holder's own promise). ``wait_s``: keep trying this long while the lease is
        held before raising. ``job_id``: defaults to the launcher's (``SLURM_JOB_ID``, ...).
        ``same_job_takeover``: a writer lease held under the same job id is this job's
        earlier incarnation (a requeued SLURM job keeps its id; the launcher never runs two
        at once) and is taken over at once instead of waiting ``timeout_s``.
        The store must exist (``Store.create``) and be of a format this distckpt reads.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        st = _as_store(store)
        if st.root_attributes() is None:
            raise StoreFormatError(
                f"{st.path} is not a distckpt store yet: create the store before leasing it"
            )
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls._try_acquire(
                    st,
                    timeout_s=timeout_s,
                    job_id=job_id if job_id is not None else job_id_from_environment(),
                    purpose=purpose,
                    same_job_takeover=same_job_takeover,
                    clock=clock,
                    lock_wait_s=lock_wait_s,
                    lock_stale_s=lock_stale_s,
                )
            except LeaseHeldError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(min(1.0, max(0.01, deadline - time.monotonic())))

    @classmethod
    def _try_acquire(
        cls,
        st: Store,
        *,
        timeout_s: float,
        job_id: str | None,
        purpose: str,
        same_job_takeover: bool,
        clock: Clock,
        lock_wait_s: float,
        lock_stale_s: float,
    ) -> Lease:
        path = os.path.join(st.path, LEASE_FILE)
        with _LockFile(st, wait_s=lock_wait_s, stale_s=lock_stale_s) as lock:
            now = clock()
            status = _judge(path, _read_lease(st), now)
            holder = status.holder
            mine = (
                holder is not None
                and holder.host == socket.gethostname()
                and holder.pid == os.getpid()
            )
            if status.held and mine and holder is not None and not _live_token(holder.token):
                # This process published the lease, but no Lease of it exists: the publish
                # failed after the rename (EIO on the directory's fsync), so the acquire
                # raised. The lease is this process's own left-over: take it back at once
                # instead of refusing this process for its timeout.
                log.warning(
                    "store %s: taking back a lease this process published in an acquire "
                    "that failed",
                    st.path,
                )
            elif (
                status.held
                and same_job_takeover
                and holder is not None
                and not mine
                and job_id is not None
                and holder.job == job_id
                and holder.purpose == purpose == "writer"
            ):
                # A requeued or restarted job keeps its launcher id, and the launcher never
                # runs two incarnations at once: the holder is this job's previous one.
                log.warning(
                    "taking over the lease of store %s from an earlier incarnation of job %s (%s)",
                    st.path,
                    job_id,
                    holder.describe(now),
                )
            elif status.held:
                assert holder is not None
                who = "this process" if mine else "another writer"
                raise LeaseHeldError(
                    f"store {st.path} is leased by {who}: {holder.describe(now)}",
                    holder,
                )
            if status.state in ("stale", "dead", "invalid"):
                log.warning("taking over the lease of store %s: %s", st.path, status.reason)
            info = LeaseInfo(
                token=uuid.uuid4().hex,
                host=socket.gethostname(),
                pid=os.getpid(),
                job=job_id,
                purpose=purpose,
                acquired=now,
                heartbeat=now,
                timeout_s=float(timeout_s),
                boot_id=_boot_id(),
                pid_ns=_pid_namespace(),
                pid_start=_process_start(os.getpid()),
            )
            cls._publish(st, lock, info)
            # Live before the lock is let go: another thread of this process that takes the
            # lock next must see this token as held, not as a failed publish to take back.
            return cls(st, info, clock=clock, lock_wait_s=lock_wait_s, lock_stale_s=lock_stale_s)

    @staticmethod
    def _publish(st: Store, lock: _LockFile, info: LeaseInfo) -> None:
        path = os.path.join(st.path, LEASE_FILE)
        if not lock.still_mine():
            raise LeaseHeldError(f"lost the lease lock of store {st.path} to another process")
        if lock.cas:
            try:
                st.fs.write_if_version(path, info.to_json(), lock.version)
            except VersionConflictError:
                raise LeaseHeldError(
                    f"store {st.path}: another process changed the lease at the same time",
                ) from None
        else:
            st.fs.atomic_write(path, info.to_json())
        raw = _read_lease(st)
        try:
            current = LeaseInfo.from_json(raw) if raw is not None else None
        except ValueError:
            current = None
        if current is None or current.token != info.token:
            raise LeaseHeldError(
                f"store {st.path}: another process took the lease at the same time", current
            )

    # -- holding ---------------------------------------------------------------------------
    @property
    def token(self) -> str:
        return self.info.token

    @property
    def held(self) -> bool:
        return not self._released

    def _check_mine(self, now: float) -> None:
        raw = _read_lease(self.store)
        if raw is None:
            raise LeaseLostError(f"the lease of store {self.store.path} was removed")
        try:
            current = LeaseInfo.from_json(raw)
        except ValueError as exc:
            raise LeaseLostError(
                f"the lease of store {self.store.path} is unreadable: {exc}"
            ) from exc
        if current.token != self.info.token:
            raise LeaseLostError(
                f"the lease of store {self.store.path} was taken over by {current.describe(now)}",
                current,
            )

    def renew(self) -> None:
        """Record a heartbeat; ``LeaseLostError`` if someone else holds the lease now."""
        with self._mutex:
            if self._heartbeat_error is not None:
                raise self._heartbeat_error
            if self._released:
                raise LeaseLostError(f"the lease of store {self.store.path} was released")
            lock = _LockFile(self.store, wait_s=self._lock_wait_s, stale_s=self._lock_stale_s)
            with lock:
                now = self._clock()
                self._check_mine(now)
                info = dataclasses.replace(self.info, heartbeat=now)
                self._publish(self.store, lock, info)
                self.info = info

    def refresh(self, renew_after_s: float | None = None) -> None:
        """Renew unless the last heartbeat is younger than ``renew_after_s`` (default: a
        tenth of the timeout; nobody may take a lease over whose heartbeat is that fresh).
        What a writer calls at each commit: a renewal costs a few small synchronous writes.
        ``LeaseLostError`` if the lease is no longer this one."""
        fresh = self.info.timeout_s / 10 if renew_after_s is None else renew_after_s
        if self._released or self._heartbeat_error is not None:
            self.renew()  # raises why this lease cannot guard a commit
        if self._clock() - self.info.heartbeat >= fresh:
            self.renew()

    def critical(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` inside the lease's critical section, once the lease is checked to be
        still this one (``LeaseLostError`` otherwise): what only the holder may do, such as
        allocating the next row id, cannot interleave with a takeover. ``fn`` should take
        milliseconds (the section's lock is broken after ``LOCK_STALE_S``)."""
        with self._mutex:
            if self._heartbeat_error is not None:
                raise self._heartbeat_error
            if self._released:
                raise LeaseLostError(f"the lease of store {self.store.path} was released")
            with _LockFile(self.store, wait_s=self._lock_wait_s, stale_s=self._lock_stale_s):
                self._check_mine(self._clock())
                return fn()

    def release(self) -> None:
        """Give the lease up (only if it is still ours; a no-op when already released)."""
        self.stop_heartbeat()
        with self._mutex:
            if self._released:
                return
            self._released = True
            if not self.store.fs.is_dir(self.store.path):
                return  # the store was deleted: nothing left to release
            lock = _LockFile(self.store, wait_s=self._lock_wait_s, stale_s=self._lock_stale_s)
            try:
                lock.__enter__()
            except CheckpointWriteError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, OSError) and cause.errno in _NO_SPACE):
                    raise
                # No room even for the small lock file. Removing frees space, and this live
                # holder's lease cannot be taken over meanwhile (its heartbeat is fresh), so
                # it is checked and removed without the lock rather than left behind.
                log.warning("releasing the lease of %s without its lock: %s", self.store.path, exc)
                self._remove_mine()
                return
            try:
                self._remove_mine()
            finally:
                lock.__exit__(None, None, None)

    def _remove_mine(self) -> None:
        self._check_mine(self._clock())
        path = os.path.join(self.store.path, LEASE_FILE)
        try:
            self.store.fs.remove(path)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot release the lease of store {self.store.path}: removing "
                f"{path} failed: {exc.strerror or exc}"
            ) from exc
        with contextlib.suppress(OSError, CheckpointWriteError):
            self.store.fs.fsync_dir(self.store.path)

    # -- background heartbeat ------------------------------------------------------------
    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Renew from a daemon thread every ``interval_s`` (default: a third of the timeout),
        for jobs whose commits are further apart than the timeout. A lost lease stops the
        thread and is raised by the next ``renew()``."""
        if self._heartbeat_thread is not None:
            return
        interval = interval_s if interval_s is not None else self.info.timeout_s / 3
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.renew()
                except LeaseLostError as exc:
                    log.error("%s", exc)
                    self._heartbeat_error = exc
                    return
                except CheckpointError as exc:  # e.g. the lock is busy: try again later
                    log.warning("lease heartbeat of %s failed: %s", self.store.path, exc)
                except OSError as exc:
                    log.warning("lease heartbeat of %s failed: %s", self.store.path, exc)

        self._heartbeat_stop = stop
        self._heartbeat_thread = threading.Thread(
            target=beat, name=f"distckpt-lease-{self.store.path}", daemon=True
        )
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        if self._heartbeat_stop is not None:
            self._heartbeat_stop.set()
        thread = self._heartbeat_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._heartbeat_thread = None
        self._heartbeat_stop = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(LeaseLostError):
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease({self.store.path!r}, {state}, token={self.info.token[:8]})"


# -- one lease per store per process (for the library's coordinator) ----------------------
_LIVE: weakref.WeakSet[Lease] = weakref.WeakSet()


def _live_token(token: str) -> bool:
    """Whether a held Lease object of this process has ``token``."""
    return any(lease.held and lease.token == token for lease in list(_LIVE))


_HELD: dict[tuple[int, str], Lease] = {}
_HELD_MUTEX = threading.Lock()


def _key(store: Store) -> tuple[int, str]:
    return (os.getpid(), store.fs.identity(store.path))


def hold(
    store: Store | str | os.PathLike[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    wait_s: float = 0.0,
    job_id: str | None = None,
    renew_after_s: float | None = None,
) -> Lease:
    """This process's lease on ``store``: acquired on the first call, renewed on later ones.

    For a coordinator that commits repeatedly (the functional ``save`` has no object to keep a
    lease in). A renewal costs a few small synchronous writes, so it is skipped while the
    last heartbeat is younger than ``renew_after_s`` (default: a tenth of ``timeout_s``;
    nobody can take a lease over whose heartbeat is that fresh). Leases taken here are
    released by :func:`release` / :func:`release_all` (registered at exit).
    """
    st = _as_store(store)
    key = _key(st)
    with _HELD_MUTEX:
        lease = _HELD.get(key)
        if lease is not None and lease.held:
            lease.refresh(timeout_s / 10 if renew_after_s is None else renew_after_s)
            return lease
        lease = Lease.acquire(st, timeout_s=timeout_s, wait_s=wait_s, job_id=job_id)
        _HELD[key] = lease
        return lease


def release(store: Store | str | os.PathLike[str]) -> None:
    """Release this process's lease on ``store`` taken by :func:`hold`, if any."""
    with _HELD_MUTEX:
        lease = _HELD.pop(_key(_as_store(store)), None)
    if lease is not None:
        with contextlib.suppress(LeaseLostError):
            lease.release()


def release_all() -> None:
    """Release every lease this process took with :func:`hold` (runs at interpreter exit)."""
    with _HELD_MUTEX:
        mine = [(k, v) for k, v in _HELD.items() if k[0] == os.getpid()]
        for k, _ in mine:
            del _HELD[k]
    for _, lease in mine:
        try:
            lease.release()
        except LeaseLostError:
            pass
        except (CheckpointError, OSError) as exc:
            log.warning("could not release the lease of %s: %s", lease.store.path, exc)


def _release_at_exit() -> None:
    """At interpreter exit, give up every lease this process still holds (a process killed
    by a signal cannot: its lease is taken over once it is seen dead or stale)."""
    with contextlib.suppress(Exception):
        release_all()
    for lease in list(_LIVE):
        if lease.held and lease._pid == os.getpid():
            with contextlib.suppress(Exception):
                lease.release()


atexit.register(_release_at_exit)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LEASE_FILE",
    "LOCK_FILE",
    "Lease",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "LeaseStatus",
    "hold",
    "job_id_from_environment",
    "lease_status",
    "release",
    "release_all",
]
