"""CUDA and NCCL paths; skipped cleanly where there is no GPU (CI never has one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import TorchDistComm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_tensors_save_and_restore_onto_the_live_device(tmp_path):
    dev = torch.device("cuda", torch.cuda.current_device())
    state = {
        "w": torch.randn(512, 1024, device=dev),
        "b": torch.randn(7, device=dev, dtype=torch.bfloat16),
        "f8": torch.randn(33, device=dev).to(torch.float8_e4m3fn),
    }
    distckpt.save(state, tmp_path)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    distckpt.load(target, tmp_path)
    for k, v in state.items():
        assert target[k].device == dev
        assert torch.equal(target[k].view(torch.uint8), v.view(torch.uint8))


def test_bound_state_restores_onto_the_live_fields_cuda_device(tmp_path):
    @dataclasses.dataclass
    class Noise:
        field: torch.Tensor

    dev = torch.device("cuda", torch.cuda.current_device())
    with distckpt.Checkpoint("c", path=tmp_path) as session:
        saved = torch.randn(8, device=dev)
        distckpt.bind_checkpoint_state(Noise(saved.clone()))
        session.write()
    with distckpt.Checkpoint("c", path=tmp_path):
        live = Noise(torch.zeros(8, device=dev))
        distckpt.bind_checkpoint_state(live)
        assert live.field.device == dev and torch.equal(live.field, saved)


def test_nccl_jobs_exchange_metadata_over_a_separate_gloo_group(tmp_path):
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        comm = TorchDistComm()
        assert dist.get_backend(comm._group) == "gloo"
        dev = torch.device("cuda", 0)
        row = distckpt.save({"x": torch.arange(4, device=dev)}, tmp_path / "s", comm=comm)
        target = {"x": torch.zeros(4, dtype=torch.int64, device=dev)}
        assert distckpt.load(target, tmp_path / "s") == row
        assert torch.equal(target["x"].cpu(), torch.arange(4))
    finally:
        dist.destroy_process_group()


def test_async_save_stages_cuda_tensors_through_reused_pinned_buffers(tmp_path):
    dev = torch.device("cuda", torch.cuda.current_device())
    state = {"w": torch.randn(1024, 1024, device=dev), "b": torch.randn(9, device=dev)}
    want = {k: v.cpu() for k, v in state.items()}
    with distckpt.AsyncSaver(tmp_path / "s") as saver:
        saver.save(state)
        for v in state.values():
            v.zero_()  # queued on the caller's stream after the staging copies
        saver.wait()
        buffers = dict(saver.writer.slots[0]._buffers)
        assert len(buffers) == 2 and all(b.is_pinned() for b in buffers.values())
        saver.save(state)  # the second row reuses the same pinned memory
        reused = saver.writer.slots[0]._buffers
        assert all(reused[k] is b for k, b in buffers.items())
    target = {k: torch.empty_like(v) for k, v in state.items()}
    distckpt.load(target, tmp_path / "s", row=0)
    for k, v in want.items():
        assert torch.equal(target[k].cpu(), v)
