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
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click
import numpy as np
import torch

from . import codec
from .commit import delete_row
from .election import RowStatus, elect_offline, row_status
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    NoCommittedRowError,
    StoreFormatError,
    WorldSizeMismatchError,
)
from .format import PACKED_ARRAY, ZARR_JSON
from .globalio import written_nbytes
from .lease import Lease, LeaseHeldError, LeaseStatus, lease_status
from .manifest import RankManifest
from .retention import rows_to_delete
from .store import Store
from .verify import Verification

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
    click.echo(f"{ctx.command_path}: error: {_message(exc)}", err=True)
    ctx.exit(_exit_code(exc))
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
    if isinstance(value, list | tuple | torch.Size):
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


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


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
    if not os.path.exists(path):
        raise CliError(f"no store at {path} (the path does not exist)", missing_code)
    if not os.path.isdir(path):
        raise CliError(f"{path} is not a directory, so not a distckpt store", EXIT_STORE)
    st = Store(path)
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
            mtime = os.stat(st.row_dir(status.row)).st_mtime
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


@cli.command("ls")
@click.argument("store", type=click.Path())
@json_option
@handle_errors
def ls_command(store: str, as_json: bool) -> None:
    """List the rows of STORE, oldest first.

    For every row: its id, whether it is committed (every rank's manifest is there and
    valid), the write count, lead time and `step` metadata when the job recorded them, the
    number of ranks that wrote it, its size on disk and its age. A row that is not committed
    says what is missing: which ranks have no manifest, and why a manifest is invalid. Rows
    newer than the newest committed one are shown as "pending": a job may still be writing
    them.
    """
    st, attrs = open_store(store)
    now = time.time()
    statuses = [row_status(st, r) for r in st.rows()] if attrs else []
    committed = [s.row for s in statuses if s.committed]
    latest = committed[-1] if committed else None
    rows = [row_summary(st, s, latest, now) for s in statuses]
    lstatus = lease_status(st)
    if as_json:
        emit_json(
            {
                "store": st.path,
                "name": attrs.get("name"),
                "format": attrs.get("format"),
                "latest": latest,
                "lease": lstatus.to_json(),
                "rows": [jsonable(r) for r in rows],
            }
        )
        return
    name = f'name "{attrs.get("name", "")}", format {attrs.get("format")}' if attrs else "empty"
    click.echo(f"store {st.path}  ({name})  {_lease_line(lstatus)}")
    if not rows:
        click.echo("no rows")
        return
    body = []
    for r in rows:
        meta = r["metadata"] if isinstance(r["metadata"], dict) else {}
        ranks = (
            str(r["world_size"])
            if r["committed"]
            else f"{len(r['ranks_committed'])}/{r['world_size'] or '?'}"
        )
        body.append(
            [
                str(r["row"]),
                r["status"],
                "-" if r["write_count"] is None else str(r["write_count"]),
                human_value(r["lead_time"], 20),
                human_value(meta.get("step"), 12),
                ranks,
                human_bytes(r["bytes"]),
                human_age(r["age_s"]),
            ]
        )
    headers = ["ROW", "STATUS", "WRITES", "LEAD TIME", "STEP", "RANKS", "SIZE", "AGE"]
    lines = table(headers, body)
    click.echo(lines[0])
    for line, r in zip(lines[1:], rows, strict=True):
        click.echo(line)
        for problem in r["problems"]:
            click.echo(f"    {problem}")
    total = sum(r["bytes"] for r in rows)
    click.echo(
        f"{len(committed)} committed of {len(rows)} rows, {human_bytes(total)}; "
        f"latest: {'none' if latest is None else latest}"
    )


