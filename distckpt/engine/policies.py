"""Loading a model for training: how strictly saved weights must fit, and what was done.

``load_model`` reads a ``nn.Module`` state_dict from a row under a ``LoadPolicy`` (strict,
partial, or shape-tolerant transfer learning), migrates it if its version is older,
freezes named submodules and warm-starts an optimizer and scheduler. Nothing is skipped
silently: the returned ``LoadReport`` lists every key loaded, skipped, missing or
unexpected, and the migration chain applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from distckpt.dist import step
from distckpt.dist.comm import resolve
from distckpt.engine import steps as engine
from distckpt.engine.api import StoreLike, _store, migrate_row_states
from distckpt.engine.restore import read_part
from distckpt.errors import CheckpointError, CheckpointStateSchemaError
from distckpt.logs import get_logger
from distckpt.migrate.migrations import AppliedMigration, MigrationRegistry

log = get_logger(__name__)

Mode = Literal["strict", "partial", "shape_tolerant"]
_MODES = ("strict", "partial", "shape_tolerant")
_LISTED = 20  # keys named in one message


@dataclass(frozen=True)
class LoadPolicy:
    """How saved weights must fit the live model.

    - ``strict``: every key on both sides, every shape equal; otherwise raise.
    - ``partial``: missing and unexpected keys are reported, live values kept; shapes of
      common keys must still match.
    - ``shape_tolerant``: as partial, and keys whose shapes differ are skipped and reported
      (transfer learning onto a new head), keeping the live initialisation.

    ``freeze``: submodule names (prefixes of parameter names) whose parameters get
    ``requires_grad=False`` after loading. ``warm_start``: restore the optimizer and
    scheduler state when the row has it and it fits.
    """

    mode: Mode = "strict"
    freeze: tuple[str, ...] = ()
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise CheckpointError(f"LoadPolicy mode must be one of {_MODES}, not {self.mode!r}")
        if isinstance(self.freeze, str):
            object.__setattr__(self, "freeze", (self.freeze,))
        else:
            object.__setattr__(self, "freeze", tuple(self.freeze))


@dataclass(frozen=True)
class SkippedKey:
    """A saved value that was not loaded, with why (``shape`` or ``type``)."""

    key: str
    reason: str
    saved: str  # the saved shape (or type), for the message
    live: str

    def __str__(self) -> str:
        return f"{self.key} (saved {self.saved}, live {self.live})"


@dataclass(frozen=True)
class WarmStart:
    """Whether an optimizer or scheduler state was restored, and if not, why."""

    restored: bool
    detail: str


@dataclass(frozen=True)
class LoadReport:
    """What ``load_model`` did with each key of the row's model state."""

    row: int
    state: str
    loaded: tuple[str, ...]
    skipped: tuple[SkippedKey, ...]
    missing: tuple[str, ...]  # live keys the row has no value for (live value kept)
    unexpected: tuple[str, ...]  # saved keys the live model does not have (ignored)
    migrated: tuple[AppliedMigration, ...]
    frozen: tuple[str, ...]  # parameter names with requires_grad turned off
    optimizer: WarmStart | None = None
    scheduler: WarmStart | None = None

    @property
    def complete(self) -> bool:
        """True when every live key got its saved value and nothing saved was left over."""
        return not (self.skipped or self.missing or self.unexpected)

    def summary(self) -> str:
        lines = [f"row {self.row}, state {self.state!r}: {len(self.loaded)} key(s) loaded"]
        for record in self.migrated:
            lines.append(
                f"migrated {record.state!r} from version {record.from_version} to "
                f"{record.to_version}"
            )
        for title, items in (
            ("skipped", [str(s) for s in self.skipped]),
            ("missing", list(self.missing)),
            ("unexpected", list(self.unexpected)),
            ("frozen", list(self.frozen)),
        ):
            if items:
                lines.append(f"{title} ({len(items)}): {_listing(items)}")
        for name, warm in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            if warm is not None:
                lines.append(f"{name}: {warm.detail}")
        return "\n".join(lines)


def _listing(keys: list[str] | tuple[str, ...]) -> str:
    more = f" +{len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return type(value).__qualname__


