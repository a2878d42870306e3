"""The fault-injection suite: seeded damage of every kind a store meets, one oracle.

Families: JSON edits of every document of the store (plain, and resealed as a hostile user
would), bit flips and truncations, corrupt chunk bytes, EIO and ENOSPC at every write,
fsync, rename and unlink of save + retention, of the lease and of gc, special files and
links where files belong, a real full disk, newer formats. Each case either gets a distckpt
error (naming the store or file; the CLI a documented exit status, no traceback) or an
election of an intact row with exactly its saved values (``faultlib``). Counts per family
are printed (``pytest -s``). The default run is bounded (about a minute);
``DISTCKPT_FAULT_CASES=N`` with ``DISTCKPT_LONG_TESTS=1`` runs N seeded cases per family.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from faultlib import (
    FailingFS,
    Tally,
    build_store,
    check_cli,
    check_load,
    check_rows,
    deadline,
    fresh_state,
    json_files,
    mutate_bytes,
    mutate_json,
    row_values,
    same,
    snapshot_tree,
)

import distckpt
from distckpt.cli import cli
from distckpt.dist.retention import rows_to_delete
from distckpt.errors import CheckpointError
from distckpt.format.layout import parse_row_name
from distckpt.io.commit import delete_row
from distckpt.storage.filesystem import Buffer
from distckpt.storage.lease import Lease
from distckpt.storage.store import Store

LONG_RUN = os.environ.get("DISTCKPT_LONG_TESTS", "") not in ("", "0")
LONG_CASES = int(os.environ.get("DISTCKPT_FAULT_CASES", "400"))
TALLY = Tally()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "template"
    build_store(path, rows=3)
    return path


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    print("\nfault-injection outcomes per family:\n" + TALLY.report())


EXPECTED = {r: row_values(r) for r in range(3)}


def _copy(template: Path, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(template, dest, symlinks=True)
    return dest


def _row_of(store: Path, path: Path) -> int | None:
    parts = path.relative_to(store).parts
    return parse_row_name(parts[1]) if len(parts) > 2 and parts[0] == "rows" else None


def _judge(family: str, store: Path, touched_row: int | None, *, resealed: bool = False) -> None:
    outcome, problem = check_load(store, EXPECTED, tensors_only=resealed)
    TALLY.add(family, outcome, problem)
    spared = [r for r in EXPECTED if r != touched_row] if touched_row is not None else []
    cli_problem = check_cli(store, EXPECTED, tensors_only=resealed)
    for extra in (check_rows(store, EXPECTED, spared), cli_problem):
        if extra is not None:
            TALLY.add(family, "broken promise", extra)


def _run_json_cases(template: Path, tmp_path: Path, seed: int, n: int, *, reseal: bool) -> None:
    family = "json edits, resealed" if reseal else "json edits"
    rng = random.Random(seed)
    for case in range(n):
        store = _copy(template, tmp_path, f"{family[:4]}{reseal:d}-{case}")
        files = json_files(store)
        manifests = [p for p in files if p.parent.name == "manifests" and p.name != "zarr.json"]
        target = rng.choice(manifests if rng.random() < 0.5 else files)  # half on manifests
        mutation = mutate_json(target, rng, reseal=reseal)
        before = len(TALLY.failures)
        _judge(family, store, _row_of(store, target), resealed=reseal)
        if len(TALLY.failures) > before:
            TALLY.failures[-1] += f" (case {case}: {mutation.detail})"
        shutil.rmtree(store)


def _run_byte_cases(template: Path, tmp_path: Path, seed: int, n: int, *, chunks: bool) -> None:
    family = "chunk bytes" if chunks else "json bit flips and truncation"
    rng = random.Random(seed)
    for case in range(n):
        store = _copy(template, tmp_path, f"bytes{chunks:d}-{case}")
        files = (
            [p for p in store.rglob("c*") if p.is_file() and p.parent.name != "manifests"]
            if chunks
            else json_files(store)
        )
        target = rng.choice(files)
        mutation = mutate_bytes(target, rng)
        before = len(TALLY.failures)
        _judge(family, store, _row_of(store, target))
        if len(TALLY.failures) > before:
            TALLY.failures[-1] += f" (case {case}: {mutation.detail})"
        shutil.rmtree(store)


def _assert_clean() -> None:
    failures, TALLY.failures = TALLY.failures, []
    assert not failures, "\n".join(failures[:20])


def test_json_edits_never_restore_wrong_values(template, tmp_path):
    _run_json_cases(template, tmp_path, seed=14, n=16, reseal=False)
    _run_json_cases(template, tmp_path, seed=15, n=16, reseal=True)
    _assert_clean()


def test_bit_flips_and_truncation_are_caught(template, tmp_path):
    _run_byte_cases(template, tmp_path, seed=16, n=8, chunks=False)
    _run_byte_cases(template, tmp_path, seed=17, n=8, chunks=True)
    _assert_clean()


@pytest.mark.long
def test_many_seeded_mutations(template, tmp_path):
    _run_json_cases(template, tmp_path, seed=140, n=LONG_CASES, reseal=False)
    _run_json_cases(template, tmp_path, seed=150, n=LONG_CASES, reseal=True)
    _run_byte_cases(template, tmp_path, seed=160, n=LONG_CASES // 2, chunks=False)
    _run_byte_cases(template, tmp_path, seed=170, n=LONG_CASES // 2, chunks=True)
    _assert_clean()


# -- EIO and ENOSPC at every call ------------------------------------------------------------
def _save_with(fs: FailingFS, path: Path, row: int) -> int | BaseException:
    try:
        with deadline():
            return distckpt.save(row_values(row), Store(path, fs), keep=2, step=100 * (row + 1))
    except BaseException as exc:
        return exc
    finally:
        # A fault in the release is judged in test_io_errors_in_lease_and_gc.
        with contextlib.suppress(CheckpointError):
            distckpt.storage.lease.release(path)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_io_errors_at_every_call_of_save_and_retention(template, tmp_path, code):
    family = f"{errno.errorcode[code]} in save + retention"
    dry = FailingFS(code, None)
    probe = _copy(template, tmp_path, "probe")
    assert _save_with(dry, probe, 3) == 3
    calls = list(range(1, dry.calls + 1))
    if not LONG_RUN:  # a seeded sample by default; every call in the long run
        calls = sorted(random.Random(code).sample(calls, min(len(calls), 8)))
    for k in calls:
        store = _copy(template, tmp_path, f"io-{k}")
        fs = FailingFS(code, k)
        result = _save_with(fs, store, 3)
        where = f"call {k} ({fs.failed})"
        if isinstance(result, BaseException) and not isinstance(result, CheckpointError):
            TALLY.add(family, "internal error", f"{where}: {type(result).__name__}: {result}")
        elif isinstance(result, CheckpointError):
            TALLY.add(family, "clear error")
        else:
            TALLY.add(family, "saved")
        # Whatever happened, the newest intact row loads exactly (row 3, if it was
        # committed after all: a promise of branch `fallback`, judged there), the earlier
        # committed row is not lost, and the next save works.
        _outcome, problem = check_load(store, {**EXPECTED, 3: row_values(3)})
        if problem is not None:
            TALLY.add(family, "broken promise", f"{where}: {problem}")
        live = fresh_state()
        distckpt.load(live, store, row=2)
        if not same(live, EXPECTED[2]):
            TALLY.add(family, "broken promise", f"{where}: row 2 lost")
        nxt = distckpt.save(row_values(4), store)  # a transient failure locks nothing out
        distckpt.storage.lease.release(store)
        live = fresh_state()
        if distckpt.load(live, store) != nxt or not same(live, row_values(4)):
            TALLY.add(family, "broken promise", f"{where}: the next save does not load back")
        shutil.rmtree(store)
    _assert_clean()


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_io_errors_in_lease_and_gc(template, tmp_path, code):
    family = f"{errno.errorcode[code]} in lease + gc"
    for op in ("acquire", "release", "gc"):
        k = 0
        while True:
            k += 1
            store = _copy(template, tmp_path, f"lease-{op}-{k}")
            fs = FailingFS(code, None if op == "release" else k)
            try:
                with deadline():
                    if op == "gc":
                        st = Store(store, fs)
                        for row in rows_to_delete(st, 1):
                            delete_row(st, row)
                    else:
                        lease = Lease.acquire(Store(store, fs))
                        fs.fail_at = fs.calls + k
                        lease.release()
            except CheckpointError:
                TALLY.add(family, "clear error")
            except OSError as exc:
                if exc.filename is None:
                    TALLY.add(family, "internal error", f"{op} call {k}: OSError without path")
                else:
                    TALLY.add(family, "clear error")  # gc's CLI maps it to status 4 with the path
            except Exception as exc:
                TALLY.add(family, "internal error", f"{op} call {k}: {type(exc).__name__}")
            else:
                TALLY.add(family, "done")
            problem = check_load(store, EXPECTED)[1] or check_rows(store, EXPECTED, [2])
            if problem is not None:
                TALLY.add(family, "broken promise", f"{op} call {k} ({fs.failed}): {problem}")
            done = fs.failed is None
            shutil.rmtree(store)
            if done:
                break
    _assert_clean()


# -- special files, links, directories where files belong ------------------------------------
def _plant(store: Path, outside: Path, kind: str, rng: random.Random) -> tuple[Path, int | None]:
    target = rng.choice(json_files(store))
    row = _row_of(store, target)
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "socket":
        short = tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths are short: bind, then move
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(short, "s"))
        s.close()
        os.rename(os.path.join(short, "s"), target)
        os.rmdir(short)
    elif kind == "link to fifo":
        fifo = outside / f"fifo-{rng.random()}"
        os.mkfifo(fifo)
        target.symlink_to(fifo)
    elif kind == "link to device":
        target.symlink_to("/dev/zero")
    elif kind == "link out of the store":
        copy = outside / f"copy-{rng.random()}.json"
        copy.write_text('{"zarr_format": 3}')
        target.symlink_to(copy)
    elif kind == "directory":
        target.mkdir()
    return target, row


SPECIAL = ["fifo", "socket", "link to fifo", "link to device", "link out of the store", "directory"]


def test_special_files_never_block_or_crash(template, tmp_path):
    rng = random.Random(18)
    outside = tmp_path / "outside"
    outside.mkdir()
    for kind in SPECIAL:
        for case in range(LONG_CASES // 20 if LONG_RUN else 1):
            store = _copy(template, tmp_path, f"special-{case}")
            _, row = _plant(store, outside, kind, rng)
            before = snapshot_tree(outside)
            _judge(f"special files: {kind}", store, row)
            if snapshot_tree(outside) != before:
                TALLY.add(f"special files: {kind}", "broken promise", "outside data changed")
            shutil.rmtree(store)
    _assert_clean()


def test_links_out_of_the_store_survive_gc_and_retention(template, tmp_path):
    outside = tmp_path / "outside"
    (outside / "manifests").mkdir(parents=True)
    (outside / "manifests" / "precious.json").write_text("{}")
    (outside / "data.bin").write_bytes(b"x" * 100)
    before = snapshot_tree(outside)
    store = _copy(template, tmp_path, "linked")
    rows = store / "rows"
    for name in ("000000000000", "000000000001"):  # committed rows gc --keep 1 removes
        shutil.rmtree(rows / name)
    (rows / "000000000000").symlink_to(outside, target_is_directory=True)
    (rows / "000000000001").mkdir()
    (rows / "000000000001" / "manifests").symlink_to(outside / "manifests")
    result = CliRunner().invoke(cli, ["gc", "--keep", "1", str(store)])
    assert result.exit_code == 0, result.output
    assert snapshot_tree(outside) == before
    assert sorted(os.listdir(rows)) == ["000000000002", "zarr.json"]
    live = fresh_state()
    assert distckpt.load(live, store) == 2 and same(live, EXPECTED[2])
    TALLY.add("links out of the store (gc)", "outside intact")


# -- a real full disk ------------------------------------------------------------------------
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return run.returncode == 0


def test_full_disk(tmp_path):
    family = "full disk"
    mnt = tmp_path / "mnt"
    real = _tmpfs(mnt, "2m")
    try:
        store = mnt / "store"
        big = {"w": torch.randn(96, 1024)}  # 384 KiB a row
        saved: dict[int, torch.Tensor] = {}
        fs = None if real else _BudgetFS(2 << 20)
        target = store if fs is None else Store(store, fs)
        error: CheckpointError | None = None
        for _i in range(12):
            big["w"] += 1
            try:
                saved[distckpt.save(big, target)] = big["w"].clone()
            except CheckpointError as exc:
                error = exc
                break
            finally:
                distckpt.storage.lease.release(store)
        assert error is not None, "the disk never filled"
        assert str(store) in str(error) or "space" in str(error)
        for row, value in saved.items():
            out = {"w": torch.zeros(96, 1024)}
            distckpt.load(out, store, row=row)
            assert torch.equal(out["w"], value), f"row {row} lost on the full disk"
        if fs is None:
            gc = CliRunner().invoke(cli, ["gc", "--keep", "1", str(store)])
            assert gc.exit_code == 0, gc.output
        else:
            st = Store(store, fs)
            for row in rows_to_delete(st, 1):
                delete_row(st, row)
            fs.budget = 1 << 40
        newest = max(saved)
        row = distckpt.save({"w": big["w"] + 1}, target)
        distckpt.storage.lease.release(store)
        out = {"w": torch.zeros(96, 1024)}
        assert distckpt.load(out, store) == row > newest and torch.equal(out["w"], big["w"] + 1)
        TALLY.add(family + (" (tmpfs)" if real else " (double)"), "clear error, then recovered")
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


class _BudgetFS(FailingFS):
    """Local files that refuse writes past ``budget`` bytes (no tmpfs: not root)."""

    def __init__(self, budget: int) -> None:
        super().__init__(errno.ENOSPC, None)
        self.budget = budget
        self.used = 0

    def write_file(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> int:
        size = sum(len(memoryview(p).cast("B")) for p in parts)
        if self.used + size > self.budget:
            self.fail_at = self.calls + 1
        else:
            self.used += size
        return super().write_file(path, parts, durable=durable)


# -- newer formats ---------------------------------------------------------------------------
def test_newer_formats_are_refused_with_the_version(template, tmp_path):
    import json

    from distckpt.format import checked

    for where in ("root", "manifest"):
        store = _copy(template, tmp_path, f"newer-{where}")
        if where == "root":
            path = store / "zarr.json"
            doc = json.loads(path.read_text())
            doc["attributes"]["distckpt"]["format"] = 99
            path.write_text(json.dumps(doc))
        else:
            path = store / "rows" / "000000000002" / "manifests" / "rank_000000.json"
            doc = json.loads(path.read_text())
            doc["distckpt_manifest"] = 99
            path.write_bytes(checked.seal(doc))
        with pytest.raises(distckpt.StoreFormatError, match="99"):
            distckpt.load(fresh_state(), store)
        result = CliRunner().invoke(cli, ["latest", str(store)])
        assert result.exit_code == 4 and "99" in result.output
        TALLY.add("newer formats", "clear error")
