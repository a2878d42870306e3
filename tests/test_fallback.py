"""A bad newest row never stops a restart.

When the elected row turns out damaged while ``load`` reads it, every rank falls back to the
newest older committed row, the damaged row is marked bad (``rows/<row>/BAD.json``) and
later elections, ``distckpt latest``, ``distckpt ls`` and retention pass over it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_step import run_job

import distckpt
from distckpt.cli import cli
from distckpt.cli.common import EXIT_NO_ROW
from distckpt.dist.comm import Communicator
from distckpt.dist.election import elect_offline
from distckpt.errors import CorruptCheckpointError, CorruptChunkError
from distckpt.io.marks import BAD_FILE, bad_rows, mark_bad, read_mark, unmark
from distckpt.plan.save import DEFAULT_PACK_THRESHOLD
from distckpt.storage.store import Store

BIG = DEFAULT_PACK_THRESHOLD // 4 + 16  # elements of a float32 tensor with its own array


def state(step: int, rank: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return {
        "model": {"w": torch.randn(BIG, generator=gen), "b": torch.randn(4, generator=gen)},
        "step": step,
    }


def blank() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(BIG), "b": torch.zeros(4)}, "step": -1}


def chunk(store: Path, row: int, name: str = "model/w", rank: int = 0) -> Path:
    st = Store(store)
    assert any(a.name == name for a in st.read_manifest(row, rank).arrays)
    return Path(st.data_file(row, rank))  # the rank's shard of the row's data array


def damage(store: Path, row: int, how: str, rank: int = 0) -> None:
    path = chunk(store, row, rank=rank)
    if how == "checksum":
        data = bytearray(path.read_bytes())
        data[7] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    elif how == "unreadable":  # a directory where the chunk file belongs
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(how)


def save_rows(store: Path, n: int, **kwargs: Any) -> None:
    for step in range(n):
        distckpt.save(state(step), store, row=step, **kwargs)
    distckpt.storage.lease.release(store)


def same(live: dict[str, Any], step: int, rank: int = 0) -> bool:
    want = state(step, rank)
    return live["step"] == step and all(
        torch.equal(live["model"][k], want["model"][k]) for k in want["model"]
    )


def cli_run(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("how", ["checksum", "missing", "unreadable"])
def test_damaged_newest_row_falls_back_and_is_marked(tmp_path, how, caplog):
    save_rows(tmp_path, 3)
    damage(tmp_path, 2, how)
    live = blank()
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        assert distckpt.load(live, tmp_path) == 1
    assert same(live, 1)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the damaged tensor (a flipped byte in w), or a tensor of the lost file (all of them)
    hit = ("model/w",) if how == "checksum" else ("model/w", "model/b")
    assert "row 2 of" in warning and any(n in warning for n in hit), warning
    mark = read_mark(Store(tmp_path), 2)
    assert mark is not None and any(n in mark.reason for n in hit)
    assert (Path(Store(tmp_path).row_dir(2)) / BAD_FILE).is_file()
    # Every later election passes over it: the API, the CLI, the next load (no new warning).
    assert distckpt.latest(tmp_path) == 1
    assert cli_run("latest", tmp_path).output.strip() == "1"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        assert distckpt.load(blank(), tmp_path) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_ls_shows_the_marked_row_as_bad_with_its_reason(tmp_path):
    save_rows(tmp_path, 2)
    damage(tmp_path, 1, "checksum")
    distckpt.load(blank(), tmp_path)
    doc = json.loads(cli_run("ls", tmp_path, "--json").output)
    assert doc["latest"] == 0
    by_row = {r["row"]: r for r in doc["rows"]}
    assert by_row[1]["status"] == "bad" and "checksum" in by_row[1]["bad"]
    assert by_row[0]["status"] == "committed" and by_row[0]["bad"] is None
    text = cli_run("ls", tmp_path).output
    assert "marked bad: " in text and "latest: 0; 1 marked bad" in text, text


def test_fallback_false_raises_and_marks_nothing(tmp_path):
    save_rows(tmp_path, 2)
    damage(tmp_path, 1, "checksum")
    live = blank()
    before = {k: v.clone() for k, v in live["model"].items()}
    with pytest.raises(CorruptChunkError, match="row 1"):
        distckpt.load(live, tmp_path, fallback=False)
    assert all(torch.equal(live["model"][k], before[k]) for k in before)
    assert read_mark(Store(tmp_path), 1) is None and distckpt.latest(tmp_path) == 1


def test_an_explicit_row_never_falls_back(tmp_path):
    save_rows(tmp_path, 2)
    damage(tmp_path, 1, "checksum")
    with pytest.raises(CorruptChunkError):
        distckpt.load(blank(), tmp_path, row=1)
    assert read_mark(Store(tmp_path), 1) is None


def test_no_older_row_left_raises_the_damage_and_latest_says_nothing_usable(tmp_path):
    save_rows(tmp_path, 1)
    damage(tmp_path, 0, "checksum")
    with pytest.raises(CorruptChunkError) as info:
        distckpt.load(blank(), tmp_path)
    assert info.value.row == 0 and "no older committed row" in " ".join(info.value.__notes__)
    assert distckpt.latest(tmp_path) is None
    result = cli_run("latest", tmp_path)
    assert result.exit_code == EXIT_NO_ROW and "marked bad: rows 0" in result.output


def test_falls_back_over_several_damaged_rows(tmp_path):
    save_rows(tmp_path, 4)
    damage(tmp_path, 3, "checksum")
    damage(tmp_path, 2, "missing")
    live = blank()
    assert distckpt.load(live, tmp_path) == 1 and same(live, 1)
    assert [r for r in range(4) if r in bad_rows(Store(tmp_path))] == [2, 3]


def test_unmarked_row_counts_again(tmp_path):
    save_rows(tmp_path, 2)
    mark_bad(Store(tmp_path), 1, "checksum mismatch (by hand)")
    assert distckpt.latest(tmp_path) == 0
    assert unmark(Store(tmp_path), 1) and distckpt.latest(tmp_path) == 1


def test_election_skip_parameter_passes_over_rows(tmp_path):
    save_rows(tmp_path, 3)
    st = Store(tmp_path)
    assert elect_offline(st) == 2
    assert elect_offline(st, skip={2}) == 1
    assert elect_offline(st, skip={1, 2}) == 0
    assert elect_offline(st, skip={0, 1, 2}) is None


def test_retention_never_deletes_the_row_to_fall_back_to(tmp_path):
    """keep=2 counts rows that are not marked bad: after a fallback from row 1 to row 0, the
    next save keeps rows 2 and 0 (the row a restart can fall back to), not 2 and 1."""
    save_rows(tmp_path, 2, keep=2)
    damage(tmp_path, 1, "checksum")
    assert distckpt.load(blank(), tmp_path) == 0
    distckpt.save(state(2), tmp_path, row=2, keep=2)
    distckpt.storage.lease.release(tmp_path)
    assert Store(tmp_path).rows() == [0, 2]
    live = blank()
    damage(tmp_path, 2, "checksum")
    assert distckpt.load(live, tmp_path) == 0 and same(live, 0)


def test_all_ranks_fall_back_together_when_one_rank_s_part_is_damaged(tmp_path):
    """Only rank 1's chunk of the newest row is damaged: both ranks load row 0."""

    def save_two(c: Communicator) -> None:
        for step in range(2):
            distckpt.save(state(step, c.rank), tmp_path, row=step, comm=c)

    run_job(2, save_two)
    distckpt.storage.lease.release(tmp_path)
    damage(tmp_path, 1, "checksum", rank=1)

    def restore(c: Communicator) -> tuple[int, bool]:
        live = blank()
        row = distckpt.load(live, tmp_path, comm=c)
        return row, same(live, row, c.rank)

    assert run_job(2, restore) == [(0, True), (0, True)]
    mark = read_mark(Store(tmp_path), 1)
    assert mark is not None and "rank 1" in mark.reason
    assert distckpt.latest(tmp_path) == 0


