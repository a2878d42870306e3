"""A load opens each data file it reads once, however many tensors and pieces it reads
(format 2: one data file per saved rank), and the reader's handles stay correct when
many files and threads share them."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import RecordingFS
from test_format2 import save_threads

import distckpt
from distckpt import Store
from distckpt.errors import CorruptChunkError
from distckpt.storage import filesystem
from distckpt.storage.counting import CountingFileSystem
from distckpt.storage.filesystem import LocalFileSystem
from distckpt.storage.memory import MemoryFileSystem

ROWS = 7  # 4 + 3 rows at 2 ranks


def _sharded(rank: int, world: int, n: int) -> dict[str, Any]:
    step = -(-ROWS // world)
    a, b = min(ROWS, rank * step), min(ROWS, (rank + 1) * step)
    out: dict[str, Any] = {}
    for i in range(n):
        full = torch.arange(ROWS * 5, dtype=torch.float32).reshape(ROWS, 5) + i
        out[f"p{i}"] = distckpt.Sharded(full[a:b].clone(), (ROWS, 5), (a, 0))
    return {"model": out}


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = filesystem._open_regular

    def counting(path: str) -> int:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(filesystem, "_open_regular", counting)
    return opened


def test_a_load_opens_each_data_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    n = 30
    save_threads(tmp_path / "s", 2, lambda r: _sharded(r, 2, n))
    opened = _count_opens(monkeypatch)
    target = {"model": {f"p{i}": torch.zeros(ROWS, 5) for i in range(n)}}
    distckpt.load(target, Store(tmp_path / "s"))  # 1 rank: every piece of both writers
    for i in range(n):
        assert torch.equal(target["model"][f"p{i}"], _sharded(0, 1, n)["model"][f"p{i}"].local)
    data = [p for p in opened if os.sep + "data" + os.sep in p]
    assert sorted(data) == sorted(Store(tmp_path / "s").data_file(0, r) for r in (0, 1))


def test_local_handles_keep_few_files_open_and_share_them_across_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(filesystem, "OPEN_FILES", 4)
    fs = LocalFileSystem()
    paths = [str(tmp_path / f"f{i}") for i in range(12)]
    for i, p in enumerate(paths):
        fs.write_file(p, [bytes([i]) * 4096], durable=False)
    files = fs.open_reads()
    errors: list[BaseException] = []

    def read(k: int) -> None:
        try:
            for j in range(200):
                i = (k * 7 + j) % len(paths)
                out = bytearray(16)
                assert files.read_into(paths[i], memoryview(out), j) == 16
                assert out == bytes([i]) * 16
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    # idle files beyond the limit were closed; those in use by a thread never were
    assert len(files._open) <= 4  # type: ignore[attr-defined]
    files.close()
    assert not files._open  # type: ignore[attr-defined]


def test_local_handles_lend_mapped_bytes_read_only_and_close_while_a_view_is_alive(
    tmp_path: Path,
):
    """Checksums and column bands are read in place from mapped files: the lent bytes are
    the file's, read-only, and closing the handles never fails on a view still in use."""
    fs = LocalFileSystem()
    path, empty = str(tmp_path / "f"), str(tmp_path / "empty")
    fs.write_file(path, [b"abc" * 1000], durable=False)
    fs.write_file(empty, [b""], durable=False)
    files = fs.open_reads()
    lent = files.borrow(path, 3, 2997)
    assert lent is not None and len(lent) == 1
    (view,) = lent
    assert view.readonly and bytes(view) == b"abc" * 999
    assert files.borrow(empty, 0, 0) is None  # nothing to map
    files.close()
    assert bytes(view[3:6]) == b"abc"  # unmapped only once the view is released
    view.release()
    memory = MemoryFileSystem()
    memory.write_file("/m", [b"abc"], durable=False)
    assert memory.open_reads().borrow("/m", 0, 3) is None  # copies only: readers use buffers


