"""Earth2Studio's own components and ``run.ensemble`` checkpointing through distckpt.

``distckpt.compat.earth2studio.use_distckpt()`` swaps the objects Earth2Studio imports from
``earth2studio.utils.checkpoint`` for distckpt's. These tests run Earth2Studio 0.19's
``Gaussian`` perturbation, ``Persistence`` model and ``run.ensemble`` workflow (4 members, 3
steps, so 4 outputs per member) against a distckpt ``Checkpoint``, interrupt the workflow by
raising from the IO backend's ``write`` after a chosen number of outputs (single process:
what a kill between an output and its checkpoint row leaves behind), rebuild the components
inside the resumed session and compare the outputs with an uninterrupted run.

What a resume reproduces depends only on the last committed row; see docs/earth2studio.md.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("earth2studio")

import distckpt
from distckpt import Checkpoint
from distckpt.compat import earth2studio as compat

NENS = 4
NSTEPS = 3
OUTPUTS_PER_BATCH = NSTEPS + 1
VARIABLES = ["t2m", "u10m"]
DOMAIN = OrderedDict(lat=np.linspace(-90.0, 90.0, 4), lon=np.linspace(0.0, 359.0, 8))
TIME = "2024-01-01T00"
E2S_STATE_IDS = {
    "earth2studio.perturbation.gaussian._GaussianCheckpointState",
    "earth2studio.models.px.persistence._PersistenceCheckpointState",
}


@contextlib.contextmanager
def _light_stacks() -> Iterator[None]:
    """``inspect.stack()`` as frames with their file names only, while Earth2Studio is
    imported: its optional-dependency registry asks for the caller's file name some 3,800
    times per import, and each full ``inspect.stack()`` searches every loaded module for
    every frame (about 50 s of a 60 s import here, a minute of the default test run)."""
    real = inspect.stack

    def light(context: int = 1) -> list[Any]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            frames.append(types.SimpleNamespace(frame=frame, filename=frame.f_code.co_filename))
            frame = frame.f_back
        return frames

    inspect.stack = light  # type: ignore[assignment]
    try:
        yield
    finally:
        inspect.stack = real


@pytest.fixture(scope="module")
def e2s() -> Any:
    """Earth2Studio with its checkpoint names routed to distckpt for this module's tests."""
    from loguru import logger

    handle = compat.use_distckpt()
    with warnings.catch_warnings(), _light_stacks():
        # netCDF4 (imported by earth2studio.data) warns about its numpy ABI; not ours
        warnings.filterwarnings("ignore", "numpy.ndarray size changed", RuntimeWarning)
        import earth2studio.run
        from earth2studio.io import KVBackend
        from earth2studio.models.px import Persistence
        from earth2studio.perturbation import Gaussian

    logger.disable("earth2studio")
    ns = types.SimpleNamespace(
        run=earth2studio.run,
        KVBackend=KVBackend,
        Persistence=Persistence,
        Gaussian=Gaussian,
        handle=handle,
    )
    yield ns
    logger.enable("earth2studio")
    ns.handle.undo()


class MemorySource:
    """An in-memory Earth2Studio data source: one initial condition."""

    def __init__(self) -> None:
        import xarray as xr

        rng = np.random.default_rng(0)
        self.da = xr.DataArray(
            rng.standard_normal((1, len(VARIABLES), 4, 8)).astype("float32"),
            dims=["time", "variable", "lat", "lon"],
            coords={
                "time": np.array([np.datetime64(TIME)]),
                "variable": VARIABLES,
                "lat": DOMAIN["lat"],
                "lon": DOMAIN["lon"],
            },
        )

    def __call__(self, time: Any, variable: Any) -> Any:
        return self.da.sel(time=np.asarray(time), variable=np.asarray(variable))


class MemberOffset:
    """A stateless perturbation: adds the member index. Nothing to checkpoint."""

    def __call__(self, x: torch.Tensor, coords: Any) -> tuple[torch.Tensor, Any]:
        offset = torch.as_tensor(coords["ensemble"], dtype=x.dtype)
        return x + offset.view(-1, *([1] * (x.ndim - 1))), coords


class Interrupted(Exception):
    pass


def failing_io(e2s: Any, fail_after: int | None, *, after_write: bool = False) -> Any:
    """A KVBackend whose ``write`` raises once ``fail_after`` outputs were written.

    ``after_write=False``: the raise comes before output ``fail_after + 1`` (its predecessor's
    checkpoint row is committed). ``after_write=True``: output ``fail_after`` is written, then
    the raise comes before its checkpoint row.
    """

    class FailingIO(e2s.KVBackend):
        def __init__(self) -> None:
            super().__init__()
            self.writes = 0
            self.fail_after = fail_after

        def write(self, x: Any, coords: Any, array_name: Any) -> None:
            limit = self.fail_after
            if limit is not None and not after_write and self.writes >= limit:
                raise Interrupted(f"killed before output {self.writes + 1}")
            super().write(x, coords, array_name)
            self.writes += 1
            if limit is not None and after_write and self.writes >= limit:
                raise Interrupted(f"killed after output {self.writes}, before its checkpoint")

    return FailingIO()


