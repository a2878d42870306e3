"""Restoring rank-private state of a row written by N ranks in a job of M ranks.

A state every saved rank holds with the same value (equal ``StateRecord.digest``) is read from
saved rank ``rank % N``. Any other state is rank-private: it needs a mapping policy that
says which saved ranks' parts each new rank reads and how it combines them; without one
the restore raises ``WorldSizeMismatchError`` naming the state and both world sizes. A
policy with ``place`` (the ``plan.mapping`` protocol, as :class:`SourceRanks`) is planned as
reads of the saved ranks' bytes; one with only ``combine`` decodes its parts itself.
Global (sharded) arrays are not rank-private: they are filled by region (``globalio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, overload, runtime_checkable

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.engine import steps as engine
from distckpt.engine.restore import execute
from distckpt.errors import CheckpointError, CorruptCheckpointError, WorldSizeMismatchError
from distckpt.format.manifest import RankManifest
from distckpt.io.rowio import RankReader
from distckpt.plan.load import plan_load, saved_alike, saved_tree
from distckpt.plan.mapping import Part, PartsMapping, Placement, mapped_tree, merge_parts
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
    error (it would be duplicated or one copy silently dropped). It implements the
    ``plan.mapping`` protocol (:meth:`place`), so restore plans reads of the sources' bytes
    instead of decoding them through :meth:`combine`.
    """

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def sources(
        self, state_id: str, saved_world_size: int, rank: int, world_size: int
    ) -> Sequence[int] | None:
        found = self._fn(state_id, saved_world_size, rank, world_size)
        return None if found is None else [int(r) for r in found]

    def place(
        self, state_id: str, manifests: Sequence[RankManifest], rank: int, world_size: int
    ) -> Placement | None:
        """The sources of ``state_id`` as whole parts: one read as saved, several merged."""
        found = self.sources(state_id, len(manifests), rank, world_size)
        if found is None:
            return None
        check_sources(state_id, found, len(manifests))
        ranks = sorted(set(found))
        return Placement(
            state_id, tuple(Part(r) for r in ranks), "one" if len(ranks) == 1 else "merge"
        )

    def combine(self, state_id: str, parts: Mapping[int, Any]) -> Any:
        values = {r: view.read_state(state_id) for r, view in sorted(parts.items())}
        if len(values) == 1:
            return next(iter(values.values()))
        return merge_parts(state_id, values)


def check_sources(state_id: str, found: Sequence[int], saved: int) -> None:
    """Raise unless every rank in ``found`` is one of the ``saved`` ranks of the row."""
    bad = [r for r in found if not 0 <= r < saved]
    if bad:
        raise CheckpointError(
            f"mapping names saved ranks {bad} of state {state_id!r}; the row has {saved}"
        )


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
    """Collective: this rank's decoded states of ``row``, whatever world size wrote it
    (:func:`mapped_states`, its plan executed into new values)."""
    if view is None:
        view = open_part_agreed(store, comm, row)
    saved, readers = mapped_states(store, comm, row, mapping, view=view)
    plan = step.run(
        comm,
        step.LOAD_READ,
        lambda: plan_load(saved, None),
        context=f"cannot restore row {row}",
        fallback=CorruptCheckpointError,
    )
    return execute(plan, None, comm, row=row, readers=readers, globals_=view.globals_reader)


def mapped_states(
    store: Store,
    comm: Communicator,
    row: int,
    mapping: StateMapping | None = None,
    *,
    view: engine.RowView,
) -> tuple[dict[str, Any], dict[int, RankReader]]:
    """Collective: this rank's saved tree of ``row`` (input for ``plan_load``, tensors as
    reads of saved ranks' bytes) and a reader for every saved rank it reads.

    At the same world size each rank reads its own part. At another size the coordinator
    lists the row's states from every manifest; ``mapping`` is asked about every state
    first (so it may split even a row written by one rank); states it does not place come
    from saved rank ``rank % N`` if uniform, and raise if rank-private. A mapping with
    ``place`` (the ``plan.mapping`` protocol, e.g. :class:`SourceRanks`) is planned as
    reads of the parts it names; any other has its ``combine`` decode them. ``row`` must
    be chosen already (``engine.choose_row(..., any_world_size=True)``). Every rank
    raises together.
    """
    saved = view.saved_world_size
    home: dict[int, RankReader] = {view.rank: view.reader}
    if saved == comm.world_size:
        return saved_tree(dict.fromkeys(view.manifest.states, view.manifest)), home
    kinds = _state_kinds(store, comm, row)
    manifests = _Manifests(store, row, view)
    placements: dict[str, Placement] = {}

    def place() -> dict[str, list[int]]:
        sources: dict[str, list[int]] = {}
        for sid in kinds if mapping is not None else ():
            assert mapping is not None
            if isinstance(mapping, PartsMapping):
                placement = mapping.place(sid, manifests, comm.rank, comm.world_size)
                if placement is None:
                    continue
                placements[sid] = placement
                found: Sequence[int] = [p.rank for p in placement.parts]
            else:
                found_or_none = mapping.sources(sid, saved, comm.rank, comm.world_size)
                if found_or_none is None:
                    continue
                found = found_or_none
            check_sources(sid, found, saved)
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

    def plan_mapped() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sid in kinds:
            if sid in placements:
                out[sid] = mapped_tree(manifests, placements[sid])
            elif sid in sources:
                assert mapping is not None
                parts = {r: engine.open_rank(store, row, r) for r in sources[sid]}
                out[sid] = mapping.combine(sid, parts)
            else:  # uniform, checked above
                if not view.has_state(sid):
                    raise CorruptCheckpointError(
                        f"row {row}, saved rank {view.rank}: uniform state {sid!r} is missing"
                    )
                out[sid] = saved_tree({sid: view.manifest})[sid]
        return out

    # A policy's own failure must not leave other ranks waiting: the step catches it.
    tree = step.run(
        comm,
        step.LOAD_REDISTRIBUTE,
        plan_mapped,
        context=f"cannot restore row {row}",
        fallback=CorruptCheckpointError,
    )
    readers = dict(home)
    for q in sorted({p.rank for pl in placements.values() for p in pl.parts} - set(home)):
        m = manifests[q]
        readers[q] = RankReader(
            store.fs,
            store.row_dir(row),
            row=row,
            rank=q,
            entries=m.arrays,
            store=store.path,
            ranged=True,
            data_bytes=m.data_bytes,
        )
    return tree, readers


class _Manifests(Sequence[RankManifest]):
    """The row's manifests in saved-rank order, each read when a mapping first asks."""

    def __init__(self, store: Store, row: int, view: engine.RowView) -> None:
        self._store = store
        self._row = row
        self._got: dict[int, RankManifest] = {view.rank: view.manifest}
        self._n = view.saved_world_size

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> RankManifest: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RankManifest]: ...
    def __getitem__(self, index: int | slice) -> RankManifest | Sequence[RankManifest]:
        if isinstance(index, slice):
            return [self[i] for i in range(self._n)[index]]
        if not 0 <= index < self._n:
            raise IndexError(index)
        if index not in self._got:
            self._got[index] = engine.open_rank(self._store, self._row, index).manifest
        return self._got[index]


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