def test_mapped_reads_can_be_turned_off_and_read_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    value = torch.arange(64 * 24, dtype=torch.float32).reshape(64, 24)
    distckpt.save({"w": distckpt.Sharded(value, (64, 24), (0, 0))}, tmp_path)
    for mapped in ("1", "0"):
        monkeypatch.setenv(filesystem.MAPPED_READS_ENV, mapped)
        handles = LocalFileSystem().open_reads()
        lent = handles.borrow(Store(tmp_path).data_file(0, 0), 0, 16)
        assert (lent is None) == (mapped == "0")
        handles.close()
        band = distckpt.Sharded(torch.zeros(64, 8), (64, 24), (0, 8))  # a column band
        distckpt.load({"w": band}, tmp_path)
        assert torch.equal(band.local, value[:, 8:16])


def test_counting_backend_prices_a_reader_one_open_per_file():
    fs = CountingFileSystem()
    fs.makedirs("/s")
    fs.write_file("/s/c.0", [bytes(64)])
    before = fs.counts()
    files = fs.open_reads()
    assert files.size("/s/c.0") == 64
    for offset in range(0, 64, 8):
        files.read_into("/s/c.0", memoryview(bytearray(8)), offset)
    spent = fs.counts() - before
    assert (spent.ops["opens"], spent.ops["stats"], spent.ops["bytes_read"]) == (1, 0, 64)
    fs.read_into("/s/c.0", memoryview(bytearray(8)))  # the file system itself: an open a read
    assert (fs.counts() - before).ops["opens"] == 2


class _RemoteLike(MemoryFileSystem):
    """A backend whose reads are remote requests: verified loads stage instead of
    reading twice. Counts the data bytes read; ``lends``: its reads lend the response
    bodies (``borrow``), as the S3 backend's do."""

    stage_verified_reads = True  # type: ignore[assignment]

    def __init__(self, lends: bool = False) -> None:
        super().__init__()
        self.data_read = 0
        self.lends = lends

    def borrow(self, path: str, offset: int, nbytes: int) -> list[memoryview] | None:
        if not self.lends:
            return None
        body = bytearray(min(nbytes, max(0, self.size(path) - offset)))
        self.read_into(path, memoryview(body), offset)
        return [memoryview(body)]

    def read_into(self, path: str, out: memoryview, offset: int = 0) -> int:
        n = super().read_into(path, out, offset)
        self.data_read += n if "/data/c." in path else 0
        return n

    def read_into_parts(self, path: str, parts: Any, offset: int = 0) -> int:
        n = super().read_into_parts(path, parts, offset)
        self.data_read += n if "/data/c." in path else 0
        return n


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(4)}  # small: one span
    out["big"] = torch.randn(512, 256, generator=g)  # 512 KiB: its own fetch
    return out


@pytest.mark.parametrize("lends", [True, False], ids=["lends-bodies", "copies-only"])
def test_a_verified_load_from_a_remote_store_reads_each_byte_once(lends: bool):
    fs = _RemoteLike(lends)
    store = Store("/jobs/run", fs=fs)
    saved = _model(0)
    distckpt.save({"model": saved}, store)
    distckpt.storage.lease.release(store)
    target = {"model": _model(1)}
    fs.data_read = 0
    distckpt.load(target, store)
    assert all(torch.equal(target["model"][k], v) for k, v in saved.items())
    assert fs.data_read == sum(v.numel() * 4 for v in saved.values())


@pytest.mark.parametrize("lends", [True, False], ids=["lends-bodies", "copies-only"])
def test_a_staged_load_refuses_a_corrupt_row_before_touching_live_memory(lends: bool):
    fs = _RemoteLike(lends)
    store = Store("/jobs/run", fs=fs)
    distckpt.save({"model": _model(0)}, store)
    distckpt.storage.lease.release(store)
    path = next(p for p in fs._files if "/data/c." in p)
    data = bytearray(fs._files[path])
    last = max(store.read_manifest(0, 0).arrays, key=lambda a: a.offset)
    data[last.offset + last.nbytes - 1] ^= 0xFF  # the last tensor's last byte
    fs._files[path] = bytes(data)
    target = {"model": _model(1)}
    before = {k: v.clone() for k, v in target["model"].items()}
    with pytest.raises(CorruptChunkError):
        distckpt.load(target, store, fallback=False)
    assert all(torch.equal(target["model"][k], v) for k, v in before.items())


