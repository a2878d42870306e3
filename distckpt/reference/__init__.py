"""Reference workflows: small, CPU-friendly, real models and an ensemble forecast loop.

They show how components bind restart state and are what the crash tests kill: a
deterministic persistence-like model, a stochastic model with an evolving per-member noise
state (in the manner of FourCastNet 3), a Gaussian initial-condition perturbation with its
own generators, and an ensemble workflow that spreads members over ranks and batches.
"""

from distckpt.reference.ensemble import EnsembleConfig, assign_members, plan_batches, run_ensemble
from distckpt.reference.models import Persistence, StochasticModel, initial_condition
from distckpt.reference.output import ForecastStore
from distckpt.reference.perturbation import GaussianPerturbation

__all__ = [
    "EnsembleConfig",
    "ForecastStore",
    "GaussianPerturbation",
    "Persistence",
    "StochasticModel",
    "assign_members",
    "plan_batches",
    "initial_condition",
    "run_ensemble",
]
