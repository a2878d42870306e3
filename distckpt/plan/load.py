"""Load planning: what a row records plus what is live, turned into records of what goes where.

A pure function (no file access, no collective): :func:`saved_tree` decodes the states of
the saved ranks' manifests with each tensor left as a record of where its bytes lie, and
:func:`plan_load` walks the live tree once against it, checking that every saved value fits
before anything is read, and lists every read (into a live tensor or a new one) and every
live position to replace. Every restore path executes such a plan, so a value kind handled
here is handled by all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard

import torch

from distckpt.errors import CheckpointStateSchemaError, CorruptCheckpointError
from distckpt.format import tree as codec
from distckpt.format.dtypes import torch_dtype
from distckpt.format.manifest import ArrayEntry, GlobalEntry, RankManifest
from distckpt.format.shards import Box, is_global, piece
from distckpt.format.tree import Path, path_str


@dataclass(frozen=True)
class ArrayRead:
    """A byte range of one saved rank's data: the entry names array, offset, nbytes, dtype,
    shape and crc32c."""

    rank: int
    entry: ArrayEntry
    numpy: bool = False  # the value comes back as an ndarray
    np_dtype: str | None = None  # numpy dtype the ndarray is viewed as (datetimes)

    def view(self, dtype: Any) -> ArrayRead:
        """The same bytes seen as numpy ``dtype`` (the codec views datetime arrays so)."""
        return ArrayRead(self.rank, self.entry, True, str(dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.entry.dtype)


@dataclass(frozen=True)
class BoxRead:
    """A box of a global (sharded) array, read chunk by chunk from any saved layout."""

    entry: GlobalEntry
    box: Box

    @property
    def shape(self) -> tuple[int, ...]:
        return self.box.lengths

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.entry.dtype)


@dataclass(frozen=True)
class GlobalRef:
    """A saved global array as it appears in a saved tree before planning."""

    entry: GlobalEntry


class GlobalSource(Protocol):
    """Anything naming a saved global array (a :class:`GlobalRef` or a lazy reader)."""

    @property
    def entry(self) -> GlobalEntry: ...


def is_global_source(value: Any) -> TypeGuard[GlobalSource]:
    """Whether ``value`` names a saved global array (its ``entry`` is a GlobalEntry)."""
    return isinstance(getattr(value, "entry", None), GlobalEntry)


Dest = Literal["live", "new"]


@dataclass(frozen=True)
class ReadItem:
    """One tensor to read: from a saved rank's bytes, a global box, or memory (a value a
    migration produced), into the live tensor at ``path`` or into a new tensor."""

    path: Path  # position in the state tree, state id first
    source: ArrayRead | BoxRead | torch.Tensor
    dest: Dest


@dataclass(frozen=True)
class Slot:
    """Where a new tensor goes in a decoded value: ``LoadPlan.reads[index]``."""

    index: int


@dataclass(frozen=True)
class Update:
    """Replace (or add) the live value at ``path`` with ``value`` (tensors as :class:`Slot`)."""

    path: Path
    value: Any


@dataclass(frozen=True)
class LoadPlan:
    """Every read and every replacement of one restore, decided before anything is read."""

    reads: tuple[ReadItem, ...]
    updates: tuple[Update, ...]
    kept: tuple[str, ...] = ()  # live keys the row has no value for (strict=False)


def saved_tree(parts: Mapping[str, RankManifest]) -> dict[str, Any]:
    """The saved states, each from the manifest ``parts`` names for it, with every tensor
    an :class:`ArrayRead` and every global array a :class:`GlobalRef` (nothing read)."""
    out: dict[str, Any] = {}
    for sid, manifest in parts.items():
        record = manifest.states.get(sid)
        if record is None:
            raise CorruptCheckpointError(
                f"row {manifest.row}, saved rank {manifest.rank}: state {sid!r} is missing"
            )
        out[sid] = decode_saved(manifest, sid, record.tree)
    return out


def saved_alike(manifests: Sequence[RankManifest], state_id: str) -> bool:
    """Whether every saved rank holds ``state_id`` with the same value: equal recorded
    digests (of its tree and tensor bytes). Such a state can be read from any one rank at
    any world size; the one test both mapping families (rank- and member-keyed) use."""
    held = [m.states.get(state_id) for m in manifests]
    digests = {None if r is None else r.digest for r in held}
    return bool(manifests) and len(digests) == 1 and None not in digests


def decode_saved(manifest: RankManifest, sid: str, node: Any) -> Any:
    def leaf(index: int, as_numpy: bool) -> ArrayRead:
        if not 0 <= index < len(manifest.arrays):
            raise CorruptCheckpointError(
                f"row {manifest.row}, rank {manifest.rank}: state {sid!r} refers to missing "
                f"array {index}"
            )
        return ArrayRead(manifest.rank, manifest.arrays[index], as_numpy)

    def shard(index: int) -> GlobalRef:
        if not 0 <= index < len(manifest.globals):
            raise CorruptCheckpointError(
                f"row {manifest.row}, rank {manifest.rank}: state {sid!r} refers to missing "
                f"global array {index}"
            )
        return GlobalRef(manifest.globals[index])

    return codec.decode(node, leaf, shard)


def _is_tensor_source(value: Any) -> bool:
    return isinstance(value, ArrayRead | torch.Tensor) or is_global_source(value)


def plan_load(
    saved: Mapping[str, Any], live: Mapping[str, Any] | None, *, strict: bool = True
) -> LoadPlan:
    """The plan filling ``live`` from ``saved`` (a :func:`saved_tree`, or states already
    decoded in memory, e.g. migrated); ``live=None`` makes every tensor a new one.

    One walk over both trees: a saved tensor meeting a live tensor (or DTensor, ``Sharded``)
    is read into it, after its shape and dtype are checked (a global array into a live
    region: its box only); any other saved value replaces the live one. A live key the row
    lacks raises, or with ``strict=False`` keeps its value and is listed in ``kept``.
    Raises ``CheckpointStateSchemaError`` naming the path, before anything is read.
    """
    builder = _Builder(strict)
    if live is None:
        for sid, value in saved.items():
            builder.update((sid,), value)
    else:
        builder.walk(live, saved, ())
    return LoadPlan(tuple(builder.reads), tuple(builder.updates), tuple(builder.kept))


class _Builder:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.reads: list[ReadItem] = []
        self.updates: list[Update] = []
        self.kept: list[str] = []

    def walk(self, live: Any, saved: Any, path: Path) -> None:
        """``live`` and ``saved`` are containers of the same kind at ``path``."""
        if isinstance(live, dict):
            for key in live:
                if key not in saved:
                    self._absent((*path, key))
            for key, value in saved.items():
                if key in live:
                    self.pair(live[key], value, (*path, key))
                else:
                    self.update((*path, key), value)
        else:
            for i, (lv, sv) in enumerate(zip(live, saved, strict=True)):
                self.pair(lv, sv, (*path, i))

    def _absent(self, path: Path) -> None:
        if not self.strict:
            self.kept.append(path_str(path))
            return
        raise CheckpointStateSchemaError(
            f"{path_str(path)!r} is not in the checkpoint "
            "(load with strict=False to keep the live value)"
        )

    def pair(self, live: Any, saved: Any, path: Path) -> None:
        live_tensor = is_global(live) or isinstance(live, torch.Tensor)
        if is_global_source(saved) and live_tensor:
            self._fill_global(live, saved, path)
        elif live_tensor and not is_global(live):
            if not _is_plain(saved):
                raise CheckpointStateSchemaError(
                    f"{path_str(path)!r}: live value is a tensor, saved value is a {_kind(saved)}"
                )
            if tuple(live.shape) != tuple(saved.shape) or live.dtype != _dtype(saved):
                raise CheckpointStateSchemaError(
                    f"{path_str(path)!r}: saved tensor is {tuple(saved.shape)} "
                    f"{_dtype(saved)}, live tensor is {tuple(live.shape)} {live.dtype}"
                )
            self.reads.append(ReadItem(path, saved, "live"))
        elif live_tensor:  # a live global value, saved as a plain tensor
            raise CheckpointStateSchemaError(
                f"{path_str(path)!r}: live value is a sharded tensor, saved value is a "
                f"{_kind(saved)}"
            )
        elif (isinstance(live, dict) and isinstance(saved, dict)) or (
            isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved)
        ):
            self.walk(live, saved, path)
        else:
            self.update(path, saved)

    def _fill_global(self, live: Any, saved: GlobalSource, path: Path) -> None:
        held = piece(live, where=path_str(path)) if is_global(live) else None
        shape = held.global_shape if held is not None else tuple(live.shape)
        dtype = held.dtype if held is not None else live.dtype
        entry = saved.entry
        if shape != entry.shape or dtype != torch_dtype(entry.dtype):
            raise CheckpointStateSchemaError(
                f"{path_str(path)!r}: saved global tensor is {entry.shape} "
                f"{torch_dtype(entry.dtype)}, live tensor is {shape} {dtype} (global shape)"
            )
        box = held.box if held is not None else Box((0,) * len(shape), shape)
        if held is not None and held.local is None:
            return  # this rank holds nothing of the tensor
        self.reads.append(ReadItem(path, BoxRead(entry, box), "live"))

    def update(self, path: Path, saved: Any) -> None:
        self.updates.append(Update(path, self._slots(saved, path)))

    def _slots(self, value: Any, path: Path) -> Any:
        """``value`` with each tensor source replaced by the slot of a new read."""
        if _is_tensor_source(value):
            source: ArrayRead | BoxRead | torch.Tensor
            if is_global_source(value):
                shape = value.entry.shape
                source = BoxRead(value.entry, Box((0,) * len(shape), shape))
            else:
                source = value
            self.reads.append(ReadItem(path, source, "new"))
            return Slot(len(self.reads) - 1)
        if isinstance(value, dict):
            return _like(value, {k: self._slots(v, (*path, k)) for k, v in value.items()})
        if isinstance(value, list | tuple):
            return _like(value, [self._slots(v, (*path, i)) for i, v in enumerate(value)])
        return value


def _like(original: Any, items: Any) -> Any:
    """``items`` in a container of ``original``'s type: the very object when nothing in it
    changed (so ``torch.Size``, named tuples and dict subclasses come back as saved)."""
    values = list(items.values()) if isinstance(items, dict) else items
    olds = list(original.values()) if isinstance(original, dict) else list(original)
    if all(a is b for a, b in zip(values, olds, strict=True)):
        return original
    kind = type(original)
    if isinstance(original, dict):
        return items if kind is dict else _rebuilt(kind, items, original)
    if kind in (list, tuple):
        return kind(items)
    if hasattr(original, "_fields"):  # a named tuple
        return kind(*items)
    return _rebuilt(kind, items, original)


def _rebuilt(kind: type, items: Any, original: Any) -> Any:
    try:
        made = kind(items)
    except TypeError:
        return dict(items) if isinstance(items, dict) else type(items)(items)
    if hasattr(original, "default_factory"):
        made.default_factory = original.default_factory
    return made


def _is_plain(saved: Any) -> bool:
    """A saved plain tensor (not an ndarray, not a global array)."""
    return isinstance(saved, torch.Tensor) or (isinstance(saved, ArrayRead) and not saved.numpy)


def _dtype(saved: ArrayRead | torch.Tensor) -> torch.dtype:
    return saved.dtype


def _kind(saved: Any) -> str:
    if is_global_source(saved):
        return "global tensor"
    if isinstance(saved, ArrayRead):
        return "numpy.ndarray" if saved.numpy else "tensor"
    return type(saved).__qualname__


def fill_values(value: Any, tensors: Mapping[int, Any]) -> Any:
    """``value`` (an :attr:`Update.value`) with each slot replaced by its read tensor."""
    if isinstance(value, Slot):
        return tensors[value.index]
    if isinstance(value, dict):
        return _like(value, {k: fill_values(v, tensors) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return _like(value, [fill_values(v, tensors) for v in value])
    return value


def at(tree: Any, path: Path) -> Any:
    """The value at ``path`` of a live tree (the plan's paths exist there)."""
    for key in path:
        tree = tree[key]
    return tree


def assign(tree: Any, path: Path, value: Any) -> None:
    """Set the value at ``path`` of a live tree (its parent exists there)."""
    at(tree, path[:-1])[path[-1]] = value
