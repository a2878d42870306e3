"""Helpers of the fault-injection suite (tests/test_faults.py): a store of known values, seeded
mutations of its files, filesystems that fail on the k-th call, and the one oracle.

The oracle is what a user relies on after any damage: every call either raises a distckpt
error (the CLI: a documented non-zero exit, one line, no traceback) or elects an intact row
and returns exactly the values saved in it. Never a wrong value, a hang, an internal
exception type, data touched outside the store, or an earlier committed row lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner

import distckpt
from distckpt.cli import EXIT_CODES, cli
from distckpt.dist.election import row_status
from distckpt.format import checked
from distckpt.io.marks import bad_rows
from distckpt.storage.filesystem import Buffer, LocalFileSystem
from distckpt.storage.store import Store

CASE_TIMEOUT_S = 60  # a call taking longer is a hang (generous: CI machines are shared)


class Hang(Exception):
    """A case ran past CASE_TIMEOUT_S (raised by SIGALRM inside the blocked call)."""


@contextlib.contextmanager
def deadline(seconds: float = CASE_TIMEOUT_S) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread if the block runs longer than ``seconds``:
    a read blocked in ``open()`` on a FIFO is interrupted too."""

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- a store of known values -----------------------------------------------------------------
def row_values(row: int) -> dict[str, Any]:
    """What row ``row`` of :func:`build_store` holds: two same-shape tensors (a swap of their
    references must not go unnoticed), a big array of its own, small packed ones, scalars."""
    g = torch.Generator().manual_seed(1000 + row)
    return {
        "model": {
            "a": torch.randn(4, 3, generator=g),
            "b": torch.randn(4, 3, generator=g),
            "big": torch.randn(64, 64, generator=g),
            "i": torch.arange(5, dtype=torch.int64) + row,
        },
        "train": {"step": 100 * (row + 1), "lr": 0.5 / (row + 1), "tag": None, "ok": True},
    }


def build_store(path: Path, rows: int = 3) -> list[int]:
    ids = [distckpt.save(row_values(r), path, step=100 * (r + 1)) for r in range(rows)]
    distckpt.storage.lease.release(path)
    return ids


