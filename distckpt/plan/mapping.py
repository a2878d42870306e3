"""Mapping rank-private state to another world size: which saved parts each new rank reads.

One protocol for both families of redistribution: rank-keyed (``SourceRanks``: whole parts
of some saved ranks, merged) and member-keyed (``MemberMapping``: each ensemble member's
entries from the saved rank that held it). A mapping turns what the row records (every saved
rank's manifest) and the new rank and world size into a :class:`Placement`; :func:`mapped_tree`
turns that into a saved tree whose tensors are reads of several saved ranks' bytes, input for
``plan_load``; :func:`finish` completes the joins that need the bytes (a rollout boundary's
rows). Pure: no file access, nothing read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from distckpt.errors import CheckpointError, CorruptCheckpointError
from distckpt.format.manifest import RankManifest
from distckpt.plan.load import decode_saved

Join = Literal["one", "merge", "members", "boundary"]
"""How a new rank combines its parts: one part's value as saved; several parts' dicts
merged (a key in two parts is an error); each field's member entries gathered (fields are
dicts keyed by member id); a rollout boundary's rows of the wanted members stacked."""

BOUNDARY_FIELDS = frozenset({"step", "x", "coords", "members"})  # a RolloutBoundary's fields


@dataclass(frozen=True)
class Part:
    """One saved rank's part of a state that a new rank reads: all of it (``members`` is
    None) or only the entries of these ensemble members."""

    rank: int
    members: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a new rank's value of ``state_id`` comes from and how its parts are joined;
    ``order`` is the member order of a joined rollout boundary."""

    state_id: str
    parts: tuple[Part, ...]
    join: Join
    order: tuple[int, ...] = ()


@runtime_checkable
class PartsMapping(Protocol):
    """A redistribution policy in plan form: ``place`` says, from the row's manifests (one
    per saved rank, in rank order), which saved parts rank ``rank`` of ``world_size`` reads
    for ``state_id``, or None when the policy does not handle the state."""

    def place(
        self, state_id: str, manifests: Sequence[RankManifest], rank: int, world_size: int
    ) -> Placement | None: ...


def _state(manifests: Sequence[RankManifest], rank: int, state_id: str) -> Any:
    if not 0 <= rank < len(manifests):
        raise CheckpointError(
            f"mapping names saved rank {rank} of state {state_id!r}; the row has {len(manifests)}"
        )
    manifest = manifests[rank]
    record = manifest.states.get(state_id)
    if record is None:
        raise CorruptCheckpointError(
            f"row {manifest.row}, saved rank {manifest.rank}: state {state_id!r} is missing"
        )
    return record.tree


def mapped_tree(manifests: Sequence[RankManifest], placement: Placement) -> Any:
    """The saved value of ``placement.state_id`` for this rank, its tensors left as reads
    (``ArrayRead``) of the saved ranks' bytes: only the entries the placement names."""
    sid = placement.state_id
    if placement.join in ("one", "merge"):
        values = {
            p.rank: decode_saved(manifests[p.rank], sid, _state(manifests, p.rank, sid))
            for p in placement.parts
        }
        if placement.join == "one":
            (value,) = values.values()
            return value
        return merge_parts(sid, values)
    if placement.join == "members":
        return _members(manifests, placement)
    return _boundary(manifests, placement)


def merge_parts(state_id: str, values: Mapping[int, Any]) -> dict[Any, Any]:
    """Several saved ranks' dicts as one; a key two ranks hold is an error (merging would
    duplicate or drop it)."""
    merged: dict[Any, Any] = {}
    owner: dict[Any, int] = {}
    for r, value in sorted(values.items()):
        if not isinstance(value, dict):
            raise CheckpointError(
                f"state {state_id!r}: saved rank {r} holds a {type(value).__qualname__}; "
                "only dicts from several ranks can be merged"
            )
        for key, item in value.items():
            if key in merged:
                raise CheckpointError(
                    f"state {state_id!r}: key {key!r} is held by saved ranks {owner[key]} "
                    f"and {r}; merging would duplicate or drop it"
                )
            merged[key], owner[key] = item, r
    return merged


