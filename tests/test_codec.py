"""State trees are stored as tagged JSON, never pickle, and come back with their types."""

from __future__ import annotations

import datetime as dt
import json
import math
import pickle
import re
import sys

import crc32c
import numpy as np
import pytest
import torch

import distckpt
from distckpt.format import checked
from distckpt.format.layout import MANIFESTS_DIR, ROWS_DIR, manifest_name, row_name


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every pickle entry point (and torch.save/torch.load, which use it) explode."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle (or torch.save/torch.load) was used")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def manifest_path(store, row: int, rank: int = 0):
    return store / ROWS_DIR / row_name(row) / MANIFESTS_DIR / manifest_name(rank)


def assert_same(got, want, where: str = "<root>") -> None:
    """Equal values of exactly the same types, all the way down (NaN equals NaN)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        a = got.contiguous().reshape(-1).view(torch.uint8)
        b = want.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.tobytes() == want.tobytes(), where
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype, where
        assert got.tobytes() == want.tobytes(), where
    elif isinstance(want, float):
        assert got == want or (math.isnan(got) and math.isnan(want)), where
        assert math.copysign(1.0, got) == math.copysign(1.0, want), where
    elif isinstance(want, complex):
        assert_same(got.real, want.real, f"{where}.real")
        assert_same(got.imag, want.imag, f"{where}.imag")
    elif isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), where
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert type(gk) is type(wk), f"{where}: key {wk!r} changed type"
            assert_same(gv, wv, f"{where}/{wk}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}/{i}")
    elif isinstance(want, dt.datetime):
        assert got == want and got.utcoffset() == want.utcoffset(), where
    else:
        assert got == want, where


def rich_state() -> dict:
    gen = torch.Generator().manual_seed(0)
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    return {
        "model": {
            "weight": torch.randn(3, 4, generator=gen),
            "big": torch.randn(300_000, generator=gen),  # its own array
            "half": torch.randn(5, generator=gen).to(torch.bfloat16),
            "step": torch.tensor(7),
        },
        "arrays": {
            "f64": np.arange(6.0).reshape(2, 3),
            "i16": np.arange(5, dtype=np.int16),
            "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
        },
        "containers": {
            "tuple": (1, "a", (2.5, None), ()),
            "nested": [[1, [2, [3, (4, [5])]]], [], {}],
            "tensors_inside": [torch.ones(2), (torch.zeros(1), {"t": torch.arange(3)})],
            "arrays_inside": (np.ones(3, dtype=np.float32), [np.zeros(2, dtype=np.uint8)]),
        },
        "times": {
            "datetime": dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
            "aware": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=ist),
            "utc": dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
            "date": dt.date(1999, 12, 31),
            "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
            "np_datetime": np.datetime64("2024-01-02T03:04:05.123456789", "ns"),
            "np_day": np.datetime64("2024-03-01", "D"),
            "np_timedelta": np.timedelta64(-3, "h"),
            "np_nat": np.datetime64("NaT", "s"),
        },
        "numpy_scalars": {
            "int64": np.int64(-(2**62)),
            "int8": np.int8(-7),
            "uint8": np.uint8(255),
            "uint64": np.uint64(2**64 - 1),
            "float32": np.float32(1.25),
            "float16": np.float16(-0.5),
            "float32_nan": np.float32("nan"),
            "float32_inf": np.float32("-inf"),
            "bool": np.bool_(True),
            "complex64": np.complex64(1 - 2j),
            "complex128": np.complex128(3 + 4j),
        },
        "torch_values": {
            "size": torch.Size([2, 3]),
            "empty_size": torch.Size([]),
            "dtype": torch.bfloat16,
            "float8": torch.float8_e4m3fn,
            "int": torch.int64,
        },
        "scalars": {
            "bytes": bytes(range(256)),
            "empty_bytes": b"",
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "neg_zero": -0.0,
            "big_int": 2**100,
            "neg_int": -(2**63),
            "complex": complex(1.5, -2.5),
            "true": True,
            "none": None,
            "text": "température 温度 🌡️ \x00 nul",
            "empty_text": "",
        },
        "keys": {
            "int_keys": {1: "a", -2: "b", 3: {4: [5]}, 2**70: "huge"},
            "mixed": {1: "int one", "1": "str one"},
        },
    }


def test_everything_round_trips_without_pickle(tmp_path, no_pickle):
    state = rich_state()
    store = tmp_path / "s"
    distckpt.save(state, store)
    out: dict = {}
    distckpt.load(out, store)
    assert_same(out, state)


def test_store_holds_only_json_and_raw_chunks(tmp_path):
    """Every file is a JSON document or raw tensor bytes: format 2 keeps a rank's tensors in
    one data array, each a byte range whose CRC-32C the manifest records."""
    store = tmp_path / "s"
    row = distckpt.save(rich_state(), store, note=("a", 1))
    arrays = json.loads(manifest_path(store, row).read_text())["arrays"]
    data_files = []
    for path in store.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
        else:
            data_files.append(data)
    (data,) = data_files  # one rank, one data array
    for a in arrays:
        chunk = data[a["offset"] : a["offset"] + a["nbytes"]]
        assert len(chunk) == a["nbytes"] and crc32c.crc32c(chunk) == a["crc32c"], a["name"]


def test_metadata_round_trips_with_types_without_pickle(tmp_path, no_pickle):
    meta = {
        "step": 12,
        "loss": 0.25,
        "when": dt.datetime(2024, 5, 6, 7, 8, 9),
        "window": dt.timedelta(hours=6),
        "shape": (3, 4),
        "by_rank": {0: "a", 1: "b"},
        "nested": {"list": [1, (2, 3)], "bytes": b"\x00\xff", "nan": math.nan},
        "np_step": np.int32(4),
        "np_time": np.datetime64("2024-01-01T00:00", "m"),
    }
    store = tmp_path / "s"
    distckpt.save({"x": torch.ones(1)}, store, **meta)
    assert_same(distckpt.metadata(store), meta)


@pytest.mark.parametrize("value", [np.float64(1.5), np.str_("ab")], ids=["float64", "str_"])
def test_numpy_scalar_subclasses_of_builtins_keep_their_type(tmp_path, value):
    distckpt.save({"s": {"v": value}}, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    assert_same(out["s"]["v"], value)


def test_manifest_is_strict_json_with_non_finite_values(tmp_path):
    state = {
        "s": {
            "nan": math.nan,
            "complex": complex(math.nan, math.inf),
            "np_complex": np.complex64(complex(1, math.nan)),
        }
    }
    store = tmp_path / "s"
    row = distckpt.save(state, store, worst=complex(-math.inf, 0))

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads(manifest_path(store, row).read_text(), parse_constant=refuse)
    out: dict = {}
    distckpt.load(out, store)
    assert_same(out, state)


# -- refusals --------------------------------------------------------------------------------


class Opaque:
    pass


UNSUPPORTED = [
    pytest.param(Opaque(), id="object"),
    pytest.param(lambda: 1, id="lambda"),
    pytest.param({1, 2}, id="set"),
    pytest.param(frozenset({1}), id="frozenset"),
    pytest.param({(1, 2): "x"}, id="tuple_key"),
    pytest.param({True: "x"}, id="bool_key"),
    pytest.param({None: "x"}, id="none_key"),
    pytest.param(np.array([object(), 1], dtype=object), id="numpy_object_array"),
    pytest.param(Opaque, id="class"),
    pytest.param(sys, id="module"),
    pytest.param(dt.time(12, 0), id="time"),
    pytest.param(np.bytes_(b"ab"), id="numpy_bytes_scalar"),
    pytest.param(np.longdouble(1.1), id="numpy_longdouble"),
]


@pytest.mark.parametrize(
    "value",
    [
        np.array([["t2m", "u10"], ["v10", "tcwv"]]),
        np.array(["2024-01-01T00", "2024-01-01T06"], dtype="datetime64[h]"),
        np.array([0, 6, 12], dtype="timedelta64[h]"),
        np.array([[1, -2]], dtype="datetime64[ns]")[:, ::-1],
    ],
    ids=["str_array", "datetime_array", "timedelta_array", "strided_ns_array"],
)
def test_coordinate_arrays_round_trip(tmp_path, value):
    """Coordinates (variable names, times, lead times) are stored as what they are."""
    distckpt.save({"coords": {"c": value}}, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    got = out["coords"]["c"]
    assert got.dtype == value.dtype and got.shape == value.shape
    assert np.array_equal(got, value)


@pytest.mark.parametrize("value", UNSUPPORTED)
def test_unsupported_value_is_refused_naming_its_path(tmp_path, value):
    store = tmp_path / "s"
    with pytest.raises(distckpt.CheckpointError, match=re.escape("'model/weird'")):
        distckpt.save({"model": {"fine": torch.ones(2), "weird": value}}, store)
    assert distckpt.latest(store) is None


def test_unsupported_value_in_a_list_names_its_index(tmp_path):
    with pytest.raises(distckpt.CheckpointError, match=re.escape("'opt/groups/1/fn'")):
        distckpt.save({"opt": {"groups": [{"lr": 1}, {"fn": print}]}}, tmp_path / "s")


@pytest.mark.parametrize("value", [Opaque(), {1, 2}, {(1, 2): "x"}], ids=["object", "set", "key"])
def test_unsupported_value_raises_serialization_error(tmp_path, value):
    with pytest.raises(distckpt.CheckpointSerializationError, match=re.escape("'model/weird'")):
        distckpt.save({"model": {"weird": value}}, tmp_path / "s")


def test_metadata_holding_tensors_and_arrays_comes_back_with_type_dtype_and_values(tmp_path):
    # Earth2Studio accepts them (write(mask=torch.tensor([True, False]), scores=...)).
    meta = {
        "mask": torch.tensor([True, False]),
        "info": {"t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)},
        "scores": np.asarray([[0.25, -1.5]], dtype=np.float32),
        "times": np.array(["2024-01-01T06", "2024-01-02T00"], dtype="datetime64[h]"),
    }
    distckpt.save({"x": torch.ones(1)}, tmp_path / "s", **meta)
    back = distckpt.metadata(tmp_path / "s")
    assert isinstance(back["mask"], torch.Tensor) and torch.equal(back["mask"], meta["mask"])
    t = back["info"]["t"]
    assert t.dtype == torch.bfloat16 and torch.equal(t, meta["info"]["t"])
    for name in ("scores", "times"):
        assert isinstance(back[name], np.ndarray) and back[name].dtype == meta[name].dtype
        assert np.array_equal(back[name], meta[name])


def test_unstorable_metadata_raises_serialization_error_naming_its_path(tmp_path):
    with pytest.raises(distckpt.CheckpointSerializationError, match=re.escape("'info/t'")):
        distckpt.save({"x": torch.ones(1)}, tmp_path / "s", info={"t": object()})
    assert distckpt.latest(tmp_path / "s") is None


# -- loading never runs code from the checkpoint ---------------------------------------------


class _ImportRecorder:
    """A meta-path finder that records (and refuses) imports of one module name."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.prefix):
            self.attempts.append(fullname)
        return None


