"""The ``distckpt`` command line: one module per command group, shared helpers in ``common``.

Importing this package registers every command on the one ``cli`` group; the command
modules import only ``common`` (and the library), never each other's registration.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from distckpt.cli import common, inspect, maintenance
from distckpt.cli.common import (
    EXIT_CODES,
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_LEASE,
    EXIT_NO_ROW,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    CliError,
    cli,
    error_document,
    human_bytes,
)
from distckpt.cli.interchange import export_command, import_command
from distckpt.cli.migrate import migrate_command

cli.add_command(import_command)
cli.add_command(export_command)
cli.add_command(migrate_command)

__all__ = [
    "EXIT_CODES",
    "EXIT_CORRUPT",
    "EXIT_ERROR",
    "EXIT_LEASE",
    "EXIT_NO_ROW",
    "EXIT_OK",
    "EXIT_STORE",
    "EXIT_USAGE",
    "CliError",
    "cli",
    "common",
    "human_bytes",
    "inspect",
    "main",
    "maintenance",
]


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``distckpt``).

    A usage error (unknown option, bad value) of a ``--json`` call also prints its JSON
    error document on stdout, as every other failure does.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        code = cli.main(args=args, prog_name="distckpt", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        if "--json" in args:
            click.echo(json.dumps(error_document(exc.format_message(), exc.exit_code), indent=2))
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = EXIT_ERROR
    sys.exit(code if isinstance(code, int) else EXIT_OK)
