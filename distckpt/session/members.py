"""Ensemble members move between ranks: restoring member-keyed state at another world size.

A row written by N ranks holds each rank's private state. When its states are keyed by
ensemble member id (noise and RNG per member, the rollout boundary of a batch of members), a
job of M ranks can restore it: each rank works out its members at M and takes each member's
entries from whichever saved rank held it, reading only those tensors (their byte ranges):
:meth:`MemberMapping.place` is the ``plan.mapping`` protocol, and the view executes the load
plan of the parts it places (``engine.restore``). States replicated on
every rank (model weights) are read once and broadcast. Anything else cannot be
redistributed and raises, naming the state and both world sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.dist.election import RowStatus, elect, row_status
from distckpt.engine import restore
from distckpt.engine.steps import RowView, saved_world_size
from distckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    WorldSizeMismatchError,
)
from distckpt.format import tree as codec
from distckpt.format.dtypes import spec_for, torch_dtype
from distckpt.format.manifest import RankManifest
from distckpt.io.marks import bad_rows
from distckpt.io.rowio import RankReader
from distckpt.logs import get_logger
from distckpt.plan.load import ArrayRead, decode_saved, plan_load, saved_alike, saved_tree
from distckpt.plan.mapping import (
    BOUNDARY_FIELDS,
    Part,
    Placement,
    fields_of,
    finish,
    mapped_tree,
    member_keyed,
)
from distckpt.storage.store import Store

log = get_logger(__name__)

Json = Any


def round_robin(nensemble: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank`` of ``world_size`` holds members rank, rank + W, rank + 2W, ..."""
    return list(range(rank, nensemble, world_size))


@dataclass(frozen=True)
class MemberMapping:
    """Mapping policy: how rank-private state moves when the world size changes.

    Pass it as ``Checkpoint(..., mapping=MemberMapping(nensemble))``. At restore with M ranks
    from a row of N ranks, a state is redistributed when it is member-keyed:

    - every field is a dict keyed by member id (``{member: tensor}``): each rank gets the
      entries of its members at M, from whichever saved rank held them;
    - or it is a :class:`~distckpt.RolloutBoundary` (``x`` stacked along dim 0 in the
      order of ``members``): the rows of this rank's members are reassembled, in the order
      :meth:`members_of` gives them, into one boundary (they must share one step).

    Members listed under ``done_key`` in the row's metadata are finished: their entries are
    not carried over. A state id in ``replicated`` is identical on every rank (e.g. model
    weights): one saved copy is read by this job's rank 0 only and broadcast, at any
    world size; at another world size so is every state that all saved ranks recorded with
    the same digest. Any other state of an N-rank row restored at M != N raises
    :class:`~distckpt.WorldSizeMismatchError`. Override :meth:`members_of` for another
    assignment than round robin.
    """

    nensemble: int
    replicated: tuple[str, ...] = ()
    done_key: str | None = "completed_ensembles"

    def members_of(self, rank: int, world_size: int) -> list[int]:
        """The members rank ``rank`` of a ``world_size``-rank job holds."""
        return round_robin(self.nensemble, rank, world_size)

    def place(
        self, state_id: str, manifests: Sequence[RankManifest], rank: int, world_size: int
    ) -> Placement:
        """Where rank ``rank`` of ``world_size`` finds its members' entries of ``state_id``
        (the ``plan.mapping`` protocol); raises ``WorldSizeMismatchError`` for a state that
        is not member-keyed."""
        head = manifests[0]

        def mismatch(why: str) -> WorldSizeMismatchError:
            return WorldSizeMismatchError(
                f"state {state_id!r} of row {head.row} was saved by {len(manifests)} ranks "
                f"and this job has {world_size}: {why}"
            )

        per_rank: list[tuple[int, dict[str, Json]]] = []
        for q, m in enumerate(manifests):
            record = m.states.get(state_id)
            if record is None:
                continue
            fields = fields_of(record.tree)
            if fields is None:
                raise mismatch("it is not a mapping of fields")
            per_rank.append((q, fields))
        done_key = self.done_key
        done = (
            codec.decode_metadata(head.metadata).get(done_key, []) if done_key is not None else []
        )
        wanted = set(self.members_of(rank, world_size)) - {int(m) for m in done}
        names = {name for _, fields in per_rank for name in fields}
        if names == BOUNDARY_FIELDS:
            return self._boundary(state_id, manifests, per_rank, wanted, rank, world_size)
        if all(member_keyed(node) for _, fields in per_rank for node in fields.values()):
            keep = tuple(sorted(wanted))
            return Placement(state_id, tuple(Part(q, keep) for q, _ in per_rank), "members")
        raise mismatch(
            "it is rank-private and not keyed by ensemble member (every field a dict keyed by "
            "member id, or a rollout boundary), so it cannot be redistributed"
        )

    def _boundary(
        self,
        state_id: str,
        manifests: Sequence[RankManifest],
        per_rank: list[tuple[int, dict[str, Json]]],
        wanted: set[int],
        rank: int,
        world_size: int,
    ) -> Placement:
        head = manifests[0]
        parts: list[Part] = []
        steps: dict[int, int] = {}
        for q, fields in per_rank:
            members = [int(m) for m in decode_saved(manifests[q], state_id, fields["members"])]
            step_ = int(decode_saved(manifests[q], state_id, fields["step"]))
            here = [m for m in members if m in wanted]
            if not here or step_ < 0 or fields["x"].get("v", 0) is None:
                continue
            for m in here:
                if m in steps:
                    raise CheckpointError(
                        f"state {state_id!r} of row {head.row}: member {m} is in the rollout "
                        f"boundaries of two saved ranks"
                    )
                steps[m] = step_
            parts.append(Part(q, tuple(here)))
        if len(set(steps.values())) > 1:
            raise WorldSizeMismatchError(
                f"state {state_id!r} of row {head.row} was saved by {len(manifests)} ranks "
                f"and this job has {world_size}: its rollout boundaries are at different "
                f"steps for members {steps}"
            )
        order = tuple(m for m in self.members_of(rank, world_size) if m in steps)
        return Placement(state_id, tuple(parts), "boundary", order)


