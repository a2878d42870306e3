"""Kill 2-rank torchrun jobs part-way, resume them, and check they equal uninterrupted runs.

Part 1, the reference ensemble forecast (``scripts/ensemble.py --level 2``: 8 members, 12
steps, batches of 2, so 26 checkpoint rows):

1. an uninterrupted run;
2. the same run into fresh stores, one rank's worker process SIGKILLed once a chosen row in
   the middle of a batch is committed (waiting is done by polling ``distckpt.latest``, the
   row a restart would elect);
3. the same command again: it resumes after the elected row;
4. both forecast output stores are compared bit for bit.

Part 2, a training loop (``scripts/train_demo.py``: per-rank model, Adam state and RNG
stream), the same four phases; each rank's final state is compared bit for bit.

Usage: ``python scripts/demo.py [--dir runs/demo] [--kill-row 17] [--steps 12]
[--kill-after 7]``. Exit status 0 when both resumed runs equal the uninterrupted ones.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distckpt
from distckpt.reference import ForecastStore

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "scripts" / "train_demo.py"
ENSEMBLE = ROOT / "scripts" / "ensemble.py"
NPROC = 2
RELAUNCH_NPROC = 3  # the relaunch comes back on another number of ranks: members move
VICTIM = NPROC - 1  # not the coordinator: the survivor must notice and stop too

# The ensemble's shape (scripts/ensemble.py's defaults, passed explicitly). Every rank runs
# the same number of batches in lockstep, one checkpoint row per lead time 0..STEPS.
MEMBERS, ENS_STEPS, BATCH = 8, 12, 2
ROWS_PER_BATCH = ENS_STEPS + 1
ENS_ROWS = math.ceil(math.ceil(MEMBERS / NPROC) / BATCH) * ROWS_PER_BATCH  # 2 x 13 = 26


# -- launching and killing --------------------------------------------------------------------
def torchrun(script: Path, *args: Any, nproc: int = NPROC) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def fail(msg: str, log: Path | None = None) -> None:
    print(f"\nFAILED: {msg}")
    if log is not None and log.exists():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- last lines of {log} ---")
        print("\n".join(tail))
    sys.exit(1)


def run_to_end(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run ``cmd`` to the end; returns its wall time and what it added to ``log``."""
    mark = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    proc = start(cmd, log)
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("the run did not finish within 300 s", log)
    if rc != 0:
        fail(f"torchrun exited with status {rc}", log)
    return time.monotonic() - t0, log.read_bytes()[mark:].decode(errors="replace")


def latest_now(store: Path) -> int | None:
    try:
        return distckpt.latest(store)
    except Exception:
        # The store is being created, or retention deleted a row while it was read:
        # neither is an answer yet, poll again.
        return None


def kill_once_committed(
    proc: subprocess.Popen[bytes], store: Path, row: int, pid_file: Path, log: Path
) -> tuple[int, int, int]:
    """Poll the store until ``row`` is committed, then SIGKILL rank VICTIM's worker.

    Returns (the row seen committed, the pid killed, torchrun's exit status).
    """
    deadline = time.monotonic() + 120
    while (seen := latest_now(store)) is None or seen < row:
        if proc.poll() is not None:
            fail(f"the run ended (status {proc.returncode}) before row {row} was committed", log)
        if time.monotonic() > deadline:
            proc.kill()
            fail(f"row {row} was not committed within 120 s", log)
        time.sleep(0.005)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("torchrun did not exit within 60 s of the kill", log)
    if rc == 0:
        fail("the killed run exited with status 0: the kill came too late", log)
    return seen, pid, rc


def rows_on_disk(store: Path) -> str:
    """The row directories left in ``store``: committed (every rank's manifest) or not."""
    rows_dir = store / "rows"
    parts = []
    for row_dir in sorted(rows_dir.iterdir()) if rows_dir.is_dir() else []:
        if not (row_dir.is_dir() and row_dir.name.isdigit()):
            continue  # the group's own zarr.json
        n = len(list((row_dir / "manifests").glob("rank_*.json")))
        verdict = "committed" if n == NPROC else f"{n} of {NPROC} manifests, not committed"
        parts.append(f"row {int(row_dir.name)} {verdict}")
    return "; ".join(parts) or "none"


