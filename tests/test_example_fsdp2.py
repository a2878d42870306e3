"""``examples/train_fsdp2.py`` as a user runs it: killed, preempted, relaunched.

One uninterrupted 2-rank run gives the reference losses. A second run is SIGKILLed (every
process, mid-step) once a row is committed; the relaunch at 2 ranks resumes from it and gets
SIGUSR1 on one rank: every rank saves the current step and exits with 85. From that row a
relaunch at 2 ranks finishes with losses bit-identical to the reference (model, optimizer,
scheduler, data position and dropout RNG all restored), and a relaunch at 1 rank (model and
optimizer resharded) within ``RTOL`` of it: the data order is the same, but each rank draws
other dropout masks at another world size.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from multiproc import REPO_ROOT, LaunchResult, _children, run_torchrun, torchrun_command
from test_preempt import Background, committed_row, handles_signal

import distckpt
from distckpt.session.preempt import REQUEUE_EXIT_CODE

EXAMPLE = REPO_ROOT / "examples" / "train_fsdp2.py"
STEPS = 20
RTOL = 0.1  # per step, relaunched at another world size (measured: under 3%)
TIMEOUT = 150.0

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]


def losses(result: LaunchResult) -> dict[int, str]:
    """step -> loss (``float.hex``) printed by rank 0."""
    found = (re.fullmatch(r"LOSS step=(\d+) loss=(\S+)", line) for line in result.lines("LOSS "))
    return {int(m.group(1)): m.group(2) for m in found if m}


def resumed_step(result: LaunchResult) -> int | None:
    m = re.search(r"^RESUMED step=(\d+)", result.stdout, re.MULTILINE)
    return int(m.group(1)) if m else None


def workers_handling(pid: int, sig: int, nproc: int) -> list[int] | None:
    """The launcher's worker processes, once all of them handle ``sig``."""
    workers = [p for p in _children().get(pid, []) if handles_signal(p, sig)]
    return workers if len(workers) == nproc else None


def run_scenario(tmp_path: Path, nproc: int, other: int) -> None:
    args = ["--steps", str(STEPS)]
    ref = losses(run_torchrun(nproc, EXAMPLE, [str(tmp_path / "ref"), *args], timeout=TIMEOUT))
    assert sorted(ref) == list(range(STEPS))
    store = tmp_path / "store"

    # 1. SIGKILL every process once the row of step 4 is committed (async: a step later);
    # asked for many steps, the job cannot finish first.
    endless = [str(store), "--steps", "100000"]
    with Background(torchrun_command(nproc, EXAMPLE, endless)) as job:
        job.wait_until(
            lambda: (
                committed_row(store) is not None
                and (distckpt.CheckpointManager(store, preemption=False).latest_step() or 0) >= 4
            ),
            "the row of step 4",
            timeout=TIMEOUT,
        )
        job.kill()
        killed = job.result()
    assert killed.returncode != 0
    before = losses(killed)
    assert before and all(ref[s] == v for s, v in before.items()), killed.describe()
    saved = distckpt.CheckpointManager(store, preemption=False).latest_step()
    assert saved is not None and 4 <= saved < STEPS - 4 and saved % 4 == 0, killed.describe()

    # 2. Relaunch; SIGUSR1 to one rank as soon as they all handle it.
    env = {"DISTCKPT_REQUEUE_FILE": str(tmp_path / "requeue.json")}
    with Background(torchrun_command(nproc, EXAMPLE, [str(store), *args]), env=env) as job:
        pids = job.wait_until(
            lambda: workers_handling(job.pid, signal.SIGUSR1, nproc), "the USR1 handlers"
        )
        os.kill(pids[-1], signal.SIGUSR1)
        preempted = job.finish(TIMEOUT)
    out = preempted.describe()
    assert resumed_step(preempted) == saved, out
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", preempted.output, re.MULTILINE)
    assert codes == [str(REQUEUE_EXIT_CODE)] * nproc, out  # torchrun's report of its workers
    assert "DONE" not in preempted.stdout, out
    stopped = distckpt.CheckpointManager(store, preemption=False).latest_step()
    after = losses(preempted)
    assert stopped is not None and stopped == max(after) and stopped < STEPS - 1, out
    assert all(ref[s] == v for s, v in after.items()), out  # bit for bit after the SIGKILL

    # 3. Relaunch at the same size and at another one, each from the preempted row.
    elsewhere = tmp_path / "store-other"
    shutil.copytree(store, elsewhere)
    same = run_torchrun(nproc, EXAMPLE, [str(store), *args], timeout=TIMEOUT).check()
    assert resumed_step(same) == stopped, same.describe()
    rest = losses(same)
    assert sorted(rest) == list(range(stopped + 1, STEPS)), same.describe()
    assert all(ref[s] == v for s, v in rest.items()), same.describe()

    resized = run_torchrun(other, EXAMPLE, [str(elsewhere), *args], timeout=TIMEOUT).check()
    assert resumed_step(resized) == stopped, resized.describe()
    approx = {s: float.fromhex(v) for s, v in losses(resized).items()}
    assert sorted(approx) == list(range(stopped + 1, STEPS)), resized.describe()
    for s, v in approx.items():
        assert v == pytest.approx(float.fromhex(ref[s]), rel=RTOL), (s, resized.describe())


def test_killed_preempted_and_relaunched_at_2_and_1_ranks(tmp_path: Path) -> None:
    run_scenario(tmp_path, nproc=2, other=1)


@pytest.mark.long
def test_killed_preempted_and_relaunched_at_4_and_2_ranks(tmp_path: Path) -> None:
    run_scenario(tmp_path, nproc=4, other=2)
