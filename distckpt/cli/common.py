"""The ``distckpt`` command: inspect, verify and clean a checkpoint store offline.

Works on a store directory alone (no process group, no running job). Every command prints
human-readable text by default and stable JSON with ``--json``; errors are one line on
stderr and a documented exit status (see ``EXIT_CODES`` and docs/cli.md).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import numpy as np

from distckpt.dist.election import RowStatus
from distckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NoCommittedRowError,
    StoreFormatError,
    WorldSizeMismatchError,
)
from distckpt.format import tree as codec
from distckpt.format.layout import ZARR_JSON
from distckpt.format.manifest import RankManifest
from distckpt.storage.lease import LeaseHeldError, LeaseStatus
from distckpt.storage.store import Store

EXIT_OK = 0
EXIT_ERROR = 1  # unexpected error, or a usage problem found after parsing
EXIT_USAGE = 2  # click: unknown option, missing argument, bad value
EXIT_NO_ROW = 3  # nothing to resume: no committed row (or the row asked for is not there)
EXIT_STORE = 4  # the store is missing, unreadable, not a distckpt store, or a newer format
EXIT_CORRUPT = 5  # verification found a problem
EXIT_LEASE = 6  # a live writer holds the store's lease

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "unexpected error",
    EXIT_USAGE: "usage error (unknown option, missing or bad argument)",
    EXIT_NO_ROW: "no committed row: nothing to resume, or the row asked for does not exist",
    EXIT_STORE: "store missing or unreadable, not a distckpt store, or written by a newer format",
    EXIT_CORRUPT: "verification failed: a row is damaged",
    EXIT_LEASE: "a live writer holds the store's lease",
}

EPILOG = "\b\nExit status:\n" + "\n".join(
    f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items())
)

GC_LEASE_TIMEOUT_S = 60.0

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("distckpt")


class CliError(Exception):
    """A failure with its exit status; printed as one line, never as a traceback."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, LeaseHeldError):
        return EXIT_LEASE
    if isinstance(exc, StoreFormatError):
        return EXIT_STORE
    if isinstance(exc, NoCommittedRowError | WorldSizeMismatchError):
        return EXIT_NO_ROW
    if isinstance(exc, CorruptCheckpointError):
        return EXIT_CORRUPT
    if isinstance(exc, CheckpointError):
        return EXIT_ERROR
    if isinstance(exc, OSError):
        return EXIT_STORE
    return EXIT_ERROR


def _message(exc: BaseException) -> str:
    if isinstance(exc, CliError | CheckpointError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        text = f"cannot access{where}: {exc.strerror or exc}"
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
    return " ".join(text.split())  # one line


def _fail(ctx: click.Context, exc: BaseException) -> NoReturn:
    if _debug(ctx):
        traceback.print_exc(file=sys.stderr)
    message, code = _message(exc), _exit_code(exc)
    click.echo(f"{ctx.command_path}: error: {message}", err=True)
    if ctx.params.get("as_json") and not ctx.meta.get(_EMITTED):
        emit_json(error_document(message, code))  # a script reading stdout gets a document
    ctx.exit(code)
    raise AssertionError("unreachable")  # ctx.exit raises


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("debug"))


def handle_errors(fn: F) -> F:
    """Turn every failure of a command into a one-line message and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise
        except KeyboardInterrupt:
            click.echo(f"{ctx.command_path}: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            _fail(ctx, exc)

    return wrapper  # type: ignore[return-value]


# -- formatting ------------------------------------------------------------------------------


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400 * 2:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def jsonable(value: Any) -> Any:
    """A JSON value for anything a manifest may hold (see docs/cli.md for the mapping)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):  # torch.Size too
        return [jsonable(v) for v in value]
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, np.timedelta64):
        return float(value / np.timedelta64(1, "s")) if not np.isnat(value) else None
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else str(value)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode()
    return str(value)


