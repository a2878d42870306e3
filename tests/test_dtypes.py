"""Every supported dtype, layout and tensor flavour round-trips bit-exactly through save/load."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import distckpt
from distckpt.format.dtypes import supported_dtypes
from distckpt.format.layout import MANIFESTS_DIR, ROWS_DIR, manifest_name, row_name
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD

pytestmark = pytest.mark.filterwarnings(
    "ignore:ComplexHalf support is experimental",
    "ignore:.*quantized tensor creation functions.*deprecated",
    "ignore:The PyTorch API of nested tensors is in prototype stage",
    "ignore:Sparse CSR tensor support is in beta state",
)

DTYPES = supported_dtypes()


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def special_patterns(itemsize: int) -> list[bytes]:
    """Little-endian bit patterns that lossy paths mangle (for IEEE floats the first two are
    -0.0 and a negative NaN with every payload bit set)."""
    sign_only = bytes(itemsize - 1) + b"\x80"
    all_ones = b"\xff" * itemsize
    payload_nan = b"\x7f" if itemsize == 1 else b"\x01" + b"\xff" * (itemsize - 2) + b"\x7f"
    return [sign_only, all_ones, payload_nan]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random, with special patterns planted up front."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    planted = b"".join(special_patterns(dtype.itemsize))[: raw.numel()]
    if planted:
        raw[: len(planted)] = torch.frombuffer(bytearray(planted), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def zeros_of(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """All-zero bytes (torch cannot fill some dtypes, e.g. float4, directly)."""
    return (
        torch.zeros(math.prod(shape) * dtype.itemsize, dtype=torch.uint8).view(dtype).reshape(shape)
    )


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(raw_bytes(got), raw_bytes(want))


def read_manifest(store, row: int) -> dict:
    path = store / ROWS_DIR / row_name(row) / MANIFESTS_DIR / manifest_name(0)
    return json.loads(path.read_text())


def entry(manifest: dict, name: str) -> dict:
    (found,) = [a for a in manifest["arrays"] if a["name"] == name]
    return found


def large_shape(dtype: torch.dtype) -> tuple[int, int]:
    """A 2-D shape just over the pack threshold, so the tensor gets an array of its own."""
    return (DEFAULT_PACK_THRESHOLD // (64 * dtype.itemsize) + 1, 64)


# -- every dtype, small and large ------------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtype_round_trips_bit_exactly(tmp_path, dtype, size):
    shape = (5, 7) if size == "small" else large_shape(dtype)
    value = random_bits(shape, dtype, seed=len(str(dtype)))
    original = value.clone()
    store = tmp_path / "store"
    row = distckpt.save({"model": {"w": value}}, store)

    placed = entry(read_manifest(store, row), "model/w")
    assert placed["dtype"] == dtype_id(dtype)
    assert placed["nbytes"] == value.numel() * dtype.itemsize
    assert placed["array"] == "data"  # every tensor is in the row's data array

    restored: dict = {}
    distckpt.load(restored, store)
    assert_bit_equal(restored["model"]["w"], original)

    live = zeros_of(shape, dtype)
    distckpt.load({"model": {"w": live}}, store)
    assert_bit_equal(live, original)
    assert torch.equal(raw_bytes(value), raw_bytes(original)), "save modified its input"


NAN_WITH_PAYLOAD = {  # a signalling NaN with payload 1, as an integer of the same width
    torch.float16: (torch.int16, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7F81),
    torch.float32: (torch.int32, 0x7F800001),
    torch.float64: (torch.int64, 0x7FF0000000000001),
}


@pytest.mark.parametrize("dtype", list(NAN_WITH_PAYLOAD), ids=dtype_id)
def test_signed_zero_infinities_and_nan_payloads_survive(tmp_path, dtype):
    int_type, bits = NAN_WITH_PAYLOAD[dtype]
    payload_nan = torch.tensor([bits], dtype=int_type).view(dtype)
    negative_nan = torch.tensor([-1], dtype=int_type).view(dtype)  # all bits set
    value = torch.cat(
        [torch.tensor([-0.0, 0.0, math.inf, -math.inf], dtype=dtype), payload_nan, negative_nan]
    )
    assert value[4:].isnan().all()
    distckpt.save({"x": value}, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    got = out["x"]
    assert_bit_equal(got, value)
    assert torch.signbit(got[0]) and not torch.signbit(got[1])
    assert got[2] == math.inf and got[3] == -math.inf
    assert got[4:].isnan().all() and torch.signbit(got[5])


# -- layouts and views -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=dtype_id)
def test_non_contiguous_tensors_store_their_values_only(tmp_path, dtype):
    base = random_bits((40, 30), dtype, seed=3)
    big = random_bits(large_shape(dtype), dtype, seed=4)
    views = {
        "transposed": base.t(),
        "strided": base[1::3, ::2],
        "offset_slice": base[10:12, 5:9],  # a view into a larger storage
        "expanded": base[0].expand(4, 30),  # stride 0
        "channels_last": random_bits((2, 3, 4, 5), dtype, seed=5).contiguous(
            memory_format=torch.channels_last
        ),
        "big_transposed": big.t(),
    }
    assert not any(v.is_contiguous() for v in views.values())
    store = tmp_path / "s"
    row = distckpt.save({"views": views}, store)

    manifest = read_manifest(store, row)
    for name, v in views.items():
        # Only the view's own elements are written, not the storage behind it.
        assert entry(manifest, f"views/{name}")["nbytes"] == v.numel() * dtype.itemsize

    out: dict = {}
    distckpt.load(out, store)
    for name, v in views.items():
        assert_bit_equal(out["views"][name], v)


def test_load_fills_a_non_contiguous_live_tensor_in_place(tmp_path):
    saved = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()
    distckpt.save({"x": saved}, tmp_path / "s")
    live = torch.zeros(4, 3).t()
    storage = live.untyped_storage().data_ptr()
    distckpt.load({"x": live}, tmp_path / "s")
    assert live.untyped_storage().data_ptr() == storage
    assert torch.equal(live, saved)


def test_zero_dim_and_empty_tensors_of_every_dtype(tmp_path):
    state = {
        dtype_id(dt): {
            "scalar": random_bits((), dt, seed=i),
            "rows0": torch.empty((0, 3), dtype=dt),
            "mid0": torch.empty((3, 0, 2), dtype=dt),
            "flat0": torch.empty((0,), dtype=dt),
        }
        for i, dt in enumerate(DTYPES)
    }
    store = tmp_path / "s"
    distckpt.save(state, store)
    out: dict = {}
    distckpt.load(out, store)
    for key, values in state.items():
        assert out[key]["scalar"].dim() == 0
        assert_bit_equal(out[key]["scalar"], values["scalar"])
        for name in ("rows0", "mid0", "flat0"):
            assert out[key][name].dtype == values[name].dtype
            assert out[key][name].shape == values[name].shape

    live = {k: {"scalar": zeros_of((), v["scalar"].dtype)} for k, v in state.items()}
    distckpt.load(live, store)
    for key, values in state.items():
        assert_bit_equal(live[key]["scalar"], values["scalar"])


def test_row_of_only_empty_tensors(tmp_path):
    """A row whose packed array holds no bytes at all still saves and loads."""
    state = {"e": torch.empty(0, 3), "f": torch.empty(0, dtype=torch.bfloat16)}
    distckpt.save(state, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    assert out["e"].shape == (0, 3) and out["e"].dtype == torch.float32
    assert out["f"].shape == (0,) and out["f"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=dtype_id)
@pytest.mark.parametrize("size", ["small", "large"])
def test_conj_and_neg_views_store_their_values(tmp_path, dtype, size):
    n = 9 if size == "small" else DEFAULT_PACK_THRESHOLD // dtype.itemsize + 1
    x = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    conj = x.conj()
    neg = x.conj().imag
    assert conj.is_conj() and neg.is_neg()
    store = tmp_path / "s"
    distckpt.save({"c": {"conj": conj, "neg": neg}}, store)
    out: dict = {}
    distckpt.load(out, store)
    assert torch.equal(out["c"]["conj"], conj.resolve_conj())
    assert torch.equal(out["c"]["neg"], -x.imag)
    assert not out["c"]["conj"].is_conj() and not out["c"]["neg"].is_neg()
    assert out["c"]["conj"].dtype == dtype and out["c"]["neg"].dtype == x.real.dtype


# -- numpy and Parameters --------------------------------------------------------------------

NUMPY_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


def numpy_random(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def assert_numpy_equal(got, want: np.ndarray) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_come_back_as_numpy(tmp_path, dtype):
    small = numpy_random((4, 6), dtype, seed=1)
    large = numpy_random((DEFAULT_PACK_THRESHOLD // np.dtype(dtype).itemsize + 8,), dtype, seed=2)
    state = {
        "small": small,
        "large": large,
        "fortran": np.asfortranarray(small),
        "reversed": small[::-1, ::-2],
        "empty": np.empty((0, 3), dtype=dtype),
    }
    distckpt.save({"np": state}, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    for name, want in state.items():
        assert_numpy_equal(out["np"][name], want)


def test_zero_dim_numpy_array_keeps_its_shape(tmp_path):
    value = np.array(3.5, dtype=np.float32)
    distckpt.save({"np": {"scalar": value}}, tmp_path / "s")
    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    assert_numpy_equal(out["np"]["scalar"], value)


def test_parameter_round_trips_and_live_parameter_is_filled_in_place(tmp_path):
    param = torch.nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    distckpt.save({"model": {"p": param}}, tmp_path / "s")

    out: dict = {}
    distckpt.load(out, tmp_path / "s")
    assert torch.equal(out["model"]["p"].detach(), param.detach())

    live = torch.nn.Parameter(torch.zeros(4, 5))
    state = {"model": {"p": live}}
    distckpt.load(state, tmp_path / "s")
    assert state["model"]["p"] is live
    assert isinstance(live, torch.nn.Parameter) and live.requires_grad
    assert torch.equal(live.detach(), param.detach())


# -- refused tensors -------------------------------------------------------------------------


def _sparse() -> torch.Tensor:
    return torch.eye(3).to_sparse()


def _sparse_csr() -> torch.Tensor:
    return torch.eye(3).to_sparse_csr()


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)


def _mkldnn() -> torch.Tensor:
    return torch.ones(3).to_mkldnn()


def _meta() -> torch.Tensor:
    return torch.empty(3, device="meta")


def _nested() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


REFUSED = [
    pytest.param(_sparse, id="sparse_coo"),
    pytest.param(_sparse_csr, id="sparse_csr"),
    pytest.param(_quantized, id="quantized"),
    pytest.param(
        _mkldnn,
        id="mkldnn",
        marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no mkldnn"),
    ),
    pytest.param(_meta, id="meta"),
    pytest.param(_nested, id="nested"),
]


@pytest.mark.parametrize("make", REFUSED)
def test_unstorable_tensor_is_refused_naming_its_key(tmp_path, make):
    store = tmp_path / "s"
    with pytest.raises(distckpt.CheckpointError, match=re.escape("'model/bad'")):
        distckpt.save({"model": {"ok": torch.ones(2), "bad": make()}}, store)
    assert distckpt.latest(store) is None


@pytest.mark.parametrize("make", [_sparse, _quantized], ids=["sparse_coo", "quantized"])
def test_unstorable_tensor_raises_serialization_error(tmp_path, make):
    with pytest.raises(distckpt.CheckpointSerializationError, match=re.escape("'model/bad'")):
        distckpt.save({"model": {"bad": make()}}, tmp_path / "s")


def test_stored_itemsize_needs_no_torch_and_agrees_with_it():
    from distckpt.format.dtypes import spec_for, stored_itemsize

    for dtype in supported_dtypes():
        name = str(dtype).removeprefix("torch.")
        assert stored_itemsize(name) == dtype.itemsize == spec_for(dtype).itemsize, name
    with pytest.raises(distckpt.CheckpointSerializationError, match="unknown stored dtype"):
        stored_itemsize("float128")