def make_perturbation(e2s: Any, kind: str) -> Any:
    return e2s.Gaussian(noise_amplitude=0.1, seed=1) if kind == "gaussian" else MemberOffset()


def run_ensemble(
    e2s: Any, io: Any, ckpt: Checkpoint | None, kind: str, batch_size: int
) -> dict[str, torch.Tensor]:
    """Earth2Studio's ensemble workflow; components are built inside the session."""

    def call(checkpoint: Any) -> None:
        kwargs = {} if checkpoint is None else {"checkpoint": checkpoint}
        e2s.run.ensemble(
            [TIME],
            NSTEPS,
            NENS,
            e2s.Persistence(VARIABLES, DOMAIN),
            MemorySource(),
            io,
            make_perturbation(e2s, kind),
            batch_size=batch_size,
            device=torch.device("cpu"),
            verbose=False,
            **kwargs,
        )

    if ckpt is None:
        call(None)
    else:
        with ckpt as session:
            call(session)
    return {name: io.root[name].clone() for name in VARIABLES}


_references: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}


def reference(e2s: Any, tmp_path: Path, level: int, kind: str, batch_size: int) -> Any:
    key = (level, kind, batch_size)
    if key not in _references:
        ckpt = Checkpoint("reference", path=tmp_path / "reference", level=level)
        _references[key] = run_ensemble(e2s, failing_io(e2s, None), ckpt, kind, batch_size)
    return _references[key]


def interrupt_and_resume(
    e2s: Any, tmp_path: Path, level: int, kind: str, batch_size: int, n: int, after: bool
) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    io = failing_io(e2s, n, after_write=after)
    path = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        run_ensemble(e2s, io, Checkpoint("run", path=path, level=level), kind, batch_size)
    io.fail_after = None
    ckpt = Checkpoint("run", path=path, level=level)  # a fresh catalog, as after a restart
    return run_ensemble(e2s, io, ckpt, kind, batch_size), ckpt


def member(out: dict[str, torch.Tensor], m: int) -> torch.Tensor:
    return torch.stack([out[name][m] for name in VARIABLES])


# -- the adapter ------------------------------------------------------------------------------


def test_names_resolve_to_distckpt_everywhere_in_earth2studio(e2s):
    import earth2studio.models.px.persistence as persistence
    import earth2studio.perturbation.gaussian as gaussian
    import earth2studio.utils.checkpoint as source

    assert compat.is_active()
    for name, obj in compat.REPLACEMENTS.items():
        assert getattr(source, name) is obj, name
    assert gaussian.bind_checkpoint_state is distckpt.bind_checkpoint_state
    assert persistence.bind_checkpoint_state is distckpt.bind_checkpoint_state
    for name in ("Checkpoint", "CheckpointSession", "NullCheckpoint"):
        assert getattr(e2s.run, name) is getattr(distckpt, name)
    # the workflows' default checkpoint is one the workflows' isinstance check recognises
    assert type(e2s.run.ensemble.__defaults__[-1]) is distckpt.NullCheckpoint


def test_use_distckpt_is_idempotent_and_undo_restores_every_module(e2s):
    import earth2studio.perturbation.gaussian as gaussian
    import earth2studio.utils.checkpoint as source

    # A module imported while swapped picks up distckpt's names from the source module, and
    # is swapped back on undo like the modules imported before.
    probe = types.ModuleType("earth2studio._distckpt_probe")
    sys.modules[probe.__name__] = probe
    try:
        exec(
            "from earth2studio.utils.checkpoint import Checkpoint, NullCheckpoint\n"
            "def workflow(checkpoint=NullCheckpoint()):\n    return checkpoint\n",
            vars(probe),
        )
        assert probe.Checkpoint is distckpt.Checkpoint
        assert type(probe.workflow()) is distckpt.NullCheckpoint

        first, second = compat.use_distckpt(), compat.use_distckpt()
        first.undo()
        first.undo()  # releasing a handle twice is a no-op
        with second:
            assert second.active and not first.active
        e2s.handle.undo()  # the fixture's handle, released last: everything goes back
        assert not compat.is_active()

        for name, obj in compat.REPLACEMENTS.items():
            assert getattr(source, name) is not obj, name
        assert source.Checkpoint.__module__ == "earth2studio.utils.checkpoint"
        assert gaussian.bind_checkpoint_state is source.bind_checkpoint_state
        assert e2s.run.NullCheckpoint is source.NullCheckpoint
        assert e2s.run.Checkpoint is source.Checkpoint
        assert type(e2s.run.ensemble.__defaults__[-1]) is source.NullCheckpoint
        assert probe.Checkpoint is source.Checkpoint
        assert type(probe.workflow()) is source.NullCheckpoint
    finally:
        e2s.handle = compat.use_distckpt()  # swapped again for the other tests
        del sys.modules[probe.__name__]
    assert source.Checkpoint is distckpt.Checkpoint
    assert gaussian.bind_checkpoint_state is distckpt.bind_checkpoint_state


