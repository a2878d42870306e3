"""Preemption: signals become a collective "checkpoint at the next boundary and stop".

In-process tests cover the handler itself (flags, ``every``, agreement over a fake
communicator, handler chaining and restoring, the requeue status and record). Real jobs
cover what only processes can show: ``torchrun`` with two ranks where SIGUSR1 reaches ONE
rank (every rank stops at the same boundary, exits with 85 and the row is committed by
both), and ``python -m distckpt.session.preempt`` stopping the unmodified reference ensemble at its
first boundary, which a relaunch then finishes with the bytes of an uninterrupted run.

Synchronisation is by polling (a committed row, a pid file, the process's caught-signal
mask in /proc), never by sleeping a fixed time; every launch has a timeout.

The background-launch helpers here are shared with ``test_slurm_scripts.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import (
    REPO_ROOT,
    WORKERS,
    LaunchResult,
    _kill_job,
    job_env,
    run_command,
    run_torchrun,
    torchrun_command,
)

import distckpt
from distckpt import (
    REQUEUE_EXIT_CODE,
    Checkpoint,
    CheckpointError,
    PreemptionHandler,
    SingleProcessComm,
    Store,
    bind_checkpoint_state,
    preemption,
)
from distckpt.dist.comm import KnownRanks
from distckpt.session.preempt import parse_signal, watch_boundaries

WORKER = WORKERS / "preempt_worker.py"
ENSEMBLE = REPO_ROOT / "scripts" / "ensemble.py"
LAUNCH_TIMEOUT = 90.0
multiproc = pytest.mark.multiproc


# -- helpers for jobs that run in the background (also used by test_slurm_scripts.py) ---------
class Background:
    """A command started in its own session, polled while it runs; killed (with every
    descendant) if the test leaves it running. Output goes to temporary files."""

    def __init__(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        raw_env: bool = False,
    ) -> None:
        self.cmd = tuple(str(c) for c in cmd)
        # Closed in __exit__: they outlive this call, as long as the job does.
        self._out = tempfile.TemporaryFile()  # noqa: SIM115
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self._start = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=dict(env or {}) if raw_env else job_env(env),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self) -> LaunchResult:
        def read(f: Any) -> str:
            f.seek(0)
            return f.read().decode(errors="replace")

        return LaunchResult(
            cmd=self.cmd,
            returncode=self.proc.returncode if self.proc.returncode is not None else -999,
            stdout=read(self._out),
            stderr=read(self._err),
            seconds=time.monotonic() - self._start,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_job(self.proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_until(
        self, predicate: Callable[[], Any], what: str, timeout: float = LAUNCH_TIMEOUT
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail if the job ends first
        or the deadline passes (the job is then killed and its output shown)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"job ended before {what}\n{self.result().describe()}", pytrace=False)
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"timed out after {timeout:.0f}s waiting for {what}\n"
                    f"{self.result().describe()}",
                    pytrace=False,
                )
            time.sleep(0.02)

    def finish(self, timeout: float = LAUNCH_TIMEOUT) -> LaunchResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"job timed out after {timeout:.0f}s (every process killed)\n"
                f"{self.result().describe()}",
                pytrace=False,
            )
        self.kill()  # reap stragglers left in the group
        return self.result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._out.close()
        self._err.close()


def committed_row(store: str | os.PathLike[str]) -> int | None:
    """``distckpt.latest`` while a job may be creating the store (not a store yet: None)."""
    try:
        return distckpt.latest(store)
    except CheckpointError:
        return None


def handles_signal(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` installed (SigCgt in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def read_pids(pid_dir: Path, nproc: int) -> list[int] | None:
    """The pids the worker ranks wrote, once all of them have."""
    files = [pid_dir / f"rank{r}.pid" for r in range(nproc)]
    if not all(f.exists() for f in files):
        return None
    return [int(f.read_text()) for f in files]


def ensemble_digest(result: LaunchResult) -> str:
    lines = result.lines("DONE ")
    assert len(lines) == 1, result.describe()
    m = re.search(r"digest=(\w+)", lines[0])
    assert m, lines[0]
    return m.group(1)


_REFERENCE: dict[str, str] = {}


@pytest.fixture(scope="session")
def reference_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Digest of an uninterrupted single-process run of scripts/ensemble.py (defaults).

    Also imported by test_slurm_scripts.py; pytest then holds two definitions, so the value
    is cached here to launch the reference once per session."""
    if "digest" not in _REFERENCE:
        tmp = tmp_path_factory.mktemp("reference")
        result = run_command(
            [sys.executable, ENSEMBLE, "--checkpoint", tmp / "ckpt", "--output", tmp / "out"],
            timeout=LAUNCH_TIMEOUT,
        ).check()
        assert "resumed_from=None" in result.lines("DONE ")[0]
        _REFERENCE["digest"] = ensemble_digest(result)
    return _REFERENCE["digest"]