def human_value(value: Any, width: int = 40) -> str:
    if value is None:
        return "-"
    if isinstance(value, np.timedelta64) and not np.isnat(value):
        value = _dt.timedelta(seconds=float(value / np.timedelta64(1, "s")))
    text = value if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    out = []
    for r in [list(headers), *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


_EMITTED = "distckpt.json_emitted"


def emit_json(doc: Any) -> None:
    """Print ``doc`` on stdout: the one JSON document of a ``--json`` call."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_EMITTED] = True
    click.echo(json.dumps(doc, indent=2))


def error_document(message: str, code: int) -> dict[str, Any]:
    """What a ``--json`` call that fails prints on stdout (docs/cli.md)."""
    return {"error": message, "exit": code}


def porcelain_cell(value: Any) -> str:
    """A machine value for ``--porcelain``: "-" for none, numbers as numbers, no tabs."""
    value = jsonable(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        value = json.dumps(value, separators=(",", ":"))
    return " ".join(str(value).split())  # no tab or newline can split a record


# -- progress --------------------------------------------------------------------------------


class Progress:
    """A click progress bar on stderr; on a non-TTY (forced with --progress), a log line
    every tenth of the way, which reads well in batch job logs."""

    def __init__(self, enabled: bool, length: int, label: str, *, as_bytes: bool) -> None:
        self.enabled = enabled and length > 0
        self.length = length
        self.label = label
        self.as_bytes = as_bytes
        self.done = 0
        self._bar: Any = None
        self._tty = sys.stderr.isatty()
        self._next_decile = 1

    def _fmt(self, n: int) -> str:
        return human_bytes(n) if self.as_bytes else str(n)

    def __enter__(self) -> Progress:
        if self.enabled and self._tty:
            self._bar = click.progressbar(
                length=self.length,
                label=self.label,
                file=sys.stderr,
                show_percent=True,
                show_eta=True,
                item_show_func=lambda _: f"{self._fmt(self.done)}/{self._fmt(self.length)}",
            )
            self._bar.__enter__()
        return self

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        decile = min(10, self.done * 10 // self.length)
        if decile >= self._next_decile:
            click.echo(
                f"{self.label}: {decile * 10}% "
                f"({self._fmt(self.done)} of {self._fmt(self.length)})",
                err=True,
            )
            self._next_decile = decile + 1

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _progress_wanted(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


# -- reading a store -------------------------------------------------------------------------


def open_store(path: str, *, missing_code: int = EXIT_STORE) -> tuple[Store, dict[str, Any]]:
    """The store and its root attributes; CliError for a missing path or foreign directory.

    An existing empty directory is an empty store (no rows).
    """
    st = Store(path)
    if not st.fs.exists(path):
        raise CliError(f"no store at {path} (the path does not exist)", missing_code)
    if not st.fs.is_dir(path):
        raise CliError(f"{path} is not a directory, so not a distckpt store", EXIT_STORE)
    attrs = st.root_attributes()
    return st, dict(attrs) if attrs is not None else {}


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


def _row_created(st: Store, status: RowStatus) -> str | None:
    if status.manifests:
        return max(m.created for m in status.manifests)
    try:
        doc = json.loads(st.fs.read_bytes(os.path.join(st.row_dir(status.row), ZARR_JSON)))
        created = doc["attributes"]["distckpt"]["created"]
        return str(created) if isinstance(created, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            mtime = st.fs.mtime(st.row_dir(status.row))
        except OSError:
            return None
        return _dt.datetime.fromtimestamp(mtime, _dt.UTC).isoformat()


def _decoded(node: Any, key: str | None = None) -> Any:
    """Decode an encoded metadata node; a description instead of raising."""
    if node is None:
        return None
    try:
        value = codec.decode_metadata(node)
    except CheckpointError as exc:
        return f"<undecodable: {exc}>"
    return value.get(key) if key is not None else value


def _first(status: RowStatus) -> RankManifest | None:
    return status.manifests[0] if status.manifests else None


def _row_kind(status: RowStatus, latest: int | None) -> str:
    if status.committed:
        return "committed"
    if latest is None or status.row > latest:
        return "pending"  # may still be being written (or a write that was killed)
    return "incomplete"


def _problem_lines(st: Store, status: RowStatus) -> list[str]:
    lines = []
    if status.missing_ranks:
        ranks = ", ".join(str(r) for r in status.missing_ranks)
        lines.append(f"no valid manifest from rank(s) {ranks} of {status.world_size}")
    elif status.world_size is None and not status.problems:
        lines.append("no rank has committed")
    prefix = st.manifests_dir(status.row) + os.sep
    lines += [p.replace(prefix, "") for p in status.problems]
    return lines


def row_summary(st: Store, status: RowStatus, latest: int | None, now: float) -> dict[str, Any]:
    first = _first(status)
    created = _row_created(st, status)
    stamp = _timestamp(created)
    return {
        "row": status.row,
        "status": _row_kind(status, latest),
        "committed": status.committed,
        "world_size": status.world_size,
        "write_count": status.write_count,
        "level": first.level if first else None,
        "lead_time": _decoded(first.lead_time, "lead_time") if first else None,
        "metadata": _decoded(first.metadata) if first else None,
        "created": created,
        "age_s": None if stamp is None else round(max(0.0, now - stamp), 3),
        "bytes": st.disk_usage(status.row),
        "ranks_committed": list(status.valid_ranks),
        "missing_ranks": list(status.missing_ranks),
        "problems": _problem_lines(st, status),
    }


def _lease_line(ls: LeaseStatus) -> str:
    if ls.state == "free":
        return "lease: free"
    if ls.state == "held":
        assert ls.holder is not None
        h = ls.holder
        job = f", job {h.job}" if h.job else ""
        what = "" if h.purpose == "writer" else f" ({h.purpose})"
        return (
            f"lease: held by {h.host} pid {h.pid}{job}{what}, "
            f"heartbeat {human_age(ls.heartbeat_age_s)}"
        )
    return f"lease: {ls.state} ({ls.reason}); a new writer may take it over"


# -- commands --------------------------------------------------------------------------------

json_option: Callable[[F], F] = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON (stable keys) on stdout."
)
progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress on stderr (default: only when stderr is a terminal).",
)


def _configure_logging(debug: bool) -> None:
    class EchoHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(self.format(record), err=True)

    if not any(getattr(h, "_distckpt_cli", False) for h in log.handlers):
        handler = EchoHandler()
        handler._distckpt_cli = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("distckpt: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)


@click.group(
    "distckpt",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="DISTCKPT_DEBUG",
    help="On errors, print the traceback too; log debug messages. (env: DISTCKPT_DEBUG=1)",
)
@click.version_option(package_name="distckpt", prog_name="distckpt")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, verify and clean distckpt checkpoint stores, offline.

    A store is the directory a job passes to distckpt.save or Checkpoint(path=...). It holds
    rows (numbered checkpoints); a row counts once every rank of the job that wrote it has
    committed its part. These commands read the store directly, without a running job or
    process group: list rows (ls), print the row a restart would resume from (latest),
    describe a row (show), re-read and check every byte (verify), and delete rows nobody
    needs (gc). Every command takes --json for scripts.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _configure_logging(debug)
