"""A store edited by a hostile user or broken by a failing disk: each case a clear distckpt
error (the CLI a documented exit status, one line, no traceback) or a fallback to an intact
row; never a hang, an internal exception, a wrong value, or data touched outside the store.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from faultlib import FailingFS, deadline, same

import distckpt
from distckpt.cli import EXIT_NO_ROW, EXIT_STORE, cli
from distckpt.dist.election import row_status
from distckpt.format import checked
from distckpt.format.layout import parse_manifest_name, parse_row_name
from distckpt.format.manifest import InvalidManifest, RankManifest
from distckpt.storage.lease import LOCK_FILE, Lease
from distckpt.storage.store import Store


def _values(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"m": {"a": torch.randn(2, 3, generator=g), "b": torch.randn(2, 3, generator=g)}}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    for i in range(2):
        distckpt.save(_values(i), path, step=i)
    distckpt.storage.lease.release(path)
    return path


def _manifest(store: Path, row: int) -> Path:
    return store / "rows" / f"{row:012d}" / "manifests" / "rank_000000.json"


def _edit(store: Path, row: int, change, *, reseal: bool = True) -> None:
    path = _manifest(store, row)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_bytes(checked.seal(doc) if reseal else json.dumps(doc).encode())


def _cli(*args: object):
    with deadline():
        return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_clean_failure(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    for needle in needles:
        assert needle in result.output


def _loads_row_0(store: Path) -> None:
    out = {"m": {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}}
    assert distckpt.load(out, store) == 0
    assert same(out, _values(0))


# -- self-verifying manifests ----------------------------------------------------------------
def test_an_edited_manifest_fails_its_checksum_and_the_older_row_is_elected(store):
    _edit(store, 1, lambda d: d.__setitem__("write_count", 5), reseal=False)
    status = row_status(Store(store), 1)
    assert not status.committed and "fails its checksum" in status.problems[0]
    assert "rank_000000.json" in status.problems[0]
    _loads_row_0(store)
    result = _cli("verify", store, "1")
    _assert_clean_failure(result, 5, "fails its checksum", "rank_000000.json")


def test_manifests_carry_a_checksum_and_old_ones_without_still_parse(store):
    raw = _manifest(store, 1).read_bytes()
    assert json.loads(raw)[checked.CHECKSUM_KEY].startswith("crc32c:")
    doc = json.loads(raw)
    del doc[checked.CHECKSUM_KEY]  # as release 0.1 wrote them
    legacy = RankManifest.from_json(json.dumps(doc).encode())
    assert legacy == RankManifest.from_json(raw)


def test_duplicate_json_keys_are_refused(store):
    path = _manifest(store, 1)
    text = path.read_text()
    path.write_text(text[:-1] + ',"write_count":5}')
    with pytest.raises(InvalidManifest, match="'write_count' twice"):
        Store(store).read_manifest(1, 0)
    _loads_row_0(store)


def test_swapped_tensor_references_are_refused_even_when_resealed(store):
    def swap(doc):
        items = doc["states"]["m"]["tree"]["dict"]
        items[0][1], items[1][1] = items[1][1], items[0][1]

    _edit(store, 1, swap)
    with pytest.raises(InvalidManifest, match="swapped"):
        Store(store).read_manifest(1, 0)
    _loads_row_0(store)


@pytest.mark.parametrize(
    "field,value",
    [
        ("world_size", 10**30),
        ("world_size", 2**40),
        ("rank", -1),
        ("row", 10**13),
        ("write_count", 2.0),
        ("created", None),
    ],
)
def test_numbers_out_of_range_uncommit_the_row_without_spinning(store, field, value):
    _edit(store, 1, lambda d: d.__setitem__(field, value))
    with deadline():  # a loop over range(world_size) would never end
        assert distckpt.latest(store) == 0
        for command in ("ls", "latest", "show", "verify"):
            assert _cli(command, store).exit_code in (0, 5)
    _loads_row_0(store)


@pytest.mark.parametrize(
    "change",
    [
        {"shape": [2**62, 2**62]},
        {"shape": [-2, 3]},
        {"nbytes": 0},
        {"nbytes": 10**20},
        {"offset": 2**70},
        {"dtype": "object"},
        {"crc32c": -5},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())[:30],
)
def test_array_entries_are_range_checked_before_anything_is_allocated(store, change):
    _edit(store, 1, lambda d: d["arrays"][0].update(change))
    with pytest.raises(InvalidManifest):
        Store(store).read_manifest(1, 0)
    _loads_row_0(store)
    result = _cli("show", store, "1")  # describes the row as not committed, and why
    assert result.exit_code in (0, EXIT_NO_ROW, EXIT_STORE, 5), result.output
    assert "Traceback" not in result.output and "rank_000000.json" in result.output


@pytest.mark.parametrize(
    "tree",
    [
        {"dict": [["a", {"tensor": "0"}]]},
        {"dict": [["a", {"v": [1, 2]}]]},
        {"timedelta": ["x", 0, 0]},
        {"np_scalar": ["<f8"]},
        {"dict": [["a", {"v": 1}], ["a", {"v": 2}]]},
        {"list": [{"v": 1}, {"tensor": 99}]},
        {"tuple": {"not": "a list"}},
    ],
)
def test_malformed_state_trees_name_the_file_not_a_type_error(store, tree):
    _edit(store, 1, lambda d: d["states"]["m"].__setitem__("tree", tree))
    with pytest.raises(distckpt.CheckpointError) as info:
        distckpt.load({}, store, row=1)
    assert "rank_000000.json" in str(info.value) or "row 1" in str(info.value)
    _loads_row_0(store)


def test_decoding_a_malformed_tree_is_a_distckpt_error():
    from distckpt.format import tree as codec

    for node in ({"timedelta": ["x", 0, 0]}, {"np_scalar": ["<f8"]}, {"size": "abc"}, [1]):
        with pytest.raises(distckpt.errors.MalformedStateError):
            codec.decode(node, lambda i, n: None)


# -- names -----------------------------------------------------------------------------------
def test_unicode_digit_names_are_not_rows_or_ranks(store):
    assert (
        parse_row_name("00000000000²") is None and parse_row_name("\u0660" * 11 + "\u0661") is None
    )
    assert parse_manifest_name("rank_²².json") is None and parse_manifest_name("rank_7.json") == 7
    (store / "rows" / "00000000000²").mkdir()
    shutil.copy(_manifest(store, 1), _manifest(store, 1).parent / "rank_²².json")
    assert distckpt.latest(store) == 1
    _cli_ok = _cli("ls", store)
    assert _cli_ok.exit_code == 0, _cli_ok.output


def test_a_full_row_space_is_refused_not_written_past(store):
    (store / "rows" / "999999999999").mkdir()
    with pytest.raises(distckpt.CheckpointWriteError, match="row space"):
        distckpt.save(_values(5), store)
    distckpt.storage.lease.release(store)
    assert sorted(os.listdir(store / "rows")) == [
        "000000000000",
        "000000000001",
        "999999999999",
        "zarr.json",
    ]


# -- special files and layouts ---------------------------------------------------------------
@pytest.mark.parametrize("what", ["manifest", "root zarr.json"])
def test_fifos_and_links_to_fifos_never_block_readers(store, tmp_path, what):
    target = _manifest(store, 1) if what == "manifest" else store / "zarr.json"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target.unlink()
    target.symlink_to(fifo)
    with deadline():
        if what == "manifest":
            _loads_row_0(store)
            result = _cli("verify", store, "1")
            _assert_clean_failure(result, 5, "symbolic link")
        else:
            with pytest.raises(distckpt.StoreFormatError, match=r"zarr\.json"):
                distckpt.latest(store)
            _assert_clean_failure(_cli("ls", store), EXIT_STORE, "zarr.json")
        target.unlink()
        os.mkfifo(target)
        if what == "manifest":
            _loads_row_0(store)
        else:
            with pytest.raises(distckpt.StoreFormatError, match="FIFO"):
                distckpt.latest(store)


def test_a_store_that_is_a_file_or_whose_rows_is_a_file(tmp_path, store):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(distckpt.StoreFormatError, match="not a directory"):
        distckpt.latest(a_file)
    shutil.rmtree(store / "rows")
    (store / "rows").write_text("x")
    with pytest.raises(distckpt.StoreFormatError, match="rows is not a directory"):
        distckpt.latest(store)
    _assert_clean_failure(_cli("latest", store), EXIT_STORE, "not a directory")


def test_a_store_that_lost_its_root_document_is_damaged_not_empty(store):
    (store / "zarr.json").unlink()
    with pytest.raises(distckpt.StoreFormatError, match="damaged"):
        distckpt.latest(store)
    with pytest.raises(distckpt.StoreFormatError, match="damaged"):
        distckpt.save(_values(3), store)
    _assert_clean_failure(_cli("latest", store), EXIT_STORE, "damaged")


# -- the lease -------------------------------------------------------------------------------
def test_a_lease_lock_that_is_not_json_is_a_clear_error_at_once(store):
    (store / LOCK_FILE).write_text("this is not json")
    # With an hour before the lock counts as stale, only an answer at once passes.
    with deadline(), pytest.raises(distckpt.StoreFormatError, match=LOCK_FILE):
        Lease.acquire(store, lock_wait_s=3600, lock_stale_s=3600)


def test_lease_release_on_a_full_disk_names_the_path(store):
    fs = FailingFS(errno.ENOSPC, None, ops=["remove"])
    lease = Lease.acquire(Store(store, fs))
    fs.fail_at = fs.calls + 1  # the first removal: the lock's, or the lease file's
    with pytest.raises(distckpt.CheckpointWriteError, match=str(store)):
        lease.release()


def test_lease_release_without_room_for_its_lock_still_frees_the_lease(store):
    fs = FailingFS(errno.ENOSPC, None, ops=["create_exclusive"])
    lease = Lease.acquire(Store(store, fs))
    fs.fail_at = fs.calls + 1
    lease.release()
    assert not (store / "lease.json").exists()
