"""The Earth2Studio-compatible surface: Checkpoint, sessions, bound state, NullCheckpoint."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import distckpt
from distckpt import (
    Checkpoint,
    CheckpointEntry,
    CheckpointError,
    CheckpointSerializationError,
    CheckpointStateCollision,
    CheckpointStateSchemaError,
    NullCheckpoint,
    bind_checkpoint_state,
)


@dataclasses.dataclass
class Noise:
    field: torch.Tensor | None = None
    step: int = 0
    generator_state: torch.Tensor | None = None


@dataclasses.dataclass
class Progress:
    done: list = dataclasses.field(default_factory=list)


def _ckpt(tmp_path, **kw) -> Checkpoint:
    return Checkpoint("run", path=tmp_path / "ckpt", **kw)


def test_names_are_importable_from_the_package():
    for name in [
        "Checkpoint",
        "CheckpointSession",
        "CheckpointEntry",
        "NullCheckpoint",
        "bind_checkpoint_state",
        "CheckpointError",
        "CheckpointStateCollision",
        "CheckpointSerializationError",
        "CheckpointStateSchemaError",
        "save",
        "load",
        "latest",
    ]:
        assert hasattr(distckpt, name) and name in distckpt.__all__
    assert issubclass(CheckpointStateCollision, CheckpointError)
    assert issubclass(CheckpointSerializationError, CheckpointError)
    assert issubclass(CheckpointStateSchemaError, CheckpointError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "sometimes"},
        {"flush_interval": 0},
        {"history_size": 0},
        {"level": 3},
        {"level": True},
    ],
)
def test_invalid_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        _ckpt(tmp_path, **kwargs)


def test_rank_and_world_size_must_match_the_job(tmp_path):
    with pytest.raises(distckpt.CommunicatorError, match="world_size=2"):
        _ckpt(tmp_path, world_size=2)
    ck = _ckpt(tmp_path, rank=0, world_size=1)
    assert (ck.rank, ck.world_size) == (0, 1)


def test_default_path_is_under_distckpt_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_HOME", str(tmp_path))
    ck = Checkpoint("my-run")
    assert ck.path == tmp_path / "checkpoints" / "my-run"


def test_new_session_then_resume_restores_bound_state(tmp_path):
    with _ckpt(tmp_path) as session:
        assert not session.exists and session.write_count == 0 and session.metadata == {}
        state = bind_checkpoint_state(Noise())
        assert state.checkpoint_enabled and not state.checkpoint_state_loaded
        for i in range(3):
            state.field = torch.full((2, 2), float(i))
            state.step = i
            entry = session.write(lead_time=np.timedelta64(6 * (i + 1), "h"), done=[i])
        assert isinstance(entry, CheckpointEntry) and entry.write_count == 3

    with _ckpt(tmp_path) as session:
        assert session.exists
        assert session.write_count == 3
        assert session.lead_time == np.timedelta64(18, "h")
        # Earth2Studio's sessions report the row's lead time among the metadata too.
        assert session.metadata == {"done": [2], "lead_time": np.timedelta64(18, "h")}
        live = Noise()
        state = bind_checkpoint_state(live)
        assert state.checkpoint_state_loaded
        assert live.step == 2
        assert torch.equal(live.field, torch.full((2, 2), 2.0))
        assert state.checkpoint_level == 2 and state.checkpoint_write_count == 3


def test_proxy_forwards_attributes_and_protects_checkpoint_names(tmp_path):
    with _ckpt(tmp_path):
        state = bind_checkpoint_state(Noise(step=5))
        assert state.step == 5
        state.step = 6
        assert state.checkpoint_dataclass.step == 6
        with pytest.raises(AttributeError):
            state.checkpoint_level = 0
        with pytest.raises(AttributeError):
            state.device = "cpu"


def test_flush_interval_commits_every_n_writes(tmp_path):
    ck = _ckpt(tmp_path, flush_interval=3, mode="append")
    with ck as session:
        results = [session.write(lead_time=i) for i in range(7)]
        assert [r is not None for r in results] == [False, False, True, False, False, True, False]
        assert len(ck.catalog) == 2
        entry = session.flush()
        assert entry is not None and entry.write_count == 7 and entry.lead_time == 6
        assert session.flush() is None  # nothing pending


def test_flush_interval_none_commits_only_on_flush(tmp_path):
    ck = _ckpt(tmp_path, flush_interval=None)
    with ck as session:
        for i in range(4):
            assert session.write(lead_time=i) is None
        assert ck.catalog == ()
        assert session.flush(note="end").metadata == {"lead_time": 3, "note": "end"}


def test_overwrite_keeps_one_row_and_append_keeps_history(tmp_path):
    ck = _ckpt(tmp_path)
    with ck as session:
        for i in range(4):
            session.write(lead_time=i)
    assert [e.write_count for e in ck.catalog] == [4]
    ck2 = Checkpoint("app", path=tmp_path / "app", mode="append", history_size=2)
    with ck2 as session:
        for i in range(5):
            session.write(lead_time=i)
    assert [e.write_count for e in ck2.catalog] == [4, 5]
    assert len(ck2.store.rows()) == 2


def test_select_indexes_committed_rows(tmp_path):
    ck = _ckpt(tmp_path, mode="append")
    with pytest.raises(IndexError):
        ck.select(-1)
    with ck as session:
        for i in range(3):
            session.write(lead_time=i, i=i)
    assert ck.select(-1).metadata == {"i": 2, "lead_time": 2}
    assert ck.select(0).metadata == {"i": 0, "lead_time": 0}
    assert ck.select(-3).row == ck.catalog[0].row
    with pytest.raises(IndexError):
        ck.select(3)
    with ck.select(0) as older:
        live = Noise()
        bind_checkpoint_state(live)
        assert older.write_count == 1


def test_schema_change_names_the_state_and_fields(tmp_path):
    @dataclasses.dataclass
    class Model:
        x: torch.Tensor | None = None
        step: int = 0

    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Model(x=torch.ones(1)))
        session.write()

    @dataclasses.dataclass
    class Model:
        x: torch.Tensor | None = None
        steps_done: int = 0

    with _ckpt(tmp_path), pytest.raises(CheckpointStateSchemaError) as info:
        bind_checkpoint_state(Model())
    assert "Model" in str(info.value)
    assert "steps_done" in str(info.value) and "step" in str(info.value)


def test_binding_two_instances_of_one_class_collides_unless_ids_differ(tmp_path):
    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Noise())
        with pytest.raises(CheckpointStateCollision, match="Noise"):
            bind_checkpoint_state(Noise())
        a = bind_checkpoint_state(Noise(step=1), state_id="member-a")
        b = bind_checkpoint_state(Noise(step=2), state_id="member-b")
        session.write()
    with _ckpt(tmp_path):
        a2, b2 = Noise(), Noise()
        bind_checkpoint_state(a2, state_id="member-a")
        bind_checkpoint_state(b2, state_id="member-b")
        assert (a2.step, b2.step) == (a.step, b.step)


def test_binding_the_same_instance_twice_is_idempotent(tmp_path):
    with _ckpt(tmp_path):
        obj = Noise()
        assert bind_checkpoint_state(obj) is bind_checkpoint_state(obj)


def test_binding_requires_a_dataclass_instance(tmp_path):
    with pytest.raises(TypeError):
        bind_checkpoint_state(Noise)
    with pytest.raises(TypeError):
        bind_checkpoint_state({"a": 1})


def test_level_zero_saves_and_restores_no_state(tmp_path):
    with _ckpt(tmp_path, level=0) as session:
        bind_checkpoint_state(Noise(step=9))
        entry = session.write(done=[1])
        assert entry.state_ids == () and entry.level == 0
    with _ckpt(tmp_path, level=0) as session:
        live = Noise()
        state = bind_checkpoint_state(live)
        assert live.step == 0 and not state.checkpoint_state_loaded
        assert session.metadata == {"done": [1]}


def test_new_work_item_ends_loaded_state(tmp_path):
    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Noise(step=3))
        session.write()
    with _ckpt(tmp_path) as session:
        state = bind_checkpoint_state(Noise())
        assert state.checkpoint_state_loaded
        session.write_count = 0  # re-run the interrupted item: restored state still applies
        assert state.checkpoint_state_loaded
        session.write()
        session.write_count = 0  # a fresh item after writing: restored state is spent
        assert not state.checkpoint_state_loaded


def test_state_bound_before_the_session_is_restored_on_enter(tmp_path):
    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Noise(step=4))
        session.write()
    ck = _ckpt(tmp_path)
    live = Noise()
    state = bind_checkpoint_state(live)
    assert state.checkpoint_enabled and not state.checkpoint_state_loaded
    with warnings.catch_warnings(record=True) as caught, ck:
        warnings.simplefilter("always")
        assert live.step == 4 and state.checkpoint_state_loaded
    assert any("restored late" in str(w.message) for w in caught)


def test_reentering_a_session_rebinds_the_same_state(tmp_path):
    ck = _ckpt(tmp_path)
    with ck as session:
        state = bind_checkpoint_state(Noise(step=1))
        session.write()
    assert not state.checkpoint_selected
    with ck as session:
        assert state.checkpoint_selected
        fresh = Noise()
        bind_checkpoint_state(fresh)  # a new instance replaces the parked one
        assert fresh.step == 1


def test_restored_tensors_go_to_the_live_fields_device(tmp_path):
    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Noise(field=torch.ones(3)))
        session.write()
    with _ckpt(tmp_path, device="meta"):
        live = Noise(field=torch.empty(3, device="meta"))
        bind_checkpoint_state(live)
        assert live.field.device.type == "meta"
        # A field that held no tensor gets the checkpoint's device.
        assert live.generator_state is None
    with _ckpt(tmp_path):
        live = Noise()
        bind_checkpoint_state(live)
        assert live.field.device.type == "cpu" and torch.equal(live.field, torch.ones(3))


def test_bfloat16_and_nested_dataclass_state(tmp_path):
    @dataclasses.dataclass
    class Inner:
        scale: float = 1.0

    @dataclasses.dataclass
    class Outer:
        w: torch.Tensor
        inner: Inner

    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Outer(torch.randn(4, dtype=torch.bfloat16), Inner(2.5)))
        saved = session.bound_states[next(iter(session.bound_states))].w.clone()
        session.write()
    with _ckpt(tmp_path):
        inner = Inner()
        live = Outer(torch.zeros(4, dtype=torch.bfloat16), inner)
        bind_checkpoint_state(live)
        assert live.inner is inner and inner.scale == 2.5
        assert torch.equal(live.w.view(torch.int16), saved.view(torch.int16))


def test_without_a_checkpoint_binding_is_inert():
    import contextvars

    def fresh_context():
        state = bind_checkpoint_state(Noise())
        return state.checkpoint_enabled, state.checkpoint_level, state.checkpoint_state_loaded

    from distckpt.session import binding as binding

    ctx = contextvars.copy_context()
    ctx.run(binding._CURRENT_CHECKPOINT.set, None)
    assert ctx.run(fresh_context) == (False, 0, False)


def test_null_checkpoint_records_nothing():
    null = NullCheckpoint()
    with null as session:
        assert session is null and not session and not session.exists
        assert session.write(lead_time=1, done=[1]) is None
        assert session.flush() is None
        assert session.write_count == 0 and session.metadata == {}
        session.write_count = 0  # workflows reset it between items: accepted, ignored
        assert session.catalog.level == 0 and session.level == 0


def test_sessions_are_reentrant(tmp_path):
    """A workflow given a session enters it again; leaving that inner `with` must not end
    the caller's session."""
    ck = _ckpt(tmp_path)
    with ck as outer:
        with outer as inner:
            assert inner is outer and outer.is_active
        assert outer.is_active
        late = bind_checkpoint_state(Noise(step=3))
        assert late.checkpoint_selected is False and late.checkpoint_session is outer
        outer.write()
    assert not outer.is_active