@cli.command("latest", short_help="Print the row a restart would resume.")
@click.argument("store", type=click.Path())
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    help=(
        "Only rows written by this many ranks. Without it, rows of any size count: a job of "
        "another size restores them when their state can be redistributed."
    ),
)
@json_option
@handle_errors
def latest_command(store: str, world_size: int | None, as_json: bool) -> None:
    """Print the row a restart from STORE would resume (the newest committed row).

    Prints only the row id on stdout, so `row=$(distckpt latest STORE)` works in a shell
    script. Exits with status 3 and prints nothing on stdout when there is nothing to resume:
    no committed row, or STORE does not exist yet (a first run). Exits with 4 when STORE
    cannot be read, is not a distckpt store, or was written by a newer distckpt.
    """
    if not os.path.exists(store):
        if as_json:
            emit_json(_latest_doc(store, None))
        raise CliError(f"no store at {store} yet: nothing to resume", EXIT_NO_ROW)
    st, _ = open_store(store)
    row = elect_offline(st, world_size=world_size)
    if row is None:
        if as_json:
            emit_json(_latest_doc(st.path, None))
        size = f" by {world_size} ranks" if world_size else ""
        raise CliError(f"no committed row{size} in {st.path}: nothing to resume", EXIT_NO_ROW)
    status = row_status(st, row)
    if as_json:
        emit_json(_latest_doc(st.path, status))
    else:
        click.echo(str(row))


def _latest_doc(path: str, status: RowStatus | None) -> dict[str, Any]:
    first = _first(status) if status is not None else None
    return {
        "store": path,
        "row": status.row if status is not None else None,
        "world_size": status.world_size if status is not None else None,
        "write_count": status.write_count if status is not None else None,
        "level": first.level if first else None,
        "lead_time": jsonable(_decoded(first.lead_time, "lead_time")) if first else None,
        "created": first.created if first else None,
        "metadata": jsonable(_decoded(first.metadata)) if first else None,
    }


def _choose_row(st: Store, attrs: dict[str, Any], row: int | None) -> int:
    if row is None:
        elected = elect_offline(st) if attrs else None
        if elected is None:
            raise CliError(f"no committed row in {st.path}: nothing to resume", EXIT_NO_ROW)
        return elected
    if not attrs or row not in st.rows():
        raise CliError(f"row {row} does not exist in {st.path}", EXIT_NO_ROW)
    return row


def _storage(entry_array: str, offset: int) -> tuple[str, str]:
    if entry_array.endswith("/" + PACKED_ARRAY):
        return "packed", f"@{offset}"
    return "own", entry_array


def rank_detail(m: RankManifest) -> dict[str, Any]:
    return {
        "rank": m.rank,
        "created": m.created,
        "write_count": m.write_count,
        "level": m.level,
        "bytes": m.nbytes,
        "metadata": jsonable(_decoded(m.metadata)),
        "states": [
            {
                "id": sid,
                "schema": rec.schema,
                "version": rec.version,
                "fields": rec.fields,
            }
            for sid, rec in m.states.items()
        ],
        "arrays": [
            {
                "name": a.name,
                "shape": list(a.shape),
                "dtype": a.dtype,
                "nbytes": a.nbytes,
                "storage": _storage(a.array, a.offset)[0],
                "array": a.array,
                "offset": a.offset,
            }
            for a in m.arrays
        ],
        "globals": [
            {
                "name": g.name,
                "shape": list(g.shape),
                "dtype": g.dtype,
                "chunk_shape": list(g.chunk_shape),
                "chunks_written": len(g.chunks),
                "array": g.array,
            }
            for g in m.globals
        ],
    }


