"""Messages of every size class through a communicator at several ranks.

Usage: ``comm_worker.py torch|mpi`` (under torchrun or mpiexec); prints ``GATHERED <json>``
and ``BROADCAST <json>`` on rank 0. Each rank sends messages on both sides of the
one-exchange slot, so one collective carries a mix of short and long ones.
"""

import hashlib
import json
import sys

from distckpt.dist.comm import SLOT_BYTES, Communicator, MPIComm, TorchDistComm

comm: Communicator
if sys.argv[1] == "torch":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    comm = TorchDistComm()
else:
    comm = MPIComm()
rank, size = comm.rank, comm.world_size
lengths = [0, 1, SLOT_BYTES, SLOT_BYTES + 1, 70_000]


def message(owner: int, length: int) -> bytes:
    seed = hashlib.sha256(f"{owner}:{length}".encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


gathered = []
for turn in range(len(lengths)):
    mine = lengths[(turn + rank) % len(lengths)]  # ranks send different sizes in one call
    got = comm.allgather_bytes(message(rank, mine))
    want = [message(r, lengths[(turn + r) % len(lengths)]) for r in range(size)]
    gathered.append(got == want)
broadcast = []
for length in lengths:
    sent = message(size - 1, length)
    got = comm.broadcast_bytes(sent if rank == size - 1 else None, root=size - 1)
    broadcast.append(got == sent)
if rank == 0:
    print("GATHERED " + json.dumps(gathered), flush=True)
    print("BROADCAST " + json.dumps(broadcast), flush=True)
if sys.argv[1] == "torch":
    dist.destroy_process_group()
