"""The collective steps of saving and restoring a row, shared by both public APIs.

Every rank calls these in the same order. Each rank's failure is exchanged so that all ranks
raise together instead of one raising while the others wait forever.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container
from dataclasses import dataclass, field
from typing import Any

import torch

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.dist.election import committed_rows_offline, elect, row_status
from distckpt.dist.retention import RetentionPolicy, rows_to_delete
from distckpt.engine import hooks
from distckpt.errors import (
    CheckpointError,
    CheckpointSerializationError,
    CheckpointWriteError,
    CorruptCheckpointError,
    LeaseHeldError,
    NoCommittedRowError,
    WorldSizeMismatchError,
)
from distckpt.faults import fault_point
from distckpt.format import tree as codec
from distckpt.format.layout import SHARED_MANIFEST_VERSION, shared_length
from distckpt.format.manifest import InvalidManifest, RankManifest, StateRecord
from distckpt.io import globalio
from distckpt.io.commit import (
    DataShape,
    RankWrite,
    open_row_here,
    prepare_row,
    publish_index,
    publish_rank,
    retract_rank,
    seal_row,
    write_rank,
)
from distckpt.io.dataio import bound_bytes, build_index
from distckpt.io.digests import state_digests
from distckpt.io.globalio import GlobalReader, GlobalValue, box_report, shard_report
from distckpt.io.marks import bad_rows
from distckpt.io.removal import remove_index, remove_own_part, remove_row_rest
from distckpt.io.rowio import RankReader
from distckpt.logs import get_logger
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD, RankPlan, plan_rank
from distckpt.storage import lease
from distckpt.storage.store import Store, utcnow

log = get_logger(__name__)

# Every rank's boxes of every global tensor, when the ranks' even splits differ.
SAVE_BOXES = step.register("save.boxes")
# Retention's steps after the coordinator named the rows (``step.SAVE_RETAIN``).
RETAIN_OWN = step.register("save.retain_own")  # every rank removes its part of each row
RETAIN_REST = step.register("save.retain_rest")  # the coordinator removes what is left


@dataclass(frozen=True)
class RowContent:
    """What one rank wants in a row besides its tensors' bytes."""

    states: dict[str, Any]
    schemas: dict[str, StateSchema]
    metadata: dict[str, Any]
    write_count: int = 0
    lead_time: Any = None
    level: int | None = None
    versions: dict[str, int] = field(default_factory=dict)  # user versions of unbound states


@dataclass(frozen=True)
class StateSchema:
    """What a bound state promises about its shape: checked before it is restored."""

    digest: str
    version: int
    fields: dict[str, str]


def _record(
    tree: Any, schema: StateSchema | None, version: int = 0, digest: str | None = None
) -> StateRecord:
    if schema is None:
        return StateRecord(tree, version=version, digest=digest)
    return StateRecord(tree, schema.digest, schema.version, dict(schema.fields), digest)


def build_manifest(
    plan: RankPlan,
    written: RankWrite,
    content: RowContent,
    *,
    world_size: int,
    name: str = "",
    created: str | None = None,
) -> RankManifest:
    """The one builder of a rank's complete manifest, from its plan and what writing the
    plan produced (array and global entries, with checksums).

    Each state's record carries its schema, user version and digest; the digest (states
    equal on every rank may be restored at another world size, see ``redistribute``) comes
    from the checksums the write computed, so no tensor is read twice.
    """
    digests = state_digests(plan, [a.crc32c for a in written.arrays])
    states = {
        sid: _record(tree, content.schemas.get(sid), content.versions.get(sid, 0), digests[sid])
        for sid, tree in plan.states.items()
    }
    lead = None if content.lead_time is None else {"lead_time": content.lead_time}
    return RankManifest(
        row=written.row,
        rank=written.rank,
        world_size=world_size,
        write_count=content.write_count,
        created=utcnow() if created is None else created,
        name=name,
        level=content.level,
        lead_time=None if lead is None else codec.encode_metadata(lead),
        arrays=written.arrays,
        states=states,
        metadata=codec.encode_metadata(content.metadata),
        globals=written.globals,
        format=SHARED_MANIFEST_VERSION,
        data_bytes=written.data_bytes,
    )


