"""Global (sharded) tensors: N ranks save one logical tensor, any M ranks restore any layout.

Real torchrun jobs run ``tests/workers/global_worker.py``; every check there is bit-exact
against the tensor's regenerated full value. Layout checks that need no processes run here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr
from multiproc import WORKERS, LaunchResult, run_torchrun

import distckpt
from distckpt import Store
from distckpt.errors import (
    CheckpointSerializationError,
    CorruptCheckpointError,
    CorruptChunkError,
)
from distckpt.format.layout import MANIFEST_VERSION
from distckpt.format.names import escape_component
from distckpt.format.shards import Box, chunk_shape, plan_layouts
from distckpt.interchange import export_row
from distckpt.io import dataio
from distckpt.io.globalio import GlobalReader
from distckpt.io.verify import check_manifest, read_rank

WORKER = WORKERS / "global_worker.py"
TEST_TIMEOUT = 400
multiproc = pytest.mark.multiproc

_spec = importlib.util.spec_from_file_location("global_worker", WORKER)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def launch(nproc: int, store: Path, mode: str, env: dict[str, str] | None = None) -> LaunchResult:
    return run_torchrun(nproc, WORKER, [str(store), mode], env=env, timeout=120)


def restored(result: LaunchResult, nproc: int, row: int) -> None:
    result.check()
    assert result.ranks(f"RESTORE OK row={row} ") == list(range(nproc)), result.describe()


def writers(result: LaunchResult) -> dict[str, list[int]]:
    found = (
        re.match(r"WRITERS key=(\S+) ranks=\[([\d, ]*)\]", x) for x in result.stdout.splitlines()
    )
    return {m.group(1): [int(r) for r in m.group(2).split(",")] for m in found if m}


def written_bytes(result: LaunchResult) -> tuple[int, int]:
    (line,) = result.lines("BYTES ")
    m = re.match(r"BYTES written=(\d+) logical=(\d+)", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.long  # the 2->3 and 3->2 reshards of tests/test_format2.py run by default
def test_two_ranks_save_one_three_and_four_restore(tmp_path):
    store = tmp_path / "store"
    saved = launch(2, store, "save").check()
    written, logical = written_bytes(saved)
    assert written == logical  # each piece once, no per-rank copies
    who = writers(saved)
    assert len(who["model/b"]) == 1 and len(who["model/b2"]) == 1  # replicas written once
    assert who["model/b"] != who["model/b2"]  # ... and spread over the ranks
    assert who["model/w"] == [0, 1]
    # Plain zarr readers see the full logical tensor in the exported per-tensor view.
    view = tmp_path / "view"
    export_row(store, view, format="zarr")
    for name in ("w", "b2", "rep2d"):
        shape, dtype = worker.TENSORS[name]
        want = worker.full(name, shape, dtype).numpy()
        path = view / escape_component(f"model/{name}")
        np.testing.assert_array_equal(np.asarray(zarr.open_array(str(path), mode="r")[...]), want)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), want)
    # bfloat16: raw 16-bit words, the true dtype in the attributes (as for rank arrays).
    epath = view / escape_component("model/e")
    bits = np.asarray(zarr.open_array(str(epath), mode="r")[...])
    want_e = worker.full("e", *worker.TENSORS["e"])
    assert torch.equal(
        torch.from_numpy(bits.astype(np.int32)).to(torch.int16).view(torch.bfloat16), want_e
    )
    for nproc in (1, 3, 4):  # other sizes, other placements; 1 rank into plain tensors
        restored(launch(nproc, store, "restore"), nproc, 0)


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
def test_four_ranks_on_a_2d_mesh_save_two_restore(tmp_path):
    store = tmp_path / "store"
    saved = launch(4, store, "save").check()
    assert written_bytes(saved)[0] == written_bytes(saved)[1]
    who = writers(saved)
    assert len(who["model/b"]) == 1 and len(who["model/b2"]) == 1
    assert who["model/b"] != who["model/b2"]
    assert len(who["model/rep2d"]) == 2  # Replicate x Shard(0): one writer per shard
    assert who["model/grid"] == [0, 1, 2, 3]
    restored(launch(2, store, "restore"), 2, 0)


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
def test_fsdp2_model_and_optimizer_saved_at_two_restore_at_four(tmp_path):
    store = tmp_path / "store"
    saved = launch(2, store, "fsdp-save").check()
    loaded = launch(4, store, "fsdp-restore").check()
    want = sorted(x.split()[1] for x in saved.lines("DIGEST "))
    assert want and sorted(x.split()[1] for x in loaded.lines("DIGEST ")) == want
    fresh = sorted(x.split()[1] for x in loaded.lines("FRESH "))
    assert len(fresh) == len(want) and set(fresh) != set(want)  # the restore changed them


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
def test_a_damaged_block_checked_by_one_band_reader_fails_every_rank(tmp_path):
    """Row pieces restored as column bands (w: Shard(0) -> Shard(1)): each checksum block
    is checked by one of the ranks reading it, and a damaged one still fails the load on
    every rank before any live tensor is touched."""
    store = tmp_path / "store"
    launch(2, store, "save").check()
    st = Store(store)
    (g,) = [g for g in st.read_manifest(0, 1).globals if g.name == "model/w"]
    assert g.pieces
    path = Path(st.data_file(0, 1))
    data = bytearray(path.read_bytes())
    data[g.pieces[0].offset + 3] ^= 0x10
    path.write_bytes(bytes(data))
    refused = launch(2, store, "restore-corrupt").check()
    assert refused.ranks("REFUSED untouched=True ") == [0, 1], refused.describe()


@multiproc
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.long  # tests/test_async_kill.py kills a DTensor save mid-row by default
def test_killed_global_save_leaves_the_previous_row_elected(tmp_path):
    store = tmp_path / "store"
    launch(2, store, "save").check()
    crashed = launch(2, store, "save", env={"DISTCKPT_FAULT": "after_data@1"})
    assert crashed.returncode != 0
    assert distckpt.latest(store) == 0
    restored(launch(3, store, "restore"), 3, 0)


@multiproc
@pytest.mark.cuda
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dtensors_over_nccl_save_and_restore_across_layouts(tmp_path):
    gpus = min(torch.cuda.device_count(), 2)  # NCCL needs one GPU per rank
    on_gpu, on_cpu = tmp_path / "gpu", tmp_path / "cpu"
    launch(gpus, on_gpu, "cuda-save").check()
    restored(launch(2, on_gpu, "restore"), 2, 0)  # CUDA-saved, restored on CPU ranks
    launch(2, on_cpu, "save").check()
    restored(launch(gpus, on_cpu, "cuda-restore"), gpus, 0)  # into CUDA DTensors


# -- layouts, without processes ----------------------------------------------------------------
def report(shape, box, dtype="float32"):
    return {"key": "model/w", "shape": list(shape), "dtype": dtype, "box": box}


def test_overlapping_shards_name_the_tensor_and_ranks():
    reports = [[report((8,), [[0], [5]])], [report((8,), [[4], [4]])]]
    with pytest.raises(
        CheckpointSerializationError, match=r"'model/w'.*ranks \[0\].*ranks \[1\].*overlap"
    ):
        plan_layouts(reports, {"float32": 4})


def test_a_gap_between_shards_names_the_tensor_and_ranks():
    reports = [[report((8,), [[0], [3]])], [report((8,), [[4], [4]])]]
    with pytest.raises(
        CheckpointSerializationError, match=r"'model/w'.*ranks \[0, 1\] cover 7 of its 8"
    ):
        plan_layouts(reports, {"float32": 4})


def test_replicas_are_written_once_and_spread():
    reports = [
        [report((4,), [[0], [4]]) | {"key": k} for k in ("a", "b", "c", "d")] for _ in range(2)
    ]
    layouts = plan_layouts(reports, {"float32": 4})
    assert [len(lay.regions) for lay in layouts.values()] == [1, 1, 1, 1]
    assert sorted(lay.regions[0].writer for lay in layouts.values()) == [0, 0, 1, 1]


def test_chunks_follow_the_shards_and_divide_the_tensor():
    # torch's uneven split of 10 rows over 3 ranks: 4, 4, 2
    boxes = [Box((0, 0), (4, 6)), Box((4, 0), (4, 6)), Box((8, 0), (2, 6))]
    chunk = chunk_shape((10, 6), boxes, 4)
    assert chunk == (2, 6)
    # large shards are split into chunks of at most the target size
    big = chunk_shape(
        (4096, 4096), [Box((0, 0), (2048, 4096)), Box((2048, 0), (2048, 4096))], 4, target=1 << 20
    )
    assert 2048 % big[0] == 0 and 4096 % big[1] == 0 and big[0] * big[1] * 4 <= 1 << 20


def test_one_rank_round_trip_into_explicit_shards_of_another_split(tmp_path):
    value = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    distckpt.save({"w": distckpt.Sharded(value, (4, 3), (0, 0))}, tmp_path)
    doc = json.loads(Path(Store(tmp_path).manifest_path(0, 0)).read_bytes())
    assert doc["distckpt_manifest"] == MANIFEST_VERSION and doc["globals"][0]["name"] == "w"
    piece = distckpt.Sharded(torch.zeros(2, 2), (4, 3), (1, 1))
    plain = {"w": torch.zeros(4, 3)}
    distckpt.load({"w": piece}, tmp_path)
    distckpt.load(plain, tmp_path)
    assert torch.equal(piece.local, value[1:3, 1:3])
    assert torch.equal(plain["w"], value)


def test_a_save_whose_shards_leave_a_gap_is_refused(tmp_path):
    half = distckpt.Sharded(torch.ones(2), (4,), (0,))
    with pytest.raises(CheckpointSerializationError, match=r"'w'.*cover 2 of its 4"):
        distckpt.save({"w": half}, tmp_path)
    assert distckpt.latest(tmp_path) is None


def _piece_file(store: Path) -> tuple[Path, int]:
    """Rank 0's data file of row 0 and the byte offset of its piece of 'w'."""
    (g,) = Store(store).read_manifest(0, 0).globals
    assert g.pieces is not None
    (pc,) = g.pieces
    return Path(Store(store).data_file(0, 0)), pc.offset


