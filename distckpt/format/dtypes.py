"""Mapping between torch dtypes and zarr v3 data types.

zarr v3 has no bfloat16 or float8 core types (zarr-python 3.1 cannot open them), so those are
stored as the unsigned integer of the same width and the true dtype is declared in the array's
attributes: every reader gets the exact bytes, and ``.view()`` recovers the values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distckpt.errors import CheckpointSerializationError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DtypeSpec:
    """How one torch dtype is laid out on disk."""

    name: str  # torch dtype name without the "torch." prefix
    zarr_type: str  # zarr v3 data_type
    itemsize: int
    native: bool  # False: stored as raw unsigned ints of the same width

    @property
    def fill_value(self) -> object:
        if self.zarr_type == "bool":
            return False
        if self.zarr_type.startswith("complex"):
            return [0.0, 0.0]
        if self.zarr_type.startswith("float"):
            return 0.0
        return 0


# By torch dtype name: reading a store needs no torch (the table is built on first use).
_NATIVE = {
    "bool": "bool",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "complex64": "complex64",
    "complex128": "complex128",
}

_RAW_BY_WIDTH = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

_VIEWED = [
    "bfloat16",
    "complex32",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Bytes per element of every stored dtype, for tools that size arrays without torch.
_ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "bfloat16": 2,
    "complex32": 4,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}


def stored_itemsize(name: str) -> int:
    """Bytes per element of the dtype saved under ``name`` (no torch needed)."""
    size = _ITEMSIZE.get(name)
    if size is None:
        raise CheckpointSerializationError(f"unknown stored dtype {name!r}")
    return size


@functools.cache
def _table() -> dict[str, tuple[torch.dtype, DtypeSpec]]:
    import torch

    table: dict[str, tuple[torch.dtype, DtypeSpec]] = {}
    for name, zt in _NATIVE.items():
        dt = getattr(torch, name)
        table[name] = (dt, DtypeSpec(name, zt, dt.itemsize, True))
    for name in _VIEWED:
        dt = getattr(torch, name)
        size = dt.itemsize
        table[name] = (dt, DtypeSpec(name, _RAW_BY_WIDTH[size], size, False))
    return table


def spec_for(dtype: torch.dtype, *, where: str = "") -> DtypeSpec:
    """The on-disk layout of ``dtype``; raises for dtypes with no byte-exact representation."""
    entry = _table().get(dtype_name(dtype))
    if entry is None:
        at = f" at {where!r}" if where else ""
        raise CheckpointSerializationError(f"dtype {dtype} of tensor{at} cannot be stored")
    return entry[1]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype saved under ``name``; raises for names this version does not know."""
    entry = _table().get(name)
    if entry is None:
        raise CheckpointSerializationError(f"unknown stored dtype {name!r}")
    return entry[0]


def supported_dtypes() -> list[torch.dtype]:
    return [dt for dt, _ in _table().values()]