# -- in-process: the handler ----------------------------------------------------------------
class FakeComm(KnownRanks):
    """Rank ``rank`` of a job whose other ranks report ``others`` (rank -> flag) each time."""

    def __init__(self, rank: int, world_size: int, others: dict[int, int] | None = None):
        super().__init__(rank, world_size)
        self.others = others or {}
        self.allgathers = 0
        self.barriers = 0

    def barrier(self) -> None:
        self.barriers += 1

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        self.allgathers += 1
        return [
            data if r == self._rank else json.dumps(self.others.get(r, 0)).encode()
            for r in range(self._size)
        ]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        raise AssertionError("not used")


@pytest.fixture
def no_atexit(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record what checkpoint_and_exit registers at exit instead of registering it in pytest."""
    registered: list[Any] = []
    monkeypatch.setattr(
        "distckpt.session.preempt.atexit.register", lambda f, *a: registered.append((f, a))
    )
    return registered


def test_signal_only_sets_a_flag_until_a_boundary_asks() -> None:
    comm = FakeComm(0, 1)
    with PreemptionHandler(comm=comm) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
        assert handler.stop_requested
        assert not handler.stopping  # nothing agreed until the next boundary
        assert handler.should_stop()
        assert handler.stopping
        assert handler.reasons == {0: "SIGUSR1"}
        assert handler.should_stop()  # stays stopped, without communicating again
        assert comm.allgathers == 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_every_n_looks_only_at_every_nth_boundary() -> None:
    comm = FakeComm(0, 1)
    handler = PreemptionHandler(comm=comm, every=3)
    handler.request_stop()
    assert [handler.should_stop() for _ in range(3)] == [False, False, True]
    assert comm.allgathers == 1
    assert handler.boundaries == 3


def test_every_rank_stops_when_another_rank_was_signalled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    comm = FakeComm(0, 3, others={2: int(signal.SIGTERM)})
    handler = PreemptionHandler(comm=comm)
    caplog.set_level(logging.WARNING, logger="distckpt.session.preempt")
    assert handler.received is None
    assert handler.should_stop()
    assert handler.reasons == {2: "SIGTERM"}
    record = next(r for r in caplog.records if "stopping at boundary 1" in r.getMessage())
    assert record.rank == 0  # type: ignore[attr-defined]
    assert record.getMessage().startswith("rank 0: ")
    assert "rank 2: SIGTERM" in record.getMessage()


def test_no_stop_without_a_signal_anywhere() -> None:
    comm = FakeComm(1, 4)
    handler = PreemptionHandler(comm=comm)
    assert not any(handler.should_stop() for _ in range(5))
    assert comm.allgathers == 5


def test_chains_to_and_restores_the_previous_python_handler() -> None:
    calls: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        with PreemptionHandler(["USR2"], comm=FakeComm(0, 1)) as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert handler.received == signal.SIGUSR2
            assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is previous
        with PreemptionHandler(["SIGUSR2"], comm=FakeComm(0, 1), chain=False) as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert handler.received == signal.SIGUSR2
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_uninstall_leaves_a_handler_installed_over_ours() -> None:
    def later(signum: int, frame: Any) -> None:
        pass

    try:
        with PreemptionHandler([signal.SIGUSR2], comm=FakeComm(0, 1)):
            signal.signal(signal.SIGUSR2, later)
        assert signal.getsignal(signal.SIGUSR2) is later
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_install_from_another_thread_is_refused() -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            PreemptionHandler(comm=FakeComm(0, 1)).install()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=install)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors


def test_arguments_are_checked() -> None:
    assert parse_signal("usr1") == signal.SIGUSR1
    assert parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal(10) == signal.SIGUSR1
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("NOPE")
    with pytest.raises(ValueError, match="every"):
        PreemptionHandler(every=0)
    with pytest.raises(ValueError, match="exit_code"):
        PreemptionHandler(exit_code=0)
    with pytest.raises(ValueError, match="exit_code"):
        PreemptionHandler(exit_code=256)
    with pytest.raises(ValueError, match="no signals"):
        PreemptionHandler(())
    handler = preemption(["USR1", "SIGUSR1", signal.SIGUSR1])
    assert handler.signals == (signal.SIGUSR1,)
    assert handler.exit_code == REQUEUE_EXIT_CODE == 85


def test_exit_code_and_requeue_file_default_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DISTCKPT_REQUEUE_EXIT_CODE", "77")
    monkeypatch.setenv("DISTCKPT_REQUEUE_FILE", str(tmp_path / "marker"))
    handler = PreemptionHandler()
    assert handler.exit_code == 77
    assert handler.requeue_file == str(tmp_path / "marker")
    assert PreemptionHandler(exit_code=99, requeue_file=tmp_path / "x").exit_code == 99


def test_checkpoint_and_exit_commits_pending_writes_records_and_exits(
    tmp_path: Path, no_atexit: list[Any]
) -> None:
    """flush_interval=None: nothing is committed until the stop flushes the pending writes."""
    marker = tmp_path / "requeue.json"
    handler = PreemptionHandler(comm=SingleProcessComm(), requeue_file=marker, exit_code=91)
    ckpt = Checkpoint("p", path=tmp_path / "ckpt", flush_interval=None, comm=SingleProcessComm())
    with ckpt as session, pytest.raises(SystemExit) as exited:
        for step in range(10):
            session.write(lead_time=step, step=step)
            if step == 6:
                handler.request_stop()
            handler.at_boundary(session)
    assert exited.value.code == 91
    row = distckpt.latest(tmp_path / "ckpt")
    assert row is not None
    assert Store(tmp_path / "ckpt").read_manifest(row, 0).write_count == 7
    assert distckpt.metadata(tmp_path / "ckpt", row=row)["step"] == 6
    record = json.loads(marker.read_text())
    assert record["row"] == row
    assert record["exit_code"] == 91
    assert record["reasons"] == {"0": "request_stop()"}
    assert len(no_atexit) == 1


def test_an_async_session_stop_records_the_row_it_committed(
    tmp_path: Path, no_atexit: list[Any]
) -> None:
    """With async_write the flush returns before the commit: the record still names the
    row committed at the stop (reported by the commit event), not the previous one."""
    marker = tmp_path / "requeue.json"
    handler = PreemptionHandler(comm=SingleProcessComm(), requeue_file=marker)
    ckpt = Checkpoint(
        "p", path=tmp_path / "ckpt", flush_interval=None, async_write=True, comm=SingleProcessComm()
    )
    with ckpt as session, pytest.raises(SystemExit):
        session.write(lead_time=0)
        session.flush()  # row 0
        session.write(lead_time=1)
        handler.request_stop()
        handler.at_boundary(session)  # row 1
    assert distckpt.latest(tmp_path / "ckpt") == 1
    assert json.loads(marker.read_text())["row"] == 1


def test_checkpoint_and_exit_targets(tmp_path: Path, no_atexit: list[Any]) -> None:
    comm = FakeComm(0, 2)
    handler = PreemptionHandler(comm=comm, requeue_file=tmp_path / "m")
    with pytest.raises(SystemExit):
        handler.checkpoint_and_exit(lambda: 12)
    assert json.loads((tmp_path / "m").read_text())["row"] == 12
    assert comm.barriers == 1  # nobody exits before the record exists
    with pytest.raises(SystemExit):
        handler.checkpoint_and_exit(None)
    assert json.loads((tmp_path / "m").read_text())["row"] is None
    with pytest.raises(TypeError, match="session"):
        handler.checkpoint_and_exit(42)
    other = PreemptionHandler(comm=FakeComm(1, 2), requeue_file=tmp_path / "n")
    with pytest.raises(SystemExit):
        other.checkpoint_and_exit(lambda: 3)
    assert not (tmp_path / "n").exists()  # only rank 0 records


def test_handlers_stay_recording_after_deciding_to_exit(no_atexit: list[Any]) -> None:
    """A second SIGTERM while SystemExit unwinds must not kill the process (exit status)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit), PreemptionHandler(comm=FakeComm(0, 1)) as handler:
            handler.checkpoint_and_exit(None)
        assert signal.getsignal(signal.SIGTERM) == handler._on_signal
        assert no_atexit[0][1] == ((signal.SIGUSR1, signal.SIGTERM),)
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def test_watch_boundaries_patches_session_writes_and_save_only_while_active(
    tmp_path: Path, no_atexit: list[Any]
) -> None:
    original = distckpt.CheckpointSession.write
    handler = PreemptionHandler(comm=SingleProcessComm())
    with watch_boundaries(handler):
        distckpt.save({"x": torch.zeros(2)}, tmp_path / "a", comm=SingleProcessComm())
        assert handler.boundaries == 1
        handler.request_stop()
        with pytest.raises(SystemExit) as exited:
            distckpt.save({"x": torch.ones(2)}, tmp_path / "a", comm=SingleProcessComm())
        assert exited.value.code == 85
    assert distckpt.CheckpointSession.write is original
    assert distckpt.latest(tmp_path / "a") == 1


