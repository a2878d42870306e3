"""The writer lease: acquire, renew, release, takeover of stale and dead leases, races."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import LeaseHeldError, LeaseLostError, Store
from distckpt.errors import CheckpointError, StoreFormatError
from distckpt.storage import lease as lease_mod
from distckpt.storage.lease import (
    LEASE_FILE,
    LOCK_FILE,
    Lease,
    hold,
    lease_status,
    release,
    release_all,
)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _no_launcher_job(monkeypatch):
    """Tests choose job ids themselves, also when run inside a SLURM job."""
    for name in lease_mod.JOB_ID_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.create("leased")
    return s


def _doc(store: Store) -> dict:
    return json.loads(Path(store.path, LEASE_FILE).read_text())


def _edit(store: Store, **changes: object) -> None:
    doc = _doc(store)
    doc.update(changes)
    Path(store.path, LEASE_FILE).write_text(json.dumps(doc))


def test_acquire_records_the_holder_and_release_frees(store, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lease = Lease.acquire(store, timeout_s=120)
    doc = _doc(store)
    assert doc["host"] == socket.gethostname()
    assert doc["pid"] == os.getpid()
    assert doc["job"] == "4242"
    assert doc["token"] == lease.token and len(lease.token) == 32
    assert doc["timeout_s"] == 120
    assert doc["acquired"] == doc["heartbeat"]
    assert doc["heartbeat_utc"].endswith("+00:00")
    status = lease_status(store)
    assert status.state == "held" and status.held
    assert status.holder is not None and status.holder.job == "4242"
    assert not Path(store.path, LOCK_FILE).exists()  # the lock lives only during a change
    lease.release()
    assert not Path(store.path, LEASE_FILE).exists()
    assert lease_status(store).state == "free"
    lease.release()  # releasing twice is harmless


def test_second_acquire_is_refused_with_the_holder_named(store):
    with Lease.acquire(store, job_id="job-1"):
        with pytest.raises(LeaseHeldError) as info:
            Lease.acquire(store)
        message = str(info.value)
        assert store.path in message
        assert socket.gethostname() in message
        assert f"pid {os.getpid()}" in message
        assert "job job-1" in message
        assert "heartbeat" in message
        assert info.value.holder is not None and info.value.holder.job == "job-1"
        assert isinstance(info.value, CheckpointError)
    assert lease_status(store).state == "free"  # released by the context manager


def test_stale_heartbeat_is_taken_over_and_the_old_holder_finds_out(store, caplog):
    clock = Clock()
    old = Lease.acquire(store, timeout_s=300, clock=clock)
    clock.t += 299
    with pytest.raises(LeaseHeldError):
        Lease.acquire(store, clock=clock)
    clock.t += 2  # 301 s without a heartbeat
    assert lease_status(store, clock=clock).state == "stale"
    with caplog.at_level(logging.WARNING, logger="distckpt.storage.lease"):
        new = Lease.acquire(store, clock=clock, job_id="successor")
    assert "taking over" in caplog.text and "no heartbeat" in caplog.text
    assert _doc(store)["token"] == new.token
    with pytest.raises(LeaseLostError, match=r"taken over by .*job successor"):
        old.renew()
    with pytest.raises(LeaseLostError):
        old.release()
    assert _doc(store)["token"] == new.token  # the loser removed nothing
    new.release()


def test_renewing_keeps_the_lease_alive(store):
    clock = Clock()
    lease = Lease.acquire(store, timeout_s=300, clock=clock)
    for _ in range(3):
        clock.t += 200
        lease.renew()
        assert _doc(store)["heartbeat"] == clock.t
        with pytest.raises(LeaseHeldError):
            Lease.acquire(store, clock=clock)
    assert _doc(store)["acquired"] == clock.t - 600
    lease.release()


def test_staleness_is_judged_by_the_holders_own_timeout(store):
    clock = Clock()
    lease = Lease.acquire(store, timeout_s=1000, clock=clock)
    clock.t += 500  # older than the default 300 s, younger than the holder's 1000 s
    with pytest.raises(LeaseHeldError):
        Lease.acquire(store, clock=clock, timeout_s=10)
    assert lease_status(store, clock=clock).held
    lease.release()


def test_renew_by_a_non_holder_is_refused(store):
    lease = Lease.acquire(store)
    _edit(store, token="someone-else")
    with pytest.raises(LeaseLostError):
        lease.renew()
    assert _doc(store)["token"] == "someone-else"


def test_a_removed_lease_is_lost(store):
    lease = Lease.acquire(store)
    os.remove(os.path.join(store.path, LEASE_FILE))
    with pytest.raises(LeaseLostError, match="removed"):
        lease.renew()


def test_dead_process_on_this_host_is_taken_over_at_once(store, caplog):
    script = textwrap.dedent(
        f"""
        import os
        from distckpt.storage.lease import Lease
        Lease.acquire({store.path!r}, job_id="killed", timeout_s=3600)
        os._exit(0)  # dies without releasing (no atexit)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    status = lease_status(store)
    assert status.state == "dead", status
    assert status.holder is not None and status.holder.job == "killed"
    with caplog.at_level(logging.WARNING, logger="distckpt.storage.lease"):
        lease = Lease.acquire(store)
    assert "has exited" in caplog.text
    lease.release()


