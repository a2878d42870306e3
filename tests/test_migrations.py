"""Versions and migrations: surgery operations, chains, load-time and offline migration."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import SequentialComm
from torch import nn

import distckpt
from distckpt import MigrationRegistry
from distckpt.cli import EXIT_ERROR, EXIT_OK, cli
from distckpt.dist.election import row_status
from distckpt.engine.rewrite import migrate_row
from distckpt.format.layout import FORMAT_VERSION
from distckpt.migrate.migrations import load_migrations
from distckpt.storage.filesystem import LocalFileSystem

N_FEATURES = 52  # grid input features; neural-lam's example moves column 49


# -- the neural-lam fixture -------------------------------------------------------------------


class GridMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))


class G2M(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grid_mlp = GridMLP()
        self.edge_mlp = nn.Linear(8, 8)


class OldGraphModel(nn.Module):
    """Version 1: the grid MLP lives in ``g2m_gnn``; inputs in the old feature order."""

    def __init__(self) -> None:
        super().__init__()
        self.grid_prev_embedder = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.SiLU())
        self.g2m_gnn = G2M()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grid_prev_embedder(x)
        return self.g2m_gnn.edge_mlp(self.g2m_gnn.grid_mlp(h))


class NewGraphModel(nn.Module):
    """Version 2: the grid MLP is ``encoding_grid_mlp``; inputs in the new feature order."""

    __checkpoint_version__ = 2

    def __init__(self) -> None:
        super().__init__()
        self.grid_prev_embedder = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.SiLU())
        self.encoding_grid_mlp = GridMLP()
        self.g2m_gnn = nn.Module()
        self.g2m_gnn.edge_mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grid_prev_embedder(x)
        return self.g2m_gnn.edge_mlp(self.encoding_grid_mlp(h))


MOVES = [(49, 34), (3, 50)]  # applied in order: column 49 to 34, then column 3 to 50


def new_feature_order() -> list[int]:
    """Old feature indices in the new order: the features are renamed lists, moved in turn."""
    names = [f"var{i}" for i in range(N_FEATURES)]
    for src, dst in MOVES:
        moved = names[src]
        names = names[:src] + names[src + 1 :]
        names = [*names[:dst], moved, *names[dst:]]
    return [int(n[3:]) for n in names]


def neural_lam_registry() -> MigrationRegistry:
    registry = MigrationRegistry()
    registry.register(
        "model",
        1,
        [
            distckpt.RenameKeys("g2m_gnn.grid_mlp.", "encoding_grid_mlp.", match="prefix"),
            *(distckpt.MoveSlice("grid_prev_embedder.0.weight", 1, s, d) for s, d in MOVES),
        ],
    )
    return registry


def save_old_model(store: Path) -> OldGraphModel:
    torch.manual_seed(0)
    old = OldGraphModel()
    distckpt.save({"model": old.state_dict()}, store, version=1)
    return old


def assert_same_outputs(old: nn.Module, new: nn.Module) -> None:
    x = torch.randn(16, N_FEATURES, generator=torch.Generator().manual_seed(3))
    order = new_feature_order()
    with torch.no_grad():
        want = old(x)
        got = new(x[:, order])
        unordered = new(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unordered, want, atol=1e-4)  # the column moves matter


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_neural_lam_rename_and_column_moves_give_the_old_outputs(tmp_path):
    old = save_old_model(tmp_path)
    torch.manual_seed(1)
    new = NewGraphModel()
    target = {"model": new.state_dict()}
    distckpt.load(target, tmp_path, version=2, migrations=neural_lam_registry())
    assert_same_outputs(old, new)
    keys = set(target["model"])
    assert {"encoding_grid_mlp.0.weight", "encoding_grid_mlp.2.bias"} <= keys
    assert not any(k.startswith("g2m_gnn.grid_mlp") for k in keys)


def test_load_time_migration_leaves_the_store_untouched(tmp_path):
    save_old_model(tmp_path)
    distckpt.storage.lease.release(tmp_path)
    before = snapshot(tmp_path)
    target = {"model": NewGraphModel().state_dict()}
    distckpt.load(target, tmp_path, version=2, migrations=neural_lam_registry())
    assert snapshot(tmp_path) == before
    record = row_status(distckpt.Store(tmp_path), 0).manifests[0].states["model"]
    assert record.version == 1


def test_save_records_the_version_of_each_state(tmp_path):
    distckpt.save(
        {"model": {"w": torch.ones(2)}, "opt": {"lr": 0.1}}, tmp_path, version={"model": 4}
    )
    states = row_status(distckpt.Store(tmp_path), 0).manifests[0].states
    assert states["model"].version == 4 and states["opt"].version == 0


def test_a_chain_of_three_versions_applies_each_step_in_order(tmp_path):
    registry = MigrationRegistry()
    registry.register("model", 1, [distckpt.RenameKeys("w", "weight")])
    registry.register("model", 2, [distckpt.Reshape("weight", (3, 2))])

    @registry.migration("model", 3)
    def scale(state: dict) -> dict:
        state["weight"] = state["weight"] * 10
        return state

    saved = torch.arange(6.0)
    distckpt.save({"model": {"w": saved}}, tmp_path, version=1)
    target = {"model": {"weight": torch.zeros(3, 2)}}
    distckpt.load(target, tmp_path, version=4, migrations=registry)
    assert torch.equal(target["model"]["weight"], saved.reshape(3, 2) * 10)

    distckpt.save({"model": {"weight": saved.reshape(3, 2)}}, tmp_path, version=3)
    target = {"model": {"weight": torch.zeros(3, 2)}}
    distckpt.load(target, tmp_path, version=4, migrations=registry)  # only the last step
    assert torch.equal(target["model"]["weight"], saved.reshape(3, 2) * 10)


def test_a_missing_step_names_the_state_and_the_versions(tmp_path):
    registry = MigrationRegistry()
    registry.register("model", 1, [distckpt.RenameKeys("w", "weight")])
    distckpt.save({"model": {"w": torch.ones(2)}}, tmp_path, version=1)
    target = {"model": {"weight": torch.zeros(2)}}
    with pytest.raises(distckpt.MigrationError) as info:
        distckpt.load(target, tmp_path, version=3, migrations=registry)
    message = str(info.value)
    assert "'model'" in message and "from version 2 to 3" in message
    assert torch.equal(target["model"]["weight"], torch.zeros(2))


def test_a_newer_saved_version_is_refused_naming_both(tmp_path):
    distckpt.save({"model": {"w": torch.ones(2)}}, tmp_path, version=5)
    live = torch.zeros(2)
    with pytest.raises(distckpt.SchemaVersionError) as info:
        distckpt.load({"model": {"w": live}}, tmp_path, version=3)
    message = str(info.value)
    assert "schema version 5" in message and "knows version 3" in message
    assert "upgrade the code that defines 'model'" in message
    assert torch.equal(live, torch.zeros(2))


def test_a_newer_store_format_is_refused_saying_what_to_upgrade(tmp_path):
    distckpt.save({"model": {"w": torch.ones(2)}}, tmp_path)
    root = tmp_path / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["distckpt"]["format"] = FORMAT_VERSION + 1
    root.write_text(json.dumps(doc))
    with pytest.raises(distckpt.StoreFormatError) as info:
        distckpt.load({"model": {"w": torch.zeros(2)}}, tmp_path, version=0)
    message = str(info.value)
    assert f"format version {FORMAT_VERSION + 1}" in message
    assert f"reads up to version {FORMAT_VERSION}" in message and "upgrade distckpt" in message


def test_registering_a_step_twice_is_an_error():
    registry = MigrationRegistry()
    registry.register("model", 1, [])
    with pytest.raises(distckpt.MigrationError, match="already registered"):
        registry.register("model", 1, [])


def test_default_registry_is_used_without_an_explicit_one(tmp_path, monkeypatch):
    fresh = MigrationRegistry()
    monkeypatch.setattr(distckpt.migrate.migrations, "default_registry", fresh)
    distckpt.register_migration("m", 0, [distckpt.AddKey("b", torch.zeros(1))])
    assert fresh.versions("m") == [0]
    distckpt.save({"m": {"a": torch.ones(1)}}, tmp_path)
    target = {"m": {"a": torch.zeros(1), "b": torch.ones(1)}}
    distckpt.load(target, tmp_path, version=1)
    assert torch.equal(target["m"]["b"], torch.zeros(1))


# -- each operation alone ---------------------------------------------------------------------


def test_rename_exact_prefix_and_regex():
    state = {"a.w": 1, "a.b": 2, "c": 3}
    assert distckpt.RenameKeys("c", "d").apply(state) == {"a.w": 1, "a.b": 2, "d": 3}
    assert distckpt.RenameKeys("a.", "x.", match="prefix").apply(state) == {
        "x.w": 1,
        "x.b": 2,
        "c": 3,
    }
    renamed = distckpt.RenameKeys(r"a\.(\w)", r"layer.\1.p", match="regex").apply(state)
    assert renamed == {"layer.w.p": 1, "layer.b.p": 2, "c": 3}
    assert state == {"a.w": 1, "a.b": 2, "c": 3}  # the input is not modified


def test_rename_refuses_to_match_nothing_or_to_overwrite():
    with pytest.raises(distckpt.MigrationError, match="no key matches 'zz'"):
        distckpt.RenameKeys("zz", "y").apply({"a": 1})
    with pytest.raises(distckpt.MigrationError, match="overwrite 'b'"):
        distckpt.RenameKeys("a", "b").apply({"a": 1, "b": 2})


def test_move_slice_moves_one_index_and_shifts_the_rest():
    t = torch.arange(5.0).repeat(2, 1)
    moved = distckpt.MoveSlice("w", 1, 4, 1).apply({"w": t})["w"]
    assert moved[0].tolist() == [0.0, 4.0, 1.0, 2.0, 3.0]
    back = distckpt.MoveSlice("w", 1, 1, 4).apply({"w": moved})["w"]
    assert torch.equal(back, t)
    with pytest.raises(distckpt.MigrationError, match="outside dimension 1 of size 5"):
        distckpt.MoveSlice("w", 1, 7, 0).apply({"w": t})


def test_move_slice_on_a_numpy_array():
    a = np.arange(4)
    assert distckpt.MoveSlice("a", 0, 0, 3).apply({"a": a})["a"].tolist() == [1, 2, 3, 0]


def test_reshape():
    out = distckpt.Reshape("w", (2, 3)).apply({"w": torch.arange(6)})["w"]
    assert out.shape == (2, 3) and out[1].tolist() == [3, 4, 5]
    with pytest.raises(distckpt.MigrationError, match=r"cannot reshape \(6,\) to \(4, 2\)"):
        distckpt.Reshape("w", (4, 2)).apply({"w": torch.arange(6)})


def test_slice_or_pad_grows_crops_and_pads_in_front():
    w = torch.tensor([[1.0, 2.0, 3.0]])
    grown = distckpt.SliceOrPad("w", 1, 5, fill=-1.0).apply({"w": w})["w"]
    assert grown.tolist() == [[1.0, 2.0, 3.0, -1.0, -1.0]]
    cropped = distckpt.SliceOrPad("w", 1, 2, start=1).apply({"w": w})["w"]
    assert cropped.tolist() == [[2.0, 3.0]]
    front = distckpt.SliceOrPad("w", -1, 4, start=-1, fill=9.0).apply({"w": w})["w"]
    assert front.tolist() == [[9.0, 1.0, 2.0, 3.0]]


def test_drop_keys_and_add_key():
    state = {"a.w": 1, "a.b": 2, "c": 3}
    assert distckpt.DropKeys(("a.",), match="prefix").apply(state) == {"c": 3}
    assert distckpt.DropKeys("c").apply(state) == {"a.w": 1, "a.b": 2}
    with pytest.raises(distckpt.MigrationError, match="no key matches 'q'"):
        distckpt.DropKeys("q").apply(state)
    default = torch.zeros(2)
    added = distckpt.AddKey("d", default).apply(state)
    assert torch.equal(added["d"], default) and added["d"] is not default
    with pytest.raises(distckpt.MigrationError, match="'c' already exists"):
        distckpt.AddKey("c", 0).apply(state)


def test_transform_metadata_rewrites_a_copy_of_the_metadata_only():
    op = distckpt.TransformMetadata(lambda m: {**m, "features": m["features"][::-1]})
    meta = {"features": ["t2m", "u10"], "step": 3}
    assert op.apply_metadata(meta) == {"features": ["u10", "t2m"], "step": 3}
    assert meta == {"features": ["t2m", "u10"], "step": 3}
    assert op.apply({"w": 1}) == {"w": 1}


def test_within_reaches_a_nested_mapping():
    state = {"net": {"old": 1}, "step": 3}
    out = distckpt.RenameKeys("old", "new", within=("net",)).apply(state)
    assert out == {"net": {"new": 1}, "step": 3}


def test_every_operation_describes_itself_as_json():
    ops = [
        distckpt.RenameKeys("a", "b", match="prefix"),
        distckpt.MoveSlice("w", 1, 49, 34),
        distckpt.Reshape("w", (2, 3)),
        distckpt.SliceOrPad("w", 0, 4, fill=0.5),
        distckpt.DropKeys(("x",)),
        distckpt.AddKey("k", torch.zeros(3)),
        distckpt.TransformMetadata(dict),
        distckpt.TransformState(dict),
    ]
    docs = json.loads(json.dumps([op.describe() for op in ops]))
    assert docs[1] == {"op": "MoveSlice", "key": "w", "dim": 1, "src": 49, "dst": 34}
    assert docs[5]["default"] == {"tensor": {"shape": [3], "dtype": "torch.float32"}}
    assert [d["op"] for d in docs] == [type(op).__name__ for op in ops]


# -- bound states ----------------------------------------------------------------------------


@dataclasses.dataclass
class StepperV1:
    __checkpoint_version__ = 1
    temp: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3))


@dataclasses.dataclass
class StepperV2:
    __checkpoint_version__ = 2
    temperature: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3))


def _write_bound(path: Path, value: object) -> None:
    with distckpt.Checkpoint("run", path=path) as session:
        distckpt.bind_checkpoint_state(value, state_id="stepper")
        session.write()


def test_bound_state_is_migrated_to_the_class_version(tmp_path):
    _write_bound(tmp_path, StepperV1(torch.tensor([1.0, 2.0, 3.0])))
    registry = MigrationRegistry()
    registry.register("stepper", 1, [distckpt.RenameKeys("temp", "temperature")])
    live = StepperV2()
    with distckpt.Checkpoint("run", path=tmp_path, migrations=registry):
        bound = distckpt.bind_checkpoint_state(live, state_id="stepper")
        assert bound.checkpoint_state_loaded
    assert live.temperature.tolist() == [1.0, 2.0, 3.0]


def test_bound_state_of_a_newer_version_is_refused(tmp_path):
    _write_bound(tmp_path, StepperV2(torch.ones(3)))
    live = StepperV1()
    with (
        distckpt.Checkpoint("run", path=tmp_path),
        pytest.raises(distckpt.SchemaVersionError) as info,
    ):
        distckpt.bind_checkpoint_state(live, state_id="stepper")
    message = str(info.value)
    assert "schema version 2" in message and "knows version 1" in message
    assert "upgrade the code that defines 'stepper'" in message
    assert torch.equal(live.temp, torch.zeros(3))


def test_bound_state_older_version_without_a_step_is_an_error(tmp_path):
    _write_bound(tmp_path, StepperV1(torch.ones(3)))
    with (
        distckpt.Checkpoint("run", path=tmp_path, migrations=MigrationRegistry()),
        pytest.raises(distckpt.MigrationError, match="'stepper' from version 1 to 2"),
    ):
        distckpt.bind_checkpoint_state(StepperV2(), state_id="stepper")


# -- distckpt migrate ------------------------------------------------------------------------


MIGRATIONS_FILE = f"""
import distckpt
from distckpt.migrate.migrations import MigrationRegistry

