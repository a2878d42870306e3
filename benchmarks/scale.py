"""The ``scale`` case: a 7B-shaped FSDP2 checkpoint of N ranks, simulated in one process.

What a parallel filesystem's metadata server pays per checkpoint cannot be measured on one
machine by launching 10,000 ranks, so the ranks are played in turn over a
:class:`~distckpt.storage.counting.CountingFileSystem` (the namespace without data bytes):

- state: the 291 parameters of Llama-2-7B (fp32) with AdamW's ``exp_avg`` and ``exp_avg_sq``,
  every one ``Shard(0)`` over N ranks as torch splits it (``Sharded`` pieces whose local
  tensors are meta tensors: shapes without memory), plus one ``step`` per parameter;
- the real planner (``plan_rank``, ``globalio.shard_report`` and ``globalio.layouts`` of
  what the gather brings: every rank of a ``Shard(0)`` job sends the same digest of its
  evenly split tensors, so no box is gathered or checked), the real format-3 writer and
  commit (``prepare_row``, ``open_row_here``, ``write_rank`` -> ``dataio.write_rank_data``,
  ``build_manifest``, ``publish_rank``, then the coordinator's ``seal_row``,
  ``build_index`` and ``publish_index``), the real election
  (``engine.choose_row`` of each rank, through a communicator that plays the ranks in
  turn) and the real load (``distckpt.load`` of each rank's live state: election, the
  open of its part, the load plan, verification and reads through ``GlobalReader`` and
  ``RankReader``) and retention (``remove_index``, ``remove_own_part``, ``remove_row_rest``);
- not run: computing bytes and checksums (the writer's ``byte_view`` and ``checksum`` give
  untouched zero pages of the right length and crc 0) and moving data at load (each read
  of a byte range is counted as the open the local backend makes for it, nothing is
  copied or checked), so a rank's live pieces can be meta tensors.

Where N is large, ``sample`` ranks (rank 0, the coordinator, and others evenly spread) are
simulated and the job's totals extrapolated from them (each sampled rank stands for the
ranks up to the next sample); a record says which of its figures are extrapolated.

DCP beside it: its counts come from ``strace`` of a real ``dcp.save``/``dcp.load`` of the
same keys at one rank (``dcp_counts``), split into the rank's own data file and the
coordinator's ``.metadata``, and scaled as its design is (one data file per rank, one
metadata file per checkpoint, each rank reads ``.metadata`` and its own file at load).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

from distckpt.dist.comm import KnownRanks
from distckpt.engine import steps as engine
from distckpt.engine.api import load as distckpt_load
from distckpt.engine.steps import RowContent, build_manifest
from distckpt.format import chunks
from distckpt.format.layout import DATA_ARRAY, MANIFESTS_DIR, ROW_INDEX, shared_length
from distckpt.format.shards import Box, Sharded
from distckpt.io import dataio, globalio
from distckpt.io.commit import (
    DataShape,
    open_row_here,
    prepare_row,
    publish_index,
    publish_rank,
    seal_row,
    write_rank,
)
from distckpt.io.dataio import bound_bytes, build_index
from distckpt.io.globalio import shard_report
from distckpt.io.removal import remove_index, remove_own_part, remove_row_rest
from distckpt.plan.save import plan_rank
from distckpt.storage import lease
from distckpt.storage import store as store_mod
from distckpt.storage.counting import OPERATIONS, CountingFileSystem, OpCounts
from distckpt.storage.store import Store

# Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, vocabulary 32000.
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 4096, 11008, 32, 32000
DEFAULT_RANKS = (8, 64, 1000, 10_000)
DEFAULT_SAMPLE = 64

# Metadata-server rates (Lustre, one MDT, published mdtest figures), operations per second.
RATES = {"create": 29_000, "mkdir": 19_000, "stat": 544_000, "remove": 160_000}


def llama7b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The 291 parameter tensors of Llama-2-7B, by their Hugging Face names."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def shard0(shape: tuple[int, ...], rank: int, world: int) -> Box:
    """Rank ``rank``'s box of ``Shard(0)`` over ``world`` ranks, split as torch splits."""
    step = -(-shape[0] // world)
    lo = min(rank * step, shape[0])
    n = max(0, min(step, shape[0] - lo))
    return Box((lo, *(0,) * (len(shape) - 1)), (n, *shape[1:]))


def _piece(shape: tuple[int, ...], rank: int, world: int) -> Sharded:
    box = shard0(shape, rank, world)
    return Sharded(torch.empty(box.lengths, device="meta"), shape, box.offsets)


def fsdp_state(rank: int, world: int, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    """One rank's model and AdamW state (DCP's FSDP2 keys), data-less."""
    model = {name: _piece(shape, rank, world) for name, shape in shapes}
    optim = {
        name: {
            "exp_avg": _piece(shape, rank, world),
            "exp_avg_sq": _piece(shape, rank, world),
            "step": torch.tensor(10.0),
        }
        for name, shape in shapes
    }
    return {"model": model, "optim": {"state": optim}}


def _keys(shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """Every global tensor's key (its state path) and shape."""
    out = [(f"model/{n}", s) for n, s in shapes]
    for n, s in shapes:
        out += [(f"optim/state/{n}/exp_avg", s), (f"optim/state/{n}/exp_avg_sq", s)]
    return out


def _report(key: str, shape: tuple[int, ...], rank: int, world: int) -> dict[str, Any]:
    return {
        "key": key,
        "shape": list(shape),
        "dtype": "float32",
        "box": shard0(shape, rank, world).to_json(),
    }


def sampled_ranks(world: int, sample: int) -> dict[int, float]:
    """Ranks simulated -> how many ranks each stands for (1 each when all are simulated)."""
    if world <= sample:
        return dict.fromkeys(range(world), 1.0)
    picks = sorted({0, *(round(1 + i * (world - 2) / (sample - 2)) for i in range(sample - 1))})
    weights = {0: 1.0}
    for a, b in zip(picks[1:], [*picks[2:], world], strict=True):
        weights[a] = float(b - a)
    return weights


@contextlib.contextmanager
def no_bytes() -> Iterator[None]:
    """The format-2 writer and readers without bytes: views of zeros of each tensor's
    length (meta tensors have no memory), crc 0, reads of data ranges counted but not
    copied or checked, and checks lent the file's (never touched) mapping, as the local
    backend's are: no read call."""
    zeros = [memoryview(mmap.mmap(-1, 8 << 20))]  # anonymous pages: never touched

    def view(tensor: torch.Tensor) -> memoryview:
        return view_of(tensor.numel() * tensor.element_size())

    def read_span(fs: Any, ref: Any, offset: int, dest: memoryview, crc: Any, **kw: Any) -> None:
        fs.read_into(ref.path, memoryview(bytearray(0)), offset)

    def verify_span(
        fs: Any, ref: Any, offset: int, nbytes: int, crc: Any, scratch: memoryview, **kw: Any
    ) -> None:
        fs.size(ref.path)  # checked in the mapped file, as the local backend does: no read

    def span_parts(fs: Any, ref: Any, offset: int, nbytes: int, **kw: Any) -> list[memoryview]:
        fs.size(ref.path)  # the local backend lends its mapping of the open file: no read
        return [view_of(nbytes)]

    def view_of(n: int) -> memoryview:
        if n > len(zeros[0]):
            zeros[0] = memoryview(mmap.mmap(-1, n))
        return zeros[0][:n]

    with (
        mock.patch.object(dataio, "byte_view", view),
        mock.patch.object(dataio, "checksum", lambda data, value=0: 0),
        mock.patch.object(globalio, "byte_view", view),
        mock.patch.object(chunks, "read_span", read_span),
        mock.patch.object(chunks, "verify_span", verify_span),
        mock.patch.object(chunks, "span_parts", span_parts),
        mock.patch.object(chunks, "check", lambda ref, data, crc: None),
        _parsed_once(),
    ):
        yield


@contextlib.contextmanager
def _parsed_once() -> Iterator[None]:
    """Each row index document parsed once for the whole simulation (every rank reads and
    counts it; at 10,000 ranks parsing it again per simulated rank would take hours)."""
    real = store_mod.RowIndex.from_json
    cache: dict[int, tuple[bytes, Any]] = {}

    def from_json(raw: bytes, *, where: str = "") -> Any:
        hit = cache.get(id(raw))
        if hit is None or hit[0] is not raw:
            hit = cache[id(raw)] = (raw, real(raw, where=where))
        return hit[1]

    with mock.patch.object(store_mod.RowIndex, "from_json", staticmethod(from_json)):
        yield


class _Replay(KnownRanks):
    """Rank ``rank`` of a job played in turn: gathers see every rank agree with this one,
    broadcasts replay, in order, what the root sent when it ran the same steps first."""

    def __init__(self, rank: int, world_size: int, sent: list[bytes]) -> None:
        super().__init__(rank, world_size)
        self._sent, self._next = sent, 0

    def barrier(self) -> None:
        pass

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [data] * self._size

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        if self._rank == root:
            assert data is not None
            self._sent.append(data)
            return data
        self._next += 1
        return self._sent[self._next - 1]


def _classify(path: str) -> str:
    parent = os.path.basename(os.path.dirname(path))
    if parent == MANIFESTS_DIR:
        return "manifest"
    if parent == DATA_ARRAY:
        return "data"
    return "index" if os.path.basename(path) == ROW_INDEX else os.path.basename(path)[:9]


def simulate(world: int, *, sample: int = DEFAULT_SAMPLE, layers: int = LAYERS) -> dict[str, Any]:
    """One checkpoint of the 7B state at ``world`` ranks: save, elect, load, delete.

    ``layers`` below 32 shrinks the model (tests). Returns the record of the run.
    """
    shapes = [s for s in llama7b_shapes() if _layer(s[0]) < layers]
    keys = _keys(shapes)
    fs = CountingFileSystem(classify=_classify)
    path = "/sim/store"
    store = Store(path, fs)
    ranks = sampled_ranks(world, sample)
    exact = all(w == 1.0 for w in ranks.values())
    wall, cpu = time.perf_counter(), time.process_time()
    save: dict[int, OpCounts] = {}
    first_report: dict[str, Any] | None = None
    own_plan_s: list[float] = []
    with no_bytes():
        before = fs.counts()
        store.create("scale")
        guard = lease.hold(store)
        guard.refresh()
        store.rows()
        data = DataShape(world, *shared_length(_most_bytes(world, shapes)))
        prepare_row(store, 0, data)
        coordinator_extra = fs.counts() - before
        files_before_ranks = fs.files()
        for rank in ranks:
            state = fsdp_state(rank, world, shapes)
            start = time.process_time()
            plan = plan_rank(state, rank=rank, stager=lambda t, where: t)
            # The layouts, as the save computes them: this rank's report, every rank's
            # gathered (a Shard(0) job: every rank sends the same few bytes, so the gathered
            # list is this report N times), then the layouts from them.
            report = shard_report(plan, rank, world)
            layouts = globalio.layouts([report] * world, plan, rank, world)
            own_plan_s.append(time.process_time() - start)
            first_report = first_report or report
            assert report == first_report and not report["boxes"] and layouts is not None
            before = fs.counts()
            made_here = rank != 0 and open_row_here(store, 0, "scale", data)
            written = write_rank(store, plan, 0, rank, layouts, data)
            built = build_manifest(plan, written, RowContent(state, {}, {}), world_size=world)
            publish_rank(store, written, built)
            if made_here:
                seal_row(store, 0)
            save[rank] = fs.counts() - before
        # the coordinator's row index, once every rank committed (built from the layouts)
        before = fs.counts()
        start = time.process_time()
        assert layouts is not None
        index = build_index(0, world, 0, layouts)
        index_s = time.process_time() - start
        seal_row(store, 0)
        publish_index(store, index)
        coordinator_extra = coordinator_extra + (fs.counts() - before)
        index_bytes = fs.size(store.index_path(0))
        del index
        files_after_ranks = fs.files()
        lease.release(store)
        elect, load, elect_s, load_s = _load_side(store, ranks, world, shapes)
    delete = _delete(store, ranks)
    return _record(
        world,
        ranks,
        exact,
        save,
        coordinator_extra,
        elect,
        load,
        delete,
        plan_s=sum(own_plan_s) / len(own_plan_s),
        plan_extrapolated=False,
        elect_s=elect_s,
        load_cpu_s=load_s,
        index_build_s=index_s,
        index_bytes=index_bytes,
        files_written_by_ranks=files_after_ranks - files_before_ranks,
        files_left=fs.files(),
        wall_s=time.perf_counter() - wall,
        cpu_s=time.process_time() - cpu,
        tensors=len(keys),
    )


def _most_bytes(world: int, shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """The largest rank's bound (``dataio.bound_bytes``), as the save's gather finds it:
    rank 0 holds the most of every ``Shard(0)`` split."""
    state = fsdp_state(0, world, shapes)
    return bound_bytes(plan_rank(state, rank=0, stager=lambda t, where: t))


def _layer(name: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _load_side(
    store: Store,
    ranks: dict[int, float],
    world: int,
    shapes: list[tuple[str, tuple[int, ...]]],
) -> tuple[dict[int, OpCounts], dict[int, OpCounts], float, float]:
    """Each simulated rank's election (``choose_row``) and whole ``distckpt.load`` of its
    live state, as a fresh process would (nothing cached): the election, the open of its
    part, the load plan, the verification and the reads of every range it needs."""
    fs = store.fs
    assert isinstance(fs, CountingFileSystem)
    elect: dict[int, OpCounts] = {}
    load: dict[int, OpCounts] = {}
    elect_cpu, load_cpu = [], []
    sent_elect: list[bytes] = []
    sent_load: list[bytes] = []
    for rank in ranks:
        own = Store(store.path, fs)  # a process of its own: nothing cached
        before = fs.counts()
        start = time.process_time()
        chosen = engine.choose_row(own, _Replay(rank, world, sent_elect), None)
        elect_cpu.append(time.process_time() - start)
        assert chosen == 0, chosen
        elect[rank] = fs.counts() - before
        own = Store(store.path, fs)
        live = fsdp_state(rank, world, shapes)
        before = fs.counts()
        start = time.process_time()
        got = distckpt_load(live, own, comm=_Replay(rank, world, sent_load))
        load_cpu.append(time.process_time() - start)
        assert got == 0, got
        load[rank] = fs.counts() - before
    return elect, load, sum(elect_cpu) / len(elect_cpu), sum(load_cpu) / len(load_cpu)


def _delete(store: Store, ranks: dict[int, float]) -> dict[int, OpCounts]:
    """Retention deleting the row: each simulated rank's own part, then the coordinator's
    rest (counted on rank 0)."""
    fs = store.fs
    assert isinstance(fs, CountingFileSystem)
    out = {}
    before = fs.counts()
    remove_index(store, 0)  # the coordinator, first: the row stops being indexed
    first = fs.counts() - before
    for rank in ranks:
        before = fs.counts()
        remove_own_part(store, 0, rank)
        out[rank] = fs.counts() - before
    before = fs.counts()
    remove_row_rest(store, 0)
    out[-1] = (fs.counts() - before) + first
    return out


def _total(per_rank: dict[int, OpCounts], ranks: dict[int, float], what: str) -> float:
    return sum(per_rank[r].ops[what] * w for r, w in ranks.items())


def mds_seconds(ops: dict[str, float]) -> float:
    """Projected metadata-server time: fsync and rename priced as creates, opens of
    existing files as stats."""
    return (
        (ops["creates"] + ops["fsyncs"] + ops["renames"]) / RATES["create"]
        + ops["mkdirs"] / RATES["mkdir"]
        + (ops["stats"] + ops["opens"] + ops["listdirs"]) / RATES["stat"]
        + (ops["unlinks"] + ops["rmdirs"]) / RATES["remove"]
    )


METADATA_OPS = (
    "creates",
    "mkdirs",
    "opens",
    "fsyncs",
    "renames",
    "stats",
    "unlinks",
    "rmdirs",
    "listdirs",
)


def _record(
    world: int,
    ranks: dict[int, float],
    exact: bool,
    save: dict[int, OpCounts],
    coordinator: OpCounts,
    elect: dict[int, OpCounts],
    load: dict[int, OpCounts],
    delete: dict[int, OpCounts],
    **extra: Any,
) -> dict[str, Any]:
    saved = {k: _total(save, ranks, k) + coordinator.ops[k] for k in OPERATIONS}
    loaded = {k: _total(load, ranks, k) for k in OPERATIONS}
    elected = {k: _total(elect, ranks, k) for k in OPERATIONS}
    deleted = {k: _total(delete, ranks, k) + delete[-1].ops[k] for k in OPERATIONS}

    def reads(per_rank: dict[int, OpCounts], kind: str) -> float:
        return sum(per_rank[r].reads.get(kind, 0) * w for r, w in ranks.items())

    return {
        "case": "scale",
        "tool": "distckpt",
        "ranks": world,
        "simulated_ranks": len(ranks),
        "extrapolated": not exact,
        "save": saved,
        "save_ops": sum(saved[k] for k in METADATA_OPS),
        "save_mds_s": mds_seconds(saved),
        "save_by_ranks": {k: _total(save, ranks, k) for k in OPERATIONS},
        "save_rank0": save[0].ops,
        "save_rank_max": {k: max(save[r].ops[k] for r in ranks) for k in OPERATIONS},
        "coordinator_extra": coordinator.ops,
        "elect": elected,
        "elect_manifest_reads": reads(elect, "manifest"),
        "elect_index_reads": reads(elect, "index"),
        "elect_ops": sum(elected[k] for k in METADATA_OPS),
        "load": loaded,
        "load_ops": sum(loaded[k] for k in METADATA_OPS),
        "load_manifest_reads": reads(load, "manifest"),
        "load_index_reads": reads(load, "index"),
        "load_data_opens": reads(load, "data"),
        "load_rank_max": {k: max(load[r].ops[k] for r in ranks) for k in OPERATIONS},
        "delete": deleted,
        "delete_ops": sum(deleted[k] for k in METADATA_OPS),
        "delete_rank_max_unlinks": max(delete[r].ops["unlinks"] for r in ranks),
        **extra,
    }


# -- DCP, from strace of a real save and load at one rank ---------------------------------
_DCP_SCRIPT = """
import sys, torch
import torch.distributed.checkpoint as dcp
from benchmarks.scale import _keys, llama7b_shapes
keys = _keys(llama7b_shapes())
state = {k: torch.zeros(2) for k, _ in keys}
state.update({f"optim/state/{k}/step": torch.tensor(1.0) for k, _ in llama7b_shapes()})
if sys.argv[2] == "save":
    dcp.save(state, checkpoint_id=sys.argv[1])
else:
    dcp.load(state, checkpoint_id=sys.argv[1])
"""
_SYSCALL = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)")


def _strace_counts(log: str, root: str) -> tuple[dict[str, int], dict[str, int]]:
    """(per rank, coordinator) operations on files under ``root`` in an strace log:
    ``.metadata`` and the checkpoint directory itself count once per checkpoint."""
    rank: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
    coord: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
    kinds = {
        "mkdir": "mkdirs",
        "mkdirat": "mkdirs",
        "fsync": "fsyncs",
        "fdatasync": "fsyncs",
        "rename": "renames",
        "renameat": "renames",
        "renameat2": "renames",
        "unlink": "unlinks",
        "unlinkat": "unlinks",
        "stat": "stats",
        "lstat": "stats",
        "newfstatat": "stats",
        "statx": "stats",
        "access": "stats",
        "faccessat": "stats",
        "faccessat2": "stats",
        "getdents64": "listdirs",
    }
    with open(log) as f:
        for line in f:
            m = _SYSCALL.match(line.strip())
            if m is None or root not in line:
                continue
            name, args = m.groups()
            target = (
                coord
                if (".metadata" in args or f'"{root}"' in args or f"<{root}>" in args)
                else rank
            )
            if name in ("open", "openat"):
                target["opens"] += 1
                target["creates"] += int("O_CREAT" in args)
            elif name in kinds:
                what = kinds[name]
                if name == "unlinkat" and "AT_REMOVEDIR" in args:
                    what = "rmdirs"
                target[what] += 1
    return rank, coord


def dcp_counts(workdir: str) -> dict[str, Any] | None:
    """DCP's operations for the 7B keys at one rank, from strace; None without strace."""
    import shutil

    if shutil.which("strace") is None:
        return None
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = os.path.join(tmp, "dcp")
        for op in ("save", "load"):
            log = os.path.join(tmp, f"{op}.strace")
            cmd = [
                "strace",
                "-f",
                "-qq",
                "-y",
                "-o",
                log,
                sys.executable,
                "-c",
                _DCP_SCRIPT,
                root,
                op,
            ]
            env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"DCP under strace failed: {done.stderr[-500:]}", file=sys.stderr)
                return None
            out[op] = dict(zip(("rank", "coordinator"), _strace_counts(log, root), strict=True))
    return out


def dcp_projection(counts: dict[str, Any], world: int) -> dict[str, Any]:
    """DCP at ``world`` ranks by its design: the per-rank operations on every rank (one
    data file each), the coordinator's ``.metadata`` once; at load every rank reads
    ``.metadata`` (the coordinator's load-side figure, on every rank) and its own file."""
    save = {
        k: counts["save"]["rank"][k] * world + counts["save"]["coordinator"][k] for k in OPERATIONS
    }
    load = {
        k: (counts["load"]["rank"][k] + counts["load"]["coordinator"][k]) * world
        for k in OPERATIONS
    }
    return {
        "case": "scale",
        "tool": "DCP",
        "ranks": world,
        "save": save,
        "save_ops": sum(save[k] for k in METADATA_OPS),
        "save_mds_s": mds_seconds(save),
        "load": load,
        "load_ops": sum(load[k] for k in METADATA_OPS),
        "load_mds_s": mds_seconds(load),
        "delete_ops": world + 2,  # its files and the directory
        # the coordinator: its own data file and .metadata
        "files_rank_max": counts["save"]["rank"]["creates"]
        + counts["save"]["coordinator"]["creates"],
        "source": "strace of dcp.save/dcp.load at 1 rank, scaled by its one-file-per-rank design",
    }


# -- the case, its table and its plot ------------------------------------------------------
def scale_case(
    ranks: list[int], *, sample: int = DEFAULT_SAMPLE, workdir: str | None = None
) -> list[dict[str, Any]]:
    """distckpt simulated at each rank count in ``ranks``, DCP beside it."""
    records = []
    for world in ranks:
        print(f"[scale] simulating {world} ranks ...", file=sys.stderr, flush=True)
        rec = simulate(world, sample=sample)
        rec["load_mds_s"] = mds_seconds(rec["load"])
        print(
            f"[scale] {world} ranks: {rec['save_ops']:,.0f} operations per save "
            f"({rec['simulated_ranks']} ranks simulated, {rec['wall_s']:.0f} s, "
            f"{rec['cpu_s']:.0f} s CPU)",
            file=sys.stderr,
            flush=True,
        )
        records.append(rec)
    counts = dcp_counts(workdir or tempfile.gettempdir())
    if counts is None:
        print("[scale] DCP counts skipped (no strace, or DCP failed)", file=sys.stderr)
    else:
        records += [dcp_projection(counts, world) for world in ranks]
    return records


def _n(x: float) -> str:
    return f"{x:,.0f}"


def format_scale_table(records: list[dict[str, Any]]) -> str:
    """One markdown row per tool and rank count: per checkpoint, and per rank."""
    head = (
        "| ranks | tool | save ops / ckpt | files created | dirs created | opens | fsyncs "
        "| renames | stats | files / rank (max) | manifest + index reads: election / load "
        "| load ops / ckpt (max / rank) | delete ops / ckpt (max unlinks / rank) "
        "| planning CPU / rank | election CPU / rank | MDS s: save / load |"
    )
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in sorted(records, key=lambda r: (r["ranks"], r["tool"] != "distckpt")):
        s = r["save"]
        mark = " (est.)" if r.get("extrapolated") else ""
        if r["tool"] == "distckpt":
            per_rank = _n(r["save_rank_max"]["creates"])
            reads = (
                f"{_n(r['elect_manifest_reads'])} + {_n(r['elect_index_reads'])} / "
                f"{_n(r['load_manifest_reads'])} + {_n(r['load_index_reads'])}"
            )
            load = f"{_n(r['load_ops'])} ({_n(sum(r['load_rank_max'][k] for k in METADATA_OPS))})"
            delete = f"{_n(r['delete_ops'])} ({_n(r['delete_rank_max_unlinks'])})"
            plan = f"{r['plan_s']:.2f} s" + (" (est.)" if r["plan_extrapolated"] else "")
            elect = f"{r['elect_s'] * 1000:.0f} ms"
        else:
            per_rank = _n(r["files_rank_max"])
            reads = "- / " + _n(r["ranks"])
            load = f"{_n(r['load_ops'])} ({_n(r['load_ops'] / r['ranks'])})"
            delete = _n(r["delete_ops"])
            plan, elect = "-", "-"
        lines.append(
            f"| {r['ranks']:,} | {r['tool']}{mark} | {_n(r['save_ops'])} | {_n(s['creates'])} "
            f"| {_n(s['mkdirs'])} | {_n(s['opens'])} | {_n(s['fsyncs'])} | {_n(s['renames'])} "
            f"| {_n(s['stats'])} | {per_rank} | {reads} | {load} | {delete} "
            f"| {plan} | {elect} | {r['save_mds_s']:.1f} / {r['load_mds_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_scale(path: str, records: list[dict[str, Any]]) -> str | None:
    """Metadata operations per checkpoint (save and load) against ranks, log-log, one line
    per tool in the harness's fixed colours. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    from .report import tool_style

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for tool in sorted({r["tool"] for r in records}):
        color, marker = tool_style(tool)
        pts = sorted(
            (r["ranks"], r["save_ops"], r["load_ops"]) for r in records if r["tool"] == tool
        )
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "-", marker=marker, color=color, label=f"{tool} save")
        ax.plot(
            xs,
            [p[2] for p in pts],
            ":",
            marker=marker,
            color=color,
            fillstyle="none",
            label=f"{tool} load",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("metadata operations per checkpoint")
    ax.set_title("7B FSDP2 checkpoint (Llama-2-7B + AdamW, Shard(0))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
