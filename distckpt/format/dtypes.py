"""Mapping between torch dtypes and zarr v3 data types.

zarr v3 has no bfloat16 or float8 core types (zarr-python 3.1 cannot open them), so those are
stored as the unsigned integer of the same width and the true dtype is declared in the array's
attributes: every reader gets the exact bytes, and ``.view()`` recovers the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distckpt.errors import CheckpointSerializationError


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


_NATIVE = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}

_RAW_BY_WIDTH = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

_VIEWED = [
    torch.bfloat16,
    torch.complex32,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2,
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _build() -> dict[str, tuple[torch.dtype, DtypeSpec]]:
    table: dict[str, tuple[torch.dtype, DtypeSpec]] = {}
    for dt, zt in _NATIVE.items():
        size = dt.itemsize
        table[dtype_name(dt)] = (dt, DtypeSpec(dtype_name(dt), zt, size, True))
    for dt in _VIEWED:
        size = dt.itemsize
        table[dtype_name(dt)] = (dt, DtypeSpec(dtype_name(dt), _RAW_BY_WIDTH[size], size, False))
    return table


_TABLE = _build()


def spec_for(dtype: torch.dtype, *, where: str = "") -> DtypeSpec:
    """The on-disk layout of ``dtype``; raises for dtypes with no byte-exact representation."""
    entry = _TABLE.get(dtype_name(dtype))
    if entry is None:
        at = f" at {where!r}" if where else ""
        raise CheckpointSerializationError(f"dtype {dtype} of tensor{at} cannot be stored")
    return entry[1]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype saved under ``name``; raises for names this version does not know."""
    entry = _TABLE.get(name)
    if entry is None:
        raise CheckpointSerializationError(f"unknown stored dtype {name!r}")
    return entry[0]


def supported_dtypes() -> list[torch.dtype]:
    return [dt for dt, _ in _TABLE.values()]
