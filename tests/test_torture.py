"""Crash torture: SIGKILL real ranks of the reference ensemble at random points, relaunch, compare.

Every configuration (launcher, ranks, checkpoint level, model) runs ``scripts/ensemble.py``
again and again, each launch with one fault (``DISTCKPT_FAULT="point@rank:row"``: a random
rank, a random point among ``before_data``, ``after_data``, ``after_manifest``,
``after_commit`` and ``after_output``, a random row among those the launch still has to
write, biased toward batch boundaries), until it has been killed ``DISTCKPT_TORTURE_KILLS``
times; a last launch then runs to the end. Its output store must equal, bit for bit (NaN
patterns included, and no NaN left: every step written), that of one uninterrupted
single-process run of the same model: outputs are keyed by member id, so levels, world sizes
and batch sizes must not change a bit. Between launches the test predicts, from the store
alone, which rows the next launch writes, what it resumes from and whether it re-runs a batch,
and checks every prediction (a fault that does not fire, or a launch that writes one row too
many, fails the test).

Options (environment variables, read at import):

``DISTCKPT_TORTURE_SEED=N``   base seed of the random picks (default 20260417); every failure
                              message names it, with the launches so far, to replay a run.
``DISTCKPT_TORTURE_KILLS=N``  kills per torture configuration (default 2, so 12 in the
                              default matrix, plus 5 scripted ones, which keeps the default
                              test run inside its time budget; a long run sets 8 or more).
                              More is slower: each kill is one launch (~3-6 s); the per-test
                              timeout grows with N.

``pytest tests/test_torture.py -q -s`` prints one summary line per configuration as it ends
and all of them again, with the totals, at the end of the module.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from multiproc import (
    ENSEMBLE_SCRIPT,
    LaunchResult,
    ensemble_args,
    launch,
    mpi_unavailable,
    needs_mpiexec,
    run_command,
)

import distckpt
from distckpt import Store

SCRIPT = ENSEMBLE_SCRIPT
MEMBERS, STEPS, GRID = 8, 6, (8, 16)
ROWS_PER_BATCH = STEPS + 1  # a boundary (row) after the initial condition and every step
POINTS = ("before_data", "after_data", "after_manifest", "after_commit", "after_output")

BASE_SEED = int(os.environ.get("DISTCKPT_TORTURE_SEED", "20260417"))
KILLS = int(os.environ.get("DISTCKPT_TORTURE_KILLS", "2"))
LAUNCH_TIMEOUT = 60.0
# Launches of one torture test: KILLS kills, the final run, and the reference (fixture setup).
TORTURE_TIMEOUT = int(60 + (KILLS + 2) * LAUNCH_TIMEOUT)

SIGKILLED = re.compile(r"SIGKILL|signal:? 9\b|exitcode\s*: -9", re.I)
# torchrun's failure report: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: ...)".
TORCHRUN_KILLED = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*-9\b")
DONE = re.compile(r"^DONE world=(\d+) resumed_from=(\S+) rerun_batch=(\S+) digest=(\w+)\s*$", re.M)
RERUN_WARNING = re.compile(r"UserWarning: checkpoint row \d+ was written at level \d: re-running")

multiproc = pytest.mark.multiproc
# The scripted tests run under the quicker launcher (mpiexec starts no torch in the launcher).
FAST_LAUNCHER = "torchrun" if mpi_unavailable() else "mpiexec"


# -- the workload -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    launcher: str  # "torchrun", "mpiexec" or "single" (one plain process, no launcher)
    nproc: int
    level: int
    model: str = "stochastic"
    batch_size: int = 2

    @property
    def name(self) -> str:
        return f"{self.launcher}{self.nproc}-level{self.level}-{self.model}-bs{self.batch_size}"

    @property
    def nbatches(self) -> int:
        """Batches per rank (every rank runs the same number, in lockstep)."""
        return math.ceil(math.ceil(MEMBERS / self.nproc) / self.batch_size)

    def members(self, rank: int, batch: int | None = None) -> list[int]:
        """Rank ``rank``'s members (round robin), or those of one of its batches."""
        mine = list(range(rank, MEMBERS, self.nproc))
        if batch is None:
            return mine
        return mine[batch * self.batch_size : (batch + 1) * self.batch_size]

    def args(self, root: Path) -> list[str]:
        return ensemble_args(
            root,
            members=MEMBERS,
            steps=STEPS,
            grid=GRID,
            batch_size=self.batch_size,
            level=self.level,
            model=self.model,
        )

    def launch(self, root: Path, fault: str | None) -> LaunchResult:
        env = {"DISTCKPT_FAULT": fault} if fault else None
        if self.launcher == "single":
            cmd = [sys.executable, str(SCRIPT), *self.args(root)]
            return run_command(cmd, env=env, timeout=LAUNCH_TIMEOUT)
        return launch(
            self.launcher, self.nproc, SCRIPT, self.args(root), env=env, timeout=LAUNCH_TIMEOUT
        )


