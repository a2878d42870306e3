"""One rank of a job whose checkpoint holds member-keyed, replicated and rank-private state.

Not a test module: ``tests/test_elastic.py`` runs it under torchrun, e.g.

    torchrun --nproc-per-node=2 members_worker.py STORE write
    torchrun --nproc-per-node=3 members_worker.py STORE restore

``write`` binds, on every rank, the noise of its members (round robin over 8), model weights
identical on every rank (an array of their own, over the pack threshold) and a rank-private
counter, and commits one row. ``restore`` (at any world size) checks bit for bit that each
rank got exactly its members' noise and the weights, counts the bytes it read of the
weights' array, then binds the counter, which must raise WorldSizeMismatchError when the world size
changed. One line per rank: ``RESTORED rank=R members=[...] weight_bytes=N``, then
``EXPECTED-ERROR rank=R <message>``; anything else prints ``UNEXPECTED`` and exits 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import distckpt
from distckpt import Checkpoint, MemberMapping, Store, bind_checkpoint_state
from distckpt.dist.comm import resolve
from distckpt.storage.filesystem import LocalFileSystem

MEMBERS = 8
MAPPING = MemberMapping(MEMBERS, replicated=("weights",))


def say(line: str) -> None:
    """One line in one write: the ranks share stdout, and a line split over two writes
    (text, then newline) can interleave with another rank's."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


@dataclass
class Noise:
    noise: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Weights:
    w: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


@dataclass
class Counter:
    count: int = 0


def noise_of(m: int) -> torch.Tensor:
    return torch.randn(16, generator=torch.Generator().manual_seed(m))


WEIGHTS = 300_000  # float32: 1.2 MB, an array of its own


def weights() -> torch.Tensor:
    return torch.randn(WEIGHTS, generator=torch.Generator().manual_seed(7))


class CountingFS(LocalFileSystem):
    """Counts the bytes read of the weights: format 2 keeps them as a byte range of a
    rank's data array, so reads are matched by file and range (the manifests say where)."""

    def __init__(self) -> None:
        self.weight_bytes = 0
        self.ranges: list[tuple[str, int, int]] = []  # (data file, start, end) of the weights

    def _count(self, path: str, offset: int, n: int) -> None:
        for file, start, end in self.ranges:
            if path == file:
                self.weight_bytes += max(0, min(end, offset + n) - max(start, offset))

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        self._count(path, offset, len(out.cast("B")))
        return super().read_into(path, out, offset)

    def read_into_parts(self, path: str, parts: Sequence[memoryview], offset: int = 0) -> int:
        self._count(path, offset, sum(len(p.cast("B")) for p in parts))
        return super().read_into_parts(path, parts, offset)


def weight_ranges(store: Store) -> list[tuple[str, int, int]]:
    """Where the weights lie in every saved rank's data array of the newest row."""
    out = []
    row = store.rows()[-1]
    for rank in store.manifest_ranks(row):
        for a in store.read_manifest(row, rank).arrays:
            if a.name.startswith("weights"):
                path = store.data_file(row, rank)
                out.append((path, a.offset, a.offset + a.nbytes))
    return out


def main() -> int:
    store, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    comm = resolve()
    rank, world = comm.rank, comm.world_size
    ck = Checkpoint("members", path=store, comm=comm, mapping=MAPPING)
    fs = CountingFS()
    ck.store = Store(ck.path, fs=fs)
    if mode != "write":
        fs.ranges = weight_ranges(ck.store)
    status = 0
    with ck as session:
        noise = bind_checkpoint_state(Noise(), state_id="noise")
        w = bind_checkpoint_state(Weights(), state_id="weights")
        mine = MAPPING.members_of(rank, world)
        if mode == "write":
            noise.noise = {m: noise_of(m) for m in mine}
            w.w = weights()
            bind_checkpoint_state(Counter(rank), state_id="counter")
            session.write(completed_ensembles=[])
            say(f"WROTE rank={rank}")
        else:
            ok = sorted(noise.noise) == mine and all(
                torch.equal(noise.noise[m], noise_of(m)) for m in mine
            )
            ok = ok and torch.equal(w.w, weights())
            saved = session.entry.world_size if session.entry is not None else None
            if not ok:
                say(f"UNEXPECTED rank={rank} members={sorted(noise.noise)}")
                status = 1
            else:
                say(f"RESTORED rank={rank} members={mine} weight_bytes={fs.weight_bytes}")
            try:
                bind_checkpoint_state(Counter(), state_id="counter")
                if saved != world:
                    say(f"UNEXPECTED rank={rank} counter restored at {world} from {saved}")
                    status = 1
            except distckpt.WorldSizeMismatchError as exc:
                say(f"EXPECTED-ERROR rank={rank} {exc}")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    status = main()
    # Skip interpreter teardown: gloo's threads can race it and abort the process after a
    # successful run ("terminate called without an active exception"; see ckpt_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
