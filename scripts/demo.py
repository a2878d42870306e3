"""Kill a 2-rank training run part-way, resume it, and check it equals an uninterrupted run.

1. An uninterrupted run of ``scripts/train_demo.py`` under torchrun (2 ranks, CPU, gloo).
2. The same run into a fresh store, SIGKILLed (one rank worker) once a chosen step is
   committed: waiting is done by polling ``distckpt.latest(store)``, the row a restart would
   elect.
3. The same command again: it resumes from the elected row.
4. Each rank's final state from both runs is loaded and compared bit for bit.

Usage: ``python scripts/demo.py [--dir runs/demo] [--steps 12] [--kill-after 7]``.
Exit status 0 when the resumed run equals the uninterrupted one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import distckpt

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "scripts" / "train_demo.py"
NPROC = 2


def launch_cmd(store: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={NPROC}",
        str(TRAIN),
        "--store",
        str(store),
        "--steps",
        str(steps),
    ]


def start(store: Path, steps: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(launch_cmd(store, steps))}\n".encode())
        return subprocess.Popen(
            launch_cmd(store, steps),
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def relay(log: Path, seen: int) -> int:
    """Print the ranks' ``[demo]`` lines added to ``log`` since byte ``seen``."""
    data = log.read_bytes()
    for line in data[seen:].decode(errors="replace").splitlines():
        if line.startswith("[demo] "):
            print("   ", line.removeprefix("[demo] "))
    return len(data)


def fail(msg: str, log: Path | None = None) -> None:
    print(f"\nFAILED: {msg}")
    if log is not None and log.exists():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- last lines of {log} ---")
        print("\n".join(tail))
    sys.exit(1)


def run_to_end(store: Path, steps: int, log: Path) -> float:
    t0 = time.monotonic()
    proc = start(store, steps, log)
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("the training run did not finish within 300 s", log)
    if rc != 0:
        fail(f"torchrun exited with status {rc}", log)
    return time.monotonic() - t0


def committed_step(store: Path) -> tuple[int, int] | None:
    """(row, step) of the row a restart would elect now, or None."""
    try:
        row = distckpt.latest(store)
        if row is None:
            return None
        return row, int(distckpt.metadata(store, row=row)["step"])
    except Exception:
        # The store is being created, or retention deleted the row between the two calls
        # (keep=2): neither is an answer yet, poll again.
        return None


def rows_on_disk(store: Path) -> list[str]:
    """One line per row directory: how many of its rank manifests were published."""
    out = []
    rows = sorted((store / "rows").iterdir()) if (store / "rows").is_dir() else []
    for row_dir in rows:
        manifests = sorted((row_dir / "manifests").glob("rank_*.json"))
        verdict = "committed" if len(manifests) == NPROC else "not committed: left for GC"
        out.append(
            f"row {int(row_dir.name)}: {len(manifests)} of {NPROC} rank manifests, {verdict}"
        )
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "demo", help="work directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--kill-after", type=int, default=7, help="kill once this step is committed"
    )
    args = parser.parse_args()
    if not 0 <= args.kill_after < args.steps - 1:
        parser.error("--kill-after must leave at least one step to resume")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work: Path = args.dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_all = time.monotonic()
    print(f"distckpt demo: {NPROC} ranks (torchrun, CPU/gloo), {args.steps} steps, work dir {work}")

    # 1. Uninterrupted reference run.
    ref_store, ref_log = work / "reference", work / "reference.log"
    print(f"\n[1/4] uninterrupted run -> {ref_store.name}/")
    took = run_to_end(ref_store, args.steps, ref_log)
    relay(ref_log, 0)
    print(f"    done in {took:.1f} s")

    # 2. Same run into a fresh store; SIGKILL one rank once the chosen step is committed.
    store, log = work / "resumed", work / "resumed.log"
    victim = NPROC - 1  # not the coordinator: the survivor must notice and stop too
    print(
        f"\n[2/4] same run -> {store.name}/; kill rank {victim} once step {args.kill_after} commits"
    )
    proc = start(store, args.steps, log)
    deadline = time.monotonic() + 120
    seen = None
    while True:
        seen = committed_step(store)
        if seen is not None and seen[1] >= args.kill_after:
            break
        if proc.poll() is not None:
            fail(f"the run ended (status {proc.returncode}) before step {args.kill_after}", log)
        if time.monotonic() > deadline:
            proc.kill()
            fail(f"step {args.kill_after} was not committed within 120 s", log)
        time.sleep(0.01)
    pid = int((Path(f"{store}.out") / "pids" / f"rank_{victim}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    print(f"    row {seen[0]} (step {seen[1]}) committed -> SIGKILL rank {victim} (pid {pid})")
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("torchrun did not exit within 60 s of the kill", log)
    if rc == 0:
        fail("the killed run exited with status 0: the kill came too late", log)
    print(f"    torchrun exited with status {rc}; rows on disk:")
    for line in rows_on_disk(store):
        print(f"      {line}")
    elected = distckpt.latest(store)
    if elected is None:
        fail("no committed row after the kill", log)
    step = int(distckpt.metadata(store, row=elected)["step"])
    print(f"    distckpt.latest() elects row {elected} (step {step})")

    # 3. Relaunch the very same command: it resumes from the elected row.
    print("\n[3/4] relaunch the same command")
    mark = log.stat().st_size
    took = run_to_end(store, args.steps, log)
    relay(log, mark)
    print(f"    done in {took:.1f} s")
    if f"[demo] resumed from row {elected} " not in log.read_bytes()[mark:].decode(
        errors="replace"
    ):
        fail(f"the relaunch did not report resuming from row {elected}", log)

    # 4. Compare each rank's final state, bit for bit.
    print("\n[4/4] compare final states (model, Adam state, RNG state, step) of every rank")
    ref, res = final_states(Path(f"{ref_store}.out")), final_states(Path(f"{store}.out"))
    bad = []
    for rank, (a, b) in enumerate(zip(ref, res, strict=True)):
        problems = diff(a, b)
        print(f"    rank {rank}: {count_tensors(a)} tensors, {len(problems)} differ")
        bad += [f"rank {rank}: {p}" for p in problems]
    if diff(ref[0]["model"], ref[1]["model"]) == []:
        fail("the ranks' models are identical: the demo is meant to hold per-rank state")
    print(f"\nrelaunch resumed from row {elected} (step {step} of 0..{args.steps - 1})")
    print(f"total {time.monotonic() - t_all:.1f} s; stores and logs kept in {work}")
    if bad:
        print("\n".join(f"    differs: {b}" for b in bad[:20]))
        print("RESULT: resumed run DIFFERS from uninterrupted run")
        sys.exit(1)
    print("RESULT: resumed run equals uninterrupted run (bit for bit)")


if __name__ == "__main__":
    main()
