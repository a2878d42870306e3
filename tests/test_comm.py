"""Every communicator backend passes the same contract tests (in-process, one rank).

Multi-rank behaviour of the same backends runs under torchrun and mpiexec in
test_multiproc.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

import distckpt
from distckpt import Communicator, MPIComm, SingleProcessComm, TorchDistComm
from distckpt.dist.comm import resolve


@pytest.fixture(params=["single", "torch-gloo", "mpi"])
def comm(request, tmp_path):
    if request.param == "single":
        yield SingleProcessComm()
    elif request.param == "torch-gloo":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
        try:
            yield TorchDistComm()
        finally:
            dist.destroy_process_group()
    else:
        pytest.importorskip("mpi4py")
        yield MPIComm()


def test_contract(comm: Communicator):
    assert comm.rank == 0 and comm.world_size == 1 and comm.is_coordinator
    comm.barrier()
    assert comm.allgather_bytes(b"") == [b""]
    payload = bytes(range(256)) * 1000
    assert comm.allgather_bytes(payload) == [payload]
    assert comm.broadcast_bytes(payload) == payload
    assert comm.allgather({"row": 3, "name": "température"}) == [{"row": 3, "name": "température"}]
    assert comm.broadcast([1, None, "x"]) == [1, None, "x"]


def test_save_and_load_through_each_backend(comm: Communicator, tmp_path):
    import torch

    row = distckpt.save({"x": torch.arange(3)}, tmp_path / "s", comm=comm)
    target = {"x": torch.zeros(3, dtype=torch.int64)}
    assert distckpt.load(target, tmp_path / "s", comm=comm) == row
    assert torch.equal(target["x"], torch.arange(3))


def test_initialised_torch_distributed_is_detected(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        assert isinstance(resolve(), TorchDistComm)
    finally:
        dist.destroy_process_group()


def test_single_process_when_nothing_is_launched(monkeypatch):
    for var in ["WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK"]:
        monkeypatch.delenv(var, raising=False)
    assert isinstance(resolve(), SingleProcessComm)


@pytest.mark.parametrize(
    "size_var,rank_var", [("WORLD_SIZE", "RANK"), ("SLURM_NTASKS", "SLURM_PROCID")]
)
def test_a_launcher_without_process_group_is_refused(monkeypatch, tmp_path, size_var, rank_var):
    for var in ["WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(size_var, "4")
    monkeypatch.setenv(rank_var, "2")
    with pytest.raises(distckpt.CommunicatorError, match=f"rank 2 of 4 \\({size_var}\\)"):
        distckpt.save({"a": 1}, tmp_path)
    assert not (tmp_path / "zarr.json").exists()


def test_explicit_objects_are_wrapped():
    with pytest.raises(distckpt.CommunicatorError, match="cannot coordinate"):
        resolve(object())


def test_duplicate_is_an_independent_communicator_over_the_same_ranks(comm: Communicator):
    """What the asynchronous writer's thread uses, so its collectives never interleave
    with the caller's."""
    dup = comm.duplicate()
    assert dup is not comm and type(dup) is type(comm)
    assert (dup.rank, dup.world_size) == (comm.rank, comm.world_size)
    if isinstance(comm, TorchDistComm):
        assert dup._group is not comm._group  # type: ignore[attr-defined]
        assert dist.get_backend(dup._group) == "gloo"  # type: ignore[attr-defined]
    assert dup.allgather({"x": 1}) == [{"x": 1}]
    assert comm.allgather(2) == [2]


_WITHOUT_MPI4PY = """
import sys
sys.modules["mpi4py"] = None  # as if mpi4py were not installed
import distckpt
from distckpt.dist.comm import resolve
try:
    comm = resolve()
except distckpt.CommunicatorError as exc:
    print("error:", exc)
else:
    distckpt.save({"a": 1}, sys.argv[1])
    state = {"a": 0}
    distckpt.load(state, sys.argv[1])
    print("saved with", type(comm).__name__, state["a"])
"""


def _run_without_mpi4py(store: str, **launcher: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MPI4PY, store],
        env={**env, **launcher},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


_LAUNCH_VARS = {
    "WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID",
}  # fmt: skip


def test_without_mpi4py_a_plain_process_saves(tmp_path):
    assert _run_without_mpi4py(str(tmp_path)) == "saved with SingleProcessComm 1"


@pytest.mark.parametrize("launcher", [{"PMI_RANK": "0", "PMI_SIZE": "2"}, {"PMIX_RANK": "0"}])
def test_without_mpi4py_an_mpi_launch_is_a_clear_error(tmp_path, launcher):
    out = _run_without_mpi4py(str(tmp_path), **launcher)
    variable = next(iter(launcher))
    assert out.startswith(f"error: launched under MPI ({variable} is set)"), out
    assert 'pip install "distckpt[mpi]"' in out
    assert not (tmp_path / "zarr.json").exists()


@pytest.mark.parametrize("launcher", ["torch", "mpi"])
def test_messages_short_and_long_cross_between_ranks_intact(launcher: str):
    """Short messages cross in one exchange, long ones in a second: a call where some ranks
    send short and others long messages still gives every rank every message, byte for
    byte (3 ranks, sizes on both sides of the slot)."""
    from multiproc import WORKERS, run_mpiexec, run_torchrun

    if launcher == "mpi":
        pytest.importorskip("mpi4py")
    run = run_torchrun if launcher == "torch" else run_mpiexec
    result = run(3, WORKERS / "comm_worker.py", [launcher], timeout=120).check()
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert json.loads(lines["GATHERED"]) == [True] * 5
    assert json.loads(lines["BROADCAST"]) == [True] * 5
