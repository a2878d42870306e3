"""Resumable rollouts: a restored iterator continues after its boundary, never before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distckpt import Checkpoint, ResumableRollout
from distckpt.reference import Persistence, StochasticModel, initial_condition


def _batch(members: list[int]):
    x0, coords = initial_condition((4, 8))
    coords = dict(coords, ensemble=np.array(members))
    return x0.repeat(len(members), 1, 1), coords


def _run(model, members, steps, ckpt_session=None):
    x, coords = _batch(members)
    out = []
    for step, (y, c) in zip(range(steps + 1), model.create_iterator(x, coords), strict=False):
        out.append((y.clone(), np.asarray(c["lead_time"]).copy()))
        if ckpt_session is not None:
            ckpt_session.write(lead_time=c["lead_time"][0], step=step)
    return out


@pytest.mark.parametrize("make", [Persistence, lambda: StochasticModel(seed=3)])
def test_iterator_yields_initial_condition_then_steps(make):
    model = make()
    out = _run(model, [0, 1], 3)
    x, _ = _batch([0, 1])
    assert torch.equal(out[0][0], x)
    assert [int(lt[0] / np.timedelta64(1, "h")) for _, lt in out] == [0, 6, 12, 18]
    assert not torch.equal(out[1][0], out[0][0])


@pytest.mark.parametrize("kind", ["persistence", "stochastic"])
def test_resume_continues_after_the_boundary_bit_for_bit(tmp_path, kind):
    def make():
        return Persistence() if kind == "persistence" else StochasticModel(seed=7)

    reference = _run(make(), [2, 5], 6)
    with Checkpoint("r", path=tmp_path, level=2) as session:
        _run(make(), [2, 5], 3, session)  # killed after step 3 was written
    with Checkpoint("r", path=tmp_path, level=2) as session:
        assert session.write_count == 4 and session.metadata["step"] == 3
        model = make()
        x, coords = _batch([2, 5])
        assert model.resume_step(coords) == 3
        resumed = model.create_iterator(torch.full_like(x, 99.0), coords)
        for step in range(4, 7):
            y, c = next(resumed)
            assert torch.equal(y, reference[step][0]), f"step {step} differs"
            assert np.array_equal(c["lead_time"], reference[step][1])


def test_resumed_stochastic_model_does_not_reinitialise_its_noise(tmp_path, monkeypatch):
    with Checkpoint("r", path=tmp_path) as session:
        _run(StochasticModel(seed=1), [0], 2, session)
    with Checkpoint("r", path=tmp_path):
        model = StochasticModel(seed=1)
        calls = []
        monkeypatch.setattr(model, "_init_noise", lambda *a: calls.append(a))
        x, coords = _batch([0])
        next(model.create_iterator(x, coords))
        assert calls == []


def test_only_the_same_members_resume(tmp_path):
    with Checkpoint("r", path=tmp_path) as session:
        _run(Persistence(), [0, 1], 2, session)
    with Checkpoint("r", path=tmp_path):
        model = Persistence()
        x, coords = _batch([2, 3])
        assert model.resume_step(coords) is None
        first, _ = next(model.create_iterator(x, coords))
        assert torch.equal(first, x)  # a fresh rollout: the initial condition first


def test_a_restored_boundary_resumes_once(tmp_path):
    with Checkpoint("r", path=tmp_path) as session:
        _run(Persistence(), [0], 2, session)
    with Checkpoint("r", path=tmp_path):
        model = Persistence()
        x, coords = _batch([0])
        assert model.resume_step(coords) == 2
        model.create_iterator(x, coords)
        assert model.resume_step(coords) is None
        first, _ = next(model.create_iterator(x, coords))
        assert torch.equal(first, x)


@pytest.mark.parametrize("level", [0, 1])
def test_levels_below_two_record_no_boundary(tmp_path, level):
    with Checkpoint("r", path=tmp_path, level=level) as session:
        _run(StochasticModel(seed=1), [0], 2, session)
        if level == 1:
            assert session.entry.state_ids  # states are written at level 1 ...
    with Checkpoint("r", path=tmp_path, level=level):
        model = StochasticModel(seed=1)
        _x, coords = _batch([0])
        assert model.resume_step(coords) is None  # ... but no rollout boundary


def test_a_new_work_item_does_not_resume_the_previous_one(tmp_path):
    """Setting write_count = 0 after writing starts a new item: the restored boundary of the
    previous item is spent even for the same members (Earth2Studio's batches)."""
    with Checkpoint("r", path=tmp_path) as session:
        _run(Persistence(), [0], 2, session)
    with Checkpoint("r", path=tmp_path) as session:
        model = Persistence()
        session.write()
        session.write_count = 0
        _x, coords = _batch([0])
        assert model.resume_step(coords) is None


def test_direct_call_on_a_restored_model_uses_the_callers_input(tmp_path):
    """A one-step call takes the caller's x (not the restored boundary) and continues the
    restored noise, exactly as the uninterrupted model would."""
    uninterrupted = StochasticModel(seed=2)
    _run(uninterrupted, [0], 2)
    x, coords = _batch([0])
    custom = torch.randn_like(x)
    expected, _ = uninterrupted(custom, coords)

    with Checkpoint("r", path=tmp_path) as session:
        _run(StochasticModel(seed=2), [0], 2, session)
    with Checkpoint("r", path=tmp_path):
        restored = StochasticModel(seed=2)
        got, _ = restored(custom, coords)
    assert torch.equal(got, expected)


def test_rollout_binds_under_its_state_id(tmp_path):
    with Checkpoint("r", path=tmp_path) as session:
        rollout = ResumableRollout("my.model.rollout")
        x, coords = _batch([0])
        it = rollout.iterate(x, coords, lambda x, c: (x + 1, c))
        next(it)
        entry = session.write()
    assert "my.model.rollout" in entry.state_ids