def read_output(root: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(root / "out" / "x"), mode="r")[...])


def digest_of(array: np.ndarray) -> str:
    """What ``scripts/ensemble.py`` prints: a sha256 prefix of the whole output array."""
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@dataclass(frozen=True)
class Done:
    world: int
    resumed_from: str
    rerun_batch: str
    digest: str


def parse_done(result: LaunchResult) -> Done | None:
    found = DONE.findall(result.stdout)
    if len(found) != 1:
        return None
    world, resumed, rerun, digest = found[0]
    return Done(int(world), resumed, rerun, digest)


# -- what the store says the next launch will do ----------------------------------------------
@dataclass(frozen=True)
class Progress:
    """The store after a launch, and what the next launch must do from it."""

    latest: int | None  # the row a restart elects
    next_row: int  # the id the next row gets: one past the newest row directory
    rows: tuple[tuple[int, int], ...]  # (batch, step) of every row the next launch writes
    rerun_batch: int | None  # the batch it re-runs from lead time zero (levels 0/1)
    metas: tuple[dict[str, Any], ...] = ()  # every rank's metadata of `latest`
    write_count: int = 0

    def fault_row(self, point: str, offset: int) -> int:
        """The row id ``point`` sees at the ``offset``-th boundary of the next launch.

        Every point sees the row being written (or about to be): ``next_row + offset``
        (rows killed mid-write leave directories, so ids skip them).
        """
        return self.next_row + offset


def progress(cfg: Config, root: Path) -> Progress:
    st = Store(root / "ckpt")
    ids = st.rows() if os.path.isdir(st.rows_dir) else []
    next_row = ids[-1] + 1 if ids else 0
    latest = distckpt.latest(root / "ckpt") if ids else None
    every = [(b, s) for b in range(cfg.nbatches) for s in range(ROWS_PER_BATCH)]
    if latest is None:
        return Progress(None, next_row, tuple(every), None)

    metas = tuple(distckpt.metadata(root / "ckpt", row=latest, rank=r) for r in range(cfg.nproc))
    manifest = st.read_manifest(latest, 0)
    for r, meta in enumerate(metas):  # ranks run in lockstep: one batch position for all
        assert (meta["batch"], meta["batches_done"]) == (
            metas[0]["batch"],
            metas[0]["batches_done"],
        ), f"row {latest}: rank {r} metadata {meta} vs rank 0 {metas[0]}"
        # Completion is recorded for all ranks' members, in every rank's row.
        done_members = [
            m
            for b in range(meta["batches_done"])
            for q in range(cfg.nproc)
            for m in cfg.members(q, b)
        ]
        assert sorted(meta["completed_ensembles"]) == sorted(done_members), (
            f"row {latest}: rank {r} says {meta['completed_ensembles']} complete after "
            f"{meta['batches_done']} batches; all ranks' members there are {done_members}"
        )
    batch, done, count = metas[0]["batch"], metas[0]["batches_done"], manifest.write_count
    assert manifest.level == cfg.level, (manifest.level, cfg.level)
    first_step, rerun = 0, None
    if batch == done and count > 0:  # inside a batch
        if cfg.level >= 2:
            first_step = count  # boundaries 0 .. count-1 are done: continue after them
        else:
            rerun = batch
    rows = [(b, s) for b, s in every if b > done or (b == done and s >= first_step)]
    return Progress(latest, next_row, tuple(rows), rerun, metas, count)


def settled_chunks(cfg: Config, prog: Progress) -> Iterator[tuple[int, int]]:
    """(member, step) output chunks that the elected row says were written before it."""
    for rank, meta in enumerate(prog.metas):
        for m in meta["completed_ensembles"]:
            for s in range(STEPS + 1):
                yield m, s
        if meta["batch"] == meta["batches_done"]:
            for m in cfg.members(rank, meta["batch"]):
                for s in range(prog.write_count):
                    yield m, s


