"""Earth2Studio's ``run.ensemble`` on 2 ranks under torchrun: killed, resumed on 2 and on 1.

``tests/workers/e2s_ranks_worker.py`` is the recipe of docs/earth2studio.md ("Several
ranks"): each rank runs Earth2Studio's own ``run.ensemble`` (``Persistence``, ``Gaussian``
seeded by rank, batch size 1, 2 steps) over 2 of the 4 members into a ``ZarrBackend`` of its
own, all ranks bound into one distckpt ``Checkpoint`` at level 1; a relaunch plays the ranks
that saved the store (``distckpt.play_ranks``). One 2-rank launch runs it uninterrupted (the
reference) and again into a fresh store, where rank 0 SIGKILLs itself after a chosen output
(before its row); torchrun then ends rank 1.

What holds, as the docs say: relaunched on 2 ranks the outputs of both ranks equal the
reference bit for bit. Relaunched on 1 rank, the one process plays both saved ranks at once:
each share resumes from its own rank's saved state (it writes only the outputs after the
last row) and both ranks' outputs equal the reference bit for bit. Without ``play_ranks`` a
1-rank ``Checkpoint`` cannot resume the row: Earth2Studio's component states are private to
the rank that saved them and not keyed by member, so binding them raises
``WorldSizeMismatchError`` naming the state and both world sizes, before anything is written
(checked in this process, with the store unchanged after it).

Every case is ``long`` (each launch imports Earth2Studio's workflows): the kill inside the
second batch resumed on 2 ranks and on 1 rank, inside the first batch, and level 2 inside
the last batch. ``tests/test_played_ranks.py`` checks ``play_ranks`` itself in the default
run (a 2-rank job killed and finished by one process, then killed again and resumed).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("earth2studio")
zarr = pytest.importorskip("zarr")

from multiproc import REPO_ROOT, run_torchrun  # noqa: E402

from distckpt import (  # noqa: E402
    Checkpoint,
    WorldSizeMismatchError,
    bind_checkpoint_state,
    saved_world_size,
)

WORKER = REPO_ROOT / "tests" / "workers" / "e2s_ranks_worker.py"
TIMEOUT = 900.0
GAUSSIAN_STATE = "earth2studio.perturbation.gaussian._GaussianCheckpointState"
LONG = pytest.mark.long


@dataclass(frozen=True)
class Case:
    """Rank 0 is killed after its ``kill_after``-th output (3 outputs per member, 2
    members per rank); ``rewritten``: the outputs each rank's share writes after the
    relaunch (the rest came from the last row); ``one_rank``: the relaunch is one process."""

    level: int
    kill_after: int
    rewritten: int
    one_rank: bool = False


CASES = [
    # Every case is long: each launch imports Earth2Studio's workflows (minutes on 2 cores);
    # tests/test_e2s_workflows.py keeps one killed-and-resumed workflow in the default run.
    # Level 1 re-runs the interrupted batch from lead time zero (3 outputs, or all 6 when it
    # is the first); level 2 continues inside it (the 2 outputs after the row's).
    pytest.param(Case(1, 5, 3), id="l1-inside-second-batch", marks=LONG),
    pytest.param(Case(1, 5, 3, one_rank=True), id="l1-inside-second-batch-one-rank", marks=LONG),
    pytest.param(Case(1, 2, 6), id="l1-inside-first-batch", marks=LONG),
    pytest.param(Case(2, 5, 2), id="l2-inside-last-batch", marks=LONG),
]


def job(case: Case, tmp: Path, name: str, kill_after: int | None) -> dict[str, object]:
    return {
        "level": case.level,
        "store": str(tmp / f"{name}.ckpt"),
        "out": str(tmp / name),
        "kill_after": kill_after,
    }


def outputs(path: Path) -> dict[str, np.ndarray]:
    """``<rank>/<variable>`` -> (member, time, lead_time, lat, lon) of every rank's output."""
    found = {}
    for rank in (0, 1):
        root = zarr.open_group(str(path / f"rank_{rank}.zarr"), mode="r")
        for name in ("u10m", "t2m"):
            found[f"{rank}/{name}"] = np.asarray(root[name][...])
    return found


def check_one_rank_refused(store: str) -> None:
    """This process is a 1-rank job: the 2-rank row is neither listed nor restored."""
    from earth2studio.perturbation.gaussian import _GaussianCheckpointState

    checkpoint = Checkpoint("ensemble", path=store, level=1)
    assert checkpoint.catalog == ()  # rows of another world size are not this job's
    with checkpoint as session, pytest.raises(WorldSizeMismatchError) as raised:
        bind_checkpoint_state(_GaussianCheckpointState())
    assert session.exists
    assert GAUSSIAN_STATE in str(raised.value) and "2 ranks" in str(raised.value)


@pytest.mark.timeout(int(4 * TIMEOUT) + 60)
@pytest.mark.parametrize("case", CASES)
def test_ensemble_on_two_ranks_killed_and_resumed(tmp_path, case):
    reference = job(case, tmp_path, "reference", None)
    killed = job(case, tmp_path, "run", case.kill_after)
    first = run_torchrun(2, WORKER, [json.dumps([reference, killed])], timeout=TIMEOUT)
    assert first.returncode != 0, first.describe()
    assert first.lines("DONE 0") and len(first.lines("DONE 0")) == 2, first.describe()
    assert not first.lines("DONE 1"), first.describe()
    assert f"exitcode  : -{int(signal.SIGKILL)}" in first.stderr, first.describe()

    if case.one_rank:  # one process plays both saved ranks, each from its own state
        resumed = run_torchrun(
            1, WORKER, [json.dumps([{**killed, "kill_after": None}])], timeout=TIMEOUT
        )
        assert saved_world_size(str(killed["store"])) == 2  # it wrote 2-rank rows
    else:
        rows = tmp_path / "run.ckpt" / "rows"
        before = {p: p.read_bytes() for p in rows.rglob("*") if p.is_file()}
        check_one_rank_refused(str(killed["store"]))
        # the refused relaunch wrote nothing: the 2-rank resume finds the store as it was left
        assert before == {p: p.read_bytes() for p in rows.rglob("*") if p.is_file()}
        resumed = run_torchrun(
            2, WORKER, [json.dumps([{**killed, "kill_after": None}])], timeout=TIMEOUT
        )
    resumed.check()
    assert resumed.ranks("DONE 0") == [0, 1], resumed.describe()
    # every share resumed from its own rank's row (the same outputs on both ranks)
    wrote = [f"WROTE 0 rank={rank} outputs={case.rewritten}" for rank in (0, 1)]
    assert sorted(resumed.lines("WROTE 0")) == wrote, resumed.describe()

    ref, out = outputs(tmp_path / "reference"), outputs(tmp_path / "run")
    assert not np.array_equal(ref["0/t2m"], ref["1/t2m"])  # the ranks ran different members
    for name in ref:
        assert np.all(ref[name] != 0), f"{name}: the reference left outputs unwritten"
        assert np.array_equal(out[name], ref[name]), f"{name} is not bit-exact"
