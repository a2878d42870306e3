"""``torch.distributed.checkpoint`` directories, read single-process into one state tree.

DCP's own reader unpickles ``.metadata`` without restriction and reads non-tensor values
with ``weights_only=False``. Here the metadata is unpickled with an allowlist of DCP's
metadata record types (anything else is refused, naming the global) and non-tensor values
are read weights-only, so importing a DCP directory never runs code from it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
from typing import Any

import torch

from distckpt.errors import ImportFormatError
from distckpt.interchange.detect import DCP_METADATA
from distckpt.interchange.records import Imported
from distckpt.interchange.torchfile import load_weights_only

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_META, "Metadata"),
        (_DCP_META, "MetadataIndex"),
        (_DCP_META, "TensorStorageMetadata"),
        (_DCP_META, "BytesStorageMetadata"),
        (_DCP_META, "ChunkStorageMetadata"),
        (_DCP_META, "TensorProperties"),
        (_DCP_META, "StorageMeta"),
        (_DCP_META, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and torch dtypes; refuses every other global."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ImportFormatError(
            f"{self._path}: refusing to unpickle the global {module}.{name}: not one of "
            "torch.distributed.checkpoint's metadata types"
        )


def read_metadata(directory: str) -> Any:
    """The directory's DCP ``Metadata``, unpickled with the allowlist."""
    path = os.path.join(directory, DCP_METADATA)
    if not os.path.isfile(path):
        raise ImportFormatError(
            f"{directory}: no {DCP_METADATA} file, so not a complete "
            "torch.distributed.checkpoint directory (its writer may have been killed "
            "before it finished)"
        )
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, path).load()
    except ImportFormatError:
        raise
    except Exception as exc:
        raise ImportFormatError(f"{path}: unreadable DCP metadata: {exc}") from None
    if not isinstance(meta, Metadata):
        raise ImportFormatError(f"{path}: holds a {type(meta).__qualname__}, not DCP Metadata")
    _check_storage(directory, meta)
    return meta


def _check_storage(directory: str, meta: Any) -> None:
    """Every stored item lies inside a data file of the directory, and every uncompressed
    tensor has at least its own size in bytes there: a truncated file or a hostile size is
    refused before anything is allocated."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored: dict[str, int] = {}
    transformed: set[str] = set()
    sizes: dict[str, int] = {}
    for index, info in (meta.storage_data or {}).items():
        name = info.relative_path
        if os.path.isabs(name) or os.pardir in name.split(os.sep) or os.sep in name:
            raise ImportFormatError(
                f"{directory}: metadata points at {name!r}, outside the checkpoint directory"
            )
        if name not in sizes:
            try:
                sizes[name] = os.path.getsize(os.path.join(directory, name))
            except OSError:
                raise ImportFormatError(
                    f"{directory}: data file {name} named by {DCP_METADATA} is missing"
                ) from None
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[name]:
            raise ImportFormatError(
                f"{directory}/{name}: {index.fqn!r} is stored at bytes [{info.offset}, "
                f"{info.offset + info.length}) of a {sizes[name]}-byte file (truncated?)"
            )
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
        if info.transform_descriptors:
            transformed.add(index.fqn)
    for fqn, md in meta.state_dict_metadata.items():
        if fqn not in stored:
            raise ImportFormatError(f"{directory}: {fqn!r} has no stored data")
        if isinstance(md, TensorStorageMetadata) and fqn not in transformed:
            need = math.prod(md.size) * md.properties.dtype.itemsize
            if need > stored[fqn]:
                raise ImportFormatError(
                    f"{directory}: tensor {fqn!r} of {need} bytes has only {stored[fqn]} "
                    "bytes stored"
                )


def read_dcp(directory: str) -> Imported:
    """Every tensor and value of the DCP checkpoint, as the nested dict DCP saved."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = read_metadata(directory)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return meta

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = load_weights_only(value, name=f"{directory} (value {fqn!r})", what="DCP value")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    state: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is a single process"
            _load_state_dict(
                state, storage_reader=Reader(directory), planner=Planner(), no_dist=True
            )
    except ImportFormatError:
        raise
    except Exception as exc:
        raise ImportFormatError(
            f"{directory}: cannot read the torch.distributed.checkpoint data (truncated or "
            f"damaged?): {' '.join(str(exc).split())[:300]}"
        ) from None
    return Imported(state=state, metadata={"dcp_tensors": _count_tensors(meta)})


def _count_tensors(meta: Any) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return sum(isinstance(v, TensorStorageMetadata) for v in meta.state_dict_metadata.values())