@cli.command("show", short_help="Describe one row (default: the latest).")
@click.argument("store", type=click.Path())
@click.argument("row", type=click.IntRange(min=0), required=False)
@click.option(
    "--rank",
    "ranks",
    type=click.IntRange(min=0),
    multiple=True,
    help="Only this rank (repeatable).",
)
@json_option
@handle_errors
def show_command(store: str, row: int | None, ranks: tuple[int, ...], as_json: bool) -> None:
    """Describe one row of STORE in detail (default: the row a restart would resume).

    Prints the row's metadata, lead time and level, then for each rank the states it bound
    (state id, a prefix of the schema hash, schema version) and every saved tensor: its
    name, shape, dtype, size, and whether it lives in the rank's packed array (small
    tensors, with its byte offset) or in an array of its own (with the array's path).
    Global (sharded) arrays are listed with their global shape, chunk shape and how many
    chunks each rank wrote. Use --rank to limit the output to some ranks of a large job. On
    a file or directory that is not a store (torch, Lightning, safetensors, DCP), says which
    format it detected and why, and summarises its keys.
    """
    from .cli_interchange import show_foreign

    if show_foreign(store, row, as_json):
        return
    st, attrs = open_store(store)
    chosen = _choose_row(st, attrs, row)
    status = row_status(st, chosen)
    world = status.world_size
    for r in ranks:
        if world is not None and r >= world:
            raise click.BadParameter(
                f"row {chosen} of {st.path} has ranks 0..{world - 1}; no rank {r}",
                param_hint="--rank",
            )
    shown = [m for m in status.manifests if not ranks or m.rank in ranks]
    now = time.time()
    summary = row_summary(st, status, elect_offline(st), now)
    if as_json:
        doc = {"store": st.path, **jsonable(summary), "ranks": [rank_detail(m) for m in shown]}
        emit_json(doc)
        return
    out = click.echo
    out(f"store      {st.path}")
    state = summary["status"]
    if status.committed:
        state += f", {world} rank{'s' if world != 1 else ''}, write count {status.write_count}"
    out(f"row        {chosen}  ({state})")
    out(f"created    {summary['created'] or '-'}  ({human_age(summary['age_s'])})")
    out(f"level      {human_value(summary['level'])}")
    out(f"lead time  {human_value(summary['lead_time'], 60)}")
    meta = summary["metadata"]
    if isinstance(meta, dict) and meta:
        out("metadata   " + "  ".join(f"{k}={human_value(v, 30)}" for k, v in meta.items()))
    else:
        out(f"metadata   {human_value(meta) if meta else '-'}")
    if isinstance(meta, dict) and "imported_from" in meta:  # see distckpt/interchange
        out(f"imported   from {meta['imported_from']} ({meta.get('import_format')})")
    out(f"size       {human_bytes(summary['bytes'])} on disk")
    for problem in summary["problems"]:
        out(f"problem    {problem}")
    first = _first(status)
    for m in shown:
        out("")
        packed = sum(a.nbytes for a in m.arrays if a.array.endswith("/" + PACKED_ARRAY))
        shards = ""
        if m.globals:
            written = sum(written_nbytes(g) for g in m.globals)
            shards = f"; {_plural(len(m.globals), 'global array')}, {human_bytes(written)} written"
        out(
            f"rank {m.rank}  ({_plural(len(m.arrays), 'tensor')}, {human_bytes(m.nbytes)}; "
            f"{human_bytes(packed)} packed{shards})"
        )
        if first is not None and m.metadata != first.metadata:
            out(f"  metadata: {human_value(_decoded(m.metadata), 80)}")
        if m.states:
            out("  states:")
            rows = [
                [
                    sid,
                    f"schema {rec.schema[:12]}" if rec.schema else "schema -",
                    f"version {rec.version}",
                ]
                for sid, rec in m.states.items()
            ]
            for line in table(["STATE", "SCHEMA", "VERSION"], rows, indent="    ")[1:]:
                out(line)
        if m.arrays:
            out("  arrays:")
            rows = []
            for a in m.arrays:
                kind, where = _storage(a.array, a.offset)
                shape = "x".join(str(d) for d in a.shape) or "scalar"
                rows.append([a.name, shape, a.dtype, human_bytes(a.nbytes), kind, where])
            for line in table(
                ["NAME", "SHAPE", "DTYPE", "BYTES", "STORAGE", "WHERE"], rows, "    "
            ):
                out(line)
        if m.globals:
            out("  global arrays (sharded tensors; this rank's chunks of each):")
            rows = [
                [
                    g.name,
                    "x".join(str(d) for d in g.shape) or "scalar",
                    g.dtype,
                    "x".join(str(d) for d in g.chunk_shape) or "-",
                    str(len(g.chunks)),
                    g.array,
                ]
                for g in m.globals
            ]
            for line in table(
                ["NAME", "GLOBAL SHAPE", "DTYPE", "CHUNK", "CHUNKS HERE", "ARRAY"], rows, "    "
            ):
                out(line)


