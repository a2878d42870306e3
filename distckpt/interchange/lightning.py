"""Lightning ``.ckpt`` files: a torch zip read weights-only, split into row and metadata.

A checkpoint made by ``Trainer`` holds only plain containers, tensors and scalars, which
``weights_only=True`` reads. Hyper-parameters are kept when JSON-safe; others are dropped
and reported. ``epoch`` and ``global_step`` also go to the row's metadata.
"""

from __future__ import annotations

import json
import math
from typing import Any

from distckpt.errors import CheckpointSerializationError, ImportFormatError
from distckpt.format import tree as codec
from distckpt.interchange.detect import LIGHTNING_KEY
from distckpt.interchange.records import Imported
from distckpt.interchange.torchfile import load_weights_only

# Keys whose loss would make the import useless: refused rather than dropped.
_REQUIRED = ("state_dict",)
_ESSENTIAL = ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step")


def read_lightning(path: str) -> Imported:
    ckpt = load_weights_only(path, what="Lightning checkpoint")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise ImportFormatError(
            f"{path}: not a Lightning checkpoint (no 'state_dict' key at the top level)"
        )
    notes: list[str] = []
    state: dict[str, Any] = {}
    for key, value in ckpt.items():
        if key == "hyper_parameters":
            value = _json_safe_hparams(value, notes)
        elif key not in _ESSENTIAL and not _storable(value):
            notes.append(f"dropped {key!r}: its values cannot be stored without pickle")
            continue
        state[key] = value
    metadata: dict[str, Any] = {}
    for key in ("epoch", "global_step"):
        if isinstance(ckpt.get(key), int):
            metadata[key] = ckpt[key]
    if "global_step" in metadata:
        metadata["step"] = metadata["global_step"]  # the STEP column of `distckpt ls`
    if isinstance(ckpt.get(LIGHTNING_KEY), str):
        metadata["lightning_version"] = ckpt[LIGHTNING_KEY]
    return Imported(state=state, metadata=metadata, notes=tuple(notes))


def _json_safe_hparams(value: Any, notes: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        notes.append(f"dropped hyper_parameters: a {type(value).__qualname__}, not a dict")
        return {}
    kept: dict[str, Any] = {}
    for name, v in value.items():
        if isinstance(name, str) and _is_json(v):
            kept[name] = v
        else:
            notes.append(f"dropped hyper-parameter {name!r}: {type(v).__qualname__} is not JSON")
    return kept


def _is_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _storable(value: Any) -> bool:
    try:
        codec.encode(value, [])
    except CheckpointSerializationError:
        return False
    return True