# -- real processes ---------------------------------------------------------------------------
@multiproc
@pytest.mark.timeout(240)
def test_signal_to_one_rank_stops_every_rank_at_the_same_boundary(tmp_path: Path) -> None:
    """torchrun, 2 ranks: SIGUSR1 to rank 1 only. Both ranks agree at the same boundary
    (every=3 boundaries), commit it (flushing writes that the interval of 4 left pending),
    exit with 85; a relaunch resumes from that row on both ranks."""
    store, pid_dir, marker = tmp_path / "store", tmp_path / "pids", tmp_path / "requeue.json"
    args = [store, "--pid-dir", pid_dir, "--every", "3", "--flush-interval", "4"]
    env = {"DISTCKPT_REQUEUE_FILE": str(marker)}
    with Background(torchrun_command(2, WORKER, [str(a) for a in args]), env=env) as job:
        pids = job.wait_until(lambda: read_pids(pid_dir, 2), "both ranks' pid files")
        job.wait_until(lambda: committed_row(store) is not None, "a committed row")
        os.kill(pids[1], signal.SIGUSR1)
        result = job.finish()

    out = result.describe()
    stops = result.lines("STOP ")
    assert result.ranks("STOP ") == [0, 1], out
    fields = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in stops]
    for f in fields:
        del f["rank"]
    assert fields[0] == fields[1], stops  # same step, same boundary, same reasons
    step, boundary = int(fields[0]["step"]), int(fields[0]["boundary"])
    assert boundary == step + 1 and boundary % 3 == 0, stops
    assert json.loads(fields[0]["reasons"]) == {"1": "SIGUSR1"}
    assert result.lines("EXIT ") and all("code=85" in x for x in result.lines("EXIT ")), out
    assert result.ranks("EXIT ") == [0, 1], out
    # torchrun's own report of its workers' exit statuses (it exits with 1 itself)
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", result.output, re.MULTILINE)
    assert codes == ["85", "85"], out
    assert result.returncode == 1, out

    row = distckpt.latest(store)
    assert row is not None
    st = Store(store)
    assert st.manifest_ranks(row) == [0, 1]
    for rank in (0, 1):
        assert st.read_manifest(row, rank).write_count == boundary
        assert distckpt.metadata(store, row=row, rank=rank)["step"] == step
    assert json.loads(marker.read_text())["row"] == row

    resumed = run_torchrun(
        2,
        WORKER,
        [str(a) for a in (store, "--pid-dir", pid_dir, "--steps", step + 4)],
        timeout=LAUNCH_TIMEOUT,
    ).check()
    for rank in (0, 1):
        assert f"RESUMED rank={rank} row={row} step={step + 1}" in resumed.stdout, (
            resumed.describe()
        )
        assert f"DONE rank={rank} step={step + 4}" in resumed.stdout, resumed.describe()


