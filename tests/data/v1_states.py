"""The states held by the v1 store fixtures (tests/data/v1/), shared by their generator and
the test that reads them: expected values are rebuilt here, never written out by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

GLOBAL_SHAPE = (10, 3)
SAVED_WORLD = 2
ROWS = 2  # rows 0 and 1; row 1 is the latest


def global_value(row: int) -> torch.Tensor:
    return torch.arange(30, dtype=torch.float32).reshape(GLOBAL_SHAPE) + 100 * row


def train_state(rank: int, row: int) -> dict:
    """One rank's state in row ``row`` of the functional-API store ``train``."""
    g = torch.Generator().manual_seed(1234 + row)
    return {
        "model": {
            "w": torch.randn(64, 32, generator=g),  # an array of its own (above the packing size)
            "b": torch.arange(4, dtype=torch.bfloat16) + row,  # packed with other small ones
        },
        "step": 10 * row + 3,
        "tags": ["v1", row, {"lr": 1e-3}],
        "rank_state": {f"seen{rank}": torch.tensor([rank, row], dtype=torch.int64)},  # rank-private
    }


def global_piece(rank: int, row: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Rank ``rank``'s rows of the global tensor ``g`` (5 + 5 rows of 10)."""
    start = rank * 5
    return global_value(row)[start : start + 5].clone(), (start, 0)


@dataclasses.dataclass
class Noise:
    field: torch.Tensor | None = None
    step: int = 0
    when: np.datetime64 | None = None


def noise_at(write: int) -> Noise:
    return Noise(
        field=torch.full((2, 3), float(write)),
        step=write,
        when=np.datetime64("2026-01-01T00") + np.timedelta64(6 * write, "h"),
    )