migrations = MigrationRegistry()
migrations.register(
    "model",
    1,
    [
        distckpt.RenameKeys("g2m_gnn.grid_mlp.", "encoding_grid_mlp.", match="prefix"),
        *(distckpt.MoveSlice("grid_prev_embedder.0.weight", 1, s, d) for s, d in {MOVES!r}),
        distckpt.TransformMetadata(lambda m: {{**m, "features": "v2 order"}}),
    ],
)
"""


@pytest.fixture
def migrations_file(tmp_path) -> Path:
    path = tmp_path / "my_migrations.py"
    path.write_text(MIGRATIONS_FILE)
    return path


def run(*args: object):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_cli_migrate_writes_a_new_row_and_records_the_chain(tmp_path, migrations_file):
    store = tmp_path / "store"
    old = save_old_model(store)
    distckpt.storage.lease.release(store)
    before = snapshot(store / "rows" / "000000000000")
    result = run("migrate", store, "--to", 2, "--migrations", migrations_file, "--json")
    assert result.exit_code == EXIT_OK, result.output
    doc = json.loads(result.stdout)
    assert doc["source_row"] == 0 and doc["row"] == 1
    assert snapshot(store / "rows" / "000000000000") == before  # old row untouched

    meta = distckpt.metadata(store, row=1)
    assert meta["features"] == "v2 order"
    chain = meta["migrated_from"]
    assert chain["row"] == 0 and chain["store"] == str(store.resolve())
    (state,) = chain["states"]
    assert (state["state"], state["from"], state["to"]) == ("model", 1, 2)
    ops = state["steps"][0]["ops"]
    assert [op["op"] for op in ops] == ["RenameKeys", "MoveSlice", "MoveSlice", "TransformMetadata"]
    assert (ops[1]["src"], ops[1]["dst"]) == (49, 34)
    assert row_status(distckpt.Store(store), 1).manifests[0].states["model"].version == 2

    new = NewGraphModel()  # the migrated row needs no migration any more
    report = distckpt.load_model(new, store, migrations=MigrationRegistry())
    assert report.row == 1 and report.migrated == () and report.complete
    assert_same_outputs(old, new)


def test_cli_migrate_into_a_new_store_keeps_every_rank(tmp_path, migrations_file):
    store, out = tmp_path / "store", tmp_path / "migrated"
    states = {}

    def make(rank: int) -> dict:
        torch.manual_seed(rank)
        states[rank] = OldGraphModel()
        return {"model": states[rank].state_dict(), "step": rank}

    for rank in range(2):
        distckpt.save(
            make(rank),
            store,
            version={"model": 1},
            comm=SequentialComm(rank, 2),
            epoch=7,
        )
    distckpt.storage.lease.release(store)
    result = run(
        "migrate",
        store,
        "--to",
        2,
        "--state",
        "model",
        "--out",
        out,
        "--migrations",
        migrations_file,
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "wrote row 0 of" in result.stdout
    status = row_status(distckpt.Store(out), 0)
    assert status.committed and status.world_size == 2
    for rank in range(2):
        assert distckpt.metadata(out, rank=rank)["epoch"] == 7
        view = distckpt.engine.steps.RowView(distckpt.Store(out), status.manifests[rank])
        new = NewGraphModel()
        new.load_state_dict(view.read_state("model"))
        assert_same_outputs(states[rank], new)
        assert view.read_state("step") == rank
    assert len(distckpt.Store(store).rows()) == 1  # the source store gained nothing


class FailsForRank1(LocalFileSystem):
    """Every write of rank 1's data fails, as on a full disk."""

    def write_file(self, path, parts, *, durable=True):
        if path.endswith("/data/c.1.0"):  # rank 1's shard of the row's data array
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return super().write_file(path, parts, durable=durable)