@cli.command("verify", short_help="Re-read and check every byte of a row.")
@click.argument("store", type=click.Path())
@click.argument("row", type=click.IntRange(min=0), required=False)
@click.option("--all", "all_rows", is_flag=True, help="Verify every committed row.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ranks read in parallel (each holds one tensor in memory at a time).",
)
@progress_option
@json_option
@handle_errors
def verify_command(
    store: str, row: int | None, all_rows: bool, jobs: int, progress: bool | None, as_json: bool
) -> None:
    """Check that a row of STORE can be restored: re-read every byte and every manifest.

    Verifies ROW (default: the row a restart would resume; --all: every committed row).
    Every rank's manifest is validated, then every saved tensor of every rank is read back
    through the same reader a restore uses, checking sizes, each tensor's crc32c checksum,
    the checksum trailer of every chunk file, and the packed array as a whole. Each problem
    is printed with the row, rank and array it concerns. Exits 0 when everything is intact,
    5 when anything is wrong, 3 when there is no committed row to verify.
    """
    if row is not None and all_rows:
        raise click.UsageError("give either ROW or --all, not both")
    st, attrs = open_store(store)
    skipped: list[dict[str, Any]] = []
    if all_rows:
        statuses = [row_status(st, r) for r in st.rows()] if attrs else []
        rows = [s.row for s in statuses if s.committed]
        skipped = [
            {"row": s.row, "reason": "not committed (see `distckpt ls`)"}
            for s in statuses
            if not s.committed
        ]
        if not rows:
            raise CliError(f"no committed row in {st.path} to verify", EXIT_NO_ROW)
    else:
        rows = [_choose_row(st, attrs, row)]
    plan = Verification(st, rows)
    label = f"verifying {len(rows)} row{'s' if len(rows) != 1 else ''}"
    with Progress(_progress_wanted(progress), plan.total_bytes, label, as_bytes=True) as bar:
        reports = plan.run(jobs=jobs, on_bytes=bar.update)
    bad = [r for r in reports if not r.ok]
    if as_json:
        emit_json(
            {
                "store": st.path,
                "ok": not bad,
                "rows": [r.to_json() for r in reports],
                "skipped": skipped,
                "problems": [p.to_json() for r in reports for p in r.problems],
            }
        )
    else:
        for r in reports:
            if r.ok:
                click.echo(
                    f"row {r.row}: ok ({r.ranks_checked} ranks, {r.arrays_checked} tensors, "
                    f"{human_bytes(r.bytes_checked)})"
                )
                if r.unchecksummed:
                    click.echo(
                        f"  saved with checksums off: the bytes of {r.unchecksummed} "
                        "tensors were read but cannot be verified"
                    )
            else:
                n = len(r.problems)
                click.echo(f"row {r.row}: {n} problem{'s' if n != 1 else ''}")
                for p in r.problems:
                    click.echo(f"  {p}")
        for s in skipped:
            click.echo(f"row {s['row']}: skipped, {s['reason']}")
    if bad:
        count = sum(len(r.problems) for r in bad)
        raise CliError(
            f"{count} problem{'s' if count != 1 else ''} in {len(bad)} of {len(reports)} "
            f"row{'s' if len(reports) != 1 else ''} of {st.path}",
            EXIT_CORRUPT,
        )


@contextmanager
def _gc_lease(st: Store, force: bool, dry_run: bool) -> Iterator[LeaseStatus]:
    status = lease_status(st)
    if dry_run:
        yield status
        return
    if force:
        if status.held:
            log.warning("--force: removing rows while %s", status.reason)
        yield status
        return
    if status.held:
        raise LeaseHeldError(
            f"refusing to gc {st.path}: the store is leased by a live writer "
            f"({status.reason}); wait for it to finish, or use --force"
        )
    try:
        lease = Lease.acquire(st, timeout_s=GC_LEASE_TIMEOUT_S, purpose="distckpt gc")
    except LeaseHeldError as exc:
        raise LeaseHeldError(
            f"refusing to gc: {exc}; wait for it to finish, or use --force"
        ) from exc
    lease.start_heartbeat(GC_LEASE_TIMEOUT_S / 4)
    try:
        yield status
    finally:
        lease.release()


