"""Schema migrations: steps from version N to N+1 of a named state, chained on load.

Users register the steps (lists of :mod:`surgery` operations, or a function) in a
``MigrationRegistry``; reading a state saved at an older version applies the chain in
memory, and a state saved by a newer version is refused with both versions named. What was
applied is a JSON record, kept in a migrated row's metadata and in load reports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from distckpt.errors import MigrationError, SchemaVersionError
from distckpt.format.manifest import StateRecord
from distckpt.migrate.surgery import Op, TransformState, Tree, iter_ops


@dataclass(frozen=True)
class Migration:
    """The step of state ``state`` from ``from_version`` to ``from_version + 1``."""

    state: str
    from_version: int
    ops: tuple[Op, ...]

    @property
    def to_version(self) -> int:
        return self.from_version + 1

    def describe(self) -> dict[str, Any]:
        return {
            "from": self.from_version,
            "to": self.to_version,
            "ops": [op.describe() for op in self.ops],
        }


@dataclass(frozen=True)
class AppliedMigration:
    """The chain applied to one state: from its saved version to the reader's."""

    state: str
    from_version: int
    to_version: int
    steps: tuple[Migration, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "from": self.from_version,
            "to": self.to_version,
            "steps": [m.describe() for m in self.steps],
        }


def newer_version_error(state: str, saved: int, known: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"state {state!r} was saved by schema version {saved}; this code knows version "
        f"{known}: upgrade the code that defines {state!r} (migrations only go forward)"
    )


class MigrationRegistry:
    """The registered steps, by state and version. Pass one explicitly to a loader, or use
    the process-wide :data:`default_registry` through :func:`register_migration`."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Migration] = {}

    def register(self, state: str, from_version: int, ops: Any) -> Migration:
        """Register the step of ``state`` from ``from_version`` to ``from_version + 1``."""
        if isinstance(from_version, bool) or not isinstance(from_version, int):
            raise MigrationError(f"from_version of state {state!r} must be an int")
        if (state, from_version) in self._steps:
            raise MigrationError(
                f"a migration of state {state!r} from version {from_version} to "
                f"{from_version + 1} is already registered"
            )
        step = Migration(state, from_version, tuple(iter_ops(ops)))
        self._steps[(state, from_version)] = step
        return step

    def migration(
        self, state: str, from_version: int
    ) -> Callable[[Callable[[Tree], Tree]], Callable[[Tree], Tree]]:
        """Decorator: register ``fn(state_mapping) -> new mapping`` as one step."""

        def decorate(fn: Callable[[Tree], Tree]) -> Callable[[Tree], Tree]:
            self.register(state, from_version, [TransformState(fn)])
            return fn

        return decorate

    def versions(self, state: str) -> list[int]:
        """The versions of ``state`` that have a step to the next one, ascending."""
        return sorted(v for s, v in self._steps if s == state)

    def chain(self, state: str, from_version: int, to_version: int) -> tuple[Migration, ...]:
        """The steps from ``from_version`` to ``to_version``; refuses a newer saved version
        and names the first missing step."""
        if from_version > to_version:
            raise newer_version_error(state, from_version, to_version)
        steps = []
        for version in range(from_version, to_version):
            step = self._steps.get((state, version))
            if step is None:
                known = self.versions(state)
                have = f"steps start at versions {known}" if known else "no step is registered"
                raise MigrationError(
                    f"no migration of state {state!r} from version {version} to {version + 1} "
                    f"(needed to go from saved version {from_version} to {to_version}; "
                    f"{have}): register one with "
                    f"register_migration({state!r}, from_version={version}, ops=[...])"
                )
            steps.append(step)
        return tuple(steps)

    def migrate(
        self, state: str, tree: Any, from_version: int, to_version: int
    ) -> tuple[Any, AppliedMigration | None]:
        """``tree`` brought from ``from_version`` to ``to_version`` (a new tree; the input
        is not modified). Returns None as the record when nothing was applied."""
        steps = self.chain(state, from_version, to_version)
        if not steps:
            return tree, None
        for step in steps:
            where = f"state {state!r}, migration {step.from_version} -> {step.to_version}"
            for op in step.ops:
                try:
                    tree = op.apply(tree)
                except MigrationError as exc:
                    raise MigrationError(f"{where}: {exc}") from exc
                except Exception as exc:
                    raise MigrationError(
                        f"{where}: {op.label()} failed: {type(exc).__name__}: {exc}"
                    ) from exc
        return tree, AppliedMigration(state, from_version, to_version, steps)

    def __repr__(self) -> str:
        return f"MigrationRegistry({sorted(self._steps)})"


default_registry = MigrationRegistry()


def register_migration(
    state: str, from_version: int, ops: Any, *, registry: MigrationRegistry | None = None
) -> Migration:
    """Register a step of ``state`` from ``from_version`` to ``from_version + 1``."""
    return (registry or default_registry).register(state, from_version, ops)


def migration(
    state: str, from_version: int, *, registry: MigrationRegistry | None = None
) -> Callable[[Callable[[Tree], Tree]], Callable[[Tree], Tree]]:
    """Decorator form of :func:`register_migration` for a function on the state mapping."""
    return (registry or default_registry).migration(state, from_version)


def migrate_states(
    saved: Mapping[str, Any],
    records: Mapping[str, StateRecord],
    targets: Mapping[str, int],
    registry: MigrationRegistry | None = None,
) -> tuple[dict[str, Any], tuple[AppliedMigration, ...]]:
    """Bring each saved state named in ``targets`` to its target version, in memory.

    States without a target are left as saved. Raises SchemaVersionError for a state saved
    by a newer version and MigrationError for a missing step.
    """
    reg = registry or default_registry
    out = dict(saved)
    applied = []
    for state, target in targets.items():
        if state not in out:
            continue
        out[state], record = reg.migrate(state, out[state], records[state].version, target)
        if record is not None:
            applied.append(record)
    return out, tuple(applied)


def metadata_after(
    metadata: dict[str, Any], applied: tuple[AppliedMigration, ...]
) -> dict[str, Any]:
    """Row metadata with every applied step's metadata operations run, in order."""
    for record in applied:
        for step in record.steps:
            for op in step.ops:
                metadata = op.apply_metadata(metadata)
    return metadata


def load_migrations(spec: str) -> MigrationRegistry:
    """Import user code that registers migrations: a ``.py`` file path or a module name.

    The module's ``migrations`` attribute is used when it is a MigrationRegistry; otherwise
    the module is expected to have registered into the default registry.
    """
    if spec.endswith(".py") or os.sep in spec or os.path.isfile(spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise MigrationError(f"migrations file {spec} does not exist")
        name = "distckpt_user_migrations_" + str(abs(hash(path)))
        if name in sys.modules:  # imported once per process: its registrations stand
            return _registry_of(sys.modules[name])
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise MigrationError(f"cannot import migrations from {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(spec)
        except ImportError as exc:
            raise MigrationError(f"cannot import migrations module {spec!r}: {exc}") from exc
    return _registry_of(module)


def _registry_of(module: Any) -> MigrationRegistry:
    found = getattr(module, "migrations", None)
    return found if isinstance(found, MigrationRegistry) else default_registry


__all__ = [
    "AppliedMigration",
    "Migration",
    "MigrationRegistry",
    "default_registry",
    "load_migrations",
    "metadata_after",
    "migrate_states",
    "migration",
    "newer_version_error",
    "register_migration",
]
