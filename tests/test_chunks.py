"""The chunk codec (format/chunks.py): encoding, verified reads, and the fields of the errors
they raise, down to the public API (``load``) and ``distckpt verify --json``."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import crc32c
import pytest
import torch
from click.testing import CliRunner
from fakes import RecordingFS

import distckpt
from distckpt import Store
from distckpt.cli import cli
from distckpt.dist import step
from distckpt.dist.comm import RankInTurnComm
from distckpt.errors import CorruptCheckpointError, CorruptChunkError
from distckpt.format import chunks
from distckpt.format.chunks import TRAILER_BYTES, ChunkRef
from distckpt.format.manifest import ArrayEntry
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD
from distckpt.storage.filesystem import LocalFileSystem

ROW, RANK = 5, 2  # distinct, so a field holding one cannot pass for the other
DATA = bytes(range(256)) * 40


def ref_for(tmp_path: Path, array: str = "rank_000002/t00000-w", **kw: object) -> ChunkRef:
    args: dict[str, object] = {
        "store": str(tmp_path),
        "row": ROW,
        "rank": RANK,
        "row_dir": str(tmp_path / "rows" / "000000000005"),
        "array": array,
        "chunk": (0,),
        "what": "array 'model/w'",
        "tensor": "model/w",
    }
    args.update(kw)
    return ChunkRef(**args)  # type: ignore[arg-type]


def write_chunk(ref: ChunkRef, parts: Sequence[bytes], *, checked: bool = True) -> int | None:
    encoded, crc = chunks.encode(parts, checked=checked)
    path = Path(ref.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(p) for p in encoded))
    return crc


# -- encoding -----------------------------------------------------------------------------------
def test_encoded_chunk_is_data_then_little_endian_crc32c(tmp_path):
    ref = ref_for(tmp_path)
    crc = write_chunk(ref, [DATA[:1000], DATA[1000:]])
    stored = Path(ref.path).read_bytes()
    assert stored[:-TRAILER_BYTES] == DATA
    assert crc == crc32c.crc32c(DATA) == int.from_bytes(stored[-TRAILER_BYTES:], "little")
    data, trailer = chunks.decode(stored)
    assert bytes(data) == DATA and trailer == crc
    dest = bytearray(len(DATA))
    chunks.read_chunk(LocalFileSystem(), ref, memoryview(dest), crc)
    assert bytes(dest) == DATA


def test_unchecked_chunk_has_no_trailer_and_reads_back(tmp_path):
    ref = ref_for(tmp_path)
    assert write_chunk(ref, [DATA], checked=False) is None
    assert Path(ref.path).read_bytes() == DATA
    dest = bytearray(len(DATA))
    chunks.read_chunk(LocalFileSystem(), ref, memoryview(dest), None)
    assert bytes(dest) == DATA


def test_decode_refuses_a_chunk_shorter_than_its_trailer():
    with pytest.raises(ValueError, match="trailer"):
        chunks.decode(b"abc")


# -- each corruption kind, with its fields ------------------------------------------------------
def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "flipped":
        data[len(DATA) // 2] ^= 0x10
    elif kind == "trailer_flipped":
        data[-1] ^= 0x01
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "trailer_only":
        data = data[-TRAILER_BYTES:]
    elif kind == "wrong_size":
        data += b"\0" * 3
    if kind == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": CorruptChunkError.CHECKSUM,
    "trailer_flipped": CorruptChunkError.TRAILER,
    "truncated": CorruptChunkError.SIZE,
    "trailer_only": CorruptChunkError.SIZE,
    "wrong_size": CorruptChunkError.SIZE,
    "missing": CorruptChunkError.MISSING,
}


@pytest.mark.parametrize("reader", ["read_chunk", "verify_chunk"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_damage_is_detected_with_its_fields(tmp_path, kind, reader):
    ref = ref_for(tmp_path, chunk=(0, 0), array="rank_000002/t00001-m")
    crc = write_chunk(ref, [DATA])
    assert crc is not None
    _damage(Path(ref.path), kind)
    with pytest.raises(CorruptChunkError) as info:
        if reader == "read_chunk":
            chunks.read_chunk(LocalFileSystem(), ref, memoryview(bytearray(len(DATA))), crc)
        else:
            chunks.verify_chunk(LocalFileSystem(), ref, len(DATA), crc, memoryview(bytearray(64)))
    err = info.value
    assert err.problem == DAMAGE[kind]
    assert (err.store, err.row, err.rank) == (str(tmp_path), ROW, RANK)
    assert (err.array, err.chunk, err.tensor) == ("rank_000002/t00001-m", (0, 0), "model/w")
    assert err.path == ref.path
    message = str(err)
    assert f"row {ROW}, rank {RANK}, array 'model/w'" in message and ref.path in message
    assert err.detail in message


class StaleSizeFS(LocalFileSystem):
    """Reports the size a file had when it was written, as a cache might after the file
    shrank: reads then come up short."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def size(self, path: str) -> int:
        return self.sizes[path]


