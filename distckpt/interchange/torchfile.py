"""``torch.save`` files: read only with ``weights_only=True``; write a plain state_dict.

A file whose pickle needs any global outside torch's weights-only allowlist is refused,
never unpickled, and the error names the global.
"""

from __future__ import annotations

import datetime as _dt
import io
import pickle
import re
from typing import Any, BinaryIO

import numpy as np
import torch

from distckpt.errors import ExportFormatError, ImportFormatError
from distckpt.format.tree import Path, path_str
from distckpt.interchange.records import Imported
from distckpt.storage.filesystem import LocalFileSystem

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WEIGHTS_ERROR = re.compile(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", re.S)


def load_weights_only(
    source: str | BinaryIO, *, name: str | None = None, what: str = "torch.save file"
) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU, failures as ImportFormatError
    naming ``name`` (default: the path)."""
    path = name if name is not None else str(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = _GLOBAL.search(text)
        if found:
            raise ImportFormatError(
                f"{path}: refusing to load this {what}: its pickle needs the global "
                f"{found.group(1)}, which is not a tensor or plain container type; loading it "
                "could run code from the file (distckpt reads torch files with "
                "weights_only=True only). Re-save it as a plain state_dict."
            ) from None
        raise ImportFormatError(
            f"{path}: not a loadable {what} (damaged, or not a torch file): {_reason(text)}"
        ) from None
    except Exception as exc:  # weights-only loading runs no code: any failure is the file's
        raise ImportFormatError(
            f"{path}: cannot read this {what} (truncated or damaged?): {_reason(str(exc))}"
        ) from None


def _reason(text: str) -> str:
    found = _WEIGHTS_ERROR.search(text)
    reason = found.group(1) if found else text
    return " ".join(reason.split())[:300]


def read_torch(path: str) -> Imported:
    """A torch.save file holding a dict (a state_dict) as one row's state."""
    obj = load_weights_only(path)
    if not isinstance(obj, dict):
        raise ImportFormatError(
            f"{path}: holds a {type(obj).__qualname__}, not a state_dict (a dict of tensors "
            "and values)"
        )
    return Imported(state=dict(obj))


def check_torch_safe(tree: Any, path: Path = ()) -> tuple[Any, list[str]]:
    """``tree`` as torch.load(weights_only=True) can read it back: numpy arrays become
    tensors (reported); values it cannot read are refused, naming the key."""
    notes: list[str] = []

    def walk(value: Any, where: Path) -> Any:
        if isinstance(value, torch.Tensor | torch.Size | torch.dtype):
            return value
        if isinstance(value, np.ndarray):
            notes.append(f"{path_str(where)!r}: numpy array written as a torch tensor")
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, np.generic):
            notes.append(f"{path_str(where)!r}: numpy scalar written as a Python scalar")
            return value.item()
        if value is None or isinstance(value, bool | int | float | complex | str | bytes):
            return value
        if isinstance(value, dict):
            return {k: walk(v, (*where, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*where, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(walk(v, (*where, i)) for i, v in enumerate(value))
        if isinstance(value, _dt.datetime | _dt.date | _dt.timedelta):
            raise ExportFormatError(
                f"{path_str(where)!r} is a {type(value).__name__}, which torch.load("
                "weights_only=True) cannot read; export to safetensors keeps it as JSON"
            )
        raise ExportFormatError(
            f"{path_str(where)!r} is a {type(value).__qualname__}, which torch.load("
            "weights_only=True) cannot read"
        )

    return walk(tree, path), notes


def write_torch(tree: dict[str, Any], dest: str) -> list[str]:
    """Write ``tree`` with torch.save, atomically (temp file, fsync, rename)."""
    safe, notes = check_torch_safe(tree)
    buf = io.BytesIO()  # torch.save needs a file object; the seam publishes bytes
    torch.save(safe, buf)
    LocalFileSystem().atomic_write(dest, buf.getbuffer())
    return notes
