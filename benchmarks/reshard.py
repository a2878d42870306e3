"""The ``reshard`` case: sharded state saved at 2 ranks, restored at 4 ranks in another layout.

    .venv/bin/python -m benchmarks.reshard                 # 1 GiB of global float32 state
    .venv/bin/python -m benchmarks.reshard --mib 256 --repeat 3

Launches torchrun itself (``--nproc-per-node`` 2, then 4) with this module as the worker:

1. 2 ranks: DTensors ``Shard(0)`` on a 1-D mesh, saved by distckpt and by DCP (each
   timed once: durable saves into fresh directories).
2. 2 ranks, same layout: ``distckpt.load`` and ``dcp.load`` into zero-filled DTensors.
3. 4 ranks, other placements (``Shard(1)``): the resharding loads of both tools.

Each load is timed barrier to barrier on rank 0, files in the page cache (read once before
timing), median of ``--repeat``; values are checked after every load (untimed). Prints a
table and the issue's ratios, and writes ``results-reshard.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from typing import Any

TENSORS = 8
GiB = 1 << 30


def _shape(total_mib: int) -> tuple[int, int]:
    """Each tensor's global shape: float32, ``total_mib / TENSORS`` MiB, 4096 columns."""
    rows = total_mib * (1 << 20) // TENSORS // 4 // 4096
    return rows, 4096


def _state(shape: tuple[int, int], placement: Any, mesh: Any, *, zero: bool) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for i in range(TENSORS):
        if zero:
            full = torch.zeros(shape)
        else:
            full = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape) + i
        out[f"layer{i}"] = distribute_tensor(full, mesh, [placement], src_data_rank=None)
    return out


def _check(targets: dict[str, Any], shape: tuple[int, int], placement: Any, mesh: Any) -> None:
    import torch

    want = _state(shape, placement, mesh, zero=False)
    for k, t in targets.items():
        if not torch.equal(t.to_local(), want[k].to_local()):
            raise SystemExit(f"value mismatch in {k} after a load")


def _read_tree(path: str) -> None:
    """Pull the store into the page cache (untimed), so loads compare tools, not the disk."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, init_device_mesh

    import distckpt

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    shape = _shape(args.mib)
    ours, theirs = os.path.join(args.work, "distckpt"), os.path.join(args.work, "dcp")
    results: dict[str, Any] = {}
    warnings.simplefilter("ignore")
    if args.phase == "save":  # one durable save each, timed (fresh directories)
        state = _state(shape, Shard(0), mesh, zero=False)
        saves = {
            "distckpt": _timed(lambda: distckpt.save(state, ours)),
            "DCP": _timed(lambda: dcp.save(state, checkpoint_id=theirs)),
        }
        if rank == 0:
            with open(os.path.join(args.out, "reshard-save.json"), "w") as f:
                json.dump({"ranks": world, "placement": "S(0)", "samples": saves}, f)
        dist.barrier()
        dist.destroy_process_group()
        return
    placement = Shard(0) if args.phase == "same" else Shard(1)
    if rank == 0:
        _read_tree(ours)
        _read_tree(theirs)
    targets = _state(shape, placement, mesh, zero=True)
    loads = {
        "distckpt": lambda: distckpt.load(targets, ours),
        "DCP": lambda: dcp.load(targets, checkpoint_id=theirs),
    }
    for name, load in loads.items():
        load()  # warm-up: imports, planners, thread pools
        samples = []
        for _ in range(args.repeat):
            for t in targets.values():
                t.to_local().zero_()
            samples.append(_timed(load))
            _check(targets, shape, placement, mesh)
        results[name] = samples
    if rank == 0:
        with open(os.path.join(args.out, f"reshard-{args.phase}.json"), "w") as f:
            json.dump({"ranks": world, "placement": str(placement), "samples": results}, f)
    dist.barrier()
    dist.destroy_process_group()


def _launch(nproc: int, args: argparse.Namespace, phase: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "benchmarks.reshard",
        "--phase",
        phase,
        "--mib",
        str(args.mib),
        "--repeat",
        str(args.repeat),
        "--work",
        args.work,
        "--out",
        args.out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, timeout=1800)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="total global state, MiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--work", default=None)
    p.add_argument("--phase", choices=("save", "same", "reshard"), default=None)
    args = p.parse_args(argv)
    args.work = args.work or os.path.join(args.out, "work", "reshard")
    if args.phase is not None:
        rank_main(args)
        return 0
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    _launch(2, args, "save")
    _launch(2, args, "same")
    _launch(4, args, "reshard")
    shutil.rmtree(args.work, ignore_errors=True)
    med: dict[tuple[str, str], float] = {}
    for phase in ("save", "same", "reshard"):
        with open(os.path.join(args.out, f"reshard-{phase}.json")) as f:
            doc = json.load(f)
        for tool, samples in doc["samples"].items():
            med[(phase, tool)] = statistics.median(samples) if phase != "save" else samples
    size = args.mib / 1024
    print(f"reshard: {args.mib} MiB of float32 DTensors, saved Shard(0) at 2 ranks")
    print(f"{'operation':<34}{'seconds':>10}{'GiB/s':>9}")
    labels = {"save": "save, 2 ranks (once)", "same": "same layout, 2 ranks"}
    for (phase, tool), s in med.items():
        label = f"{tool} " + labels.get(phase, "Shard(1), 4 ranks")
        print(f"{label:<34}{s:>10.3f}{size / s:>9.2f}")
    ours = med[("reshard", "distckpt")] / med[("same", "distckpt")]
    vs_dcp = med[("reshard", "DCP")] / med[("reshard", "distckpt")]
    print(f"distckpt reshard / same-layout time: {ours:.2f}x (goal <= 1.3x)")
    print(f"DCP reshard time / distckpt reshard time: {vs_dcp:.2f}x (goal >= 2x)")
    with open(os.path.join(args.out, "results-reshard.json"), "w") as f:
        json.dump({f"{p}/{t}": s for (p, t), s in med.items()} | {"mib": args.mib}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