def test_stored_type_names_are_never_imported(tmp_path, monkeypatch, no_pickle):
    store = tmp_path / "s"
    row = distckpt.save({"cfg": {"lr": 0.1}}, store)
    path = manifest_path(store, row)
    doc = json.loads(path.read_text())
    doc["states"]["cfg"]["tree"] = {
        "dataclass": {
            "type": "distckpt_evil_probe.Payload",
            "fields": [["lr", {"v": 0.5}], ["cmd", {"v": "rm -rf /"}]],
        }
    }
    path.write_bytes(checked.seal(doc))
    recorder = _ImportRecorder("distckpt_evil_probe")
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])

    out: dict = {}
    distckpt.load(out, store)
    assert recorder.attempts == []
    assert out["cfg"] == {"lr": 0.5, "cmd": "rm -rf /"}


def test_unknown_stored_tag_is_refused_not_interpreted(tmp_path, no_pickle):
    store = tmp_path / "s"
    row = distckpt.save({"cfg": {"lr": 0.1}}, store)
    path = manifest_path(store, row)
    doc = json.loads(path.read_text())
    doc["states"]["cfg"]["tree"] = {"pickle": "gASVAAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOULg=="}
    path.write_bytes(checked.seal(doc))
    with pytest.raises(distckpt.CheckpointError, match="pickle"):
        distckpt.load({}, store)
