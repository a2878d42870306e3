"""Random-number-generator state as plain values, so a restart continues bit for bit.

A resumed job reproduces an uninterrupted one only if every generator it draws from picks
up exactly where it stopped, cached half-states included (Python's ``gauss_next``, NumPy's
cached Gaussian and buffered 32-bit word). Each state is captured as tensors, ndarrays,
ints, floats, str and dicts, which :mod:`distckpt.format.tree` stores without pickle, and is
tagged with its ``kind`` so restoring it into the wrong sort of generator fails loudly
instead of silently reseeding.

- :func:`capture` / :func:`restore`: one generator object (``torch.Generator``,
  ``numpy.random.Generator``, ``numpy.random.RandomState``, ``random.Random``).
- :func:`capture_global` / :func:`restore_global`: the process-global generators (torch
  CPU, torch CUDA when initialised, NumPy's legacy global, Python's ``random``).
- :class:`GlobalRngState`: the global state as a dataclass for ``bind_checkpoint_state``.
- :class:`GeneratorState`: several named (or member-keyed) generators of a component.

Every restore validates the whole state before it touches any generator, so a refused
restore leaves the process as it was.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distckpt.errors import CheckpointSerializationError, CheckpointStateSchemaError

RngObject = torch.Generator | np.random.Generator | np.random.RandomState | random.Random
"""The generator objects :func:`capture` and :func:`restore` accept."""

Key = str | int

TORCH = "torch.Generator"
NUMPY = "numpy.random.Generator"
LEGACY = "numpy.random.RandomState"
PYTHON = "random.Random"
GLOBAL = "global"

_PY_MT_WORDS = 625  # 624 Mersenne Twister words + the position, as random.getstate() has


class RngStateError(CheckpointStateSchemaError):
    """A saved RNG state cannot go into the live generator (other kind, too few devices)."""


def kind_of(obj: object) -> str | None:
    """The ``kind`` tag a generator's state carries, or None if it is not supported."""
    if isinstance(obj, torch.Generator):
        return TORCH
    if isinstance(obj, np.random.Generator):
        return NUMPY
    if isinstance(obj, np.random.RandomState):
        return LEGACY
    if isinstance(obj, random.Random):
        return PYTHON
    return None


# -- capture ---------------------------------------------------------------------------------


def capture(obj: RngObject) -> dict[str, Any]:
    """The state of one generator as ``{"kind": ..., "state": ...}``; codec-storable.

    - ``torch.Generator``: ``{"device": <device type>, "state": uint8 CPU tensor}``
      (``get_state()``; a CUDA generator's state is its seed and offset).
    - ``numpy.random.Generator``: ``state`` is ``bit_generator.state`` (a dict naming the
      bit generator; PCG64 holds 128-bit Python ints, others uint32/uint64 ndarrays).
    - ``numpy.random.RandomState``: ``get_state(legacy=False)``, the dict form, which also
      holds the cached Gaussian and works for any bit generator.
    - ``random.Random``: ``{"version": int, "mt": uint32 ndarray of 625, "gauss_next":
      float | None}``, i.e. ``getstate()`` with its 625 ints as one array.
    """
    kind = kind_of(obj)
    if isinstance(obj, torch.Generator):
        return {"kind": kind, "device": obj.device.type, "state": obj.get_state()}
    if isinstance(obj, np.random.Generator):
        return {"kind": kind, "state": _copy_tree(obj.bit_generator.state)}
    if isinstance(obj, np.random.RandomState):
        return {"kind": kind, "state": _copy_tree(obj.get_state(legacy=False))}
    if isinstance(obj, random.SystemRandom):
        raise CheckpointSerializationError(
            "random.SystemRandom draws from the operating system and has no state to capture"
        )
    if isinstance(obj, random.Random):
        return {"kind": kind, "state": _python_state(obj.getstate())}
    raise CheckpointSerializationError(
        f"cannot capture the RNG state of a {type(obj).__qualname__} (supported: "
        f"{TORCH}, {NUMPY}, {LEGACY}, {PYTHON})"
    )


