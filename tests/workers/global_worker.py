"""One rank of a torchrun job saving or restoring global (sharded) tensors.

Not a test module: ``tests/test_global.py`` runs it, e.g.

    torchrun --nproc-per-node=2 global_worker.py STORE save
    torchrun --nproc-per-node=4 global_worker.py STORE restore

Every global tensor's full value is regenerated from its name (``full``), so any job can
check its own pieces bit for bit. ``save`` and ``restore`` use different placements for the
same tensors (Shard(0) saved, Shard(1) restored, Replicate <-> Shard, a 2-D mesh at 4
ranks, uneven splits, bfloat16). ``fsdp-save``/``fsdp-restore`` do the same for an FSDP2
model and its Adam state through ``get_state_dict``/``set_state_dict``.
``cuda-save``/``cuda-restore`` put every tensor on the rank's GPU under NCCL.
Lines: ``SAVED row=R``, ``RESTORE OK``, ``MISMATCH ...``, ``DIGEST name=hex``, and for the
coordinator ``BYTES``/``WRITERS``. A failed check exits with status 1.
"""

from __future__ import annotations

import hashlib
import os
import sys
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

import distckpt
from distckpt.errors import CorruptCheckpointError

# name -> (global shape, dtype)
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "w": ((10, 6), torch.float32),  # uneven along dim 0 at 3 and 4 ranks
    "e": ((5, 9), torch.bfloat16),  # uneven along dim 1
    "b": ((7,), torch.float32),  # replicated when saved
    "b2": ((3, 4), torch.float64),  # replicated when saved
    "grid": ((8, 6), torch.float32),  # 2-D mesh at 4 ranks
    "rep2d": ((6, 4), torch.int32),  # replicated over one mesh dimension at 4 ranks
}
EXPLICIT = ("x", (13,), torch.int64)  # an explicit Sharded split by np.array_split
DEVICE = "cpu"  # "cuda" for the cuda-* modes (NCCL; distckpt's metadata goes over gloo)


