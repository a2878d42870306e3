"""Checkpoints on S3 object storage, against a real server (SeaweedFS, ``tests/s3server.py``).

Round trips through every entry point given an ``s3://`` URL (save, load, latest,
AsyncSaver, Checkpoint, the CLI), the commit protocol's conditional writes (a second writer
cannot replace a committed manifest; a server that ignores the conditions is refused),
corrupt objects, zarr-python reading the saved arrays straight from S3, and real torchrun
jobs: SIGKILL mid-row, restore at another world size, the server vanishing mid-save.
The FileSystem contract suite runs against the same server in ``test_fs_contract.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from multiproc import WORKERS, run_torchrun
from test_multiproc import ROWS, assert_every_rank, run_worker

import distckpt
from distckpt import Store
from distckpt.cli import cli as cli_group
from distckpt.errors import (
    CorruptCheckpointError,
    LeaseHeldError,
    UnsupportedStorageError,
)
from distckpt.storage import lease
from distckpt.storage.resolve import filesystem_for
from distckpt.storage.s3 import S3FileSystem

LAUNCH_TIMEOUT = 120.0
multiproc = pytest.mark.multiproc


def model_state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "big": torch.randn(512, 1024, generator=g),  # 2 MiB: its own zarr array
            "small": torch.randint(0, 100, (7,), generator=g),  # packed
        },
        "step": seed,
    }


def assert_same(a: dict, b: dict) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    assert a["step"] == b["step"]


def empty_like(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": -1}


def test_s3_urls_resolve_to_the_s3_backend_and_other_paths_stay_local(s3_env, tmp_path):
    url = s3_env.url()
    fs = filesystem_for(url)
    assert isinstance(fs, S3FileSystem) and fs.bucket == s3_env.bucket
    assert fs.endpoint == s3_env.endpoint  # from AWS_ENDPOINT_URL
    assert filesystem_for(url + "/other") is fs  # one client per bucket and configuration
    explicit = filesystem_for(url, {"max_retries": 1})
    assert explicit is not fs and isinstance(explicit, S3FileSystem)
    assert Store(url + "/").path == url
    assert not isinstance(Store(tmp_path).fs, S3FileSystem)
    with pytest.raises(ValueError, match="s3://"):
        filesystem_for(tmp_path, {"region": "x"})


def test_large_objects_go_up_in_parts_and_come_back_in_parallel_ranges(s3_server):
    """Multipart PUT straight from tensor memory and ranged GETs in parallel, at the small
    part size S3 allows (5 MiB), so a 12 MiB tensor takes 3 parts and 3 ranges."""
    part = 5 << 20
    fs = S3FileSystem(s3_server.bucket, {**s3_server.storage_options, "multipart_chunk_size": part})
    tensor = torch.randn(3 << 20, generator=torch.Generator().manual_seed(0))  # 12 MiB
    raw = tensor.numpy().tobytes()
    path = s3_server.url() + "/big"
    assert fs.write_file(path, [b"head", memoryview(tensor.numpy())]) == 4 + len(raw)
    assert fs.size(path) == 4 + len(raw)
    back = torch.empty_like(tensor)
    assert fs.read_into(path, memoryview(back.numpy()).cast("B"), 4) == len(raw)
    assert torch.equal(back, tensor)
    head, body = bytearray(4), torch.empty_like(tensor)  # parts filled across the ranges
    parts = [memoryview(head), memoryview(body.numpy()).cast("B")]
    assert fs.read_into_parts(path, parts) == 4 + len(raw)
    assert bytes(head) == b"head" and torch.equal(body, tensor)
    tail = bytearray(len(raw))  # a long read running past the end stops there
    assert fs.read_into(path, memoryview(tail), 4 + part) == len(raw) - part
    assert bytes(tail[: len(raw) - part]) == raw[part:]


def test_save_latest_load_and_async_saver_on_an_s3_url(s3_env):
    url = s3_env.url()
    first, second = model_state(1), model_state(2)
    assert distckpt.save(first, url, note="first") == 0
    assert distckpt.metadata(url)["note"] == "first"
    assert distckpt.save(second, url, keep=1) == 1
    lease.release(url)
    assert distckpt.latest(url) == 1
    target = empty_like(second)
    assert distckpt.load(target, url) == 1
    assert_same(second, target)
    st = Store(url)
    assert [r for r in st.rows() if st.manifest_ranks(r)] == [1]  # keep=1 removed row 0
    assert not st.fs.exists(st.manifest_path(0, 0))

    with distckpt.AsyncSaver(url) as saver:
        saver.save(model_state(3))
        assert saver.wait() == 2
    target = empty_like(second)
    assert distckpt.load(target, Store(url, storage_options=s3_env.storage_options)) == 2
    assert_same(model_state(3), target)
    # No lock file on object storage: the lease lives by conditional writes on its ETag.
    assert not st.fs.exists(os.path.join(url, lease.LOCK_FILE))


@dataclasses.dataclass
class Field:
    grid: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4, 4))
    step: int = 0


def test_checkpoint_sessions_on_an_s3_url(s3_env):
    url = s3_env.url()
    with distckpt.Checkpoint("run", path=url) as session:
        state = distckpt.bind_checkpoint_state(Field())
        for i in range(2):
            state.grid = torch.full((4, 4), float(i))
            state.step = i
            session.write(lead_time=i)
    ck = distckpt.Checkpoint("run", path=url)
    assert ck.path == url and isinstance(ck.store.fs, S3FileSystem)
    with ck as session:
        assert session.write_count == 2
        live = Field()
        distckpt.bind_checkpoint_state(live)
        assert live.step == 1 and torch.equal(live.grid, torch.full((4, 4), 1.0))


_NO_TORCH = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
from distckpt.cli import main
main()
"""