def test_a_failure_that_is_not_the_row_s_does_not_mark_it(tmp_path, monkeypatch):
    """Out of memory while staging is this process's problem, not the row's."""
    from distckpt.io import rowio

    save_rows(tmp_path, 2)

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("cannot allocate the staging buffer")

    monkeypatch.setattr(rowio.RankReader, "verify_many", no_memory)
    with pytest.raises(CorruptCheckpointError):
        distckpt.load(blank(), tmp_path)
    assert read_mark(Store(tmp_path), 1) is None and distckpt.latest(tmp_path) == 1


@pytest.mark.multiproc
def test_requeued_slurm_job_finishes_despite_a_damaged_newest_row(tmp_path):
    """scripts/slurm/run.sh (real CLI) -> srun -> torchrun -> a worker that loads, trains a
    step and saves: with the newest row damaged, the job resumes from the row before it and
    finishes, and the damaged row is never elected again."""
    from multiproc import WORKERS, run_command
    from test_slurm_scripts import RUN_SH, Slurm

    slurm = Slurm(tmp_path, "real")
    for step in range(2):
        distckpt.save({"w": torch.full((16,), float(step + 1)), "step": step}, slurm.ckpt)
    distckpt.storage.lease.release(slurm.ckpt)
    packed = Path(Store(slurm.ckpt).data_file(1, 0))
    data = bytearray(packed.read_bytes())
    data[0] ^= 0xFF
    packed.write_bytes(bytes(data))

    target = (str(WORKERS / "fallback_train_worker.py"), str(slurm.ckpt))
    env = {
        **slurm.env,
        "STUB_SRUN_MODE": "exec",
        "GPUS_PER_NODE": "1",
        "SLURM_RESTART_COUNT": "1",
    }
    result = run_command(["bash", RUN_SH, *target], env=env, timeout=180)
    described = result.describe()
    assert result.returncode == 0, described
    assert f"resuming from {slurm.ckpt}: " in result.stderr, described
    assert result.lines("LOADED ") == ["LOADED rank=0 row=0 step=0"], described
    assert result.lines("SAVED ") == ["SAVED rank=0 row=2"], described
    assert "row 1 of" in result.stderr and "marked bad" in result.stderr, described
    assert slurm.requeues == []
    # The next restart resumes from the new row; row 1 is shown bad and never elected.
    assert cli_run("latest", slurm.ckpt).output.strip() == "2"
    rows = {
        r["row"]: r["status"]
        for r in json.loads(cli_run("ls", slurm.ckpt, "--json").output)["rows"]
    }
    assert rows == {0: "committed", 1: "bad", 2: "committed"}


