"""Checkpoint surgery: the building blocks a migration is made of.

Each operation is a small frozen record that rewrites one saved state (a mapping of keys to
tensors and values, such as a ``state_dict``) without touching its input, and describes
itself as JSON so the chain applied to a row can be recorded in the row's metadata.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from distckpt.errors import MigrationError
from distckpt.format.tree import qualified_name

Match = Literal["exact", "prefix", "regex"]
Tree = dict[Any, Any]


class Op:
    """One step of surgery. Subclasses override ``_apply`` (and/or ``apply_metadata``).

    ``within`` (a path of keys) makes the operation act on a nested mapping of the state,
    e.g. one field of a bound dataclass that holds a ``state_dict``.
    """

    within: tuple[str | int, ...] = ()

    def apply(self, tree: Tree) -> Tree:
        """A new tree with the operation applied; ``tree`` itself is left as it was."""
        return _at(tree, tuple(self.within), self._apply, self)

    def _apply(self, mapping: Tree) -> Tree:
        return dict(mapping)

    def apply_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The row metadata after this operation (unchanged unless it rewrites metadata)."""
        return metadata

    def describe(self) -> dict[str, Any]:
        """A JSON record of the operation, stored in a migrated row's metadata."""
        doc: dict[str, Any] = {"op": type(self).__name__}
        for name, value in vars(self).items():
            if name != "within" or value:
                doc[name] = _describe_value(value)
        return doc

    def fail(self, problem: str) -> MigrationError:
        return MigrationError(f"{self.label()}: {problem}")

    def label(self) -> str:
        where = f" within {'/'.join(map(str, self.within))!r}" if self.within else ""
        return f"{type(self).__name__}{where}"


def _at(tree: Tree, path: tuple[str | int, ...], fn: Callable[[Tree], Tree], op: Op) -> Tree:
    if not isinstance(tree, dict):
        raise op.fail(f"expects a mapping, the state holds a {type(tree).__qualname__}")
    if not path:
        return fn(tree)
    head, rest = path[0], path[1:]
    if head not in tree:
        raise op.fail(f"no key {head!r} to descend into")
    out = dict(tree)
    out[head] = _at(tree[head], rest, fn, op)
    return out


