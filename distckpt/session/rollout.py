"""Resumable rollouts: iterators that continue after the last checkpointed step.

A prognostic model's ``create_iterator(x, coords)`` yields the initial condition, then one
step at a time. Wrapped by :class:`ResumableRollout`, each yielded step is recorded as the
rollout boundary (at level 2). After a restart from a level-2 row, the next iterator for
the *same members* starts from the restored boundary and yields the step after it: it does
not yield the initial condition again, and the model does not re-initialise its noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distckpt.logs import get_logger
from distckpt.session.binding import bind_checkpoint_state

log = get_logger(__name__)

Coords = dict[str, Any]
StepFn = Callable[[torch.Tensor, Coords], tuple[torch.Tensor, Coords]]

BOUNDARY_LEVEL = 2


@dataclass
class RolloutBoundary:
    """The last completed step of a rollout: enough to continue it bit for bit."""

    step: int = -1  # index of the last yielded step; 0 is the initial condition
    x: torch.Tensor | None = None
    coords: dict[str, Any] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)  # whose rollout this is


def member_ids(coords: Coords) -> list[int]:
    """Ensemble member ids of a batch (``coords["ensemble"]``), or ``[]`` for none."""
    ids = coords.get("ensemble")
    if ids is None:
        return []
    return [int(i) for i in np.asarray(ids).reshape(-1)]


class ResumableRollout:
    """Records rollout boundaries and resumes iterators from a restored one.

    Create one per model (it binds its boundary state under ``state_id``) inside the
    checkpoint session, then build iterators with :meth:`iterate`. Resuming happens at most
    once per restored boundary and only for the members it was saved for, so a restored
    state can never leak into another batch.
    """

    def __init__(self, state_id: str) -> None:
        self._boundary = bind_checkpoint_state(RolloutBoundary(), state_id=state_id)
        self._consumed = False

    @property
    def boundary(self) -> RolloutBoundary:
        return self._boundary.checkpoint_dataclass

    def _recording(self) -> bool:
        return self._boundary.checkpoint_enabled and self._boundary.checkpoint_level >= 2

    def resume_step(self, coords: Coords) -> int | None:
        """The boundary step an iterator for ``coords`` would resume after, or None."""
        b = self.boundary
        if (
            self._consumed
            or not self._boundary.checkpoint_state_loaded
            or self._boundary.checkpoint_level < BOUNDARY_LEVEL
            or b.step < 0
            or b.x is None
            or b.members != member_ids(coords)
        ):
            return None
        return b.step

    def iterate(
        self, x: torch.Tensor, coords: Coords, step_fn: StepFn
    ) -> Iterator[tuple[torch.Tensor, Coords]]:
        """An iterator over (x, coords): the initial condition, then ``step_fn`` steps.

        Resumed from a restored boundary of the same members, it starts after that step
        (on the device of ``x``); the ``x`` passed in is then not used. The decision is
        taken now, not at the first ``next()``.
        """
        resume = self.resume_step(coords)
        if resume is not None:
            self._consumed = True
            b = self.boundary
            assert b.x is not None
            log.info("resuming rollout of members %s after step %d", b.members, resume)
            return self._run(b.x.to(x.device), dict(b.coords), step_fn, resume, skip_first=True)
        return self._run(x, coords, step_fn, 0, skip_first=False)

    def _run(
        self, x: torch.Tensor, coords: Coords, step_fn: StepFn, step: int, *, skip_first: bool
    ) -> Iterator[tuple[torch.Tensor, Coords]]:
        if not skip_first:
            self._record(step, x, coords)
            yield x, coords
        while True:
            x, coords = step_fn(x, coords)
            step += 1
            self._record(step, x, coords)
            yield x, coords

    def _record(self, step: int, x: torch.Tensor, coords: Coords) -> None:
        b = self.boundary
        if self._recording():
            b.step, b.x, b.coords, b.members = step, x, dict(coords), member_ids(coords)
        elif b.x is not None or b.step != -1:
            b.step, b.x, b.coords, b.members = -1, None, {}, []
