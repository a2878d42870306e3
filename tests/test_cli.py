"""The `distckpt` command: output, JSON, exit statuses, damage reports, gc and the lease."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from fakes import RecordingFS, save_as_ranks

import distckpt
from distckpt import cli as cli_mod
from distckpt.cli import (
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_LEASE,
    EXIT_NO_ROW,
    EXIT_STORE,
    EXIT_USAGE,
    cli,
)
from distckpt.dist.election import elect_offline, row_status
from distckpt.format import checked
from distckpt.format.layout import FORMAT_VERSION, single_chunk_key
from distckpt.storage.lease import LEASE_FILE, Lease
from distckpt.storage.store import Store

BIG = 300_000  # float32 elements: 1.2 MB, an array of its own


@pytest.fixture(autouse=True)
def _no_launcher_job(monkeypatch):
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID", "COBALT_JOBID", "JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def run(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _state(rank: int) -> dict:
    return {"x": torch.full((4,), float(rank)), "big": torch.ones(BIG) * rank, "step": 1}


@pytest.fixture
def single(tmp_path: Path) -> Path:
    """Rows 0..2 of one process, with `step` metadata."""
    path = tmp_path / "single"
    for step in range(3):
        state = {"model": {"w": torch.arange(BIG, dtype=torch.float32), "b": torch.zeros(8)}}
        distckpt.save({**state, "step": step}, path, step=step, lr=0.1)
    distckpt.storage.lease.release(path)  # the writing job is over
    return path


@pytest.fixture
def multi(tmp_path: Path) -> Path:
    """Rows 0..2 written by 2 ranks."""
    path = tmp_path / "multi"
    for _ in range(3):
        save_as_ranks(path, 2, _state)
    return path


@dataclass
class Stepper:
    step: int = 0
    x: torch.Tensor = field(default_factory=lambda: torch.zeros(4))
    __checkpoint_version__ = 3


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    """A Checkpoint store: level, lead time, a bound state with a schema."""
    path = tmp_path / "workflow"
    ckpt = distckpt.Checkpoint("forecast", path=path, mode="append", level=2)
    with ckpt as session:
        state = distckpt.bind_checkpoint_state(Stepper(), state_id="stepper")
        for i in range(2):
            state.step = i + 1
            session.write(lead_time=dt.timedelta(hours=6 * (i + 1)), member=0)
    return path


def _chunk(path: Path, row: int, rank: int, name: str) -> Path:
    store = Store(path)
    entry = next(a for a in store.read_manifest(row, rank).arrays if a.name == name)
    if entry.array == "data":  # the rank's shard of the row's data array
        return Path(store.data_file(row, rank))
    return Path(store.row_dir(row), entry.array, single_chunk_key(len(entry.shape)))


def _offset(path: Path, row: int, rank: int, name: str) -> int:
    """Where tensor ``name`` starts in its chunk file."""
    return next(a for a in Store(path).read_manifest(row, rank).arrays if a.name == name).offset


def _flip(file: Path, offset: int = 100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def _manifest(path: Path, row: int, rank: int) -> Path:
    return Path(Store(path).manifest_path(row, rank))


# -- help and the entry point ---------------------------------------------------------------


def test_help_explains_every_command_and_lists_exit_codes():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("ls", "latest", "show", "verify", "gc", "lease"):
        assert command in result.stdout
    for code, meaning in cli_mod.EXIT_CODES.items():
        assert f"{code}  {meaning}" in result.stdout
    for command in ("ls", "latest", "show", "verify", "gc", "lease"):
        sub = run(command, "--help")
        assert sub.exit_code == 0
        assert "STORE" in sub.stdout and "--json" in sub.stdout
        assert len(sub.stdout.split("\n\n")[2]) > 200  # a real explanation, not a stub


def test_console_script_is_installed_and_works(single, tmp_path):
    exe = Path(sys.executable).parent / "distckpt"
    assert exe.exists(), "pip install -e . should have installed the `distckpt` script"
    proc = subprocess.run([exe, "latest", single], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "2\n", "")
    proc = subprocess.run(
        [exe, "latest", tmp_path / "never"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_NO_ROW and proc.stdout == ""
    assert "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr
    version = run("--version")
    assert version.exit_code == 0 and distckpt.__version__ in version.stdout


# -- ls ---------------------------------------------------------------------------------------


def test_ls_lists_rows_with_step_size_and_age(single):
    result = run("ls", single)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"store {single}") and "lease: free" in lines[0]
    # Rows of the functional API: no write count or lead time, so no such columns.
    assert lines[1].split() == ["ROW", "STATUS", "STEP", "RANKS", "SIZE", "AGE"]
    cells = lines[4].split()
    assert cells[:4] == ["2", "committed", "2", "1"]
    assert "MiB" in lines[4] and lines[4].endswith("ago")
    assert "3 committed of 3 rows" in result.stdout and "latest: 2" in result.stdout


def test_ls_json(multi):
    doc = json.loads(run("ls", multi, "--json").stdout)
    assert (
        doc["latest"] == 2 and doc["format"] == FORMAT_VERSION and doc["lease"]["state"] == "free"
    )
    assert [r["row"] for r in doc["rows"]] == [0, 1, 2]
    row = doc["rows"][0]
    assert set(row) >= {
        "row",
        "status",
        "committed",
        "world_size",
        "write_count",
        "lead_time",
        "metadata",
        "created",
        "age_s",
        "bytes",
        "missing_ranks",
        "problems",
    }
    assert row["committed"] and row["world_size"] == 2 and row["bytes"] > 2 * BIG * 4
    assert row["age_s"] >= 0 and row["problems"] == []


def test_ls_shows_what_an_incomplete_row_lacks(multi):
    os.remove(_manifest(multi, 1, 1))
    save_as_ranks(multi, 2, _state)  # row 3, then damaged: newer than the latest, "pending"
    _manifest(multi, 3, 0).write_text("{broken")
    result = run("ls", multi)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    row1 = lines.index(next(line for line in lines if line.startswith("1 ")))
    assert lines[row1].split()[:2] == ["1", "incomplete"] and "1/2" in lines[row1]
    assert lines[row1 + 1] == "    no valid manifest from rank(s) 1 of 2"
    row3 = lines.index(next(line for line in lines if line.startswith("3 ")))
    assert lines[row3].split()[:2] == ["3", "pending"]
    assert lines[row3 + 2].startswith("    rank_000000.json is not valid JSON")
    assert lines[-1].endswith("latest: 2")
    doc = json.loads(run("ls", multi, "--json").stdout)
    assert doc["rows"][1]["missing_ranks"] == [1] and doc["rows"][1]["status"] == "incomplete"
    assert doc["rows"][3]["status"] == "pending" and doc["rows"][3]["ranks_committed"] == [1]
    assert "not valid JSON" in doc["rows"][3]["problems"][-1]


def test_ls_shows_lead_time_of_workflow_rows(workflow):
    result = run("ls", workflow)
    assert "12:00:00" in result.stdout and "6:00:00" in result.stdout
    assert result.stdout.splitlines()[1].split()[:5] == ["ROW", "STATUS", "WRITES", "LEAD", "TIME"]
    doc = json.loads(run("ls", workflow, "--json").stdout)
    assert doc["name"] == "forecast"
    assert [r["lead_time"] for r in doc["rows"]] == [21600.0, 43200.0]
    assert [r["write_count"] for r in doc["rows"]] == [1, 2]


def test_ls_porcelain_is_tab_separated_machine_values_without_header(single, workflow):
    doc = json.loads(run("ls", single, "--json").stdout)
    result = run("ls", single, "--porcelain")
    assert result.exit_code == 0, result.output
    records = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(records) == len(doc["rows"]) == 3  # one line per row, nothing else
    for cells, row in zip(records, doc["rows"], strict=True):
        assert len(cells) == len(cli_mod.inspect.PORCELAIN_COLUMNS)
        by = dict(zip(cli_mod.inspect.PORCELAIN_COLUMNS, cells, strict=True))
        assert int(by["row"]) == row["row"] and by["status"] == "committed"
        assert int(by["step"]) == row["metadata"]["step"]
        assert int(by["bytes"]) == row["bytes"]  # bytes, not "2.3 MiB"
        assert dt.datetime.fromisoformat(by["created"]) == dt.datetime.fromisoformat(row["created"])
        assert float(by["age_s"]) >= 0 and by["lead_time_s"] == "-"
        assert not any(" " in c for c in cells)
    lead = [line.split("\t") for line in run("ls", workflow, "--porcelain").stdout.splitlines()]
    column = cli_mod.inspect.PORCELAIN_COLUMNS.index("lead_time_s")
    assert [float(cells[column]) for cells in lead] == [21600.0, 43200.0]
    both = run("ls", single, "--porcelain", "--json")
    assert both.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    "args,code",
    [
        (["ls", "{tmp}/nope"], EXIT_STORE),
        (["show", "{single}", "999"], EXIT_NO_ROW),
        (["verify", "{single}", "999"], EXIT_NO_ROW),
        (["latest", "{tmp}/nope"], EXIT_NO_ROW),
    ],
)
def test_every_json_call_prints_a_document_even_on_error(single, tmp_path, args, code):
    argv = [a.format(tmp=tmp_path, single=single) for a in args]
    result = run(*argv, "--json")
    assert result.exit_code == code
    doc = json.loads(result.stdout)  # exactly one document
    if "error" in doc:
        assert doc == {"error": doc["error"], "exit": code} and doc["error"]
    else:  # latest's own document for "nothing to resume"
        assert doc["row"] is None
    assert "error:" in result.stderr


def test_json_usage_errors_print_a_document(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_mod.main(["ls", "--no-such-option", "--json"])
    assert exit_info.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "No such option '--no-such-option'.", "exit": EXIT_USAGE}
    assert "Usage:" in err


_NO_TORCH_CHECK = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
from distckpt.cli import main
main()
"""


