"""The ``distckpt`` command line: one module per command group, shared helpers in ``common``.

Importing this package registers every command on the one ``cli`` group; the command
modules import only ``common`` (and the library), never each other's registration.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Console entry point (``distckpt``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="distckpt")