def full(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The logical value of global tensor ``name``: the same on every rank and in the test."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g).to(dtype)


def say(text: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{text} rank={dist.get_rank()}\n".encode())


def placements(world: int, restoring: bool) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Mesh and placements per tensor: saving and restoring layouts differ on purpose."""
    mesh = init_device_mesh(DEVICE, (world,))
    mesh2d = init_device_mesh(DEVICE, (2, 2)) if world == 4 else None
    if not restoring:
        out = {
            "w": (mesh, (Shard(0),)),
            "e": (mesh, (Shard(1),)),
            "b": (mesh, (Replicate(),)),
            "b2": (mesh, (Replicate(),)),
            "grid": (mesh, (Shard(0),)),
            "rep2d": (mesh, (Replicate(),)),
        }
        if mesh2d is not None:
            out["grid"] = (mesh2d, (Shard(0), Shard(1)))
            out["rep2d"] = (mesh2d, (Replicate(), Shard(0)))
        return out
    out = {
        "w": (mesh, (Shard(1),)),
        "e": (mesh, (Replicate(),)),
        "b": (mesh, (Shard(0),)),
        "b2": (mesh, (Shard(1),)),
        "grid": (mesh, (Shard(1),)),
        "rep2d": (mesh, (Shard(0),)),
    }
    if mesh2d is not None:
        out["grid"] = (mesh2d, (Shard(1), Shard(0)))
        out["rep2d"] = (mesh2d, (Shard(0), Replicate()))
    return out


def explicit(rank: int, world: int, value: torch.Tensor) -> distckpt.Sharded:
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(value.shape[0]), world)])
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    return distckpt.Sharded(value[lo:hi].clone().to(DEVICE), tuple(value.shape), (lo,))


def build(world: int, restoring: bool, *, zero: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    model: dict[str, Any] = {}
    layout = placements(world, restoring)
    for name, (shape, dtype) in TENSORS.items():
        value = torch.zeros(shape, dtype=dtype) if zero else full(name, shape, dtype)
        if world == 1 and restoring:
            model[name] = value.to(DEVICE)  # a 1-rank job restores into plain tensors
        else:
            mesh, place = layout[name]
            model[name] = distribute_tensor(value, mesh, place, src_data_rank=None)
    xname, xshape, xdtype = EXPLICIT
    xvalue = torch.zeros(xshape, dtype=xdtype) if zero else full(xname, xshape, xdtype)
    model[xname] = explicit(rank, world, xvalue)
    step = {"n": 0 if zero else 3, "lr": torch.tensor(0.0 if zero else 0.125)}
    return {"model": model, "step": step}


def raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check(target: dict[str, Any], world: int) -> list[str]:
    expected = build(world, True, zero=False)
    bad = []
    for name, got in target["model"].items():
        want = expected["model"][name]
        if isinstance(got, distckpt.Sharded):
            got, want = got.local, want.local
        elif isinstance(got, DTensor):
            got, want = got.to_local(), want.to_local()
        if got.device.type != DEVICE or got.dtype != want.dtype or raw(got) != raw(want):
            bad.append(name)
    if target["step"]["n"] != 3 or raw(target["step"]["lr"]) != raw(torch.tensor(0.125)):
        bad.append("step")
    return bad


def report_layout(store: str, row: int) -> None:
    """Coordinator: bytes of global pieces written vs logical size; who wrote which array."""
    st = distckpt.Store(store)
    world = st.read_manifest(row, 0).world_size
    written = sum(
        p.nbytes
        for r in range(world)
        for g in st.read_manifest(row, r).globals
        for p in g.pieces or ()
    )
    logical = sum(math_prod(s) * d.itemsize for s, d in TENSORS.values())
    logical += math_prod(EXPLICIT[1]) * EXPLICIT[2].itemsize
    say(f"BYTES written={written} logical={logical}")
    writers: dict[str, set[int]] = {}
    for r in range(world):
        for g in st.read_manifest(row, r).globals:
            if g.pieces:
                writers.setdefault(g.name, set()).add(r)
    for name, ranks in sorted(writers.items()):
        say(f"WRITERS key={name} ranks={sorted(ranks)}")


def math_prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# -- FSDP2 --------------------------------------------------------------------------------------
def fsdp_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def digests(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, str]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": hashlib.sha256(raw(v)).hexdigest()[:16] for k, v in msd.items()}
    for param, state in osd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{param}.{k}"] = hashlib.sha256(raw(v)).hexdigest()[:16]
    return out


def fsdp(store: str, save: bool) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = fsdp_model()
    if save:
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            loss = model(torch.randn(4, 6, generator=g)).square().sum()
            loss.backward()
            optim.step()
            optim.zero_grad()
        msd, osd = get_state_dict(model, optim)
        row = distckpt.save({"model": msd, "optim": osd}, store)
        say(f"SAVED row={row}")
    else:
        fresh = digests(model, optim)  # collective; what the restore must replace
        for name, value in sorted(fresh.items()):
            if dist.get_rank() == 0:
                say(f"FRESH {name}={value}")
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd}
        distckpt.load(state, store)
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    for name, value in sorted(digests(model, optim).items()):
        if dist.get_rank() == 0:
            say(f"DIGEST {name}={value}")


def main() -> int:
    global DEVICE
    store, mode = sys.argv[1], sys.argv[2]
    if mode.startswith("cuda-"):
        DEVICE, mode = "cuda", mode.removeprefix("cuda-")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timedelta(seconds=60))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    world = dist.get_world_size()
    status = 0
    if mode == "save":
        row = distckpt.save(build(world, False, zero=False), store)
        say(f"SAVED row={row}")
        if dist.get_rank() == 0:
            report_layout(store, row)
    elif mode == "restore":
        target = build(world, True, zero=True)
        row = distckpt.load(target, store)
        bad = check(target, world)
        say(f"MISMATCH row={row} {bad}" if bad else f"RESTORE OK row={row}")
        status = 1 if bad else 0
    elif mode == "restore-corrupt":  # the row has a damaged block: refused, nothing touched
        target = build(world, True, zero=True)
        try:
            distckpt.load(target, store)
        except CorruptCheckpointError as exc:
            locals_ = [
                t.to_local() if isinstance(t, DTensor) else getattr(t, "local", t)
                for t in target["model"].values()
            ]
            untouched = all(not bool(t.any()) for t in locals_)
            say(f"REFUSED untouched={untouched} {str(exc).splitlines()[0]}")
        else:
            say("LOADED a damaged row")
            status = 1
    elif mode in ("fsdp-save", "fsdp-restore"):
        fsdp(store, mode == "fsdp-save")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: gloo's threads can race it and abort the process after a
    # successful run ("terminate called without an active exception"; see ckpt_worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