@pytest.mark.parametrize(
    "args",
    [
        ["latest", "{s}"],
        ["ls", "{s}"],
        ["ls", "{s}", "--porcelain"],
        ["show", "{s}"],
        ["show", "{s}", "--json"],
        ["verify", "{s}", "--all"],
        ["latest", "{s}/nope", "--json"],
    ],
)
def test_read_only_commands_never_import_torch(multi, args):
    argv = [a.format(s=multi) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CHECK, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode in (0, EXIT_NO_ROW), proc.stderr
    assert proc.stdout  # it did its work
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr


def test_ls_of_missing_or_empty_store(tmp_path):
    missing = run("ls", tmp_path / "nope")
    assert missing.exit_code == EXIT_STORE and "no store at" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run("ls", tmp_path / "empty")
    assert empty.exit_code == 0 and "no rows" in empty.stdout


# -- latest ----------------------------------------------------------------------------------


def test_latest_prints_only_the_row_id(multi):
    result = run("latest", multi)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "2\n", "")


def test_latest_json(single, workflow):
    doc = json.loads(run("latest", single, "--json").stdout)
    assert doc["row"] == 2 and doc["world_size"] == 1 and doc["write_count"] == 0
    assert doc["metadata"] == {"step": 2, "lr": 0.1}
    doc = json.loads(run("latest", workflow, "--json").stdout)
    assert doc["row"] == 1 and doc["level"] == 2 and doc["lead_time"] == 43200.0
    assert doc["metadata"] == {"member": 0} and doc["write_count"] == 2