# -- reference and summary ----------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    array: np.ndarray
    digest: str


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run per model, as a single process (world size 1), cached.

    Every torture configuration (2 and 4 ranks, levels 0-2, batch sizes 1 and 2) must end
    with this very array: that is the "identical across levels and world sizes" check.
    """
    cache: dict[str, Reference] = {}

    def get(model: str) -> Reference:
        if model not in cache:
            cfg = Config("single", 1, 2, model)
            root = tmp_path_factory.mktemp(f"reference-{model}")
            result = cfg.launch(root, None).check()
            done = parse_done(result)
            assert done is not None, f"no DONE line\n{result.describe()}"
            assert (done.world, done.resumed_from, done.rerun_batch) == (1, "None", "None")
            array = read_output(root)
            assert array.shape == (MEMBERS, STEPS + 1, *GRID), array.shape
            assert not np.isnan(array).any(), "the reference left steps unwritten"
            assert digest_of(array) == done.digest
            # Not vacuous: members differ (perturbation, and noise for the stochastic model).
            assert not np.array_equal(array[0], array[1])
            assert not np.array_equal(array[:, 0], array[:, -1])
            cache[model] = Reference(array, done.digest)
        return cache[model]

    yield get
    if len(cache) == 2:
        a, b = cache["stochastic"].array, cache["persistence"].array
        assert not np.array_equal(a[:, 1:], b[:, 1:]), "the two models produced the same steps"


@dataclass
class Summary:
    lines: list[str] = field(default_factory=list)
    kills: int = 0
    exact: int = 0
    configs: int = 0


SUMMARY = Summary()


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request: pytest.FixtureRequest):
    yield
    if not SUMMARY.lines:
        return
    lines = [
        "",
        f"crash torture summary (DISTCKPT_TORTURE_SEED={BASE_SEED}, "
        f"DISTCKPT_TORTURE_KILLS={KILLS}):",
        *SUMMARY.lines,
        f"TOTAL {SUMMARY.kills} kill points in {SUMMARY.configs} runs; "
        f"{SUMMARY.exact} of {SUMMARY.kills} resumed bit-exactly",
    ]
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)


# -- the torture loop -----------------------------------------------------------------------------
class Torture:
    """One configuration's store, launches and history; every failure message replays it."""

    def __init__(self, cfg: Config, root: Path, ref: Reference, seed: str) -> None:
        self.cfg, self.root, self.ref, self.seed = cfg, root, ref, seed
        self.history: list[str] = []
        self.kills: list[str] = []
        self.settled_exact = 0
        self.launches = 0

    def context(self) -> str:
        done = "\n".join(f"  {h}" for h in self.history) or "  (none)"
        return (
            f"[{self.cfg.name}] DISTCKPT_TORTURE_SEED={BASE_SEED} (picks seeded with "
            f"{self.seed!r}), DISTCKPT_TORTURE_KILLS={KILLS}; launches so far:\n{done}"
        )

    def _launch(self, fault: str | None) -> LaunchResult:
        self.launches += 1
        result = self.cfg.launch(self.root, fault)
        self.history.append(
            f"DISTCKPT_FAULT={fault} -> exit {result.returncode} after {result.seconds:.1f}s"
        )
        return result

    def kill(self, point: str, rank: int, offset: int) -> Progress:
        """One launch that must die at ``point`` on ``rank`` at the ``offset``-th boundary
        still to write; checks what the kill left in the store."""
        before = progress(self.cfg, self.root)
        assert 0 <= offset < len(before.rows), (offset, before, self.context())
        row = before.fault_row(point, offset)
        fault = f"{point}@{rank}:{row}"
        result = self._launch(fault)
        batch, step = before.rows[offset]
        self.history[-1] += f" (batch {batch} step {step})"
        why = f"{self.context()}\n{result.describe()}"
        assert result.returncode != 0, f"the fault {fault} did not fire\n{why}"
        assert SIGKILLED.search(result.output), f"no rank was SIGKILLed\n{why}"
        assert parse_done(result) is None, f"a killed job printed DONE\n{why}"
        if self.cfg.launcher == "torchrun":
            killed = {int(r) for r in TORCHRUN_KILLED.findall(result.output)}
            assert rank in killed, f"rank {rank} was not the SIGKILLed one ({killed})\n{why}"

        after = progress(self.cfg, self.root)
        target = before.next_row + offset  # the row being written when the fault fired
        prev = before.next_row + offset - 1 if offset > 0 else before.latest
        expected = {
            "before_data": {prev},
            "after_data": {prev},
            "after_manifest": {prev, target},  # the others may or may not have published
            "after_commit": {target},
            "after_output": {prev},
        }[point]
        assert after.latest in expected, (
            f"after {fault} the store elects row {after.latest}, expected one of {expected}\n{why}"
        )
        if point != "after_output":  # the library's points come after the row was prepared
            assert after.next_row == target + 1, (after, target, why)

        # Everything the elected row says was written before it is already bit-exact.
        if after.latest is not None:
            out = zarr.open_array(str(self.root / "out" / "x"), mode="r")
            for m, s in settled_chunks(self.cfg, after):
                got = np.asarray(out[m, s])
                assert bit_equal(got, self.ref.array[m, s]), (
                    f"after {fault}: output member {m} step {s} differs from the reference "
                    f"although row {after.latest} records it as written\n{why}"
                )
        self.settled_exact += 1
        self.kills.append(f"{fault}")
        return after

    def finish(self, rng: random.Random) -> Done:
        """The last launch: runs to the end. It carries a fault one row beyond the rows it
        should write, which must not fire (no extra row). Checks everything at the end."""
        before = progress(self.cfg, self.root)
        n = len(before.rows)
        point, rank = rng.choice(POINTS), rng.randrange(self.cfg.nproc)
        fault = f"{point}@{rank}:{before.next_row + n}"
        result = self._launch(fault)
        why = f"{self.context()}\n{result.describe()}"
        assert result.returncode == 0, f"the final launch failed\n{why}"
        done = parse_done(result)
        assert done is not None, f"no single DONE line\n{why}"
        assert done.world == self.cfg.nproc, why
        assert done.resumed_from == str(before.latest), (done, before, why)
        assert done.rerun_batch == str(before.rerun_batch), (done, before, why)
        if before.rerun_batch is None:
            assert "re-running batch" not in result.stderr, why
        else:
            assert RERUN_WARNING.search(result.stderr), f"no re-run UserWarning\n{why}"
            assert f"re-running batch {before.rerun_batch} from lead time zero" in result.stderr

        after = progress(self.cfg, self.root)
        assert after.rows == (), f"work left after the final launch: {after}\n{why}"
        written = before.next_row + n - 1 if n else before.latest
        assert after.latest == written, (
            f"the final launch should have written rows {before.next_row}..{written}; "
            f"the store elects {after.latest}\n{why}"
        )
        if n:  # mode="overwrite": retention after its last commit left that row alone
            rows = Store(self.root / "ckpt").rows()
            assert rows == [after.latest], f"rows left in the store: {rows}\n{why}"
        # Every rank's last row says all members are complete.
        for meta in after.metas:
            assert sorted(meta["completed_ensembles"]) == list(range(MEMBERS)), (meta, why)

        array = read_output(self.root)
        assert not np.isnan(array).any(), f"output steps left unwritten (NaN)\n{why}"
        assert bit_equal(array, self.ref.array), (
            f"output differs from the uninterrupted reference in "
            f"{int((array.view(np.uint32) != self.ref.array.view(np.uint32)).sum())} values"
            f"\n{why}"
        )
        assert done.digest == self.ref.digest == digest_of(array), why
        return done

    def pick(self, rng: random.Random, kills_left: int) -> tuple[str, int, int]:
        """A random (point, rank, offset); the offset is among the rows still to write,
        biased toward batch boundaries (a batch's last row, the next batch's first).

        While more kills are due, the last row is only hit where it cannot commit, so the
        work never ends before the kills are done."""
        prog = progress(self.cfg, self.root)
        n = len(prog.rows)
        points = POINTS
        if kills_left > 1:
            if n > 1:
                n -= 1  # any kill leaves at least the last row to write
            else:
                points = ("before_data", "after_data", "after_output")
        edges = [i for i, (b, s) in enumerate(prog.rows[:n]) if s == STEPS or (s == 0 and b > 0)]
        if edges and rng.random() < 0.4:
            offset = rng.choice(edges)
        else:  # a window that spreads the kills over the rows still to write
            offset = rng.randrange(min(n, max(3, math.ceil(2 * n / (kills_left + 1)))))
        return rng.choice(points), rng.randrange(self.cfg.nproc), offset

    def report(self, done: Done, what: str) -> str:
        exact = self.settled_exact
        line = (
            f"{what} {self.cfg.name}: {self.launches} launches, {len(self.kills)} kills "
            f"[{', '.join(self.kills)}], {exact}/{len(self.kills)} kills resumed bit-exactly; "
            f"final resumed_from={done.resumed_from} rerun_batch={done.rerun_batch} "
            f"digest={done.digest} = reference"
        )
        SUMMARY.lines.append(line)
        SUMMARY.kills += len(self.kills)
        SUMMARY.exact += exact  # final output bit-exact (asserted): every kill resumed exactly
        SUMMARY.configs += 1
        print(line)
        return line