def test_a_lease_still_held_at_normal_exit_is_released(store):
    script = f"from distckpt.storage.lease import Lease\nlease = Lease.acquire({store.path!r})\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert lease_status(store).state == "free"


def test_reused_pid_and_reboot_count_as_dead(store):
    Lease.acquire(store)
    _edit(store, pid_start=-1)  # our pid, but a process that started at another time
    assert lease_status(store).state == "dead"
    assert "pid reused" in lease_status(store).reason
    _edit(store, pid_start=None, boot_id="another-boot")
    if lease_mod._boot_id() is not None:
        assert lease_status(store).state == "dead"
        assert "rebooted" in lease_status(store).reason


def test_a_holder_on_another_host_is_judged_by_heartbeat_only(store):
    clock = Clock()
    Lease.acquire(store, clock=clock)
    _edit(store, host="elsewhere.cluster", pid=1)
    status = lease_status(store, clock=clock)
    assert status.held
    with pytest.raises(LeaseHeldError, match=r"host elsewhere\.cluster, pid 1"):
        Lease.acquire(store, clock=clock)
    clock.t += 301
    Lease.acquire(store, clock=clock).release()


def test_a_requeued_job_takes_over_its_earlier_incarnation(store, caplog, monkeypatch):
    Lease.acquire(store, job_id="777")
    _edit(store, host="node-a.cluster", pid=1)  # the killed first run, on another node
    with pytest.raises(LeaseHeldError):
        Lease.acquire(store, job_id="778")
    with pytest.raises(LeaseHeldError):
        Lease.acquire(store, job_id="777", same_job_takeover=False)
    with pytest.raises(LeaseHeldError):
        Lease.acquire(store, job_id="777", purpose="distckpt gc")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with caplog.at_level(logging.WARNING, logger="distckpt.storage.lease"):
        lease = Lease.acquire(store)
    assert "earlier incarnation of job 777" in caplog.text
    assert _doc(store)["host"] == socket.gethostname()
    lease.release()
    # ...but a job never takes over a gc run inside its own allocation.
    with Lease.acquire(store, purpose="distckpt gc"):
        _edit(store, host="node-a.cluster", pid=1)
        with pytest.raises(LeaseHeldError, match=r"\(distckpt gc\)"):
            Lease.acquire(store)


def test_an_unreadable_lease_is_taken_over(store, caplog):
    Path(store.path, LEASE_FILE).write_text("{not json")
    assert lease_status(store).state == "invalid"
    with caplog.at_level(logging.WARNING, logger="distckpt.storage.lease"):
        Lease.acquire(store).release()
    assert "taking over" in caplog.text


