"""``distckpt gc`` and ``distckpt lease``: the commands that change or guard a store."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from distckpt.cli.common import (
    EXIT_LEASE,
    GC_LEASE_TIMEOUT_S,
    Progress,
    _lease_line,
    _plural,
    _progress_wanted,
    cli,
    emit_json,
    handle_errors,
    human_bytes,
    json_option,
    log,
    open_store,
    progress_option,
    table,
)
from distckpt.dist.election import row_status
from distckpt.dist.retention import rows_to_delete
from distckpt.errors import CheckpointWriteError
from distckpt.io.commit import delete_row
from distckpt.io.marks import bad_rows
from distckpt.storage.lease import Lease, LeaseHeldError, LeaseStatus, lease_status
from distckpt.storage.store import Store


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
    except CheckpointWriteError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        # A full disk is when gc is needed most, and no writer can take the lease either:
        # with no live holder (checked above), free space without one.
        log.warning("removing rows without the lease of %s: %s", st.path, exc)
        yield status
        return
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
        bad = bad_rows(st)
        doomed = rows_to_delete(st, keep, bad=bad)
        statuses = {r: row_status(st, r) for r in st.rows()}
        committed = [r for r, s in statuses.items() if s.committed and r not in bad]
        latest = committed[-1] if committed else None
        entries: list[dict[str, Any]] = []
        for r in doomed:
            s = statuses.get(r) or row_status(st, r)
            if s.committed and r in bad:
                reason = f"marked bad, older than the latest row {latest}"
            elif s.committed:
                reason = f"beyond --keep {keep}"
            else:
                reason = f"not committed, older than the latest row {latest}"
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