def _copy_tree(value: Any) -> Any:
    """Detach a captured state from the generator: later draws must not change it."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    return value


def _python_state(state: tuple[Any, ...]) -> dict[str, Any]:
    version, words, gauss_next = state
    if len(words) != _PY_MT_WORDS or not all(0 <= w < 2**32 for w in words):
        raise CheckpointSerializationError(
            f"random.getstate() returned {len(words)} words, expected {_PY_MT_WORDS} uint32s"
        )
    return {
        "version": int(version),
        "mt": np.array(words, dtype=np.uint32),
        "gauss_next": gauss_next,
    }


def capture_global() -> dict[str, Any]:
    """The process-global generators' states, for :func:`restore_global`.

    Keys: ``kind`` (``"global"``), ``torch_cpu`` (uint8 tensor), ``torch_cuda`` (one uint8
    tensor per device, empty unless CUDA is initialised: capturing must not initialise
    CUDA), ``cuda_device_count``, ``numpy`` (the legacy ``np.random`` global, as
    :func:`capture` encodes a RandomState) and ``python`` (the ``random`` module).
    """
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "kind": GLOBAL,
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": cuda,
        "cuda_device_count": len(cuda),
        "numpy": {"kind": LEGACY, "state": _copy_tree(np.random.get_state(legacy=False))},
        "python": {"kind": PYTHON, "state": _python_state(random.getstate())},
    }


# -- restore ---------------------------------------------------------------------------------


def restore(obj: RngObject, state: Mapping[str, Any]) -> None:
    """Put a state from :func:`capture` back into ``obj``; the next draws continue it.

    Raises :class:`RngStateError` (a ``CheckpointStateSchemaError``) naming both kinds when
    the state is of another kind or bit generator, and when it is malformed.
    """
    _prepare(obj, state)()


def restore_global(state: Mapping[str, Any]) -> None:
    """Put a state from :func:`capture_global` back into the process-global generators.

    CUDA states are restored when the state holds any; if fewer CUDA devices are visible
    than it was captured on, nothing is restored and :class:`RngStateError` is raised. When
    CUDA is not initialised yet, torch applies them when it initialises.
    """
    _check_kind(state, GLOBAL, "the process-global generators")
    cpu = _byte_tensor(state.get("torch_cpu"), "torch_cpu")
    expected = torch.get_rng_state().numel()
    if cpu.numel() != expected:
        raise RngStateError(
            f"torch CPU RNG state has {cpu.numel()} bytes, this torch expects {expected}"
        )
    cuda = _cuda_states(state)
    numpy_state = _sub(state, "numpy", LEGACY)
    scratch = np.random.RandomState(copy.deepcopy(np.random.mtrand.get_bit_generator()))
    apply_numpy = _prepare_legacy(scratch, np.random.set_state, numpy_state.get("state"))
    python_state = _sub(state, "python", PYTHON)
    apply_python = _prepare_python(random.setstate, python_state.get("state"))
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    apply_numpy()
    apply_python()


def _cuda_states(state: Mapping[str, Any]) -> list[torch.Tensor]:
    states = state.get("torch_cuda")
    count = state.get("cuda_device_count")
    if not isinstance(states, list | tuple) or not isinstance(count, int) or count != len(states):
        raise RngStateError(
            f"malformed CUDA RNG state: {type(states).__qualname__} of states for "
            f"cuda_device_count={count!r}"
        )
    if not states:
        return []
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < count:
        raise RngStateError(
            f"the RNG state holds CUDA generators of {count} devices, but only {visible} "
            "are visible (check CUDA_VISIBLE_DEVICES); refusing to restore part of it"
        )
    return [_byte_tensor(t, f"torch_cuda/{i}") for i, t in enumerate(states)]


def _sub(state: Mapping[str, Any], key: str, kind: str) -> Mapping[str, Any]:
    value = state.get(key)
    if not isinstance(value, Mapping):
        raise RngStateError(f"the global RNG state has no {key!r} entry")
    _check_kind(value, kind, f"the global {key!r} generator")
    return value


def _check_kind(state: Mapping[str, Any], expected: str, target: str) -> None:
    if not isinstance(state, Mapping):
        raise RngStateError(f"an RNG state is a mapping, not a {type(state).__qualname__}")
    kind = state.get("kind")
    if kind != expected:
        raise RngStateError(
            f"cannot restore RNG state of kind {kind!r} into {target} (kind {expected!r})"
        )


def _byte_tensor(value: Any, what: str) -> torch.Tensor:
    """Generators take their state as a CPU uint8 tensor; the binding layer may rehome it."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        desc = (
            f"{value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__qualname__
        )
        raise RngStateError(f"RNG state {what!r} must be a 1-D uint8 tensor, not a {desc}")
    return value.detach().to("cpu").contiguous()