def test_missing_earth2studio_raises_a_checkpoint_error(monkeypatch):
    monkeypatch.setitem(sys.modules, compat.SOURCE_MODULE, None)
    with pytest.raises(distckpt.CheckpointError, match="'earth2studio' package"):
        compat.use_distckpt()


# -- components bind into the distckpt store -----------------------------------------------


def test_gaussian_and_persistence_bind_their_state_into_the_store(e2s, tmp_path):
    path = tmp_path / "ckpt"
    coords = OrderedDict(
        batch=np.arange(1),
        time=np.array([np.datetime64(TIME)]),
        lead_time=np.array([np.timedelta64(0, "h")]),
        variable=np.array(VARIABLES),
        **DOMAIN,
    )
    x = torch.randn(1, 1, 1, len(VARIABLES), 4, 8)
    with Checkpoint("components", path=path, level=2) as session:
        gaussian = e2s.Gaussian(noise_amplitude=0.1, seed=3)
        model = e2s.Persistence(VARIABLES, DOMAIN)
        for component in (gaussian, model):
            assert isinstance(component.checkpoint, distckpt.CheckpointState)
            assert component.checkpoint.checkpoint_enabled
            assert component.checkpoint.checkpoint_level == 2
            assert not component.checkpoint.checkpoint_state_loaded
        gaussian(torch.zeros(2, 3), OrderedDict(a=np.arange(2), b=np.arange(3)))
        steps = model.create_iterator(x, coords)
        next(steps), next(steps)
        session.write(lead_time=np.timedelta64(6, "h"), completed_ensembles=[])
        saved_generator = gaussian.checkpoint.generator_state.clone()
        saved_x = model.checkpoint.x.clone()
        saved_keys = model.checkpoint.coord_keys
        saved_values = model.checkpoint.coord_values

    manifests = sorted(path.glob("rows/*/manifests/rank_*.json"))
    assert len(manifests) == 1
    assert set(json.loads(manifests[0].read_text())["states"]) == E2S_STATE_IDS
    assert not list(path.rglob("catalog.json")), "no Earth2Studio catalog is written"
    assert set(Checkpoint("components", path=path).catalog[-1].state_ids) == E2S_STATE_IDS

    with Checkpoint("components", path=path, level=2) as session:
        assert session.lead_time == np.timedelta64(6, "h")
        gaussian = e2s.Gaussian(noise_amplitude=0.1, seed=3)
        model = e2s.Persistence(VARIABLES, DOMAIN)
        assert gaussian.checkpoint.checkpoint_state_loaded
        assert model.checkpoint.checkpoint_state_loaded
        assert torch.equal(gaussian.checkpoint.generator_state, saved_generator)
        assert torch.equal(model.checkpoint.x, saved_x)
        assert model.checkpoint.coord_keys == saved_keys and "variable" in saved_keys
        assert len(model.checkpoint.coord_values) == len(saved_values)
        for restored, saved in zip(model.checkpoint.coord_values, saved_values, strict=True):
            assert restored.dtype == saved.dtype and np.array_equal(restored, saved)


# -- run.ensemble: uninterrupted and interrupted runs -------------------------------------


@pytest.mark.parametrize("level", [1, 2])
def test_checkpointed_run_equals_a_run_without_checkpoint(e2s, tmp_path, level):
    plain = run_ensemble(e2s, failing_io(e2s, None), None, "gaussian", 1)
    checkpointed = reference(e2s, tmp_path, level, "gaussian", 1)
    for name in VARIABLES:
        assert torch.equal(plain[name], checkpointed[name])
        assert all(plain[name][m].abs().sum() > 0 for m in range(NENS))  # all written


@dataclass(frozen=True)
class Case:
    """An interruption after ``n`` outputs and what the resumed run reproduces.

    ``exact``: members equal to the uninterrupted run's. ``equal_to``: member -> the
    reference member it equals instead. ``unwritten``: members never written (zeros).
    ``different``: members equal to no reference member.
    """

    level: int
    kind: str
    batch_size: int
    n: int
    exact: tuple[int, ...]
    equal_to: dict[int, int] = field(default_factory=dict)
    unwritten: tuple[int, ...] = ()
    different: tuple[int, ...] = ()
    after: bool = False


