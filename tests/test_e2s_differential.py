"""Differential tests: the same scenarios against Earth2Studio 0.19's own checkpoint module
and against distckpt, comparing everything a caller can observe.

Earth2Studio's ``earth2studio.utils.checkpoint`` is the oracle. Each scenario is a function
of a library namespace (``lib``) and a directory; it returns observations (values, their
types, exception classes and messages, warnings). Both runs must observe the same, except
for the differences listed in docs/earth2studio.md, which are asserted here as exactly what
the docs say (``NUMPY_SCALAR_FIELDS``: distckpt keeps NumPy scalar types). The order of
keys in a returned dict is not compared (Earth2Studio's own differs between calls).

Each scenario runs in a fresh ``contextvars`` context: both libraries keep the current
checkpoint and pending states in context variables.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("earth2studio")

import distckpt
from distckpt.compat import earth2studio as compat

# -- the two libraries -------------------------------------------------------------------------

NAMES = (
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointLevel",
    "CheckpointSerializationError",
    "CheckpointSession",
    "CheckpointState",
    "CheckpointStateCollision",
    "CheckpointStateSchemaError",
    "LoadedState",
    "NullCheckpoint",
    "PendingCheckpointState",
    "bind_checkpoint_state",
    "default_checkpoint_path",
)


def earth2studio_lib() -> types.SimpleNamespace:
    """Earth2Studio's own objects, even while ``use_distckpt()`` swapped its names."""
    import earth2studio.utils.checkpoint as source

    originals = dict(compat._originals) if compat.is_active() else {}
    return types.SimpleNamespace(
        name="earth2studio", **{n: originals.get(n, getattr(source, n)) for n in NAMES}
    )


def distckpt_lib() -> types.SimpleNamespace:
    return types.SimpleNamespace(name="distckpt", **{n: getattr(distckpt, n) for n in NAMES})


@pytest.fixture(scope="module")
def libs() -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    return earth2studio_lib(), distckpt_lib()