def test_latest_skips_incomplete_rows_and_filters_world_size(multi):
    os.remove(_manifest(multi, 2, 1))
    assert run("latest", multi).stdout == "1\n"
    assert run("latest", multi, "--world-size", "2").stdout == "1\n"
    none = run("latest", multi, "--world-size", "4")
    assert none.exit_code == EXIT_NO_ROW and none.stdout == ""
    assert "by 4 ranks" in none.stderr


def test_latest_without_a_row_exits_3(tmp_path):
    for path in (tmp_path / "never-created", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        result = run("latest", path)
        assert result.exit_code == EXIT_NO_ROW and result.stdout == ""
        assert "nothing to resume" in result.stderr and str(path) in result.stderr
        doc = json.loads(run("latest", path, "--json").stdout)
        assert doc["row"] is None and set(doc) >= {"world_size", "write_count", "metadata"}
    only_garbage = tmp_path / "garbage"
    save_as_ranks(only_garbage, 2, _state)
    os.remove(_manifest(only_garbage, 0, 0))
    assert run("latest", only_garbage).exit_code == EXIT_NO_ROW


def test_unreadable_stores_exit_4_on_every_command(single, tmp_path):
    root = single / "zarr.json"
    doc = json.loads(root.read_text())
    newer = FORMAT_VERSION + 1
    doc["attributes"]["distckpt"]["format"] = newer
    root.write_text(json.dumps(doc))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for command in ("ls", "latest", "show", "verify", "gc", "lease"):
        result = run(command, single)
        assert result.exit_code == EXIT_STORE, (command, result.output)
        assert f"format version {newer}" in result.stderr and "upgrade distckpt" in result.stderr
        assert f"up to version {FORMAT_VERSION}" in result.stderr  # both versions named
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
        assert "Traceback" not in result.stderr
    assert run("latest", foreign).exit_code == EXIT_STORE
    assert "not a distckpt store" in run("latest", foreign).stderr
    assert run("ls", a_file).exit_code == EXIT_STORE


def test_newer_manifest_format_exits_4(multi):
    path = _manifest(multi, 2, 0)
    doc = json.loads(path.read_text())
    doc["distckpt_manifest"] = 9
    path.write_bytes(checked.seal(doc))
    result = run("latest", multi)
    assert result.exit_code == EXIT_STORE and "format version 9" in result.stderr


# -- show ------------------------------------------------------------------------------------


def test_show_describes_the_latest_row(single):
    result = run("show", single)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "row        2  (committed, 1 rank, write count 0)" in out
    assert "metadata   step=2  lr=0.1" in out
    assert "rank 0  (2 tensors" in out
    w = next(line for line in out.splitlines() if "model/w" in line).split()
    assert w[:5] == ["model/w", str(BIG), "float32", "1.1", "MiB"] and w[5] == "data"
    entries = {a.name: a for a in Store(single).read_manifest(2, 0).arrays}
    assert w[6] == f"data@{entries['model/w'].offset}"
    b = next(line for line in out.splitlines() if "model/b" in line).split()
    assert b[:4] == ["model/b", "8", "float32", "32"]
    assert b[5:] == ["data", f"data@{entries['model/b'].offset}"]


def test_show_lists_global_arrays_with_the_chunks_each_rank_wrote(tmp_path):
    path = tmp_path / "g"
    w = torch.arange(48.0).reshape(6, 8)
    distckpt.save({"w": distckpt.Sharded(w, (6, 8), (0, 0)), "x": torch.ones(3)}, path)
    out = run("show", path).stdout
    section = out.split("global arrays", 1)[1].splitlines()
    line = next(line for line in section if line.strip().startswith("w "))
    assert line.split()[1:6] == ["6x8", "float32", "-", "1", "data"]
    doc = json.loads(run("show", path, "--json").stdout)
    assert "1 global array, 192 B written" in out  # 6 x 8 float32
    verified = run("verify", path)
    assert verified.exit_code == 0 and "2 tensors, 204 B" in verified.stdout  # + x's 12 B
    (shown,) = doc["ranks"][0]["globals"]
    assert (shown["name"], shown["shape"], shown["chunks_written"]) == ("w", [6, 8], 1)
    assert [a["name"] for a in doc["ranks"][0]["arrays"]] == ["x"]


def test_show_states_level_and_lead_time(workflow):
    out = run("show", workflow, "0").stdout
    assert "row        0" in out and "level      2" in out and "lead time  6:00:00" in out
    schema = row_status(Store(workflow), 0).manifests[0].states["stepper"].schema
    assert schema is not None
    line = next(line for line in out.splitlines() if line.strip().startswith("stepper"))
    assert f"schema {schema[:12]}" in line and "version 3" in line
    doc = json.loads(run("show", workflow, "--json").stdout)
    assert doc["row"] == 1 and doc["level"] == 2 and doc["lead_time"] == 43200.0
    state = doc["ranks"][0]["states"][0]
    assert state["id"] == "stepper" and state["schema"] == schema and state["version"] == 3
    assert state["fields"] == {"step": "int", "x": "torch.Tensor"}


def test_show_rank_filter_and_json(multi):
    out = run("show", multi, "1", "--rank", "1").stdout
    assert "rank 1  (" in out and "rank 0  (" not in out
    doc = json.loads(run("show", multi, "--json", "--rank", "0").stdout)
    assert doc["row"] == 2 and doc["world_size"] == 2 and [r["rank"] for r in doc["ranks"]] == [0]
    arrays = {a["name"]: a for a in doc["ranks"][0]["arrays"]}
    assert arrays["big"]["storage"] == "data" and arrays["big"]["shape"] == [BIG]
    assert arrays["x"]["storage"] == "data" and arrays["x"]["array"] == "data"
    assert arrays["big"]["nbytes"] == BIG * 4 and arrays["big"]["dtype"] == "float32"
    bad = run("show", multi, "--rank", "5")
    assert bad.exit_code == EXIT_USAGE and "no rank 5" in bad.stderr


def test_show_of_missing_row_or_empty_store_exits_3(single, tmp_path):
    result = run("show", single, "17")
    assert result.exit_code == EXIT_NO_ROW and "row 17 does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    assert run("show", tmp_path / "empty").exit_code == EXIT_NO_ROW


def test_show_of_an_incomplete_row_says_what_is_missing(multi):
    os.remove(_manifest(multi, 1, 0))
    result = run("show", multi, "1")
    assert result.exit_code == 0
    assert "(incomplete)" in result.stdout
    assert "no valid manifest from rank(s) 0 of 2" in result.stdout


# -- verify ----------------------------------------------------------------------------------


def test_verify_intact_rows(multi):
    result = run("verify", multi)
    assert result.exit_code == 0, result.output
    assert (
        result.stdout
        == f"row 2: ok (2 ranks, 4 tensors, {cli_mod.human_bytes(2 * (BIG * 4 + 16))})\n"
    )
    result = run("verify", multi, "--all", "--jobs", "3")
    assert result.exit_code == 0
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "row 0",
        "row 1",
        "row 2",
    ]