def test_cli_reads_an_s3_store_without_importing_torch(s3_env):
    url = s3_env.url()
    distckpt.save(model_state(1), url)
    distckpt.save(model_state(2), url)
    lease.release(url)
    env = {**os.environ, **s3_env.env}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, "ls", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr
    assert "1" in proc.stdout and url in proc.stdout
    runner = CliRunner()
    latest = runner.invoke(cli_group, ["latest", url])
    assert latest.exit_code == 0 and latest.output.strip().endswith("1"), latest.output
    show = runner.invoke(cli_group, ["show", url, "--json"])
    assert show.exit_code == 0, show.output
    assert json.loads(show.output)["row"] == 1
    verify = runner.invoke(cli_group, ["verify", url, "--all"])
    assert verify.exit_code == 0, verify.output


def test_a_second_writer_can_never_replace_a_committed_manifest_or_take_the_lease(s3_env):
    url = s3_env.url()
    distckpt.save(model_state(1), url)  # this process now holds the writer lease
    st = Store(url)
    path = st.manifest_path(0, 0)
    committed = st.fs.read_bytes(path)
    with pytest.raises(FileExistsError):
        st.fs.publish_exclusive(path, b'{"forged": true}')
    assert st.fs.read_bytes(path) == committed
    # Another job (another lease holder) is refused while the lease is live.
    with pytest.raises(LeaseHeldError, match="leased by"):
        lease.Lease.acquire(Store(url, storage_options=s3_env.storage_options), job_id="other")
    lease.release(url)
    with lease.Lease.acquire(url, job_id="other") as taken:
        taken.renew()
        assert lease.lease_status(url).holder.token == taken.token


class IgnoresConditions(S3FileSystem):
    """A server that ignores If-None-Match and If-Match: every PUT overwrites."""

    def _put(self, key, parts, mode=None):
        return super()._put(key, parts, None)


def test_a_server_without_conditional_writes_is_refused_at_the_first_save(s3_env):
    url = s3_env.url()
    fs = IgnoresConditions(s3_env.bucket, s3_env.storage_options)
    with pytest.raises(UnsupportedStorageError, match=r"If-None-Match") as err:
        distckpt.save(model_state(1), Store(url, fs=fs))
    cause = err.value.__cause__  # the coordinator's own error, with its fields
    assert isinstance(cause, UnsupportedStorageError) and cause.feature == "If-None-Match: *"
    assert Store(url, fs=fs).rows() == []  # refused before any row was opened


def test_corrupt_and_truncated_objects_are_clear_errors(s3_env):
    url = s3_env.url()
    distckpt.save(model_state(1), url)
    distckpt.save(model_state(2), url)
    lease.release(url)
    st = Store(url)
    entry = next(a for a in st.read_manifest(1, 0).arrays if a.name == "model/big")
    # The tensor is a byte range of its rank's shard of the row's data array.
    chunk = st.data_file(1, 0)
    data = bytearray(st.fs.read_bytes(chunk))
    data[entry.offset + 100] ^= 0xFF
    st.fs.write_file(chunk, [data])
    with pytest.raises(CorruptCheckpointError, match="model/big"):
        distckpt.load(empty_like(model_state(2)), url, fallback=False)
    # A truncated manifest uncommits its row: the previous row is elected.
    manifest = st.manifest_path(1, 0)
    st.fs.write_file(manifest, [st.fs.read_bytes(manifest)[:50]])
    assert distckpt.latest(url) == 0
    target = empty_like(model_state(1))
    assert distckpt.load(target, url) == 0
    assert_same(model_state(1), target)