def writer_lease(store: Store, comm: Communicator, name: str = "") -> lease.Lease | None:
    """Collective: create the store and take this process's writer lease on it (the
    coordinator's; other ranks get None), before any state is staged or written.

    The caller holds the returned lease and passes it to :func:`save_row`. A second job is
    refused here on every rank: ``LeaseHeldError`` naming the holder (on the coordinator,
    the lease's own error, with its ``holder``).
    """
    held: list[lease.Lease] = []

    def take() -> None:
        store.create(name)
        held.append(lease.hold(store))

    try:
        step.decide(
            comm,
            step.SAVE_LEASE,
            take,
            context=f"cannot write to {store.path}",
            fallback=CheckpointWriteError,
        )
    except CheckpointError as exc:
        own = exc.__cause__
        if isinstance(own, LeaseHeldError):
            raise own from None  # the holder, as a field
        raise
    return held[0] if held else None


def plan_row(
    comm: Communicator,
    content: RowContent,
    *,
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    plan: RankPlan | None = None,
) -> RankPlan:
    """Collective: this rank's plan of a row (``plan`` when one was made already), with its
    metadata checked; a value that cannot be stored fails here on every rank, before
    anything touches the disk."""

    def prepare() -> RankPlan:
        made = (
            plan
            if plan is not None
            else plan_rank(content.states, rank=comm.rank, pack_threshold=pack_threshold)
        )
        codec.encode_metadata(content.metadata)
        if content.lead_time is not None:
            codec.encode_metadata({"lead_time": content.lead_time})
        return made

    return step.run(
        comm,
        step.SAVE_PLAN,
        prepare,
        context="cannot save",
        fallback=CheckpointSerializationError,
    )


