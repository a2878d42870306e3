"""Communicators: the one seam through which ranks coordinate checkpoint metadata.

Only small JSON-able objects cross it (row ids, commit reports, errors), serialized as JSON
bytes rather than pickle. Backends: a single process, ``torch.distributed`` (a separate gloo
group when the default one is NCCL, so nothing waits on a CUDA stream) and ``mpi4py`` (a
duplicated communicator, so our messages never match the application's).
"""

from __future__ import annotations

import json
import os
import weakref
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from distckpt.errors import CommunicatorError


class Communicator(ABC):
    """Rank, world size, barrier and exchange of small objects."""

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def allgather_bytes(self, data: bytes) -> list[bytes]: ...

    @abstractmethod
    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes: ...

    def allgather(self, obj: Any) -> list[Any]:
        return [json.loads(b) for b in self.allgather_bytes(json.dumps(obj).encode())]

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        data = json.dumps(obj).encode() if self.rank == root else None
        return json.loads(self.broadcast_bytes(data, root))

    def duplicate(self) -> Communicator:
        """Collective: an independent communicator over the same ranks, for another thread
        (collectives of two threads on one communicator would interleave)."""
        raise CommunicatorError(f"{type(self).__name__} cannot be duplicated")

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class SingleProcessComm(Communicator):
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def barrier(self) -> None:
        pass

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        assert data is not None
        return data

    def duplicate(self) -> Communicator:
        return SingleProcessComm()


