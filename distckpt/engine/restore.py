"""Executing a load plan (``plan.load``): every tensor read, verified, then put in place.

Tensors bound for live memory are read straight into it when it is a CPU contiguous tensor
of the same dtype and shape (no allocation, no copy); by default everything a read checks
(byte counts against shapes, byte ranges, file sizes, checksums) is checked first (a
streamed pass through small reused buffers), so a bad row leaves the live state untouched.
Global arrays are read by region: by default verified first (streamed; a DTensor's checksum
blocks each checked by one of the ranks reading them), then read into the live DTensor,
``Sharded`` piece or tensor once every rank verified its part; on object stores through
staging buffers (one GET, verified there); with ``in_place`` straight into the live memory.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch

from distckpt.dist import step
from distckpt.dist.comm import Communicator
from distckpt.engine import steps as engine
from distckpt.errors import CorruptCheckpointError
from distckpt.format.manifest import ArrayEntry
from distckpt.format.shards import Sharded, tiles
from distckpt.io.globalio import GlobalReader, GlobalValue, target_region
from distckpt.io.globalio import fill as fill_region
from distckpt.io.rowio import RankReader, fits_directly
from distckpt.plan.load import (
    ArrayRead,
    BoxRead,
    LoadPlan,
    ReadItem,
    assign,
    at,
    fill_values,
    plan_load,
    saved_tree,
)


def _as_value(read: ArrayRead, tensor: torch.Tensor) -> Any:
    if not read.numpy:
        return tensor
    array = tensor.numpy()
    return array.view(np.dtype(read.np_dtype)) if read.np_dtype is not None else array


def _new_box(read: BoxRead, globals_: GlobalReader) -> torch.Tensor:
    out = torch.empty(read.box.lengths, dtype=read.dtype)
    if read.box.numel:
        globals_.read(read.entry, read.box, out)
    return out


def execute(
    plan: LoadPlan,
    live: Any,
    comm: Communicator,
    *,
    row: int,
    readers: Mapping[int, RankReader],
    globals_: GlobalReader,
    in_place: bool = False,
    replicas: bool = False,
) -> dict[str, Any]:
    """Collective: carry out ``plan`` on ``live`` (None: build the states anew).

    ``replicas``: a global array read whole comes back as a ``Sharded`` replica of all of
    it (saved again, it stays one global array), not as a plain tensor.

    Returns the states built (with ``live=None``; else an empty dict). Two
    agreed steps: read and verify everything not bound for live memory; then fill live
    memory. If any rank fails a step, every rank raises; only with ``in_place`` may a
    failed checksum leave a live tensor holding the row's bytes (reload from another row).
    """
    reads = plan.reads
    where = f"cannot restore row {row}"
    got: dict[int, Any] = {}
    staged: dict[int, torch.Tensor] = {}  # global regions read and verified, not yet live
    checked: set[int] = set()  # global regions verified, filled without their checksums
    direct: dict[int, list[int]] = {}  # saved rank -> reads going straight into live memory
    fresh: dict[int, list[int]] = {}  # saved rank -> reads into new tensors

    # Object stores: a verified load fetches each byte once, verified where it landed, and
    # copies it into place, instead of a checksum pass and a second round of GETs. Tensors
    # of a data array are held as the response bodies (RankReader.verify(hold=True)),
    # others (format 1 files, global regions) staged in new tensors.
    stage = not in_place and globals_.store.fs.stage_verified_reads

    def verify() -> None:
        for i, item in enumerate(reads):
            src = item.source
            if isinstance(src, ArrayRead):
                held = stage and src.entry.ranged
                into_live = item.dest == "live" and not src.numpy and (held or not stage)
                straight = into_live and fits_directly(src.entry, at(live, item.path))
                (direct if straight else fresh).setdefault(src.rank, []).append(i)
            elif item.dest == "live" and isinstance(src, BoxRead) and not in_place:
                if stage:
                    staged[i] = _new_box(src, globals_)
                else:  # streamed, nothing kept; a DTensor's blocks shared among its ranks
                    globals_.verify(src.entry, src.box, tiled=tiles(at(live, item.path)))
                    checked.add(i)
            elif item.dest == "new" and isinstance(src, BoxRead):
                whole = _new_box(src, globals_)
                shape = src.entry.shape
                got[i] = Sharded(whole, shape, (0,) * len(shape)) if replicas else whole
            elif item.dest == "new":
                got[i] = src
        if not in_place:
            # Verify the bytes destined for live tensors first (streamed, nothing kept).
            for rank, mine in direct.items():
                readers[rank].verify_many([_entry(reads[i]) for i in mine], hold=stage)
        for rank, mine in fresh.items():
            tensors = readers[rank].read_many([(_entry(reads[i]), None) for i in mine])
            got.update(zip(mine, tensors, strict=True))

    step.run(comm, step.LOAD_VERIFY, verify, context=where, fallback=CorruptCheckpointError)
    in_live = {i for mine in direct.values() for i in mine}

    def fill() -> None:
        for rank, mine in direct.items():
            jobs = [(_entry(reads[i]), at(live, reads[i].path)) for i in mine]
            readers[rank].read_many(jobs, verified=not in_place)
        with torch.no_grad():
            for i, item in enumerate(reads):
                if item.dest != "live" or i in in_live:
                    continue
                target = at(live, item.path)
                if i in staged:
                    _, _, _, local = target_region(target)
                    if local is not None:
                        local.detach().copy_(staged[i].reshape(local.shape))
                elif isinstance(item.source, BoxRead):
                    value = GlobalValue(item.source.entry, globals_, verified=i in checked)
                    fill_region(target, value)
                else:
                    target.copy_(got.get(i, item.source))

    step.run(comm, step.LOAD_FILL, fill, context=where, fallback=CorruptCheckpointError)
    values = {
        i: _as_value(r.source, got[i]) if isinstance(r.source, ArrayRead) else got[i]
        for i, r in enumerate(reads)
        if i in got
    }
    out: dict[str, Any] = {}
    for update in plan.updates:
        value = fill_values(update.value, values)
        if live is None:
            out[str(update.path[0])] = value
        else:
            assign(live, update.path, value)
    return out


def build(
    plan: LoadPlan, *, readers: Mapping[int, RankReader], globals_: GlobalReader
) -> dict[str, Any]:
    """The states of ``plan`` (planned with ``live=None``), every tensor read and verified
    into a new one. Local, no collective step: one rank restoring what it alone needs (a
    session binding a state); ``readers`` holds a reader for every saved rank it reads."""
    got: dict[int, Any] = {}
    by_rank: dict[int, list[int]] = {}
    for i, item in enumerate(plan.reads):
        src = item.source
        if isinstance(src, ArrayRead):
            by_rank.setdefault(src.rank, []).append(i)
        elif isinstance(src, BoxRead):
            got[i] = _new_box(src, globals_)
        else:
            got[i] = src
    for rank, mine in by_rank.items():
        tensors = readers[rank].read_many([(_entry(plan.reads[i]), None) for i in mine])
        got.update(zip(mine, tensors, strict=True))
    values = {
        i: _as_value(r.source, got[i]) if isinstance(r.source, ArrayRead) else got[i]
        for i, r in enumerate(plan.reads)
    }
    return {str(u.path[0]): fill_values(u.value, values) for u in plan.updates}


def read_state(view: engine.RowView, state_id: str) -> Any:
    """One saved state of ``view``'s part, restored by executing its plan (local)."""
    plan = plan_load(saved_tree({state_id: view.manifest}), None)
    readers = {view.rank: view.reader}
    return build(plan, readers=readers, globals_=view.globals_reader)[state_id]


def _entry(item: ReadItem) -> ArrayEntry:
    assert isinstance(item.source, ArrayRead)
    return item.source.entry


def read_part(
    view: engine.RowView,
    comm: Communicator,
    only: Collection[str] | None = None,
    *,
    replicas: bool = False,
) -> dict[str, Any]:
    """Collective: the saved states of ``view`` (those in ``only`` that it has) read into
    new tensors, global arrays whole (see :func:`execute` for ``replicas``)."""
    wanted = [sid for sid in view.manifest.states if only is None or sid in only]
    plan = step.run(
        comm,
        step.LOAD_READ,
        lambda: plan_load(saved_tree(dict.fromkeys(wanted, view.manifest)), None),
        context=f"cannot restore row {view.row}",
        fallback=CorruptCheckpointError,
    )
    readers = {view.rank: view.reader}
    return execute(
        plan,
        None,
        comm,
        row=view.row,
        readers=readers,
        globals_=view.globals_reader,
        replicas=replicas,
    )