@pytest.mark.parametrize("reader", ["read_chunk", "verify_chunk"])
def test_a_file_shorter_than_its_reported_size_is_truncated(tmp_path, reader):
    ref = ref_for(tmp_path)
    crc = write_chunk(ref, [DATA])
    assert crc is not None
    fs = StaleSizeFS({ref.path: len(DATA) + TRAILER_BYTES})
    _damage(Path(ref.path), "truncated")
    with pytest.raises(CorruptChunkError) as info:
        if reader == "read_chunk":
            chunks.read_chunk(fs, ref, memoryview(bytearray(len(DATA))), crc)
        else:
            chunks.verify_chunk(fs, ref, len(DATA), crc, memoryview(bytearray(64)))
    assert info.value.problem == CorruptChunkError.TRUNCATED


def test_unknown_problem_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown chunk problem"):
        CorruptChunkError("x", store="s", row=0, rank=0, array="a", chunk=(), problem="odd")


def test_fields_survive_pickling_and_the_exchange_between_ranks(tmp_path):
    ref = ref_for(tmp_path)
    err = ref.fail(CorruptChunkError.CHECKSUM, "checksum mismatch (data corrupted)")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CorruptChunkError and again.fields() == err.fields()
    assert str(again) == str(err)
    # Two ranks that fail alike: each raises the damaged chunk's error, fields intact.
    comm = RankInTurnComm(1, 2, {})

    def fail() -> None:
        raise err

    with pytest.raises(CorruptChunkError) as info:
        step.run(
            comm,
            step.LOAD_READ,
            fail,
            context=f"cannot restore row {ROW}",
            fallback=CorruptCheckpointError,
        )
    assert info.value.fields() == err.fields()
    assert str(info.value).startswith(f"cannot restore row {ROW}: step load.read failed; rank 0:")


# -- the packed chunk: whole reads and ranged reads ---------------------------------------------
def _pack(tmp_path: Path) -> tuple[ChunkRef, list[ArrayEntry]]:
    """A packed chunk of three tensors' bytes (a, b, c) and their manifest entries."""
    pieces = {"a": DATA[:100], "b": DATA[100:300], "c": DATA[300:364]}
    entries, offset = [], 0
    for name, data in pieces.items():
        entries.append(
            ArrayEntry(
                name,
                "rank_000002/packed",
                "uint8",
                (len(data),),
                len(data),
                offset,
                crc32c.crc32c(data),
            )
        )
        offset += len(data)
    ref = ref_for(tmp_path, array="rank_000002/packed", what="packed array", tensor=None)
    write_chunk(ref, list(pieces.values()))
    return ref, entries


def _ranged(ref: ChunkRef, entry: ArrayEntry) -> ChunkRef:
    return ChunkRef(
        ref.store,
        ref.row,
        ref.rank,
        ref.row_dir,
        ref.array,
        ref.chunk,
        f"array {entry.name!r}",
        entry.name,
    )


def test_ranged_reads_check_only_the_bytes_they_read(tmp_path):
    ref, (a, b, c) = _pack(tmp_path)
    with open(ref.path, "r+b") as f:  # damage b only
        f.seek(b.offset + 7)
        f.write(b"\xff")
    fs = RecordingFS()
    for entry in (a, c):
        dest = bytearray(entry.nbytes)
        chunks.read_range(fs, _ranged(ref, entry), entry, memoryview(dest))
        assert bytes(dest) == DATA[entry.offset : entry.offset + entry.nbytes]
    assert fs.reads == [(ref.path, a.offset, a.nbytes), (ref.path, c.offset, c.nbytes)]
    with pytest.raises(CorruptChunkError) as info:
        chunks.read_range(fs, _ranged(ref, b), b, memoryview(bytearray(b.nbytes)))
    err = info.value
    assert (err.problem, err.tensor, err.array, err.chunk) == (
        CorruptChunkError.CHECKSUM,
        "b",
        "rank_000002/packed",
        (0,),
    )
    # Read whole, the chunk fails its own checksum and names the one tensor damaged.
    with pytest.raises(CorruptChunkError) as info:
        chunks.read_packed(fs, ref, [a, b, c])
    assert info.value.problem == CorruptChunkError.CHECKSUM
    assert info.value.tensor is None and info.value.tensors == ("b",)


