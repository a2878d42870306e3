"""The Earth2Studio-compatible surface: ``Checkpoint`` (the catalog) and its sessions.

Behaves like ``earth2studio.utils.checkpoint`` where that is defined, except that a row is
global: every rank writes its part, and a row counts once all ranks committed it. ``write``
and ``flush`` are therefore collective: every rank calls them the same number of times.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch

from distckpt.dist import step
from distckpt.dist.comm import Communicator, resolve
from distckpt.dist.election import row_status
from distckpt.dist.retention import KeepAll, KeepLatest, RetentionPolicy
from distckpt.engine import hooks
from distckpt.engine import steps as engine
from distckpt.engine.asyncwrite import BackgroundWriter, Stager, StagingBuffers
from distckpt.errors import CheckpointSerializationError, CommunicatorError
from distckpt.format import tree as codec
from distckpt.format.layout import ROWS_DIR, row_name
from distckpt.format.manifest import RankManifest
from distckpt.format.names import escape_component
from distckpt.logs import get_logger
from distckpt.migrate.migrations import MigrationRegistry
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD, plan_rank
from distckpt.session.binding import (
    _ACTIVE_SESSION,
    _CURRENT_CHECKPOINT,
    CheckpointState,
    as_proxy,
    bind_checkpoint_state,
    check_no_foreign_pending,
    collision,
    late_restore_warning,
    read_saved_fields,
    restore_into,
    schema_of,
    state_fields,
)
from distckpt.session.members import MappedView, MemberMapping, open_view
from distckpt.session.played import played_comm
from distckpt.storage import lease
from distckpt.storage.resolve import is_object_store_path, store_path
from distckpt.storage.store import Store

log = get_logger(__name__)

CheckpointLevel = Literal[0, 1, 2]


def default_checkpoint_path(name: str) -> Path:
    base = os.environ.get("DISTCKPT_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "distckpt"
    )
    return Path(base) / "checkpoints" / escape_component(name)


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed row, as this rank sees it.

    Earth2Studio's fields in its order; ``row`` (the row number in the store) and ``level``
    (the level it was written at) are distckpt's.
    """

    commit_id: str
    labels: dict[str, Any]
    metadata: dict[str, Any]
    metadata_keys: tuple[str, ...]
    write_count: int
    saved_at: str
    rank: int
    world_size: int
    state_ids: tuple[str, ...]
    row: int = -1
    level: int | None = None

    @property
    def lead_time(self) -> Any:
        """Forecast lead time metadata, when present."""
        return self.metadata.get("lead_time")

    @property
    def artifacts(self) -> tuple[str, ...]:
        """Earth2Studio's alias of ``metadata_keys``."""
        return self.metadata_keys

    @staticmethod
    def from_view(view: engine.RowView | MappedView) -> CheckpointEntry:
        m = view.manifest
        metadata = row_metadata(view)
        return CheckpointEntry(
            commit_id=row_name(m.row),
            labels={},
            metadata=metadata,
            metadata_keys=tuple(metadata),
            write_count=m.write_count,
            saved_at=m.created,
            rank=m.rank,
            world_size=m.world_size,
            state_ids=tuple(m.states),
            row=m.row,
            level=m.level,
        )


def row_metadata(view: engine.RowView | MappedView) -> dict[str, Any]:
    """A row's metadata as Earth2Studio reports it: ``lead_time`` (kept apart in the
    manifest, where tools read it) first, then the rest as written."""
    lead_time = view.lead_time
    metadata = view.metadata
    if lead_time is None:
        return metadata
    return {"lead_time": lead_time, **{k: v for k, v in metadata.items() if k != "lead_time"}}


@dataclass(frozen=True)
class PendingCheckpointState:
    """A state bound while no session of ``checkpoint`` was active: adopted (and restored)
    when one is entered. ``reusable``: parked by a session's exit, so the next session may
    bind another instance under the same id."""

    checkpoint: Checkpoint
    state_id: str
    state: CheckpointState[Any]
    reusable: bool = False


