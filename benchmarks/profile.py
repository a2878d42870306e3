"""cProfile of distckpt.save and distckpt.load on one rank (default 256 MiB in 64 tensors).

    python -m benchmarks.profile [--size 256] [--tensors 64] [--out bench-out]
    python -m benchmarks.profile --small          # 10,000 tensors of 4 KiB instead
    python -m benchmarks.profile --election 200   # rows_to_delete over 200 rows x 64 ranks

Writes ``<out>/profile-<what>-save.txt`` and ``...-load.txt`` (top functions by own time and
by cumulative time) and prints a short summary: the calls that dominate (fsync, writev,
preadv, crc32c, copies). The load targets are touched before loading, as in the harness.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable

import torch

from .common import Ctx, MiB, make_state, remove_tree, warm_cache


def _profile(fn: Callable[[], object], path: str, top: int) -> tuple[float, pstats.Stats]:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    elapsed = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"wall {elapsed:.3f} s (under cProfile)\n\n== by own time ==\n")
    stats.sort_stats("tottime").print_stats(top)
    buf.write("\n== by cumulative time ==\n")
    stats.sort_stats("cumulative").print_stats(top)
    with open(path, "w") as f:
        f.write(buf.getvalue())
    return elapsed, stats


def _calls(stats: pstats.Stats, name: str) -> tuple[int, float]:
    """(calls, own seconds) of every builtin whose name contains ``name``."""
    n, t = 0, 0.0
    for (_, _, func), (_, nc, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func.startswith("<") and name in func:
            n += nc
            t += tt
    return n, t


def main(argv: list[str] | None = None) -> None:
    import distckpt
    from distckpt.storage import lease as lease
    from distckpt.storage.store import Store

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--size", type=int, default=256, help="MiB")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--small", action="store_true", help="10,000 tensors of 4 KiB")
    p.add_argument("--election", type=int, metavar="ROWS", help="profile rows_to_delete")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "work", "profile-store"))
    remove_tree(path)
    if args.election:
        from distckpt.dist.retention import rows_to_delete

        from .cases import build_manifest_store

        build_manifest_store(path, args.election, 64, 8)
        out = os.path.join(args.out, "profile-election.txt")
        el, stats = _profile(lambda: rows_to_delete(Store(path), 1), out, args.top)
        remove_tree(path)
        print(f"rows_to_delete over {args.election} rows x 64 ranks: {el:.3f} s; details: {out}")
        return
    what = "small" if args.small else "large"
    if args.small:
        state = make_state(0, 10_000 * 4096, 10_000, prefix="s")
    else:
        state = make_state(0, args.size * MiB, args.tensors)
    targets = {k: torch.zeros_like(v) for k, v in state.items()}
    store = Store(path)
    store.create()
    lease.hold(store)
    files = [os.path.join(args.out, f"profile-{what}-{op}.txt") for op in ("save", "load")]
    save_s, save_stats = _profile(lambda: distckpt.save(state, path), files[0], args.top)
    warm_cache(Ctx(), path)
    load_s, load_stats = _profile(lambda: distckpt.load(targets, path), files[1], args.top)
    assert all(torch.equal(targets[k], v) for k, v in state.items())
    lease.release(path)
    remove_tree(path)
    mib = sum(t.numel() * 4 for t in state.values()) / MiB
    print(f"save {save_s:.3f} s, load {load_s:.3f} s ({mib:.0f} MiB, {len(state)} tensors)")
    names = ("fsync", "writev", "preadv", "open", "crc32c", "copy_", "empty", "mkdir", "encode")
    for label, stats in (("save", save_stats), ("load", load_stats)):
        parts = []
        for name in names:
            n, t = _calls(stats, name)
            if n:
                parts.append(f"{name} x{n} {t:.3f} s")
        print(f"  {label}: " + ", ".join(parts))
    print(f"details: {files[0]}, {files[1]}")


if __name__ == "__main__":
    main()
