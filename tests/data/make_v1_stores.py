"""Writes the old-format store fixtures (run once per format, with the code that wrote it).

    torchrun --nproc-per-node=2 tests/data/make_v1_stores.py tests/data/v1   # release 0.1
    torchrun --nproc-per-node=2 tests/data/make_v1_stores.py tests/data/v2   # format 2

``train``: two rows of a 2-rank functional-API job (own and packed arrays, a bfloat16 tensor,
JSON-like values, a rank-private state and a global sharded tensor). ``session``: three writes
of an Earth2Studio-style ``Checkpoint`` session with a bound dataclass.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import v1_states as v1

import distckpt


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for row in range(v1.ROWS):
        state = v1.train_state(rank, row)
        piece, offsets = v1.global_piece(rank, row)
        state["g"] = distckpt.Sharded(piece, v1.GLOBAL_SHAPE, offsets)
        distckpt.save(state, out / "train", step=state["step"])
    distckpt.lease.release(out / "train")
    dist.barrier()
    if rank == 0:
        ckpt = distckpt.Checkpoint("v1", path=out / "session", comm=distckpt.SingleProcessComm())
        with ckpt as session:
            noise = distckpt.bind_checkpoint_state(v1.Noise())
            for write in range(3):
                fresh = v1.noise_at(write)
                noise.field, noise.step, noise.when = fresh.field, fresh.step, fresh.when
                session.write(lead_time=np.timedelta64(6 * (write + 1), "h"), done=[write])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