def test_a_corrupt_global_piece_names_the_array_and_piece(tmp_path):
    distckpt.save({"w": distckpt.Sharded(torch.ones(4, 2), (4, 2), (0, 0))}, tmp_path)
    data_file, offset = _piece_file(tmp_path)
    data = bytearray(data_file.read_bytes())
    data[offset] ^= 1
    data_file.write_bytes(bytes(data))
    with pytest.raises(
        CorruptCheckpointError, match=r"global array 'w', piece at \(0, 0\).*checksum"
    ):
        distckpt.load({"w": torch.zeros(4, 2)}, tmp_path)


def test_column_bands_of_a_tiled_load_check_each_block_exactly_once(tmp_path, monkeypatch):
    """Ranks whose regions tile an array (a DTensor's) share its checks: each checksum
    block is checked by exactly one band reader, spread over them; an untiled reader (a
    ``Sharded`` target, which promises no cover) checks every block it reads."""
    monkeypatch.setattr(dataio, "BLOCK_BYTES", 256)  # 4-row blocks of 64-byte rows
    value = torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16)
    distckpt.save({"w": distckpt.Sharded(value, (64, 16), (0, 0))}, tmp_path)
    st = Store(tmp_path)
    (entry,) = st.read_manifest(0, 0).globals
    assert entry.pieces is not None
    (pc,) = entry.pieces
    assert len(pc.crcs) == 16
    path = Path(st.data_file(0, 0))
    clean = path.read_bytes()
    bands = [Box((0, 4 * k), (64, 4)) for k in range(4)]

    def failing(block: int, tiled: bool) -> list[int]:
        data = bytearray(clean)
        data[pc.offset + block * 256 + 7] ^= 1  # a byte of the block outside some bands
        path.write_bytes(bytes(data))
        out = []
        for k, band in enumerate(bands):
            reader = GlobalReader(st, 0, 1)
            try:
                reader.verify(entry, band, tiled=tiled)
            except CorruptChunkError:
                out.append(k)
            finally:
                reader.close()
        return out

    checker = {}
    for block in range(16):
        (checker[block],) = failing(block, tiled=True)
        assert failing(block, tiled=False) == [0, 1, 2, 3]
    assert len(set(checker.values())) > 1  # spread, not all on one rank
    path.write_bytes(clean)
    for band in bands:  # the bytes each band reads after the shared check are the saved ones
        out = torch.zeros(band.lengths)
        reader = GlobalReader(st, 0, 1)
        reader.verify(entry, band, tiled=True)
        reader.read(entry, band, out, verified=True)
        reader.close()
        assert torch.equal(out, value[band.slices((0, 0))])