def test_verify_reports_a_flipped_byte_in_an_own_array(multi):
    chunk = _chunk(multi, 2, 1, "big")
    _flip(chunk, _offset(multi, 2, 1, "big") + 100)
    result = run("verify", multi)
    assert result.exit_code == EXIT_CORRUPT
    assert "row 2, rank 1, array 'big': checksum mismatch (data corrupted)" in result.stdout
    assert "rank 0" not in result.stdout
    assert "1 problem in 1 of 1 row" in result.stderr
    doc = json.loads(run("verify", multi, "--json").stdout)
    assert doc["ok"] is False
    assert doc["problems"] == [
        {
            "row": 2,
            "rank": 1,
            "array": "big",
            "problem": "checksum mismatch (data corrupted)",
            "chunk": [1, 0],  # rank 1's shard of the row's data array
            "kind": "checksum",
            "path": str(chunk),
        }
    ]


def test_verify_reports_a_flipped_byte_in_the_packed_array_once(multi):
    _flip(_chunk(multi, 1, 0, "x"), offset=_offset(multi, 1, 0, "x") + 2)
    result = run("verify", multi, "1")
    assert result.exit_code == EXIT_CORRUPT
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert lines == ["  row 1, rank 0, array 'x': checksum mismatch (data corrupted)"]
    assert run("verify", multi).exit_code == 0  # row 2 is intact