def save_row(
    store: Store,
    comm: Communicator,
    content: RowContent,
    *,
    row: int | None = None,
    name: str = "",
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    checksums: bool = True,
    plan: RankPlan | None = None,
    guard: lease.Lease | None = None,
    agreed: bool = False,
) -> RankManifest:
    """Collective: write this rank's part of a new row and commit it. Returns its manifest.

    ``plan`` is a plan already made (and staged) from ``content.states``, by an
    asynchronous writer; ``agreed`` says every rank already passed :func:`plan_row` with it
    (``distckpt.save``), so the plan step is not run twice; ``checksums=False`` records no
    crc32c for the row's tensors.
    ``guard`` is the coordinator's writer lease (:func:`writer_lease`), renewed here; a
    caller without one (an offline tool) has this process's lease taken here.

    Four agreed steps, so no rank is left waiting when another fails: plan (nothing touches
    the disk if any rank's state cannot be stored), open the row, write data then manifest,
    and agree on success. If any rank failed, every rank raises; ranks that had published
    retract their manifests, so the row never looks committed.
    """

    if not agreed or plan is None:
        plan = plan_row(comm, content, pack_threshold=pack_threshold, plan=plan)
    # Global (sharded) tensors: every rank decides the same chunk writers from all boxes,
    # and refuses the same overlaps or gaps, so no agreement step is needed after this one.
    made = plan
    rank, world = comm.rank, comm.world_size
    gathered = step.gather(
        comm, step.SAVE_SHARDS, lambda: (shard_report(made, rank, world), bound_bytes(made))
    )
    layouts = globalio.layouts([report for report, _ in gathered], made, rank, world)
    if layouts is None:  # some tensor is split evenly on some ranks only: every box, then
        boxes = step.gather(comm, SAVE_BOXES, lambda: box_report(made))
        layouts = globalio.layouts_of_boxes(boxes) if any(boxes) else {}
    # The row's data array: one shard per rank, as long as the largest rank's bound.
    data = DataShape(comm.world_size, *shared_length(max(bound for _, bound in gathered)))

    def allocate() -> int:
        existing = store.rows()
        newest = existing[-1] if existing else -1
        chosen = newest + 1 if row is None else row
        if chosen <= newest:
            raise CheckpointWriteError(
                f"row {chosen} is not newer than row {newest} in {store.path}; rows are "
                "never rewritten in place"
            )
        prepare_row(store, chosen, data)
        return chosen

    def open_row() -> int:
        store.create(name)
        # One writing job per store: the lease must still be ours (LeaseLostError if a
        # takeover happened since it was taken), refused on every rank otherwise. The row
        # id is chosen and its directory made inside the lease's critical section, after
        # checking the lease is still ours: two writers (a takeover by a second job step
        # of the same allocation) are never given the same row.
        held = lease.hold(store) if guard is None else guard
        if guard is not None:
            guard.refresh()
        return held.critical(allocate)

    where = f"cannot start a row in {store.path}"
    chosen = int(
        step.decide(comm, step.SAVE_OPEN, open_row, context=where, fallback=CheckpointWriteError)
    )

    made_here: list[bool] = []  # this rank made the row's directories (node-local storage)

    def open_local() -> None:
        if not comm.is_coordinator:
            # Node-local storage: this rank's directory tree may not be the coordinator's.
            made_here.append(open_row_here(store, chosen, name, data))

    step.run(comm, step.SAVE_OPEN_LOCAL, open_local, context=where, fallback=CheckpointWriteError)

    published: list[RankManifest] = []
    publishing: list[bool] = []  # the publish began: the manifest may be there

    def write() -> None:
        try:
            written = write_rank(store, made, chosen, comm.rank, layouts, data, checksums=checksums)
            built = build_manifest(made, written, content, world_size=comm.world_size, name=name)
            publishing.append(True)
            publish_rank(store, written, built)
            published.append(built)
            if any(made_here):
                seal_row(store, chosen)  # its own tree: nobody else fsyncs it
        except Exception as exc:
            log.error("rank %d failed to write row %d: %s", comm.rank, chosen, exc)
            raise

    try:
        step.run(
            comm,
            step.SAVE_COMMIT,
            write,
            context=f"row {chosen} of {store.path} was not committed",
            fallback=CheckpointWriteError,
        )
    except CheckpointError as failed:
        # All or none: every rank whose manifest may be visible withdraws it, including a
        # rank whose own publish raised after the rename (EIO on the directory's fsync),
        # so the row the save reports as not committed is never elected.
        if publishing:
            try:
                retract_rank(store, chosen, comm.rank)
            except CheckpointError as exc:
                failed.add_note(str(exc))
        raise
    manifest = published[0]
    if comm.is_coordinator:
        # Every rank's manifest is published: the row index says so in one object. The row
        # counts without it (readers fall back to the manifests), so a failure only warns.
        index = build_index(chosen, comm.world_size, content.write_count, layouts)
        try:
            seal_row(store, chosen)
            publish_index(store, index)
        except (OSError, CheckpointError) as exc:
            log.warning("row %d of %s: no row index written: %s", chosen, store.path, exc)
    fault_point("after_commit", rank=comm.rank, row=chosen)
    return manifest


def commit_row(
    store: Store,
    comm: Communicator,
    content: RowContent,
    *,
    retention: RetentionPolicy | None,
    guard: lease.Lease | None,
    row: int | None = None,
    name: str = "",
    pack_threshold: int = DEFAULT_PACK_THRESHOLD,
    checksums: bool = True,
    plan: RankPlan | None = None,
    agreed: bool = False,
) -> RankManifest:
    """Collective: the one "commit, then retention" of every writer (``save``,
    ``AsyncSaver``, ``Checkpoint`` sessions, synchronous or not).

    Commits the row (:func:`save_row`), deletes the rows ``retention`` does not preserve
    (None: deletes nothing), then announces :class:`hooks.Committed` to subscribers.
    """
    manifest = save_row(
        store,
        comm,
        content,
        row=row,
        name=name,
        pack_threshold=pack_threshold,
        checksums=checksums,
        plan=plan,
        guard=guard,
        agreed=agreed,
    )
    if retention is not None:
        prune(store, comm, retention)
    hooks.announce_commit(hooks.Committed(store, manifest.row, comm))
    return manifest


