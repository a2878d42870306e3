"""The measurements. Every per-rank case runs unchanged in one process or on N torchrun ranks.

Cases (see README.md): ``save`` and ``restore`` of large tensors, ``small`` (10,000 small
tensors saved and restored), ``crc`` (checksum cost against distckpt's save and restore),
``election`` (offline election and retention over a store of manifests only), ``e2s``
(Earth2Studio's Checkpoint as one more saving tool in the ``save`` case).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import torch

from .common import (
    Config,
    Ctx,
    MiB,
    byte_view,
    make_state,
    median,
    peak_rss_bytes,
    record,
    remove_tree,
    rotated,
    rss_bytes,
    settle,
    state_nbytes,
    timed,
    warm_cache,
)
from .tools import (
    Dcp,
    Earth2Studio,
    Raw,
    State,
    Tool,
    TorchSave,
    distckpt_variants,
    earth2studio_available,
)


def log(ctx: Ctx, msg: str) -> None:
    if ctx.rank == 0:
        print(f"[ranks={ctx.world}] {msg}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _fresh_dir(ctx: Ctx, cfg: Config, name: str) -> str:
    """Collective: an empty working directory for one case (rank 0 clears it)."""
    base = os.path.join(cfg.workdir, f"ranks{ctx.world}", _slug(name))
    if ctx.rank == 0:
        remove_tree(base)
    ctx.barrier()
    return base


def _common(ctx: Ctx, state: State, size_mib: float, label: str) -> dict[str, Any]:
    """The fields every record of one case shares."""
    return {
        "ctx": ctx,
        "size_mib": size_mib,
        "size_label": label,
        "bytes_per_rank": state_nbytes(state),
        "tensors_per_rank": len(state),
    }


def io_case(
    ctx: Ctx,
    cfg: Config,
    *,
    case: str,
    state: State,
    tools: list[Tool],
    size_mib: float,
    size_label: str,
    restore: bool = True,
) -> list[dict[str, Any]]:
    """Save ``state`` with every tool ``cfg.repeat`` times (fresh directory each time, the
    tools' order rotating per repeat), then restore the last save of each tool into
    preallocated tensors with the files in the page cache."""
    base = _fresh_dir(ctx, cfg, f"{case}-{size_label}")
    common = _common(ctx, state, size_mib, size_label)
    _warm_up(ctx, base, tools)
    totals: dict[str, list[float]] = {t.name: [] for t in tools}
    slowest: dict[str, list[float]] = {t.name: [] for t in tools}
    files: dict[str, tuple[int, int]] = {}
    kept: dict[str, str] = {}
    for rep in range(cfg.repeat):
        for tool in rotated(tools, rep):
            path = os.path.join(base, f"{_slug(tool.name)}-{rep}")
            tool.before_save(ctx, path, state)
            total, slow = timed(ctx, functools.partial(tool.save, ctx, path, state))
            tool.after_save(ctx, path)
            ctx.barrier()
            totals[tool.name].append(total)
            slowest[tool.name].append(slow)
            log(ctx, f"{case} save {size_label} {tool.name} #{rep + 1}: {total:.3f} s")
            if rep == cfg.repeat - 1:
                files[tool.name] = tool.files(ctx, path)
                kept[tool.name] = path
            else:
                tool.cleanup(ctx, path)
                if ctx.rank == 0:
                    settle()
                ctx.barrier()
    out = [
        record(
            case=f"{case} save".strip(),
            op="save",
            tool=t.name,
            totals=totals[t.name],
            slowest=slowest[t.name],
            durable=t.durable,
            files_per_rank=files[t.name][0],
            files_total=files[t.name][1],
            **common,
        )
        for t in tools
    ]
    loaders = [t for t in tools if t.can_load]
    if restore and loaders:
        out += _restore(ctx, cfg, case, state, loaders, kept, files, common)
    for tool in tools:
        tool.cleanup(ctx, kept[tool.name])
    if ctx.rank == 0:
        remove_tree(base)
        settle()
    ctx.barrier()
    return out


def _warm_up(ctx: Ctx, base: str, tools: list[Tool]) -> None:
    """Untimed: one tiny save (and load) per tool, so lazy imports and first-call setup
    (DCP's planner, thread pools) do not land in the first timed repeat."""
    tiny = {f"r{ctx.rank}.warm{i}": torch.full((256,), float(i)) for i in range(2)}
    for tool in tools:
        path = os.path.join(base, f"warmup-{_slug(tool.name)}")
        tool.before_save(ctx, path, tiny)
        tool.save(ctx, path, tiny)
        tool.after_save(ctx, path)
        ctx.barrier()
        if tool.can_load:
            tool.load(ctx, path, {k: torch.empty_like(v) for k, v in tiny.items()})
        tool.cleanup(ctx, path)
    if ctx.rank == 0:
        settle()  # nothing left dirty for the first timed save
    ctx.barrier()


def _restore(
    ctx: Ctx,
    cfg: Config,
    case: str,
    state: State,
    tools: list[Tool],
    kept: dict[str, str],
    files: dict[str, tuple[int, int]],
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    targets = {k: torch.empty_like(v) for k, v in state.items()}
    for tool in tools:
        warm_cache(ctx, kept[tool.name])
    totals: dict[str, list[float]] = {t.name: [] for t in tools}
    slowest: dict[str, list[float]] = {t.name: [] for t in tools}
    for rep in range(cfg.repeat):
        for tool in rotated(tools, rep):
            for t in targets.values():
                t.zero_()
            path = kept[tool.name]
            total, slow = timed(ctx, functools.partial(tool.load, ctx, path, targets))
            totals[tool.name].append(total)
            slowest[tool.name].append(slow)
            ok = all(torch.equal(targets[k], v) for k, v in state.items())
            if not all(ctx.gather(ok)):
                raise RuntimeError(f"{tool.name} restored different values ({case})")
            log(ctx, f"{case} restore {common['size_label']} {tool.name} #{rep + 1}: {total:.3f} s")
    return [
        record(
            case=f"{case} restore".strip(),
            op="restore",
            tool=t.name,
            totals=totals[t.name],
            slowest=slowest[t.name],
            durable=None,
            files_per_rank=files[t.name][0],
            files_total=files[t.name][1],
            **common,
        )
        for t in tools
    ]


def crc_case(
    ctx: Ctx, cfg: Config, *, state: State, of_case: str, size_mib: float, size_label: str
) -> dict[str, Any]:
    """distckpt has no switch to turn checksums off: time ``crc32c.crc32c`` over the same
    buffers, one pass, on every rank at once (the report divides by distckpt's save time)."""
    import crc32c

    views = [byte_view(t) for t in state.values()]

    def run() -> None:
        for v in views:
            crc32c.crc32c(v)

    totals, slowest = [], []
    for _ in range(cfg.repeat):
        total, slow = timed(ctx, run)
        totals.append(total)
        slowest.append(slow)
    log(ctx, f"crc32c {size_label}: {median(totals):.3f} s")
    return record(
        case="crc",
        op="crc",
        tool="crc32c",
        ctx=ctx,
        size_mib=size_mib,
        size_label=size_label,
        bytes_per_rank=state_nbytes(state),
        tensors_per_rank=len(state),
        totals=totals,
        slowest=slowest,
        durable=None,
        of_case=of_case,
    )


def run_rank_cases(ctx: Ctx, cfg: Config) -> list[dict[str, Any]]:
    """Every per-rank case selected in ``cfg``, for this rank context."""
    out: list[dict[str, Any]] = []
    cases = set(cfg.cases)
    e2s_missing = earth2studio_available() if "e2s" in cases else "not selected"
    if "e2s" in cases and e2s_missing:
        log(ctx, f"earth2studio skipped: {e2s_missing}")
    if cases & {"save", "restore", "crc", "e2s"}:
        for size in cfg.sizes_mib:
            label = f"{size} MiB"
            state = make_state(ctx.rank, size * MiB, cfg.tensors)
            if cases & {"save", "restore", "e2s"}:
                tools: list[Tool] = []
                if cases & {"save", "restore"}:
                    tools += [*distckpt_variants(), Raw(), TorchSave(), Dcp()]
                if e2s_missing is None:
                    tools.append(Earth2Studio())
                recs = io_case(
                    ctx,
                    cfg,
                    case="",
                    state=state,
                    tools=tools,
                    size_mib=float(size),
                    size_label=label,
                    restore="restore" in cases,
                )
                if "save" not in cases:
                    recs = [r for r in recs if r["op"] != "save" or r["tool"] == "earth2studio"]
                out += recs
            if "crc" in cases:
                out.append(
                    crc_case(
                        ctx, cfg, state=state, of_case="", size_mib=float(size), size_label=label
                    )
                )
            del state
    if "async" in cases:
        for size in cfg.sizes_mib:
            state = make_state(ctx.rank, size * MiB, cfg.tensors)
            out += async_case(ctx, cfg, state=state, size_mib=float(size), label=f"{size} MiB")
            del state
    if "gpu" in cases:
        for size in cfg.sizes_mib:
            out += gpu_case(ctx, cfg, size_mib=float(size), label=f"{size} MiB")
    if "s3" in cases:
        from .s3 import s3_case

        out += s3_case(ctx, cfg)
    if "small" in cases:
        nbytes = cfg.small_count * cfg.small_bytes
        label = f"{cfg.small_count}x{cfg.small_bytes // 1024}KiB"
        state = make_state(ctx.rank, nbytes, cfg.small_count, prefix="s")
        out += io_case(
            ctx,
            cfg,
            case="small",
            state=state,
            tools=[*distckpt_variants(), Dcp(), TorchSave()],
            size_mib=nbytes / MiB,
            size_label=label,
        )
        if "crc" in cases:
            out.append(
                crc_case(
                    ctx, cfg, state=state, of_case="small", size_mib=nbytes / MiB, size_label=label
                )
            )
    return out


def async_case(
    ctx: Ctx, cfg: Config, *, state: State, size_mib: float, label: str
) -> list[dict[str, Any]]:
    """``AsyncSaver.save()`` (the time the caller is blocked: staging into reused buffers)
    beside a synchronous ``distckpt.save`` of the same state into the same store, plus the
    time until the asynchronous row is committed (``wait()``), the staging buffers' bytes
    and this process's resident memory (growth over the case, and peak)."""
    import distckpt

    base = _fresh_dir(ctx, cfg, f"async-{label}")
    common = {**_common(ctx, state, size_mib, label), "durable": True}
    rss0 = rss_bytes()
    sync_t: list[float] = []
    sync_slow: list[float] = []
    blocked_t: list[float] = []
    blocked_slow: list[float] = []
    commit_t: list[float] = []
    commit_slow: list[float] = []
    store = os.path.join(base, "store")
    saver = distckpt.AsyncSaver(store, keep=2)
    saver.save(state)  # untimed: allocates the staging buffers (once per job)
    saver.wait()
    staging = saver.staging_nbytes
    for rep in range(cfg.repeat):
        for what in rotated(["sync", "async"], rep):
            if what == "sync":
                total, slow = timed(ctx, functools.partial(distckpt.save, state, store, keep=2))
                sync_t.append(total)
                sync_slow.append(slow)
            else:
                total, slow = timed(ctx, functools.partial(saver.save, state))
                blocked_t.append(total)
                blocked_slow.append(slow)
                total, slow = timed(ctx, saver.wait)
                commit_t.append(total)
                commit_slow.append(slow)
            log(ctx, f"async {label} {what} #{rep + 1}: {total:.3f} s")
    saver.close()
    growth = max(0, rss_bytes() - rss0)
    peaks = ctx.gather(peak_rss_bytes())
    out = [
        record(case="async", op="save", tool="distckpt sync save", totals=sync_t,
               slowest=sync_slow, **common),
        record(case="async", op="async", tool="distckpt async write()", totals=blocked_t,
               slowest=blocked_slow, staging_bytes=staging, rss_growth_bytes=growth,
               peak_rss_bytes=max(peaks), **common),
        record(case="async", op="commit", tool="distckpt async commit", totals=commit_t,
               slowest=commit_slow, **common),
    ]  # fmt: skip
    if ctx.rank == 0:
        remove_tree(base)
        settle()
    ctx.barrier()
    return out


def gpu_case(ctx: Ctx, cfg: Config, *, size_mib: float, label: str) -> list[dict[str, Any]]:
    """With CUDA: device-to-host copy throughput into pinned memory, and saves of state
    held in ``cuda`` tensors (synchronous, and the time ``AsyncSaver.save()`` blocks)."""
    if not torch.cuda.is_available():
        log(ctx, "gpu case skipped: no CUDA device")
        return []
    import distckpt

    dev = torch.device("cuda", torch.cuda.current_device())
    state = {
        k: v.to(dev) for k, v in make_state(ctx.rank, int(size_mib * MiB), cfg.tensors).items()
    }
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}
    common = _common(ctx, state, size_mib, label)

    def d2h() -> None:
        for k, v in state.items():
            pinned[k].copy_(v, non_blocking=True)
        torch.cuda.synchronize()

    base = os.path.join(cfg.workdir, f"ranks{ctx.world}", _slug(f"gpu-{label}"))
    store = os.path.join(base, "store")
    saver = distckpt.AsyncSaver(store, keep=2)
    saver.save(state)
    saver.wait()
    d2h()
    samples: dict[str, tuple[list[float], list[float]]] = {
        "D2H pinned copy": ([], []),
        "distckpt save (cuda)": ([], []),
        "distckpt async write() (cuda)": ([], []),
    }
    for _ in range(cfg.repeat):
        for name, fn in (
            ("D2H pinned copy", d2h),
            ("distckpt save (cuda)", functools.partial(distckpt.save, state, store, keep=2)),
            ("distckpt async write() (cuda)", functools.partial(saver.save, state)),
        ):
            total, slow = timed(ctx, fn)
            samples[name][0].append(total)
            samples[name][1].append(slow)
            saver.wait()
    saver.close()
    out = [
        record(case="gpu", op="gpu", tool=name, totals=t, slowest=s,
               durable=name != "D2H pinned copy", **common)
        for name, (t, s) in samples.items()
    ]  # fmt: skip
    if ctx.rank == 0:
        remove_tree(base)
    ctx.barrier()
    return out


# -- election (one process, offline) -------------------------------------------------------


def build_manifest_store(path: str, rows: int, ranks: int, tensors: int) -> int:
    """A store of ``rows`` committed rows of ``ranks`` ranks: manifests and group documents
    only, no data. Returns the size in bytes of one manifest."""
    from distckpt.format import tree as codec
    from distckpt.format.layout import ZARR_JSON, group_document
    from distckpt.format.manifest import ArrayEntry, RankManifest, StateRecord
    from distckpt.storage.store import Store, utcnow

    remove_tree(path)
    store = Store(path)
    store.create("election-bench")
    leaves: list[codec.Leaf] = []
    tree = codec.encode({f"w{i}": torch.zeros(256) for i in range(tensors)}, leaves, ("model",))
    states = {"model": StateRecord(tree)}
    created = utcnow()
    man_doc = group_document({"distckpt": "rank commit manifests (JSON files), not zarr data"})
    size = 0
    for row in range(rows):
        mdir = store.manifests_dir(row)
        os.makedirs(mdir)
        with open(os.path.join(store.row_dir(row), ZARR_JSON), "wb") as f:
            f.write(group_document({"distckpt": {"row": row, "created": created}}))
        with open(os.path.join(mdir, ZARR_JSON), "wb") as f:
            f.write(man_doc)
        for rank in range(ranks):
            arrays = tuple(
                ArrayEntry(
                    name=f"model/w{i}",
                    array=f"rank_{rank:06d}/packed",
                    dtype="float32",
                    shape=(256,),
                    nbytes=1024,
                    offset=1024 * i,
                    crc32c=0,
                )
                for i in range(tensors)
            )
            doc = RankManifest(
                row=row,
                rank=rank,
                world_size=ranks,
                write_count=0,
                created=created,
                name="election-bench",
                arrays=arrays,
                states=states,
            ).to_json()
            size = len(doc)
            with open(store.manifest_path(row, rank), "wb") as f:
                f.write(doc)
    return size


def election_case(cfg: Config) -> list[dict[str, Any]]:
    """Time elect_offline, rows_to_delete(keep=1) and one rank's part of the online
    election (local_commits) over a store of cfg.election_rows x cfg.election_ranks."""
    from distckpt.dist.election import elect_offline, local_commits
    from distckpt.dist.retention import rows_to_delete
    from distckpt.storage.store import Store

    ctx = Ctx()
    rows, ranks = cfg.election_rows, cfg.election_ranks
    path = os.path.join(cfg.workdir, "election")
    t0 = time.perf_counter()
    manifest_bytes = build_manifest_store(path, rows, ranks, cfg.election_tensors)
    build_s = time.perf_counter() - t0
    log(ctx, f"election store {rows} rows x {ranks} ranks built in {build_s:.1f} s")
    store = Store(path)
    label = f"{rows} rows x {ranks} ranks"
    runs: list[tuple[str, Any, Any, int]] = [
        ("elect_offline", lambda: elect_offline(store), rows - 1, ranks),
        (
            "rows_to_delete(keep=1)",
            lambda: rows_to_delete(store, 1),
            list(range(rows - 1)),
            rows * ranks,
        ),
        (
            "local_commits(rank 0)",
            lambda: local_commits(store, 0, ranks),
            dict.fromkeys(range(rows), 0),
            rows,
        ),
    ]
    out = []
    for name, fn, expected, reads in runs:
        samples = []
        for _ in range(cfg.repeat):
            t = time.perf_counter()
            got = fn()
            samples.append(time.perf_counter() - t)
            if got != expected:
                raise RuntimeError(f"{name} returned {got!r:.80}, expected {expected!r:.80}")
        log(ctx, f"election {name}: {median(samples):.3f} s")
        out.append(
            record(
                case="election",
                op="election",
                tool=name,
                ctx=ctx,
                size_mib=0.0,
                size_label=label,
                bytes_per_rank=0,
                tensors_per_rank=0,
                totals=samples,
                slowest=[],
                durable=None,
                manifests_read=reads,
                manifest_bytes=manifest_bytes,
                election_rows=rows,
                election_ranks=ranks,
                build_s=build_s,
            )
        )
    remove_tree(path)
    return out