def test_verify_rereads_the_global_pieces_each_rank_wrote(tmp_path):
    distckpt.save({"w": distckpt.Sharded(torch.ones(4, 2), (4, 2), (0, 0))}, tmp_path)
    st = Store(tmp_path)
    manifest = st.read_manifest(0, 0)
    assert check_manifest(st, manifest) == [] and read_rank(st, manifest)[0] == []
    data_file, offset = _piece_file(tmp_path)
    data = bytearray(data_file.read_bytes())
    data[offset + 5] ^= 4
    data_file.write_bytes(bytes(data))
    (problem,) = read_rank(st, manifest)[0]
    assert problem.array == "w" and "piece at (0, 0)" in problem.problem


def test_empty_and_scalar_global_tensors_round_trip(tmp_path):
    state = {
        "empty": distckpt.Sharded(torch.zeros(0, 4), (0, 4), (0, 0)),
        "scalar": distckpt.Sharded(torch.tensor(3.5), (), ()),
    }
    distckpt.save(state, tmp_path)
    target = {"empty": torch.ones(0, 4), "scalar": torch.tensor(0.0)}
    distckpt.load(target, tmp_path)
    assert target["empty"].shape == (0, 4) and target["scalar"].item() == 3.5
    (entry,) = [g for g in Store(tmp_path).read_manifest(0, 0).globals if g.name == "scalar"]
    assert entry.pieces is not None
    (pc,) = entry.pieces
    data = zarr.open_array(Store(tmp_path).data_dir(0), mode="r")[0]
    assert float(np.frombuffer(data[pc.offset : pc.offset + 4].tobytes(), np.float32)[0]) == 3.5
