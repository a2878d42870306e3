"""``examples/train_fsdp2.py`` as a user runs it: killed, preempted, relaunched.

One uninterrupted 2-rank run gives the reference losses. A second run is SIGKILLed (every
process, mid-step) once a row is committed; the relaunch at 2 ranks resumes from it with
losses bit-identical to the reference (model, optimizer, scheduler, data position and dropout
RNG all restored), then gets SIGUSR1 on one rank: every rank saves the current step and
exits with 85. From that row a relaunch at 1 rank (model and optimizer resharded) trains
within ``RTOL`` of the reference: the data order is the same, but each rank draws other
dropout masks at another world size. The long variant (4 ranks, relaunched at 2) also
relaunches at the same size from the preempted row, bit for bit to the end.
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
STEPS = 40  # the reference run; the interrupted ones stop long before
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


def latest_step(store: Path) -> int | None:
    return distckpt.CheckpointManager(store, preemption=False).latest_step()


def run_scenario(tmp_path: Path, nproc: int, other: int, *, same_size_after_stop: bool) -> None:
    reference = [str(tmp_path / "ref"), "--steps", str(STEPS)]
    ref = losses(run_torchrun(nproc, EXAMPLE, reference, timeout=TIMEOUT))
    assert sorted(ref) == list(range(STEPS))
    store = tmp_path / "store"
    # Asked for many steps, the interrupted jobs cannot finish before the test stops them.
    endless = [str(store), "--steps", "100000"]

    # 1. SIGKILL every process once the row of step 4 is committed (async: a step later).
    with Background(torchrun_command(nproc, EXAMPLE, endless)) as job:
        job.wait_until(
            lambda: committed_row(store) is not None and (latest_step(store) or 0) >= 4,
            "the row of step 4",
            timeout=TIMEOUT,
        )
        job.kill()
        killed = job.result()
    assert killed.returncode != 0
    before = losses(killed)
    assert before and all(ref[s] == v for s, v in before.items()), killed.describe()
    saved = latest_step(store)
    assert saved is not None and 4 <= saved <= 12 and saved % 4 == 0, killed.describe()

    # 2. Relaunch at the same size: bit for bit; after 4 steps, SIGUSR1 to one rank.
    env = {"DISTCKPT_REQUEUE_FILE": str(tmp_path / "requeue.json")}
    with Background(torchrun_command(nproc, EXAMPLE, endless), env=env) as job:
        pids = job.wait_until(
            lambda: workers_handling(job.pid, signal.SIGUSR1, nproc), "the USR1 handlers"
        )
        job.wait_until(lambda: saved + 4 in losses(job.result()), "4 steps", timeout=TIMEOUT)
        os.kill(pids[-1], signal.SIGUSR1)
        preempted = job.finish(TIMEOUT)
    out = preempted.describe()
    assert resumed_step(preempted) == saved, out
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", preempted.output, re.MULTILINE)
    assert codes == [str(REQUEUE_EXIT_CODE)] * nproc, out  # torchrun's report of its workers
    stopped = latest_step(store)
    after = losses(preempted)
    assert stopped is not None and stopped == max(after) and stopped >= saved + 4, out
    assert stopped + 4 <= STEPS, f"the job ran on too long before the signal stopped it\n{out}"
    assert sorted(after) == list(range(saved + 1, stopped + 1)), out
    assert all(ref[s] == v for s, v in after.items()), out  # bit for bit after the SIGKILL

    # 3. Relaunch from the preempted row at another size (and at the same one).
    elsewhere = tmp_path / "store-other"
    shutil.copytree(store, elsewhere)
    args = ["--steps", str(min(STEPS, stopped + 8))]
    resized = run_torchrun(other, EXAMPLE, [str(elsewhere), *args], timeout=TIMEOUT).check()
    assert resumed_step(resized) == stopped, resized.describe()
    approx = {s: float.fromhex(v) for s, v in losses(resized).items()}
    assert sorted(approx) == list(range(stopped + 1, min(STEPS, stopped + 8))), resized.describe()
    for s, v in approx.items():
        assert v == pytest.approx(float.fromhex(ref[s]), rel=RTOL), (s, resized.describe())
    if same_size_after_stop:
        finish = [str(store), "--steps", str(STEPS)]
        same = run_torchrun(nproc, EXAMPLE, finish, timeout=TIMEOUT).check()
        assert resumed_step(same) == stopped, same.describe()
        rest = losses(same)
        assert sorted(rest) == list(range(stopped + 1, STEPS)), same.describe()
        assert all(ref[s] == v for s, v in rest.items()), same.describe()


def test_killed_preempted_and_relaunched_at_2_and_1_ranks(tmp_path: Path) -> None:
    run_scenario(tmp_path, nproc=2, other=1, same_size_after_stop=False)


@pytest.mark.long
def test_killed_preempted_and_relaunched_at_4_and_2_ranks(tmp_path: Path) -> None:
    """Also relaunched at the same size from the preempted row: bit for bit to the end."""
    run_scenario(tmp_path, nproc=4, other=2, same_size_after_stop=True)
