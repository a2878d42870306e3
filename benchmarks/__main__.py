"""python -m benchmarks: distckpt against raw I/O, torch.save, DCP and Earth2Studio, in one run.

One rank runs in this process; more ranks run as torchrun gloo jobs of
``benchmarks.worker``. Prints a table, writes ``<out>/results.json`` and
``<out>/throughput.png`` (if matplotlib is installed). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from .common import ALL_CASES, DEFAULT_CASES, Config, Ctx
from .report import derive, format_table, goals, machine_info, plot, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default (those that have one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
        return f"{text} (default: {shown})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the issue's real sizes: 1024 MiB of state per rank, election over 1,000 rows "
        "x 64 ranks (default: the quick sizes below)",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        metavar="MIB",
        help="state each rank saves and restores, in MiB per rank; several values give one "
        "point each on the plot (default: 256; with --full 1024)",
    )
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[1, 2], help="rank counts (processes) to run"
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="repeats per measurement; the median counts"
    )
    p.add_argument(
        "--tensors",
        type=int,
        default=64,
        help="tensors the state of --sizes is split into, per rank",
    )
    p.add_argument(
        "--small-count",
        type=int,
        default=10_000,
        help="small tensors per rank in the small-state cases",
    )
    p.add_argument("--small-bytes", type=int, default=4096, help="bytes per small tensor")
    p.add_argument(
        "--election-rows",
        type=int,
        help="rows in the election store (default: 200; with --full 1000)",
    )
    p.add_argument("--election-ranks", type=int, default=64, help="ranks per election row")
    p.add_argument(
        "--election-tensors", type=int, default=8, help="array entries per election manifest"
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=ALL_CASES,
        default=list(DEFAULT_CASES),
        help="cases to run (scale only when named: a simulation of minutes)",
    )
    p.add_argument(
        "--scale-ranks",
        type=int,
        nargs="+",
        default=[8, 64, 1000, 10_000],
        help="simulated rank counts of the scale case",
    )
    p.add_argument(
        "--scale-sample",
        type=int,
        default=64,
        help="ranks simulated per rank count in the scale case; totals of larger jobs are "
        "extrapolated from them",
    )
    p.add_argument("--out", default="bench-out", help="output directory")
    p.add_argument(
        "--workdir",
        help="where stores are written; keep it on the filesystem to measure (default: <out>/work)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per torchrun job")
    return p.parse_args(argv)


def run_ranks(n: int, cfg: Config, out: str, timeout: float) -> list[dict[str, Any]]:
    """Run the per-rank cases as an n-rank torchrun gloo job; return its records."""
    cfg_path = os.path.join(out, f"config-ranks{n}.json")
    result = os.path.join(out, f"records-ranks{n}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg.to_json(), f)
    if os.path.exists(result):
        os.remove(result)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "benchmarks.worker",
        "--config",
        os.path.abspath(cfg_path),
        "--result",
        os.path.abspath(result),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    print(f"[ranks={n}] {' '.join(cmd[1:6])} -m benchmarks.worker ...", file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False)
    if proc.returncode != 0 or not os.path.exists(result):
        print(f"[ranks={n}] torchrun failed (exit {proc.returncode}); skipped", file=sys.stderr)
        return []
    with open(result) as f:
        records: list[dict[str, Any]] = json.load(f)
    os.remove(result)
    os.remove(cfg_path)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = args.sizes or ([1024] if args.full else [256])
    rows = args.election_rows or (1000 if args.full else 200)
    out = args.out
    os.makedirs(out, exist_ok=True)
    workdir = args.workdir or os.path.join(out, "work")
    os.makedirs(workdir, exist_ok=True)
    cfg = Config(
        workdir=os.path.abspath(workdir),
        sizes_mib=sizes,
        tensors=args.tensors,
        small_count=args.small_count,
        small_bytes=args.small_bytes,
        election_rows=rows,
        election_ranks=args.election_ranks,
        election_tensors=args.election_tensors,
        repeat=args.repeat,
        cases=args.cases,
    )
    server = None
    if "s3" in cfg.cases:  # one SeaweedFS for every rank count (benchmarks/s3.py)
        from .s3 import start_server

        server = start_server(cfg.workdir)
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    per_rank = [c for c in cfg.cases if c not in ("election", "scale")]
    scale_records: list[dict[str, Any]] = []
    try:
        for n in args.ranks:
            if not per_rank:
                break
            if n == 1:
                from .cases import run_rank_cases

                records += run_rank_cases(Ctx(), cfg)
            else:
                records += run_ranks(n, cfg, out, args.timeout)
        if "election" in cfg.cases:
            from .cases import election_case

            records += election_case(cfg)
        if "scale" in cfg.cases:
            from .scale import scale_case

            scale_records = scale_case(args.scale_ranks, sample=args.scale_sample, workdir=workdir)
    finally:
        if server is not None:
            server.stop()
    elapsed = time.perf_counter() - start
    for root, _, _ in sorted(os.walk(workdir), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):  # only empty directories are removed
            os.rmdir(root)

    if scale_records:
        from .scale import format_scale_table, plot_scale

        write_json(
            os.path.join(out, "scale.json"), machine_info(workdir), vars(args), scale_records
        )
        print()
        print(format_scale_table(scale_records))
        skipped = plot_scale(os.path.join(out, "scale.png"), scale_records)
        print(f"scale plot: {skipped or os.path.join(out, 'scale.png')}")
        if not records:
            return 0
    derive(records)
    machine = machine_info(workdir)
    config = {**cfg.to_json(), "ranks": args.ranks, "full": args.full, "elapsed_s": elapsed}
    json_path = os.path.join(out, "results.json")
    write_json(json_path, machine, config, records)
    print()
    print(format_table(records))
    print()
    print("Goals (reference only, not asserted):")
    for line in goals(records):
        print("  " + line)
    print()
    skipped = plot(os.path.join(out, "throughput.png"), records)
    if skipped:
        print(f"plot skipped: {skipped}")
    else:
        print(f"plot: {os.path.join(out, 'throughput.png')}")
    print(f"results: {json_path}")
    print(
        f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']}, zarr {machine['zarr']}, "
        f"{machine['filesystem']}; total {elapsed:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