def test_a_range_beyond_the_packed_chunk_is_a_size_problem(tmp_path):
    ref, (a, _, c) = _pack(tmp_path)
    beyond = ArrayEntry("d", a.array, "uint8", (8,), 8, c.offset + c.nbytes, 0)
    with pytest.raises(CorruptChunkError) as info:
        chunks.read_range(LocalFileSystem(), _ranged(ref, beyond), beyond, memoryview(bytearray(8)))
    assert (info.value.problem, info.value.tensor) == (CorruptChunkError.SIZE, "d")


def test_a_lost_packed_chunk_names_every_tensor_it_held(tmp_path):
    ref, entries = _pack(tmp_path)
    Path(ref.path).unlink()
    with pytest.raises(CorruptChunkError) as info:
        chunks.read_packed(LocalFileSystem(), ref, entries)
    assert info.value.problem == CorruptChunkError.MISSING
    assert info.value.tensors == ("a", "b", "c") and info.value.tensor is None
    assert "holding 'a', 'b', 'c'" in str(info.value)


def test_a_damaged_pack_trailer_is_a_trailer_problem(tmp_path):
    ref, entries = _pack(tmp_path)
    _damage(Path(ref.path), "trailer_flipped")
    with pytest.raises(CorruptChunkError) as info:
        chunks.read_packed(LocalFileSystem(), ref, entries)
    assert info.value.problem == CorruptChunkError.TRAILER and info.value.tensors == ()


# -- through the public API ---------------------------------------------------------------------
def _state() -> dict[str, torch.Tensor]:
    return {
        "big": torch.arange(DEFAULT_PACK_THRESHOLD // 4 + 10, dtype=torch.float32),
        "small": torch.arange(6, dtype=torch.int64),
    }


@pytest.mark.parametrize("name", ["big", "small"], ids=["own", "packed"])
def test_load_and_verify_report_the_same_damaged_chunk(tmp_path, name):
    distckpt.save(_state(), tmp_path, row=ROW)
    manifest = Store(tmp_path).read_manifest(ROW, 0)
    (entry,) = [a for a in manifest.arrays if a.name == name]
    ref = ChunkRef(
        str(tmp_path),
        ROW,
        0,
        Store(tmp_path).row_dir(ROW),
        entry.array,
        (0, 0),  # rank 0's shard of the row's data array
        "",
        name,
    )
    with open(ref.path, "r+b") as f:
        f.seek(entry.offset + 3)
        byte = f.read(1)
        f.seek(entry.offset + 3)
        f.write(bytes([byte[0] ^ 0x20]))

    with pytest.raises(CorruptChunkError) as info:
        # fallback=False: raise without marking the row bad, so verify still reports it
        distckpt.load(
            {k: torch.zeros_like(v) for k, v in _state().items()}, tmp_path, fallback=False
        )
    err = info.value
    assert (err.store, err.row, err.rank, err.array) == (str(tmp_path), ROW, 0, entry.array)
    assert (err.chunk, err.problem, err.path) == (ref.chunk, CorruptChunkError.CHECKSUM, ref.path)
    # A packed chunk fails whole: no single tensor is blamed, the damaged one is listed.
    assert (err.tensor, err.tensors) == ((name, ()) if not entry.packed else (None, (name,)))

    result = CliRunner().invoke(cli, ["verify", str(tmp_path), "--json"])
    assert result.exit_code != 0
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["row"] == err.row and problem["rank"] == err.rank
    assert problem["array"] == (err.tensor or err.array)
    assert (problem["chunk"], problem["kind"], problem["path"]) == (
        list(err.chunk),
        err.problem,
        err.path,
    )
    assert problem["problem"] == err.detail


def test_a_damaged_global_piece_is_named_by_load_and_verify(tmp_path):
    distckpt.save({"w": distckpt.Sharded(torch.ones(4, 2), (4, 2), (0, 0))}, tmp_path, row=ROW)
    index = (0, 0)  # rank 0's shard of the row's data array
    path = Path(Store(tmp_path).data_file(ROW, 0))
    path.write_bytes(path.read_bytes()[:16])  # the piece's 32 bytes are cut short
    with pytest.raises(CorruptChunkError) as info:
        distckpt.load({"w": torch.zeros(4, 2)}, tmp_path, fallback=False)
    err = info.value
    assert (err.row, err.rank, err.array, err.chunk) == (ROW, 0, "data", index)
    assert (err.problem, err.tensor, err.path) == (CorruptChunkError.SIZE, "w", str(path))
    result = CliRunner().invoke(cli, ["verify", str(tmp_path), "--json"])
    (problem,) = json.loads(result.stdout)["problems"]
    assert (problem["array"], problem["chunk"], problem["kind"], problem["path"]) == (
        "w",
        list(index),
        "size",
        str(path),
    )