ALL = tuple(range(NENS))
CASES = {
    # Bit-exact: level 2 resumes inside the last batch (Persistence continues from its
    # restored state; the perturbation's extra draw feeds no later batch).
    "l2-last-batch-mid": Case(2, "gaussian", 1, 13, ALL),
    "l2-bs2-last-batch-mid": Case(2, "gaussian", 2, 6, ALL),
    # Bit-exact: level 1 re-runs the interrupted batch from lead time zero with the
    # generator state from before its draw.
    "l1-first-batch-mid": Case(1, "gaussian", 1, 2, ALL),
    "l1-second-batch-mid": Case(1, "gaussian", 1, 5, ALL),
    "l1-bs2-mid": Case(1, "gaussian", 2, 3, ALL),
    # Bit-exact with a stateless perturbation at level 2, wherever inside a batch: the
    # restored Persistence state is used for its own batch only (no cross-batch leak).
    "l2-stateless-first-batch": Case(2, "offset", 1, 1, ALL),
    "l2-stateless-second-batch": Case(2, "offset", 1, 6, ALL),
    "l2-stateless-bs2": Case(2, "offset", 2, 2, ALL),
    "l2-stateless-output-without-row": Case(2, "offset", 1, 8, ALL, after=True),
    # ... and at level 1 even at a batch boundary: nothing stateful is restored.
    "l1-stateless-boundary": Case(1, "offset", 1, 4, ALL),
    # Earth2Studio limitation 1: level 2 inside a batch that is not the last. The resumed
    # batch is exact, but the workflow perturbs it again and Gaussian (which restored its
    # post-draw generator state) draws once more: every later batch gets the next batch's
    # noise (member m equals reference member m + 1; the last gets a draw never made).
    "l2-second-batch-mid": Case(2, "gaussian", 1, 5, (0, 1), {2: 3}, different=(3,)),
    "l2-first-batch-mid": Case(2, "gaussian", 1, 2, (0,), {1: 2, 2: 3}, different=(3,)),
    "l2-output-without-row": Case(2, "gaussian", 1, 4, (0,), {1: 2, 2: 3}, (), (3,), True),
    "l2-bs2-first-batch-mid": Case(2, "gaussian", 2, 1, (0, 1), different=(2, 3)),
    # Earth2Studio limitation 2: level 1, killed exactly at a batch boundary. The row holds
    # the generator state from before the finished batch's draw, so that draw is repeated:
    # members shift by one batch (member m equals reference member m - 1).
    "l1-boundary": Case(1, "gaussian", 1, 4, (0,), {1: 0, 2: 1, 3: 2}),
    "l1-boundary-output-without-row": Case(1, "gaussian", 1, 9, (0, 1), {2: 1, 3: 2}, after=True),
    # Earth2Studio limitation 3: level 2, killed exactly at a batch boundary. The workflow
    # starts the next batch (write_count = 0) in a session that has not written yet, so the
    # state restored from the finished batch's row is current; Persistence continues the
    # finished member's rollout past the last lead time, with its coordinates, and every
    # write falls outside the output array: the next batch's members stay unwritten while
    # the checkpoint records them as completed. Later batches are exact.
    "l2-boundary": Case(2, "gaussian", 1, 4, (0, 2, 3), unwritten=(1,)),
    "l2-boundary-late": Case(2, "gaussian", 1, 8, (0, 1, 3), unwritten=(2,)),
    "l2-bs2-boundary": Case(2, "gaussian", 2, 4, (0, 1), unwritten=(2, 3)),
    "l2-stateless-boundary": Case(2, "offset", 1, 12, (0, 1, 2), unwritten=(3,)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_interrupted_ensemble_resumes(e2s, tmp_path, case):
    ref = reference(e2s, tmp_path, case.level, case.kind, case.batch_size)
    out, ckpt = interrupt_and_resume(
        e2s, tmp_path, case.level, case.kind, case.batch_size, case.n, case.after
    )
    covered = set(case.exact) | set(case.equal_to) | set(case.unwritten) | set(case.different)
    assert covered == set(ALL)
    for m in case.exact:
        assert torch.equal(member(out, m), member(ref, m)), f"member {m} is not bit-exact"
    for m, r in case.equal_to.items():
        assert torch.equal(member(out, m), member(ref, r)), f"member {m} != reference {r}"
    for m in case.unwritten:
        assert not member(out, m).any(), f"member {m} was written"
    for m in case.different:
        assert not any(torch.equal(member(out, m), member(ref, r)) for r in ALL)
    # whatever happened, the workflow finished and says every member is complete
    last = ckpt.catalog[-1]
    assert last.metadata["completed_ensembles"] == list(ALL)
    # (when the lost batch is the last one, its rollout ran on past the last lead time)
    steps = 2 * NSTEPS + 1 if NENS - 1 in case.unwritten else NSTEPS
    assert last.lead_time == np.timedelta64(6 * steps, "h")
