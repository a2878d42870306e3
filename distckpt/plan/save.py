"""Planning: turning live state into the list of arrays one rank writes for a row.

Kept apart from the byte writing (rowio) and from the collective steps (engine) so each can
be tested alone. Every tensor of a rank goes into the rank's one data array of the row
(format 2), at an aligned offset, so the file count per rank is bounded however many
tensors a model has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from distckpt.errors import CheckpointSerializationError
from distckpt.format import tree as codec
from distckpt.format.dtypes import DtypeSpec, spec_for
from distckpt.format.layout import DATA_ARRAY, aligned
from distckpt.format.manifest import is_data_array, is_packed
from distckpt.format.shards import Piece, piece
from distckpt.plan.stateful import explain_unstorable, to_saved

if TYPE_CHECKING:
    import torch

DEFAULT_PACK_THRESHOLD = 1 << 20  # tensors below 1 MiB go into the packed array


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor, staged on the host, with its destination."""

    name: str
    tensor: torch.Tensor  # CPU, contiguous, conj/neg resolved
    spec: DtypeSpec
    array: str  # array directory relative to the row (the row's shared data array)
    offset: int  # offset among the rank's tensors in its data array (see ``RankPlan``)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.spec.itemsize

    @property
    def packed(self) -> bool:
        return is_packed(self.array)

    @property
    def ranged(self) -> bool:
        return is_data_array(self.array)


@dataclass(frozen=True)
class PlannedShard:
    """This rank's piece of a global tensor, staged on the host (``globalio`` writes it)."""

    name: str  # state path: also the global array's key
    piece: Piece  # local staged to a CPU contiguous tensor (None: not in the mesh)
    spec: DtypeSpec


@dataclass(frozen=True)
class RankPlan:
    states: dict[str, Any]  # state id -> encoded tree (JSON)
    tensors: tuple[PlannedTensor, ...]  # index = leaf id used in the trees
    # Bytes of the tensors' region of the data array (aligned, padding included). The
    # region starts after the rank's global pieces, on a page: offsets are relative to it.
    packed_nbytes: int
    shards: tuple[PlannedShard, ...] = ()  # index = {"global": i} id used in the trees


def stage(tensor: torch.Tensor, *, where: str) -> torch.Tensor:
    """A CPU, contiguous, plain tensor holding exactly ``tensor``'s values."""
    import torch

    if tensor.layout != torch.strided:
        raise CheckpointSerializationError(
            f"tensor at {where!r} has layout {tensor.layout}; only dense tensors can be stored"
        )
    if tensor.is_nested or tensor.is_quantized or tensor.device.type == "meta":
        kind = "nested" if tensor.is_nested else "quantized" if tensor.is_quantized else "meta"
        raise CheckpointSerializationError(
            f"tensor at {where!r} is a {kind} tensor; only dense tensors with data can be stored"
        )
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointSerializationError(
            f"tensor at {where!r} is a {type(tensor).__qualname__}; pass a plain tensor"
        )
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def plan_rank(
    states: dict[str, Any],
    *,
    rank: int,
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    stager: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
) -> RankPlan:
    """Objects with ``state_dict()``/``load_state_dict()`` are planned as their state dict.
    ``pack_threshold`` is kept for callers of format 1; format 2 packs every tensor.

    ``stager(tensor, where)`` replaces :func:`stage` for every tensor the row will hold
    (leaves and global pieces alike): an asynchronous save copies each into its own
    reusable buffers, so none is read from live memory after planning returns."""
    to_host = stager if stager is not None else lambda t, where: stage(t, where=where)
    leaves: list[codec.Leaf] = []
    found: list[tuple[codec.Path, Any]] = []
    trees: dict[str, Any] = {}
    for state_id, value in states.items():
        if not isinstance(state_id, str):
            raise CheckpointSerializationError(f"state id {state_id!r} is not a string")
        saved = to_saved(value, (state_id,))  # Stateful objects as their state_dict()
        try:
            trees[state_id] = codec.encode(saved, leaves, (state_id,), found)
        except CheckpointSerializationError as exc:
            raise explain_unstorable(exc, saved, (state_id,)) from exc
    shards = []
    for path, value in found:
        name = codec.path_str(path)
        held = piece(value, where=name)
        local = None if held.local is None else to_host(held.local, name)
        shards.append(
            PlannedShard(name, replace(held, local=local), spec_for(held.dtype, where=name))
        )
    planned: list[PlannedTensor] = []
    offset = 0
    for leaf in leaves:
        name = codec.path_str(leaf.path)
        spec = spec_for(leaf.tensor.dtype, where=name)
        tensor = to_host(leaf.tensor, name)
        nbytes = tensor.numel() * spec.itemsize
        at = aligned(offset, nbytes)
        planned.append(PlannedTensor(name, tensor, spec, DATA_ARRAY, at))
        offset = at + nbytes
    return RankPlan(trees, tuple(planned), offset, tuple(shards))
