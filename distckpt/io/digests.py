"""Digests of saved states: equal digests mean a state was saved alike on every rank.

The manifest records one per state; restore at another world size reads a state saved alike
from any rank, and needs a mapping policy for the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from distckpt.format.chunks import checksum
from distckpt.io.rowio import byte_view
from distckpt.plan.save import RankPlan


def state_digests(plan: RankPlan, crcs: Sequence[int | None] | None = None) -> dict[str, str]:
    """A digest per state of its tree and its tensors' bytes: equal digests, equal values.

    ``crcs[i]`` is tensor ``i``'s crc32c when the write already computed it (a save with
    checksums off did not: those tensors are checksummed here)."""
    out: dict[str, str] = {}
    for state_id, tree in plan.states.items():
        h = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
        for index in _tensor_indices(tree):
            p = plan.tensors[index]
            h.update(f"{p.spec.name}{tuple(p.tensor.shape)}".encode())
            known = None if crcs is None else crcs[index]
            crc = checksum(byte_view(p.tensor)) if known is None else known
            h.update(crc.to_bytes(4, "little"))
        out[state_id] = h.hexdigest()
    return out


def _tensor_indices(node: Any) -> list[int]:
    """Tensor leaf indices of an encoded tree (tagged JSON: user keys are never JSON keys)."""
    found: list[int] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if len(item) == 1:
                ((tag, value),) = item.items()
                if tag in ("tensor", "ndarray") and isinstance(value, int):
                    found.append(value)
                    continue
                if tag == "np_time_array" and isinstance(value, list) and len(value) == 2:
                    found.append(int(value[1]))
                    continue
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return sorted(found)
