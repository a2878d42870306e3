"""Reading one rank's part of a row for ``load``: all tensors at once, on a few threads,
optionally straight into the live tensors' memory.

The trees are first decoded with shape-only stand-ins, so each saved tensor can be paired
with the live tensor it will fill before any byte is read; then every tensor is read (one
file's ``preadv`` overlapping another's checksum) and the trees are decoded for real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distckpt.dist.comm import Communicator
from distckpt.engine import steps as engine
from distckpt.errors import CheckpointError, CorruptCheckpointError
from distckpt.format import tree as codec
from distckpt.format.dtypes import torch_dtype
from distckpt.io.rowio import fits_directly


def _stand_ins(view: engine.RowView) -> tuple[dict[str, Any], dict[int, int], set[int]]:
    """The row's states with each tensor replaced by a ``meta`` tensor of its shape and
    dtype (nothing read), ``id(stand-in) -> leaf index``, and every leaf index used."""
    arrays = view.manifest.arrays
    index_of: dict[int, int] = {}
    used: set[int] = set()

    def leaf(index: int, as_numpy: bool) -> Any:
        if not 0 <= index < len(arrays):
            raise CorruptCheckpointError(
                f"row {view.row}, rank {view.manifest.rank}: a state refers to missing "
                f"array {index}"
            )
        used.add(index)
        if as_numpy:
            return np.zeros(0, dtype=np.int64)
        entry = arrays[index]
        meta = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype), device="meta")
        index_of[id(meta)] = index
        return meta

    trees = {sid: codec.decode(rec.tree, leaf) for sid, rec in view.manifest.states.items()}
    return trees, index_of, used


def _pair(live: Any, saved: Any, index_of: dict[int, int], out: dict[int, torch.Tensor]) -> None:
    """Record which live tensor each saved tensor will be copied into (as ``api._merge``)."""
    if isinstance(saved, torch.Tensor):
        if isinstance(live, torch.Tensor) and id(saved) in index_of:
            out[index_of[id(saved)]] = live
        return
    if isinstance(live, dict) and isinstance(saved, dict):
        for key, value in saved.items():
            if key in live:
                _pair(live[key], value, index_of, out)
    elif isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        for lv, sv in zip(live, saved, strict=True):
            _pair(lv, sv, index_of, out)


def _agree(comm: Communicator, view: engine.RowView, failure: CheckpointError | None) -> None:
    """Collective: every rank raises if any failed (a damaged chunk's fields kept)."""
    engine.agree_or_raise(comm, failure, CorruptCheckpointError, f"cannot restore row {view.row}")


def read_for_load(
    view: engine.RowView,
    comm: Communicator,
    live: dict[str, Any],
    *,
    in_place: bool,
    check: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Collective: this rank's saved states, every tensor read and verified.

    ``check`` raises (on every rank, it agrees) if the saved structure does not fit ``live``;
    it runs on the stand-ins, before any byte is read. A saved tensor whose live
    counterpart is a CPU contiguous tensor of the same dtype and shape is read straight
    into it (no allocation, no copy), and the returned tree holds that live tensor itself;
    others come back in fresh tensors. By default every checksum is verified before any
    live tensor is written (a streamed first pass over the files, through small reused
    buffers). With ``in_place``, bytes are verified as they land instead (one pass): if a
    checksum fails, every rank raises and such live tensors may hold the row's bytes (or
    part of them): reload from another row.
    """
    problem: CheckpointError | None = None
    stand_ins: dict[str, Any] = {}
    index_of: dict[int, int] = {}
    used: set[int] = set()
    try:
        stand_ins, index_of, used = _stand_ins(view)
    except CheckpointError as exc:
        problem = engine.restore_failure(exc)
    _agree(comm, view, problem)
    check(stand_ins)
    targets: dict[int, torch.Tensor] = {}
    _pair(live, stand_ins, index_of, targets)
    arrays = view.manifest.arrays
    needed = sorted(used)
    direct = [i for i in needed if i in targets and fits_directly(arrays[i], targets[i])]
    in_live = set(direct)
    fresh = [i for i in needed if i not in in_live]
    got: dict[int, torch.Tensor] = {}
    reader = view.reader
    try:
        if not in_place:
            # Verify the bytes destined for live tensors first (streamed, nothing kept),
            # and read the others into fresh tensors; only then fill live memory.
            reader.verify_many([arrays[i] for i in direct])
        got.update(zip(fresh, reader.read_many([(arrays[i], None) for i in fresh]), strict=True))
    except CheckpointError as exc:
        problem = engine.restore_failure(exc)
    _agree(comm, view, problem)
    try:
        jobs = [(arrays[i], targets[i]) for i in direct]
        got.update(zip(direct, reader.read_many(jobs, verified=not in_place), strict=True))
    except CheckpointError as exc:
        problem = engine.restore_failure(exc)
    _agree(comm, view, problem)

    def leaf(index: int, as_numpy: bool) -> Any:
        tensor = got[index]
        return tensor.numpy() if as_numpy else tensor

    return {sid: codec.decode(rec.tree, leaf) for sid, rec in view.manifest.states.items()}
