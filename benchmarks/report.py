"""Derived ratios, the printed table, results.json and the throughput plot."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

Record = dict[str, Any]


def _key(r: Record, case: str | None = None) -> tuple[Any, ...]:
    return (r["case"] if case is None else case, r["ranks"], r["size_label"])


def derive(records: list[Record]) -> None:
    """Add vs_raw / vs_dcp (throughput ratios, i.e. the other tool's seconds over this one's)
    to save and restore records, and the crc share of distckpt's save and restore times."""
    by: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in records:
        by.setdefault(_key(r), {})[r["tool"]] = r
    for r in records:
        if r["op"] in ("save", "restore"):
            peers = by[_key(r)]
            for tool, field in (("raw", "vs_raw"), ("DCP", "vs_dcp")):
                peer = peers.get(tool)
                r[field] = peer["seconds"] / r["seconds"] if peer and r["seconds"] else None
        if r["tool"] == "distckpt" and r["op"] in ("save", "restore"):
            off = by[_key(r)].get("distckpt crc off")
            r["crc_cost"] = r["seconds"] / off["seconds"] - 1 if off and off["seconds"] else None
        elif r["op"] == "async":
            sync = by[_key(r)].get("distckpt sync save")
            r["blocked_share"] = r["seconds"] / sync["seconds"] if sync else None
        elif r["op"] == "crc":
            for op in ("save", "restore"):
                case = f"{r['of_case']} {op}".strip()
                d = by.get(_key(r, case), {}).get("distckpt")
                r[f"share_of_{op}"] = r["seconds"] / d["seconds"] if d else None


def _fmt(value: Any, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _note(r: Record) -> str:
    if r["op"] == "crc":
        parts = []
        if r.get("share_of_save") is not None:
            parts.append(f"{r['share_of_save']:.0%} of distckpt save")
        if r.get("share_of_restore") is not None:
            parts.append(f"{r['share_of_restore']:.0%} of restore")
        return ", ".join(parts)
    if r["op"] == "election":
        return f"reads {r['manifests_read']} manifests"
    if r.get("crc_cost") is not None:
        return f"crc32c on: {r['crc_cost']:+.0%} time vs off"
    if r["op"] == "async":
        mib = 1 << 20
        share = r.get("blocked_share")
        return (
            (f"{share:.0%} of sync save; " if share is not None else "")
            + f"staging {r['staging_bytes'] / mib:.0f} MiB, RSS +{r['rss_growth_bytes'] / mib:.0f}"
            f" MiB (peak {r['peak_rss_bytes'] / mib:.0f} MiB)"
        )
    if r["tool"] == "earth2studio":
        return "data files not fsynced"
    return ""


COLUMNS = (
    "case",
    "ranks",
    "size/rank",
    "tool",
    "seconds",
    "best s",
    "GB/s",
    "vs raw",
    "vs DCP",
    "slowest rank s",
    "files/rank",
    "note",
)


def table_rows(records: list[Record]) -> list[list[str]]:
    return [
        [
            r["case"],
            str(r["ranks"]),
            r["size_label"],
            r["tool"],
            f"{r['seconds']:.3f}",
            _fmt(r.get("best_s"), ".3f"),
            _fmt(r.get("gbps"), ".2f"),
            _fmt(r.get("vs_raw"), ".2f"),
            _fmt(r.get("vs_dcp"), ".2f"),
            _fmt(r.get("slowest_rank_s"), ".3f"),
            _fmt(r.get("files_per_rank"), "d"),
            _note(r),
        ]
        for r in records
    ]


def format_table(records: list[Record], *, markdown: bool = False) -> str:
    rows = table_rows(records)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2, 3, 11) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*COLUMNS).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return "\n".join(lines)