def test_verify_reports_truncated_and_missing_chunks(multi):
    chunk = _chunk(multi, 0, 0, "big")
    chunk.write_bytes(chunk.read_bytes()[:1000])
    os.remove(_chunk(multi, 0, 1, "big"))
    result = run("verify", multi, "--all")
    assert result.exit_code == EXIT_CORRUPT
    manifest = Store(multi).read_manifest(0, 0)
    short = f"the file is 1000 bytes, its writer's manifest says {manifest.data_bytes}"
    # A shard of the wrong size: reported once, at the first tensor it held.
    first = manifest.arrays[0].name
    assert f"row 0, rank 0, array '{first}': {short}" in result.stdout
    # The whole file of rank 1 is gone: reported once, at the first tensor it held.
    assert "row 0, rank 1, array 'x': chunk file is missing" in result.stdout
    assert "row 1: ok" in result.stdout and "row 2: ok" in result.stdout
    assert "2 problems in 1 of 3 rows" in result.stderr


def test_verify_reports_manifest_problems(multi):
    os.remove(_manifest(multi, 2, 1))
    result = run("verify", multi, "2")
    assert result.exit_code == EXIT_CORRUPT
    assert "row 2, rank 1: manifest missing: this rank did not commit" in result.stdout
    _manifest(multi, 1, 0).write_text("not json")
    result = run("verify", multi, "1")
    assert "row 1, rank 0: invalid manifest:" in result.stdout and "not valid JSON" in (
        result.stdout
    )
    # A manifest that parses but points a state at a tensor it does not list.
    path = _manifest(multi, 0, 1)
    doc = json.loads(path.read_text())
    doc["states"]["x"]["tree"] = {"tensor": 7}
    path.write_bytes(checked.seal(doc))
    result = run("verify", multi, "0")
    assert result.exit_code == EXIT_CORRUPT
    # Refused when the manifest is parsed: the row stops counting as committed.
    assert "row 0, rank 1: invalid manifest:" in result.stdout
    assert "state 'x': stored value at 'x' refers to tensor 7" in result.stdout
    # A deleted zarr.json breaks plain zarr readers even though the bytes are intact.
    os.remove(_chunk(multi, 0, 0, "big").parent / "zarr.json")
    missing = "row 0, rank 0, array 'data': zarr.json is missing"
    assert missing in run("verify", multi, "0").stdout