def test_write_without_lead_time_keeps_the_pending_one(tmp_path):
    ck = _ckpt(tmp_path, flush_interval=2)
    with ck as session:
        session.write(lead_time=6)
        entry = session.write()
    assert entry.lead_time == 6


def test_errors_are_runtime_errors_like_earth2studios():
    assert issubclass(CheckpointError, RuntimeError)


def test_catalog_lists_only_committed_rows(tmp_path):
    ck = _ckpt(tmp_path, mode="append")
    with ck as session:
        session.write(lead_time=1)
        session.write(lead_time=2)
    import os

    os.remove(ck.store.manifest_path(ck.catalog[-1].row, 0))
    assert [e.lead_time for e in ck.catalog] == [1]
    with ck as session:
        assert session.lead_time == 1


def test_save_and_restore_hooks_run_around_the_fields(tmp_path):
    @dataclasses.dataclass
    class Captures:
        value: int = 0

        def __checkpoint_save__(self) -> None:
            self.value = LIVE["counter"]

        def __checkpoint_restore__(self) -> None:
            LIVE["counter"] = self.value

    LIVE = {"counter": 41}
    with _ckpt(tmp_path) as session:
        bind_checkpoint_state(Captures())
        LIVE["counter"] = 42
        session.write()
    LIVE["counter"] = 0
    with _ckpt(tmp_path):
        bind_checkpoint_state(Captures())
    assert LIVE["counter"] == 42


def test_a_write_whose_flush_fails_does_not_count(tmp_path):
    ck = _ckpt(tmp_path)
    with ck as session:
        session.write()
        with pytest.raises(CheckpointSerializationError):
            session.write(bad=object())
        assert session.write_count == 1