def test_gc_keeps_the_row_to_fall_back_to_and_says_why_a_bad_row_goes(tmp_path):
    save_rows(tmp_path, 3)
    mark_bad(Store(tmp_path), 1, "checksum mismatch (by hand)")
    doc = json.loads(cli_run("gc", tmp_path, "--keep", "1", "--json").output)
    assert doc["latest"] == 2
    assert Store(tmp_path).rows() == [2]
    mark_bad(Store(tmp_path), 2, "checksum mismatch (by hand)")
    distckpt.save(state(3), tmp_path, row=3)
    distckpt.save(state(4), tmp_path, row=4)
    distckpt.storage.lease.release(tmp_path)
    doc = json.loads(cli_run("gc", tmp_path, "--keep", "2", "--json").output)
    assert {e["row"]: e["reason"] for e in doc["removed"]} == {
        2: "marked bad, older than the latest row 4"
    }
    assert Store(tmp_path).rows() == [3, 4]


def test_a_checkpoint_session_elects_past_a_marked_row(tmp_path):
    @dataclasses.dataclass
    class Counter:
        x: int = 0

    for value in (1, 2):
        with distckpt.Checkpoint("c", path=tmp_path, mode="append") as session:
            counter = Counter()
            distckpt.bind_checkpoint_state(counter, state_id="counter")
            counter.x = value
            session.write()
    mark_bad(Store(tmp_path), 1, "checksum mismatch (by hand)")
    with distckpt.Checkpoint("c", path=tmp_path, mode="append") as session:
        counter = Counter()
        distckpt.bind_checkpoint_state(counter, state_id="counter")
        assert session.row == 0 and counter.x == 1
