"""``distckpt import`` / ``distckpt export``, and ``show`` on a path that is no store.

Standalone click commands registered on the ``distckpt`` group at the bottom of cli.py.
"""

from __future__ import annotations

import os
from typing import Any

import click

from distckpt.cli.common import (
    EXIT_STORE,
    CliError,
    emit_json,
    handle_errors,
    human_bytes,
    json_option,
    open_store,
)
from distckpt.interchange.detect import DCP, DISTCKPT, EXPORT_FORMATS, IMPORT_FORMATS, detect
from distckpt.storage.store import Store

# The readers, writers and summaries import torch: they load inside the commands that use
# them, so ``ls``/``latest``/``show``/``verify`` on a store never import it.


@click.command("import", short_help="Import a torch, Lightning, safetensors or DCP checkpoint.")
@click.argument("source", type=click.Path())
@click.argument("store", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(IMPORT_FORMATS),
    default=None,
    help="The source's format (default: detected; `distckpt show SOURCE` says how).",
)
@json_option
@handle_errors
def import_command(source: str, store: str, fmt: str | None, as_json: bool) -> None:
    """Import SOURCE into STORE as a new row (STORE is created if needed).

    SOURCE is a torch.save state_dict file (read with weights_only=True: a file whose
    pickle needs other globals is refused), a Lightning .ckpt, a safetensors file or a
    torch.distributed.checkpoint directory. The whole source is read and validated before
    anything is written, so a damaged or refused source leaves STORE as it was. The row's
    metadata records the source path, its format and why it was detected; values that
    could not be kept (e.g. hyper-parameters that are not JSON) are listed as notes.
    """
    from distckpt.interchange.api import import_report

    if Store(store).fs.exists(store):
        open_store(store)  # refuse a foreign directory before reading the source
    result = import_report(source, store, format=fmt)
    if as_json:
        emit_json(
            {
                "source": os.path.abspath(source),
                "store": store,
                "row": result.row,
                "format": result.detection.format,
                "evidence": list(result.detection.evidence),
                "tensors": result.tensors,
                "notes": list(result.notes),
            }
        )
        return
    click.echo(
        f"imported {source} ({result.detection.format}) as row {result.row} of {store}: "
        f"{result.tensors} tensor{'s' if result.tensors != 1 else ''}"
    )
    click.echo(f"detected: {result.detection.explain()}")
    for note in result.notes:
        click.echo(f"note: {note}")


@click.command(
    "export", short_help="Write a row as a safetensors or torch.save file, or a zarr view."
)
@click.argument("store", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option(
    "--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True, help="Output format."
)
@click.option(
    "--row", type=click.IntRange(min=0), default=None, help="Row to export (default: latest)."
)
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Whose part of the row.",
)
@json_option
@handle_errors
def export_command(
    store: str, dest: str, fmt: str, row: int | None, rank: int, as_json: bool
) -> None:
    """Write one rank's state of a committed row of STORE to the file DEST.

    safetensors: every tensor under its dotted key (model.layer.weight), the row's full
    tree with its non-tensor values as JSON in the file's __metadata__ (so importing it
    gives the same row back). torch: a torch.save file of the row's state_dict that
    torch.load(weights_only=True) reads. zarr: a directory holding one zarr v3 array per
    logical tensor of its global shape, sharded tensors assembled (every rank's part;
    --rank is not used). DEST is written to a temporary name and renamed, so it appears
    complete or not at all.
    """
    from distckpt.interchange.api import export_row

    st, _ = open_store(store)
    done = export_row(st, dest, format=fmt, row=row, rank=rank)
    if as_json:
        emit_json(
            {
                "store": st.path,
                "dest": done.path,
                "format": done.format,
                "row": done.row,
                "rank": done.rank,
                "tensors": done.tensors,
                "notes": list(done.notes),
            }
        )
        return
    click.echo(
        f"exported row {done.row} (rank {done.rank}) of {st.path} to {done.path} as "
        f"{done.format}: {done.tensors} tensor{'s' if done.tensors != 1 else ''}"
    )
    for note in done.notes:
        click.echo(f"note: {note}")


def show_foreign(path: str, row: int | None, as_json: bool) -> bool:
    """``distckpt show`` on a file or DCP directory: say what it is and why; True if shown.

    Returns False for anything ``show`` handles itself (a store, a missing path, a
    directory that may be an empty store).
    """
    if not os.path.exists(path):
        return False
    detection = detect(path)
    if detection.format == DISTCKPT or (os.path.isdir(path) and detection.format != DCP):
        return False
    if row is not None:
        raise click.UsageError(f"{path} is not a distckpt store: it has no rows to choose from")
    doc: dict[str, Any] = {"path": path, "format": None, "evidence": list(detection.evidence)}
    problem: Exception | None = None
    if detection.format is not None:
        try:
            from distckpt.interchange.summary import summarize

            doc = summarize(detection)
        except Exception as exc:  # still say what was detected, then fail
            problem = exc
            doc["format"] = detection.format
    if as_json:
        emit_json({**doc, "problem": None if problem is None else str(problem)})
    else:
        _print_summary(doc, importable=problem is None)
    if problem is not None:
        raise problem
    if detection.format is None:
        raise CliError(
            f"{path} is not a distckpt store nor a checkpoint format distckpt can import",
            EXIT_STORE,
        )
    return True


def _print_summary(doc: dict[str, Any], *, importable: bool) -> None:
    out = click.echo
    out(f"path       {doc['path']}")
    out(f"format     {doc['format'] or 'not recognised'}  (not a distckpt store)")
    for line in doc["evidence"]:
        out(f"detected   {line}")
    if "epoch" in doc or "global_step" in doc:
        out(f"epoch      {doc.get('epoch', '-')}, global step {doc.get('global_step', '-')}")
    if "tensors" in doc:
        out(f"tensors    {doc['tensors']} ({human_bytes(doc['tensor_bytes'])})")
    if doc.get("keys"):
        out("keys:")
        width = max(len(k["key"]) for k in doc["keys"])
        for k in doc["keys"]:
            out(f"  {k['key'].ljust(width)}  {k['summary']}")
        if doc.get("more_keys"):
            out(f"  ... {doc['more_keys']} more")
    if doc["format"] is not None and importable:
        out(f"import it with: distckpt import {doc['path']} STORE")
