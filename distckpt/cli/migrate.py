"""``distckpt migrate``: write a migrated copy of a row as a new row or a new store.

The migrations are user code (a module or ``.py`` file that registers them); the command
imports it, migrates the chosen row's states to the version asked for and records the
applied chain in the new row's metadata. Old rows are never touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from distckpt.cli.common import EXIT_NO_ROW, CliError, emit_json, handle_errors, open_store
from distckpt.storage.store import Store

if TYPE_CHECKING:
    from distckpt.migrate.migrations import MigrationRegistry


@click.command("migrate", short_help="Write a row migrated to a newer schema version.")
@click.argument("store", type=click.Path())
@click.option(
    "--to", "to_version", type=click.IntRange(min=0), required=True, help="Target version."
)
@click.option("--state", default=None, help="Only this state (default: every state of the row).")
@click.option(
    "--row",
    type=click.IntRange(min=0),
    default=None,
    help="The row to migrate (default: the latest committed row).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(),
    default=None,
    help="Write into this new store instead of adding a row to STORE.",
)
@click.option(
    "--migrations",
    "module",
    default=None,
    help="Python module name or .py file that registers the migrations.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
@handle_errors
def migrate_command(
    store: str,
    to_version: int,
    state: str | None,
    row: int | None,
    out: str | None,
    module: str | None,
    as_json: bool,
) -> None:
    """Migrate a row of STORE to schema version --to, writing a NEW row (or a new store).

    Reads every rank's part of the row, applies the registered migrations from each state's
    saved version to --to in memory, and only then writes: as the next row of STORE, or as
    the first row of the new store --out. The source row is never modified, and a state
    saved by a newer version than --to is refused. The new row's metadata holds
    ``migrated_from``: the source store and row, and per state the versions and the
    operations applied.
    """
    from distckpt.engine.rewrite import migrate_row
    from distckpt.migrate.migrations import default_registry, load_migrations

    st, attrs = open_store(store, missing_code=EXIT_NO_ROW)
    if not attrs:
        raise CliError(f"no committed row in {st.path} to migrate", EXIT_NO_ROW)
    registry: MigrationRegistry = load_migrations(module) if module else default_registry
    result = migrate_row(
        st,
        to_version,
        state=state,
        row=row,
        out=Store(out) if out is not None else None,
        registry=registry,
    )
    if as_json:
        emit_json(
            {
                "source": result.source,
                "source_row": result.source_row,
                "store": result.store,
                "row": result.row,
                "world_size": result.world_size,
                "migrated": [a.to_json() for a in result.applied],
            }
        )
        return
    if result.row is None:
        click.echo(
            f"row {result.source_row} of {result.source}: every state is already at version "
            f"{to_version}; nothing written"
        )
        return
    for a in result.applied:
        click.echo(f"state {a.state}: version {a.from_version} -> {a.to_version}")
    click.echo(
        f"wrote row {result.row} of {result.store} ({result.world_size} rank"
        f"{'s' if result.world_size != 1 else ''}) from row {result.source_row} of "
        f"{result.source}"
    )
