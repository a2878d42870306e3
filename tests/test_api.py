"""The functional API: save / load / latest / metadata for training loops."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import torch

import distckpt


def _model_and_optim(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optim


def _train(model, optim, steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        x = torch.randn(4, 8, generator=gen)
        loss = model(x).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def test_training_resumes_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(1)
    model, optim = _model_and_optim(0)
    _train(model, optim, 3, gen)
    state = {"model": model.state_dict(), "optim": optim.state_dict(), "rng": gen.get_state()}
    row = distckpt.save(state, tmp_path, step=3)
    _train(model, optim, 3, gen)
    expected = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_optim = _model_and_optim(42)
    target = {"model": fresh.state_dict(), "optim": fresh_optim.state_dict(), "rng": None}
    assert distckpt.load(target, tmp_path) == row
    fresh_optim.load_state_dict(target["optim"])
    gen2 = torch.Generator()
    gen2.set_state(target["rng"])
    _train(fresh, fresh_optim, 3, gen2)
    for got, want in zip(fresh.parameters(), expected, strict=True):
        assert torch.equal(got, want)
    assert distckpt.metadata(tmp_path) == {"step": 3}


def test_load_fills_live_tensors_in_place(tmp_path):
    distckpt.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path)
    live = torch.zeros(2, 3)
    target = {"w": live}
    distckpt.load(target, tmp_path)
    assert target["w"] is live
    assert torch.equal(live, torch.arange(6.0).reshape(2, 3))


def test_restored_tensors_land_on_the_live_tensors_device(tmp_path):
    distckpt.save({"w": torch.ones(3), "extra": torch.ones(2)}, tmp_path)
    target = {"w": torch.empty(3, device="meta")}
    distckpt.load(target, tmp_path)
    assert target["w"].device.type == "meta"


def test_python_values_and_nested_structure_round_trip(tmp_path):
    state = {
        "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "name": "run", "flags": [True, None]},
        "when": dt.datetime(2026, 1, 2, 3, 4, 5),
        "int_keys": {0: torch.ones(1), 7: "seven"},
        "nan": float("nan"),
    }
    distckpt.save(state, tmp_path)
    target: dict = {"cfg": {}, "when": None, "int_keys": {}, "nan": 0.0}
    distckpt.load(target, tmp_path)
    assert target["cfg"] == state["cfg"]
    assert isinstance(target["cfg"]["betas"], tuple)
    assert target["when"] == state["when"]
    assert set(target["int_keys"]) == {0, 7}
    assert target["nan"] != target["nan"]


def test_missing_key_is_an_error_naming_it_and_nothing_is_modified(tmp_path, caplog):
    distckpt.save({"a": torch.ones(2)}, tmp_path)
    target = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(distckpt.CheckpointStateSchemaError, match="'b'"):
        distckpt.load(target, tmp_path)
    assert torch.equal(target["a"], torch.zeros(2))
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        distckpt.load(target, tmp_path, strict=False)
    assert torch.equal(target["a"], torch.ones(2))
    assert torch.equal(target["b"], torch.zeros(2))
    # Nothing is skipped silently: the key that kept its live value is reported.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.endswith("1 live key(s), which kept their values: b") for m in warnings)


def test_shape_or_dtype_mismatch_is_an_error_naming_the_tensor(tmp_path):
    distckpt.save({"m": {"w": torch.ones(2, 3)}}, tmp_path)
    with pytest.raises(distckpt.CheckpointStateSchemaError, match=r"m/w.*\(2, 3\)"):
        distckpt.load({"m": {"w": torch.zeros(3, 2)}}, tmp_path)
    with pytest.raises(distckpt.CheckpointStateSchemaError, match="float64"):
        distckpt.load({"m": {"w": torch.zeros(2, 3, dtype=torch.float64)}}, tmp_path)


def test_load_without_any_row_is_a_clear_error(tmp_path):
    with pytest.raises(distckpt.NoCommittedRowError, match=str(tmp_path)):
        distckpt.load({"a": 1}, tmp_path)


def test_load_a_named_older_row(tmp_path):
    for i in range(3):
        distckpt.save({"i": i}, tmp_path)
    target = {"i": -1}
    assert distckpt.load(target, tmp_path, row=1) == 1
    assert target["i"] == 1
    with pytest.raises(distckpt.NoCommittedRowError, match="row 9"):
        distckpt.load(target, tmp_path, row=9)


def test_state_dict_must_be_a_dict(tmp_path):
    with pytest.raises(distckpt.CheckpointError, match="must be a dict"):
        distckpt.save([torch.ones(1)], tmp_path)  # type: ignore[arg-type]


def test_many_small_tensors_use_a_bounded_number_of_files(tmp_path):
    import os

    state = {f"t{i}": torch.full((16,), float(i)) for i in range(2000)}
    distckpt.save(state, tmp_path)
    files = [f for _, _, fs in os.walk(tmp_path / "rows") for f in fs]
    assert len(files) <= 8
    target = {f"t{i}": torch.zeros(16) for i in range(2000)}
    distckpt.load(target, tmp_path)
    assert all(torch.equal(target[f"t{i}"], state[f"t{i}"]) for i in range(2000))