def choose_row(
    store: Store,
    comm: Communicator,
    row: int | None,
    *,
    any_world_size: bool = False,
    skip: Container[int] | None = None,
) -> int:
    """Collective: the elected row, or check that an explicitly named row is committed.

    The election passes over the rows in ``skip`` (default: the rows marked bad, see
    ``io.marks``); a row named explicitly is checked whatever its mark.

    With ``any_world_size`` a row written by another number of ranks counts when all of
    its manifests are present and valid (checked by the coordinator on a shared store);
    without it such a row is refused with ``WorldSizeMismatchError``.
    """
    if row is None:
        passed = bad_rows(store) if skip is None else skip
        elected = elect(store, comm, any_world_size=any_world_size, skip=passed)
        if elected is None:
            raise _nothing_to_restore(store, comm.world_size)
        return elected

    def check() -> dict[str, Any] | None:
        try:
            manifest = store.read_manifest(row, comm.rank)
        except InvalidManifest as exc:
            return {"invalid": str(exc)}
        return {"size": manifest.world_size} if manifest.world_size != comm.world_size else None

    reports = step.gather(comm, step.LOAD_CHECK_ROW, check, context=f"cannot check row {row}")
    if all(r is None for r in reports):
        return row
    if any_world_size:
        return _check_any_size(store, comm, row)
    sizes = {r["size"] for r in reports if r is not None and "size" in r}
    if sizes:
        raise WorldSizeMismatchError(
            f"row {row} of {store.path} was written by {sorted(sizes)[0]} ranks; this job has "
            f"{comm.world_size}"
        )
    invalid = "; ".join(
        f"rank {rank}: {r['invalid']}" for rank, r in enumerate(reports) if r is not None
    )
    raise NoCommittedRowError(f"row {row} is not committed: {invalid}")


def _check_any_size(store: Store, comm: Communicator, row: int) -> int:
    """Collective: the coordinator reads every manifest of ``row``; all ranks agree."""

    def verdict() -> str | None:
        status = row_status(store, row)
        if status.committed:
            return None
        missing = ", ".join(str(r) for r in status.missing_ranks) or "none"
        return f"missing ranks: {missing}; " + "; ".join(status.problems)

    why = step.decide(
        comm,
        step.LOAD_CHECK_ANY_SIZE,
        verdict,
        context=f"row {row} of {store.path} is not committed",
        fallback=NoCommittedRowError,
    )
    if why is not None:
        raise NoCommittedRowError(f"row {row} of {store.path} is not committed: {why}")
    return row


def _nothing_to_restore(store: Store, world_size: int) -> CheckpointError:
    """Say whether rows exist at another world size: that is a different fix for the user."""
    try:
        others = [s for s in committed_rows_offline(store) if s.world_size != world_size]
    except CheckpointError:
        others = []
    if others:
        newest = others[-1]
        return WorldSizeMismatchError(
            f"no row of {store.path} was committed by all {world_size} ranks of this job; "
            f"row {newest.row} was committed by {newest.world_size} ranks (restoring "
            f"rank-private state at another world size is not supported)"
        )
    return NoCommittedRowError(f"no row of {store.path} was committed by all ranks")


class RowView:
    """One rank's committed part of a row: manifest, decoded states, verified tensors."""

    def __init__(self, store: Store, manifest: RankManifest) -> None:
        self.store = store
        self.manifest = manifest
        files = store.fs.open_reads()  # one open per data file for both readers
        self._globals = GlobalReader(store, manifest.row, manifest.world_size, files=files)
        self._reader = RankReader(
            store.fs,
            store.row_dir(manifest.row),
            row=manifest.row,
            rank=manifest.rank,
            entries=manifest.arrays,
            store=store.path,
            files=files,
            data_bytes=manifest.data_bytes,
        )

    @property
    def row(self) -> int:
        return self.manifest.row

    @property
    def rank(self) -> int:
        """The saved rank whose part this is (not necessarily the reading rank)."""
        return self.manifest.rank

    @property
    def saved_world_size(self) -> int:
        return self.manifest.world_size

    @property
    def reader(self) -> RankReader:
        return self._reader

    @property
    def globals_reader(self) -> GlobalReader:
        return self._globals

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
        """Decode a state, reading and verifying its tensors (they arrive on the CPU).

        Global (sharded) tensors come back as ``GlobalValue``s, read later by region.
        """
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

        def shard(index: int) -> GlobalValue:
            if not 0 <= index < len(self.manifest.globals):
                raise CorruptCheckpointError(
                    f"row {self.row}, rank {self.manifest.rank}: state {state_id!r} refers to "
                    f"missing global array {index}"
                )
            return GlobalValue(self.manifest.globals[index], self._globals)

        return codec.decode(record.tree, leaf, shard)