def test_zarr_python_opens_the_saved_array_from_s3(s3_env):
    """The documented recipe: zarr's ObjectStore over obstore's S3Store, no distckpt."""
    import zarr
    from obstore.store import S3Store

    url = s3_env.url()
    state = model_state(5)
    distckpt.save(state, url)
    lease.release(url)
    st = Store(url)
    entry = next(a for a in st.read_manifest(0, 0).arrays if a.name == "model/big")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = S3Store(
        bucket,
        prefix=f"{prefix}/rows",
        endpoint=s3_env.endpoint,
        access_key_id="any",
        secret_access_key="any",
        region="us-east-1",
        client_options={"allow_http": True},
    )
    row = os.path.basename(st.row_dir(0))
    array = zarr.open_array(
        zarr.storage.ObjectStore(s3, read_only=True), path=f"{row}/{entry.array}"
    )
    # Row 0 of the row's data array (rank 0's bytes) holds the tensor at the manifest's range.
    got = np.asarray(array[0, entry.offset : entry.offset + entry.nbytes])
    assert got.tobytes() == state["model"]["big"].numpy().tobytes()


# -- real jobs ---------------------------------------------------------------------------------
@multiproc
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
def test_sigkill_of_one_rank_mid_row_elects_the_previous_row_on_s3(s3_env):
    """2 torchrun ranks; rank 1 is SIGKILLed after its data but before its manifest of the
    last row: the row is not committed and the previous one is elected."""
    url = s3_env.url()
    crash_row = ROWS - 1
    env = {**s3_env.env, "DISTCKPT_FAULT": f"after_data@1:{crash_row}"}
    crashed = run_worker("torchrun", 2, url, ROWS, "write", env=env)
    assert crashed.returncode != 0, crashed.describe()
    for row in range(crash_row):
        assert_every_rank(crashed, f"WROTE row={row} ", 2)
    assert 1 not in crashed.ranks(f"WROTE row={crash_row} ")
    st = Store(url)
    assert st.fs.exists(os.path.join(st.data_dir(crash_row), "zarr.json")), "no row made yet"
    assert 1 not in st.manifest_ranks(crash_row)
    assert distckpt.latest(url) == crash_row - 1
    assert st.manifest_ranks(crash_row - 1) == [0, 1]


def restore_at(nproc: int, url: str, env: dict[str, str]) -> None:
    result = run_torchrun(
        nproc, WORKERS / "global_worker.py", [url, "restore"], env=env, timeout=LAUNCH_TIMEOUT
    ).check()
    assert result.ranks("RESTORE OK row=0 ") == list(range(nproc)), result.describe()


@pytest.fixture(scope="module")
def global_row(s3_server) -> str:
    """A row of sharded (global) tensors written by 2 torchrun ranks to S3."""
    url = s3_server.url()
    run_torchrun(
        2, WORKERS / "global_worker.py", [url, "save"], env=s3_server.env, timeout=LAUNCH_TIMEOUT
    ).check()
    return url


@multiproc
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
def test_a_row_written_at_2_ranks_restores_at_1_from_s3(s3_server, global_row):
    restore_at(1, global_row, s3_server.env)


@multiproc
@pytest.mark.long
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
def test_a_row_written_at_2_ranks_restores_at_4_from_s3(s3_server, global_row):
    restore_at(4, global_row, s3_server.env)


@multiproc
@pytest.mark.timeout(int(3 * LAUNCH_TIMEOUT))
def test_a_server_that_disappears_mid_save_is_a_clear_error_on_every_rank(tmp_path):
    """A second server, killed by rank 0 while row 1's data is being written: both ranks
    raise a storage error naming the server (no hang: retries are bounded)."""
    from tests import s3server

    try:
        server = s3server.start(str(tmp_path / "weed"))
    except s3server.ServerUnavailable as exc:
        pytest.skip(f"no S3 server could start here: {exc}")
    try:
        result = run_torchrun(
            2,
            WORKERS / "s3_vanish_worker.py",
            [server.url(), str(server.process.pid)],
            env=server.env,
            timeout=LAUNCH_TIMEOUT,
        )
    finally:
        server.stop()
    assert result.ranks("WROTE row=0") == [0, 1], result.describe()
    assert result.ranks("FAILED ") == [0, 1], result.describe()
    for line in result.lines("FAILED "):
        assert server.endpoint in line and "row 1" in line, line