def test_only_a_created_store_can_be_leased(tmp_path):
    with pytest.raises(StoreFormatError, match="create the store"):
        Lease.acquire(tmp_path / "absent")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("x")
    with pytest.raises(StoreFormatError, match="not a distckpt store"):
        Lease.acquire(tmp_path / "foreign")


def test_saving_holds_the_lease_and_reading_needs_none(store):
    distckpt.save({"x": torch.arange(3)}, store.path)
    status = lease_status(store)
    assert status.held and status.holder is not None and status.holder.pid == os.getpid()
    assert distckpt.latest(store.path) == 0
    distckpt.save({"x": torch.arange(3)}, store.path)  # the same job renews its own lease
    assert distckpt.latest(store.path) == 1
    distckpt.storage.lease.release(store.path)
    assert not lease_status(store).held


def test_a_second_job_writing_the_store_is_refused(store):
    distckpt.save({"x": torch.arange(3)}, store.path)
    code = (
        "import sys, torch, distckpt\n"
        "try:\n"
        "    distckpt.save({'x': torch.ones(1)}, sys.argv[1])\n"
        "except distckpt.LeaseHeldError as exc:\n"
        "    print(exc); sys.exit(7)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, store.path], capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 7, other.stderr
    assert f"pid {os.getpid()}" in other.stdout
    assert distckpt.latest(store.path) == 0  # the refused job wrote no row
    distckpt.storage.lease.release(store.path)


SECOND_JOB = textwrap.dedent(
    """
    import sys, torch, distckpt
    path, how = sys.argv[1], sys.argv[2]
    try:
        if how == "checkpoint":
            with distckpt.Checkpoint("c", path=path, async_write=True):
                print("ENTERED")  # never: refused before the block runs
        else:
            distckpt.AsyncSaver(path)
            print("CONSTRUCTED")
    except distckpt.LeaseHeldError as exc:
        print(exc)
        print("HOLDER PID", exc.holder.pid)
        sys.exit(7)
    """
)


@pytest.mark.parametrize("how", ["checkpoint", "saver"])
def test_a_second_job_is_refused_when_it_opens_the_store_for_writing(store, how):
    """Refused at ``Checkpoint.__enter__`` / ``AsyncSaver(...)``, not at its first commit
    after it trained: the error names the holder and nothing was written."""
    with distckpt.AsyncSaver(store.path) as saver:  # this job holds the lease from here on
        assert lease_status(store).holder.pid == os.getpid()
        other = subprocess.run(
            [sys.executable, "-c", SECOND_JOB, store.path, how],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 7, other.stdout + other.stderr
        assert f"pid {os.getpid()}" in other.stdout
        assert f"HOLDER PID {os.getpid()}" in other.stdout
        assert "ENTERED" not in other.stdout and "CONSTRUCTED" not in other.stdout
        assert store.rows() == []  # nothing written by either job yet
        saver.save({"x": torch.arange(3)})
    assert distckpt.latest(store.path) == 0
    distckpt.storage.lease.release(store.path)


def test_the_lease_is_taken_when_a_checkpoint_block_opens(store):
    with distckpt.Checkpoint("c", path=store.path) as session:
        assert lease_status(store).holder.pid == os.getpid()  # before any write
        assert session.row is None
    assert not lease_status(store).held  # released when the block ends


@pytest.mark.parametrize("slow_start", [False, True], ids=["plain", "slow-lease-object"])
def test_threads_racing_to_acquire_only_one_wins(store, monkeypatch, slow_start: bool):
    """Threads of one process racing for the lease: exactly one wins. ``slow_start`` widens
    the moment between publishing the lease and its ``Lease`` object existing (a thread
    scheduled out there): another thread must not mistake the fresh lease for one this
    process failed to publish and take it back."""
    if slow_start:
        made = threading.Event()
        real_init = Lease.__init__

        def slow_init(self: Lease, *args: Any, **kwargs: Any) -> None:
            if not made.is_set():  # the first winner only: others would only wait longer
                made.set()
                time.sleep(0.2)
            real_init(self, *args, **kwargs)

        monkeypatch.setattr(Lease, "__init__", slow_init)
    n = 16
    barrier = threading.Barrier(n)
    wins: list[Lease] = []
    losses: list[BaseException] = []

    def attempt() -> None:
        barrier.wait()
        try:
            wins.append(Lease.acquire(store))
        except LeaseHeldError as exc:
            losses.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == n - 1
    assert _doc(store)["token"] == wins[0].token
    wins[0].release()


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from distckpt.storage.lease import Lease, LeaseHeldError
    store, sync, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    (sync / f"ready-{me}").touch()
    while not (sync / "go").exists():
        time.sleep(0.001)
    try:
        lease = Lease.acquire(store)
        result = "won " + lease.token
    except LeaseHeldError:
        result = "lost"
    (sync / f"result-{me}").write_text(result)
    while not (sync / "done").exists():  # stay alive: a dead winner may be taken over
        time.sleep(0.01)
    os._exit(0)
    """
)


def test_processes_racing_to_acquire_only_one_wins(store, tmp_path):
    n = 4
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, store.path, str(sync), str(i)])
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(sync.glob("ready-*"))) < n:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        (sync / "go").touch()
        while len(list(sync.glob("result-*"))) < n:
            assert time.monotonic() < deadline, "workers did not finish"
            time.sleep(0.05)
        results = [(sync / f"result-{i}").read_text() for i in range(n)]
    finally:
        (sync / "done").touch()
        for p in procs:
            p.wait(timeout=60)
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1, results
    assert winners[0] == "won " + _doc(store)["token"]


def test_a_lock_left_by_a_dead_process_is_broken(store):
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(proc.stdout)
    lock = {"token": "abandoned", "host": socket.gethostname(), "pid": dead_pid}
    Path(store.path, LOCK_FILE).write_text(json.dumps(lock))
    start = time.monotonic()
    Lease.acquire(store).release()
    assert time.monotonic() - start < 5
    assert not Path(store.path, LOCK_FILE).exists()


def test_a_lock_from_another_host_is_broken_once_it_stays_unchanged(store):
    lock = {"token": "abandoned", "host": "elsewhere", "pid": 1}
    Path(store.path, LOCK_FILE).write_text(json.dumps(lock))
    start = time.monotonic()
    Lease.acquire(store, lock_stale_s=0.3).release()
    assert 0.3 <= time.monotonic() - start < 10
    Path(store.path, LOCK_FILE).write_text(json.dumps(lock))
    with pytest.raises(CheckpointError, match="cannot take the lease lock"):
        Lease.acquire(store, lock_stale_s=60, lock_wait_s=0.2)


def test_hold_acquires_once_then_renews(store):
    try:
        first = hold(store, job_id="train")
        beat = _doc(store)["heartbeat"]
        time.sleep(0.01)
        assert hold(store.path) is first
        assert _doc(store)["heartbeat"] == beat  # renewed within timeout/10: no I/O
        assert hold(store.path, renew_after_s=0) is first
        assert _doc(store)["heartbeat"] > beat
        saved = _doc(store)
        _edit(store, token="thief")
        with pytest.raises(LeaseLostError):
            hold(store, renew_after_s=0)
        Path(store.path, LEASE_FILE).write_text(json.dumps(saved))
        release(store)
        assert lease_status(store).state == "free"
        hold(store)
        release_all()
        assert lease_status(store).state == "free"
    finally:
        release_all()


def test_background_heartbeat_renews_and_stops_on_loss(store):
    lease = Lease.acquire(store, timeout_s=30)
    first = _doc(store)["heartbeat"]
    lease.start_heartbeat(0.05)
    deadline = time.monotonic() + 10
    while _doc(store)["heartbeat"] == first:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _edit(store, token="thief")
    time.sleep(0.3)
    with pytest.raises(LeaseLostError):
        lease.renew()
    lease.stop_heartbeat()