def run_both(
    libs: tuple[types.SimpleNamespace, types.SimpleNamespace],
    tmp_path: Path,
    scenario: Callable[[types.SimpleNamespace, Path], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    results = []
    for lib in libs:
        path = tmp_path / lib.name
        path.mkdir()
        results.append(contextvars.copy_context().run(scenario, lib, path))
    return results[0], results[1]


# -- comparison --------------------------------------------------------------------------------


def same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` are of one type and equal (tensors and arrays: dtype, shape, values)."""
    assert type(a) is type(b) or (is_dataclass(a) and is_dataclass(b)), (
        f"{where}: {type(a).__qualname__} != {type(b).__qualname__} ({a!r} vs {b!r})"
    )
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, dict):
        # Key order is not compared: Earth2Studio itself returns a row's metadata in
        # insertion order from write() and sorted once read back from its JSON files.
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif is_dataclass(a) and not isinstance(a, type):
        for f in fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def compare(oracle: dict[str, Any], ours: dict[str, Any]) -> None:
    assert list(oracle) == list(ours)
    for key in oracle:
        same(oracle[key], ours[key], key)


def outcome(call: Callable[[], Any]) -> tuple[str, str] | tuple[str, Any]:
    """``("ok", value)`` or ``("raised", <exception class name>)``."""
    try:
        return ("ok", call())
    except Exception as exc:
        return ("raised", type(exc).__name__)


# -- states ------------------------------------------------------------------------------------


@dataclass
class Inner:
    count: int = 0
    weights: torch.Tensor = field(default_factory=lambda: torch.zeros(2))


@dataclass
class AllKinds:
    """One field of every kind Earth2Studio's codec stores."""

    none: Any = None
    flag: bool = False
    number: int = 0
    real: float = 0.0
    text: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tdtype: torch.dtype = torch.float32
    ndtype: np.dtype = field(default_factory=lambda: np.dtype("float32"))
    npdatetime: Any = None
    nptimedelta: Any = None
    when: dt.datetime | None = None
    day: dt.date | None = None
    span: dt.timedelta | None = None
    items: list[Any] = field(default_factory=list)
    pair: tuple[Any, ...] = ()
    table: dict[str, Any] = field(default_factory=dict)
    tensor: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    array: np.ndarray = field(default_factory=lambda: np.zeros(1))
    inner: Inner = field(default_factory=Inner)
    npfloat: Any = None
    npint: Any = None
    npbool: Any = None


def filled() -> AllKinds:
    return AllKinds(
        none=None,
        flag=True,
        number=-7,
        real=0.1,
        text="t2m",
        device=torch.device("cuda", 1),
        tdtype=torch.bfloat16,
        ndtype=np.dtype("int16"),
        npdatetime=np.datetime64("2024-01-01T06", "h"),
        nptimedelta=np.timedelta64(90, "m"),
        when=dt.datetime(2024, 1, 1, 6, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        day=dt.date(2024, 2, 29),
        span=dt.timedelta(days=1, seconds=5, microseconds=7),
        items=[1, "a", [2.5, None], torch.arange(3)],
        pair=(1, (2, "b"), np.arange(2)),
        table={"a": 1, "b": {"c": [True]}, "d": torch.ones(2, dtype=torch.float64)},
        tensor=torch.arange(12, dtype=torch.float32).reshape(3, 4),
        array=np.linspace(0, 1, 5),
        inner=Inner(count=3, weights=torch.tensor([0.5, -0.5])),
        npfloat=np.float32(1.5),
        npint=np.int64(9),
        npbool=np.bool_(True),
    )


#: Fields where distckpt deliberately differs: Earth2Studio returns NumPy scalars as the
#: Python scalar of their value (``value.item()``); distckpt returns the NumPy type.
NUMPY_SCALAR_FIELDS = ("npfloat", "npint", "npbool")


@dataclass
class Toy:
    step: int = 0
    x: torch.Tensor = field(default_factory=lambda: torch.zeros(2))


@dataclass
class Other:
    seed: int = 0


# -- names and signatures ----------------------------------------------------------------------


PUBLIC_CALLABLES = {
    "Checkpoint": ("__init__", "select", "refresh", "__enter__"),
    "CheckpointSession": (
        "__init__",
        "bind",
        "write",
        "flush",
        "metadata_value",
        "artifact",
        "__enter__",
    ),
    "CheckpointState": ("__init__",),
    "NullCheckpoint": ("write", "flush", "__enter__"),
}


def parameters(func: Callable[..., Any]) -> list[tuple[str, Any]]:
    """Positional-or-keyword and var parameters (distckpt's keyword-only extras aside)."""
    return [
        (p.name, p.kind)
        for p in inspect.signature(func).parameters.values()
        if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]


def test_every_public_name_and_signature_matches(libs):
    oracle, ours = libs
    for cls_name, methods in PUBLIC_CALLABLES.items():
        for method in methods:
            theirs = getattr(getattr(oracle, cls_name), method)
            mine = getattr(getattr(ours, cls_name), method)
            assert parameters(mine) == parameters(theirs), f"{cls_name}.{method}"
    assert parameters(ours.bind_checkpoint_state) == parameters(oracle.bind_checkpoint_state)
    assert parameters(ours.default_checkpoint_path) == parameters(oracle.default_checkpoint_path)
    assert ours.CheckpointLevel == oracle.CheckpointLevel
    for cls_name in ("Checkpoint", "CheckpointSession", "CheckpointState", "NullCheckpoint"):
        theirs = {n for n in dir(getattr(oracle, cls_name)) if not n.startswith("_")}
        mine = set(dir(getattr(ours, cls_name)))
        assert theirs <= mine, f"{cls_name} lacks {sorted(theirs - mine)}"
    for record in ("CheckpointEntry", "LoadedState", "PendingCheckpointState"):
        theirs = [f.name for f in fields(getattr(oracle, record))]
        mine = [f.name for f in fields(getattr(ours, record))]
        assert mine[: len(theirs)] == theirs, record  # distckpt's extras come last
    assert {n for n in dir(oracle.CheckpointEntry) if not n.startswith("_")} <= set(
        dir(ours.CheckpointEntry)
    )
    for error in ("CheckpointStateCollision", "CheckpointSerializationError"):
        assert issubclass(getattr(ours, error), ours.CheckpointError)
    assert issubclass(ours.CheckpointError, RuntimeError)


# -- the codec: every value kind ---------------------------------------------------------------


def scenario_value_kinds(lib: Any, path: Path) -> dict[str, Any]:
    with lib.Checkpoint("kinds", path=path, level=2) as session:
        session.bind(filled())
        session.write()
    restored = AllKinds()
    inner = restored.inner
    with lib.Checkpoint("kinds", path=path, level=2) as session:
        proxy = session.bind(restored)
        loaded = proxy.checkpoint_state_loaded
    obs = {f.name: getattr(restored, f.name) for f in fields(AllKinds)}
    obs["inner_filled_in_place"] = restored.inner is inner
    obs["loaded"] = loaded
    return obs


def test_every_value_kind_comes_back_with_its_type_and_value(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_value_kinds)
    expected = filled()
    for name in NUMPY_SCALAR_FIELDS:
        value = getattr(expected, name)
        theirs, mine = oracle.pop(name), ours.pop(name)
        same(theirs, value.item(), name)  # Earth2Studio: the Python scalar
        same(mine, value, name)  # distckpt: the NumPy scalar itself
    compare(oracle, ours)
    for f in fields(AllKinds):
        if f.name not in NUMPY_SCALAR_FIELDS and f.name != "inner":
            same(ours[f.name], getattr(expected, f.name), f.name)
    assert ours["inner_filled_in_place"] and ours["loaded"]


# -- metadata ----------------------------------------------------------------------------------

METADATA = {
    "lead_time": np.asarray([np.timedelta64(6, "h")]),
    "mask": torch.tensor([True, False]),
    "scores": np.asarray([[0.25, 1.5], [2.0, -3.0]], dtype=np.float32),
    "scalar_tensor": torch.tensor([2.5]),
    "when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    "device": torch.device("cpu"),
    "dtype": torch.float16,
    "nested": {"a": [1, 2], "b": (3, "x")},
    "completed_ensembles": [0, 1],
}


def scenario_metadata(lib: Any, path: Path) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    ckpt = lib.Checkpoint("meta", path=path, level=1)
    with ckpt as session:
        entry = session.write(**METADATA)
        obs["entry_keys"] = entry.metadata_keys
        obs["entry_artifacts"] = entry.artifacts
        obs["entry_lead_time"] = entry.lead_time
        obs["entry_write_count"] = entry.write_count
        obs["entry_commit_id_type"] = type(entry.commit_id)
        count = session.write_count
        try:
            session.write(bad=object())
        except Exception as exc:
            obs["bad_error"] = type(exc).__name__
            obs["bad_names_key"] = "Invalid checkpoint metadata 'bad'" in str(exc)
        obs["count_unchanged_after_bad"] = session.write_count == count
    with lib.Checkpoint("meta", path=path, level=1) as session:
        obs["exists"] = session.exists
        obs["lead_time"] = session.lead_time
        for key in METADATA:
            obs[f"value.{key}"] = session.metadata_value(key)
        obs["artifact"] = session.artifact("mask")
        obs["metadata_keys"] = sorted(session.metadata)
        obs["artifacts_keys"] = sorted(session.artifacts)
        obs["missing"] = outcome(lambda: session.metadata_value("absent"))
        catalog_entry = lib.Checkpoint("meta", path=path).catalog[-1]
        obs["catalog_keys"] = catalog_entry.metadata_keys
        obs["catalog_write_count"] = catalog_entry.write_count
        obs["catalog_lead_time"] = catalog_entry.lead_time
    return obs


def test_metadata_tensors_arrays_and_errors_match(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_metadata)
    compare(oracle, ours)
    assert ours["bad_error"] == "CheckpointSerializationError" and ours["bad_names_key"]
    assert isinstance(ours["value.mask"], torch.Tensor)
    assert ours["lead_time"] == np.timedelta64(6, "h")


# -- catalog: overwrite, append, history, flush intervals, select ------------------------------


def catalog_view(ckpt: Any) -> list[tuple[int, Any, dict[str, Any]]]:
    return [(e.write_count, e.lead_time, dict(e.metadata)) for e in ckpt.catalog]


def selected(ckpt: Any, row: int) -> tuple[Any, ...]:
    s = ckpt.select(row)
    return (s.write_count, s.lead_time, bool(s), s.exists, s.metadata)


def scenario_catalog(lib: Any, path: Path) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    configs = {
        "overwrite": {"mode": "overwrite"},
        "append": {"mode": "append"},
        "history2": {"mode": "append", "history_size": 2},
        "interval3": {"mode": "append", "flush_interval": 3},
        "manual": {"mode": "append", "flush_interval": None},
    }
    for name, kwargs in configs.items():
        ckpt = lib.Checkpoint(name, path=path / name, level=1, **kwargs)
        with ckpt as session:
            state = session.bind(Toy())
            returned = []
            for i in range(5):
                state.step = i
                due = state.checkpoint_is_flush_due
                entry = session.write(lead_time=i, i=i)
                returned.append((due, entry is not None, state.checkpoint_write_count))
            obs[f"{name}.returned"] = returned
            obs[f"{name}.before_flush"] = catalog_view(ckpt)
            flushed = session.flush(note="end")
            obs[f"{name}.flush_returned"] = None if flushed is None else flushed.write_count
            obs[f"{name}.second_flush"] = session.flush()
        obs[f"{name}.catalog"] = catalog_view(ckpt)
        for row in (0, -1, -2, 7):
            obs[f"{name}.select{row}"] = outcome(lambda c=ckpt, r=row: selected(c, r))
        with ckpt.select(0) as session:
            toy = session.bind(Toy())
            obs[f"{name}.select0_state"] = (toy.step, toy.checkpoint_state_loaded)
            obs[f"{name}.select0_lead"] = toy.checkpoint_lead_time
    empty = lib.Checkpoint("empty", path=path / "empty")
    obs["empty_select"] = outcome(lambda: empty.select(-1))
    obs["empty_catalog"] = empty.catalog
    return obs


def test_catalog_modes_history_flush_intervals_and_select(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_catalog)
    compare(oracle, ours)
    assert len(ours["history2.catalog"]) == 2 and len(ours["append.catalog"]) == 6


# -- binding: before and after entering, collisions, schema ------------------------------------


def scenario_binding(lib: Any, path: Path) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    with lib.Checkpoint("bind", path=path, level=2) as session:
        session.bind(Toy(step=5, x=torch.tensor([1.0, 2.0])))
        session.bind(Other(seed=11))
        session.write(lead_time=np.timedelta64(12, "h"))
    # bound before the session: restored late, with a warning
    ckpt = lib.Checkpoint("bind", path=path, level=2)
    early = lib.bind_checkpoint_state(Toy())
    obs["early_again_is_same"] = lib.bind_checkpoint_state(early) is early
    obs["early_before"] = (early.step, early.checkpoint_enabled, early.checkpoint_selected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckpt as session:
            late = lib.bind_checkpoint_state(Other())
            obs["early_after"] = (early.step, early.checkpoint_state_loaded, early.x)
            obs["late_after"] = (late.seed, late.checkpoint_state_loaded)
            obs["rebind_same"] = session.bind(early) is early
            obs["bind_same_instance"] = (
                session.bind(early.checkpoint_dataclass) is early,
                lib.bind_checkpoint_state(late.checkpoint_dataclass) is late,
            )
            obs["collision"] = outcome(lambda: session.bind(Toy()))
            obs["not_a_dataclass"] = outcome(lambda: session.bind(object()))
            obs["a_class"] = outcome(lambda: session.bind(Toy))
            obs["lead"] = (early.checkpoint_lead_time, early.checkpoint_metadata)
    obs["warnings"] = sorted({w.category.__name__ for w in caught})
    # a new session in an empty store: no warning, nothing restored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = lib.Checkpoint("fresh", path=path / "fresh")
        pre = lib.bind_checkpoint_state(Toy(step=2))
        with fresh:
            obs["fresh"] = (pre.step, pre.checkpoint_state_loaded, pre.checkpoint_selected)
    obs["fresh_warnings"] = [w.category.__name__ for w in caught]
    # the schema changed: refused at bind, before any field is touched
    changed = type("Toy", (), {"__annotations__": {"step": int, "y": float}})
    changed.__module__, changed.__qualname__ = Toy.__module__, Toy.__qualname__
    changed_cls = dataclass(changed)
    with lib.Checkpoint("bind", path=path, level=2) as session:
        live = changed_cls(step=-1, y=0.5)
        obs["schema"] = outcome(lambda: session.bind(live))
        obs["schema_untouched"] = (live.step, live.y)
        obs["schema_not_bound"] = len(session.bound_states)
    # level 0 restores nothing, even from a row that holds the state
    with lib.Checkpoint("bind", path=path, level=0) as session:
        toy = session.bind(Toy())
        obs["level0"] = (toy.step, toy.checkpoint_state_loaded, toy.checkpoint_level)
    return obs


def test_binding_before_and_after_the_session_collisions_and_schema(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_binding)
    compare(oracle, ours)
    assert ours["warnings"] == ["UserWarning"] and ours["fresh_warnings"] == []
    assert ours["schema"] == ("raised", "CheckpointStateSchemaError")


# -- the proxy ---------------------------------------------------------------------------------


def proxy_view(p: Any) -> dict[str, Any]:
    return {
        "dataclass": p.checkpoint_dataclass,
        "enabled": p.checkpoint_enabled,
        "level": p.checkpoint_level,
        "device": p.checkpoint_device,
        "alias": p.device,
        "interval": p.checkpoint_flush_interval,
        "count": p.checkpoint_write_count,
        "due": p.checkpoint_is_flush_due,
        "selected": p.checkpoint_selected,
        "loaded": p.checkpoint_state_loaded,
        "lead": p.checkpoint_lead_time,
        "metadata": dict(p.checkpoint_metadata),
        "labels": dict(p.checkpoint_labels),
        "repr": repr(p),
    }


def scenario_proxy(lib: Any, path: Path) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    outside = lib.CheckpointState(Toy(step=1))
    obs["outside"] = proxy_view(outside)
    obs["outside_rebind"] = lib.bind_checkpoint_state(outside) is outside
    outside.step = 4
    obs["set_field"] = outside.checkpoint_dataclass.step
    obs["set_device"] = outcome(lambda: setattr(outside, "device", "cuda"))
    obs["set_checkpoint_x"] = outcome(lambda: setattr(outside, "checkpoint_level", 2))
    ckpt = lib.Checkpoint("proxy", path=path, level=1, flush_interval=3, device="cpu")
    pending = lib.bind_checkpoint_state(outside)
    obs["pending_same"] = pending is outside
    obs["pending"] = proxy_view(pending)
    with ckpt as session:
        obs["adopted"] = proxy_view(outside)
        for _ in range(2):
            session.write(lead_time=dt.timedelta(hours=6))
        obs["inside"] = proxy_view(outside)
        session.write()
        obs["after_flush"] = proxy_view(outside)
    obs["after_exit"] = proxy_view(outside)
    return obs


def test_proxy_outside_pending_and_inside_a_session(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_proxy)
    compare(oracle, ours)
    assert ours["outside"]["level"] == 0 and ours["set_device"] == ("raised", "AttributeError")


# -- sessions: nesting, properties, write_count ------------------------------------------------


def scenario_session(lib: Any, path: Path) -> dict[str, Any]:
    obs: dict[str, Any] = {}
    ckpt = lib.Checkpoint("session", path=path, level=1)
    obs["active_outside"] = ckpt.active
    with ckpt as a:
        with ckpt as b:
            obs["nested_same"] = a is b
            obs["active"] = ckpt.active is a and a.is_active
        obs["still_active"] = a.is_active
        obs["new"] = (a.exists, bool(a), a.commit_id, a.lead_time, a.metadata, a.write_count)
        obs["device"] = a.device
        obs["labels"] = a.labels
        a.write(lead_time=1)
        a.write_count = 0
        a.write(lead_time=2)
        obs["count_after_reset"] = a.write_count
    obs["inactive"] = a.is_active
    with ckpt as c:
        obs["resumed"] = (c.exists, c.write_count, c.lead_time, type(c.commit_id))
        with ckpt.select(-1) as d:
            obs["select_inside"] = (d is c, d.write_count)
    obs["rank_path_is_path"] = ckpt.rank_path == Path(ckpt.path)
    obs["settings"] = (ckpt.mode, ckpt.flush_interval, ckpt.history_size, ckpt.level)
    obs["rank"] = (ckpt.rank, ckpt.world_size)
    append = lib.Checkpoint("a", path=path / "a", mode="append", history_size=3)
    obs["append_settings"] = (append.history_size, append.mode)
    for bad in ({"mode": "x"}, {"flush_interval": 0}, {"history_size": 0}, {"level": 3}):
        obs[f"invalid{sorted(bad)}"] = outcome(lambda bad=bad: lib.Checkpoint("x", **bad))
    return obs


def test_sessions_nest_and_report_like_earth2studio(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_session)
    compare(oracle, ours)
    assert ours["nested_same"]


def scenario_null(lib: Any, path: Path) -> dict[str, Any]:
    null = lib.NullCheckpoint()
    null.write_count = 3
    with null as entered:
        return {
            "entered_self": entered is null,
            "bool": bool(null),
            "values": (null.exists, null.lead_time, null.level, null.write_count),
            "devices": (null.device, null.checkpoint_device),
            "maps": (dict(null.metadata), dict(null.labels), null.is_active),
            "catalog_self": null.catalog is null,
            "write": null.write(lead_time=1, x=torch.ones(1)),
            "flush": null.flush(y=2),
        }


def test_null_checkpoint(libs, tmp_path):
    oracle, ours = run_both(libs, tmp_path, scenario_null)
    compare(oracle, ours)


# -- objects of the two libraries do not mix ---------------------------------------------------


def test_a_proxy_of_earth2studios_module_is_refused_naming_use_distckpt(libs, tmp_path):
    oracle, ours = libs

    def scenario() -> None:
        foreign = oracle.CheckpointState(Toy(step=3))  # a component built before the swap
        with ours.Checkpoint("mix", path=tmp_path / "a") as session:
            for bind in (session.bind, ours.bind_checkpoint_state):
                with pytest.raises(distckpt.ForeignCheckpointStateError, match="use_distckpt"):
                    bind(foreign)
            assert session.bound_states == {}
        # states waiting on Earth2Studio's own Checkpoint would be left out of every row
        oracle.Checkpoint("theirs", path=tmp_path / "theirs")
        oracle.bind_checkpoint_state(Other())
        mine = ours.Checkpoint("mix", path=tmp_path / "b")
        with pytest.raises(distckpt.ForeignCheckpointStateError, match="use_distckpt") as info:
            mine.__enter__()
        assert info.value.state_id == f"{Other.__module__}.{Other.__qualname__}"
        assert isinstance(info.value, distckpt.CheckpointError | TypeError)

    contextvars.copy_context().run(scenario)
