"""Shard descriptions: which region of a global tensor each rank holds, and the checks on them.

A global (sharded) tensor is a ``torch.distributed.tensor.DTensor`` or an explicit
:class:`Sharded` (global shape + this rank's offsets, for code without DTensor). Either way
a rank holds one box of the global index space. A save gathers every rank's boxes and
checks here that they cover each tensor exactly: equal boxes are replicas (written once),
any other overlap or a gap is an error naming the tensor and the ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distckpt.errors import CheckpointSerializationError

if TYPE_CHECKING:
    import torch

CHUNK_TARGET_BYTES = 4 << 20  # chunks are split down to about this size (docs/design.md section 16)


@dataclass(frozen=True)
class Sharded:
    """This rank's piece ``local`` of a tensor of ``global_shape``, starting at ``offsets``.

    Save it and the ranks' pieces become one global array; load into it and the piece is
    filled from any saved layout. Ranks passing equal regions hold replicas.
    """

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        shape, offs = tuple(self.global_shape), tuple(self.offsets)
        object.__setattr__(self, "global_shape", shape)
        object.__setattr__(self, "offsets", offs)
        lengths = tuple(self.local.shape)
        if not (len(shape) == len(offs) == len(lengths)):
            raise CheckpointSerializationError(
                f"Sharded: global shape {shape}, offsets {offs} and local shape {lengths} "
                "differ in rank"
            )
        for d, (n, o, k) in enumerate(zip(shape, offs, lengths, strict=True)):
            if o < 0 or o + k > n:
                raise CheckpointSerializationError(
                    f"Sharded: dimension {d}: local rows {o}..{o + k} lie outside 0..{n}"
                )


@dataclass(frozen=True)
class Box:
    """A region of a global index space: ``offsets`` and ``lengths`` per dimension."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def intersect(self, other: Box) -> Box | None:
        offs, lens = [], []
        for a, n, b, m in zip(
            self.offsets, self.lengths, other.offsets, other.lengths, strict=True
        ):
            lo, hi = max(a, b), min(a + n, b + m)
            if hi <= lo:
                return None
            offs.append(lo)
            lens.append(hi - lo)
        return Box(tuple(offs), tuple(lens))

    def contains(self, point: Sequence[int]) -> bool:
        spans = zip(self.offsets, self.lengths, point, strict=True)
        return all(o <= p < o + n for o, n, p in spans)

    def slices(self, origin: tuple[int, ...]) -> tuple[slice, ...]:
        """This box as slices of a tensor whose element 0 sits at ``origin``."""
        return tuple(
            slice(o - g, o - g + n)
            for o, n, g in zip(self.offsets, self.lengths, origin, strict=True)
        )

    def to_json(self) -> list[list[int]]:
        return [list(self.offsets), list(self.lengths)]

    @staticmethod
    def from_json(doc: Any) -> Box:
        return Box(tuple(int(v) for v in doc[0]), tuple(int(v) for v in doc[1]))