def _prepare(obj: object, state: Mapping[str, Any]) -> Callable[[], None]:
    """Validate ``state`` for ``obj`` and return what applies it (so nothing half-applies)."""
    kind = kind_of(obj)
    if kind is None:
        raise RngStateError(
            f"cannot restore RNG state into a {type(obj).__qualname__} (supported: "
            f"{TORCH}, {NUMPY}, {LEGACY}, {PYTHON})"
        )
    _check_kind(state, kind, "this generator")
    inner = state.get("state")
    if isinstance(obj, torch.Generator):
        return _prepare_torch(obj, state.get("device"), inner)
    if isinstance(obj, np.random.Generator):
        return _prepare_numpy(obj, inner)
    if isinstance(obj, np.random.RandomState):
        return _prepare_legacy(copy.deepcopy(obj), obj.set_state, inner)
    assert isinstance(obj, random.Random)
    if isinstance(obj, random.SystemRandom):
        raise RngStateError("random.SystemRandom has no state to restore")
    return _prepare_python(obj.setstate, inner)


def _prepare_torch(gen: torch.Generator, device: Any, inner: Any) -> Callable[[], None]:
    if device != gen.device.type:
        raise RngStateError(
            f"cannot restore the state of a {device!r} torch.Generator into a "
            f"{gen.device.type!r} one (their states differ in layout)"
        )
    tensor = _byte_tensor(inner, "state")
    expected = gen.get_state().numel()
    if tensor.numel() != expected:
        raise RngStateError(
            f"torch.Generator state has {tensor.numel()} bytes, the live {gen.device.type!r} "
            f"generator's has {expected}"
        )

    def apply() -> None:
        gen.set_state(tensor)

    return apply


def _bit_generator_name(inner: Any) -> Any:
    return inner.get("bit_generator") if isinstance(inner, Mapping) else None


def _prepare_numpy(gen: np.random.Generator, inner: Any) -> Callable[[], None]:
    saved = _bit_generator_name(inner)
    live = gen.bit_generator.state["bit_generator"]
    if saved != live:
        raise RngStateError(
            f"cannot restore {saved!r} bit-generator state into a numpy.random.Generator "
            f"driven by {live!r}"
        )
    state = _copy_tree(dict(inner))
    _try_on(copy.deepcopy(gen.bit_generator), lambda bg: setattr(bg, "state", state), saved)
    return lambda: setattr(gen.bit_generator, "state", state)


def _prepare_legacy(
    scratch: np.random.RandomState, set_state: Callable[[Any], Any], inner: Any
) -> Callable[[], None]:
    """``scratch``: a throwaway RandomState like the live one; ``set_state`` applies."""
    saved = _bit_generator_name(inner)
    live = scratch.get_state(legacy=False)["bit_generator"]
    if saved != live:
        raise RngStateError(
            f"cannot restore {saved!r} bit-generator state into a numpy.random.RandomState "
            f"driven by {live!r}"
        )
    state = _copy_tree(dict(inner))
    _try_on(scratch, lambda rs: rs.set_state(state), "RandomState")
    return lambda: set_state(state)


def _prepare_python(set_state: Callable[[Any], Any], inner: Any) -> Callable[[], None]:
    if not isinstance(inner, Mapping):
        raise RngStateError(f"malformed random.Random state: {type(inner).__qualname__}")
    words = inner.get("mt")
    version = inner.get("version")
    gauss_next = inner.get("gauss_next")
    if isinstance(words, torch.Tensor):
        words = words.cpu().numpy()
    if not isinstance(words, np.ndarray) or words.shape != (_PY_MT_WORDS,):
        raise RngStateError(f"random.Random state needs {_PY_MT_WORDS} words in 'mt'")
    if not isinstance(version, int) or not (gauss_next is None or isinstance(gauss_next, float)):
        raise RngStateError(
            f"malformed random.Random state: version={version!r}, gauss_next={gauss_next!r}"
        )
    value = (version, tuple(int(w) for w in words), gauss_next)
    _try_on(random.Random(0), lambda r: r.setstate(value), "random.Random")
    return lambda: set_state(value)


