"""Earth2Studio's own workflows on distckpt, killed with SIGKILL and relaunched.

``tests/workers/e2s_workflow_worker.py`` runs ``run.deterministic``, ``run.diagnostic`` and
``run.ensemble`` with Earth2Studio's ``FCN`` (around a seeded random 1x1 convolution) or
``Persistence`` at the native 720 x 1440 grid, ``Gaussian`` perturbation and ``ZarrBackend``
output. One launch runs the workflow uninterrupted (the reference) and then again into a
fresh store, killing itself with SIGKILL right after output ``kill_after`` (before its
checkpoint row); a second launch resumes from the store and the same zarr output. The
outputs are compared with the reference, member by member, with exactly the outcome
docs/earth2studio.md documents (2 steps, so 3 outputs per member; 2 members, batch size 1).

Default run: one case (deterministic FCN at level 2, killed inside the rollout); every other
kill point is ``long``.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("earth2studio")
zarr = pytest.importorskip("zarr")

from multiproc import REPO_ROOT, run_command  # noqa: E402

from distckpt import Checkpoint  # noqa: E402

WORKER = REPO_ROOT / "tests" / "workers" / "e2s_workflow_worker.py"
TIMEOUT = 900.0
MEMBERS = (0, 1)


@dataclass(frozen=True)
class Case:
    """A kill after ``kill_after`` outputs and what the resumed run's outputs are.

    Ensemble only: ``equal_to`` maps a member to the reference member it equals instead
    (B), ``unwritten`` members stay at the fill value (C), ``different`` members equal no
    reference member (A). Every other member (and every output of the other workflows) is
    bit-exact. ``resume_fails``: the relaunch fails with this message (C with a
    ``ZarrBackend``, which refuses the out-of-range lead times); then ``unwritten`` members
    hold only the first output, written by the killed launch before its kill.
    """

    workflow: str
    model: str
    level: int
    kill_after: int
    equal_to: tuple[tuple[int, int], ...] = ()
    unwritten: tuple[int, ...] = ()
    different: tuple[int, ...] = ()
    resume_fails: str | None = None


DEFAULT = {"deterministic-fcn-l2-inside": Case("deterministic", "fcn", 2, 2)}
LONG = {
    "deterministic-fcn-l1-inside": Case("deterministic", "fcn", 1, 2),
    "deterministic-persistence-l2-before-first-row": Case("deterministic", "persistence", 2, 1),
    "diagnostic-fcn-l2-inside": Case("diagnostic", "fcn", 2, 2),
    "diagnostic-fcn-l1-inside": Case("diagnostic", "fcn", 1, 2),
    "ensemble-persistence-l1-inside": Case("ensemble", "persistence", 1, 2),
    "ensemble-persistence-l2-before-first-row": Case("ensemble", "persistence", 2, 1),
    "ensemble-fcn-l1-inside-last-batch": Case("ensemble", "fcn", 1, 5),
    "ensemble-fcn-l2-inside-last-batch": Case("ensemble", "fcn", 2, 5),
    # (A) level 2 inside a batch that is not the last: the resumed batch is exact, the next
    # gets a noise draw the reference never made
    "ensemble-persistence-l2-inside-first-batch": Case(
        "ensemble", "persistence", 2, 2, different=(1,)
    ),
    # (B) level 1 at a batch boundary: batch 0's draw is repeated for member 1
    "ensemble-persistence-l1-boundary": Case("ensemble", "persistence", 1, 4, equal_to=((1, 0),)),
    # (C) level 2 at a batch boundary: Persistence continues member 0's finished rollout
    # past the last lead time for member 1; ZarrBackend refuses that write, so the relaunch
    # fails and member 1 is never written
    "ensemble-persistence-l2-boundary": Case(
        "ensemble",
        "persistence",
        2,
        4,
        unwritten=(1,),
        resume_fails="ValueError: Attempting to set a selection",
    ),
}
# Every case is long: a relaunched Earth2Studio workflow imports earth2studio.run in each
# process (minutes on 2 cores); tests/test_earth2studio.py runs its ensemble in-process.
CASES = [pytest.param(c, id=n, marks=pytest.mark.long) for n, c in DEFAULT.items()] + [
    pytest.param(c, id=n, marks=pytest.mark.long) for n, c in LONG.items()
]


def job(case: Case, tmp: Path, name: str, kill_after: int | None) -> dict[str, object]:
    return {
        "workflow": case.workflow,
        "model": case.model,
        "level": case.level,
        "store": str(tmp / f"{name}.ckpt"),
        "out": str(tmp / f"{name}.zarr"),
        "kill_after": kill_after,
    }


def outputs(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    coords = {"time", "lead_time", "lat", "lon", "ensemble"}
    return {name: np.asarray(root[name][...]) for name in root.array_keys() if name not in coords}


@pytest.mark.timeout(int(2 * TIMEOUT) + 60)
@pytest.mark.parametrize("case", CASES)
def test_workflow_killed_and_relaunched(tmp_path, case):
    reference = job(case, tmp_path, "reference", None)
    killed = job(case, tmp_path, "run", case.kill_after)
    first = run_command(
        [sys.executable, str(WORKER), json.dumps([reference, killed])], timeout=TIMEOUT
    )
    assert first.returncode == -signal.SIGKILL, first.describe()
    assert first.lines("DONE") == ["DONE 0"], first.describe()
    resumed = run_command(
        [sys.executable, str(WORKER), json.dumps([{**killed, "kill_after": None}])],
        timeout=TIMEOUT,
    )
    if case.resume_fails is None:
        resumed.check()
        assert resumed.lines("DONE") == ["DONE 0"]
    else:
        assert resumed.returncode == 1 and case.resume_fails in resumed.stderr, resumed.describe()

    ref, out = outputs(tmp_path / "reference.zarr"), outputs(tmp_path / "run.zarr")
    assert sorted(ref) == sorted(out) and ref
    for name in ref:
        assert np.any(ref[name]), f"{name}: the reference wrote nothing"
        if case.workflow != "ensemble":
            assert np.array_equal(out[name], ref[name]), f"{name} is not bit-exact"
            continue
        equal_to = dict(case.equal_to)
        for m in MEMBERS:
            if m in case.unwritten:
                # (time, lead_time, ...): the killed launch wrote lead time 0 only
                first = 1 if case.resume_fails else 0
                assert np.array_equal(out[name][m][:, :first], ref[name][m][:, :first])
                assert not np.any(out[name][m][:, first:]), f"{name} member {m} was written"
            elif m in case.different:
                assert not any(np.array_equal(out[name][m], ref[name][r]) for r in MEMBERS)
            else:
                r = equal_to.get(m, m)
                assert np.array_equal(out[name][m], ref[name][r]), f"{name} member {m} != {r}"
    last = Checkpoint(case.workflow, path=killed["store"]).catalog[-1]
    if case.workflow == "ensemble" and case.resume_fails is None:
        assert last.metadata["completed_ensembles"] == list(MEMBERS)
