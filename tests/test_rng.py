"""RNG state capture/restore: after save and load, every generator continues bit for bit."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import distckpt
from distckpt import (
    Checkpoint,
    CheckpointError,
    CheckpointSerializationError,
    CheckpointStateSchemaError,
    GeneratorState,
    GlobalRngState,
    RngStateError,
    bind_checkpoint_state,
)
from distckpt.format.tree import Leaf, decode, encode
from distckpt.session.rng import capture, capture_global, restore, restore_global

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def keep_global_generators() -> Iterator[None]:
    """These tests reseed the process-global generators; put them back afterwards."""
    cpu, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    yield
    torch.set_rng_state(cpu)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


# -- per-kind helpers --------------------------------------------------------------------------


def _torch_cpu(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numpy(bit_generator: type[np.random.BitGenerator]) -> Callable[[int], np.random.Generator]:
    return lambda seed: np.random.Generator(bit_generator(seed))


def _legacy(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)


def _legacy_pcg(seed: int) -> np.random.RandomState:
    return np.random.RandomState(np.random.PCG64(seed))


FACTORIES: dict[str, Callable[[int], Any]] = {
    "torch-cpu": _torch_cpu,
    "numpy-PCG64": _numpy(np.random.PCG64),
    "numpy-PCG64DXSM": _numpy(np.random.PCG64DXSM),
    "numpy-MT19937": _numpy(np.random.MT19937),
    "numpy-Philox": _numpy(np.random.Philox),
    "numpy-SFC64": _numpy(np.random.SFC64),
    "legacy-MT19937": _legacy,
    "legacy-PCG64": _legacy_pcg,
    "python": random.Random,
}


def _advance(gen: Any) -> None:
    """Draw an odd number of values, so cached half-states are live at capture."""
    if isinstance(gen, torch.Generator):
        torch.randn(3, generator=gen, device=gen.device)
    elif isinstance(gen, np.random.Generator):
        gen.random(3, dtype=np.float32)  # leaves a buffered 32-bit word (has_uint32)
    elif isinstance(gen, np.random.RandomState):
        gen.standard_normal(3)  # leaves a cached Gaussian (has_gauss)
        assert gen.get_state(legacy=False)["has_gauss"] == 1
    else:
        gen.gauss(0.0, 1.0)  # leaves gauss_next set
        assert gen.getstate()[2] is not None


def _draws(gen: Any) -> list[Any]:
    if isinstance(gen, torch.Generator):
        normal = torch.randn(5, generator=gen, device=gen.device)
        ints = torch.randint(0, 2**31, (3,), generator=gen, device=gen.device)
        return normal.tolist() + ints.tolist()
    if isinstance(gen, np.random.Generator):
        return [
            *gen.standard_normal(5),
            *gen.random(3, dtype=np.float32),
            *gen.integers(0, 2**40, 3),
        ]
    if isinstance(gen, np.random.RandomState):
        return [*gen.standard_normal(5), *gen.randint(0, 2**31, 3)]
    return [gen.random() for _ in range(5)] + [gen.gauss(0.0, 1.0) for _ in range(3)]


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.randn(3)
    np.random.standard_normal(3)
    random.gauss(0.0, 1.0)
    assert random.getstate()[2] is not None
    assert np.random.get_state(legacy=False)["has_gauss"] == 1


def _global_draws() -> list[Any]:
    return [
        *torch.randn(5).tolist(),
        *np.random.randn(5).tolist(),
        *(random.random() for _ in range(5)),
        *(random.gauss(0.0, 1.0) for _ in range(3)),
        *np.random.standard_normal(3).tolist(),
    ]


def _global_snapshot() -> tuple[bytes, str, tuple[Any, ...]]:
    np_state = np.random.get_state(legacy=False)
    return (
        torch.get_rng_state().numpy().tobytes(),
        repr((np_state["state"]["key"].tobytes(), np_state["state"]["pos"], np_state["gauss"])),
        random.getstate(),
    )


# -- single generators -------------------------------------------------------------------------


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_every_kind_continues_bit_for_bit_after_save_and_load(tmp_path, make):
    gen = make(1)
    _advance(gen)
    state = capture(gen)
    distckpt.save({"rng": state}, tmp_path)
    expected = _draws(gen)  # the uninterrupted run

    resumed = make(2)  # a restarted process builds its generator afresh, then restores
    target = {"rng": capture(resumed)}
    distckpt.load(target, tmp_path)
    restore(resumed, target["rng"])
    assert _draws(resumed) == expected

    restore(resumed, target["rng"])  # a state is not used up by restoring it
    assert _draws(resumed) == expected


def test_states_load_without_a_template(tmp_path):
    gens = {name: make(11) for name, make in FACTORIES.items()}
    for gen in gens.values():
        _advance(gen)
    distckpt.save({name: capture(gen) for name, gen in gens.items()}, tmp_path)
    expected = {name: _draws(gen) for name, gen in gens.items()}

    loaded: dict[str, Any] = {}
    distckpt.load(loaded, tmp_path)
    for name, make in FACTORIES.items():
        resumed = make(3)
        restore(resumed, loaded[name])
        assert _draws(resumed) == expected[name], name


def test_state_shapes_and_kinds():
    t = capture(torch.Generator())
    assert t["kind"] == "torch.Generator" and t["device"] == "cpu"
    assert t["state"].dtype == torch.uint8 and t["state"].device.type == "cpu"
    n = capture(np.random.default_rng(0))
    assert n["kind"] == "numpy.random.Generator" and n["state"]["bit_generator"] == "PCG64"
    legacy = capture(np.random.RandomState(0))
    assert legacy["kind"] == "numpy.random.RandomState"
    assert legacy["state"]["state"]["key"].dtype == np.uint32
    p = capture(random.Random(0))
    assert p["kind"] == "random.Random"
    assert p["state"]["mt"].shape == (625,) and p["state"]["mt"].dtype == np.uint32


def test_numpy_buffered_word_is_part_of_the_state():
    gen = np.random.Generator(np.random.PCG64(5))
    _advance(gen)
    assert capture(gen)["state"]["has_uint32"] == 1


def test_captured_state_does_not_follow_later_draws():
    gen = np.random.Generator(np.random.MT19937(3))
    state = capture(gen)
    key = state["state"]["state"]["key"].copy()
    gen.random(2000)
    assert np.array_equal(state["state"]["state"]["key"], key)


def test_pcg64_128_bit_ints_survive_the_codec_and_the_store_exactly(tmp_path):
    gen = np.random.Generator(np.random.PCG64(2**100 + 7))
    gen.random()
    state = capture(gen)
    inner = state["state"]["state"]
    assert max(inner["state"], inner["inc"]) >= 2**64

    leaves: list[Leaf] = []
    node = json.loads(json.dumps(encode(state, leaves)))
    assert decode(node, lambda i, as_numpy: None) == state  # no tensors in a PCG64 state

    distckpt.save({"rng": state}, tmp_path)
    loaded: dict[str, Any] = {}
    distckpt.load(loaded, tmp_path)
    back = loaded["rng"]["state"]["state"]
    assert type(back["state"]) is int and back == inner


# -- process-global generators -----------------------------------------------------------------


def test_global_generators_continue_bit_for_bit_after_save_and_load(tmp_path):
    _seed_globals(1)
    state = capture_global()
    assert state["kind"] == "global" and state["cuda_device_count"] == len(state["torch_cuda"])
    distckpt.save({"rng": state}, tmp_path)
    expected = _global_draws()

    _seed_globals(2)
    target = {"rng": capture_global()}
    distckpt.load(target, tmp_path)
    restore_global(target["rng"])
    assert _global_draws() == expected


def test_global_rng_state_hooks_capture_and_apply():
    _seed_globals(1)
    state = GlobalRngState()
    state.__checkpoint_save__()
    expected = _global_draws()
    _seed_globals(2)
    state.__checkpoint_restore__()
    assert _global_draws() == expected


def test_global_rng_state_bound_to_a_checkpoint_resumes_bit_for_bit(tmp_path):
    _seed_globals(1)
    with Checkpoint("rng", path=tmp_path / "ckpt") as session:
        bound = bind_checkpoint_state(GlobalRngState())
        bound.__checkpoint_save__()  # the checkpoint layer's hook before a row is written
        session.write()
    expected = _global_draws()

    _seed_globals(2)  # the restarted process
    with Checkpoint("rng", path=tmp_path / "ckpt"):
        live = GlobalRngState()
        proxy = bind_checkpoint_state(live)
        assert proxy.checkpoint_state_loaded and live.torch_cpu is not None
        live.__checkpoint_restore__()  # the checkpoint layer's hook after binding
    assert _global_draws() == expected


def test_an_empty_global_rng_state_refuses_to_restore():
    with pytest.raises(RngStateError, match="no captured state"):
        GlobalRngState().__checkpoint_restore__()


def test_restore_global_refuses_missing_cuda_devices_and_changes_nothing():
    _seed_globals(1)
    state = capture_global()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (visible + 1)
    state["cuda_device_count"] = visible + 1
    _seed_globals(2)
    before = _global_snapshot()
    with pytest.raises(RngStateError, match=f"{visible + 1} devices, but only {visible}"):
        restore_global(state)
    assert _global_snapshot() == before


def test_restore_global_refuses_a_single_generator_state():
    with pytest.raises(RngStateError, match=r"'torch\.Generator'.*'global'"):
        restore_global(capture(torch.Generator()))


def test_restore_global_refuses_a_malformed_part_and_changes_nothing():
    _seed_globals(1)
    state = capture_global()
    state["python"]["state"]["mt"] = state["python"]["state"]["mt"][:100]
    _seed_globals(2)
    before = _global_snapshot()
    with pytest.raises(RngStateError, match="625 words"):
        restore_global(state)
    assert _global_snapshot() == before


# -- several generators of a component ---------------------------------------------------------


@dataclasses.dataclass
class Ensemble:
    step: int = 0
    rng: GeneratorState = dataclasses.field(default_factory=GeneratorState)


def _members(seed: int) -> dict[str | int, Any]:
    return {
        0: torch.Generator().manual_seed(seed),
        1: np.random.default_rng(seed + 1),
        2: random.Random(seed + 2),
        "legacy": np.random.RandomState(seed + 3),
    }


def test_generator_state_round_trips_member_keyed_generators():
    gens = _members(1)
    for gen in gens.values():
        _advance(gen)
    held = GeneratorState().capture_from(gens)
    assert set(held.states) == {0, 1, 2, "legacy"}
    expected = {k: _draws(g) for k, g in gens.items()}
    resumed = _members(9)
    held.restore_into(resumed)
    assert {k: _draws(g) for k, g in resumed.items()} == expected


def test_generator_state_in_a_bound_dataclass_resumes_bit_for_bit(tmp_path):
    gens = _members(1)
    for gen in gens.values():
        _advance(gen)
    with Checkpoint("ens", path=tmp_path / "ckpt") as session:
        ens = bind_checkpoint_state(Ensemble())
        ens.step = 3
        ens.rng.capture_from(gens)
        session.write()
    expected = {k: _draws(g) for k, g in gens.items()}

    resumed = _members(7)
    with Checkpoint("ens", path=tmp_path / "ckpt"):
        ens = bind_checkpoint_state(Ensemble())
        assert ens.checkpoint_state_loaded and ens.step == 3
        assert set(ens.rng.states) == {0, 1, 2, "legacy"}  # int keys stay ints
        ens.rng.restore_into(resumed)
    assert {k: _draws(g) for k, g in resumed.items()} == expected


def test_generator_state_refuses_changed_members_and_applies_nothing():
    held = GeneratorState().capture_from(_members(1))
    live = _members(2)
    del live[2]
    with pytest.raises(RngStateError, match="not live"):
        held.restore_into(live)
    held.restore_into(live, strict=False)  # a subset may resume when asked for

    live = _members(2)
    live["legacy"] = torch.Generator()  # wrong kind for its saved state
    first = live[0].get_state()
    with pytest.raises(RngStateError, match="generator 'legacy'"):
        held.restore_into(live)
    assert torch.equal(live[0].get_state(), first)  # nothing was applied


def test_generator_state_refuses_unstorable_keys():
    with pytest.raises(CheckpointSerializationError, match="not a str or int"):
        GeneratorState().capture_from({(0, 1): random.Random()})  # type: ignore[dict-item]


# -- refusals ----------------------------------------------------------------------------------


def test_restoring_another_kind_names_both_kinds():
    with pytest.raises(RngStateError) as info:
        restore(torch.Generator(), capture(np.random.default_rng(0)))
    assert "numpy.random.Generator" in str(info.value) and "torch.Generator" in str(info.value)
    assert isinstance(info.value, CheckpointStateSchemaError)
    assert isinstance(info.value, CheckpointError)

    with pytest.raises(RngStateError, match=r"'torch\.Generator'.*'random\.Random'"):
        restore(random.Random(), capture(torch.Generator()))


def test_restoring_another_bit_generator_names_both():
    pcg = capture(np.random.default_rng(0))
    with pytest.raises(RngStateError, match=r"'PCG64'.*'MT19937'"):
        restore(np.random.Generator(np.random.MT19937(0)), pcg)
    with pytest.raises(RngStateError, match=r"'MT19937'.*'PCG64'"):
        restore(np.random.RandomState(np.random.PCG64(0)), capture(np.random.RandomState(0)))


def test_malformed_states_are_refused_and_leave_the_generator_alone():
    gen = np.random.Generator(np.random.MT19937(4))
    state = capture(gen)
    state["state"]["state"]["key"] = state["state"]["state"]["key"][:10]
    before = gen.bit_generator.state["state"]["key"].copy()
    with pytest.raises(RngStateError, match="malformed"):
        restore(gen, state)
    assert np.array_equal(gen.bit_generator.state["state"]["key"], before)

    t = capture(torch.Generator())
    t["state"] = t["state"][:-8]
    with pytest.raises(RngStateError, match="bytes"):
        restore(torch.Generator(), t)
    t["state"] = torch.zeros(5056, dtype=torch.int32)
    with pytest.raises(RngStateError, match="uint8"):
        restore(torch.Generator(), t)
    with pytest.raises(RngStateError, match="mapping"):
        restore(random.Random(), ("not", "a", "state"))  # type: ignore[arg-type]


def test_unsupported_objects_are_refused():
    with pytest.raises(CheckpointSerializationError, match="list"):
        capture([1, 2])  # type: ignore[arg-type]
    with pytest.raises(CheckpointSerializationError, match="SystemRandom"):
        capture(random.SystemRandom())
    with pytest.raises(RngStateError, match="SystemRandom"):
        restore(random.SystemRandom(), capture(random.Random()))
    with pytest.raises(RngStateError, match="dict"):
        restore({}, capture(random.Random()))  # type: ignore[arg-type]


# -- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_cuda_generator_continues_bit_for_bit(tmp_path):
    gen = torch.Generator(device="cuda").manual_seed(1)
    _advance(gen)
    state = capture(gen)
    assert state["device"] == "cuda" and state["state"].device.type == "cpu"
    distckpt.save({"rng": state}, tmp_path)
    expected = _draws(gen)

    resumed = torch.Generator(device="cuda").manual_seed(2)
    target = {"rng": capture(resumed)}
    distckpt.load(target, tmp_path)
    restore(resumed, target["rng"])
    assert _draws(resumed) == expected

    with pytest.raises(RngStateError, match=r"'cuda'.*'cpu'"):
        restore(torch.Generator(), state)


@pytest.mark.cuda
@needs_cuda
def test_cuda_global_generators_continue_bit_for_bit(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(1)
    torch.randn(3, device="cuda")
    state = capture_global()
    assert state["cuda_device_count"] == torch.cuda.device_count() == len(state["torch_cuda"])
    distckpt.save({"rng": state}, tmp_path)
    expected = torch.randn(5, device="cuda").tolist()

    torch.cuda.manual_seed_all(2)
    target = {"rng": capture_global()}
    distckpt.load(target, tmp_path)
    restore_global(target["rng"])
    assert torch.randn(5, device="cuda").tolist() == expected


@pytest.mark.cuda
@needs_cuda
def test_cuda_bound_global_state_restores_from_a_cuda_checkpoint(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(1)
    with Checkpoint("rng", path=tmp_path / "ckpt", device="cuda") as session:
        bound = bind_checkpoint_state(GlobalRngState())
        bound.__checkpoint_save__()
        session.write()
    expected = torch.randn(5, device="cuda").tolist()

    torch.cuda.manual_seed_all(2)
    with Checkpoint("rng", path=tmp_path / "ckpt", device="cuda"):
        live = GlobalRngState()
        bind_checkpoint_state(live)  # fields with no live tensor land on cuda: still fine
        live.__checkpoint_restore__()
    assert torch.randn(5, device="cuda").tolist() == expected