def same(a: Any, b: Any, *, tensors_only: bool = False) -> bool:
    """Exact equality of saved values: tensors bit for bit (dtype and shape too), scalars
    with their types (``2`` is not ``2.0``, ``None`` is not ``''``).

    ``tensors_only``: for edits resealed with a fresh checksum, which may turn a row into
    another valid row (a scalar or key changed is a different but consistent state): only
    the tensors the live state expects must still be exactly the saved ones."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        if tensors_only:
            return all(same(a.get(k), b[k], tensors_only=True) for k in b)
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return tensors_only or (type(a) is type(b) and a == b)


def fresh_state() -> dict[str, Any]:
    """A live state to load into, filled with sentinels (a failed load must leave them)."""
    return {
        "model": {
            "a": torch.full((4, 3), -7.0),
            "b": torch.full((4, 3), -7.0),
            "big": torch.full((64, 64), -7.0),
            "i": torch.full((5,), -7, dtype=torch.int64),
        },
        "train": {"step": -7, "lr": -7.0, "tag": "live", "ok": False},
    }


def snapshot_tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (links as their target text): to prove nothing changed."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = Path(p).read_bytes()
            else:
                out[rel] = "special"
    return out


# -- the store's JSON files and their mutations ----------------------------------------------
def json_files(store: Path) -> list[Path]:
    """Every JSON document of the store (root, rows, arrays, manifests, any index): the
    mutator is generic over them, so new kinds of record are fuzzed without a change here."""
    found = [p for p in store.rglob("*.json") if p.is_file() and not p.name.startswith(".")]
    return sorted(p for p in found if p.name != "lease.json")


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value inside ``doc``."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


_REPLACEMENTS: list[Callable[[Any], Any]] = [
    lambda v: 10**30,
    lambda v: -1,
    lambda v: -(10**30),
    lambda v: 2**64 + 1,
    lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else 2.0,
    lambda v: "" if v is None else None,
    lambda v: str(v),
    lambda v: [v],
    lambda v: {"v": v},
    lambda v: True,
    lambda v: 0,
    lambda v: v + 1 if isinstance(v, int) and not isinstance(v, bool) else [],
    lambda v: "rows/../../outside",
    lambda v: "0000000000²",
]


@dataclass
class Mutation:
    family: str
    detail: str


def mutate_json(path: Path, rng: random.Random, *, reseal: bool) -> Mutation:
    """One seeded JSON-valid edit of ``path``: a value's type or size changed, a key
    duplicated, two tensor references swapped. With ``reseal`` the checksum is recomputed,
    as a hostile user would: then only the range checks and validation stand between the
    edit and a wrong value."""
    raw = path.read_bytes()
    doc = json.loads(raw)
    kind = rng.choice(["replace", "replace", "replace", "duplicate", "swap", "drop"])
    if kind == "swap":
        refs = [p for p in _paths(doc) if p and p[-1] == "tensor"]
        if len(refs) >= 2:
            p, q = rng.sample(refs, 2)
            a, b = _get(doc, p), _get(doc, q)
            _set(doc, p, b)
            _set(doc, q, a)
            path.write_bytes(checked.seal(doc) if reseal else json.dumps(doc).encode())
            return Mutation("swap", f"{path.name}: swapped {p[-3:]} and {q[-3:]}")
        kind = "replace"
    paths = [p for p in _paths(doc) if p and p[-1] != checked.CHECKSUM_KEY]
    if not paths:
        kind = "truncate"
    if kind == "duplicate" and isinstance(doc, dict) and doc:
        key = rng.choice(sorted(doc))
        text = json.dumps(doc)
        extra = json.dumps({key: _REPLACEMENTS[rng.randrange(len(_REPLACEMENTS))](doc[key])})
        path.write_text(text[:-1] + ", " + extra[1:])  # the key twice: the last would win
        return Mutation("duplicate", f"{path.name}: key {key!r} twice")
    if kind == "drop":
        p = rng.choice(paths)
        parent = _get(doc, p[:-1])
        del parent[p[-1]]
        path.write_bytes(checked.seal(doc) if reseal else json.dumps(doc).encode())
        return Mutation("drop", f"{path.name}: removed {p[-3:]}")
    if kind == "truncate":
        path.write_bytes(raw[: rng.randrange(len(raw))])
        return Mutation("truncate", path.name)
    p = rng.choice(paths)
    new = rng.choice(_REPLACEMENTS)(_get(doc, p))
    _set(doc, p, new)
    path.write_bytes(checked.seal(doc) if reseal else json.dumps(doc).encode())
    return Mutation("value", f"{path.name}: {p[-3:]} -> {new!r:.30}")


def mutate_bytes(path: Path, rng: random.Random) -> Mutation:
    """A bit flip or a truncation of any file."""
    data = bytearray(path.read_bytes())
    if not data or rng.random() < 0.3:
        path.write_bytes(bytes(data[: rng.randrange(len(data) + 1)]))
        return Mutation("truncate", path.name)
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return Mutation("bitflip", f"{path.name} byte {i}")


# -- filesystems that fail -------------------------------------------------------------------
FAILABLE = (
    "write_file",
    "create_exclusive",
    "rename",
    "link",
    "makedirs",
    "remove",
    "rmtree",
    "fsync_dir",
    "fsync_files",
)


class FailingFS(LocalFileSystem):
    """Local files, but the ``fail_at``-th call of the operations in ``ops`` (counted from 1;
    None: never) raises ``OSError(code)``; ``calls`` counts them (a dry run sizes the loop)."""

    def __init__(self, code: int, fail_at: int | None, ops: Sequence[str] = FAILABLE) -> None:
        self.code = code
        self.fail_at = fail_at
        self.ops = set(ops)
        self.calls = 0
        self.failed: str | None = None

    def _tick(self, op: str, path: str) -> None:
        if op not in self.ops:
            return
        self.calls += 1
        if self.calls == self.fail_at:
            self.failed = f"{op} {path}"
            raise OSError(self.code, os.strerror(self.code), path)

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        try:
            self._tick("write_file", path)
        except OSError as exc:
            from distckpt.storage.filesystem import _write_error

            raise _write_error(path, exc) from exc
        return super().write_file(path, parts, durable=durable)

    def create_exclusive(self, path: str, data: bytes) -> None:
        self._tick("create_exclusive", path)
        super().create_exclusive(path, data)

    def rename(self, src: str, dst: str) -> None:
        self._tick("rename", dst)
        super().rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        self._tick("link", dst)
        super().link(src, dst)

    def makedirs(self, path: str) -> None:
        self._tick("makedirs", path)
        super().makedirs(path)

    def remove(self, path: str) -> None:
        self._tick("remove", path)
        super().remove(path)

    def rmtree(self, path: str) -> None:
        self._tick("rmtree", path)
        super().rmtree(path)

    def fsync_dir(self, path: str) -> None:
        self._tick("fsync_dir", path)
        super().fsync_dir(path)

    def fsync_files(self, paths: Sequence[str]) -> None:
        if paths:  # syncing nothing is no call to fail
            self._tick("fsync_files", paths[0])
        super().fsync_files(paths)


# -- the oracle ------------------------------------------------------------------------------
@dataclass
class Tally:
    """Outcomes per fault family, printed at the end (``pytest -s`` shows them)."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, family: str, outcome: str, problem: str | None = None) -> None:
        self.counts.setdefault(family, Counter())[outcome] += 1
        if problem is not None:
            self.failures.append(f"{family}: {problem}")

    def report(self) -> str:
        lines = []
        for family, c in sorted(self.counts.items()):
            total = sum(c.values())
            parts = ", ".join(f"{n} {k}" for k, n in sorted(c.items()))
            lines.append(f"  {family}: {total} cases: {parts}")
        return "\n".join(lines)


