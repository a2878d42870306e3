"""Stores written by earlier releases keep loading, electing and showing.

tests/data/v1/ (format 1, release 0.1) and tests/data/v2/ (format 2: one data array per rank
per row) were written by ``tests/data/make_v1_stores.py`` with the code of their format and
are kept byte for byte; the expected values are rebuilt by ``v1_states``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import distckpt
from distckpt.cli import EXIT_OK, cli

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import v1_states as v1  # noqa: E402


@pytest.fixture(params=["v1", "v2"])
def stores(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A copy of one format's fixtures: readers may take the lease or write bookkeeping
    files."""
    shutil.copytree(DATA / request.param, tmp_path / request.param)
    return tmp_path / request.param


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout


def _empty_train_state() -> dict:
    return {
        "model": {"w": torch.zeros(64, 32), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "step": -1,
        "tags": None,
        "g": torch.zeros(v1.GLOBAL_SHAPE),
    }


def _both_ranks(state_id: str, saved_world: int, rank: int, world: int) -> list[int] | None:
    return list(range(saved_world)) if state_id == "rank_state" else None


@pytest.mark.parametrize("row", [None, 0])
def test_v1_training_rows_load_at_one_rank(stores: Path, row: int | None) -> None:
    state = _empty_train_state()
    loaded = distckpt.load(
        state, stores / "train", row=row, mapping=distckpt.SourceRanks(_both_ranks)
    )
    expected_row = v1.ROWS - 1 if row is None else row
    assert loaded == expected_row
    want = v1.train_state(0, expected_row)
    assert torch.equal(state["model"]["w"], want["model"]["w"])
    assert torch.equal(state["model"]["b"], want["model"]["b"])
    assert state["model"]["b"].dtype == torch.bfloat16
    assert state["step"] == want["step"] and state["tags"] == want["tags"]
    for rank in range(v1.SAVED_WORLD):  # each saved rank's private part, merged
        part = v1.train_state(rank, expected_row)["rank_state"][f"seen{rank}"]
        assert torch.equal(state["rank_state"][f"seen{rank}"], part)
    assert torch.equal(state["g"], v1.global_value(expected_row))


def test_v1_rows_elect_and_carry_their_metadata(stores: Path) -> None:
    assert distckpt.latest(stores / "train") == v1.ROWS - 1
    assert distckpt.metadata(stores / "train")["step"] == v1.train_state(0, v1.ROWS - 1)["step"]
    assert distckpt.latest(stores / "session") is not None


def test_v1_cli_lists_shows_and_verifies(stores: Path) -> None:
    code, out = _cli("ls", str(stores / "train"), "--json")
    assert code == EXIT_OK
    doc = json.loads(out)
    assert [r["row"] for r in doc["rows"]] == list(range(v1.ROWS))
    code, out = _cli("show", str(stores / "train"), "--json")
    assert code == EXIT_OK and '"g"' in out
    code, out = _cli("verify", str(stores / "train"), "--all", "--json")
    assert code == EXIT_OK, out
    code, _ = _cli("verify", str(stores / "session"))
    assert code == EXIT_OK


def test_v1_session_resumes_bound_state(stores: Path) -> None:
    ckpt = distckpt.Checkpoint("v1", path=stores / "session", mode="append")
    with ckpt as session:
        assert session.write_count == 3
        assert session.lead_time == np.timedelta64(18, "h")
        live = v1.Noise()
        proxy = distckpt.bind_checkpoint_state(live)
        assert proxy.checkpoint_state_loaded
        want = v1.noise_at(2)
        assert torch.equal(live.field, want.field)
        assert live.step == want.step and live.when == want.when
