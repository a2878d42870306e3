"""Gaussian initial-condition perturbation with per-member generators.

Each member's draw comes from its own generator, seeded from (seed, member), whose state is
checkpointed keyed by member id: before the draw at level 1 (a re-run item draws the same
noise again), after it at level 2. Draws therefore never depend on batching or on which
rank holds a member.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distckpt.reference.models import seed_for
from distckpt.session.binding import bind_checkpoint_state
from distckpt.session.rollout import Coords, member_ids


@dataclass
class PerturbationRng:
    generators: dict[int, torch.Tensor] = field(default_factory=dict)


class GaussianPerturbation:
    def __init__(self, *, std: float = 0.1, seed: int = 0, name: str = "gaussian") -> None:
        self.std = std
        self.seed = seed
        self._state = bind_checkpoint_state(
            PerturbationRng(), state_id=f"distckpt.reference.{name}.rng"
        )

    def _generator(self, member: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        saved = self._state.checkpoint_dataclass.generators.get(member)
        if saved is not None and self._state.checkpoint_state_loaded:
            g.set_state(saved.cpu())
        else:
            g.manual_seed(seed_for("gaussian", self.seed, member))
        return g

    def __call__(self, x: torch.Tensor, coords: Coords) -> tuple[torch.Tensor, Coords]:
        """``x + std * N(0, 1)``, one independent draw per member."""
        members = member_ids(coords)
        level = self._state.checkpoint_level if self._state.checkpoint_enabled else 0
        out = x.clone()
        kept: dict[int, torch.Tensor] = {}
        for i, m in enumerate(members):
            g = self._generator(m, x.device)
            if level == 1:
                kept[m] = g.get_state()
            out[i] += self.std * torch.randn(x.shape[1:], generator=g, device=x.device)
            if level >= 2:
                kept[m] = g.get_state()
        self._state.checkpoint_dataclass.generators = kept
        return out, coords