# -- tests ----------------------------------------------------------------------------------------
MATRIX = [
    pytest.param(Config("torchrun", 2, 2), id="torchrun2-level2", marks=pytest.mark.long),
    pytest.param(
        Config("torchrun", 4, 1, batch_size=1), id="torchrun4-level1", marks=pytest.mark.long
    ),
    pytest.param(Config("torchrun", 2, 0), id="torchrun2-level0", marks=pytest.mark.long),
    pytest.param(Config("mpiexec", 2, 2), id="mpiexec2-level2", marks=needs_mpiexec),
    pytest.param(
        Config("mpiexec", 4, 0, batch_size=1),
        id="mpiexec4-level0",
        marks=[needs_mpiexec, pytest.mark.long],
    ),
    pytest.param(
        Config("torchrun", 2, 2, "persistence"),
        id="torchrun2-level2-persistence",
        marks=pytest.mark.long,
    ),
]


@multiproc
@pytest.mark.timeout(TORTURE_TIMEOUT)
@pytest.mark.parametrize("cfg", MATRIX)
def test_torture(reference, tmp_path: Path, cfg: Config) -> None:
    """KILLS random kills, then a run to the end: bit-exact with the reference."""
    seed = f"{BASE_SEED}:{cfg.name}"
    rng = random.Random(seed)
    torture = Torture(cfg, tmp_path, reference(cfg.model), seed)
    for k in range(KILLS):
        if not progress(cfg, tmp_path).rows:  # killed after the last row committed
            break
        torture.kill(*torture.pick(rng, KILLS - k))
    assert torture.launches <= KILLS, torture.context()
    done = torture.finish(rng)
    torture.report(done, "TORTURE")