@multiproc
@pytest.mark.timeout(240)
def test_runner_stops_the_unmodified_ensemble_and_a_relaunch_finishes_it_bit_for_bit(
    tmp_path: Path, reference_digest: str
) -> None:
    """``python -m distckpt.session.preempt scripts/ensemble.py``: SIGUSR1 as soon as the handler is
    installed (before the first boundary); the run stops at its first boundary with row 0
    committed and exit status 85; a plain relaunch resumes and matches an uninterrupted run."""
    ckpt, out, marker = tmp_path / "ckpt", tmp_path / "out", tmp_path / "requeue.json"
    cmd = [
        sys.executable,
        "-m",
        "distckpt.session.preempt",
        ENSEMBLE,
        "--checkpoint",
        ckpt,
        "--output",
        out,
    ]
    env = {"DISTCKPT_REQUEUE_FILE": str(marker)}
    with Background(cmd, env=env) as job:
        job.wait_until(lambda: handles_signal(job.pid, signal.SIGUSR1), "the USR1 handler")
        os.kill(job.pid, signal.SIGUSR1)
        result = job.finish()
    assert result.returncode == REQUEUE_EXIT_CODE, result.describe()
    assert "stopping at boundary 1" in result.stderr, result.describe()
    assert not result.lines("DONE ")
    assert distckpt.latest(ckpt) == 0
    assert json.loads(marker.read_text())["row"] == 0

    resumed = run_command(
        [sys.executable, ENSEMBLE, "--checkpoint", ckpt, "--output", out], timeout=LAUNCH_TIMEOUT
    ).check()
    assert "resumed_from=0 " in resumed.lines("DONE ")[0], resumed.describe()
    assert ensemble_digest(resumed) == reference_digest