GOOD = ("clear error", "older row elected", "intact", "no effect")


def check_load(
    store: Path, expected: dict[int, dict[str, Any]], *, tensors_only: bool = False
) -> tuple[str, str | None]:
    """Load the elected row; the outcome name, and a problem when the oracle is broken."""
    live = fresh_state()
    before = fresh_state()
    try:
        with deadline():
            chosen = distckpt.latest(store)
            row = distckpt.load(live, store)
    except Hang as exc:
        return "hang", f"load hangs: {exc}"
    except distckpt.CheckpointError as exc:
        if str(store) not in str(exc) and "rank_" not in str(exc):
            return "vague error", f"error does not name the store or file: {exc}"
        if not same(live, before):
            return "live state modified", f"failed load modified live state: {exc}"
        return "clear error", None
    except Exception as exc:
        return "internal error", f"{type(exc).__name__}: {exc}"
    if row != chosen and not (row < chosen and chosen in bad_rows(Store(str(store)))):
        # Only a fallback may read another row than the one elected: the damaged row was
        # found by the load and marked bad (issue 14, point 5).
        return "wrong row", f"latest() said {chosen}, load() read {row}"
    if row not in expected:
        return "wrong row", f"elected row {row}, which was never saved"
    if not same(live, expected[row], tensors_only=tensors_only):
        return "wrong value", f"row {row} returned values that differ from those saved"
    return ("intact" if row == max(expected) else "older row elected"), None


def check_rows(
    store: Path, expected: dict[int, dict[str, Any]], spared: Sequence[int]
) -> str | None:
    """Each row in ``spared`` (not touched by the fault) still loads its exact values, or
    the store as a whole is refused with a distckpt error."""
    for row in spared:
        live = fresh_state()
        try:
            with deadline():
                distckpt.load(live, store, row=row)
        except Hang:
            return f"loading untouched row {row} hangs"
        except distckpt.StoreFormatError:
            continue  # the damage is the store's own (its root): every row refused alike
        except distckpt.CheckpointError as exc:
            return f"untouched row {row} was lost: {exc}"
        except Exception as exc:
            return f"untouched row {row}: {type(exc).__name__}: {exc}"
        if not same(live, expected[row]):
            return f"untouched row {row} returned wrong values"
    return None


_runner = CliRunner()


def check_cli(
    store: Path, expected: dict[int, dict[str, Any]], *, tensors_only: bool = False
) -> str | None:
    """Every read-only command answers with a documented status, one line on failure, no
    traceback; ``verify --all`` exits 0 only when every row loads exactly as saved (with
    ``tensors_only``: loads its saved tensors, or fails with a distckpt error)."""
    for args in (["ls"], ["latest"], ["show"], ["verify", "--all"]):
        try:
            with deadline():
                result = _runner.invoke(cli, [*args, str(store)])
        except Hang:
            return f"distckpt {args[0]} hangs"
        if result.exit_code not in EXIT_CODES or result.exit_code == 1:
            return f"distckpt {args[0]} exit {result.exit_code}: {result.output[-300:]}"
        if "Traceback" in result.output or "unexpected" in result.output:
            return f"distckpt {args[0]}: {result.output[-300:]}"
        if args[0] == "verify" and result.exit_code == 0:
            st = Store(store)
            for row in (r for r in expected if row_status(st, r).committed):
                live = fresh_state()
                try:
                    distckpt.load(live, store, row=row)
                except distckpt.CheckpointError as exc:
                    if tensors_only:
                        continue  # a consistent row of another state: refused by the schema
                    return f"verify exits 0 but row {row} cannot be loaded: {exc}"
                if not same(live, expected[row], tensors_only=tensors_only):
                    return f"verify exits 0 but row {row} returns wrong values"
    return None