@dataclass(frozen=True)
class _Plan:
    """Everything decided before anything is modified."""

    report: LoadReport
    weights: dict[str, Any]
    frozen_params: tuple[torch.nn.Parameter, ...]
    optimizer_state: Any
    scheduler_state: Any


def load_model(
    model: torch.nn.Module,
    store: StoreLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    policy: LoadPolicy | None = None,
    migrations: MigrationRegistry | None = None,
    version: int | None = None,
    state: str = "model",
    optimizer_state: str = "optimizer",
    scheduler_state: str = "scheduler",
    row: int | None = None,
    comm: Any = None,
) -> LoadReport:
    """Collective: load ``model``'s weights from the row's state ``state`` under ``policy``.

    The row is what ``distckpt.save({"model": model.state_dict(), "optimizer":
    optimizer.state_dict(), "scheduler": scheduler.state_dict()}, store)`` wrote. The saved
    state is migrated in memory to ``version`` (default: the model class's
    ``__checkpoint_version__``, if it declares one). Every check runs before anything is
    modified, and a rank that cannot load makes every rank raise the same error.
    """
    pol = policy or LoadPolicy()
    st = _store(store)
    c = resolve(comm)
    view = engine.open_row(st, c, row)
    saved = read_part(view, c, only={state, optimizer_state, scheduler_state})
    target = (
        version if version is not None else getattr(type(model), "__checkpoint_version__", None)
    )
    applied: tuple[AppliedMigration, ...] = ()
    if target is not None:
        saved, applied = migrate_row_states(view, saved, {state: int(target)}, migrations, c)
    plan = step.run(
        c,
        step.LOAD_MODEL,
        lambda: _plan(
            model,
            saved,
            tuple(view.manifest.states),
            view.row,
            state,
            pol,
            applied,
            (optimizer, optimizer_state),
            (scheduler, scheduler_state),
        ),
        context=f"row {view.row} of {st.path} does not fit the model",
        fallback=CheckpointStateSchemaError,
    )
    model.load_state_dict(plan.weights, strict=False)
    for param in plan.frozen_params:
        param.requires_grad_(False)
    if optimizer is not None and plan.optimizer_state is not None:
        optimizer.load_state_dict(plan.optimizer_state)
    if scheduler is not None and plan.scheduler_state is not None:
        scheduler.load_state_dict(plan.scheduler_state)
    report = plan.report
    if not report.complete:
        log.warning("loaded a model partially from %s: %s", st.path, report.summary())
    return report


def _plan(
    model: torch.nn.Module,
    saved: dict[str, Any],
    held: tuple[str, ...],
    row: int,
    state: str,
    policy: LoadPolicy,
    applied: tuple[AppliedMigration, ...],
    optimizer: tuple[torch.optim.Optimizer | None, str],
    scheduler: tuple[Any, str],
) -> _Plan:
    if state not in saved:
        raise CheckpointStateSchemaError(
            f"row {row} has no state {state!r} (it holds {sorted(held)}); pass state=..."
        )
    weights = saved[state]
    if not isinstance(weights, dict):
        raise CheckpointStateSchemaError(
            f"state {state!r} of row {row} is a {type(weights).__qualname__}, not a state_dict"
        )
    live = model.state_dict()
    loaded: list[str] = []
    skipped: list[SkippedKey] = []
    missing = [k for k in live if k not in weights]
    unexpected = [str(k) for k in weights if k not in live]
    for key, value in live.items():
        if key not in weights:
            continue
        got = weights[key]
        if isinstance(value, torch.Tensor) and not isinstance(got, torch.Tensor):
            skipped.append(SkippedKey(key, "type", _describe(got), _describe(value)))
        elif isinstance(value, torch.Tensor) and got.shape != value.shape:
            skipped.append(SkippedKey(key, "shape", _describe(got), _describe(value)))
        else:
            loaded.append(key)
    _check_policy(policy, state, skipped, missing, unexpected)
    frozen_names, frozen_params = _to_freeze(model, policy.freeze)
    partial = bool(skipped or missing or unexpected)
    opt_warm, opt_state = _optimizer_plan(optimizer, saved, policy, partial)
    sched_warm, sched_state = _scheduler_plan(scheduler, saved, policy)
    report = LoadReport(
        row=row,
        state=state,
        loaded=tuple(loaded),
        skipped=tuple(skipped),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        migrated=applied,
        frozen=frozen_names,
        optimizer=opt_warm,
        scheduler=sched_warm,
    )
    return _Plan(report, {k: weights[k] for k in loaded}, frozen_params, opt_state, sched_state)


