"""Two prognostic models in the Earth2Studio style, with restartable rollouts.

Both take ``x`` of shape ``[members, lat, lon]`` with coordinates ``ensemble`` (member
ids), ``time`` (initial time) and ``lead_time``, and step it forward by ``dt``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distckpt.session.binding import bind_checkpoint_state
from distckpt.session.rollout import Coords, ResumableRollout, member_ids

DT = np.timedelta64(6, "h")


def initial_condition(
    shape: tuple[int, int] = (16, 32), seed: int = 0
) -> tuple[torch.Tensor, Coords]:
    """A smooth synthetic field ``[1, lat, lon]`` with its coordinates (no downloads)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.linspace(-math.pi / 2, math.pi / 2, shape[0])
    lon = torch.linspace(0, 2 * math.pi, shape[1] + 1)[:-1]
    base = torch.cos(lat)[:, None] * torch.sin(2 * lon)[None, :]
    x = (base + 0.1 * torch.randn(shape, generator=g))[None]
    coords: Coords = {
        "ensemble": np.array([0]),
        "time": np.array(["2026-01-01T00"], dtype="datetime64[h]"),
        "lead_time": np.array([0], dtype="timedelta64[h]"),
        "lat": lat.numpy(),
        "lon": lon.numpy(),
    }
    return x, coords


def seed_for(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (same on every rank, machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _advance(coords: Coords) -> Coords:
    out = dict(coords)
    out["lead_time"] = np.asarray(coords["lead_time"]) + DT
    return out


def _relax(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Deterministic dynamics: diffuse along longitude and relax toward the zonal mean."""
    neighbours = 0.5 * (torch.roll(x, 1, dims=-1) + torch.roll(x, -1, dims=-1))
    mean = x.mean(dim=-1, keepdim=True)
    return (1 - rate) * (0.5 * x + 0.5 * neighbours) + rate * mean


class Persistence:
    """Deterministic, persistence-like: the field diffuses slowly; no internal state."""

    def __init__(self, *, rate: float = 0.05, name: str = "persistence") -> None:
        self.rate = rate
        self._rollout = ResumableRollout(f"distckpt.reference.{name}.rollout")

    def __call__(self, x: torch.Tensor, coords: Coords) -> tuple[torch.Tensor, Coords]:
        """One step from the caller's ``x`` (never from restored state)."""
        return _relax(x, self.rate), _advance(coords)

    def create_iterator(
        self, x: torch.Tensor, coords: Coords
    ) -> Iterator[tuple[torch.Tensor, Coords]]:
        """Yields the initial condition, then one step at a time.

        After a restart from a level-2 row, the first iterator for the same members yields
        the step after the restored boundary instead (see ``ResumableRollout``).
        """
        return self._rollout.iterate(x, coords, self)

    def resume_step(self, coords: Coords) -> int | None:
        """The restored boundary step the next iterator for ``coords`` resumes after."""
        return self._rollout.resume_step(coords)


@dataclass
class MemberNoise:
    """Per-member AR(1) noise fields and the generators that drive them (member-keyed)."""

    noise: dict[int, torch.Tensor] = field(default_factory=dict)
    generators: dict[int, torch.Tensor] = field(default_factory=dict)


class StochasticModel:
    """FCN3-like: each member carries an AR(1) noise field that evolves every step.

    ``x' = relax(x) + sigma * noise``; ``noise' = phi * noise + sqrt(1 - phi^2) * eps``,
    with ``eps`` from the member's own generator, seeded from (seed, member, initial time).
    The noise state is saved keyed by member id, so any rank can continue any member.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        phi: float = 0.9,
        sigma: float = 0.05,
        rate: float = 0.05,
        name: str = "stochastic",
    ) -> None:
        self.seed, self.phi, self.sigma, self.rate = seed, phi, sigma, rate
        self._rollout = ResumableRollout(f"distckpt.reference.{name}.rollout")
        self._state = bind_checkpoint_state(
            MemberNoise(), state_id=f"distckpt.reference.{name}.noise"
        )
        self._noise: dict[int, torch.Tensor] = {}
        self._gens: dict[int, torch.Generator] = {}

    # -- noise state -----------------------------------------------------------------------
    def _init_noise(self, members: list[int], x: torch.Tensor, coords: Coords) -> None:
        init_time = str(np.asarray(coords["time"]).reshape(-1)[0])
        for m in members:
            g = torch.Generator(device=x.device)
            g.manual_seed(seed_for(self.seed, m, init_time))
            self._gens[m] = g
            self._noise[m] = torch.randn(x.shape[1:], generator=g, device=x.device)
        self._save(members)

    def _restore_noise(self, members: list[int], device: torch.device) -> None:
        saved = self._state.checkpoint_dataclass
        for m in members:
            g = torch.Generator(device=device)
            g.set_state(saved.generators[m].cpu())
            self._gens[m] = g
            self._noise[m] = saved.noise[m].to(device)

    def _save(self, members: list[int]) -> None:
        """Mirror the live noise state into the bound fields (level 2 only: it is rollout
        state; lower levels restart items from their start and must not carry it)."""
        state = self._state.checkpoint_dataclass
        if not (self._state.checkpoint_enabled and self._state.checkpoint_level >= 2):
            state.noise, state.generators = {}, {}
            return
        state.noise = {m: self._noise[m] for m in members}
        state.generators = {m: self._gens[m].get_state() for m in members}

    # -- model -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, coords: Coords) -> tuple[torch.Tensor, Coords]:
        """One step from the caller's ``x`` (never replaced by restored state) with the
        members' current noise state: restored from the checkpoint if this model was, else
        initialised from the seed."""
        members = member_ids(coords)
        missing = [m for m in members if m not in self._noise]
        saved = self._state.checkpoint_dataclass
        restorable = [
            m for m in missing if self._state.checkpoint_state_loaded and m in saved.noise
        ]
        if restorable:  # a restored model continues its members' noise
            self._restore_noise(restorable, x.device)
        fresh = [m for m in missing if m not in restorable]
        if fresh:
            self._init_noise(fresh, x, coords)
        noise = torch.stack([self._noise[m] for m in members])
        out = _relax(x, self.rate) + self.sigma * noise
        scale = math.sqrt(1 - self.phi**2)
        for m in members:
            eps = torch.randn(x.shape[1:], generator=self._gens[m], device=x.device)
            self._noise[m] = self.phi * self._noise[m] + scale * eps
        self._save(members)
        return out, _advance(coords)

    def create_iterator(
        self, x: torch.Tensor, coords: Coords
    ) -> Iterator[tuple[torch.Tensor, Coords]]:
        """Yields the initial condition, then one step at a time.

        After a restart from a level-2 row, the first iterator for the same members resumes
        after the restored boundary with the restored noise state (the noise is not
        initialised again); otherwise the members' noise starts from its seed.
        """
        members = member_ids(coords)
        if self._rollout.resume_step(coords) is not None:
            self._restore_noise(members, x.device)
        else:
            self._init_noise(members, x, coords)
        return self._rollout.iterate(x, coords, self)

    def resume_step(self, coords: Coords) -> int | None:
        """The restored boundary step the next iterator for ``coords`` resumes after."""
        return self._rollout.resume_step(coords)

    def noise_of(self, member: int) -> torch.Tensor | None:
        return self._noise.get(member)

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, "phi": self.phi, "sigma": self.sigma, "rate": self.rate}
