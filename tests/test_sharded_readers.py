"""A row holding global (sharded) values, read by every reader: ``load``, ``load_model``,
exports, ``migrate_row`` / ``distckpt migrate``, ``distckpt show`` and ``verify``.

The row is written by two ranks in turn in one process (``save_as_ranks``), each holding
the weight as a ``Sharded`` replica (one process cannot gather distinct pieces; real
pieces are covered by ``test_global``); every check compares against the full value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from fakes import SequentialComm, save_as_ranks
from safetensors.torch import load_file

import distckpt
from distckpt import MigrationRegistry, RenameKeys, Store, export_row
from distckpt.cli import EXIT_OK, cli
from distckpt.engine.rewrite import migrate_row

WEIGHT = torch.arange(12, dtype=torch.float32).reshape(4, 3)
BIAS = torch.tensor([0.5, -1.0, 2.0, 3.0])


def _state(rank: int) -> dict:
    weight = distckpt.Sharded(WEIGHT.clone(), (4, 3), (0, 0))
    return {"model": {"weight": weight, "bias": BIAS.clone()}, "step": 9}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    save_as_ranks(path, 2, _state)
    return path


def _run(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_load_model_fills_a_plain_module_from_sharded_weights(store: Path) -> None:
    model = torch.nn.Linear(3, 4)
    report = distckpt.load_model(model, store, row=0, comm=SequentialComm(0, 2))
    assert report.complete and set(report.loaded) == {"weight", "bias"}
    assert torch.equal(model.weight.detach(), WEIGHT)
    assert torch.equal(model.bias.detach(), BIAS)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_writes_the_whole_sharded_tensor(store: Path, tmp_path: Path, fmt: str) -> None:
    dest = tmp_path / f"out.{fmt}"
    exported = export_row(store, dest, format=fmt, rank=1)
    assert exported.row == 0
    if fmt == "safetensors":
        tensors = load_file(str(dest))
        assert torch.equal(tensors["model.weight"], WEIGHT)
        assert torch.equal(tensors["model.bias"], BIAS)
    else:
        tree = torch.load(dest, weights_only=True)
        assert torch.equal(tree["model"]["weight"], WEIGHT)
        assert tree["step"] == 9


def test_migrate_row_keeps_a_sharded_value_global(tmp_path: Path) -> None:
    path = tmp_path / "store"
    for rank in range(2):
        distckpt.save(_state(rank), path, comm=SequentialComm(rank, 2), version={"model": 1})
    distckpt.storage.lease.release(path)
    registry = MigrationRegistry()
    registry.register("model", 1, [RenameKeys("weight", "w")])
    done = migrate_row(Store(path), 2, state="model", registry=registry)
    assert done.row == 1 and done.world_size == 2
    manifests = [Store(path).read_manifest(1, r) for r in range(2)]
    assert all(m.globals and m.globals[0].shape == (4, 3) for m in manifests)
    piece = distckpt.Sharded(torch.zeros(2, 3), (4, 3), (2, 0))
    live = {"model": {"w": piece, "bias": torch.zeros(4)}, "step": 0}
    distckpt.load(live, path, row=1, comm=SequentialComm(1, 2))
    assert torch.equal(piece.local, WEIGHT[2:])
    assert torch.equal(live["model"]["bias"], BIAS) and live["step"] == 9


MIGRATIONS = """
import distckpt
distckpt.register_migration("model", 1, [distckpt.RenameKeys("weight", "w")])
"""


def test_cli_migrate_show_and_verify_a_sharded_row(tmp_path: Path) -> None:
    path = tmp_path / "store"
    for rank in range(2):
        distckpt.save(_state(rank), path, comm=SequentialComm(rank, 2), version={"model": 1})
    distckpt.storage.lease.release(path)
    steps = tmp_path / "steps.py"
    steps.write_text(MIGRATIONS)
    result = _run("migrate", path, "--to", 2, "--state", "model", "--migrations", steps, "--json")
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.stdout)["row"] == 1
    shown = _run("show", path, "1")
    assert shown.exit_code == EXIT_OK, shown.output
    assert "model/w" in shown.stdout
    verified = _run("verify", path, "--all")
    assert verified.exit_code == EXIT_OK, verified.output
    plain = {"model": {"w": torch.zeros(4, 3), "bias": torch.zeros(4)}, "step": 0}
    distckpt.load(plain, path, row=1, comm=SequentialComm(0, 2))
    assert torch.equal(plain["model"]["w"], WEIGHT)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_dtensors_saved_by_two_ranks_load_into_a_module_and_export(tmp_path: Path) -> None:
    """Two torchrun ranks save DTensor shards (``global_worker``); offline readers get the
    whole logical tensors."""
    import importlib.util

    from multiproc import WORKERS, run_torchrun

    path = WORKERS / "global_worker.py"
    spec = importlib.util.spec_from_file_location("global_worker", path)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    store = tmp_path / "store"
    run_torchrun(2, path, [str(store), "save"], timeout=120).check()

    module = torch.nn.Module()
    for name, (shape, dtype) in worker.TENSORS.items():
        module.register_buffer(name, torch.zeros(shape, dtype=dtype))
    xname, xshape, xdtype = worker.EXPLICIT
    module.register_buffer(xname, torch.zeros(xshape, dtype=xdtype))
    report = distckpt.load_model(module, store, comm=SequentialComm(1, 2))
    assert report.complete
    exported = torch.load(export_row(store, tmp_path / "out.pt", format="torch").path)
    for name, (shape, dtype) in [*worker.TENSORS.items(), (xname, (xshape, xdtype))]:
        want = worker.full(name, shape, dtype)
        assert torch.equal(getattr(module, name), want), name
        assert torch.equal(exported["model"][name], want), name
