"""The shard cover check by sort and sweep, against a brute-force oracle on random layouts.

A save refuses shards that overlap, leave a gap or reach outside their tensor; equal boxes
are replicas. The sweep must agree with comparing every pair, on grids (the layouts
placements make), on ragged and staggered layouts (the slower path) and on arbitrary boxes.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from distckpt.errors import CheckpointSerializationError
from distckpt.format.shards import Box, find_overlap, plan_layouts


def oracle_overlap(boxes: list[Box]) -> bool:
    return any(a.intersect(b) is not None for a, b in itertools.combinations(boxes, 2))


def oracle_valid(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """Exact cover of ``shape`` by the distinct non-empty boxes, element by element."""
    seen: dict[tuple[int, ...], Box] = {}
    for b in {b for b in boxes if b.numel}:
        for idx in itertools.product(
            *(range(o, o + n) for o, n in zip(b.offsets, b.lengths, strict=True))
        ):
            if any(not 0 <= i < s for i, s in zip(idx, shape, strict=True)) or idx in seen:
                return False
            seen[idx] = b
    return len(seen) == math.prod(shape)


def _splits(n: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n), min(parts - 1, n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [(a, b - a) for a, b in itertools.pairwise(bounds)]


def _grid(shape: tuple[int, ...], rng: random.Random) -> list[Box]:
    per_dim = [_splits(n, rng.randint(1, 4), rng) for n in shape]
    return [
        Box(tuple(o for o, _ in cell), tuple(n for _, n in cell))
        for cell in itertools.product(*per_dim)
    ]


def _staggered(shape: tuple[int, int], rng: random.Random) -> list[Box]:
    """Columns split at different rows: bands along dim 0 partly overlap."""
    out = []
    for c0, cn in _splits(shape[1], rng.randint(2, 3), rng):
        out += [Box((r0, c0), (rn, cn)) for r0, rn in _splits(shape[0], rng.randint(1, 4), rng)]
    return out


def _damage(boxes: list[Box], shape: tuple[int, ...], rng: random.Random) -> list[Box]:
    """One random defect, or none: a gap, a grown box, a shifted box, a replica, an empty box."""
    boxes = list(boxes)
    kind = rng.choice(["none", "drop", "grow", "shift", "replica", "empty", "outside"])
    i = rng.randrange(len(boxes))
    b = boxes[i]
    d = rng.randrange(len(shape))
    if kind == "drop" and len(boxes) > 1:
        boxes.pop(i)
    elif kind == "grow":
        lengths = list(b.lengths)
        lengths[d] += 1
        boxes[i] = Box(b.offsets, tuple(lengths))
    elif kind == "shift" and b.offsets[d] > 0:
        offsets = list(b.offsets)
        offsets[d] -= 1
        boxes[i] = Box(tuple(offsets), b.lengths)
    elif kind == "replica":
        boxes.append(b)
    elif kind == "empty":
        boxes.append(Box(tuple(rng.randrange(n + 1) for n in shape), (0,) * len(shape)))
    elif kind == "outside":
        offsets = list(b.offsets)
        offsets[d] = shape[d]
        boxes[i] = Box(tuple(offsets), b.lengths)
    rng.shuffle(boxes)
    return boxes


def _planned(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    reports = [
        [{"key": "w", "shape": list(shape), "dtype": "float32", "box": b.to_json()}] for b in boxes
    ]
    try:
        plan_layouts(reports, {"float32": 4})
    except CheckpointSerializationError:
        return False
    return True


@pytest.mark.parametrize("seed", range(4))
def test_cover_check_agrees_with_the_oracle(seed: int) -> None:
    rng = random.Random(seed)
    outcomes = set()
    for _ in range(150):
        dims = rng.randint(1, 3)
        shape = tuple(rng.randint(1, 7) for _ in range(dims))
        if dims == 2 and rng.random() < 0.3 and shape[1] > 1:
            boxes = _staggered((shape[0], shape[1]), rng)
        else:
            boxes = _grid(shape, rng)
        boxes = _damage(boxes, shape, rng)
        expected = oracle_valid(shape, boxes)
        assert _planned(shape, boxes) == expected, (shape, boxes)
        outcomes.add(expected)
    assert outcomes == {True, False}  # the random layouts exercise both answers


@pytest.mark.parametrize("seed", range(4))
def test_find_overlap_agrees_on_arbitrary_boxes(seed: int) -> None:
    rng = random.Random(100 + seed)
    seen = set()
    for _ in range(300):
        dims = rng.randint(1, 3)
        boxes = {
            Box(
                tuple(rng.randint(0, 6) for _ in range(dims)),
                tuple(rng.randint(1, 3) for _ in range(dims)),
            )
            for _ in range(rng.randint(1, 6))
        }
        distinct = list(boxes)
        found = find_overlap(distinct)
        assert (found is not None) == oracle_overlap(distinct), distinct
        if found is not None:
            a, b = found
            assert a != b and a.intersect(b) is not None
        seen.add(found is None)
    assert seen == {True, False}


def test_overlap_message_names_both_shards() -> None:
    boxes = [Box((0, 0), (4, 2)), Box((0, 2), (2, 2)), Box((1, 2), (3, 2))]
    reports = [
        [{"key": "w", "shape": [4, 4], "dtype": "float32", "box": b.to_json()}] for b in boxes
    ]
    with pytest.raises(CheckpointSerializationError, match=r"ranks \[1\].*ranks \[2\].*overlap"):
        plan_layouts(reports, {"float32": 4})


def test_shard_outside_the_tensor_is_refused() -> None:
    reports = [
        [{"key": "w", "shape": [4], "dtype": "float32", "box": [[0], [2]]}],
        [{"key": "w", "shape": [4], "dtype": "float32", "box": [[3], [2]]}],
    ]
    with pytest.raises(CheckpointSerializationError, match=r"'w'.*ranks \[1\].*outside"):
        plan_layouts(reports, {"float32": 4})


def test_row_shards_are_not_compared_pairwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard(0) of a 4096-row weight over 10,000 ranks (5,904 hold nothing): 4,096 boxes,
    8 M pairs for a pairwise check; the sweep compares none of them."""
    compared = []
    real = Box.intersect

    def counted(self: Box, other: Box) -> Box | None:
        compared.append(1)
        return real(self, other)

    monkeypatch.setattr(Box, "intersect", counted)
    width = 4096
    reports = [
        [
            {
                "key": "w",
                "shape": [4096, width],
                "dtype": "float32",
                "box": [[min(r, 4096), 0], [int(r < 4096), width]],
            }
        ]
        for r in range(10_000)
    ]
    layout = plan_layouts(reports, {"float32": 4})["w"]
    assert [r.box.offsets[0] for r in layout.regions] == list(range(4096))
    assert compared == []