def _try_on(scratch: Any, apply: Callable[[Any], Any], what: Any) -> None:
    """Apply a state to a scratch generator first: the library's own check, minus effects."""
    try:
        apply(scratch)
    except Exception as exc:  # any failure on the scratch copy means the state is bad
        raise RngStateError(f"the saved {what} state is malformed: {exc}") from exc


# -- dataclasses for the Earth2Studio-compatible layer ---------------------------------------


@dataclass
class GlobalRngState:
    """The process-global RNG state as restartable fields.

    Register it with ``bind_checkpoint_state(GlobalRngState())``: the checkpoint layer
    calls ``__checkpoint_save__`` just before a row is written (so the row holds the
    generators as of that write) and ``__checkpoint_restore__`` after binding restored the
    fields (so the process continues the saved streams). Fields mirror
    :func:`capture_global`; None means nothing was captured yet.
    """

    torch_cpu: torch.Tensor | None = None
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    cuda_device_count: int = 0
    numpy: dict[str, Any] | None = None
    python: dict[str, Any] | None = None

    def __checkpoint_save__(self) -> None:
        """Capture the process's generators into the fields."""
        state = capture_global()
        self.torch_cpu = state["torch_cpu"]
        self.torch_cuda = state["torch_cuda"]
        self.cuda_device_count = state["cuda_device_count"]
        self.numpy = state["numpy"]
        self.python = state["python"]

    def __checkpoint_restore__(self) -> None:
        """Apply the fields to the process's generators (all or, on error, none)."""
        if self.torch_cpu is None or self.numpy is None or self.python is None:
            raise RngStateError("GlobalRngState holds no captured state to restore")
        restore_global(
            {
                "kind": GLOBAL,
                "torch_cpu": self.torch_cpu,
                "torch_cuda": self.torch_cuda,
                "cuda_device_count": self.cuda_device_count,
                "numpy": self.numpy,
                "python": self.python,
            }
        )


@dataclass
class GeneratorState:
    """The states of a component's generators, keyed by name or member id.

    Use it as a field of a bound dataclass (or bind it alone): call :meth:`capture_from`
    before each checkpoint write and :meth:`restore_into` once the state was restored, with
    the same mapping of live generators.
    """

    states: dict[Key, dict[str, Any]] = field(default_factory=dict)

    def capture_from(self, generators: Mapping[Key, RngObject]) -> GeneratorState:
        """Replace the held states with those of ``generators``; returns ``self``."""
        for key in generators:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise CheckpointSerializationError(
                    f"generator key {key!r} is not a str or int (the checkpoint keys states "
                    "by them)"
                )
        self.states = {key: capture(gen) for key, gen in generators.items()}
        return self

    def restore_into(self, generators: Mapping[Key, RngObject], *, strict: bool = True) -> None:
        """Restore every live generator from its saved state (all or, on error, none).

        Every key of ``generators`` must have a saved state; with ``strict`` (the default)
        the saved keys must also all be live, so a changed ensemble is not resumed silently.
        """
        missing = [k for k in generators if k not in self.states]
        extra = [k for k in self.states if k not in generators]
        if missing or (strict and extra):
            raise RngStateError(
                f"saved generator keys {sorted(self.states, key=repr)} do not match the live "
                f"ones {sorted(generators, key=repr)} (no saved state for {missing}, not "
                f"live: {extra})"
            )
        appliers = []
        for key, gen in generators.items():
            try:
                appliers.append(_prepare(gen, self.states[key]))
            except RngStateError as exc:
                raise RngStateError(f"generator {key!r}: {exc}") from exc
        for apply in appliers:
            apply()


__all__ = [
    "GeneratorState",
    "GlobalRngState",
    "RngObject",
    "RngStateError",
    "capture",
    "capture_global",
    "kind_of",
    "restore",
    "restore_global",
]