def test_migrated_row_is_not_committed_when_a_rank_fails_to_write(tmp_path, migrations_file):
    store, out = tmp_path / "store", tmp_path / "migrated"
    for rank in range(2):
        distckpt.save(
            {"model": OldGraphModel().state_dict()},
            store,
            version=1,
            comm=SequentialComm(rank, 2),
        )
    distckpt.storage.lease.release(store)
    target = distckpt.Store(out, fs=FailsForRank1())
    with pytest.raises(distckpt.CheckpointWriteError):
        migrate_row(
            distckpt.Store(store), 2, out=target, registry=load_migrations(str(migrations_file))
        )
    assert target.rows() == [0]
    assert not row_status(target, 0).committed
    manifests = out / "rows" / "000000000000" / "manifests"
    assert sorted(p.name for p in manifests.glob("rank_*")) == []  # rank 0 retracted too


def test_cli_migrate_refuses_to_write_in_place(tmp_path, migrations_file):
    store = tmp_path / "store"
    save_old_model(store)
    distckpt.storage.lease.release(store)
    before = snapshot(store)
    result = run("migrate", store, "--to", 2, "--out", store, "--migrations", migrations_file)
    assert result.exit_code == EXIT_ERROR
    assert "never rewritten in place" in result.stderr
    assert snapshot(store) == before


