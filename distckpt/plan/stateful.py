"""Stateful objects in a state dict: anything with ``state_dict()`` and ``load_state_dict()``.

Modules, optimizers, LR schedulers, ``StatefulDataLoader`` and user classes can be placed in
the dict given to ``save``/``load``/``AsyncSaver.save`` (as in torch.distributed.checkpoint):
a save stores the object's ``state_dict()``; a load fills that state dict from the row (in
place where its tensors are the object's own) and hands it to ``load_state_dict``. This
happens before the value codec, which only ever sees plain trees.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass
from typing import Any

from distckpt.errors import CheckpointSerializationError
from distckpt.format.tree import Path, path_str


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` has callable ``state_dict`` and ``load_state_dict`` (not a class)."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def _half_stateful(obj: Any, where: Path) -> None:
    """Refuse an object with only one of the two methods, saying which one to add."""
    if isinstance(obj, type):
        return
    has_save = callable(getattr(obj, "state_dict", None))
    has_load = callable(getattr(obj, "load_state_dict", None))
    if has_save != has_load:
        missing = "load_state_dict" if has_save else "state_dict"
        raise CheckpointSerializationError(
            f"{type(obj).__qualname__} at {path_str(where)!r} has no {missing}(): give it "
            "both state_dict() and load_state_dict() to store it, or store plain values"
        )


def _own_state(obj: Any, where: Path) -> dict[str, Any]:
    value = obj.state_dict()
    if not isinstance(value, dict):
        raise CheckpointSerializationError(
            f"{type(obj).__qualname__}.state_dict() at {path_str(where)!r} returned a "
            f"{type(value).__qualname__}, not a dict"
        )
    return value


def to_saved(value: Any, where: Path) -> Any:
    """``value`` with every Stateful object inside dicts, lists and tuples replaced by its
    ``state_dict()`` (what the codec stores). Plain values come back as they are."""
    if is_stateful(value):
        return _own_state(value, where)
    _half_stateful(value, where)
    if isinstance(value, dict):
        return {k: to_saved(v, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [to_saved(v, (*where, i)) for i, v in enumerate(value)]
    if type(value) is tuple:
        return tuple(to_saved(v, (*where, i)) for i, v in enumerate(value))
    return value


@dataclass(frozen=True)
class Restorer:
    """The Stateful objects found in a live state dict, with the state dicts standing in for
    them; :meth:`restore` calls each ``load_state_dict`` once the stand-ins are filled, and
    writes the other filled values back into the caller's containers."""

    targets: tuple[tuple[Any, dict[str, Any]], ...]
    copies: tuple[tuple[Any, Any], ...] = ()  # (caller's container, the one filled)

    def restore(self) -> None:
        copied = {id(new) for _, new in self.copies}
        for original, new in self.copies:
            keys = new.keys() if isinstance(new, dict) else range(min(len(new), len(original)))
            for key in keys:
                value = new[key]
                if id(value) in copied or any(value is state for _, state in self.targets):
                    continue  # a container or a state dict standing in: handled on its own
                original[key] = value
        for obj, state in self.targets:
            obj.load_state_dict(state)


def to_live(state_dict: dict[str, Any]) -> tuple[dict[str, Any], Restorer]:
    """For a load: the state dict to fill (Stateful objects replaced by their state dicts,
    whose tensors are the objects' own, so a load copies into them) and the Restorer that
    hands each filled state dict back. Containers without Stateful objects are the
    caller's own (filled in place as before); the others are copies written back later."""
    targets: list[tuple[Any, dict[str, Any]]] = []
    copies: list[tuple[Any, Any]] = []

    def walk(value: Any, where: Path) -> Any:
        if is_stateful(value):
            own = _own_state(value, where)
            targets.append((value, own))
            return own
        _half_stateful(value, where)
        if not _holds_stateful(value):
            return value
        new: Any
        if isinstance(value, dict):
            new = {k: walk(v, (*where, k)) for k, v in value.items()}
        else:
            new = [walk(v, (*where, i)) for i, v in enumerate(value)]
        copies.append((value, new))
        return new

    live = walk(state_dict, ())
    return live, Restorer(tuple(targets), tuple(copies))


def _holds_stateful(value: Any) -> bool:
    if is_stateful(value):
        return True
    if isinstance(value, dict):
        return any(_holds_stateful(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_stateful(v) for v in value)
    return False


_PLAIN = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    dict,
    list,
    tuple,
    _dt.date,
    _dt.datetime,
    _dt.timedelta,
)


def explain_unstorable(error: CheckpointSerializationError, value: Any, where: Path) -> Exception:
    """The codec's refusal of ``value``, with what to do when an object in it is neither a
    plain value nor Stateful (e.g. a user class): the error the user sees names the fix."""
    found = _first_object(value, where)
    if found is None:
        return error
    obj, at = found
    return CheckpointSerializationError(
        f"{error}; {type(obj).__qualname__} at {path_str(at)!r} is not a value distckpt "
        "stores: call .state_dict() on it, or give its class state_dict() and "
        "load_state_dict() (it is then saved as its state_dict and restored in place)"
    )


def _first_object(value: Any, where: Path) -> tuple[Any, Path] | None:
    """The first object inside ``value`` of a class of its own (not builtin, torch or
    numpy): one that could have state_dict()/load_state_dict()."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = _first_object(v, (*where, k))
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _first_object(v, (*where, i))
            if found is not None:
                return found
        return None
    if isinstance(value, _PLAIN) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        return None
    module = type(value).__module__.split(".")[0]
    if module in ("torch", "numpy", "builtins"):  # the codec's own kinds, sets, functions
        return None
    return value, where