def test_verify_all_skips_uncommitted_rows(multi):
    os.remove(_manifest(multi, 1, 1))
    result = run("verify", multi, "--all")
    assert result.exit_code == 0
    assert "row 1: skipped, not committed" in result.stdout
    doc = json.loads(run("verify", multi, "--all", "--json").stdout)
    assert [r["row"] for r in doc["rows"]] == [0, 2] and doc["skipped"][0]["row"] == 1


def test_verify_progress_goes_to_stderr(multi):
    result = run("verify", multi, "--progress")
    assert result.exit_code == 0
    assert "verifying 1 row: 100%" in result.stderr
    assert "%" not in result.stdout
    assert "%" not in run("verify", multi).stderr  # not a terminal: no progress by default


def test_verify_usage_and_missing_rows(multi, tmp_path):
    assert run("verify", multi, "1", "--all").exit_code == EXIT_USAGE
    assert run("verify", multi, "9").exit_code == EXIT_NO_ROW
    (tmp_path / "empty").mkdir()
    assert run("verify", tmp_path / "empty").exit_code == EXIT_NO_ROW
    assert run("verify", tmp_path / "empty", "--all").exit_code == EXIT_NO_ROW


# -- gc --------------------------------------------------------------------------------------


def _garbage_store(tmp_path: Path) -> Path:
    """Rows 0..4 of 2 ranks: 1 and 4 lack a manifest (1 is garbage, 4 may be in flight)."""
    path = tmp_path / "gc"
    for _ in range(5):
        save_as_ranks(path, 2, _state)
    os.remove(_manifest(path, 1, 1))
    os.remove(_manifest(path, 4, 0))
    return path


