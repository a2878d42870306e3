"""The commit protocol: a failed write raises, keeps earlier rows and commits nothing."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from fakes import FullDiskFS, RecordingFS, SequentialComm, save_as_ranks

import distckpt
from distckpt import Store
from distckpt.dist.election import elect_offline, row_status
from distckpt.dist.retention import rows_to_delete
from distckpt.format import checked
from distckpt.format.manifest import InvalidManifest
from distckpt.io.commit import delete_row


def _big_state(rank: int = 0) -> dict:
    return {"w": torch.arange(1 << 19, dtype=torch.float32) + rank, "step": rank}


def test_full_disk_raises_names_the_file_and_keeps_earlier_rows(tmp_path):
    path = tmp_path / "store"
    distckpt.save(_big_state(), path)
    fs = FullDiskFS(budget=4096)
    with pytest.raises(distckpt.CheckpointWriteError, match="no space left"):
        distckpt.save(_big_state(), Store(path, fs=fs))
    store = Store(path)
    assert elect_offline(store) == 0
    assert not row_status(store, 1).committed
    assert store.manifest_ranks(1) == []
    target = {"w": torch.zeros(1 << 19), "step": -1}
    assert distckpt.load(target, path) == 0
    assert torch.equal(target["w"], _big_state()["w"])


def test_unserializable_state_fails_before_anything_is_written(tmp_path):
    path = tmp_path / "store"
    distckpt.save({"a": 1}, path)
    with pytest.raises(distckpt.CheckpointSerializationError, match="'bad'"):
        distckpt.save({"bad": object()}, path)
    assert distckpt.latest(path) == 0
    assert Store(path).rows() == [0]


def test_failure_report_from_another_rank_makes_this_rank_raise(tmp_path):
    path = tmp_path / "store"

    class PeerFailed(SequentialComm):
        """Rank 1 reports a failure at the first agreement after rank 0 published."""

        def allgather(self, obj):
            result = super().allgather(obj)
            if obj is None and Store(path).manifest_ranks(1) == [0]:
                result[1] = {
                    "failure": {
                        "type": "OSError",
                        "class": "builtins:OSError",
                        "message": "peer disk failed",
                        "ours": False,
                    }
                }
            return result

    save_as_ranks(path, 2, lambda r: {"x": torch.ones(2) * r})
    with pytest.raises(
        distckpt.CheckpointWriteError, match="rank 1: OSError: peer disk failed"
    ) as e:
        distckpt.save({"x": torch.ones(2)}, path, comm=PeerFailed(0, 2))
    assert isinstance(e.value, distckpt.CollectiveStepError)
    assert e.value.step == "save.commit"
    assert e.value.failures == {1: distckpt.RankFailure("OSError", "peer disk failed", False)}
    store = Store(path)
    assert store.manifest_ranks(1) == []  # rank 0 retracted its own manifest
    assert elect_offline(store) == 0


def test_rows_are_never_rewritten_in_place(tmp_path):
    path = tmp_path / "store"
    distckpt.save({"a": 1}, path)
    distckpt.save({"a": 2}, path)
    with pytest.raises(distckpt.CheckpointWriteError, match="not newer"):
        distckpt.save({"a": 3}, path, row=1)
    assert distckpt.save({"a": 3}, path, row=10) == 10
    target = {"a": 0}
    distckpt.load(target, path)
    assert target["a"] == 3


def test_manifest_is_the_last_file_written(tmp_path):
    class Order(RecordingFS):
        def write_file(self, path, parts, *, durable=True):
            self.events.append(("write", path))
            return super().write_file(path, parts, durable=durable)

        def create_exclusive(self, path, data):
            self.events.append(("write", path))
            return super().create_exclusive(path, data)

        def fsync_dirs(self, paths):
            self.events.extend(("fsync_dir", p) for p in paths)
            return super().fsync_dirs(paths)

    fs = Order()
    distckpt.save(_big_state(), Store(tmp_path / "s", fs=fs))
    writes = [p for kind, p in fs.events if kind == "write"]
    final = os.path.join(tmp_path, "s", "rows", "000000000000", "manifests", "rank_000000.json")
    index_writes = [i for i, p in enumerate(writes) if "/.index.json." in p]
    # The data (fsynced), then the manifest under its final name (the rank's commit), then
    # the row index (the whole row's).
    assert writes[-2:] == [final, writes[index_writes[0]]] and len(index_writes) == 1
    data = Store(tmp_path / "s").data_file(0, 0)
    assert writes.index(data) < writes.index(final)
    # Between the last commit and the index, the coordinator makes the entries durable.
    events = fs.events[fs.events.index(("write", final)) :]
    synced = [p for kind, p in events if kind == "fsync_dir"]
    assert synced[:2] == [os.path.dirname(data), os.path.dirname(final)]
    leftovers = sorted(os.listdir(os.path.dirname(final)))
    assert leftovers == ["rank_000000.json", "zarr.json"]


def test_delete_row_removes_manifests_before_data(tmp_path):
    fs = RecordingFS()
    store = Store(tmp_path / "s", fs=fs)
    save_as_ranks(store, 2, lambda r: _big_state(r))
    fs.events.clear()
    delete_row(store, 0)
    kinds = [kind for kind, _ in fs.events]
    assert kinds.index("rmtree") > max(i for i, k in enumerate(kinds) if k == "remove")
    removed = [p for k, p in fs.events if k == "remove"]
    assert removed[0].endswith("/index.json")  # the row index first: it says "committed"
    assert all("/manifests/" in p for p in removed[1:])
    assert store.rows() == []


def test_retention_never_deletes_the_newest_committed_row_or_newer(tmp_path):
    store = Store(tmp_path / "s")
    for _ in range(4):
        distckpt.save({"a": 1}, store)
    # Row 4 is being written (no manifest yet); row 1 lost its manifest (garbage).
    os.makedirs(store.manifests_dir(4))
    os.remove(store.manifest_path(1, 0))
    assert rows_to_delete(store, keep=1) == [0, 1, 2]
    assert rows_to_delete(store, keep=2) == [0, 1]
    assert rows_to_delete(store, keep=None) == [1]
    assert 3 not in rows_to_delete(store, keep=1)
    assert 4 not in rows_to_delete(store, keep=1)


def test_keep_prunes_old_rows_after_a_save(tmp_path):
    path = tmp_path / "s"
    for i in range(5):
        distckpt.save({"i": i}, path, keep=2)
    assert Store(path).rows() == [3, 4]


def test_retention_with_keep_reads_only_the_rows_it_keeps(tmp_path, monkeypatch):
    """A commit's retention pass must not grow with the store's history."""
    store = Store(tmp_path / "s")
    for _ in range(12):
        distckpt.save({"a": 1}, store)
    read: list[int] = []
    original = Store.read_manifest

    def counting(self, row, rank):
        read.append(row)
        return original(self, row, rank)

    monkeypatch.setattr(Store, "read_manifest", counting)
    assert rows_to_delete(store, keep=2) == list(range(10))
    assert set(read) == {10, 11}


def test_a_store_handle_sees_a_manifest_that_changed_on_disk(tmp_path):
    """Parsed manifests are reused only while their bytes are unchanged: a handle kept
    across a retraction and a damaged rewrite reports what is on disk now."""
    path = tmp_path / "s"
    distckpt.save({"x": torch.ones(3)}, path, step=1)
    st = Store(path)
    first = st.read_manifest(0, 0)
    assert st.read_manifest(0, 0) == first
    manifest = st.manifest_path(0, 0)
    with open(manifest, "rb") as f:
        doc = json.loads(f.read())
    doc["write_count"] = 7
    with open(manifest, "wb") as f:
        f.write(checked.seal(doc))  # a consistent rewrite, checksum and all
    assert st.read_manifest(0, 0).write_count == 7
    os.remove(manifest)
    assert elect_offline(st) is None
    with pytest.raises(InvalidManifest, match="missing"):
        st.read_manifest(0, 0)


def _write_one_rank(tmp_path, checksums: bool):
    from distckpt.engine.steps import RowContent
    from distckpt.format.layout import shared_length
    from distckpt.io.commit import DataShape, prepare_row, write_rank
    from distckpt.io.dataio import bound_bytes
    from distckpt.plan.save import plan_rank

    store = Store(tmp_path / "store")
    store.create("")
    states = {"model": {"w": torch.arange(1 << 19, dtype=torch.float32)}, "opt": [torch.ones(3)]}
    plan = plan_rank(states, rank=0)
    data = DataShape(1, *shared_length(bound_bytes(plan)))
    prepare_row(store, 0, data)
    content = RowContent(states=states, schemas={}, metadata={"step": 3}, versions={"opt": 2})
    return store, plan, content, write_rank(store, plan, 0, 0, {}, data, checksums=checksums)


@pytest.mark.parametrize("checksums", [True, False])
def test_one_builder_makes_the_complete_manifest_from_the_plan_and_the_write(tmp_path, checksums):
    from distckpt.engine.steps import build_manifest
    from distckpt.io.commit import publish_rank
    from distckpt.io.digests import state_digests

    store, plan, content, written = _write_one_rank(tmp_path, checksums)
    manifest = build_manifest(plan, written, content, world_size=1, name="n")
    assert manifest.arrays == written.arrays and (manifest.row, manifest.rank) == (0, 0)
    assert [a.crc32c is not None for a in manifest.arrays] == [checksums] * len(plan.tensors)
    # Digests from the write's checksums equal digests computed from the bytes themselves.
    assert {s: r.digest for s, r in manifest.states.items()} == state_digests(plan)
    assert manifest.states["opt"].version == 2 and manifest.states["model"].version == 0
    publish_rank(store, written, manifest)
    assert store.read_manifest(0, 0) == manifest
    assert distckpt.metadata(store.path) == {"step": 3}


def test_publishing_a_manifest_that_does_not_list_the_written_data_is_refused(tmp_path):
    import dataclasses

    from distckpt.engine.steps import build_manifest
    from distckpt.io.commit import publish_rank

    store, plan, content, written = _write_one_rank(tmp_path, True)
    manifest = build_manifest(plan, written, content, world_size=1)
    stale = dataclasses.replace(manifest, arrays=manifest.arrays[:1])
    with pytest.raises(distckpt.CheckpointWriteError, match="row 0, rank 0"):
        publish_rank(store, written, stale)
    assert store.manifest_ranks(0) == []


@dataclasses.dataclass(frozen=True)
class EveryKth:
    """A policy written outside the library: every row whose id is a multiple of k."""

    k: int

    @property
    def horizon(self) -> int | None:
        return None

    def preserve(self, committed):
        return {r for r in committed if r % self.k == 0}


def test_retention_policies_compose_and_never_drop_the_newest_row(tmp_path):
    from distckpt.dist.retention import AnyOf, KeepLatest

    path = tmp_path / "s"
    policy = AnyOf((KeepLatest(2), EveryKth(3)))
    for i in range(8):
        distckpt.save({"i": i}, path, keep=policy)
    assert Store(path).rows() == [0, 3, 6, 7]
    assert rows_to_delete(Store(path), EveryKth(5)) == [3, 6]  # row 7, the newest, stays
    assert rows_to_delete(Store(path), KeepLatest(2)) == [0, 3]
    assert rows_to_delete(Store(path), 2) == [0, 3]  # keep=N means KeepLatest(N)


def test_every_writer_announces_its_commits_to_subscribers(tmp_path):
    from distckpt.engine import hooks

    seen: list[tuple[str, int]] = []
    unsubscribe = hooks.subscribe_commits(
        lambda e: seen.append((os.path.basename(e.store.path), e.row))
    )
    try:
        distckpt.save({"a": 1}, tmp_path / "api")
        with distckpt.AsyncSaver(tmp_path / "saver", keep=1) as saver:
            saver.save({"a": 1})
            saver.save({"a": 2})
            assert saver.wait() == 1 and saver.committed == [0, 1]
        for async_write in (False, True):
            name = f"c{int(async_write)}"
            with distckpt.Checkpoint(name, path=tmp_path / name, async_write=async_write) as s:
                s.write()
    finally:
        unsubscribe()
    assert seen == [("api", 0), ("saver", 0), ("saver", 1), ("c0", 0), ("c1", 0)]
    assert Store(tmp_path / "saver").rows() == [1]  # retention ran before the event