def _describe_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if callable(value):
        return qualified_name(value) if isinstance(value, type) else _function_name(value)
    if isinstance(value, tuple | list):
        return [_describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe_value(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _function_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def _matches(key: Any, pattern: str, match: Match) -> bool:
    if match == "exact":
        return bool(key == pattern)
    if not isinstance(key, str):
        return False
    if match == "prefix":
        return key.startswith(pattern)
    return re.fullmatch(pattern, key) is not None


def _check_match(match: str) -> None:
    if match not in ("exact", "prefix", "regex"):
        raise MigrationError(f"match must be 'exact', 'prefix' or 'regex', not {match!r}")


# -- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenameKeys(Op):
    """Rename keys: one key (``exact``), every key starting with ``old`` (``prefix``, the
    prefix is replaced by ``new``), or every key ``old`` fully matches (``regex``, ``new``
    may use groups as in ``re.sub``). Matching no key is an error: a migration that does
    nothing is almost always a typo."""

    old: str
    new: str
    match: Match = "exact"
    within: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        _check_match(self.match)

    def _rename(self, key: Any) -> Any:
        if not _matches(key, self.old, self.match):
            return key
        if self.match == "exact":
            return self.new
        if self.match == "prefix":
            return self.new + key[len(self.old) :]
        return re.sub(f"^(?:{self.old})$", self.new, key)

    def _apply(self, mapping: Tree) -> Tree:
        out: Tree = {}
        renamed = 0
        for key, value in mapping.items():
            new = self._rename(key)
            if new != key:
                renamed += 1
                if new in mapping and self._rename(new) == new:
                    raise self.fail(f"renaming {key!r} to {new!r} would overwrite {new!r}")
            if new in out:
                raise self.fail(f"two keys become {new!r}")
            out[new] = value
        if not renamed:
            raise self.fail(f"no key matches {self.old!r} ({self.match})")
        return out


@dataclass(frozen=True)
class DropKeys(Op):
    """Remove keys (each of ``keys`` matched as in :class:`RenameKeys`); a pattern that
    matches nothing is an error."""

    keys: tuple[str, ...]
    match: Match = "exact"
    within: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        _check_match(self.match)
        keys = (self.keys,) if isinstance(self.keys, str) else tuple(self.keys)
        object.__setattr__(self, "keys", keys)

    def _apply(self, mapping: Tree) -> Tree:
        for pattern in self.keys:
            if not any(_matches(k, pattern, self.match) for k in mapping):
                raise self.fail(f"no key matches {pattern!r} ({self.match})")
        return {
            k: v
            for k, v in mapping.items()
            if not any(_matches(k, p, self.match) for p in self.keys)
        }


@dataclass(frozen=True, eq=False)
class AddKey(Op):
    """Add ``key`` with a copy of ``default`` (a tensor or a plain value); refuses to
    overwrite a key the state already has."""

    key: str
    default: Any
    within: tuple[str | int, ...] = ()

    def _apply(self, mapping: Tree) -> Tree:
        if self.key in mapping:
            raise self.fail(f"key {self.key!r} already exists")
        value = (
            self.default.clone()
            if isinstance(self.default, torch.Tensor)
            else copy.deepcopy(self.default)
        )
        return {**mapping, self.key: value}


# -- values ----------------------------------------------------------------------------------


class _TensorOp(Op):
    """An operation on the tensor (or numpy array) stored under ``key``."""

    key: str

    def _apply(self, mapping: Tree) -> Tree:
        if self.key not in mapping:
            raise self.fail(f"no key {self.key!r}")
        value = mapping[self.key]
        result: Any
        if isinstance(value, np.ndarray):
            result = self._tensor(torch.from_numpy(np.ascontiguousarray(value))).numpy()
        elif isinstance(value, torch.Tensor):
            result = self._tensor(value)
        else:
            raise self.fail(f"{self.key!r} holds a {type(value).__qualname__}, not a tensor")
        return {**mapping, self.key: result}

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dim(self, tensor: torch.Tensor, dim: int) -> int:
        if not -tensor.ndim <= dim < tensor.ndim:
            raise self.fail(f"{self.key!r} has {tensor.ndim} dimensions; no dimension {dim}")
        return dim % tensor.ndim

    def label(self) -> str:
        return f"{super().label()} on {self.key!r}"


@dataclass(frozen=True)
class MoveSlice(_TensorOp):
    """Move index ``src`` along ``dim`` to position ``dst``, shifting those in between (as
    ``list.insert(dst, list.pop(src))``): a reordered input feature in a weight matrix.
    Several moves are several operations, applied in order."""

    key: str
    dim: int
    src: int
    dst: int
    within: tuple[str | int, ...] = ()

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        dim = self._dim(tensor, self.dim)
        n = tensor.shape[dim]
        for index in (self.src, self.dst):
            if not -n <= index < n:
                raise self.fail(f"index {index} is outside dimension {dim} of size {n}")
        order = list(range(n))
        order.insert(self.dst % n, order.pop(self.src % n))
        return tensor.index_select(dim, torch.tensor(order, device=tensor.device))


@dataclass(frozen=True)
class Reshape(_TensorOp):
    """Give the tensor under ``key`` a new shape with the same number of elements."""

    key: str
    shape: tuple[int, ...]
    within: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            return tensor.reshape(tuple(self.shape)).clone()
        except RuntimeError as exc:
            raise self.fail(f"cannot reshape {tuple(tensor.shape)} to {tuple(self.shape)}") from exc


@dataclass(frozen=True)
class SliceOrPad(_TensorOp):
    """Take ``size`` entries along ``dim`` starting at ``start``; positions outside the
    saved tensor (``start`` < 0, or past its end) are filled with ``fill``. Grows an input
    layer for new features, or crops one for dropped features."""

    key: str
    dim: int
    size: int
    start: int = 0
    fill: float | int | bool = 0
    within: tuple[str | int, ...] = ()

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        dim = self._dim(tensor, self.dim)
        if self.size < 0:
            raise self.fail(f"size {self.size} is negative")
        shape = list(tensor.shape)
        n = shape[dim]
        shape[dim] = self.size
        out = torch.full(shape, self.fill, dtype=tensor.dtype, device=tensor.device)
        lo, hi = max(self.start, 0), min(self.start + self.size, n)
        if hi > lo:
            out.narrow(dim, lo - self.start, hi - lo).copy_(tensor.narrow(dim, lo, hi - lo))
        return out


# -- free-form -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformState(Op):
    """Any rewrite of the state: ``fn`` gets a shallow copy of the mapping and returns the
    new one. Recorded by the function's qualified name."""

    fn: Callable[[Tree], Tree]
    within: tuple[str | int, ...] = ()

    def _apply(self, mapping: Tree) -> Tree:
        result = self.fn(dict(mapping))
        if not isinstance(result, dict):
            raise self.fail(f"{_function_name(self.fn)} returned a {type(result).__qualname__}")
        return result


@dataclass(frozen=True)
class TransformMetadata(Op):
    """Rewrite the row metadata (e.g. a renamed feature list); ``fn`` gets a copy."""

    fn: Callable[[dict[str, Any]], dict[str, Any]]
    within: tuple[str | int, ...] = field(default=())

    def apply_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        result = self.fn(copy.deepcopy(metadata))
        if not isinstance(result, dict):
            raise self.fail(f"{_function_name(self.fn)} returned a {type(result).__qualname__}")
        return result


def iter_ops(ops: Any) -> Iterator[Op]:
    """Check that ``ops`` is a sequence of operations (a single one is accepted too)."""
    items = [ops] if isinstance(ops, Op) else list(ops)
    for op in items:
        if not isinstance(op, Op):
            raise MigrationError(f"{op!r} is not a surgery operation")
        yield op


__all__ = [
    "AddKey",
    "DropKeys",
    "MoveSlice",
    "Op",
    "RenameKeys",
    "Reshape",
    "SliceOrPad",
    "TransformMetadata",
    "TransformState",
    "iter_ops",
]