def test_gc_dry_run_lists_and_removes_nothing(tmp_path):
    path = _garbage_store(tmp_path)
    before = sorted(p for p in path.rglob("*"))
    result = run("gc", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would remove 1 row" in result.stdout
    assert "1    uncommitted  not committed, older than the latest row 3" in result.stdout
    assert sorted(p for p in path.rglob("*")) == before
    doc = json.loads(run("gc", path, "-n", "--keep", "1", "--json").stdout)
    assert doc["dry_run"] is True and [e["row"] for e in doc["removed"]] == [0, 1, 2]
    assert doc["kept"] == [3, 4] and doc["latest"] == 3
    assert sorted(p for p in path.rglob("*")) == before


def test_gc_removes_garbage_and_keeps_the_newest_rows(tmp_path):
    path = _garbage_store(tmp_path)
    result = run("gc", path)
    assert result.exit_code == 0, result.output
    assert "removed 1 row" in result.stdout and "kept 4 rows: 0, 2, 3, 4" in result.stdout
    store = Store(path)
    assert store.rows() == [0, 2, 3, 4]
    doc = json.loads(run("gc", path, "--keep", "1", "--json").stdout)
    assert [e["row"] for e in doc["removed"]] == [0, 2] and doc["bytes_freed"] > 0
    assert store.rows() == [3, 4]  # newest committed row and the newer pending one stay
    assert elect_offline(store) == 3
    assert run("verify", path).exit_code == 0
    assert not Path(path, LEASE_FILE).exists()  # gc's own lease was released
    again = run("gc", path, "--keep", "1")
    assert again.exit_code == 0 and "nothing to remove" in again.stdout


def test_gc_removes_manifests_before_data(tmp_path, monkeypatch):
    path = _garbage_store(tmp_path)
    fs = RecordingFS()
    monkeypatch.setattr(cli_mod.common, "Store", lambda p: Store(p, fs=fs))
    events = fs.events
    assert run("gc", path, "--keep", "2").exit_code == 0
    assert Store(path).rows() == [2, 3, 4]
    for row in (0, 1):
        name = f"/rows/{row:012d}"
        mine = [(kind, p) for kind, p in events if name in p]
        kinds = [kind for kind, _ in mine]
        assert kinds[-1] == "rmtree" and kinds.count("rmtree") == 1, mine
        removed = [p for kind, p in mine if kind == "remove"]
        assert all("/manifests/" in p or p.endswith("/index.json") for p in removed)
        assert len(kinds) >= 2 if row == 0 else len(kinds) >= 1


def test_gc_refuses_while_a_live_writer_holds_the_lease(tmp_path):
    path = _garbage_store(tmp_path)
    with Lease.acquire(path, job_id="trainer-7"):
        result = run("gc", path, "--keep", "1")
        assert result.exit_code == EXIT_LEASE
        assert "refusing to gc" in result.stderr and "job trainer-7" in result.stderr
        assert "--force" in result.stderr
        assert Store(path).rows() == [0, 1, 2, 3, 4]
        dry = run("gc", path, "--dry-run")
        assert dry.exit_code == 0 and "a real gc would be refused" in dry.stdout
        assert run("lease", path).exit_code == EXIT_LEASE
        forced = run("gc", path, "--force")
        assert forced.exit_code == 0 and "removed 1 row" in forced.stdout
        assert "--force" in forced.stderr  # warned
        assert Store(path).rows() == [0, 2, 3, 4]
        assert json.loads(Path(path, LEASE_FILE).read_text())["job"] == "trainer-7"
    assert run("lease", path).exit_code == 0


def test_gc_takes_over_a_stale_lease(tmp_path):
    path = _garbage_store(tmp_path)
    Lease.acquire(path, job_id="crashed")
    doc = json.loads(Path(path, LEASE_FILE).read_text())
    doc.update(host="gone.cluster", heartbeat=doc["heartbeat"] - 3600)
    Path(path, LEASE_FILE).write_text(json.dumps(doc))
    lease = json.loads(run("lease", path, "--json").stdout)
    assert lease["state"] == "stale" and lease["job"] == "crashed"
    result = run("gc", path)
    assert result.exit_code == 0 and "taking over the lease" in result.stderr
    assert Store(path).rows() == [0, 2, 3, 4]
    assert json.loads(run("lease", path, "--json").stdout)["state"] == "free"


def test_gc_of_an_empty_store(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("gc", tmp_path / "empty")
    assert result.exit_code == 0 and "nothing to remove" in result.stdout


# -- errors ----------------------------------------------------------------------------------


def test_unexpected_errors_are_one_line_unless_debug(single, monkeypatch):
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli_mod.inspect, "elect_offline", boom)
    result = run("latest", single)
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == (
        "distckpt latest: error: unexpected RuntimeError: disk on fire (run with --debug for "
        "the traceback)\n"
    )
    debug = run("--debug", "latest", single)
    assert debug.exit_code == EXIT_ERROR
    assert "Traceback" in debug.stderr and "disk on fire" in debug.stderr


def test_lease_command(single):
    result = run("lease", single)
    assert (result.exit_code, result.stdout) == (0, "lease: free\n")
    with Lease.acquire(single, job_id="42"):
        held = run("lease", single)
        assert held.exit_code == EXIT_LEASE and "job 42" in held.stdout
        doc = json.loads(run("lease", single, "--json").stdout)
        assert doc["state"] == "held" and doc["pid"] == os.getpid() and doc["job"] == "42"
        assert "lease: held by" in run("ls", single).stdout


def test_verify_accepts_coordinate_arrays_in_states(tmp_path: Path) -> None:
    """Stores of the ensemble workflow hold datetime and str arrays (coordinates)."""
    path = tmp_path / "coords"
    coords = {
        "time": np.array(["2026-01-01T00"], dtype="datetime64[h]"),
        "lead_time": np.array([0, 6], dtype="timedelta64[h]"),
        "variable": np.array(["t2m", "u10"]),
    }
    distckpt.save({"boundary": {"coords": coords, "x": torch.ones(3)}}, path)
    distckpt.storage.lease.release(path)
    result = run("verify", path, "--all")
    assert result.exit_code == 0, result.output
