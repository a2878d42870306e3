"""The reference ensemble workflow in one process: interrupted anywhere, it resumes to the
same bytes (the multi-rank, SIGKILL version is test_torture.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from distckpt import Checkpoint, NullCheckpoint, SingleProcessComm
from distckpt.reference import (
    EnsembleConfig,
    ForecastStore,
    GaussianPerturbation,
    Persistence,
    StochasticModel,
    initial_condition,
    run_ensemble,
)

CFG = EnsembleConfig(nensemble=4, nsteps=4, batch_size=2)
GRID = (4, 8)


class Interrupted(Exception):
    pass


class FailingStore(ForecastStore):
    """Dies after ``budget`` output writes: like a kill between an output and its row."""

    def __init__(self, path, budget: int) -> None:
        super().__init__(path)
        self.budget = budget

    def write(self, x, members, step) -> None:
        if self.budget == 0:
            raise Interrupted
        self.budget -= 1
        super().write(x, members, step)


def _run(tmp_path, *, level=2, model="stochastic", budget=None, checkpoint=True):
    comm = SingleProcessComm()
    x0, coords0 = initial_condition(GRID)
    ForecastStore.create(tmp_path / "out", nensemble=4, nsteps=4, shape=GRID, comm=comm)
    out = (
        ForecastStore(tmp_path / "out")
        if budget is None
        else FailingStore(tmp_path / "out", budget)
    )
    ckpt = Checkpoint("e", path=tmp_path / "ckpt", level=level) if checkpoint else NullCheckpoint()
    with ckpt as session:
        m = StochasticModel(seed=4) if model == "stochastic" else Persistence()
        summary = run_ensemble(
            x0=x0,
            coords0=coords0,
            cfg=CFG,
            model=m,
            perturbation=GaussianPerturbation(seed=4),
            output=out,
            checkpoint=session,
            comm=comm,
        )
    return summary, ForecastStore(tmp_path / "out").read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    _, data = _run(tmp_path_factory.mktemp("ref"), checkpoint=False)
    assert not np.isnan(data).any()
    return data


# 2 batches x 5 boundaries: every interruption point, batch boundaries included.
@pytest.mark.parametrize("budget", range(10))
@pytest.mark.parametrize("level", [0, 1, 2])
def test_interrupted_anywhere_resumes_to_the_same_bytes(tmp_path, reference, budget, level):
    with pytest.raises(Interrupted):
        _run(tmp_path, level=level, budget=budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, data = _run(tmp_path, level=level)
    assert np.array_equal(data.view(np.uint32), reference.view(np.uint32))
    mid_batch = budget % 5 != 0
    reran = any("re-running batch" in str(w.message) for w in caught)
    assert reran == (mid_batch and level < 2)
    assert (summary["rerun_batch"] is not None) == (mid_batch and level < 2)


def test_without_a_checkpoint_the_workflow_runs_plainly(tmp_path, reference):
    summary, data = _run(tmp_path, checkpoint=False)
    assert summary["resumed_from"] is None
    assert np.array_equal(data, reference)


def test_persistence_model_resumes_too(tmp_path):
    _, plain = _run(tmp_path / "a", model="persistence", checkpoint=False)
    with pytest.raises(Interrupted):
        _run(tmp_path / "b", model="persistence", budget=3)
    _, resumed = _run(tmp_path / "b", model="persistence")
    assert np.array_equal(resumed, plain)


def test_finished_run_relaunched_does_nothing_more(tmp_path, reference):
    _run(tmp_path)
    summary, data = _run(tmp_path)
    assert summary["batches_run"] == 0
    assert np.array_equal(data, reference)


def test_preemption_stops_at_a_boundary_and_the_relaunch_finishes(tmp_path, reference):
    from distckpt.session.preempt import REQUEUE_EXIT_CODE, PreemptionHandler

    comm = SingleProcessComm()
    x0, coords0 = initial_condition(GRID)
    ForecastStore.create(tmp_path / "out", nensemble=4, nsteps=4, shape=GRID, comm=comm)
    with Checkpoint("e", path=tmp_path / "ckpt") as session:
        model, pert = StochasticModel(seed=4), GaussianPerturbation(seed=4)
        with PreemptionHandler(comm=comm) as handler, pytest.raises(SystemExit) as stop:
            handler.request_stop()  # as if SIGUSR1 had arrived
            run_ensemble(
                x0=x0,
                coords0=coords0,
                cfg=CFG,
                model=model,
                perturbation=pert,
                output=ForecastStore(tmp_path / "out"),
                checkpoint=session,
                comm=comm,
                preemption=handler,
            )
    assert stop.value.code == REQUEUE_EXIT_CODE
    summary, data = _run(tmp_path)
    assert summary["resumed_from"] == 0  # stopped right after the first boundary's row
    assert np.array_equal(data.view(np.uint32), reference.view(np.uint32))