def goals(records: list[Record]) -> list[str]:
    """The reference goals, side by side with what was measured (nothing is asserted)."""
    out: list[str] = []

    def find(case: str, tool: str) -> list[Record]:
        return [r for r in records if r["case"] == case and r["tool"] == tool]

    def line(text: str, value: float | None, goal: float, *, less: bool = False) -> None:
        if value is None:
            return
        ok = value <= goal if less else value >= goal
        rel = "<=" if less else ">="
        out.append(f"{text}: {value:.2f} (goal {rel} {goal:g}) {'met' if ok else 'NOT met'}")

    for r in find("save", "distckpt"):
        where = f"ranks={r['ranks']} {r['size_label']}"
        line(f"save    distckpt/raw  {where}", r.get("vs_raw"), 0.9)
        line(f"save    distckpt/DCP  {where}", r.get("vs_dcp"), 1.2)
    for tool in ("distckpt", "distckpt in-place"):
        for r in find("restore", tool):
            where = f"ranks={r['ranks']} {r['size_label']}"
            line(f"restore {tool}/raw  {where}", r.get("vs_raw"), 0.8)
            line(f"restore {tool}/DCP  {where}", r.get("vs_dcp"), 3.0)
    for r in find("restore", "distckpt"):
        # The one-core limit: a verified read is a read and a checksum of the same bytes.
        same = [
            (x["seconds"], c["seconds"])
            for x in find("restore", "raw")
            for c in find("crc", "crc32c")
            if x["ranks"] == c["ranks"] == r["ranks"]
            and x["size_label"] == c["size_label"] == r["size_label"]
        ]
        if same and r["ranks"] > 1:
            limit = sum(same[0])
            where = f"ranks={r['ranks']} {r['size_label']}"
            line(f"restore distckpt/(raw + crc32c) {where}", r["seconds"] / limit, 1.2, less=True)
    for case in ("small save", "small restore"):
        for tool in ("distckpt", "distckpt in-place"):
            for r in find(case, tool):
                if case == "small save" and tool != "distckpt":
                    continue
                line(f"{case:13s} {tool}/DCP ranks={r['ranks']}", r.get("vs_dcp"), 5.0)
    for case in ("save", "small save"):
        for r in find(case, "distckpt"):
            cost = r.get("crc_cost")
            where = f"ranks={r['ranks']} {r['size_label']}"
            line(f"{case} crc on/off time {where}", None if cost is None else 1 + cost, 1.1,
                 less=True)  # fmt: skip
    for r in find("async", "distckpt async write()"):
        where = f"ranks={r['ranks']} {r['size_label']}"
        line(f"async write() blocked / sync save {where}", r.get("blocked_share"), 0.1, less=True)
    for r in records:
        if r["op"] == "election" and r["tool"] != "local_commits(rank 0)":
            line(f"election {r['tool']} over {r['size_label']} (s)", r["seconds"], 1.0, less=True)
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _filesystem(path: str) -> str | None:
    """Device and type of the mount holding ``path`` (longest matching mount point)."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, *_ = line.split()
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (
                    best is None or len(mnt) > best[0]
                ):
                    best = (len(mnt), f"{dev} on {mnt} ({fstype})")
    except OSError:
        return None
    return best[1] if best else None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def machine_info(workdir: str) -> dict[str, Any]:
    import torch

    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "zarr": _version("zarr"),
        "numpy": _version("numpy"),
        "crc32c": _version("crc32c"),
        "earth2studio": _version("earth2studio"),
        "distckpt": _version("distckpt"),
        "workdir": os.path.abspath(workdir),
        "filesystem": _filesystem(workdir),
    }


def write_json(
    path: str, machine: dict[str, Any], config: dict[str, Any], records: list[Record]
) -> None:
    doc = {"machine": machine, "config": config, "records": records}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


# One colour and marker per tool in every plot of every run, so a tool reads the same
# everywhere (colours from matplotlib's default cycle, markers distinct without colour).
TOOL_STYLES: dict[str, tuple[str, str]] = {
    "distckpt": ("C0", "o"),
    "distckpt in-place": ("C9", "D"),
    "distckpt crc off": ("C2", "v"),
    "raw": ("C7", "s"),
    "torch.save": ("C1", "^"),
    "DCP": ("C3", "P"),
    "earth2studio": ("C4", "X"),
}
OTHER_STYLE = ("black", "x")  # a tool this table does not know yet
# Rank counts: the marker's fill, so colour and marker keep naming the tool.
RANK_FILLS = {1: "full", 2: "none", 4: "left", 8: "bottom"}


def tool_style(tool: str) -> tuple[str, str]:
    """(colour, marker) of ``tool``: fixed, whatever else a run measured."""
    return TOOL_STYLES.get(tool, OTHER_STYLE)


def plot(path: str, records: list[Record]) -> str | None:
    """Throughput against size per rank, one line per tool and rank count; save and restore
    side by side, the legend outside the data. Saves that are not durable (no fsync) are
    dashed and labelled so. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    if not any(r["case"] in ("save", "restore") for r in records):
        return "no save or restore measurements"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    handles: dict[str, Any] = {}
    for ax, op in zip(axes, ("save", "restore"), strict=True):
        lines: dict[tuple[str, int, bool], list[tuple[float, float]]] = {}
        for r in records:
            if r["case"] == op and r.get("gbps") is not None:
                durable = op != "save" or r.get("durable") is not False
                key = (r["tool"], r["ranks"], durable)
                lines.setdefault(key, []).append((r["size_mib"], r["gbps"]))
        sizes: set[float] = set()
        for (tool, ranks, durable), pts in sorted(lines.items()):
            pts.sort()
            sizes.update(p[0] for p in pts)
            color, marker = tool_style(tool)
            label = f"{tool}, {ranks} rank{'s' if ranks > 1 else ''}"
            if not durable:
                label += " (not durable: no fsync)"
            (line,) = ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "--" if not durable else "-",
                marker=marker,
                fillstyle=RANK_FILLS.get(ranks, "top"),
                color=color,
                label=label,
            )
            handles.setdefault(label, line)
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xticks(sorted(sizes), [f"{s:g}" for s in sorted(sizes)])
        ax.set_xlabel("MiB per rank")
        ax.set_ylabel("aggregate GB/s (median)")
        ax.set_title(f"{op} ({'durable: fsync' if op == 'save' else 'files in page cache'})")
        ax.grid(True, alpha=0.3)
    if handles:  # one legend for both plots, right of them: it never covers a point
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
