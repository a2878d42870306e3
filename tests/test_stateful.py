"""Stateful objects (``state_dict()`` + ``load_state_dict()``) in the dicts given to ``save``,
``load``, ``AsyncSaver.save`` and in bound states: saved as their state dict, restored in
place through ``load_state_dict``; other objects are refused with what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import distckpt
from distckpt import Checkpoint, bind_checkpoint_state
from distckpt.errors import CheckpointSerializationError


class Counter:
    """A user class with the two methods, and nothing else distckpt knows of."""

    def __init__(self) -> None:
        self.n = 0
        self.loads = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        self.loads += 1


class SaveOnly:
    def state_dict(self) -> dict[str, Any]:
        return {}


class Opaque:
    pass


def training_objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train(model: torch.nn.Module, opt: Any, sched: Any, steps: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_module_optimizer_scheduler_and_user_class_round_trip(tmp_path: Path) -> None:
    model, opt, sched = training_objects(0)
    train(model, opt, sched, 3)
    counter = Counter()
    counter.n = 41
    distckpt.save({"model": model, "optim": opt, "sched": sched, "c": counter, "step": 3}, tmp_path)

    model2, opt2, sched2 = training_objects(1)  # other weights, no optimizer state yet
    params = [p for p in model2.parameters()]
    counter2 = Counter()
    state = {"model": model2, "optim": opt2, "sched": sched2, "c": counter2, "step": 0}
    assert distckpt.load(state, tmp_path) == 0
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(p is q for p, q in zip(params, model2.parameters(), strict=True))  # in place
    assert state["model"] is model2 and state["step"] == 3  # plain values still filled
    assert counter2.n == 41 and counter2.loads == 1
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    # The restored optimizer continues exactly as the saved one does.
    train(model, opt, sched, 2)
    train(model2, opt2, sched2, 2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stateful_objects_inside_nested_dicts_and_async_saves(tmp_path: Path) -> None:
    model, _, _ = training_objects(0)
    with distckpt.AsyncSaver(tmp_path) as saver:
        saver.save({"app": {"model": model, "epoch": 2}})
        saved = model[0].weight.detach().clone()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # after save() returned: not in the row
        saver.wait()
    other, _, _ = training_objects(3)
    state: dict[str, Any] = {"app": {"model": other, "epoch": 0}}
    distckpt.load(state, tmp_path)
    assert torch.equal(other[0].weight, saved)
    assert state["app"]["epoch"] == 2 and state["app"]["model"] is other


def test_data_loader_position_restores(tmp_path: Path) -> None:
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)

    def loader() -> StatefulDataLoader:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(3))
        return StatefulDataLoader(data, batch_size=3, sampler=sampler, drop_last=True)

    first = loader()
    list(first)  # a whole epoch: the next one's order comes from the sampler's generator
    it = iter(first)
    for _ in range(2):
        next(it)
    distckpt.save({"loader": first}, tmp_path)
    expected = [b.clone() for b in it] + [b.clone() for b in first]
    resumed = loader()
    distckpt.load({"loader": resumed}, tmp_path)
    got = list(resumed) + list(resumed)
    assert len(got) == len(expected) == 10
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@dataclass
class Trainer:
    step: int = 0
    counter: Counter = field(default_factory=Counter)


def test_stateful_fields_of_bound_states(tmp_path: Path) -> None:
    with Checkpoint("t", path=tmp_path, mode="append") as session:
        state = bind_checkpoint_state(Trainer(step=5))
        state.counter.n = 9
        session.write()
    with Checkpoint("t", path=tmp_path, mode="append") as session:
        restored = bind_checkpoint_state(Trainer())
        assert restored.step == 5
        assert restored.counter.n == 9 and restored.counter.loads == 1


def test_unstorable_objects_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CheckpointSerializationError, match=r"call \.state_dict\(\)") as err:
        distckpt.save({"model": {"thing": Opaque()}}, tmp_path)
    assert "Opaque" in str(err.value) and "model/thing" in str(err.value)
    with pytest.raises(CheckpointSerializationError, match=r"no load_state_dict\(\)"):
        distckpt.save({"half": SaveOnly()}, tmp_path)
    assert distckpt.latest(tmp_path) is None  # nothing was written
