"""The collective steps of saving and restoring a row, shared by both public APIs.

Every rank calls these in the same order. Each rank's failure is exchanged so that all ranks
raise together instead of one raising while the others wait forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import codec
from .comm import Communicator
from .commit import commit_rank, delete_row, prepare_row, retract_rank
from .election import elect
from .errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NoCommittedRowError,
    WorldSizeMismatchError,
)
from .manifest import InvalidManifest, RankManifest, StateRecord
from .plan import DEFAULT_PACK_THRESHOLD, plan_rank
from .rowio import RankReader
from .store import Store, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowContent:
    """What one rank wants in a row besides its tensors' bytes."""

    states: dict[str, Any]
    schemas: dict[str, tuple[str | None, int]]  # state id -> (schema hash, version)
    metadata: dict[str, Any]
    write_count: int = 0
    lead_time: Any = None
    level: int | None = None


def _agree(comm: Communicator, error: str | None) -> list[tuple[int, str]]:
    """Exchange per-rank errors; every rank gets the same list of (rank, message)."""
    reports = comm.allgather(error)
    return [(rank, msg) for rank, msg in enumerate(reports) if msg is not None]


def _describe(failures: list[tuple[int, str]]) -> str:
    return "; ".join(f"rank {rank}: {msg}" for rank, msg in failures)


def save_row(
    store: Store,
    comm: Communicator,
    content: RowContent,
    *,
    row: int | None = None,
    name: str = "",
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
) -> RankManifest:
    """Collective: write this rank's part of a new row and commit it. Returns its manifest.

    Raises CheckpointWriteError on every rank if any rank failed; the row is then not
    committed (failed ranks never published, the others retract their manifests).
    """
    setup: dict[str, Any] = {}
    if comm.is_coordinator:
        try:
            store.create(name)
            existing = store.rows()
            newest = existing[-1] if existing else -1
            chosen = newest + 1 if row is None else row
            if chosen <= newest:
                raise CheckpointError(
                    f"row {chosen} is not newer than row {newest} in {store.path}; rows are "
                    "never rewritten in place"
                )
            prepare_row(store, chosen)
            setup = {"row": chosen}
        except (CheckpointError, OSError) as exc:
            setup = {"error": str(exc)}
    setup = comm.broadcast(setup)
    if "error" in setup:
        raise CheckpointWriteError(f"cannot start a row in {store.path}: {setup['error']}")
    chosen = int(setup["row"])

    error: str | None = None
    manifest: RankManifest | None = None
    try:
        plan = plan_rank(content.states, rank=comm.rank, pack_threshold=pack_threshold)
        states = {
            sid: StateRecord(tree, *content.schemas.get(sid, (None, 0)))
            for sid, tree in plan.states.items()
        }
        draft = RankManifest(
            row=chosen,
            rank=comm.rank,
            world_size=comm.world_size,
            write_count=content.write_count,
            created=utcnow(),
            name=name,
            level=content.level,
            lead_time=None
            if content.lead_time is None
            else codec.encode_metadata({"lead_time": content.lead_time}),
            states=states,
            metadata=codec.encode_metadata(content.metadata),
        )
        manifest = commit_rank(store, plan, draft)
    except (CheckpointError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("rank %d failed to write row %d: %s", comm.rank, chosen, error)
    failures = _agree(comm, error)
    if failures:
        if manifest is not None:
            retract_rank(store, chosen, comm.rank)
        raise CheckpointWriteError(
            f"row {chosen} of {store.path} was not committed: {_describe(failures)}"
        )
    assert manifest is not None
    return manifest


def choose_row(store: Store, comm: Communicator, row: int | None) -> int:
    """Collective: the elected row, or check that an explicitly named row is committed."""
    if row is None:
        elected = elect(store, comm)
        if elected is None:
            raise NoCommittedRowError(f"no row of {store.path} was committed by all ranks")
        return elected
    problem: str | None = None
    try:
        manifest = store.read_manifest(row, comm.rank)
        if manifest.world_size != comm.world_size:
            problem = (
                f"row {row} was written by {manifest.world_size} ranks; this job has "
                f"{comm.world_size}"
            )
    except InvalidManifest as exc:
        problem = f"row {row} is not committed: {exc}"
    failures = _agree(comm, problem)
    if failures:
        kind = (
            WorldSizeMismatchError
            if all("ranks; this job has" in m for _, m in failures)
            else NoCommittedRowError
        )
        raise kind(f"{store.path}: {_describe(failures)}")
    return row


class RowView:
    """One rank's committed part of a row: manifest, decoded states, verified tensors."""

    def __init__(self, store: Store, manifest: RankManifest) -> None:
        self.store = store
        self.manifest = manifest
        self._reader = RankReader(
            store.fs, store.row_dir(manifest.row), row=manifest.row, rank=manifest.rank
        )

    @property
    def row(self) -> int:
        return self.manifest.row

    @property
    def metadata(self) -> dict[str, Any]:
        return codec.decode_metadata(self.manifest.metadata)

    @property
    def lead_time(self) -> Any:
        if self.manifest.lead_time is None:
            return None
        return codec.decode_metadata(self.manifest.lead_time).get("lead_time")

    def has_state(self, state_id: str) -> bool:
        return state_id in self.manifest.states

    def read_state(
        self, state_id: str, place: Callable[[torch.Tensor, bool], Any] | None = None
    ) -> Any:
        """Decode a state, reading and verifying its tensors (they arrive on the CPU)."""
        record = self.manifest.states[state_id]

        def leaf(index: int, as_numpy: bool) -> Any:
            if not 0 <= index < len(self.manifest.arrays):
                raise CorruptCheckpointError(
                    f"row {self.row}, rank {self.manifest.rank}: state {state_id!r} refers to "
                    f"missing array {index}"
                )
            tensor = self._reader.read(self.manifest.arrays[index])
            if place is not None:
                return place(tensor, as_numpy)
            return tensor.numpy() if as_numpy else tensor

        return codec.decode(record.tree, leaf)


def open_row(store: Store, comm: Communicator, row: int | None = None) -> RowView:
    """Collective: elect (or check) a row and open this rank's part of it."""
    chosen = choose_row(store, comm, row)
    return RowView(store, store.read_manifest(chosen, comm.rank))


def read_all(view: RowView, comm: Communicator) -> dict[str, Any]:
    """Collective: decode every state of this rank; all ranks raise if any rank failed."""
    out: dict[str, Any] = {}
    error: str | None = None
    try:
        for state_id in view.manifest.states:
            out[state_id] = view.read_state(state_id)
    except CheckpointError as exc:
        error = str(exc)
    failures = _agree(comm, error)
    if failures:
        raise CorruptCheckpointError(f"cannot restore row {view.row}: {_describe(failures)}")
    return out


def prune(store: Store, comm: Communicator, doomed: list[int]) -> None:
    """Coordinator deletes ``doomed`` rows (manifests first); others return at once."""
    if not comm.is_coordinator:
        return
    for row in doomed:
        log.info("deleting row %d of %s", row, store.path)
        delete_row(store, row)
