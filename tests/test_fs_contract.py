"""The FileSystem contract: what every storage backend promises the store, the commit
protocol and the lease, checked the same way for each backend.

A new backend passes by adding one entry to ``BACKENDS``; the S3 backend runs against a real
server (SeaweedFS, ``tests/s3server.py``). Then a whole job (save, latest,
load, lease) runs on the in-memory backend, so nothing in the package reaches around the
seam to the local disk.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import Store
from distckpt.errors import CheckpointWriteError, LeaseHeldError, VersionConflictError
from distckpt.storage.counting import CountingFileSystem
from distckpt.storage.filesystem import FileSystem, LocalFileSystem
from distckpt.storage.lease import LEASE_FILE, LOCK_FILE, Lease, lease_status
from distckpt.storage.memory import MemoryFileSystem
from tests.fakes import FullDiskFS, RecordingFS


@dataclass(frozen=True)
class Backend:
    """How to get an empty directory ``root`` on a fresh instance of one backend."""

    name: str
    make: Callable[[Path], tuple[FileSystem, str]]
    symlinks: bool  # whether links can be planted beside the backend (to test rmtree)
    directories: bool = True  # False: object stores, where directories are implied by keys


def _local(fs: FileSystem) -> Callable[[Path], tuple[FileSystem, str]]:
    return lambda tmp: (fs, str(tmp))


def _memory(tmp: Path) -> tuple[FileSystem, str]:
    fs = MemoryFileSystem()
    fs.makedirs("/contract/root")
    return fs, "/contract/root"


def _counting(tmp: Path) -> tuple[FileSystem, str]:
    # Keeps every file's bytes: the contract's reads compare bytes. Dropping data bytes (its
    # default, for simulations) is the one documented exemption; see test_scale_sim.py.
    fs = CountingFileSystem(keep=lambda path: True)
    fs.makedirs("/contract/root")
    return fs, "/contract/root"


BACKENDS = [
    Backend("local", lambda tmp: (LocalFileSystem(), str(tmp)), symlinks=True),
    Backend("memory", _memory, symlinks=False),
    Backend("counting", _counting, symlinks=False),
    Backend("recording", lambda tmp: (RecordingFS(), str(tmp)), symlinks=True),
    Backend("fulldisk-with-room", lambda tmp: (FullDiskFS(1 << 30), str(tmp)), symlinks=True),
    # A fresh prefix of the session's SeaweedFS bucket (made by the fixture below).
    Backend("s3", lambda tmp: (LocalFileSystem(), ""), symlinks=False, directories=False),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[FileSystem, str, Backend]:
    if request.param.name == "s3":
        from distckpt.storage.s3 import S3FileSystem

        server = request.getfixturevalue("s3_server")
        return S3FileSystem(server.bucket, server.storage_options), server.url(), request.param
    fs, root = request.param.make(tmp_path)
    return fs, root, request.param


def needs_directories(b: Backend) -> None:
    if not b.directories:
        pytest.skip(f"{b.name} has no directories: a write creates its parents")


class TestFileSystemContract:
    """Each test states one promise of the seam in terms of the seam's own calls."""

    # -- writing and reading back ------------------------------------------------------------
    def test_write_file_concatenates_parts_and_reads_back(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "a.bin")
        tensor = torch.arange(4, dtype=torch.int32)
        parts = [b"head", bytearray(b"-"), memoryview(tensor.numpy()), b""]
        expected = b"head-" + tensor.numpy().tobytes()
        assert fs.write_file(path, parts, durable=False) == len(expected)
        assert fs.read_bytes(path) == expected
        assert fs.size(path) == len(expected)
        assert fs.exists(path) and not fs.is_dir(path)

    def test_write_file_replaces_longer_content(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "a.bin")
        fs.write_file(path, [b"a long first version"])
        fs.write_file(path, [b"short"])
        assert fs.read_bytes(path) == b"short"

    def test_write_into_missing_directory_is_a_write_error_naming_the_file(self, backend):
        fs, root, b = backend
        needs_directories(b)
        path = os.path.join(root, "missing", "a.bin")
        with pytest.raises(CheckpointWriteError, match=r"a\.bin"):
            fs.write_file(path, [b"x"])
        assert not fs.exists(path)

    def test_missing_file_reads_raise_file_not_found(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "nothing")
        with pytest.raises(FileNotFoundError):
            fs.read_bytes(path)
        with pytest.raises(FileNotFoundError):
            fs.read_into(path, memoryview(bytearray(4)))
        with pytest.raises(FileNotFoundError):
            fs.size(path)
        with pytest.raises(FileNotFoundError):
            fs.mtime(path)
        assert not fs.exists(path) and not fs.is_dir(path)

    def test_ranged_reads_fill_buffers_and_stop_at_the_end(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "r.bin")
        data = bytes(range(100))
        fs.write_file(path, [data])
        out = bytearray(10)
        assert fs.read_into(path, memoryview(out), 20) == 10
        assert bytes(out) == data[20:30]
        tail = bytearray(10)
        assert fs.read_into(path, memoryview(tail), 95) == 5
        assert bytes(tail[:5]) == data[95:]
        assert fs.read_range(path, 40, 7) == data[40:47]
        assert fs.read_range(path, 98, 10) == data[98:]
        a, b = bytearray(3), bytearray(4)
        assert fs.read_into_parts(path, [memoryview(a), memoryview(b)], 50) == 7
        assert bytes(a) + bytes(b) == data[50:57]
        c, d = bytearray(3), bytearray(4)
        assert fs.read_into_parts(path, [memoryview(c), memoryview(d)], 96) == 4
        assert bytes(c) + bytes(d[:1]) == data[96:]

    def test_reader_handles_read_like_the_file_system_and_fail_alike(self, backend):
        fs, root, _ = backend
        path, other = os.path.join(root, "h.bin"), os.path.join(root, "h2.bin")
        data = bytes(range(200))
        fs.write_file(path, [data])
        fs.write_file(other, [data[::-1]])
        files = fs.open_reads()
        try:
            assert files.size(path) == 200
            for offset, n in ((0, 10), (150, 80), (199, 1), (10, 0)):
                out = bytearray(n)
                got = files.read_into(path, memoryview(out), offset)
                assert bytes(out[:got]) == data[offset : offset + n]
            a, b = bytearray(3), bytearray(4)
            assert files.read_into_parts(other, [memoryview(a), memoryview(b)], 196) == 4
            assert bytes(a) + bytes(b[:1]) == data[::-1][196:]
            with pytest.raises(FileNotFoundError):
                files.size(os.path.join(root, "missing"))
            with pytest.raises(FileNotFoundError):
                files.read_into(os.path.join(root, "missing"), memoryview(bytearray(1)))
        finally:
            files.close()
        out = bytearray(5)  # closed handles open the file again
        assert files.read_into(path, memoryview(out), 5) == 5 and bytes(out) == data[5:10]
        files.close()

    def test_read_into_a_typed_buffer(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "t.bin")
        src = torch.arange(6, dtype=torch.float64)
        fs.write_file(path, [memoryview(src.numpy())])
        dst = torch.zeros(6, dtype=torch.float64)
        assert fs.read_into(path, memoryview(dst.numpy())) == 48
        assert torch.equal(dst, src)

    # -- atomic publication ------------------------------------------------------------------
    def test_atomic_write_publishes_and_replaces_leaving_no_temp_file(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "doc.json")
        fs.atomic_write(path, b"first")
        fs.atomic_write(path, [b"sec", memoryview(b"ond")])
        assert fs.read_bytes(path) == b"second"
        assert fs.listdir(root) == ["doc.json"]

    def test_failed_atomic_write_keeps_the_old_content_and_no_temp_file(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "doc.json")
        fs.atomic_write(path, b"old")
        with pytest.raises(TypeError):
            fs.atomic_write(path, [b"new", object()])  # type: ignore[list-item]
        assert fs.read_bytes(path) == b"old"
        assert fs.listdir(root) == ["doc.json"]

    def test_atomic_write_into_missing_directory_fails_and_publishes_nothing(self, backend):
        fs, root, b = backend
        needs_directories(b)
        path = os.path.join(root, "missing", "doc.json")
        with pytest.raises(CheckpointWriteError, match=r"doc\.json"):
            fs.atomic_write(path, b"x")
        assert not fs.exists(os.path.join(root, "missing"))

    # -- exclusive creation, rename, link ----------------------------------------------------
    def test_create_exclusive_refuses_an_existing_entry(self, backend):
        fs, root, b = backend
        path = os.path.join(root, "lock")
        fs.create_exclusive(path, b"mine")
        with pytest.raises(FileExistsError):
            fs.create_exclusive(path, b"theirs")
        assert fs.read_bytes(path) == b"mine"
        needs_directories(b)
        fs.makedirs(os.path.join(root, "dir"))
        with pytest.raises(FileExistsError):
            fs.create_exclusive(os.path.join(root, "dir"), b"x")

    def test_create_exclusive_without_parent_is_file_not_found(self, backend):
        fs, root, b = backend
        needs_directories(b)
        with pytest.raises(FileNotFoundError):
            fs.create_exclusive(os.path.join(root, "missing", "lock"), b"x")

    def test_create_exclusive_has_one_winner_among_concurrent_creators(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "lock")
        n = 8
        start = threading.Barrier(n)
        winners: list[int] = []

        def contend(i: int) -> None:
            start.wait()
            try:
                fs.create_exclusive(path, str(i).encode())
            except FileExistsError:
                return
            winners.append(i)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1
        assert fs.read_bytes(path) == str(winners[0]).encode()

    def test_rename_moves_and_replaces(self, backend):
        fs, root, _ = backend
        src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
        fs.write_file(src, [b"new"])
        fs.write_file(dst, [b"old"])
        fs.rename(src, dst)
        assert fs.read_bytes(dst) == b"new"
        assert not fs.exists(src)
        assert fs.listdir(root) == ["dst"]
        with pytest.raises(FileNotFoundError):
            fs.rename(src, dst)

    def test_link_names_the_same_content_and_never_replaces(self, backend):
        fs, root, _ = backend
        a, b = os.path.join(root, "a"), os.path.join(root, "b")
        fs.write_file(a, [b"content"])
        fs.link(a, b)
        fs.remove(a)
        assert fs.read_bytes(b) == b"content"
        fs.write_file(a, [b"other"])
        with pytest.raises(FileExistsError):
            fs.link(a, b)
        assert fs.read_bytes(b) == b"content"
        with pytest.raises(FileNotFoundError):
            fs.link(os.path.join(root, "missing"), os.path.join(root, "c"))

    # -- publication that never replaces, compare-and-swap -----------------------------------
    def test_publish_exclusive_publishes_once_and_never_replaces(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "manifest.json")
        fs.publish_exclusive(path, [b"com", memoryview(b"mitted")])
        with pytest.raises(FileExistsError):
            fs.publish_exclusive(path, b"a second writer")
        assert fs.read_bytes(path) == b"committed"
        assert fs.listdir(root) == ["manifest.json"]  # no temp file left either way

    def test_publish_exclusive_has_one_winner_among_concurrent_publishers(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "manifest.json")
        winners = contend(8, lambda i: fs.publish_exclusive(path, b"w%d" % i), FileExistsError)
        assert len(winners) == 1
        assert fs.read_bytes(path) == b"w%d" % winners[0]
        assert fs.listdir(root) == ["manifest.json"]

    def test_write_if_version_replaces_only_the_version_it_read(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "lease.json")
        with pytest.raises(VersionConflictError):
            fs.write_if_version(path, b"x", "no-such-version")  # nothing to replace
        first = fs.write_if_version(path, b"one", None)
        with pytest.raises(VersionConflictError):
            fs.write_if_version(path, b"other", None)  # None: only while missing
        assert fs.read_versioned(path) == (b"one", first)
        second = fs.write_if_version(path, b"two", first)
        assert second != first
        with pytest.raises(VersionConflictError) as err:
            fs.write_if_version(path, b"late", first)
        assert err.value.path == path and err.value.expected == first
        assert fs.read_versioned(path) == (b"two", second)
        assert fs.listdir(root) == ["lease.json"]

    def test_write_if_version_has_one_winner_among_writers_of_one_version(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "lease.json")
        fs.write_if_version(path, b"start", None)
        _, seen = fs.read_versioned(path)
        winners = contend(
            8, lambda i: fs.write_if_version(path, b"w%d" % i, seen), VersionConflictError
        )
        assert len(winners) == 1
        assert fs.read_bytes(path) == b"w%d" % winners[0]

    # -- directories -------------------------------------------------------------------------
    def test_makedirs_creates_parents_and_is_idempotent(self, backend):
        fs, root, b = backend
        deep = os.path.join(root, "x", "y", "z")
        fs.makedirs(deep)
        fs.makedirs(deep)
        if not b.directories:  # nothing exists until a file does; then its parents do
            assert not fs.is_dir(deep)
            fs.write_file(os.path.join(deep, "f"), [b"1"])
            assert fs.is_dir(deep) and fs.is_dir(os.path.join(root, "x"))
            assert fs.listdir(deep) == ["f"] and fs.exists(deep)
            return
        assert fs.is_dir(deep) and fs.is_dir(os.path.join(root, "x"))
        assert fs.listdir(deep) == []
        assert isinstance(fs.mtime(deep), float)

    def test_listdir_names_files_and_directories_once(self, backend):
        fs, root, b = backend
        fs.makedirs(os.path.join(root, "sub", "inner"))
        if not b.directories:
            fs.write_file(os.path.join(root, "sub", "inner", "h"), [b"3"])
        fs.write_file(os.path.join(root, "f"), [b"1"])
        fs.write_file(os.path.join(root, "sub", "g"), [b"2"])
        assert sorted(fs.listdir(root)) == ["f", "sub"]
        assert sorted(fs.listdir(os.path.join(root, "sub"))) == ["g", "inner"]
        assert fs.listdir(os.path.join(root, "missing")) == []

    def test_remove_deletes_one_file_and_is_idempotent(self, backend):
        fs, root, _ = backend
        keep, gone = os.path.join(root, "keep"), os.path.join(root, "gone")
        fs.write_file(keep, [b"k"])
        fs.write_file(gone, [b"g"])
        fs.remove(gone)
        fs.remove(gone)
        assert not fs.exists(gone)
        assert fs.listdir(root) == ["keep"]

    def test_rmtree_deletes_the_tree_only_and_is_idempotent(self, backend):
        fs, root, b = backend
        tree, sibling = os.path.join(root, "tree"), os.path.join(root, "sibling")
        fs.makedirs(os.path.join(tree, "a", "b"))
        fs.write_file(os.path.join(tree, "a", "b", "f"), [b"x"])
        fs.write_file(os.path.join(tree, "top"), [b"y"])
        fs.makedirs(sibling)
        fs.write_file(os.path.join(sibling, "s"), [b"z"])
        fs.rmtree(tree)
        fs.rmtree(tree)
        assert not fs.exists(tree) and not fs.exists(os.path.join(tree, "a", "b", "f"))
        if b.directories:
            assert fs.listdir(root) == ["sibling"]
        else:  # listings are eventual: the emptied prefix may be named a while longer
            assert set(fs.listdir(root)) - {"tree"} == {"sibling"} and not fs.is_dir(tree)
        assert fs.read_bytes(os.path.join(sibling, "s")) == b"z"

    def test_rmtree_never_follows_a_link_out_of_the_tree(self, backend):
        fs, root, b = backend
        if not b.symlinks:
            pytest.skip(f"{b.name} has no symbolic links")
        outside = os.path.join(root, "outside")
        fs.makedirs(outside)
        fs.write_file(os.path.join(outside, "precious"), [b"keep me"])
        tree = os.path.join(root, "tree")
        fs.makedirs(tree)
        os.symlink(outside, os.path.join(tree, "link-to-dir"))
        os.symlink(os.path.join(outside, "precious"), os.path.join(tree, "link-to-file"))
        fs.rmtree(tree)
        assert not fs.exists(tree)
        assert fs.read_bytes(os.path.join(outside, "precious")) == b"keep me"
        linked_tree = os.path.join(root, "linked-tree")
        os.symlink(outside, linked_tree)
        fs.rmtree(linked_tree)
        assert fs.read_bytes(os.path.join(outside, "precious")) == b"keep me"

    def test_disk_usage_sums_the_files_of_a_tree(self, backend):
        fs, root, _ = backend
        tree = os.path.join(root, "row")
        fs.makedirs(os.path.join(tree, "rank0"))
        fs.write_file(os.path.join(tree, "zarr.json"), [b"x" * 10])
        fs.write_file(os.path.join(tree, "rank0", "c"), [b"y" * 1000])
        fs.write_file(os.path.join(root, "beside"), [b"z" * 5])
        assert fs.disk_usage(tree) == 1010
        fs.remove(os.path.join(tree, "zarr.json"))
        assert fs.disk_usage(tree) == 1000
        assert fs.disk_usage(os.path.join(root, "missing")) == 0

    # -- durability and stat -----------------------------------------------------------------
    def test_fsync_calls_accept_written_entries_and_refuse_missing_ones(self, backend):
        fs, root, b = backend
        sub = os.path.join(root, "d")
        fs.makedirs(sub)
        files = [os.path.join(sub, f"f{i}") for i in range(3)]
        for f in files:
            fs.write_file(f, [b"x"], durable=False)
        fs.fsync_files(files)
        fs.fsync_dirs([root, sub])
        fs.fsync_dir(sub)
        needs_directories(b)  # object stores: a PUT that returned is durable, nothing to sync
        with pytest.raises(FileNotFoundError):
            fs.fsync_files([os.path.join(sub, "missing")])
        with pytest.raises(FileNotFoundError):
            fs.fsync_dir(os.path.join(root, "missing"))

    def test_mtime_does_not_go_back_when_a_file_is_rewritten(self, backend):
        fs, root, _ = backend
        path = os.path.join(root, "m")
        fs.write_file(path, [b"1"])
        first = fs.mtime(path)
        fs.write_file(path, [b"2"])
        assert fs.mtime(path) >= first

    def test_identity_is_the_same_for_every_spelling_of_a_path(self, backend):
        fs, root, _ = backend
        fs.makedirs(os.path.join(root, "s"))
        plain = os.path.join(root, "s")
        assert fs.identity(plain) == fs.identity(os.path.join(root, ".", "s", ""))
        assert fs.identity(plain) != fs.identity(os.path.join(root, "t"))


