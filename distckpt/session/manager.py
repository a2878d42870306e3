"""A checkpoint manager for training loops: when to save, what to keep, resume, preemption.

:class:`CheckpointManager` is policy over the functional API (Orbax's ``CheckpointManager``,
Lightning's ``ModelCheckpoint``): it saves every ``save_interval_steps`` steps (through an
:class:`~distckpt.engine.asyncwrite.AsyncSaver` by default), records the step and metrics
with each row, keeps rows by composable retention policies (newest N, one every K steps, the
best k by a metric) and restores the newest committed row into a live state. A preemption
signal (SIGUSR1/SIGTERM) on any rank makes the next :meth:`~CheckpointManager.should_save`
true on every rank; that save is committed, then the job exits with the requeue status (85).

.. code-block:: python

    with distckpt.CheckpointManager("ckpt", save_interval_steps=100, keep_last=3) as mgr:
        state = {"model": model, "optim": optimizer, "data": loader}  # Stateful values
        last = mgr.restore(state)  # the step saved last, or None on a fresh start
        for step in range(0 if last is None else last + 1, n_steps):
            loss = train_step(...)
            if mgr.should_save(step):
                mgr.save(step, state, metrics={"loss": loss})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from distckpt.dist.comm import Communicator, resolve
from distckpt.dist.election import row_status
from distckpt.dist.retention import (
    AnyOf,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    RetentionPolicy,
)
from distckpt.engine import api
from distckpt.engine.asyncwrite import AsyncSaver
from distckpt.errors import CheckpointError
from distckpt.logs import get_logger
from distckpt.session.preempt import PreemptionHandler
from distckpt.storage.store import Store

log = get_logger(__name__)

#: The metadata keys a manager's rows carry (read back by the retention policies).
STEP_KEY = "step"
METRICS_KEY = "metrics"

BestSpec = tuple[str, int, Literal["min", "max"]] | tuple[str, int] | KeepBest


def retention_policy(
    *,
    keep_last: int | None = None,
    keep_every_n_steps: int | None = None,
    keep_best: BestSpec | None = None,
    extra: RetentionPolicy | None = None,
) -> RetentionPolicy | None:
    """The union of the policies asked for (a row stays when any keeps it); None: keep all."""
    policies: list[RetentionPolicy] = []
    if keep_last is not None:
        policies.append(KeepLatest(keep_last))
    if keep_every_n_steps is not None:
        policies.append(KeepEveryNSteps(keep_every_n_steps, key=STEP_KEY))
    if keep_best is not None:
        policies.append(keep_best if isinstance(keep_best, KeepBest) else KeepBest(*keep_best))
    if extra is not None:
        policies.append(extra)
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else AnyOf(tuple(policies))


def _plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON-like values (0-d tensors and numpy scalars as Python numbers)."""
    out: dict[str, Any] = {}
    for name, value in (metrics or {}).items():
        item = getattr(value, "item", None)
        out[str(name)] = item() if callable(item) else value
    return out