@dataclass(frozen=True)
class LoadedState:
    """A saved state of the selected row, waiting to be bound: ``path`` is the row's
    directory in the store, ``manifest`` the state's record (tree, schema, fields)."""

    path: Path | str  # a string for object stores (an s3:// URL)
    manifest: dict[str, Any]


class Checkpoint:
    """A named store of restart rows, shared by all ranks of a job."""

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str] | None = None,
        mode: Literal["overwrite", "append"] = "overwrite",
        flush_interval: int | None = 1,
        history_size: int | None = None,
        level: CheckpointLevel = 2,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device = "cpu",
        *,
        comm: Any = None,
        pack_threshold: int = DEFAULT_PACK_THRESHOLD,
        migrations: MigrationRegistry | None = None,
        mapping: MemberMapping | None = None,
        async_write: bool = False,
        max_in_flight: int = 1,
        checksums: bool = True,
    ) -> None:
        if mode not in ("overwrite", "append"):
            raise ValueError(f"mode must be 'overwrite' or 'append', not {mode!r}")
        if flush_interval is not None and flush_interval < 1:
            raise ValueError(f"flush_interval must be >= 1 or None, not {flush_interval}")
        if history_size is not None and history_size < 1:
            raise ValueError(f"history_size must be >= 1 or None, not {history_size}")
        if isinstance(level, bool) or level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, not {level!r}")
        # Inside distckpt.play_ranks, the played rank's (a rank of the job that saved).
        self.comm: Communicator = resolve(comm if comm is not None else played_comm())
        if rank is not None and rank != self.comm.rank:
            raise CommunicatorError(f"rank={rank} given, but this process is rank {self.comm.rank}")
        if world_size is not None and world_size != self.comm.world_size:
            raise CommunicatorError(
                f"world_size={world_size} given, but the job has {self.comm.world_size} ranks"
            )
        self.name = name
        self.path: Path | str = (
            default_checkpoint_path(name)
            if path is None
            else store_path(path)  # an s3:// URL stays a string: a Path folds its "//"
            if is_object_store_path(path)
            else Path(path)
        )
        self.store = Store(self.path)
        self.mode = mode
        self.flush_interval = flush_interval
        self.history_size = 1 if mode == "overwrite" else history_size
        self.level: int = level
        self.device = torch.device(device)
        self.pack_threshold = pack_threshold
        self.migrations = migrations  # None: the default registry
        # How rank-private state moves when the row was written at another world size.
        self.mapping = mapping
        self.async_write = async_write
        self.max_in_flight = max_in_flight
        self.checksums = checksums
        self._writer: BackgroundWriter | None = None
        self.lease: lease.Lease | None = None  # held (coordinator) while a block is open
        self._sessions: list[CheckpointSession] = []
        self._pending: list[PendingCheckpointState] = []
        _CURRENT_CHECKPOINT.set(self)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank_path(self) -> Path | str:
        """The store's directory. Earth2Studio gives each rank a directory of its own; here
        every rank writes its part of each row into the one store."""
        return self.path

    # -- catalog ---------------------------------------------------------------------------
    @property
    def catalog(self) -> tuple[CheckpointEntry, ...]:
        """Rows committed by every rank at this world size, oldest first (this rank's view)."""
        if not self.store.exists():
            return ()
        entries = []
        for row in self.store.rows():
            status = row_status(self.store, row)
            if status.committed and status.world_size == self.world_size:
                manifest = status.manifests[self.rank]
                entries.append(CheckpointEntry.from_view(engine.RowView(self.store, manifest)))
        return tuple(entries)

    def refresh(self) -> None:
        """Kept for compatibility: the catalog is always read from the store."""

    @property
    def active(self) -> CheckpointSession | None:
        session = _ACTIVE_SESSION.get()
        return session if session is not None and session.catalog is self else None

    def select(self, row: int) -> CheckpointSession:
        """A session on the ``row``-th committed row (Python indexing: -1 is the newest)."""
        entries = self.catalog
        if not entries:
            raise IndexError(f"no committed rows in {self.path}")
        entry = entries[row]
        manifest = self.store.read_manifest(entry.row, self.rank)
        return CheckpointSession(self, entry, manifest=manifest)

    def elect(self) -> CheckpointSession:
        """Collective: a session on the newest committed row, or a new session.

        A row of another world size is restored through ``mapping`` (see
        :class:`~distckpt.MemberMapping`); without one its states raise when bound.
        """
        found = open_view(self.store, self.comm, self.mapping)
        if found is None:
            return CheckpointSession(self)
        row, mapped = found
        if mapped is not None:
            return CheckpointSession(self, CheckpointEntry.from_view(mapped), view=mapped)
        view = engine.RowView(self.store, self.store.read_manifest(row, self.rank))
        return CheckpointSession(self, CheckpointEntry.from_view(view), manifest=view.manifest)

    def defer_bind(self, proxy: CheckpointState[Any]) -> CheckpointState[Any]:
        """Keep ``proxy`` until a session is entered (returns the proxy already waiting
        for the same instance, if any)."""
        proxy._attach(self, None, False)
        return self._buffer(proxy, reusable=False)

    def _buffer(self, proxy: CheckpointState[Any], reusable: bool) -> CheckpointState[Any]:
        sid = proxy.checkpoint_id
        for index, item in enumerate(self._pending):
            if item.state_id != sid:
                continue
            if item.state.checkpoint_dataclass is proxy.checkpoint_dataclass:
                return item.state
            if item.reusable:  # a new instance replaces the one a session parked
                self._pending[index] = PendingCheckpointState(self, sid, proxy, reusable)
                return proxy
        self._pending.append(PendingCheckpointState(self, sid, proxy, reusable))
        return proxy

    def _take_pending(self) -> list[PendingCheckpointState]:
        pending, self._pending = self._pending, []
        return pending

    def _park(self, proxy: CheckpointState[Any]) -> None:
        proxy._attach(self, None, False)
        self._buffer(proxy, reusable=True)

    @property
    def retention(self) -> RetentionPolicy:
        """What each commit keeps: the newest ``history_size`` rows (None: every row)."""
        return KeepAll() if self.history_size is None else KeepLatest(self.history_size)

    def _background(self) -> BackgroundWriter:
        """The writer thread (collective when created: flushes are collective)."""
        if self._writer is None:
            self._writer = BackgroundWriter(self.comm, max_in_flight=self.max_in_flight)
        return self._writer

    @property
    def staging_nbytes(self) -> int:
        """Host bytes held for staging asynchronous writes (0 for synchronous ones)."""
        return 0 if self._writer is None else self._writer.staging_nbytes

    def wait(self, *, coordinated: bool = True) -> None:
        """Collective: wait until every asynchronous write is committed; raise, on every
        rank, if one failed. Without ``coordinated`` (an exception is unwinding): wait on
        this rank only and log failures. A no-op for synchronous writes. The writer thread
        (and its communicator) stays for the next block: made once per ``Checkpoint``."""
        if self._writer is None:
            return
        if coordinated:
            self._writer.drain()
            return
        for failure in self._writer.wait_local():
            log.error("asynchronous write to %s failed: %s", self.path, failure)

    def __enter__(self) -> CheckpointSession:
        if not self._sessions:
            check_no_foreign_pending()  # before the lease: nothing to undo
            # The writer lease, before anything is restored or written: a second job writing
            # this store is refused here (LeaseHeldError naming the holder).
            self.lease = engine.writer_lease(self.store, self.comm, self.name)
        active = self.active  # not `or`: a new session is falsy (it has no row yet)
        session = active if active is not None else self.elect()
        self._sessions.append(session)
        return session.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self._sessions.pop()
        session.__exit__(exc_type, exc, tb)
        if not self._sessions:
            self.wait(coordinated=exc_type is None)  # before the lease goes
            if self.comm.is_coordinator:
                lease.release(self.store)  # the job is done writing here
            self.lease = None

    def __repr__(self) -> str:
        lines = [
            f"Checkpoint(name={self.name!r}, path={str(self.path)!r}, mode={self.mode!r}, "
            f"level={self.level}, rank={self.rank}/{self.world_size})"
        ]
        entries = self.catalog
        if not entries:
            lines.append("  catalog: empty")
        for e in entries:
            lines.append(
                f"  row {e.row}: lead_time={e.lead_time!r} write_count={e.write_count} "
                f"saved_at={e.saved_at}"
            )
        return "\n".join(lines)