def test_cli_migrate_refuses_an_out_store_that_already_has_rows(tmp_path, migrations_file):
    store, other = tmp_path / "store", tmp_path / "other"
    save_old_model(store)
    distckpt.save({"x": torch.ones(1)}, other)
    for path in (store, other):
        distckpt.storage.lease.release(path)
    result = run("migrate", store, "--to", 2, "--out", other, "--migrations", migrations_file)
    assert result.exit_code != EXIT_OK and "already holds rows" in result.stderr
    assert distckpt.Store(other).rows() == [0] and distckpt.Store(store).rows() == [0]


def test_cli_migrate_refuses_a_newer_saved_version(tmp_path, migrations_file):
    store = tmp_path / "store"
    distckpt.save({"model": {"w": torch.ones(1)}}, store, version=3)
    distckpt.storage.lease.release(store)
    result = run("migrate", store, "--to", 2, "--migrations", migrations_file)
    assert result.exit_code == EXIT_ERROR
    assert re.search(r"schema version 3; this code knows version 2", result.stderr)
    assert distckpt.Store(store).rows() == [0]


def test_cli_migrate_names_a_missing_step_and_writes_nothing(tmp_path, migrations_file):
    store = tmp_path / "store"
    save_old_model(store)
    distckpt.storage.lease.release(store)
    result = run("migrate", store, "--to", 3, "--migrations", migrations_file)
    assert result.exit_code == EXIT_ERROR
    assert "'model' from version 2 to 3" in result.stderr
    assert distckpt.Store(store).rows() == [0]


def test_cli_migrate_with_nothing_to_do_writes_nothing(tmp_path, migrations_file):
    store = tmp_path / "store"
    distckpt.save({"model": {"w": torch.ones(1)}}, store, version=2)
    distckpt.storage.lease.release(store)
    result = run("migrate", store, "--to", 2, "--migrations", migrations_file)
    assert result.exit_code == EXIT_OK and "nothing written" in result.stdout
    assert distckpt.Store(store).rows() == [0]


def test_migrations_file_is_imported_once(migrations_file):
    assert load_migrations(str(migrations_file)) is load_migrations(str(migrations_file))
