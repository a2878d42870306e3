"""torchrun entry point: run the per-rank cases on every rank of a gloo job.

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m benchmarks.worker \\
        --config cfg.json --result out.json

Rank 0 writes the records (identical on every rank: the timings are gathered) to --result.
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from .cases import run_rank_cases
from .common import Config, DistCtx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="Config as JSON (written by __main__)")
    parser.add_argument("--result", required=True, help="where rank 0 writes the records")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = Config.from_json(json.load(f))
    dist.init_process_group("gloo")
    try:
        ctx = DistCtx()
        records = run_rank_cases(ctx, cfg)
        if ctx.rank == 0:
            tmp = args.result + ".tmp"
            with open(tmp, "w") as f:
                json.dump(records, f)
            os.replace(tmp, args.result)
        ctx.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