def _normalise(value: Any) -> Any:
    """Earth2Studio's normalisation of a metadata value: a one-element array becomes its
    element, a one-element tensor a Python scalar (``lead_time=coords["lead_time"]``)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(-1)[0]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().cpu().reshape(-1)[0].item()
    return value


def sanitize_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Normalised metadata, each value checked now: a value that cannot be stored fails at
    ``write``, with the key named, not later at a flush."""
    sanitized: dict[str, Any] = {}
    for name, value in metadata.items():
        if not isinstance(name, str):
            raise CheckpointSerializationError(
                f"Invalid checkpoint metadata key {name!r}; metadata keys must be strings."
            )
        value = _normalise(value)
        try:
            codec.encode_metadata({name: value})
        except CheckpointSerializationError as exc:
            raise CheckpointSerializationError(
                f"Invalid checkpoint metadata {name!r}: {exc}"
            ) from exc
        sanitized[name] = value
    return sanitized


class CheckpointSession:
    """One selected (or new) row and the states bound to it."""

    def __init__(
        self,
        catalog: Checkpoint,
        entry: CheckpointEntry | None = None,
        *,
        manifest: RankManifest | None = None,
        view: MappedView | None = None,
    ) -> None:
        self.catalog = catalog
        self.labels: dict[str, Any] = {}
        self.bound_states: dict[str, CheckpointState[Any]] = {}
        self._entry = entry
        self._view: engine.RowView | MappedView | None = view
        if manifest is not None:
            self._view = engine.RowView(catalog.store, manifest)
        self._write_count = entry.write_count if entry is not None else 0
        self._writes_since_start = 0
        # What the next row's metadata holds (as in Earth2Studio: starts empty, and what was
        # written stays pending for the rows after it).
        self._pending_metadata: dict[str, Any] = {}
        self._dirty = False
        self._reusable: set[str] = set()
        self._tokens: list[Any] = []  # one per nested `with`: sessions are re-entrant

    # -- properties ------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return self._entry is not None

    def __bool__(self) -> bool:
        return self.exists

    @property
    def is_active(self) -> bool:
        return _ACTIVE_SESSION.get() is self

    @property
    def entry(self) -> CheckpointEntry | None:
        return self._entry

    @property
    def row(self) -> int | None:
        return self._entry.row if self._entry is not None else None

    @property
    def commit_id(self) -> str | None:
        return self._entry.commit_id if self._entry is not None else None

    @property
    def lead_time(self) -> Any:
        """Forecast lead time metadata of the selected row, when present."""
        return self.metadata.get("lead_time")

    @property
    def level(self) -> int | None:
        """The level the selected row was written at (None for a new session)."""
        return self._entry.level if self._entry is not None else None

    @property
    def metadata(self) -> dict[str, Any]:
        """The selected row's metadata (this rank's), ``lead_time`` among it; ``{}`` for a
        new session. A fresh copy each time, as Earth2Studio reads it from disk each time."""
        if self._entry is None:
            return {}
        return copy.deepcopy(self._entry.metadata)

    @property
    def artifacts(self) -> dict[str, Any]:
        """Earth2Studio's alias of :attr:`metadata`."""
        return self.metadata

    def metadata_value(self, name: str) -> Any:
        """One metadata value of the selected row (KeyError naming it when absent)."""
        metadata = self.metadata
        if name not in metadata:
            raise KeyError(f"Metadata {name!r} not found in checkpoint session.")
        return metadata[name]

    def artifact(self, name: str) -> Any:
        """Earth2Studio's alias of :meth:`metadata_value`."""
        return self.metadata_value(name)

    @property
    def _loaded_states(self) -> dict[str, LoadedState]:
        """The selected row's states this session would restore (none at level 0)."""
        view = self._view
        if view is None or self.catalog.level == 0:
            return {}
        base = self.catalog.path
        rows = f"{ROWS_DIR}/{row_name(view.row)}"
        directory = f"{base}/{rows}" if isinstance(base, str) else base / rows
        return {
            sid: LoadedState(directory, {"state_id": sid, **record.to_json()})
            for sid, record in view.manifest.states.items()
        }

    @property
    def device(self) -> torch.device:
        return self.catalog.device

    @property
    def write_count(self) -> int:
        return self._write_count

    @write_count.setter
    def write_count(self, value: int) -> None:
        # A workflow resets the count when it starts a new work item (a fresh ensemble
        # batch). Once this session has written since it started, that ends the restored
        # state: it belongs to the previous item and must not be restored into the next.
        if value == 0 and self._writes_since_start > 0:
            for proxy in self.bound_states.values():
                proxy._attach(self.catalog, self, False)
            self._view = None
        self._write_count = int(value)

    # -- binding ---------------------------------------------------------------------------
    def bind(self, state: Any, *, state_id: str | None = None) -> CheckpointState[Any]:
        """Register a dataclass instance (or a proxy of one, which is returned); restore it
        if the selected row has its state. ``state_id`` defaults to the proxy's or the
        class's qualified name."""
        proxy = as_proxy(state, state_id)
        instance = proxy.checkpoint_dataclass
        state_id = proxy.checkpoint_id
        existing = self.bound_states.get(state_id)
        if existing is not None:
            if existing.checkpoint_dataclass is instance:
                return existing
            if state_id not in self._reusable:
                raise collision(state_id)
            self._reusable.discard(state_id)
        loaded = False
        view = self._view
        if self.catalog.level > 0 and view is not None and view.has_state(state_id):
            saved = read_saved_fields(state_id, view, instance, self.catalog.migrations)
            restore_into(instance, saved, self.catalog.device)
            hook = getattr(instance, "__checkpoint_restore__", None)
            if hook is not None:
                hook()
            loaded = True
        proxy._attach(self.catalog, self, loaded)
        self.bound_states[state_id] = proxy
        return proxy

    # -- writing ---------------------------------------------------------------------------
    def write(self, **metadata: Any) -> CheckpointEntry | None:
        """Record a boundary; commits a row every ``flush_interval`` writes (collective).

        Subscribers of :mod:`distckpt.engine.hooks` (preemption) run once it returns."""
        entry = self._write(**metadata)
        hooks.announce(hooks.Boundary(self.catalog.comm, getattr(entry, "row", None), self))
        return entry

    def _write(self, **metadata: Any) -> CheckpointEntry | None:
        sanitized = sanitize_metadata(metadata)
        previous = (dict(self._pending_metadata), self._dirty)
        self._write_count += 1
        self._writes_since_start += 1
        self._pending_metadata.update(sanitized)
        self._dirty = True
        interval = self.catalog.flush_interval
        if interval is not None and self._write_count % interval == 0:
            try:
                return self.flush()
            except BaseException:
                # The boundary did not become a row: a retried write must count it again.
                self._write_count -= 1
                self._writes_since_start -= 1
                self._pending_metadata, self._dirty = previous
                raise
        return None

    def flush(self, **metadata: Any) -> CheckpointEntry | None:
        """Commit pending writes as a new row (collective; a no-op if no rank has any).

        Metadata given here overrides the pending metadata for this row and after."""
        if metadata:
            self._pending_metadata.update(sanitize_metadata(metadata))
            self._dirty = True
        comm = self.catalog.comm
        if not any(step.gather(comm, step.SESSION_PENDING, lambda: self._dirty)):
            return None
        cat = self.catalog
        if cat.async_write:
            self._flush_async()
            return None
        content = self._content()
        manifest = engine.commit_row(
            cat.store,
            comm,
            content,
            name=cat.name,
            pack_threshold=cat.pack_threshold,
            checksums=cat.checksums,
            guard=cat.lease,
            retention=cat.retention,
        )
        view = engine.RowView(cat.store, manifest)
        self._entry = CheckpointEntry.from_view(view)
        self._dirty = False
        return self._entry

    def _flush_async(self) -> None:
        """Stage the bound states and queue the row for the catalog's writer thread.

        Returns None: the row's entry appears on this session (``entry``, ``row``) once the
        writer committed it; ``Checkpoint.wait()`` and leaving the ``with`` block wait for it.
        """
        cat = self.catalog

        def prepare(buffers: StagingBuffers) -> Callable[[Any], RankManifest]:
            content = self._content()  # after the slot freed: sees the previous row's entry
            stager = Stager(buffers)
            plan = plan_rank(
                content.states,
                rank=cat.comm.rank,
                pack_threshold=cat.pack_threshold,
                stager=stager,
            )
            stager.finish()
            content = dataclasses.replace(
                content, states={}, metadata=copy.deepcopy(content.metadata)
            )

            guard = cat.lease

            def job(wcomm: Any) -> RankManifest:
                manifest = engine.commit_row(
                    cat.store,
                    wcomm,
                    content,
                    name=cat.name,
                    checksums=cat.checksums,
                    plan=plan,
                    guard=guard,
                    retention=cat.retention,
                )
                self._entry = CheckpointEntry.from_view(engine.RowView(cat.store, manifest))
                return manifest

            return job

        cat._background().submit(prepare)
        self._dirty = False
        return None

    def _content(self) -> engine.RowContent:
        """What this rank's next row holds: bound states (hooks run now) and metadata."""
        cat = self.catalog
        states: dict[str, Any] = {}
        schemas = {}
        if cat.level > 0:
            for sid, proxy in self.bound_states.items():
                instance = proxy.checkpoint_dataclass
                hook = getattr(instance, "__checkpoint_save__", None)
                if hook is not None:
                    hook()
                states[sid] = state_fields(instance)
                schemas[sid] = schema_of(instance)
        metadata = dict(self._pending_metadata)
        lead_time = metadata.pop("lead_time", None)  # the manifest keeps it apart
        return engine.RowContent(
            states=states,
            schemas=schemas,
            metadata=metadata,
            write_count=self._write_count,
            lead_time=lead_time,
            level=cat.level,
        )

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> CheckpointSession:
        if not self._tokens:
            check_no_foreign_pending()
        self._tokens.append(_ACTIVE_SESSION.set(self))
        if len(self._tokens) == 1:  # outermost entry: adopt states bound while inactive
            pending = self.catalog._take_pending()
            late = [item.state_id for item in pending if not item.reusable]
            if late and self.exists:
                late_restore_warning(", ".join(late))
            for item in pending:
                self.bind(item.state)
                if item.reusable:
                    self._reusable.add(item.state_id)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tokens:
            _ACTIVE_SESSION.reset(self._tokens.pop())
        if not self._tokens:  # outermost exit: states wait for the next session
            for proxy in self.bound_states.values():
                self.catalog._park(proxy)

    def __repr__(self) -> str:
        return (
            f"CheckpointSession(row={self.row}, write_count={self.write_count}, "
            f"lead_time={self.lead_time!r})"
        )


class NullCheckpoint:
    """A checkpoint that records nothing: the default for workflows run without restarts."""

    exists = False
    lead_time = None
    is_active = False
    device = torch.device("cpu")
    checkpoint_device = torch.device("cpu")

    level = 0
    row = None

    @property
    def write_count(self) -> int:
        return 0

    @write_count.setter
    def write_count(self, value: int) -> None:
        """Accepted and ignored: workflows reset the count between work items."""

    @property
    def catalog(self) -> NullCheckpoint:
        """Itself, so ``ckpt.catalog.level`` reads 0 as on a real session."""
        return self

    @property
    def metadata(self) -> dict[str, Any]:
        return {}

    @property
    def labels(self) -> dict[str, Any]:
        return {}

    def write(self, **metadata: Any) -> None:
        return None

    def flush(self, **metadata: Any) -> None:
        return None

    def __bool__(self) -> bool:
        return False

    def __enter__(self) -> NullCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = [
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointLevel",
    "CheckpointSession",
    "CheckpointState",
    "LoadedState",
    "NullCheckpoint",
    "PendingCheckpointState",
    "bind_checkpoint_state",
    "default_checkpoint_path",
]
