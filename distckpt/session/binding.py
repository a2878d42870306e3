"""Bound state: a component's dataclass registered with the active checkpoint session.

``bind_checkpoint_state`` wraps a dataclass instance in a proxy that forwards attribute
access and adds ``checkpoint_*`` properties. Binding inside a session whose row holds the
state restores the fields at once, onto the devices of the live values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import warnings
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from distckpt.engine import restore
from distckpt.engine.steps import RowView, StateSchema
from distckpt.errors import (
    CheckpointStateCollision,
    CheckpointStateSchemaError,
    ForeignCheckpointStateError,
)
from distckpt.format.tree import qualified_name
from distckpt.migrate.migrations import MigrationRegistry, default_registry, newer_version_error
from distckpt.plan.stateful import is_stateful

if TYPE_CHECKING:
    from distckpt.session.checkpoint import Checkpoint, CheckpointSession
    from distckpt.session.members import MappedView

T = TypeVar("T")

_ACTIVE_SESSION: ContextVar[CheckpointSession | None] = ContextVar(
    "distckpt_active_session", default=None
)
_CURRENT_CHECKPOINT: ContextVar[Checkpoint | None] = ContextVar(
    "distckpt_current_checkpoint", default=None
)


def active_session() -> CheckpointSession | None:
    return _ACTIVE_SESSION.get()


def schema_of(instance: Any) -> StateSchema:
    """Field names with their annotations, and the version the class declares.

    A class may declare ``__checkpoint_version__ = N`` (default 0) to version its schema.
    """
    fields = {f.name: str(f.type) for f in dataclasses.fields(instance)}
    text = qualified_name(type(instance)) + "(" + ",".join(f"{k}:{v}" for k, v in fields.items())
    digest = hashlib.sha256((text + ")").encode()).hexdigest()
    version = int(getattr(type(instance), "__checkpoint_version__", 0))
    return StateSchema(digest=digest, version=version, fields=fields)


def state_fields(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def schema_difference(state_id: str, saved: dict[str, str], live: dict[str, str]) -> str:
    added = sorted(set(live) - set(saved))
    removed = sorted(set(saved) - set(live))
    changed = sorted(k for k in set(live) & set(saved) if live[k] != saved[k])
    parts = []
    if added:
        parts.append(f"fields not in the checkpoint: {added}")
    if removed:
        parts.append(f"saved fields missing from the class: {removed}")
    if changed:
        detail = ", ".join(f"{k} ({saved[k]} -> {live[k]})" for k in changed)
        parts.append(f"fields whose type changed: {detail}")
    return f"state {state_id!r} does not match the checkpoint: " + "; ".join(parts)


def rehome(saved: Any, live: Any, default: torch.device) -> Any:
    """Put restored tensors where the live object keeps them (live tensor's device)."""
    if isinstance(saved, torch.Tensor):
        target = live.device if isinstance(live, torch.Tensor) else default
        return saved.to(target) if saved.device != target else saved
    if isinstance(saved, dict):
        live_map = live if isinstance(live, dict) else {}
        return {k: rehome(v, live_map.get(k), default) for k, v in saved.items()}
    if isinstance(saved, list | tuple):
        live_seq = live if isinstance(live, list | tuple) and len(live) == len(saved) else None
        items = [
            rehome(v, live_seq[i] if live_seq is not None else None, default)
            for i, v in enumerate(saved)
        ]
        return type(saved)(items)
    return saved


def assign_fields(instance: Any, values: dict[str, Any]) -> None:
    """Set dataclass fields; nested dataclasses are filled in place, not replaced, and a
    Stateful field (module, optimizer, ...: saved as its state dict) is given its saved
    state dict with ``load_state_dict``."""
    for name, value in values.items():
        current = getattr(instance, name, None)
        if current is not None and is_stateful(current) and isinstance(value, dict):
            current.load_state_dict(value)
        elif (
            dataclasses.is_dataclass(current)
            and not isinstance(current, type)
            and isinstance(value, dict)
        ):
            assign_fields(current, value)
        else:
            setattr(instance, name, value)


class CheckpointState(Generic[T]):
    """Proxy of a bound dataclass: attribute access goes to the dataclass itself.

    Constructed as Earth2Studio's is (``CheckpointState(MyState())``, unbound: level 0);
    ``state_id`` defaults to the class's qualified name.
    """

    __slots__ = ("_checkpoint", "_session", "_state", "_state_id", "_state_loaded")

    def __init__(
        self,
        state: T,
        checkpoint: Checkpoint | None = None,
        session: CheckpointSession | None = None,
        state_loaded: bool = False,
        *,
        state_id: str | None = None,
    ) -> None:
        if isinstance(checkpoint, str):  # the old (state, state_id, ...) order
            state_id, checkpoint = checkpoint, None
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_state_id", state_id or qualified_name(type(state)))
        object.__setattr__(self, "_checkpoint", checkpoint)
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_state_loaded", state_loaded)

    def _attach(
        self, checkpoint: Checkpoint | None, session: CheckpointSession | None, loaded: bool
    ) -> None:
        object.__setattr__(self, "_checkpoint", checkpoint)
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_state_loaded", loaded)

    def _bind_checkpoint(
        self,
        checkpoint: Checkpoint | None,
        session: CheckpointSession | None = None,
        state_loaded: bool = False,
    ) -> None:
        """Earth2Studio's name for :meth:`_attach` (its components never call it)."""
        self._attach(checkpoint, session, state_loaded)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_state"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__slots__:
            object.__setattr__(self, name, value)
            return
        if name == "device" or name.startswith("checkpoint_"):
            raise AttributeError(f"{name!r} is read-only on a bound checkpoint state")
        setattr(self._state, name, value)

    def __repr__(self) -> str:
        return repr(self._state)

    # -- checkpoint properties -------------------------------------------------------------
    @property
    def checkpoint_dataclass(self) -> T:
        return self._state

    @property
    def checkpoint_id(self) -> str:
        return self._state_id

    @property
    def checkpoint_enabled(self) -> bool:
        return self._checkpoint is not None

    @property
    def checkpoint_level(self) -> int:
        return self._checkpoint.level if self._checkpoint is not None else 0

    @property
    def checkpoint_device(self) -> torch.device:
        return self._checkpoint.device if self._checkpoint is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.checkpoint_device

    @property
    def checkpoint_flush_interval(self) -> int | None:
        return self._checkpoint.flush_interval if self._checkpoint is not None else None

    @property
    def checkpoint_session(self) -> CheckpointSession | None:
        return self._session

    @property
    def checkpoint_write_count(self) -> int:
        return self._session.write_count if self._session is not None else 0

    @property
    def checkpoint_is_flush_due(self) -> bool:
        interval = self.checkpoint_flush_interval
        if self._session is None or not interval:
            return False
        return (self._session.write_count + 1) % interval == 0

    @property
    def checkpoint_selected(self) -> bool:
        return self._session is not None and self._session.exists

    @property
    def checkpoint_state_loaded(self) -> bool:
        """True while this instance holds state restored from the selected row.

        Ends when the session starts a new work item (``write_count = 0`` after writes), so
        a restored state is never fed into the next batch.
        """
        return bool(self._state_loaded)

    @property
    def checkpoint_lead_time(self) -> Any:
        return self._session.lead_time if self._session is not None else None

    @property
    def checkpoint_row(self) -> int | None:
        return self._session.row if self._session is not None else None

    @property
    def checkpoint_labels(self) -> dict[str, Any]:
        return self._session.labels if self._session is not None else {}

    @property
    def checkpoint_metadata(self) -> dict[str, Any]:
        return self._session.metadata if self._session is not None else {}


def is_foreign_proxy(state: Any) -> bool:
    """Whether ``state`` is Earth2Studio's own ``CheckpointState`` proxy (not ours)."""
    kind = type(state)
    return kind.__name__ == "CheckpointState" and kind.__module__.startswith("earth2studio")


def foreign_proxy_error(state: Any) -> ForeignCheckpointStateError:
    inner = getattr(state, "checkpoint_dataclass", None)
    name = qualified_name(type(inner)) if inner is not None else "?"
    return ForeignCheckpointStateError(
        f"state {name!r} is bound to Earth2Studio's own checkpoint (an "
        "earth2studio.utils.checkpoint.CheckpointState): its component was constructed "
        "before distckpt.compat.earth2studio.use_distckpt() was called. Call use_distckpt() "
        "first, then construct the component (inside `with checkpoint:`)",
        state_id=name,
    )


def check_no_foreign_pending() -> None:
    """Refuse to start a session while states wait on Earth2Studio's own ``Checkpoint``:
    their components were built before ``use_distckpt()`` and would be silently left out
    of every row."""
    source = sys.modules.get("earth2studio.utils.checkpoint")
    pending_var = getattr(source, "_PENDING_STATES", None)
    if pending_var is None:
        return
    pending = pending_var.get()
    if pending:
        raise foreign_proxy_error(pending[0].state)


def as_proxy(state: Any, state_id: str | None = None) -> CheckpointState[Any]:
    """``state`` itself when it is one of our proxies, else a new unbound proxy of it."""
    if isinstance(state, CheckpointState):
        return state
    if is_foreign_proxy(state):
        raise foreign_proxy_error(state)
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        raise TypeError(
            f"bind_checkpoint_state takes a dataclass instance, not {type(state).__qualname__}"
        )
    return CheckpointState(state, state_id=state_id)


def bind_checkpoint_state(
    state: T | CheckpointState[T], *, state_id: str | None = None
) -> CheckpointState[T]:
    """Register a dataclass instance's fields as restartable state.

    A dataclass may define ``__checkpoint_save__()`` (called just before its fields are
    written, e.g. to capture generator states into fields) and ``__checkpoint_restore__()``
    (called right after its fields were restored, e.g. to apply them to live generators).

    Inside an active session the fields are restored at once when the selected row holds
    this state. With a checkpoint constructed but no session entered yet, binding waits and
    restores when the session is entered. Without any checkpoint the proxy is inert
    (``checkpoint_enabled`` is False). ``state_id`` defaults to the class's qualified name;
    give one to bind several instances of one class. Binding a proxy again returns it.
    """
    proxy = as_proxy(state, state_id)
    session = _ACTIVE_SESSION.get()
    if session is not None:
        return session.bind(proxy)
    checkpoint = _CURRENT_CHECKPOINT.get()
    if checkpoint is not None:
        return checkpoint.defer_bind(proxy)
    return proxy


def restore_into(instance: Any, saved: dict[str, Any], device: torch.device) -> None:
    live = state_fields(instance)
    assign_fields(instance, {k: rehome(v, live.get(k), device) for k, v in saved.items()})


def check_schema(
    state_id: str, record_fields: dict[str, str] | None, digest: str | None, live: StateSchema
) -> None:
    if record_fields is not None and record_fields != live.fields:
        raise CheckpointStateSchemaError(schema_difference(state_id, record_fields, live.fields))
    if digest is not None and digest != live.digest:
        raise CheckpointStateSchemaError(
            f"state {state_id!r} was saved with schema {digest[:12]}, the class now has "
            f"{live.digest[:12]}"
        )


def read_saved_fields(
    state_id: str, view: RowView | MappedView, instance: Any, registry: MigrationRegistry | None
) -> dict[str, Any]:
    """The saved fields of ``state_id``, migrated from their saved ``__checkpoint_version__``
    to the live class's (in memory), and checked against the live class's fields."""
    record = view.manifest.states[state_id]
    live = schema_of(instance)
    if record.version > live.version:
        raise newer_version_error(state_id, record.version, live.version)
    if record.version == live.version:
        check_schema(state_id, record.fields, record.schema, live)
    # Both views restore by executing a load plan (engine.restore).
    if isinstance(view, RowView):
        saved = restore.read_state(view, state_id)
    else:
        saved = view.read_state(state_id)
    if not isinstance(saved, dict):
        raise CheckpointStateSchemaError(
            f"state {state_id!r} of row {view.row} is not a mapping of fields"
        )
    if record.version == live.version:
        return saved
    migrated, _ = (registry or default_registry).migrate(
        state_id, saved, record.version, live.version
    )
    if set(migrated) != set(live.fields):
        names = {str(k): live.fields.get(str(k), "?") for k in migrated}
        raise CheckpointStateSchemaError(
            f"after migration from version {record.version} to {live.version}: "
            + schema_difference(state_id, names, live.fields)
        )
    return dict(migrated)


def collision(state_id: str) -> CheckpointStateCollision:
    return CheckpointStateCollision(
        f"state {state_id!r} is already bound to another instance in this session; pass "
        "bind_checkpoint_state(obj, state_id=...) to bind several instances of one class"
    )


def late_restore_warning(state_ids: str) -> None:
    warnings.warn(
        f"Checkpoint state {state_ids} was bound before an existing checkpoint session was "
        "active: its saved state is restored late, and constructor side effects that "
        "depended on it are not replayed. Construct restartable components inside "
        "`with checkpoint:` when state must be restored during initialization.",
        UserWarning,
        stacklevel=3,
    )