class KnownRanks(Communicator):
    """A communicator told its rank and world size when made (ranks played by threads or in
    turn, test doubles), rather than asking a process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self._rank = rank
        self._size = world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._size


class RankInTurnComm(KnownRanks):
    """Rank ``rank`` of ``world_size`` ranks that one process plays one after another.

    For offline tools that write a multi-rank row without launching ranks (``distckpt
    migrate``): gathers report every rank as agreeing with this one (a failure stops the
    loop), and a broadcast replays what the root sent into ``sent``, so the root goes first.
    """

    def __init__(self, rank: int, world_size: int, sent: dict[int, bytes]) -> None:
        super().__init__(rank, world_size)
        self._sent = sent

    def barrier(self) -> None:
        pass

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data] * self._size

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        if self._rank == root:
            assert data is not None
            self._sent[root] = data
            return data
        return self._sent[root]


class TorchDistComm(Communicator):
    """Over an initialised ``torch.distributed``; creating one for NCCL is collective."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CommunicatorError("torch.distributed is not initialised")
        self._dist = dist
        ranks = None if group is None else dist.get_process_group_ranks(group)
        if dist.get_backend(group) == "gloo":
            self._group = group
        else:
            self._group = dist.new_group(ranks=ranks, backend="gloo")
        self._rank = dist.get_rank(self._group)
        self._size = dist.get_world_size(self._group)

    def duplicate(self) -> Communicator:
        """A new gloo group over the same ranks (``new_group`` is collective over the
        default group: every process of the job must call this together)."""
        ranks = None if self._group is None else self._dist.get_process_group_ranks(self._group)
        return TorchDistComm(self._dist.new_group(ranks=ranks, backend="gloo"))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._size

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        import torch

        slot = torch.from_numpy(pack_slot(data))
        slots = [torch.empty_like(slot) for _ in range(self._size)]
        self._dist.all_gather(slots, slot, group=self._group)
        opened = [open_slot(s.numpy()) for s in slots]
        if all(message is not None for _, message in opened):
            return [message for _, message in opened]  # type: ignore[misc]
        lengths = [n for n, _ in opened]
        buf = torch.zeros(max(lengths), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.empty_like(buf) for _ in range(self._size)]
        self._dist.all_gather(outs, buf, group=self._group)
        return [o[:k].numpy().tobytes() for o, k in zip(outs, lengths, strict=True)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        import torch

        src = self._dist.get_global_rank(self._group, root) if self._group else root
        sending = self._rank == root and data is not None
        slot = torch.from_numpy(pack_slot(data if sending else b""))  # type: ignore[arg-type]
        self._dist.broadcast(slot, src=src, group=self._group)
        length, message = open_slot(slot.numpy())
        if message is not None:
            return message
        if sending:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # type: ignore[arg-type]
        else:
            buf = torch.empty(length, dtype=torch.uint8)
        self._dist.broadcast(buf, src=src, group=self._group)
        return buf.numpy().tobytes()


# Messages cross in a fixed slot (an int64 length, then up to SLOT_BYTES of message) in one
# collective: most step messages are agreements (``null``), and each collective is a round
# trip through every rank, so lengths first and bytes second cost two. Only when some rank's
# message is longer than the slot does a second collective carry the payloads.
SLOT_BYTES = 504
_HEADER = 8


def pack_slot(data: bytes) -> np.ndarray:
    """The fixed slot carrying ``data``'s length, and ``data`` itself when it fits."""
    slot = np.zeros(_HEADER + SLOT_BYTES, dtype=np.uint8)
    slot[:_HEADER] = np.frombuffer(np.int64(len(data)).tobytes(), dtype=np.uint8)
    if len(data) <= SLOT_BYTES:
        slot[_HEADER : _HEADER + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return slot


def open_slot(slot: np.ndarray) -> tuple[int, bytes | None]:
    """(length, message) of a slot; the message is None when it did not fit."""
    length = int(slot[:_HEADER].view(np.int64)[0])
    if length <= SLOT_BYTES:
        return length, slot[_HEADER : _HEADER + length].tobytes()
    return length, None


class MPIComm(Communicator):
    """Over mpi4py, on a duplicate of the given communicator (default COMM_WORLD)."""

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()

    def duplicate(self) -> Communicator:
        return MPIComm(self._comm)  # another Dup

    @property
    def rank(self) -> int:
        return int(self._comm.Get_rank())

    @property
    def world_size(self) -> int:
        return int(self._comm.Get_size())

    def barrier(self) -> None:
        self._comm.Barrier()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        slots = np.empty((self.world_size, _HEADER + SLOT_BYTES), dtype=np.uint8)
        self._comm.Allgather(pack_slot(data), slots)
        opened = [open_slot(slot) for slot in slots]
        if all(message is not None for _, message in opened):
            return [message for _, message in opened]  # type: ignore[misc]
        counts = np.array([n for n, _ in opened], dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=np.uint8)
        send = np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, dtype=np.uint8)
        self._comm.Allgatherv(send, [out, counts.tolist()])
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [out[bounds[i] : bounds[i + 1]].tobytes() for i in range(self.world_size)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        sending = self.rank == root and data is not None
        slot = pack_slot(data if sending else b"")  # type: ignore[arg-type]
        self._comm.Bcast(slot, root=root)
        length, message = open_slot(slot)
        if message is not None:
            return message
        if sending:
            buf = np.frombuffer(bytearray(data), dtype=np.uint8)  # type: ignore[arg-type]
        else:
            buf = np.empty(length, dtype=np.uint8)
        self._comm.Bcast(buf, root=root)
        return buf.tobytes()


_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")
_WORLD_HINTS = (
    ("WORLD_SIZE", "RANK"),
    ("SLURM_NTASKS", "SLURM_PROCID"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
)
_cache: dict[int, Communicator] = {}


def launch_hint() -> tuple[int, int, str] | None:
    """(rank, world size, variable) a launcher announced in the environment, if any."""
    for size_var, rank_var in _WORLD_HINTS:
        size = os.environ.get(size_var)
        if size and size.isdigit():
            rank = os.environ.get(rank_var, "0")
            return (int(rank) if rank.isdigit() else 0), int(size), size_var
    return None


def under_mpi_launcher() -> bool:
    return any(v in os.environ for v in _MPI_ENV)


def resolve(comm: Any = None) -> Communicator:
    """Explicit argument > initialised torch.distributed > mpi4py under an MPI launcher >
    single process. Refuses to guess a single process where a launcher announced several."""
    if isinstance(comm, Communicator):
        return comm
    if comm is not None:
        return _wrap(comm)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.group.WORLD
        return _cached(world, lambda: TorchDistComm())
    if under_mpi_launcher():
        try:
            return _cached(None, lambda: MPIComm())
        except ImportError as exc:
            variable = next(v for v in _MPI_ENV if v in os.environ)
            raise CommunicatorError(
                f"launched under MPI ({variable} is set) but mpi4py cannot be imported ({exc}): "
                'install it with pip install "distckpt[mpi]" (mpi4py built against the MPI '
                "that launched the job), or launch with torchrun"
            ) from exc
    hint = launch_hint()
    if hint is not None and hint[1] > 1:
        raise CommunicatorError(
            f"the environment says this is rank {hint[0]} of {hint[1]} ({hint[2]}), but no "
            "process group is initialised: call torch.distributed.init_process_group() first "
            "or pass comm=; ranks that cannot coordinate would overwrite each other's commits"
        )
    return _cached(SingleProcessComm, SingleProcessComm)


def _cached(owner: Any, make: Any) -> Communicator:
    """One communicator per process group or MPI communicator: creating one for an NCCL
    group is itself collective, so it must not happen again on every save.

    The entry lives exactly as long as its owner: it is dropped when the owner is garbage
    collected (``destroy_process_group``), so the cache neither keeps a destroyed group
    alive nor hands out a stale communicator for a new group that reuses its id.
    """
    key = id(owner)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = make()
        if owner is not None and not isinstance(owner, type):
            weakref.finalize(owner, _cache.pop, key, None)
    return found


def _wrap(comm: Any) -> Communicator:
    module = type(comm).__module__
    if module.startswith("mpi4py"):
        return _cached(comm, lambda: MPIComm(comm))
    if module.startswith("torch"):
        return _cached(comm, lambda: TorchDistComm(comm))
    raise CommunicatorError(f"cannot coordinate over {type(comm).__qualname__}")
