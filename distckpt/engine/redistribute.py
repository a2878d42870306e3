"""Restoring rank-private state of a row written by N ranks in a job of M ranks.

A state every saved rank holds with the same value (equal ``StateRecord.digest``) is read from
saved rank ``rank % N``. Any other state is rank-private: it needs a mapping policy that
says which saved ranks' parts each new rank reads and how it combines them; without one
the restore raises ``WorldSizeMismatchError`` naming the state and both world sizes.
Global (sharded) arrays are not rank-private: they are filled by region (``globalio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.engine import steps as engine
from distckpt.errors import CheckpointError, CorruptCheckpointError, WorldSizeMismatchError
from distckpt.plan.load import saved_alike
from distckpt.storage.store import Store


@runtime_checkable
class StateMapping(Protocol):
    """A policy for restoring rank-private state at another world size.

    ``sources`` names the saved ranks (``0 <= r < saved_world_size``) whose parts of
    ``state_id`` this rank reads; across the new job every saved rank must be named by at
    least one rank (nothing is dropped). ``combine`` builds this rank's value from those
    parts, each an ``engine.RowView`` of one saved rank, so it can read only what it needs
    (``view.read_state(state_id)``). For a state it does not handle, ``sources`` returns
    ``None`` on every rank: the state then restores as without a policy (uniform states
    from any rank, rank-private ones an error).
    """

    def sources(
        self, state_id: str, saved_world_size: int, rank: int, world_size: int
    ) -> Sequence[int] | None: ...

    def combine(self, state_id: str, parts: Mapping[int, Any]) -> Any: ...


class SourceRanks:
    """A :class:`StateMapping` from a plain function ``fn(state_id, N, rank, M) -> ranks``.

    One source: its value. Several: their dicts merged, and a key held by two sources is an
    error (it would be duplicated or one copy silently dropped).
    """

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def sources(
        self, state_id: str, saved_world_size: int, rank: int, world_size: int
    ) -> Sequence[int] | None:
        found = self._fn(state_id, saved_world_size, rank, world_size)
        return None if found is None else [int(r) for r in found]

    def combine(self, state_id: str, parts: Mapping[int, Any]) -> Any:
        values = {r: view.read_state(state_id) for r, view in sorted(parts.items())}
        if len(values) == 1:
            return next(iter(values.values()))
        merged: dict[Any, Any] = {}
        owner: dict[Any, int] = {}
        for r, value in values.items():
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


def open_part_agreed(store: Store, comm: Communicator, row: int) -> engine.RowView:
    """Collective: this rank's part of a chosen row (part ``rank % N`` of an N-rank row);
    every rank raises together if any rank cannot open its part."""

    return step.run(
        comm,
        step.LOAD_OPEN,
        lambda: engine.open_part(store, row, comm.rank),
        context=f"cannot restore row {row}",
        fallback=CorruptCheckpointError,
    )


def read_states(
    store: Store,
    comm: Communicator,
    row: int,
    mapping: StateMapping | None = None,
    *,
    view: engine.RowView | None = None,
) -> dict[str, Any]:
    """Collective: this rank's decoded states of ``row``, whatever world size wrote it.

    At the same world size each rank reads its own part. At another size the coordinator
    lists the row's states from every manifest; ``mapping`` is asked about every state
    first (so it may split even a row written by one rank); states it does not place come
    from saved rank ``rank % N`` if uniform, and raise if rank-private. ``row`` must be
    chosen already (``engine.choose_row(..., any_world_size=True)``). Every rank raises
    together.
    """

    if view is None:
        view = open_part_agreed(store, comm, row)
    saved = view.saved_world_size
    if saved == comm.world_size:
        return engine.read_all(view, comm)
    kinds = _state_kinds(store, comm, row)

    def place() -> dict[str, list[int]]:
        sources: dict[str, list[int]] = {}
        for sid in kinds if mapping is not None else ():
            assert mapping is not None
            found = mapping.sources(sid, saved, comm.rank, comm.world_size)
            if found is None:
                continue
            bad = [r for r in found if not 0 <= r < saved]
            if bad:
                raise CheckpointError(
                    f"mapping names saved ranks {bad} of state {sid!r}; the row has {saved}"
                )
            sources[sid] = sorted(set(found))
        return sources

    placed = step.gather(
        comm,
        step.LOAD_MAPPING,
        place,
        context=f"row {row} of {store.path}: the mapping policy failed",
        fallback=WorldSizeMismatchError,
    )
    sources = placed[comm.rank]
    reports = [{"sources": p} for p in placed]
    # The policy places a state on every rank or on none; unplaced ones default by kind.
    mapped = sorted({sid for p in reports for sid in p["sources"]})
    partial = [sid for sid in mapped if any(sid not in p["sources"] for p in reports)]
    if partial:
        raise WorldSizeMismatchError(
            f"row {row} of {store.path}: the mapping policy places state(s) "
            f"{', '.join(repr(s) for s in partial)} on some ranks only"
        )
    unplaced = [sid for sid, uniform in kinds.items() if not uniform and sid not in mapped]
    if unplaced:
        raise WorldSizeMismatchError(
            f"row {row} of {store.path} was written by {saved} ranks; this job has "
            f"{comm.world_size}: rank-private state {', '.join(repr(s) for s in unplaced)} "
            "cannot be redistributed without a mapping policy (load(..., mapping=...))"
        )
    for sid in mapped:
        read = set().union(*(p["sources"][sid] for p in reports))
        dropped = sorted(set(range(saved)) - read)
        if dropped:
            raise WorldSizeMismatchError(
                f"row {row} of {store.path}: the mapping policy leaves saved ranks {dropped} "
                f"of state {sid!r} unread ({saved} ranks saved, {comm.world_size} restore); "
                "their values would be dropped"
            )
    home = view

    def read_mapped() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sid in kinds:
            if sid not in sources:  # uniform, checked above
                if not home.has_state(sid):
                    raise CorruptCheckpointError(
                        f"row {row}, saved rank {home.rank}: uniform state {sid!r} is missing"
                    )
                out[sid] = home.read_state(sid)
            else:
                assert mapping is not None
                parts = {r: engine.open_rank(store, row, r) for r in sources[sid]}
                out[sid] = mapping.combine(sid, parts)
        return out

    # A policy's own failure must not leave other ranks waiting: the step catches it.
    return step.run(
        comm,
        step.LOAD_REDISTRIBUTE,
        read_mapped,
        context=f"cannot restore row {row}",
        fallback=CorruptCheckpointError,
    )


def _state_kinds(store: Store, comm: Communicator, row: int) -> dict[str, bool]:
    """Collective: state id -> uniform, over every saved rank's manifest (coordinator reads)."""
    from distckpt.dist.election import row_status

    def classify() -> dict[str, bool]:
        kinds: dict[str, bool] = {}
        status = row_status(store, row)
        for sid in sorted({sid for m in status.manifests for sid in m.states}):
            kinds[sid] = saved_alike(status.manifests, sid)
        return kinds

    return step.decide(
        comm,
        step.LOAD_KINDS,
        classify,
        context=f"cannot list the states of row {row}",
        fallback=CorruptCheckpointError,
    )