# -- election across world sizes ----------------------------------------------------------------
def elect_any(store: Store, comm: Communicator) -> tuple[int, int] | None:
    """Collective: (row, its world size) of the newest committed row of any world size
    (``election.elect(..., any_world_size=True)``: rows of this job's size are elected as
    always; the coordinator looks for a newer row of another size and broadcasts it).
    Rows marked bad (``io.marks``) are passed over, as ``load`` passes over them."""
    row = elect(store, comm, any_world_size=True, skip=bad_rows(store))
    if row is None:
        return None
    return row, saved_world_size(store, row)


# -- broadcast of replicated states -------------------------------------------------------------
def broadcast_state(comm: Communicator, value: Any, root: int = 0) -> Any:
    """Collective: ``value`` (a decoded state, on ``root`` only) on every rank.

    The tree goes as tagged JSON and the tensors as one raw byte payload; no pickle.
    """
    packed = _pack(value) if comm.rank == root else None
    return send_state(comm, packed, root)


def _pack(value: Any) -> tuple[dict[str, Any], bytes]:
    """A decoded state as a JSON header (tree, leaf dtypes and shapes) and raw bytes."""
    leaves: list[codec.Leaf] = []
    tree = codec.encode(value, leaves)
    staged = [leaf.tensor.detach().cpu().contiguous() for leaf in leaves]
    header = {
        "tree": tree,
        "leaves": [
            [spec_for(t.dtype).name, list(t.shape), leaf.numpy]
            for t, leaf in zip(staged, leaves, strict=True)
        ],
    }
    return header, b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in staged)