@multiproc
@pytest.mark.timeout(int(60 + 4 * LAUNCH_TIMEOUT))
def test_killed_before_first_commit_starts_fresh(reference, tmp_path: Path) -> None:
    """Killed twice before any row committed (before_data of row 0 on rank 0, then
    after_data of the next row, 1, as row 0's directory is left behind): the relaunch
    starts fresh (resumed_from=None) and ends equal to the reference."""
    cfg = Config(FAST_LAUNCHER, 2, 2)
    torture = Torture(cfg, tmp_path, reference(cfg.model), "scripted")
    after = torture.kill("before_data", 0, 0)
    assert after.latest is None and after.next_row == 1, (after, torture.context())
    after = torture.kill("after_data", 1, 0)
    assert after.latest is None and after.next_row == 2, (after, torture.context())
    assert torture.kills == ["before_data@0:0", "after_data@1:1"], torture.context()
    done = torture.finish(random.Random(BASE_SEED))
    assert (done.resumed_from, done.rerun_batch) == ("None", "None"), torture.context()
    torture.report(done, "FRESH")


MID_BATCH = [
    pytest.param(2, "after_commit", id="level2"),  # resumes inside the batch
    pytest.param(
        1, "after_data", id="level1", marks=pytest.mark.long
    ),  # re-runs the batch, same perturbation draws
    pytest.param(
        0, "after_output", id="level0", marks=pytest.mark.long
    ),  # re-runs the batch, re-seeded generators
]


@multiproc
@pytest.mark.timeout(int(60 + 3 * LAUNCH_TIMEOUT))
@pytest.mark.parametrize(("level", "point"), MID_BATCH)
def test_mid_batch_resume_by_level(reference, tmp_path: Path, level: int, point: str) -> None:
    """Killed in the middle of the second batch: at level 2 the relaunch resumes from the
    elected row inside the batch (no re-run); at levels 0/1 it re-runs that batch from lead
    time zero, with a UserWarning. Either way nothing is re-yielded or re-drawn: the output
    is bit-exact."""
    cfg = Config(FAST_LAUNCHER, 2, level)
    assert cfg.nbatches == 2
    torture = Torture(cfg, tmp_path, reference(cfg.model), "scripted")
    fresh = progress(cfg, tmp_path)
    after = torture.kill(point, 1, fresh.rows.index((1, 3)))
    assert after.latest is not None
    assert after.metas[0]["batch"] == after.metas[0]["batches_done"] == 1, after
    assert after.write_count in (3, 4), after  # boundaries 0..2 (or 3: after_commit) of batch 1
    done = torture.finish(random.Random(BASE_SEED))
    assert done.resumed_from == str(after.latest), (done, torture.context())
    if level == 2:
        assert done.rerun_batch == "None", (done, torture.context())
    else:
        assert done.rerun_batch == "1", (done, torture.context())
    torture.report(done, f"MID-BATCH level {level}:")