@dataclass(frozen=True)
class Piece:
    """What one rank holds of a global tensor: the tensor's shape and dtype, its box, data."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    box: Box
    local: torch.Tensor | None  # None where this rank is not in the DTensor's mesh


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_global(value: Any) -> bool:
    """Whether ``value`` is saved as a region of a global array."""
    if isinstance(value, Sharded):
        return True
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def tiles(value: Any) -> bool:
    """Whether the regions every rank holds of ``value``'s global tensor cover all of it: a
    DTensor's (its mesh's ranks hold every element, SPMD). A ``Sharded`` promises nothing."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def piece(value: Any, *, where: str) -> Piece:
    """The region of its global tensor that ``value`` holds on this rank."""
    if isinstance(value, Sharded):
        box = Box(value.offsets, tuple(value.local.shape))
        return Piece(value.global_shape, value.local.dtype, box, value.local)
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(value.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise CheckpointSerializationError(
            f"DTensor at {where!r} has a Partial placement {placements}; reduce it first "
            "(full_tensor() or redistribute to Shard/Replicate)"
        )
    shape = tuple(value.shape)
    mesh = value.device_mesh
    if mesh.get_coordinate() is None:  # this rank is not in the tensor's mesh
        return Piece(shape, value.dtype, Box((0,) * len(shape), (0,) * len(shape)), None)
    lengths, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = value.to_local()
    if tuple(local.shape) != tuple(lengths):
        raise CheckpointSerializationError(
            f"DTensor at {where!r}: local tensor is {tuple(local.shape)}, its placements "
            f"{placements} say {tuple(lengths)}"
        )
    return Piece(shape, value.dtype, Box(tuple(offsets), tuple(lengths)), local)


@dataclass(frozen=True)
class Region:
    """One distinct box of a global tensor, the ranks holding it, and the one writing it."""

    box: Box
    holders: tuple[int, ...]
    writer: int


@dataclass(frozen=True)
class GlobalLayout:
    """How one global tensor is stored: every rank agrees on it from the gathered boxes."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    chunk: tuple[int, ...]
    regions: tuple[Region, ...]
    holders: tuple[int, ...]  # every rank holding the tensor (some may hold empty boxes)

    def writes(self, rank: int) -> list[Region]:
        return self._by_writer.get(rank, [])

    @functools.cached_property
    def _by_writer(self) -> dict[int, list[Region]]:
        """Regions by writer, built once: a row's offsets ask every writer in turn."""
        out: dict[int, list[Region]] = {}
        for r in self.regions:
            out.setdefault(r.writer, []).append(r)
        return out

    @property
    def document_writer(self) -> int:
        """The rank writing the array's ``zarr.json``: its lowest-ranked chunk writer."""
        return min((r.writer for r in self.regions), default=self.holders[0])


def even_box(shape: tuple[int, ...], rank: int, world: int) -> Box:
    """Rank ``rank``'s box of dimension 0 split over ``world`` ranks as torch splits it
    (``Shard(0)``, FSDP2: ``ceil(n / world)`` rows each, the last ranks fewer or none)."""
    step = -(-shape[0] // world)
    lo = min(rank * step, shape[0])
    return Box((lo, *(0,) * (len(shape) - 1)), (max(0, min(step, shape[0] - lo)), *shape[1:]))


def is_even(box: Box, shape: tuple[int, ...], rank: int, world: int) -> bool:
    """Whether ``box`` is rank ``rank``'s :func:`even_box` (an empty box for an empty one)."""
    if not shape or len(box.offsets) != len(shape):
        return False
    even = even_box(shape, rank, world)
    return box == even or (box.numel == 0 and even.numel == 0)


@dataclass(frozen=True)
class EvenLayout:
    """A global tensor every rank holds as its :func:`even_box`: a partition by
    construction, so nothing is gathered or checked, and no rank materialises the other
    ranks' boxes (at 10,000 ranks, 873 tensors would be 8.7 M of them). Rank r writes its
    own box; :attr:`regions` is built only where every region is wanted."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    world: int

    def writes(self, rank: int) -> list[Region]:
        box = even_box(self.shape, rank, self.world)
        return [Region(box, (rank,), rank)] if box.numel else []

    def writers_of(self, box: Box) -> range:
        """The ranks whose boxes may intersect ``box`` (dimension 0 decides)."""
        step = max(1, -(-self.shape[0] // self.world))
        first = box.offsets[0] // step
        last = -(-(box.offsets[0] + box.lengths[0]) // step)
        return range(min(first, self.world), min(last, self.world))

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(r for rank in range(self.world) for r in self.writes(rank))


#: How one global tensor is stored: gathered boxes, or an even split known from its rule.
Layout = GlobalLayout | EvenLayout


def plan_layouts(
    reports: Sequence[Sequence[dict[str, Any]]], itemsizes: dict[str, int]
) -> dict[str, GlobalLayout]:
    """Check gathered shard reports and decide each global tensor's chunks and writers.

    ``reports[rank]`` lists ``{"key", "shape", "dtype", "box"}`` for every global tensor that
    rank holds. Deterministic: every rank computes the same layouts from the same reports.
    """
    by_key: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for rank, items in enumerate(reports):
        for item in items:
            by_key.setdefault(item["key"], []).append((rank, item))
    layouts: dict[str, GlobalLayout] = {}
    for ordinal, key in enumerate(sorted(by_key)):
        held = by_key[key]
        layouts[key] = _layout(key, ordinal, held, itemsizes[held[0][1]["dtype"]])
    return layouts


def _layout(
    key: str, ordinal: int, held: list[tuple[int, dict[str, Any]]], itemsize: int
) -> GlobalLayout:
    shapes = {tuple(item["shape"]) for _, item in held}
    dtypes = {item["dtype"] for _, item in held}
    if len(shapes) > 1 or len(dtypes) > 1:
        detail = ", ".join(f"rank {r}: {tuple(i['shape'])} {i['dtype']}" for r, i in held)
        raise CheckpointSerializationError(
            f"global tensor {key!r}: ranks disagree on its shape or dtype ({detail})"
        )
    shape = shapes.pop()
    boxes: dict[Box, list[int]] = {}
    for rank, item in held:
        box = Box.from_json(item["box"])
        if box.numel:
            boxes.setdefault(box, []).append(rank)
    distinct = sorted(boxes, key=lambda b: (b.offsets, b.lengths))
    check_cover(key, shape, distinct, boxes)
    regions = tuple(
        Region(b, tuple(boxes[b]), boxes[b][(ordinal + i) % len(boxes[b])])
        for i, b in enumerate(distinct)
    )
    holders = tuple(sorted({r for r, _ in held}))
    chunk = chunk_shape(shape, distinct, itemsize)
    return GlobalLayout(key, shape, dtypes.pop(), chunk, regions, holders)


def check_cover(
    key: str, shape: tuple[int, ...], distinct: Sequence[Box], holders: dict[Box, list[int]]
) -> None:
    """Refuse boxes that overlap, leave a gap or lie outside ``shape``; O(n log n) for the
    layouts placements make.

    With every box inside the tensor and no two overlapping, the boxes cover it exactly
    when their volumes sum to its size; so only the overlap test needs care. It sorts and
    sweeps (:func:`find_overlap`) instead of testing every pair, which at 10,000 ranks is
    50 M pairs per tensor. ``holders`` names the ranks of each box in the messages.
    """
    total = math.prod(shape)
    for b in distinct:
        if len(b.offsets) != len(shape) or any(
            o < 0 or o + n > s for o, n, s in zip(b.offsets, b.lengths, shape, strict=True)
        ):
            raise CheckpointSerializationError(
                f"global tensor {key!r} of shape {shape}: the shard of ranks {holders[b]} "
                f"(offsets {b.offsets}, shape {b.lengths}) lies outside it"
            )
    pair = find_overlap(distinct)
    if pair is not None:
        a, b = sorted(pair, key=lambda x: (x.offsets, x.lengths))
        common = a.intersect(b)
        assert common is not None
        raise CheckpointSerializationError(
            f"global tensor {key!r}: the shards of ranks {holders[a]} (offsets "
            f"{a.offsets}, shape {a.lengths}) and ranks {holders[b]} (offsets {b.offsets}, "
            f"shape {b.lengths}) overlap at offsets {common.offsets}"
        )
    covered = sum(b.numel for b in distinct)
    if covered != total:
        ranks = sorted({r for b in distinct for r in holders[b]})
        raise CheckpointSerializationError(
            f"global tensor {key!r} of shape {shape}: the shards of ranks {ranks} cover "
            f"{covered} of its {total} elements"
        )


def find_overlap(boxes: Sequence[Box]) -> tuple[Box, Box] | None:
    """Two of the distinct, non-empty ``boxes`` that share an element, or None.

    Recursive sort and sweep: along the dimension whose intervals split the boxes most
    cleanly, boxes with the same interval form a band and are compared with each other
    only along the remaining dimensions (recursively); bands whose intervals are disjoint
    are never compared. A grid of shards (any mix of ``Shard`` and ``Replicate``, even
    ragged) has no partly overlapping bands, so this is O(n log n) per dimension. Only
    bands that partly overlap (e.g. the columns of a 2-D tensor split at different rows)
    fall back to comparing their boxes pairwise: correct, slower, and rare.
    """
    if len(boxes) < 2:
        return None
    return _sweep(list(boxes), tuple(range(len(boxes[0].offsets))))


def _bands(boxes: list[Box], d: int) -> list[tuple[int, int, list[Box]]]:
    """The boxes grouped by their interval along dimension ``d``, sorted by it."""
    grouped: dict[tuple[int, int], list[Box]] = {}
    for b in boxes:
        lo = b.offsets[d]
        grouped.setdefault((lo, lo + b.lengths[d]), []).append(b)
    return [(lo, hi, grouped[(lo, hi)]) for lo, hi in sorted(grouped)]


def _entangled(bands: list[tuple[int, int, list[Box]]]) -> int:
    """How many bands start before an earlier band ends (the ones compared pairwise)."""
    count, reach = 0, None
    for lo, hi, _ in bands:
        if reach is not None and lo < reach:
            count += 1
        reach = hi if reach is None else max(reach, hi)
    return count


def _sweep(boxes: list[Box], dims: tuple[int, ...]) -> tuple[Box, Box] | None:
    if len(boxes) < 2:
        return None
    if not dims:  # equal on every dimension: the same box twice
        return boxes[0], boxes[1]
    options = [
        (_entangled(bands), -len(bands), d, bands) for d in dims for bands in [_bands(boxes, d)]
    ]
    _, _, d, bands = min(options, key=lambda o: o[:3])
    rest = tuple(x for x in dims if x != d)
    active: list[tuple[int, list[Box]]] = []  # (end, boxes) of bands still open
    for lo, hi, members in bands:
        active = [(end, held) for end, held in active if end > lo]
        for _, held in active:  # partly overlapping bands: the slow, pairwise path
            for a in members:
                for b in held:
                    if a.intersect(b) is not None:
                        return a, b
        found = _sweep(members, rest)
        if found is not None:
            return found
        active.append((hi, members))
    return None


def chunk_shape(
    shape: tuple[int, ...], boxes: Sequence[Box], itemsize: int, target: int = CHUNK_TARGET_BYTES
) -> tuple[int, ...]:
    """A regular chunk grid in which every box is a union of whole chunks.

    Per dimension, the gcd of the tensor's extent and every box boundary: each writer owns
    whole chunks, and no chunk runs past the tensor's end (zarr stores edge chunks padded to
    full size; here there are none, so the bytes written equal the logical size). Chunks
    above ``target`` bytes are then divided, largest dimension first, by their smallest
    prime factor, so a reader of another layout reads little beyond its region.
    """
    chunk = []
    for d, n in enumerate(shape):
        g = n
        for b in boxes:
            g = math.gcd(g, b.offsets[d], b.offsets[d] + b.lengths[d])
        chunk.append(max(g, 1))
    while math.prod(chunk) * itemsize > target:
        for d in sorted(range(len(chunk)), key=lambda d: (-chunk[d], -d)):
            p = _smallest_factor(chunk[d])
            if p > 1:
                chunk[d] //= p
                break
        else:
            break
    return tuple(chunk)


def _smallest_factor(n: int) -> int:
    if n < 2:
        return 1
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return p
    return n


def chunk_indices(box: Box, chunk: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Indices of the chunks overlapping ``box``, in C order."""
    ranges = [
        range(o // c, -(-(o + n) // c))
        for o, n, c in zip(box.offsets, box.lengths, chunk, strict=True)
    ]
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*prefix, i) for prefix in out for i in r]
    return out if box.numel else []


def chunk_box(index: tuple[int, ...], chunk: tuple[int, ...]) -> Box:
    return Box(tuple(i * c for i, c in zip(index, chunk, strict=True)), chunk)