@multiproc
@pytest.mark.timeout(120)
def test_runner_makes_functional_saves_boundaries(tmp_path: Path) -> None:
    """A training-loop script using ``distckpt.save`` that signals itself after its third
    save stops after the fourth (the next boundary), with that save as the final row."""
    script = tmp_path / "train.py"
    script.write_text(
        "import os, signal, sys\n"
        "import torch\n"
        "import distckpt\n"
        "store = sys.argv[1]\n"
        "for step in range(1000):\n"
        "    distckpt.save({'w': torch.full((3,), float(step))}, store, step=step)\n"
        "    if step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('FINISHED')\n"
    )
    result = run_command(
        [sys.executable, "-m", "distckpt.session.preempt", "--every", "1", script, tmp_path / "s"],
        timeout=LAUNCH_TIMEOUT,
    )
    assert result.returncode == 85, result.describe()
    assert "FINISHED" not in result.stdout
    assert distckpt.latest(tmp_path / "s") == 3
    assert distckpt.metadata(tmp_path / "s")["step"] == 3
    assert re.search(r"rank 0: row 3 committed; exiting with status 85", result.stderr), (
        result.describe()
    )


def test_bound_state_survives_a_stop_in_process(tmp_path: Path, no_atexit: list[Any]) -> None:
    """The row written at the stop restores the bound state of the next session."""
    from dataclasses import dataclass

    @dataclass
    class Counter:
        n: int = 0

    comm = SingleProcessComm()
    handler = PreemptionHandler(comm=comm)
    ckpt = Checkpoint("c", path=tmp_path / "c", flush_interval=5, comm=comm)
    with pytest.raises(SystemExit), ckpt as session:
        state = bind_checkpoint_state(Counter())
        for _ in range(3):
            state.n += 1
            session.write()
        handler.request_stop()
        handler.at_boundary(session)
    with Checkpoint("c", path=tmp_path / "c", comm=comm) as session:
        assert bind_checkpoint_state(Counter()).n == 3
        assert session.write_count == 3