def _check_policy(
    policy: LoadPolicy,
    state: str,
    skipped: list[SkippedKey],
    missing: list[str],
    unexpected: list[str],
) -> None:
    problems = []
    if skipped and policy.mode != "shape_tolerant":
        problems.append(
            f"shapes differ for {_listing([str(s) for s in skipped])} "
            "(LoadPolicy(mode='shape_tolerant') skips them)"
        )
    if policy.mode == "strict":
        if missing:
            problems.append(f"not in the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_listing(unexpected)}")
        if missing or unexpected:
            problems.append("LoadPolicy(mode='partial') keeps the live values")
    if problems:
        raise CheckpointStateSchemaError(f"state {state!r}: " + "; ".join(problems))


def _to_freeze(
    model: torch.nn.Module, prefixes: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[torch.nn.Parameter, ...]]:
    names: list[str] = []
    params: list[torch.nn.Parameter] = []
    for prefix in prefixes:
        found = [
            (n, p)
            for n, p in model.named_parameters()
            if n == prefix or n.startswith(prefix.rstrip(".") + ".") or prefix == ""
        ]
        if not found:
            raise CheckpointStateSchemaError(f"freeze: {prefix!r} names no parameter of the model")
        for n, p in found:
            if n not in names:
                names.append(n)
                params.append(p)
    return tuple(names), tuple(params)


def _optimizer_plan(
    optimizer: tuple[torch.optim.Optimizer | None, str],
    saved: dict[str, Any],
    policy: LoadPolicy,
    partial: bool,
) -> tuple[WarmStart | None, Any]:
    opt, sid = optimizer
    if opt is None:
        return None, None
    if not policy.warm_start:
        return WarmStart(False, "not restored: warm start is off in the policy"), None
    if sid not in saved:
        return WarmStart(False, f"not restored: the row has no state {sid!r}"), None
    if partial:
        return WarmStart(
            False, "not restored: the model was loaded partially, so its moments do not fit"
        ), None
    state = saved[sid]
    problem = _optimizer_mismatch(opt, state)
    if problem:
        return WarmStart(False, f"not restored: {problem}"), None
    return WarmStart(True, f"restored from state {sid!r}"), state


def _optimizer_mismatch(opt: torch.optim.Optimizer, state: Any) -> str | None:
    if not (isinstance(state, dict) and "param_groups" in state and "state" in state):
        return "the saved value is not an optimizer state_dict"
    saved_groups = [len(g.get("params", ())) for g in state["param_groups"]]
    live_groups = [len(g["params"]) for g in opt.param_groups]
    if saved_groups != live_groups:
        return f"parameter groups hold {saved_groups} saved, {live_groups} live"
    params = [p for g in opt.param_groups for p in g["params"]]
    for index, entry in state["state"].items():
        if (
            not isinstance(index, int)
            or not 0 <= index < len(params)
            or not isinstance(entry, dict)
        ):
            return f"state for parameter {index!r} does not fit"
        for name, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.ndim > 0
                and value.shape != params[index].shape
            ):
                return (
                    f"{name!r} of parameter {index} is {tuple(value.shape)}, the parameter is "
                    f"{tuple(params[index].shape)}"
                )
    return None


def _scheduler_plan(
    scheduler: tuple[Any, str], saved: dict[str, Any], policy: LoadPolicy
) -> tuple[WarmStart | None, Any]:
    sched, sid = scheduler
    if sched is None:
        return None, None
    if not policy.warm_start:
        return WarmStart(False, "not restored: warm start is off in the policy"), None
    if sid not in saved:
        return WarmStart(False, f"not restored: the row has no state {sid!r}"), None
    state = saved[sid]
    live = sched.state_dict()
    if not isinstance(state, dict) or set(state) != set(live):
        return WarmStart(False, "not restored: the saved scheduler has other fields"), None
    return WarmStart(True, f"restored from state {sid!r}"), state


__all__ = ["LoadPolicy", "LoadReport", "SkippedKey", "WarmStart", "load_model"]
