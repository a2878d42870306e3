"""Imports from and exports to torch.save, Lightning, safetensors and DCP checkpoints.

Every fixture is made here in a tmp dir by the format's own writer (torch.save,
lightning's Trainer, the safetensors library, torch.distributed.checkpoint).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from multiproc import WORKERS, run_torchrun

import distckpt
from distckpt import export_row, import_checkpoint
from distckpt.cli import EXIT_ERROR, EXIT_NO_ROW, EXIT_STORE, cli
from distckpt.errors import ExportFormatError, ImportFormatError
from distckpt.interchange import detect, import_report

safetensors_torch = pytest.importorskip("safetensors.torch")


def run(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal trees with bit-identical tensors (same dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b and type(a) is type(b), where


def row_state(store: Path, row: int | None = None) -> dict[str, Any]:
    """The full tree of a row, read back through the public load()."""
    out: dict[str, Any] = {}
    distckpt.load(out, store, row=row)
    return out


def rows(store: Path) -> list[int]:
    return distckpt.Store(store).rows() if store.exists() else []


def model_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "emb": torch.randint(0, 100, (5,), generator=g, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, generator=g).half(),
    }


# -- torch.save -------------------------------------------------------------------------------


def test_torch_file_round_trip(tmp_path: Path) -> None:
    state = {**model_state(), "step": 12, "name": "run-a", "nested": {"lr": [0.1, 0.01]}}
    torch.save(state, tmp_path / "model.pt")
    row = import_checkpoint(tmp_path / "model.pt", tmp_path / "store", job="j1")
    assert_same(row_state(tmp_path / "store"), state)
    meta = distckpt.metadata(tmp_path / "store", row=row)
    assert meta["import_format"] == "torch"
    assert meta["imported_from"] == str(tmp_path / "model.pt")
    assert "data.pkl" in meta["import_evidence"]
    assert meta["job"] == "j1"

    export_row(tmp_path / "store", tmp_path / "back.pt", format="torch")
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), state)


def test_import_appends_a_row_to_an_existing_store(tmp_path: Path) -> None:
    distckpt.save({"x": torch.ones(2)}, tmp_path / "store")
    torch.save(model_state(1), tmp_path / "m.pt")
    assert import_checkpoint(tmp_path / "m.pt", tmp_path / "store") == 1
    assert_same(row_state(tmp_path / "store", 1), model_state(1))
    assert_same(row_state(tmp_path / "store", 0), {"x": torch.ones(2)})


def test_legacy_torch_file_round_trip(tmp_path: Path) -> None:
    torch.save(model_state(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert "legacy magic number" in detect(tmp_path / "old.pt").explain()
    import_checkpoint(tmp_path / "old.pt", tmp_path / "store")
    assert_same(row_state(tmp_path / "store"), model_state())


def test_torch_file_with_a_sparse_tensor_is_refused_without_a_store(tmp_path: Path) -> None:
    torch.save({"s": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    with pytest.raises(ImportFormatError, match=r"sparse\.pt: .*'s' has layout torch\.sparse"):
        import_checkpoint(tmp_path / "sparse.pt", tmp_path / "store")
    assert not (tmp_path / "store").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_file_of_cuda_tensors_imports_to_the_cpu_and_loads_onto_cuda(
    tmp_path: Path,
) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.save({k: v.to(dev) for k, v in model_state().items()}, tmp_path / "gpu.pt")
    import_checkpoint(tmp_path / "gpu.pt", tmp_path / "store")
    saved = row_state(tmp_path / "store")
    assert {t.device.type for t in saved.values()} == {"cpu"}
    assert_same(saved, model_state())
    live = {k: torch.zeros_like(v, device=dev) for k, v in model_state().items()}
    distckpt.load(live, tmp_path / "store")
    assert {t.device for t in live.values()} == {dev}
    assert_same({k: v.cpu() for k, v in live.items()}, model_state())


def test_torch_file_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ImportFormatError, match=r"list\.pt: holds a list, not a state_dict"):
        import_checkpoint(tmp_path / "list.pt", tmp_path / "store")
    assert not (tmp_path / "store").exists()


# -- safetensors ------------------------------------------------------------------------------


def test_safetensors_from_the_library_round_trip(tmp_path: Path) -> None:
    state = model_state()
    src = tmp_path / "m.safetensors"
    safetensors_torch.save_file(state, str(src), metadata={"source": "hub"})
    row = import_checkpoint(src, tmp_path / "store")
    assert_same(row_state(tmp_path / "store"), state)
    assert distckpt.metadata(tmp_path / "store", row=row)["safetensors_metadata"] == {
        "source": "hub"
    }
    export_row(tmp_path / "store", tmp_path / "back.safetensors", format="safetensors")
    assert_same(safetensors_torch.load_file(str(tmp_path / "back.safetensors")), state)


def test_row_exported_to_safetensors_imports_as_the_same_row(tmp_path: Path) -> None:
    state = {
        "model": model_state(),
        "optim": {"state": {0: {"m": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
        "noise": np.arange(6, dtype=np.float32).reshape(2, 3),
        "epoch": 3,
        "when": dt.datetime(2026, 1, 2, 3, 4),
        "shape": (2, 3),
    }
    distckpt.save(state, tmp_path / "a")
    done = export_row(tmp_path / "a", tmp_path / "a.safetensors", format="safetensors")
    assert done.tensors == 7  # 5 model tensors, the moment, the numpy array
    plain = safetensors_torch.load_file(str(tmp_path / "a.safetensors"))
    assert_same(plain["model.layer.bias"], state["model"]["layer.bias"])
    assert_same(plain["optim.state.0.m"], torch.ones(3))
    import_checkpoint(tmp_path / "a.safetensors", tmp_path / "b")
    assert_same(row_state(tmp_path / "b"), state)


def test_safetensors_export_refuses_names_that_collide(tmp_path: Path) -> None:
    distckpt.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tmp_path / "s")
    with pytest.raises(ExportFormatError, match=r"flatten to the tensor name 'a\.b'"):
        export_row(tmp_path / "s", tmp_path / "x.safetensors", format="safetensors")
    assert os.listdir(tmp_path) == ["s"]


# -- torch.distributed.checkpoint -------------------------------------------------------------


def dcp_save(state: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_dcp_directory_round_trip(tmp_path: Path) -> None:
    state = {"model": model_state(), "step": 7, "tag": "best"}
    dcp_save(state, tmp_path / "dcp")
    import_checkpoint(tmp_path / "dcp", tmp_path / "store")
    assert_same(row_state(tmp_path / "store"), state)
    export_row(tmp_path / "store", tmp_path / "back.pt", format="torch")
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), state)


@pytest.mark.multiproc
def test_dcp_directory_sharded_over_two_ranks_imports_whole(tmp_path: Path) -> None:
    run_torchrun(2, WORKERS / "dcp_worker.py", [str(tmp_path / "dcp")], timeout=120).check()
    assert len(list((tmp_path / "dcp").glob("*.distcp"))) == 2
    import_checkpoint(tmp_path / "dcp", tmp_path / "store")
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3).to(torch.bfloat16)
    expected = {"model": {"sharded": full, "bias": torch.ones(3)}, "step": 5}
    assert_same(row_state(tmp_path / "store"), expected)


class Payload:
    """A class a hostile DCP .metadata could name: unpickling it must be refused."""

    built = False

    def __setstate__(self, state: Any) -> None:
        Payload.built = True


def test_dcp_metadata_claiming_more_bytes_than_stored_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp_save({"w": torch.ones(4)}, tmp_path / "dcp")
    path = tmp_path / "dcp" / ".metadata"
    meta = pickle.loads(path.read_bytes())
    md = meta.state_dict_metadata["w"]
    meta.state_dict_metadata["w"] = TensorStorageMetadata(
        md.properties, torch.Size([2**40]), md.chunks
    )
    path.write_bytes(pickle.dumps(meta))
    with pytest.raises(ImportFormatError, match=r"tensor 'w' of 4398046511104 bytes has only"):
        import_checkpoint(tmp_path / "dcp", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_dcp_metadata_naming_another_global_is_refused(tmp_path: Path) -> None:
    dcp_save({"w": torch.ones(2)}, tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ImportFormatError, match=r"\.metadata: refusing to unpickle the global"):
        import_checkpoint(tmp_path / "dcp", tmp_path / "store")
    assert not Payload.built
    assert not (tmp_path / "store").exists()


# -- Lightning --------------------------------------------------------------------------------


class LightningRun:
    """A tiny LightningModule, its data, and short CPU fits of it."""

    def __init__(self, tmp_path: Path) -> None:
        lightning = pytest.importorskip("lightning")
        from torch.utils.data import DataLoader, TensorDataset

        class Tiny(lightning.LightningModule):
            def __init__(self, hidden: int = 4, lr: float = 0.05) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.net = torch.nn.Linear(3, hidden)

            def training_step(self, batch: Any, _: int) -> torch.Tensor:
                x, y = batch
                return ((self.net(x).sum(-1) - y) ** 2).mean()

            def configure_optimizers(self) -> Any:
                opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
                sched = torch.optim.lr_scheduler.StepLR(opt, 1)
                return {"optimizer": opt, "lr_scheduler": sched}

        self.lightning = lightning
        self.module_type = Tiny
        self.root = tmp_path / "fit"
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, generator=g))
        self.data = DataLoader(data, batch_size=4)

    def fit(self, epochs: int, ckpt_path: Path | None = None) -> tuple[Any, Any]:
        """A fresh module trained to ``epochs`` (resumed from ``ckpt_path``), and its trainer."""
        trainer = self.lightning.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(self.root),
        )
        torch.manual_seed(epochs)
        module = self.module_type()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, self.data, ckpt_path=ckpt_path)
        return module, trainer


def lightning_checkpoint(tmp_path: Path) -> tuple[Path, Any, torch.optim.Optimizer]:
    """A real .ckpt from one short CPU fit, plus a fresh module and optimizer."""
    run = LightningRun(tmp_path)
    _, trainer = run.fit(1)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    fresh = run.module_type()
    return path, fresh, torch.optim.Adam(fresh.parameters(), lr=0.05)


def test_lightning_trainer_checkpoint_imports_and_restores(tmp_path: Path) -> None:
    path, fresh, optimizer = lightning_checkpoint(tmp_path)
    assert detect(path).format == "lightning"
    row = import_checkpoint(path, tmp_path / "store")
    meta = distckpt.metadata(tmp_path / "store", row=row)
    ckpt = torch.load(path, weights_only=True)
    assert (meta["epoch"], meta["global_step"]) == (ckpt["epoch"], ckpt["global_step"])
    assert meta["global_step"] == 4 and meta["import_format"] == "lightning"

    live = {"state_dict": fresh.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    distckpt.load(live, tmp_path / "store", strict=False)
    optimizer.load_state_dict(live["optimizer_states"][0])
    assert_same(dict(fresh.state_dict()), dict(ckpt["state_dict"]))
    assert_same(optimizer.state_dict()["state"], ckpt["optimizer_states"][0]["state"])
    saved = row_state(tmp_path / "store")
    assert saved["hyper_parameters"] == {"hidden": 4, "lr": 0.05}
    assert_same(saved["lr_schedulers"], ckpt["lr_schedulers"])


def test_lightning_resumes_from_an_exported_row_as_from_its_own_checkpoint(
    tmp_path: Path,
) -> None:
    run = LightningRun(tmp_path)
    _, trainer = run.fit(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    import_checkpoint(tmp_path / "epoch1.ckpt", tmp_path / "store")
    export_row(tmp_path / "store", tmp_path / "exported.ckpt", format="torch")

    original, t1 = run.fit(2, tmp_path / "epoch1.ckpt")
    resumed, t2 = run.fit(2, tmp_path / "exported.ckpt")
    assert t1.global_step == t2.global_step == 8
    assert_same(dict(resumed.state_dict()), dict(original.state_dict()))


def test_lightning_hyper_parameters_that_are_not_json_are_dropped_and_reported(
    tmp_path: Path,
) -> None:
    ckpt = {
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {"w": torch.ones(2)},
        "epoch": 0,
        "global_step": 2,
        "hyper_parameters": {"lr": 0.1, "dtype": torch.float16, "layers": [1, 2]},
    }
    torch.save(ckpt, tmp_path / "h.ckpt")
    result = import_report(tmp_path / "h.ckpt", tmp_path / "store")
    assert result.notes == ("dropped hyper-parameter 'dtype': dtype is not JSON",)
    assert row_state(tmp_path / "store")["hyper_parameters"] == {"lr": 0.1, "layers": [1, 2]}
    assert distckpt.metadata(tmp_path / "store")["import_notes"] == list(result.notes)


# -- bad input: a clear error naming the file, and no row --------------------------------------


def truncated_torch(tmp_path: Path) -> Path:
    torch.save(model_state(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "bad").write_bytes(data[: len(data) // 2])
    return tmp_path / "bad"


def random_bytes(tmp_path: Path) -> Path:
    (tmp_path / "bad").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp_path / "bad"


class Custom:
    """Saving an instance needs this class as a pickle global."""


def custom_global(tmp_path: Path) -> Path:
    torch.save({"w": torch.ones(2), "obj": Custom()}, tmp_path / "bad")
    return tmp_path / "bad"


def safetensors_file(path: Path, entries: dict[str, Any], data: bytes) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def overlapping_offsets(tmp_path: Path) -> Path:
    entries = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    return safetensors_file(tmp_path / "bad", entries, bytes(12))


def huge_header(tmp_path: Path) -> Path:
    (tmp_path / "bad").write_bytes(struct.pack("<Q", 2**40) + b'{"a": {}}')
    return tmp_path / "bad"


def unknown_dtype(tmp_path: Path) -> Path:
    entries = {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}
    return safetensors_file(tmp_path / "bad", entries, bytes(1))


def dcp_truncated_data(tmp_path: Path) -> Path:
    dcp_save({"w": torch.ones(1000)}, tmp_path / "bad")
    (data,) = (tmp_path / "bad").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    return tmp_path / "bad"


def duplicate_name(tmp_path: Path) -> Path:
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    header = f'{{"a": {entry}, "a": {entry}}}'.encode()
    (tmp_path / "bad").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1))
    return tmp_path / "bad"


def dcp_without_metadata(tmp_path: Path) -> Path:
    dcp_save({"w": torch.ones(2)}, tmp_path / "bad")
    os.remove(tmp_path / "bad" / ".metadata")
    return tmp_path / "bad"


BAD_INPUTS = {
    "truncated torch file": (truncated_torch, r"unreadable, truncated or damaged"),
    "random bytes": (random_bytes, r"match no known format"),
    "pickle with a custom global": (custom_global, r"needs the global test_interchange\.Custom"),
    "safetensors overlapping offsets": (overlapping_offsets, r"'a' \[0, 8\) and 'b' \[4, 12\)"),
    "safetensors header of 2**40 bytes": (huge_header, r"header length 1099511627776 bytes"),
    "safetensors unknown dtype": (unknown_dtype, r"tensor 'a': unknown dtype 'Q7'"),
    "safetensors name given twice": (duplicate_name, r"cannot be parsed: name 'a' appears twice"),
    "DCP directory without .metadata": (dcp_without_metadata, r"no \.metadata file"),
    "DCP data file truncated": (
        dcp_truncated_data,
        r"'w' is stored at bytes \[0, \d+\) of a 1000-byte",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("store_exists", [False, True], ids=["new-store", "existing-store"])
def test_bad_input_is_refused_and_writes_no_row(
    tmp_path: Path, case: str, store_exists: bool
) -> None:
    make, message = BAD_INPUTS[case]
    source = make(tmp_path)
    store = tmp_path / "store"
    if store_exists:
        distckpt.save({"x": torch.ones(1)}, store)
    with pytest.raises(ImportFormatError, match=message) as err:
        import_checkpoint(source, store)
    assert str(source) in str(err.value)
    assert rows(store) == ([0] if store_exists else [])
    assert store.exists() == store_exists


def test_explicit_format_still_validates(tmp_path: Path) -> None:
    source = random_bytes(tmp_path)
    with pytest.raises(ImportFormatError, match=r"bad: safetensors header length"):
        import_checkpoint(source, tmp_path / "store", format="safetensors")
    with pytest.raises(ImportFormatError, match=r"bad: not a loadable torch\.save file \(damaged"):
        import_checkpoint(source, tmp_path / "store", format="torch")
    assert not (tmp_path / "store").exists()


def test_torch_export_refuses_values_weights_only_cannot_read(tmp_path: Path) -> None:
    distckpt.save({"w": torch.ones(2), "when": dt.date(2026, 1, 1)}, tmp_path / "s")
    with pytest.raises(ExportFormatError, match=r"'when' is a date"):
        export_row(tmp_path / "s", tmp_path / "x.pt", format="torch")
    assert sorted(os.listdir(tmp_path)) == ["s"]


# -- detection --------------------------------------------------------------------------------


def test_detection_names_its_evidence(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "l.ckpt")
    torch.save({"w": torch.ones(1)}, tmp_path / "t.bin")
    safetensors_torch.save_file({"w": torch.ones(1)}, str(tmp_path / "s.st"))
    dcp_save({"w": torch.ones(1)}, tmp_path / "d")
    distckpt.save({"w": torch.ones(1)}, tmp_path / "store")
    found = {p: detect(tmp_path / p) for p in ("l.ckpt", "t.bin", "s.st", "d", "store")}
    assert {p: d.format for p, d in found.items()} == {
        "l.ckpt": "lightning",
        "t.bin": "torch",
        "s.st": "safetensors",
        "d": "dcp",
        "store": "distckpt",
    }
    assert "'pytorch-lightning_version'" in found["l.ckpt"].explain()
    assert "8-byte little-endian header length" in found["s.st"].explain()
    assert "directory with a .metadata file" in found["d"].explain()


# -- command line -----------------------------------------------------------------------------


def test_cli_import_show_export(tmp_path: Path) -> None:
    torch.save(model_state(), tmp_path / "m.pt")
    store = tmp_path / "store"
    result = run("import", tmp_path / "m.pt", store, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["row"], doc["format"], doc["tensors"]) == (0, "torch", 5)

    shown = run("show", store)
    assert shown.exit_code == 0
    assert f"imported   from {tmp_path / 'm.pt'} (torch)" in shown.output

    out = tmp_path / "m.safetensors"
    result = run("export", store, out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    assert f"to {out} as safetensors: 5 tensors" in result.output
    assert_same(safetensors_torch.load_file(str(out)), model_state())


def test_cli_show_on_a_foreign_file_says_what_and_why(tmp_path: Path) -> None:
    safetensors_torch.save_file(model_state(), str(tmp_path / "m.safetensors"))
    result = run("show", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output
    assert "format     safetensors  (not a distckpt store)" in result.output
    assert "detected   8-byte little-endian header length" in result.output
    assert re.search(r"\n  layer\.bias +tensor 4 torch\.bfloat16\n", result.output)

    doc = json.loads(run("show", tmp_path / "m.safetensors", "--json").output)
    assert doc["format"] == "safetensors" and doc["tensors"] == 5
    assert {k["key"] for k in doc["keys"]} == set(model_state())

    unknown = run("show", random_bytes(tmp_path))
    assert unknown.exit_code == EXIT_STORE
    assert "format     not recognised" in unknown.output
    assert "not a distckpt store nor a checkpoint format" in unknown.stderr


def test_cli_bad_input_exits_nonzero_and_names_the_file(tmp_path: Path) -> None:
    source = huge_header(tmp_path)
    result = run("import", source, tmp_path / "store")
    assert result.exit_code == EXIT_ERROR
    assert f"{source}: safetensors header length 1099511627776 bytes" in result.stderr
    assert not (tmp_path / "store").exists()


def test_cli_export_without_a_committed_row(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("export", tmp_path / "empty", tmp_path / "x.pt", "--format", "torch")
    assert result.exit_code == EXIT_NO_ROW
    assert not (tmp_path / "x.pt").exists()
