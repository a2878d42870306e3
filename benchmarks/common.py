"""Configuration, rank context, timing and result records shared by every case."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MiB = 1 << 20
GB = 1e9  # throughput is reported in GB/s (10^9 bytes per second)

ALL_CASES = ("save", "restore", "small", "crc", "async", "gpu", "election", "e2s", "s3", "scale")
DEFAULT_CASES = tuple(c for c in ALL_CASES if c != "scale")  # scale: minutes, on request


@dataclass
class Config:
    """Everything a rank needs to run its cases; travels to torchrun workers as JSON."""

    workdir: str
    sizes_mib: list[int] = field(default_factory=lambda: [256])
    tensors: int = 64
    small_count: int = 10_000
    small_bytes: int = 4096
    election_rows: int = 200
    election_ranks: int = 64
    election_tensors: int = 8
    repeat: int = 3
    cases: list[str] = field(default_factory=lambda: list(DEFAULT_CASES))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Config:
        return Config(**doc)


class Ctx:
    """One process: rank 0 of 1."""

    rank = 0
    world = 1

    def barrier(self) -> None:
        pass

    def gather(self, value: Any) -> list[Any]:
        return [value]


class DistCtx(Ctx):
    """Ranks of an initialised torch.distributed (gloo) job; the harness's own messages."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, value)
        return out


def timed(ctx: Ctx, fn: Callable[[], Any]) -> tuple[float, float]:
    """Run ``fn`` on every rank between barriers.

    Returns (collective seconds as seen by rank 0, from the first barrier to the second;
    the slowest rank's own seconds).
    """
    ctx.barrier()
    t0 = time.perf_counter()
    fn()
    mine = time.perf_counter() - t0
    ctx.barrier()
    total = time.perf_counter() - t0
    both = ctx.gather((total, mine))
    return float(both[0][0]), float(max(m for _, m in both))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rotated(items: list[Any], by: int) -> list[Any]:
    """The tools in a different order on each repeat, so no tool always runs first."""
    if not items:
        return items
    k = by % len(items)
    return items[k:] + items[:k]


def make_state(rank: int, nbytes: int, count: int, *, prefix: str = "layer") -> dict[str, Any]:
    """``count`` float32 tensors of ``nbytes`` in total, distinct per rank.

    Keys carry the rank so DCP treats every tensor as this rank's own (DCP deduplicates
    plain tensors stored under the same key on several ranks as replicated).
    """
    numel = max(1, nbytes // 4 // count)
    gen = torch.Generator().manual_seed(1234 + rank)
    width = len(str(count - 1))
    return {
        f"r{rank}.{prefix}{i:0{width}d}": torch.rand(numel, generator=gen) for i in range(count)
    }


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def warm_cache(ctx: Ctx, path: str) -> None:
    """Collective: rank 0 reads every file under ``path`` once, so reads hit the page cache."""
    if ctx.rank == 0:
        buf = bytearray(8 * MiB)
        view = memoryview(buf)
        for root, _, files in os.walk(path):
            for name in files:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while f.readinto(view):
                        pass
    ctx.barrier()


def settle() -> None:
    """Flush dirty data (a deleted store's metadata) so it does not land in the next timing.

    This only writes back; nothing is dropped from the page cache.
    """
    os.sync()


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def count_files(path: str, *, under: str | None = None) -> int:
    n = 0
    for _, _, files in os.walk(os.path.join(path, under) if under else path):
        n += len(files)
    return n


def record(
    *,
    case: str,
    op: str,
    tool: str,
    ctx: Ctx,
    size_mib: float,
    size_label: str,
    bytes_per_rank: int,
    tensors_per_rank: int,
    totals: list[float],
    slowest: list[float],
    durable: bool | None,
    **extra: Any,
) -> dict[str, Any]:
    """One measurement: medians over repeats plus every raw sample."""
    seconds = median(totals)
    total_bytes = bytes_per_rank * ctx.world
    return {
        "case": case,
        "op": op,
        "tool": tool,
        "ranks": ctx.world,
        "size_mib": size_mib,
        "size_label": size_label,
        "bytes_per_rank": bytes_per_rank,
        "bytes_total": total_bytes,
        "tensors_per_rank": tensors_per_rank,
        "repeat": len(totals),
        "seconds": seconds,
        # The fastest repeat: on a shared disk the same save varies by 2-4x between repeats,
        # so the best time shows what a tool can do when the disk is not busy elsewhere.
        "best_s": min(totals) if totals else None,
        "seconds_all": totals,
        "slowest_rank_s": median(slowest) if slowest else None,
        "slowest_rank_all": slowest,
        "gbps": total_bytes / seconds / GB if seconds > 0 and total_bytes else None,
        "durable": durable,
        **extra,
    }