def contend(n: int, attempt: Callable[[int], object], loses: type[Exception]) -> list[int]:
    """Run ``attempt(i)`` on ``n`` threads released together; the ``i`` that did not raise
    ``loses``."""
    start = threading.Barrier(n)
    winners: list[int] = []

    def one(i: int) -> None:
        start.wait()
        try:
            attempt(i)
        except loses:
            return
        winners.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners


def test_memory_backends_do_not_share_files():
    a, b = MemoryFileSystem(), MemoryFileSystem()
    a.makedirs("/run")
    a.write_file("/run/f", [b"x"])
    assert not b.exists("/run/f")
    assert a.identity("/run") != b.identity("/run")


def test_a_full_device_fails_the_write_naming_the_file_and_keeps_the_old_content(tmp_path):
    fs = FullDiskFS(budget=10)
    path = str(tmp_path / "doc.json")
    fs.atomic_write(path, b"old")
    with pytest.raises(CheckpointWriteError, match=r"no space left writing .*doc\.json"):
        fs.atomic_write(path, b"much more than the device holds")
    assert fs.read_bytes(path) == b"old"
    assert fs.listdir(str(tmp_path)) == ["doc.json"]


# -- a whole job on the in-memory backend ------------------------------------------------------
def test_save_latest_load_and_lease_on_a_memory_store(tmp_path):
    fs = MemoryFileSystem()
    store = Store("/jobs/run", fs=fs)
    model = torch.nn.Linear(3, 2)
    state = {"model": model.state_dict(), "step": 7}
    row = distckpt.save(state, store, step=7)
    distckpt.storage.lease.release(store)  # the lease that save took for this job
    assert distckpt.latest(store) == row
    assert distckpt.latest(Store("/jobs/run", fs=fs)) == row  # another handle, same backend

    target = {"model": torch.nn.Linear(3, 2).state_dict(), "step": 0}
    assert distckpt.load(target, store) == row
    assert target["step"] == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(target["model"][name], tensor)
    assert store.disk_usage(row) == fs.disk_usage(store.row_dir(row)) > 0

    with Lease.acquire(store, job_id=None) as lease:
        assert fs.exists(os.path.join(store.path, LEASE_FILE))
        assert lease_status(store).held
        with pytest.raises(LeaseHeldError):
            Lease.acquire(Store("/jobs/run", fs=fs), job_id=None)
        lease.renew()
    assert lease_status(store).state == "free"
    assert not fs.exists(os.path.join(store.path, LOCK_FILE))

    # Nothing of it reached the local disk: the path exists only in the memory backend.
    assert not os.path.exists("/jobs/run")
    assert os.listdir(tmp_path) == []


class NoHardLinks(LocalFileSystem):
    """A filesystem that refuses hard links (as some FUSE and parallel filesystems do)."""

    def link(self, src: str, dst: str) -> None:
        raise PermissionError(errno.EPERM, "hard links not supported", dst)


def test_publish_exclusive_without_hard_links_still_never_replaces(tmp_path):
    fs = NoHardLinks()
    path = str(tmp_path / "manifest.json")
    fs.publish_exclusive(path, b"committed")
    with pytest.raises(FileExistsError):
        fs.publish_exclusive(path, b"a second writer")
    assert fs.read_bytes(path) == b"committed"
    assert os.listdir(tmp_path) == ["manifest.json"]