def open_row(
    store: Store, comm: Communicator, row: int | None = None, *, any_world_size: bool = False
) -> RowView:
    """Collective: elect (or check) a row and open this rank's part of it.

    With ``any_world_size`` the row may have been written by N ranks while this job has M:
    a rank below N opens its own part, a rank at or above N opens part ``rank % N`` (check
    ``view.rank``); :func:`open_rank` opens any other part.
    """
    chosen = choose_row(store, comm, row, any_world_size=any_world_size)
    return open_part(store, chosen, comm.rank)


def open_part(store: Store, row: int, rank: int) -> RowView:
    """Part ``rank`` of a chosen row, or part ``rank % N`` when the row has N <= rank ranks."""
    try:
        return RowView(store, store.read_manifest(row, rank))
    except InvalidManifest:
        return open_rank(store, row, rank % saved_world_size(store, row))


def open_rank(store: Store, row: int, rank: int) -> RowView:
    """Open saved rank ``rank``'s part of ``row`` (any rank of the row, from any job)."""
    try:
        return RowView(store, store.read_manifest(row, rank))
    except InvalidManifest as exc:
        raise CorruptCheckpointError(
            f"row {row} of {store.path} has no valid part for saved rank {rank}: {exc}"
        ) from exc


def saved_world_size(store: Store, row: int) -> int:
    """How many ranks wrote ``row``, from the first valid manifest found."""
    for rank in store.manifest_ranks(row):
        try:
            return store.read_manifest(row, rank).world_size
        except InvalidManifest:
            continue
    raise NoCommittedRowError(f"row {row} of {store.path} has no valid manifest")


def read_all(
    view: RowView, comm: Communicator, only: Collection[str] | None = None
) -> dict[str, Any]:
    """Collective: decode every state of this rank (or those in ``only`` that the row has);
    all ranks raise if any rank failed."""

    def read() -> dict[str, Any]:
        return {
            state_id: view.read_state(state_id)
            for state_id in view.manifest.states
            if only is None or state_id in only
        }

    return step.run(
        comm,
        step.LOAD_READ,
        read,
        context=f"cannot restore row {view.row}",
        fallback=CorruptCheckpointError,
    )


def prune(store: Store, comm: Communicator, keep: int | RetentionPolicy | None) -> None:
    """Collective: delete the rows retention gives up (those the policy ``keep`` does not
    preserve, an int meaning the newest N; see ``rows_to_delete``), spread over the ranks.

    The coordinator names the rows; every rank removes its own part of each (manifest
    first, so the row stops counting, then its data), all at once; then the coordinator
    removes what is left (documents, emptied directories, parts of ranks that are gone).
    No rank waits for one client to unlink every file of a row. Every rank raises if any
    part failed (the new row stays committed; what is left is garbage the next prune
    removes).
    """
    where = f"cannot delete old rows of {store.path}"

    def choose() -> list[int]:
        doomed = rows_to_delete(store, keep, bad=bad_rows(store))
        for row in doomed:
            remove_index(store, row)  # the fast path goes first; manifests follow
        return doomed

    doomed = [int(r) for r in step.decide(comm, step.SAVE_RETAIN, choose, context=where)]
    if not doomed:
        return

    def own() -> None:
        for row in doomed:
            remove_own_part(store, row, comm.rank)

    step.run(comm, RETAIN_OWN, own, context=where)

    def rest() -> None:
        if not comm.is_coordinator:
            return
        for row in doomed:
            log.info("deleting row %d of %s", row, store.path)
            remove_row_rest(store, row)

    step.run(comm, RETAIN_REST, rest, context=where)