class CheckpointManager:
    """Saves, retention, resume and preemption for a training loop; every method that
    touches the store is collective (every rank calls it with the same step).

    ``store``: a path or :class:`~distckpt.Store`. ``save_interval_steps``: :meth:`should_save`
    is true at steps that are multiples of it (and when preempted). Retention (a row stays
    when any of these keeps it; none given: every row stays): ``keep_last`` newest rows,
    ``keep_every_n_steps`` (the first row of every window of that many steps),
    ``keep_best=(metric, k, "min"|"max")`` (by the ``metrics`` given to :meth:`save`),
    ``retention`` (any other :class:`~distckpt.dist.retention.RetentionPolicy`). The newest
    committed row and rows this process is reading are never deleted.
    ``async_``: saves return once the state is staged (an ``AsyncSaver``, ``max_in_flight``
    rows at a time) instead of once committed. ``preemption``: True installs a
    :class:`~distckpt.PreemptionHandler` (SIGUSR1, SIGTERM; from the main thread), or pass
    your own, or False; ``exit_on_preemption``: the preempted save commits, then raises
    ``SystemExit`` with the handler's requeue status (else :attr:`reached_preemption` says
    so and the loop decides). ``comm``: as for :func:`distckpt.save`.

    Values in the state may be Stateful (``state_dict()``/``load_state_dict()``): modules,
    optimizers, schedulers, ``StatefulDataLoader``; for FSDP2 wrap
    ``get_state_dict``/``set_state_dict`` in such an object (see ``examples/train_fsdp2.py``).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store,
        *,
        save_interval_steps: int = 1,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: BestSpec | None = None,
        retention: RetentionPolicy | None = None,
        async_: bool = True,
        max_in_flight: int = 1,
        preemption: bool | PreemptionHandler = True,
        exit_on_preemption: bool = True,
        checksums: bool = True,
        comm: Any = None,
    ) -> None:
        if (
            isinstance(save_interval_steps, bool)
            or not isinstance(save_interval_steps, int)
            or save_interval_steps < 1
        ):
            raise ValueError(
                f"save_interval_steps must be an int >= 1, not {save_interval_steps!r}"
            )
        self.store = store if isinstance(store, Store) else Store(store)
        self.comm: Communicator = resolve(comm)
        self.save_interval_steps = save_interval_steps
        self.retention = retention_policy(
            keep_last=keep_last,
            keep_every_n_steps=keep_every_n_steps,
            keep_best=keep_best,
            extra=retention,
        )
        self.async_ = async_
        self.max_in_flight = max_in_flight
        self.checksums = checksums
        self.exit_on_preemption = exit_on_preemption
        self._installed = False
        self.preemption: PreemptionHandler | None
        if preemption is True:
            self.preemption = PreemptionHandler(comm=self.comm)
        elif preemption is False or preemption is None:
            self.preemption = None
        elif isinstance(preemption, PreemptionHandler):
            self.preemption = preemption
        else:
            raise TypeError(f"preemption must be a bool or a PreemptionHandler, not {preemption!r}")
        if self.preemption is not None and not self.preemption._installed:
            self.preemption.install()
            self._installed = True
        self._saver: AsyncSaver | None = None
        self._decided: tuple[int, bool] | None = None  # (step, should_save) asked last
        self._last_saved: int | None = None
        self._last_row: int | None = None  # the newest row a synchronous save committed
        self._saved_since_stop = False  # a row was saved after the ranks agreed to stop
        self._closed = False

    # -- the loop ------------------------------------------------------------------------------
    @property
    def reached_preemption(self) -> bool:
        """Whether the ranks agreed to stop (a signal reached one of them)."""
        return self.preemption is not None and self.preemption.stopping

    def should_save(self, step: int) -> bool:
        """Collective: whether ``step`` is saved: a multiple of ``save_interval_steps`` not
        saved yet, or any rank was signalled (agreed by every rank, one small allgather per
        call). Asking again for the same step gives the same answer without communicating."""
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        due = step % self.save_interval_steps == 0 and step != self._last_saved
        if self.preemption is not None and self.preemption.should_stop():
            due = not self._saved_since_stop  # one save, then save() exits (or the loop ends)
        self._decided = (step, due)
        return due

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
        **metadata: Any,
    ) -> bool:
        """Collective: save ``state`` as the row of ``step`` when :meth:`should_save` says so
        (or ``force``); returns whether it did. ``metrics`` (numbers) are recorded with the
        row (``keep_best`` ranks rows by them); ``metadata`` as for :func:`distckpt.save`.
        When the ranks agreed to stop, the row is committed and, with
        ``exit_on_preemption``, ``SystemExit(requeue status)`` is raised on every rank."""
        if self._closed:
            raise CheckpointError(f"the checkpoint manager of {self.store.path} is closed")
        if not isinstance(state, dict):
            raise CheckpointError(f"state must be a dict, not {type(state).__qualname__}")
        due = self.should_save(step) or force
        saved = due and step != self._last_saved  # a step is saved once
        if saved:
            record = {**metadata, STEP_KEY: int(step), METRICS_KEY: _plain_metrics(metrics)}
            if self.async_:
                self._async_saver().save(state, **record)
            else:
                self._last_row = api.save(
                    state,
                    self.store,
                    comm=self.comm,
                    keep=self.retention,
                    checksums=self.checksums,
                    **record,
                )
            self._last_saved = step
            self._saved_since_stop = self.reached_preemption
        if self.reached_preemption and self.exit_on_preemption:
            assert self.preemption is not None
            self.preemption.checkpoint_and_exit(self.wait)
        return saved

    def _async_saver(self) -> AsyncSaver:
        if self._saver is None:  # collective: every rank saves at the same steps
            self._saver = AsyncSaver(
                self.store,
                comm=self.comm,
                max_in_flight=self.max_in_flight,
                keep=self.retention,
                checksums=self.checksums,
            )
        return self._saver

    def restore(
        self, state: dict[str, Any], *, step: int | None = None, **load_options: Any
    ) -> int | None:
        """Collective: fill ``state`` (in place; Stateful values through
        ``load_state_dict``) from the newest committed row, or from the row of ``step``;
        returns the step that row saved, or None when there is none (a fresh start).
        ``load_options`` go to :func:`distckpt.load` (``strict``, ``mapping``...); a row
        written by another number of ranks is restored as ``load`` does."""
        row = api.latest(self.store, comm=self.comm) if step is None else self._row_of(step)
        if row is None:
            return None
        api.load(state, self.store, row=row, comm=self.comm, **load_options)
        saved = api.metadata(self.store, row=row).get(STEP_KEY)
        saved_step = int(saved) if isinstance(saved, int) else None
        self._last_saved = saved_step
        self._decided = None
        return saved_step

    def _row_of(self, step: int) -> int:
        rows = {s: r for r, s in self.steps().items()}
        if step not in rows:
            raise CheckpointError(f"{self.store.path} has no committed row of step {step}")
        return rows[step]

    # -- what the store holds -----------------------------------------------------------------
    def steps(self) -> dict[int, int]:
        """Offline: committed row -> the step it saved, oldest first (rows without one left
        out)."""
        out: dict[int, int] = {}
        if self.store.root_attributes() is None:
            return out
        for row in self.store.rows():
            if not row_status(self.store, row).committed:
                continue
            value = api.metadata(self.store, row=row).get(STEP_KEY)
            if isinstance(value, int):
                out[row] = value
        return out

    def latest_step(self) -> int | None:
        """Offline: the step of the row a restart would restore (None: none)."""
        row = api.latest(self.store)
        if row is None:
            return None
        value = api.metadata(self.store, row=row).get(STEP_KEY)
        return value if isinstance(value, int) else None

    # -- ending --------------------------------------------------------------------------------
    def wait(self) -> int | None:
        """Collective: wait until every save so far is committed; the newest row this manager
        committed (None: none yet)."""
        if self._saver is not None:
            return self._saver.wait()
        return self._last_row

    def close(self) -> None:
        """Collective: :meth:`wait`, stop the writer thread, put back the signal handlers."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            self._uninstall()

    def _uninstall(self) -> None:
        if self._installed and self.preemption is not None:
            self.preemption.uninstall()
            self._installed = False

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Unwinding (an error on this rank, or the preemption exit): finish locally only.
        self._closed = True
        try:
            if self._saver is not None:
                self._saver.__exit__(exc_type, exc, tb)
        finally:
            self._uninstall()