def send_state(comm: Communicator, packed: tuple[dict[str, Any], bytes] | None, root: int) -> Any:
    """Collective: the state ``root`` packed, unpacked on every rank (plain transport: the
    packing, which may fail, happened before, in an agreed step)."""
    header, payload = packed if packed is not None else (None, b"")
    header = comm.broadcast(header, root)
    data = comm.broadcast_bytes(payload if comm.rank == root else None, root)
    assert header is not None
    tensors: list[tuple[torch.Tensor, bool]] = []
    offset = 0
    for name, shape, as_numpy in header["leaves"]:
        dtype = torch_dtype(name)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if n:
            raw = torch.frombuffer(bytearray(data[offset : offset + n]), dtype=torch.uint8)
            tensor = raw.view(dtype).reshape(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        tensors.append((tensor, as_numpy))
        offset += n

    def leaf(index: int, as_numpy: bool) -> Any:
        tensor, _ = tensors[index]
        return tensor.numpy() if as_numpy else tensor

    return codec.decode(header["tree"], leaf)


# -- the view a session restores from -----------------------------------------------------------
class MappedView:
    """A row restored through a :class:`MemberMapping`, for rank ``comm.rank`` of M.

    Quacks like :class:`~distckpt.engine.steps.RowView` for the session: ``manifest`` (saved rank
    0's, with every rank's state records), ``metadata`` (saved rank 0's), ``lead_time``,
    ``has_state`` and ``read_state``. Creating one is collective (replicated states are read
    on rank 0 and broadcast then).
    """

    def __init__(
        self,
        store: Store,
        row: int,
        comm: Communicator,
        mapping: MemberMapping | None,
    ) -> None:
        self.store = store
        self.mapping = mapping
        self.rank = comm.rank
        self.world_size = comm.world_size

        def read_row() -> RowStatus:  # every rank reads every manifest of the row (shared)
            status = row_status(store, row)
            if not status.committed or status.world_size is None:
                missing = list(status.missing_ranks)
                raise CheckpointError(f"row {row} is not committed here (missing {missing})")
            return status

        status = step.run(
            comm, step.MEMBERS_OPEN, read_row, context=f"cannot open row {row} of {store.path}"
        )
        assert status is not None and status.world_size is not None
        self.saved: tuple[RankManifest, ...] = status.manifests
        self.saved_world = status.world_size
        records: dict[str, Any] = {}
        for m in self.saved:
            for sid, record in m.states.items():
                records.setdefault(sid, record)
        self.manifest = dataclasses.replace(self.saved[0], states=records)
        self._readers: dict[int, RankReader] = {}
        self._own: RowView | None = None
        if self.saved_world == self.world_size:
            self._own = RowView(store, self.saved[self.rank])
        shared = set(mapping.replicated) if mapping is not None else set()
        if self.saved_world != self.world_size:
            shared |= {sid for sid in records if self._uniform(sid)}
        self._replicated: dict[str, Any] = {}
        for sid in sorted(shared & set(records)):  # the same order on every rank
            self._replicated[sid] = self._broadcast(sid, comm)

    # -- RowView's surface -----------------------------------------------------------------
    @property
    def row(self) -> int:
        return self.manifest.row

    @property
    def metadata(self) -> dict[str, Any]:
        return RowView(self.store, self.saved[0]).metadata

    @property
    def lead_time(self) -> Any:
        return RowView(self.store, self.saved[0]).lead_time

    def has_state(self, state_id: str) -> bool:
        if self._own is not None and state_id not in self._replicated:
            return self._own.has_state(state_id)
        return state_id in self.manifest.states

    def read_state(self, state_id: str) -> Any:
        if state_id in self._replicated:
            return self._replicated[state_id]
        if self._own is not None:
            return restore.read_state(self._own, state_id)
        return self._redistribute(state_id)

    # -- internals -------------------------------------------------------------------------
    def _reader(self, rank: int) -> RankReader:
        """Saved rank ``rank``'s reader: packed entries by their own byte range."""
        if rank not in self._readers:
            m = self.saved[rank]
            self._readers[rank] = RankReader(
                self.store.fs,
                self.store.row_dir(m.row),
                row=m.row,
                rank=m.rank,
                entries=m.arrays,
                store=self.store.path,
                ranged=True,
                data_bytes=m.data_bytes,
            )
        return self._readers[rank]

    def _execute(self, state_id: str, saved: Any) -> Any:
        """Restore ``saved`` (a saved tree of ``state_id``) by executing its load plan."""
        plan = plan_load({state_id: saved}, None)
        ranks = {item.source.rank for item in plan.reads if isinstance(item.source, ArrayRead)}
        readers = {q: self._reader(q) for q in ranks}
        globals_ = RowView(self.store, self.saved[0]).globals_reader
        return restore.build(plan, readers=readers, globals_=globals_)[state_id]

    def _uniform(self, state_id: str) -> bool:
        """Saved alike by every one of several ranks (equal recorded digests), and not
        member-keyed (those are split by member, never copied to every rank)."""
        if self.saved_world < 2 or not saved_alike(self.saved, state_id):
            return False
        per_rank = [fields_of(m.states[state_id].tree) for m in self.saved]
        if any(fields is None for fields in per_rank):  # cannot be member-keyed
            return True
        names = {name for fields in per_rank for name in fields or {}}
        keyed = all(member_keyed(node) for fields in per_rank for node in (fields or {}).values())
        return names != BOUNDARY_FIELDS and not keyed

    def _broadcast(self, state_id: str, comm: Communicator) -> Any:
        def decode() -> tuple[dict[str, Any], bytes] | None:
            if comm.rank != 0:
                return None
            q = next(q for q, m in enumerate(self.saved) if state_id in m.states)
            return _pack(self._execute(state_id, saved_tree({state_id: self.saved[q]})[state_id]))

        packed = step.run(
            comm,
            step.MEMBERS_REPLICATED,
            decode,
            context=f"cannot restore replicated state {state_id!r}",
            fallback=CorruptCheckpointError,
        )
        return send_state(comm, packed, 0)

    def _redistribute(self, state_id: str) -> Any:
        if self.mapping is None:
            raise WorldSizeMismatchError(
                f"state {state_id!r} of row {self.row} of {self.store.path} was saved by "
                f"{self.saved_world} ranks and this job has {self.world_size}: rank-private "
                "state cannot be redistributed; pass a mapping policy "
                "(Checkpoint(..., mapping=distckpt.MemberMapping(nensemble))) if it is keyed "
                "by ensemble member"
            )
        placement = self.mapping.place(state_id, self.saved, self.rank, self.world_size)
        value = self._execute(state_id, mapped_tree(self.saved, placement))
        log.debug("state %r: parts %s", state_id, placement.parts)
        return finish(self.saved, placement, value)


def open_view(
    store: Store, comm: Communicator, mapping: MemberMapping | None
) -> tuple[int, MappedView | None] | None:
    """Collective: the newest committed row and, when it needs one, a mapped view of it.

    The view is None for a row of this job's size without replicated states to broadcast:
    the session then reads this rank's own part as always.
    """
    elected = elect_any(store, comm)
    if elected is None:
        return None
    row, world = elected
    if world == comm.world_size and (mapping is None or not mapping.replicated):
        return row, None
    return row, MappedView(store, row, comm, mapping)


__all__ = ["MappedView", "MemberMapping", "elect_any", "round_robin"]