def elect_after_kill(store: Path, log: Path) -> int:
    elected = distckpt.latest(store)
    if elected is None:
        fail("no committed row after the kill", log)
    assert elected is not None
    return elected


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- part 1: the reference ensemble forecast --------------------------------------------------
def ensemble_cmd(run: Path, nproc: int = NPROC) -> list[str]:
    return torchrun(
        ENSEMBLE,
        "--checkpoint",
        run / "checkpoint",
        "--output",
        run / "forecast.zarr",
        "--level",
        2,
        "--members",
        MEMBERS,
        "--steps",
        ENS_STEPS,
        "--batch-size",
        BATCH,
        "--pid-dir",
        run / "pids",
        nproc=nproc,
    )


def done_line(text: str, log: Path) -> dict[str, str]:
    """The ``key=value`` fields of the ``DONE`` line rank 0 prints."""
    m = re.search(r"^DONE (.*)$", text, re.M)
    if m is None:
        fail("the run printed no DONE line", log)
    assert m is not None
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def where(row: int) -> str:
    batch, step = divmod(row, ROWS_PER_BATCH)
    return f"batch {batch}, step {step}/{ENS_STEPS}"


def ensemble_part(work: Path, kill_row: int) -> int:
    print(
        f"\nPart 1: reference ensemble forecast (scripts/ensemble.py --level 2): {MEMBERS} "
        f"members x {ENS_STEPS} steps, batches of {BATCH}, {ENS_ROWS} checkpoint rows"
    )
    base = work / "ensemble"
    base.mkdir()
    ref, res = base / "reference", base / "resumed"
    ref_log, log = base / "reference.log", base / "resumed.log"

    took, text = run_to_end(ensemble_cmd(ref), ref_log)
    ref_done = done_line(text, ref_log)
    print(f"  [1/4] uninterrupted run -> {rel(ref)}/: {took:.1f} s, digest {ref_done['digest']}")

    print(f"  [2/4] same run -> {rel(res)}/; SIGKILL rank {VICTIM} once row {kill_row} commits")
    proc = start(ensemble_cmd(res), log)
    store = res / "checkpoint"
    seen, pid, rc = kill_once_committed(
        proc, store, kill_row, res / "pids" / f"rank_{VICTIM}.pid", log
    )
    print(f"        row {seen} ({where(seen)}) committed -> killed pid {pid}; torchrun status {rc}")
    print(f"        rows on disk: {rows_on_disk(store)}")
    elected = elect_after_kill(store, log)
    if elected >= ENS_ROWS - 1:
        fail(f"row {elected} is the last one: the kill came too late", log)
    print(f"        distckpt.latest() elects row {elected} ({where(elected)})")

    took, text = run_to_end(ensemble_cmd(res, RELAUNCH_NPROC), log)
    done = done_line(text, log)
    print(
        f"  [3/4] relaunch on {RELAUNCH_NPROC} ranks (members move between ranks): "
        f"{took:.1f} s, resumed_from={done['resumed_from']}, "
        f"digest {done['digest']}"
    )
    if done["resumed_from"] != str(elected):
        fail(f"the relaunch did not resume from row {elected}", log)

    a, b = ForecastStore(ref / "forecast.zarr").read(), ForecastStore(res / "forecast.zarr").read()
    if np.isnan(a).any():
        fail("the uninterrupted run left forecast values unwritten", ref_log)
    differ = int((a.view(np.uint32) != b.view(np.uint32)).sum()) if a.shape == b.shape else a.size
    print(
        f"  [4/4] compare both forecast stores {tuple(a.shape)} {a.dtype} as raw bits: "
        f"{differ} of {a.size} values differ"
    )
    if differ or a.dtype != b.dtype:
        print("RESULT: resumed ensemble forecast DIFFERS from uninterrupted run")
        sys.exit(1)
    print("RESULT: resumed ensemble forecast equals uninterrupted run (bit for bit)")
    return elected


# -- part 2: a training loop ------------------------------------------------------------------
def train_cmd(store: Path, steps: int) -> list[str]:
    return torchrun(TRAIN, "--store", store, "--steps", steps)


def final_states(out: Path) -> list[dict[str, Any]]:
    """Each rank's final state, read back through distckpt (single-rank stores)."""
    states = []
    for rank in range(NPROC):
        state: dict[str, Any] = {}  # empty: load adds every saved key
        distckpt.load(state, out / "final" / f"rank_{rank}")
        states.append(state)
    return states


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two state trees differ; tensors compare by dtype, shape and raw bytes."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.contiguous().reshape(-1).view(torch.uint8),
                b.contiguous().reshape(-1).view(torch.uint8),
            )
        )
        return [] if same else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}/{i}")
        ]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} vs {b!r}"]


