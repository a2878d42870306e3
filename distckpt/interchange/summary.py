"""A short description of a foreign checkpoint for ``distckpt show``: keys, tensors, sizes.

safetensors and DCP are described from their headers alone; torch and Lightning files are
loaded weights-only (never with arbitrary unpickling).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distckpt.interchange.dcp import read_metadata
from distckpt.interchange.detect import DCP, LIGHTNING, SAFETENSORS, TORCH, Detection
from distckpt.interchange.safetensors import DTYPES, read_header
from distckpt.interchange.torchfile import load_weights_only

MAX_KEYS = 20


def summarize(detection: Detection) -> dict[str, Any]:
    """JSON-ready: format, evidence, tensor count and bytes, and the first keys."""
    doc: dict[str, Any] = {
        "path": detection.path,
        "format": detection.format,
        "evidence": list(detection.evidence),
    }
    if detection.format in (TORCH, LIGHTNING):
        doc.update(_tree_summary(load_weights_only(detection.path)))
    elif detection.format == SAFETENSORS:
        header = read_header(detection.path)
        doc["tensors"] = len(header.tensors)
        doc["tensor_bytes"] = sum(t.end - t.begin for t in header.tensors)
        doc["keys"] = [
            {"key": t.name, "summary": f"tensor {_shape(t.shape)} {DTYPES[t.dtype]}"}
            for t in header.tensors
        ]
    elif detection.format == DCP:
        doc.update(_dcp_summary(read_metadata(detection.path)))
    if "keys" in doc:
        doc["more_keys"] = max(0, len(doc["keys"]) - MAX_KEYS)
        doc["keys"] = doc["keys"][:MAX_KEYS]
    return doc


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _tree_summary(obj: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if isinstance(obj, dict):
        if isinstance(obj.get("epoch"), int):
            doc["epoch"] = obj["epoch"]
        if isinstance(obj.get("global_step"), int):
            doc["global_step"] = obj["global_step"]
        items = list(obj.items())
    else:
        items = [("<root>", obj)]
    tensors = _tensors(obj)
    doc["tensors"] = len(tensors)
    doc["tensor_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    doc["keys"] = [{"key": str(k), "summary": _describe(v)} for k, v in items]
    return doc


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            out += _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            out += _tensors(v)
    return out


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {_shape(value.shape)} {value.dtype}"
    if isinstance(value, dict | list | tuple):
        n = len(_tensors(value))
        return f"{type(value).__name__} of {len(value)} ({n} tensor{'s' if n != 1 else ''})"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:39] + '…'}"


def _dcp_summary(meta: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    keys = []
    nbytes = tensors = 0
    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            tensors += 1
            dtype = md.properties.dtype
            nbytes += math.prod(md.size) * dtype.itemsize
            keys.append({"key": fqn, "summary": f"tensor {_shape(md.size)} {dtype}"})
        else:
            keys.append({"key": fqn, "summary": "value (torch.save bytes)"})
    return {"tensors": tensors, "tensor_bytes": nbytes, "keys": keys}
