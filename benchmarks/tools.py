"""The checkpointing tools under comparison, behind one interface.

Each tool saves one rank's flat ``{name: tensor}`` dict into a directory shared by all ranks
and restores it into preallocated tensors. ``before_save``/``after_save`` hold untimed setup
and teardown; ``save``/``load`` are what the harness times. Every durable tool fsyncs its
data files and the directories that name them before ``save`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any

import torch

from .common import Ctx, byte_view, count_files, remove_tree

State = dict[str, torch.Tensor]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tool:
    name = "?"
    durable: bool | None = True
    can_load = True

    def before_save(self, ctx: Ctx, path: str, state: State) -> None:
        """Untimed, on every rank, before the timed save."""

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        raise NotImplementedError

    def after_save(self, ctx: Ctx, path: str) -> None:
        """Untimed, on every rank, after the timed save."""

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        raise NotImplementedError

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        """(files written by this rank, files in the whole directory)."""
        raise NotImplementedError

    def cleanup(self, ctx: Ctx, path: str) -> None:
        """Collective: delete the directory (rank 0), untimed."""
        ctx.barrier()
        if ctx.rank == 0:
            remove_tree(path)
        ctx.barrier()


class Distckpt(Tool):
    """distckpt.save / distckpt.load (collective over the job's process group).

    Steady state of a training loop: the store exists and the job holds its writer lease
    before the timed save (creating the store and taking the lease happen once per job).
    Variants: ``in_place`` loads with ``load(in_place=True)`` (straight into the targets),
    ``checksums=False`` saves without crc32c (and so loads without verification).
    """

    def __init__(
        self, name: str = "distckpt", *, in_place: bool = False, checksums: bool = True
    ) -> None:
        self.name = name
        self.in_place = in_place
        self.checksums = checksums

    def before_save(self, ctx: Ctx, path: str, state: State) -> None:
        if ctx.rank == 0:
            from distckpt.storage import lease as lease
            from distckpt.storage.store import Store

            store = Store(path)
            store.create()
            lease.hold(store)

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        import distckpt

        distckpt.save(state, path, checksums=self.checksums)

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        import distckpt

        distckpt.load(targets, path, in_place=self.in_place)

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        from distckpt.storage.store import Store

        store = Store(path)
        row = store.rows()[-1]
        own = int(os.path.exists(store.data_file(row, ctx.rank)))
        return own + 1, count_files(path)  # its shard of the row's data array + its manifest

    def cleanup(self, ctx: Ctx, path: str) -> None:
        if ctx.rank == 0:
            from distckpt.storage import lease as lease

            lease.release(path)
        super().cleanup(ctx, path)


def distckpt_variants() -> list[Tool]:
    """distckpt as saved and loaded by default, loading in place, and without checksums."""
    return [
        Distckpt(),
        Distckpt("distckpt in-place", in_place=True),
        Distckpt("distckpt crc off", checksums=False),
    ]


class Raw(Tool):
    """The floor: one file per tensor, os.write straight from tensor memory, fsync each
    file, then fsync the directories; read back with preadv into the target tensors."""

    name = "raw"

    def _dir(self, ctx: Ctx, path: str) -> str:
        return os.path.join(path, f"rank_{ctx.rank:06d}")

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        d = self._dir(ctx, path)
        os.makedirs(d, exist_ok=True)
        for i, t in enumerate(state.values()):
            view = byte_view(t)
            fd = os.open(os.path.join(d, f"{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)
        _fsync_dir(path)

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        d = self._dir(ctx, path)
        for i, t in enumerate(targets.values()):
            view = byte_view(t)
            fd = os.open(os.path.join(d, f"{i:06d}"), os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], got)
                    if n == 0:
                        raise OSError(f"{d}/{i:06d} is short")
                    got += n
            finally:
                os.close(fd)

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        return count_files(self._dir(ctx, path)), count_files(path)


class TorchSave(Tool):
    """torch.save of the rank's dict to one file, flush + fsync (file and directory);
    torch.load(weights_only=True), then copy into the target tensors."""

    name = "torch.save"

    def _file(self, ctx: Ctx, path: str) -> str:
        return os.path.join(path, f"rank_{ctx.rank:06d}.pt")

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        os.makedirs(path, exist_ok=True)
        with open(self._file(ctx, path), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        loaded = torch.load(self._file(ctx, path), weights_only=True)
        with torch.no_grad():
            for k, t in targets.items():
                t.copy_(loaded[k])

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        return 1, count_files(path)


class Dcp(Tool):
    """torch.distributed.checkpoint: dcp.save(state, checkpoint_id=dir) and dcp.load into
    the preallocated tensors (FileSystemWriter's default sync_files=True fsyncs each file)."""

    name = "DCP"

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=path)

    def load(self, ctx: Ctx, path: str, targets: State) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(targets, checkpoint_id=path)

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        mine = [n for n in os.listdir(path) if n.startswith(f"__{ctx.rank}_")]
        return len(mine), count_files(path)


@dataclasses.dataclass
class BenchTensors:
    """The Earth2Studio bound dataclass: the rank's tensors in one dict field."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def earth2studio_available() -> str | None:
    """None when Earth2Studio's checkpoint module imports, else the reason it does not."""
    try:
        import earth2studio.utils.checkpoint  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Earth2Studio(Tool):
    """earth2studio.utils.checkpoint.Checkpoint (0.19): a bound dataclass holding the same
    tensors, committed by session.write(). It fsyncs only its JSON files (np.save data
    files are not fsynced), so it is not durable in the sense the other tools are."""

    name = "earth2studio"
    durable = False
    can_load = False

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        self._session: Any = None

    def before_save(self, ctx: Ctx, path: str, state: State) -> None:
        from earth2studio.utils.checkpoint import Checkpoint, bind_checkpoint_state

        ckpt = Checkpoint(
            "bench", path=path, mode="overwrite", level=2, rank=ctx.rank, world_size=ctx.world
        )
        self._stack = contextlib.ExitStack()
        self._session = self._stack.enter_context(ckpt)
        bind_checkpoint_state(BenchTensors(tensors=state))

    def save(self, ctx: Ctx, path: str, state: State) -> None:
        self._session.write()

    def after_save(self, ctx: Ctx, path: str) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._session = None
        # Untimed: write back the data it left dirty, or the next tool's fsync pays for it.
        os.sync()

    def files(self, ctx: Ctx, path: str) -> tuple[int, int]:
        rank_path = path if ctx.world == 1 else os.path.join(path, f"rank_{ctx.rank:06d}")
        return count_files(rank_path), count_files(path)
