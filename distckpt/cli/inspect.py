"""``distckpt ls``, ``latest``, ``show`` and ``verify``: read-only views of a store."""

from __future__ import annotations

import time
from typing import Any

import click

from distckpt.cli.common import (
    EXIT_CORRUPT,
    EXIT_NO_ROW,
    EXIT_USAGE,
    CliError,
    Progress,
    _decoded,
    _first,
    _lease_line,
    _plural,
    _progress_wanted,
    cli,
    emit_json,
    handle_errors,
    human_age,
    human_bytes,
    human_value,
    json_option,
    jsonable,
    open_store,
    porcelain_cell,
    progress_option,
    row_summary,
    table,
)
from distckpt.cli.interchange import show_foreign
from distckpt.dist.election import RowStatus, elect_offline, row_status
from distckpt.format.layout import rank_dir_name
from distckpt.format.manifest import RankManifest, is_data_array, is_packed
from distckpt.io.globalio import written_nbytes
from distckpt.io.marks import bad_rows, read_mark
from distckpt.io.verify import Verification
from distckpt.storage.lease import lease_status
from distckpt.storage.store import Store

PORCELAIN_COLUMNS = (
    "row",
    "status",
    "step",
    "ranks_committed",
    "world_size",
    "bytes",
    "created",
    "age_s",
    "write_count",
    "lead_time_s",
)


@cli.command("ls")
@click.argument("store", type=click.Path())
@json_option
@click.option(
    "--porcelain",
    is_flag=True,
    help=(
        "For scripts: one tab-separated line per row, no header, fixed columns "
        f"({', '.join(PORCELAIN_COLUMNS)}); bytes as integers, seconds as numbers, "
        "ISO 8601 times, '-' for none."
    ),
)
@handle_errors
def ls_command(store: str, as_json: bool, porcelain: bool) -> None:
    """List the rows of STORE, oldest first.

    For every row: its id, whether it is committed (every rank's manifest is there and
    valid), the write count and lead time when a session wrote it (columns shown only
    then), its `step` metadata, the number of ranks that wrote it, its size on disk and its
    age. A row that is not committed says what is missing: which ranks have no manifest, and
    why a manifest is invalid. Rows newer than the newest committed one are shown as
    "pending": a job may still be writing them. A committed row that a load found damaged
    is shown as "bad", with the reason it was marked; restarts pass over it.
    """
    if as_json and porcelain:
        raise CliError("--json and --porcelain exclude each other", EXIT_USAGE)
    st, attrs = open_store(store)
    now = time.time()
    statuses = [row_status(st, r) for r in st.rows()] if attrs else []
    marks = {s.row: read_mark(st, s.row) for s in statuses}
    committed = [s.row for s in statuses if s.committed]
    good = [r for r in committed if marks[r] is None]
    latest = good[-1] if good else None
    rows = [_with_mark(row_summary(st, s, latest, now), marks[s.row]) for s in statuses]
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
    if porcelain:
        for r in rows:
            click.echo("\t".join(porcelain_cell(v) for v in _porcelain_values(r)))
        return
    name = f'name "{attrs.get("name", "")}", format {attrs.get("format")}' if attrs else "empty"
    click.echo(f"store {st.path}  ({name})  {_lease_line(lstatus)}")
    if not rows:
        click.echo("no rows")
        return
    # Write counts and lead times belong to rows a session (Checkpoint) wrote; rows of the
    # functional API (save) have neither, and the columns would only be noise.
    session = any(r["write_count"] or r["lead_time"] is not None for r in rows)
    body = []
    for r in rows:
        meta = r["metadata"] if isinstance(r["metadata"], dict) else {}
        ranks = (
            str(r["world_size"])
            if r["committed"]
            else f"{len(r['ranks_committed'])}/{r['world_size'] or '?'}"
        )
        cells = [str(r["row"]), r["status"]]
        if session:
            writes = "-" if r["write_count"] is None else str(r["write_count"])
            cells += [writes, human_value(r["lead_time"], 20)]
        cells += [human_value(meta.get("step"), 12), ranks, human_bytes(r["bytes"])]
        body.append([*cells, human_age(r["age_s"])])
    headers = ["ROW", "STATUS", "STEP", "RANKS", "SIZE", "AGE"]
    if session:
        headers[2:2] = ["WRITES", "LEAD TIME"]
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
        + (f"; {len(committed) - len(good)} marked bad" if len(good) < len(committed) else "")
    )


def _with_mark(summary: dict[str, Any], mark: Any) -> dict[str, Any]:
    """A row's summary with its bad mark, if any: status "bad", the reason as a problem."""
    summary["bad"] = None if mark is None else mark.reason
    if mark is not None:
        summary["status"] = "bad"
        summary["problems"] = [f"marked bad: {mark.reason}", *summary["problems"]]
    return summary


def _porcelain_values(r: dict[str, Any]) -> list[Any]:
    """One row's values in the order of PORCELAIN_COLUMNS."""
    meta = r["metadata"] if isinstance(r["metadata"], dict) else {}
    return [
        r["row"],
        r["status"],
        meta.get("step"),
        len(r["ranks_committed"]),
        r["world_size"],
        r["bytes"],
        r["created"],
        r["age_s"],
        r["write_count"],
        r["lead_time"],  # a timedelta: seconds
    ]


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
    script. Rows a load found damaged (marked bad) are passed over, as a restart passes over
    them. Exits with status 3 and prints nothing on stdout when there is nothing to resume:
    no committed row that is not marked bad, or STORE does not exist yet (a first run).
    Exits with 4 when STORE
    cannot be read, is not a distckpt store, or was written by a newer distckpt.
    """
    if not Store(store).fs.exists(store):
        if as_json:
            emit_json(_latest_doc(store, None))
        raise CliError(f"no store at {store} yet: nothing to resume", EXIT_NO_ROW)
    st, _ = open_store(store)
    bad = bad_rows(st)
    row = elect_offline(st, world_size=world_size, skip=bad)
    if row is None:
        if as_json:
            emit_json(_latest_doc(st.path, None))
        size = f" by {world_size} ranks" if world_size else ""
        marked = [r for r in st.rows() if r in bad]
        why = f" (marked bad: rows {', '.join(map(str, marked))})" if marked else ""
        raise CliError(f"no committed row{size} in {st.path}{why}: nothing to resume", EXIT_NO_ROW)
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
        elected = elect_offline(st, skip=bad_rows(st)) if attrs else None
        if elected is None:
            raise CliError(f"no committed row in {st.path}: nothing to resume", EXIT_NO_ROW)
        return elected
    if not attrs or row not in st.rows():
        raise CliError(f"row {row} does not exist in {st.path}", EXIT_NO_ROW)
    return row


def _storage(entry_array: str, offset: int) -> tuple[str, str]:
    if is_data_array(entry_array):  # format 2: a byte range of the rank's data array
        return "data", f"{entry_array}@{offset}"
    if is_packed(entry_array):
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
                "chunks_written": len(g.chunks if g.pieces is None else g.pieces),
                "array": g.array or rank_dir_name(m.rank),
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
        packed = sum(a.nbytes for a in m.arrays if a.packed or a.ranged)
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
            out("  global arrays (sharded tensors; this rank's chunks or pieces of each):")
            rows = [
                [
                    g.name,
                    "x".join(str(d) for d in g.shape) or "scalar",
                    g.dtype,
                    "x".join(str(d) for d in g.chunk_shape) or "-",
                    str(len(g.chunks if g.pieces is None else g.pieces)),
                    g.array or rank_dir_name(m.rank),
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
