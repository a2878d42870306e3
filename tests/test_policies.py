"""Loading policies for training code: strict, partial, shape-tolerant, freeze, warm start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiproc import run_torchrun
from torch import nn

import distckpt
from distckpt import LoadPolicy, MigrationRegistry

WORKERS = Path(__file__).parent / "workers"


class EncoderDecoder(nn.Module):
    def __init__(self, out: int = 3, extra: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(10, 5)
        self.decoder = nn.Linear(5, out)
        if extra:
            self.head = nn.Linear(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(x)))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = EncoderDecoder()
    distckpt.save({"model": model.state_dict()}, tmp_path)
    return tmp_path, params(model)


def test_shape_tolerant_skips_the_new_decoder_and_reports_both_shapes(saved):
    store, weights = saved
    torch.manual_seed(1)
    model = EncoderDecoder(out=7)
    init = params(model)
    report = distckpt.load_model(model, store, policy=LoadPolicy("shape_tolerant"))
    assert set(report.loaded) == {"encoder.weight", "encoder.bias"}
    skipped = {s.key: s for s in report.skipped}
    assert set(skipped) == {"decoder.weight", "decoder.bias"}
    assert (skipped["decoder.weight"].saved, skipped["decoder.weight"].live) == ("(3, 5)", "(7, 5)")
    assert skipped["decoder.bias"].reason == "shape"
    assert "decoder.weight (saved (3, 5), live (7, 5))" in report.summary()
    assert not report.complete and report.missing == () and report.unexpected == ()
    now = params(model)
    assert torch.equal(now["encoder.weight"], weights["encoder.weight"])
    assert torch.equal(now["decoder.weight"], init["decoder.weight"])  # live init kept


def test_strict_refuses_a_shape_change_before_modifying_anything(saved):
    store, _ = saved
    model = EncoderDecoder(out=7)
    init = params(model)
    with pytest.raises(distckpt.CheckpointStateSchemaError) as info:
        distckpt.load_model(model, store)
    assert "decoder.weight (saved (3, 5), live (7, 5))" in str(info.value)
    assert all(torch.equal(v, init[k]) for k, v in params(model).items())


def test_strict_names_missing_and_unexpected_keys(saved):
    store, _ = saved
    model = EncoderDecoder(extra=True)
    with pytest.raises(distckpt.CheckpointStateSchemaError) as info:
        distckpt.load_model(model, store, policy=LoadPolicy("strict"))
    assert "not in the checkpoint: head.weight, head.bias" in str(info.value)


def test_partial_reports_missing_and_unexpected(tmp_path):
    source = EncoderDecoder(extra=True)
    distckpt.save({"model": source.state_dict()}, tmp_path)
    model = nn.ModuleDict({"encoder": nn.Linear(10, 5), "body": nn.Linear(5, 5)})
    body = params(model)["body.weight"]
    report = distckpt.load_model(model, tmp_path, policy=LoadPolicy("partial"))
    assert report.loaded == ("encoder.weight", "encoder.bias")
    assert report.missing == ("body.weight", "body.bias")
    assert set(report.unexpected) == {"decoder.weight", "decoder.bias", "head.weight", "head.bias"}
    assert torch.equal(model["encoder"].weight, source.encoder.weight)
    assert torch.equal(model["body"].weight, body)


def test_partial_still_refuses_shape_changes(saved):
    store, _ = saved
    with pytest.raises(distckpt.CheckpointStateSchemaError, match="shape_tolerant"):
        distckpt.load_model(EncoderDecoder(out=7), store, policy=LoadPolicy("partial"))


def test_freeze_named_submodules_after_loading(saved):
    store, weights = saved
    model = EncoderDecoder()
    report = distckpt.load_model(model, store, policy=LoadPolicy(freeze=("encoder",)))
    assert report.frozen == ("encoder.weight", "encoder.bias")
    assert not model.encoder.weight.requires_grad and not model.encoder.bias.requires_grad
    assert model.decoder.weight.requires_grad
    assert torch.equal(model.encoder.weight, weights["encoder.weight"])


def test_freeze_of_an_unknown_submodule_is_an_error_and_loads_nothing(saved):
    store, weights = saved
    model = EncoderDecoder()
    with pytest.raises(distckpt.CheckpointStateSchemaError, match="'encodr' names no parameter"):
        distckpt.load_model(model, store, policy=LoadPolicy(freeze=("encodr",)))
    assert not torch.equal(model.encoder.weight, weights["encoder.weight"])
    assert model.encoder.weight.requires_grad


def _train(model: nn.Module, optim: torch.optim.Optimizer, sched, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(4, 10, generator=gen)).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()


def _setup(seed: int):
    torch.manual_seed(seed)
    model = EncoderDecoder()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, sched


def test_warm_start_restores_adam_and_the_scheduler(tmp_path):
    model, optim, sched = _setup(0)
    _train(model, optim, sched, 3, seed=1)
    distckpt.save(
        {
            "model": model.state_dict(),
            "optimizer": optim.state_dict(),
            "scheduler": sched.state_dict(),
        },
        tmp_path,
    )
    _train(model, optim, sched, 3, seed=2)

    fresh, fresh_optim, fresh_sched = _setup(5)
    report = distckpt.load_model(fresh, tmp_path, optimizer=fresh_optim, scheduler=fresh_sched)
    assert report.optimizer is not None and report.optimizer.restored
    assert report.scheduler is not None and report.scheduler.restored
    first = fresh.encoder.weight
    assert fresh_optim.state[first]["step"] == 3
    assert fresh_sched.last_epoch == 3 and fresh_sched.get_last_lr() == [5e-3]
    _train(fresh, fresh_optim, fresh_sched, 3, seed=2)
    for got, want in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert fresh_optim.state[first]["step"] == optim.state[model.encoder.weight]["step"]


def test_warm_start_is_reported_not_done_when_the_model_changed(tmp_path):
    model, optim, sched = _setup(0)
    _train(model, optim, sched, 2, seed=1)
    distckpt.save({"model": model.state_dict(), "optimizer": optim.state_dict()}, tmp_path)
    torch.manual_seed(3)
    other = EncoderDecoder(out=7)
    other_optim = torch.optim.Adam(other.parameters(), lr=1e-2)
    other_sched = torch.optim.lr_scheduler.StepLR(other_optim, step_size=2)
    report = distckpt.load_model(
        other,
        tmp_path,
        optimizer=other_optim,
        scheduler=other_sched,
        policy=LoadPolicy("shape_tolerant"),
    )
    assert report.optimizer is not None and not report.optimizer.restored
    assert "loaded partially" in report.optimizer.detail
    assert report.scheduler is not None and "no state 'scheduler'" in report.scheduler.detail
    assert len(other_optim.state) == 0 and other_sched.last_epoch == 0


def test_warm_start_off_in_the_policy(tmp_path):
    model, optim, sched = _setup(0)
    _train(model, optim, sched, 1, seed=1)
    distckpt.save({"model": model.state_dict(), "optimizer": optim.state_dict()}, tmp_path)
    fresh, fresh_optim, _ = _setup(1)
    report = distckpt.load_model(
        fresh, tmp_path, optimizer=fresh_optim, policy=LoadPolicy(warm_start=False)
    )
    assert report.optimizer is not None and not report.optimizer.restored
    assert len(fresh_optim.state) == 0


def test_load_model_reports_the_migration_chain(tmp_path):
    class Renamed(nn.Module):
        __checkpoint_version__ = 1

        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(10, 5)
            self.decoder = nn.Linear(5, 3)

    source = EncoderDecoder()
    distckpt.save({"model": source.state_dict()}, tmp_path)  # version 0
    registry = MigrationRegistry()
    registry.register("model", 0, [distckpt.RenameKeys("encoder.", "enc.", match="prefix")])
    model = Renamed()
    report = distckpt.load_model(model, tmp_path, migrations=registry)
    (applied,) = report.migrated
    assert (applied.state, applied.from_version, applied.to_version) == ("model", 0, 1)
    assert report.complete and torch.equal(model.enc.weight, source.encoder.weight)


def test_a_row_without_the_state_is_named(saved):
    store, _ = saved
    with pytest.raises(
        distckpt.CheckpointStateSchemaError, match=r"no state 'net' \(it holds \['model'\]\)"
    ):
        distckpt.load_model(EncoderDecoder(), store, state="net")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_onto_a_cuda_model_with_adam(tmp_path):
    model, optim, sched = _setup(0)
    _train(model, optim, sched, 2, seed=1)
    distckpt.save({"model": model.state_dict(), "optimizer": optim.state_dict()}, tmp_path)
    torch.manual_seed(4)
    live = EncoderDecoder(out=7).cuda()
    live_optim = torch.optim.Adam(live.parameters(), lr=1e-2)
    report = distckpt.load_model(
        live, tmp_path, optimizer=live_optim, policy=LoadPolicy("shape_tolerant")
    )
    assert live.encoder.weight.device.type == "cuda"
    assert torch.equal(live.encoder.weight.cpu(), model.encoder.weight)
    assert [s.key for s in report.skipped] == ["decoder.weight", "decoder.bias"]
    assert report.optimizer is not None and not report.optimizer.restored


@pytest.mark.multiproc
def test_every_rank_raises_when_one_rank_does_not_fit(tmp_path):
    store, outdir = tmp_path / "store", tmp_path / "out"
    outdir.mkdir()
    result = run_torchrun(2, WORKERS / "policy_worker.py", [str(store), str(outdir)], timeout=120)
    assert result.returncode == 0, result.output
    for rank in range(2):
        text = (outdir / f"rank_{rank}.txt").read_text()
        assert text.startswith("RAISED: ") and "rank 1:" in text, text
        assert "2.weight (saved (3, 5), live (7, 5))" in text, text