@cli.command("gc")
@click.argument("store", type=click.Path())
@click.option(
    "--keep",
    metavar="N",
    type=click.IntRange(min=1),
    default=None,
    help="Also remove committed rows beyond the newest N (default: keep every committed row).",
)
@click.option("--dry-run", "-n", is_flag=True, help="Only list what would be removed.")
@click.option(
    "--force", is_flag=True, help="Remove rows even while a live writer holds the store's lease."
)
@progress_option
@json_option
@handle_errors
def gc_command(
    store: str,
    keep: int | None,
    dry_run: bool,
    force: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Delete rows of STORE that no restart needs.

    Removes rows that were never committed (writes killed part-way, deletions cut short)
    and, with --keep N, committed rows older than the newest N. It never removes the newest
    committed row, nor any row newer than it (a job may be writing it right now). Each row
    is uncommitted first (its manifests are removed) and only then its data, so a gc that
    is interrupted leaves nothing that looks committed. Refuses (status 6) while a live
    job holds the store's writer lease, unless --force; --dry-run lists what would go.
    """
    st, attrs = open_store(store)
    if not attrs:
        result: dict[str, Any] = {"store": st.path, "dry_run": dry_run, "keep": keep}
        if as_json:
            emit_json({**result, "latest": None, "removed": [], "bytes_freed": 0, "kept": []})
        else:
            click.echo(f"{st.path}: no rows, nothing to remove")
        return
    with _gc_lease(st, force, dry_run) as lstatus:
        doomed = rows_to_delete(st, keep)
        statuses = {r: row_status(st, r) for r in st.rows()}
        committed = [r for r, s in statuses.items() if s.committed]
        latest = committed[-1] if committed else None
        entries: list[dict[str, Any]] = []
        for r in doomed:
            s = statuses.get(r) or row_status(st, r)
            reason = (
                f"beyond --keep {keep}"
                if s.committed
                else f"not committed, older than the latest row {latest}"
            )
            entries.append(
                {"row": r, "committed": s.committed, "reason": reason, "bytes": st.disk_usage(r)}
            )
        if not dry_run:
            label = f"removing {len(entries)} rows"
            with Progress(_progress_wanted(progress), len(entries), label, as_bytes=False) as bar:
                for e in entries:
                    log.debug("deleting row %d of %s", e["row"], st.path)
                    delete_row(st, int(e["row"]))
                    bar.update(1)
    kept = [r for r in statuses if r not in doomed]
    freed = sum(int(e["bytes"]) for e in entries)
    if as_json:
        emit_json(
            {
                "store": st.path,
                "dry_run": dry_run,
                "keep": keep,
                "latest": latest,
                "removed": entries,
                "bytes_freed": freed,
                "kept": kept,
            }
        )
        return
    if dry_run and lstatus.held:
        click.echo(f"note: {_lease_line(lstatus)}; a real gc would be refused without --force")
    if not entries:
        click.echo(f"{st.path}: nothing to remove ({len(kept)} rows kept, latest {latest})")
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {_plural(len(entries), 'row')} ({human_bytes(freed)}) of {st.path}:")
    rows = [
        [
            str(e["row"]),
            "committed" if e["committed"] else "uncommitted",
            str(e["reason"]),
            human_bytes(e["bytes"]),
        ]
        for e in entries
    ]
    for line in table(["ROW", "STATUS", "REASON", "SIZE"], rows, indent="  "):
        click.echo(line)
    click.echo(f"kept {_plural(len(kept), 'row')}: {', '.join(str(r) for r in kept) or 'none'}")


@cli.command("lease")
@click.argument("store", type=click.Path())
@json_option
@handle_errors
def lease_command(store: str, as_json: bool) -> None:
    """Show who holds the writer lease of STORE.

    A running job's coordinator holds the lease of the store it writes to and renews it at
    every commit; `gc` refuses to run while it is held. Prints the holder (host, pid, job
    id, last heartbeat) and whether it is live, stale (no heartbeat within its timeout) or
    dead (its process is gone): stale and dead leases are taken over by the next writer.
    Exits 6 while a live holder has the lease, 0 otherwise.
    """
    st, _ = open_store(store)
    status = lease_status(st)
    if as_json:
        emit_json({"store": st.path, **status.to_json()})
    else:
        click.echo(_lease_line(status))
    if status.held:
        raise click.exceptions.Exit(EXIT_LEASE)


from .cli_interchange import export_command, import_command  # noqa: E402

cli.add_command(import_command)
cli.add_command(export_command)
from .cli_migrate import migrate_command  # noqa: E402  (a command kept in its own module)

cli.add_command(migrate_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``distckpt``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="distckpt")


if __name__ == "__main__":
    main()
