"""Launching real multi-process jobs (torchrun, mpiexec) from tests, with hard timeouts.

Every launch runs in a new session; on timeout (or when the test itself is interrupted, e.g.
by pytest-timeout) its process group and every descendant process are SIGKILLed, so no rank
outlives its test.
Output goes to temporary files rather than pipes, so a stray process holding a pipe open can
never block the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
DEFAULT_TIMEOUT = 90.0

# Variables a launcher or scheduler around the test run may have set; a job must not inherit
# them (a stale RANK or PMI_RANK would make the ranks guess the wrong communicator).
_SCRUB_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "TORCHELASTIC_", "DISTCKPT_")
_SCRUB_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
)


@dataclass(frozen=True)
class LaunchResult:
    """What a finished launch left behind."""

    cmd: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.cmd)}\n"
            f"exit status {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def check(self) -> LaunchResult:
        """Fail the test, with everything the job printed, unless it exited with 0."""
        if self.returncode != 0:
            pytest.fail(f"launch failed\n{self.describe()}", pytrace=False)
        return self

    def lines(self, prefix: str) -> list[str]:
        """Lines of stdout starting with ``prefix`` (ranks print one line per event)."""
        return [line for line in self.stdout.splitlines() if line.startswith(prefix)]

    def ranks(self, prefix: str) -> list[int]:
        """Sorted ranks (``rank=N``) of the lines starting with ``prefix``."""
        found = (re.search(r"\brank=(\d+)", line) for line in self.lines(prefix))
        return sorted(int(m.group(1)) for m in found if m)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a launch: no inherited rank variables, unbuffered output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUB_NAMES and not k.startswith(_SCRUB_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    return env


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (empty where there is no /proc)."""
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def _tree(root: int) -> set[int]:
    children = _children()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _signal(pid: int, pidfd: int | None, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)


def _kill_job(pid: int, *, wait: float = 10.0) -> None:
    """SIGKILL the launcher, its process group and every descendant; wait until they died.

    The group alone is not enough: torchrun starts each worker in a session of its own.
    The tree is frozen with SIGSTOP first (until no new process appears) so nothing forks
    or gets reparented away between finding it and killing it. Processes are held by pidfd
    (Linux), so a recycled pid is never signalled and their exit can be awaited.
    """
    held: dict[int, int | None] = {}
    try:
        for _ in range(20):
            fresh = _tree(pid) - held.keys()
            if not fresh:
                break
            for p in fresh:
                try:
                    held[p] = os.pidfd_open(p)
                except (OSError, AttributeError):
                    held[p] = None
                _signal(p, held[p], signal.SIGSTOP)
        for p, fd in held.items():
            _signal(p, fd, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        poller = select.poll()
        for fd in held.values():
            if fd is not None:
                poller.register(fd, select.POLLIN)
        pending = sum(fd is not None for fd in held.values())
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            ready = poller.poll(max(1, int(1000 * (deadline - time.monotonic()))))
            for fd, _ in ready:
                poller.unregister(fd)
                pending -= 1
    finally:
        for fd in held.values():
            if fd is not None:
                os.close(fd)


def run_command(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | os.PathLike[str] | None = None,
) -> LaunchResult:
    """Run ``cmd`` in its own session; kill its whole process group on timeout or interrupt.

    A timeout fails the test with the output captured so far. A non-zero exit status is
    returned, not raised: crash tests expect one (use ``.check()`` otherwise).
    """
    cmd = tuple(str(c) for c in cmd)
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=job_env(env),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # On timeout or on an exception (pytest-timeout, Ctrl-C) this ends every rank of
            # the job; after a normal exit it only reaps stragglers left in the group.
            if proc.returncode is None:
                _kill_job(proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = LaunchResult(
            cmd=cmd,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            seconds=time.monotonic() - start,
        )
    if timed_out:
        killed = "every process of the job killed"
        pytest.fail(
            f"launch timed out after {timeout:.0f}s ({killed})\n{result.describe()}", pytrace=False
        )
    return result


# -- torchrun ---------------------------------------------------------------------------------
def torchrun_command(nproc: int, script: str | os.PathLike[str], args: Sequence[str]) -> list[str]:
    # --standalone: a rendezvous store on a free port the OS picks (localhost:0), so tests
    # running in parallel never collide on a fixed master port.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        str(script),
        *args,
    ]


def run_torchrun(
    nproc: int,
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> LaunchResult:
    return run_command(torchrun_command(nproc, script, args), env=env, timeout=timeout)


ENSEMBLE_SCRIPT = REPO_ROOT / "scripts" / "ensemble.py"


def ensemble_args(
    root: Path,
    *,
    members: int,
    steps: int,
    grid: Sequence[int],
    batch_size: int,
    level: int,
    model: str | None = None,
) -> list[str]:
    """Arguments of ``scripts/ensemble.py`` writing its checkpoint and output under ``root``."""
    args = [
        "--checkpoint",
        str(root / "ckpt"),
        "--output",
        str(root / "out"),
        "--members",
        str(members),
        "--steps",
        str(steps),
        "--grid",
        *map(str, grid),
        "--batch-size",
        str(batch_size),
        "--level",
        str(level),
    ]
    return args if model is None else [*args, "--model", model]


# -- mpiexec ----------------------------------------------------------------------------------
@cache
def find_mpiexec() -> str | None:
    """The mpiexec of this interpreter's environment (matches mpi4py's MPI), else PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


@cache
def _is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "open mpi" in (out.stdout + out.stderr).lower()


@cache
def mpi_unavailable() -> str | None:
    """Why MPI jobs cannot run here, or None when they can."""
    if find_mpiexec() is None:
        return "mpiexec not found (next to sys.executable or on PATH)"
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        return f"mpi4py is not importable: {exc}"
    return None


def skip_without_mpiexec() -> None:
    """Skip the calling test cleanly when there is no usable mpiexec / mpi4py."""
    reason = mpi_unavailable()
    if reason is not None:
        pytest.skip(reason)


needs_mpiexec = pytest.mark.skipif(
    mpi_unavailable() is not None, reason=str(mpi_unavailable() or "")
)


def mpiexec_command(nproc: int, script: str | os.PathLike[str], args: Sequence[str]) -> list[str]:
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    extra = ["--oversubscribe"] if _is_open_mpi(mpiexec) else []
    return [mpiexec, "-n", str(nproc), *extra, sys.executable, str(script), *args]


def run_mpiexec(
    nproc: int,
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> LaunchResult:
    skip_without_mpiexec()
    mpiexec = find_mpiexec()
    assert mpiexec is not None
    extra_env = dict(env or {})
    if _is_open_mpi(mpiexec) and os.geteuid() == 0:
        extra_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        extra_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return run_command(mpiexec_command(nproc, script, args), env=extra_env, timeout=timeout)


LAUNCHERS = ("torchrun", "mpiexec")


def launch(
    launcher: str,
    nproc: int,
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> LaunchResult:
    """Run ``script`` on ``nproc`` ranks under ``launcher`` ("torchrun" or "mpiexec")."""
    if launcher == "torchrun":
        return run_torchrun(nproc, script, args, env=env, timeout=timeout)
    if launcher == "mpiexec":
        return run_mpiexec(nproc, script, args, env=env, timeout=timeout)
    raise ValueError(f"unknown launcher {launcher!r}")