def fields_of(tree: Any) -> dict[str, Any] | None:
    """A state's encoded fields (name -> node), or None if it is not a mapping of fields."""
    if not isinstance(tree, dict) or "dict" not in tree:
        return None
    if not all(isinstance(k, str) for k, _ in tree["dict"]):
        return None
    return {str(k): node for k, node in tree["dict"]}


def member_keyed(node: Any) -> bool:
    """An encoded field that is a dict whose keys are all integers (member ids)."""
    items = node.get("dict") if isinstance(node, dict) else None
    return items is not None and all(
        isinstance(k, int) and not isinstance(k, bool) for k, _ in items
    )


def _members(manifests: Sequence[RankManifest], placement: Placement) -> dict[str, Any]:
    sid = placement.state_id
    out: dict[str, dict[int, Any]] = {}
    origin: dict[tuple[str, int], int] = {}
    for part in placement.parts:
        manifest = manifests[part.rank]
        fields = fields_of(_state(manifests, part.rank, sid)) or {}
        wanted = set(part.members or ())
        for name, node in fields.items():
            out.setdefault(name, {})
            for key, value in node["dict"]:
                if key not in wanted:
                    continue
                if (name, key) in origin:
                    raise CheckpointError(
                        f"state {sid!r} of row {manifest.row}: member {key} of field "
                        f"{name!r} is held by saved ranks {origin[name, key]} and {part.rank}"
                    )
                origin[name, key] = part.rank
                out[name][key] = decode_saved(manifest, sid, value)
    return {name: out[name] for name in sorted(out)}


def _boundary(manifests: Sequence[RankManifest], placement: Placement) -> dict[str, Any]:
    sid = placement.state_id
    if not placement.parts:
        return {"step": -1, "x": None, "coords": {}, "members": []}
    xs: list[Any] = []
    coords: Any = None
    steps: list[Any] = []
    for part in placement.parts:
        manifest = manifests[part.rank]
        fields = fields_of(_state(manifests, part.rank, sid)) or {}
        xs.append(decode_saved(manifest, sid, fields["x"]))
        steps.append(decode_saved(manifest, sid, fields["step"]))
        if coords is None:
            coords = decode_saved(manifest, sid, fields["coords"])
    return {"step": steps[0], "x": xs, "coords": coords, "members": list(placement.order)}


def finish(manifests: Sequence[RankManifest], placement: Placement, value: Any) -> Any:
    """This rank's value once the reads of :func:`mapped_tree` are done: a rollout
    boundary's wanted rows taken from each part's batch and stacked in ``order``."""
    if placement.join != "boundary" or not placement.parts:
        return value
    sid = placement.state_id
    rows: dict[int, torch.Tensor] = {}
    for part, x in zip(placement.parts, value["x"], strict=True):
        fields = fields_of(manifests[part.rank].states[sid].tree) or {}
        saved = [int(m) for m in decode_saved(manifests[part.rank], sid, fields["members"])]
        for m in part.members or ():
            rows[m] = x[saved.index(m)]
    coords = dict(value["coords"])
    saved_ids = np.asarray(coords.get("ensemble", np.array([], dtype=np.int64)))
    coords["ensemble"] = np.array(list(placement.order), dtype=saved_ids.dtype)
    return {
        "step": value["step"],
        "x": torch.stack([rows[m] for m in placement.order]),
        "coords": coords,
        "members": list(placement.order),
    }


__all__ = [
    "BOUNDARY_FIELDS",
    "Join",
    "Part",
    "PartsMapping",
    "Placement",
    "fields_of",
    "finish",
    "mapped_tree",
    "merge_parts",
    "member_keyed",
]