def test_small_tensors_are_verified_and_filled_from_one_read_of_their_span(tmp_path: Path):
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(500)}
    distckpt.save(state, tmp_path / "s")
    distckpt.storage.lease.release(tmp_path / "s")
    fs = RecordingFS()
    target = {k: torch.zeros(16) for k in state}
    distckpt.load(target, Store(tmp_path / "s", fs=fs))
    assert all(torch.equal(target[k], v) for k, v in state.items())
    data = [r for r in fs.reads if f"{os.sep}data{os.sep}c." in r[0]]
    # 500 checksummed tensors: verified as one span, then filled from it (not 1,000 reads)
    assert len(data) == 1


def _record_preadv(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(thread id, bytes) of every local ``preadv``."""
    calls: list[tuple[int, int]] = []
    real = filesystem._preadv_all

    def recording(fd: int, parts: Any, offset: int) -> int:
        n = real(fd, parts, offset)
        calls.append((threading.get_ident(), n))
        return n

    monkeypatch.setattr(filesystem, "_preadv_all", recording)
    return calls


def _large_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(6)}  # 1 MiB each


def test_a_verified_local_load_checks_and_copies_the_mapped_pages_without_reading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With mapped reads a verified load takes each tensor's bytes from the pages its check
    mapped (no read call copies them a second time); with mapping off it reads them."""
    saved = _large_model(0)
    distckpt.save(saved, tmp_path)
    total = sum(v.numel() * 4 for v in saved.values())
    for mapped in ("1", "0"):
        monkeypatch.setenv(filesystem.MAPPED_READS_ENV, mapped)
        calls = _record_preadv(monkeypatch)
        target = _large_model(1)
        distckpt.load(target, tmp_path)
        assert all(torch.equal(target[k], v) for k, v in saved.items())
        read = sum(n for _, n in calls)
        assert (read < total) if mapped == "1" else (read >= total), (mapped, read, total)


def test_a_rank_with_one_core_to_itself_reads_on_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ranks sharing a node's cores (``LOCAL_WORLD_SIZE``) read local files on no more
    threads than their share: page-cache reads are CPU work, and extra threads only
    contend with the other ranks'."""
    saved = _large_model(0)
    distckpt.save(saved, tmp_path)
    monkeypatch.setenv(filesystem.MAPPED_READS_ENV, "0")  # every read is a preadv
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(os.sched_getaffinity(0))))
    calls = _record_preadv(monkeypatch)
    target = _large_model(1)
    distckpt.load(target, tmp_path)
    assert all(torch.equal(target[k], v) for k, v in saved.items())
    assert len(calls) >= len(saved) and {t for t, _ in calls} == {threading.get_ident()}


@pytest.mark.parametrize(
    ("variable", "value", "ranks"),
    [
        ("LOCAL_WORLD_SIZE", "4", 4),  # torchrun
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "8", 8),  # Open MPI
        ("MPI_LOCALNRANKS", "2", 2),  # MPICH's hydra
        ("SLURM_TASKS_PER_NODE", "4(x16)", 4),  # srun: 4 ranks on each of 16 nodes
        ("SLURM_TASKS_PER_NODE", "", 1),
    ],
)
def test_the_ranks_sharing_a_node_are_read_from_each_launcher(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, ranks: int
):
    """Read threads are the rank's share of the cores under torchrun, mpiexec and srun
    alike, not only where ``LOCAL_WORLD_SIZE`` is set."""
    from distckpt.io import rowio

    for name in rowio._LOCAL_RANKS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert rowio.local_ranks() == ranks
    cpus = len(os.sched_getaffinity(0))
    assert rowio.core_share() == max(1, cpus // ranks)