def count_tensors(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, dict):
        return sum(count_tensors(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(count_tensors(v) for v in tree)
    return 0


def demo_lines(text: str) -> list[str]:
    return [ln.removeprefix("[demo] ") for ln in text.splitlines() if ln.startswith("[demo] ")]


def training_part(work: Path, steps: int, kill_after: int) -> int:
    print(
        f"\nPart 2: training loop (scripts/train_demo.py): per-rank MLP, Adam state and RNG "
        f"stream; {steps} steps, one row each"
    )
    ref_store, ref_log = work / "reference", work / "reference.log"
    store, log = work / "resumed", work / "resumed.log"

    took, _ = run_to_end(train_cmd(ref_store, steps), ref_log)
    print(f"  [1/4] uninterrupted run -> {rel(ref_store)}/: {took:.1f} s")

    print(
        f"  [2/4] same run -> {rel(store)}/; SIGKILL rank {VICTIM} once step {kill_after} commits"
    )
    proc = start(train_cmd(store, steps), log)
    # Rows are numbered from 0, one per step: row N holds step N.
    pid_file = Path(f"{store}.out") / "pids" / f"rank_{VICTIM}.pid"
    seen, pid, rc = kill_once_committed(proc, store, kill_after, pid_file, log)
    print(f"        row {seen} committed -> killed pid {pid}; torchrun status {rc}")
    print(f"        rows on disk: {rows_on_disk(store)}")
    elected = elect_after_kill(store, log)
    step = int(distckpt.metadata(store, row=elected)["step"])
    if step >= steps - 1:
        fail(f"row {elected} holds the last step: the kill came too late", log)
    print(f"        distckpt.latest() elects row {elected} (step {step})")

    took, text = run_to_end(train_cmd(store, steps), log)
    resumed = [ln for ln in demo_lines(text) if ln.startswith("resumed from")]
    print(f"  [3/4] relaunch: {took:.1f} s, {resumed[0] if resumed else 'did not resume'}")
    if not resumed or not resumed[0].startswith(f"resumed from row {elected} "):
        fail(f"the relaunch did not report resuming from row {elected}", log)

    ref, res = final_states(Path(f"{ref_store}.out")), final_states(Path(f"{store}.out"))
    if diff(ref[0]["model"], ref[1]["model"]) == []:
        fail("the ranks' models are identical: the demo is meant to hold per-rank state")
    bad = []
    counts = []
    for rank, (a, b) in enumerate(zip(ref, res, strict=True)):
        problems = diff(a, b)
        counts.append(f"rank {rank} {len(problems)} of {count_tensors(a)} differ")
        bad += [f"rank {rank}: {p}" for p in problems]
    print(f"  [4/4] compare each rank's final model, Adam and RNG tensors: {', '.join(counts)}")
    if bad:
        print("\n".join(f"        differs: {b}" for b in bad[:20]))
        print("RESULT: resumed run DIFFERS from uninterrupted run")
        sys.exit(1)
    print("RESULT: resumed run equals uninterrupted run (bit for bit)")
    return elected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "demo", help="work directory")
    parser.add_argument(
        "--kill-row",
        type=int,
        default=17,
        help=f"ensemble: kill once this row (0..{ENS_ROWS - 1}) is committed",
    )
    parser.add_argument("--steps", type=int, default=12, help="training: number of steps")
    parser.add_argument(
        "--kill-after", type=int, default=7, help="training: kill once this step is committed"
    )
    args = parser.parse_args()
    if not 0 <= args.kill_row < ENS_ROWS - 1:
        parser.error(f"--kill-row must be in 0..{ENS_ROWS - 2}: leave a row to resume")
    if not 0 <= args.kill_after < args.steps - 1:
        parser.error("--kill-after must leave at least one step to resume")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    work: Path = args.dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    print(
        f"distckpt demo: SIGKILL {NPROC}-rank torchrun jobs (CPU, gloo) part-way, resume them, "
        "compare with uninterrupted runs"
    )
    ens_row = ensemble_part(work, args.kill_row)
    train_row = training_part(work, args.steps, args.kill_after)
    print(
        f"\nSUMMARY: both resumed runs equal their uninterrupted runs bit for bit (ensemble "
        f"forecast resumed after row {ens_row}, training loop after row {train_row}); "
        f"{time.monotonic() - t0:.0f} s, stores and logs in {rel(work)}/"
    )


if __name__ == "__main__":
    main()
