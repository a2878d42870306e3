"""Lossless JSON encoding of state trees, with tensors pulled out as leaves.

This replaces pickle: a saved tree is JSON whose nodes are tagged by type, so loading can
rebuild dicts, lists, tuples, scalars, datetimes and tensors but can never run code.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from distckpt.errors import CheckpointSerializationError, MalformedStateError
from distckpt.format.shards import is_global

if TYPE_CHECKING:
    import torch

Json = Any
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Leaf:
    """A tensor found in a tree; ``numpy`` marks one that must come back as an ndarray."""

    path: Path
    tensor: torch.Tensor
    numpy: bool


def qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def encode(
    obj: Any, leaves: list[Leaf], path: Path = (), shards: list[tuple[Path, Any]] | None = None
) -> Json:
    """Encode ``obj`` as a tagged JSON node, appending each tensor to ``leaves``.

    Global (sharded) values (DTensor, ``Sharded``) go to ``shards`` as ``{"global": i}``
    nodes; where ``shards`` is None they cannot be stored.
    """
    import torch  # here, not at the top: reading a store's metadata needs no torch

    if is_global(obj):
        if shards is None:
            raise CheckpointSerializationError(
                f"sharded value at {path_str(path)!r} cannot be stored here"
            )
        shards.append((path, obj))
        return {"global": len(shards) - 1}
    if isinstance(obj, torch.Tensor):
        leaves.append(Leaf(path, obj, False))
        return {"tensor": len(leaves) - 1}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "mM":  # datetimes as their int64 counts, unit kept in the node
            index = _ndarray_leaf(obj.view(np.int64), leaves, path)
            return {"np_time_array": [obj.dtype.str, index]}
        if obj.dtype.kind == "U":  # e.g. variable names in coordinates: small, kept inline
            return {"np_str_array": [obj.dtype.str, list(obj.shape), obj.reshape(-1).tolist()]}
        return {"ndarray": _ndarray_leaf(obj, leaves, path)}
    if isinstance(obj, np.generic):
        # Before the plain scalar checks: np.float64 is a float and np.str_ a str, but
        # they must come back as the numpy types they were.
        return {"np_scalar": [obj.dtype.str, _np_scalar_value(obj, path)]}
    if obj is None or isinstance(obj, bool | str):
        return {"v": obj}
    if isinstance(obj, int):
        return {"v": int(obj)}
    if isinstance(obj, float):
        return {"v": obj} if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise CheckpointSerializationError(
                    f"dict key {k!r} at {path_str(path)!r} is not a str or int"
                )
            items.append([k, encode(v, leaves, (*path, k), shards)])
        return {"dict": items}
    if isinstance(obj, list):
        return {"list": [encode(v, leaves, (*path, i), shards) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.Size):
        return {"size": list(obj)}
    if isinstance(obj, tuple):
        return {"tuple": [encode(v, leaves, (*path, i), shards) for i, v in enumerate(obj)]}
    if isinstance(obj, _dt.datetime):
        return {"datetime": obj.isoformat()}
    if isinstance(obj, _dt.date):
        return {"date": obj.isoformat()}
    if isinstance(obj, _dt.timedelta):
        return {"timedelta": [obj.days, obj.seconds, obj.microseconds]}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, bytes):
        return {"bytes": base64.b64encode(obj).decode()}
    if isinstance(obj, complex):
        return {"complex": [_float_json(obj.real), _float_json(obj.imag)]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [
            [f.name, encode(getattr(obj, f.name), leaves, (*path, f.name), shards)]
            for f in dataclasses.fields(obj)
        ]
        return {"dataclass": {"type": qualified_name(type(obj)), "fields": fields}}
    extra = encode_extra_kind(obj, path)
    if extra is not None:
        return extra
    raise CheckpointSerializationError(
        f"value of type {type(obj).__qualname__} at {path_str(path)!r} cannot be stored "
        "(supported: tensors, numpy arrays, dict/list/tuple, scalars, str, bytes, datetimes)"
    )


def _float_json(x: float) -> float | str:
    """A float as strict JSON: non-finite values as their repr, which float() reads back."""
    return x if math.isfinite(x) else repr(x)


def _np_scalar_value(obj: np.generic, path: Path) -> Json:
    kind = obj.dtype.kind
    if kind in "mM":
        return int(obj.view(np.int64))
    if kind == "c":
        c = complex(obj)
        return [_float_json(c.real), _float_json(c.imag)]
    if kind == "f":
        if obj.dtype.itemsize > 8:
            raise CheckpointSerializationError(
                f"numpy {obj.dtype} scalar at {path_str(path)!r} cannot be stored losslessly"
            )
        return _float_json(float(obj))
    if kind in "biu":
        return obj.item()
    if kind == "U":
        return str(obj)
    raise CheckpointSerializationError(
        f"numpy {obj.dtype} scalar at {path_str(path)!r} cannot be stored"
    )


def _ndarray_leaf(obj: np.ndarray, leaves: list[Leaf], path: Path) -> int:
    if obj.dtype.kind not in "biufc":
        raise CheckpointSerializationError(
            f"numpy array of dtype {obj.dtype} at {path_str(path)!r} cannot be stored "
            "(numeric and bool arrays only)"
        )
    if not obj.dtype.isnative:
        obj = obj.astype(obj.dtype.newbyteorder("="))
    if not obj.flags.c_contiguous:
        obj = obj.copy(order="C")
    import torch

    try:
        tensor = torch.from_numpy(obj)
    except (TypeError, ValueError) as exc:
        raise CheckpointSerializationError(
            f"numpy array of dtype {obj.dtype} at {path_str(path)!r} cannot be stored: {exc}"
        ) from exc
    leaves.append(Leaf(path, tensor, True))
    return len(leaves) - 1


def decode(
    node: Json,
    get_leaf: Callable[[int, bool], Any],
    get_global: Callable[[int], Any] | None = None,
) -> Any:
    """Rebuild the object encoded by :func:`encode`; tensors come from ``get_leaf``,
    global values from ``get_global``.

    A node of the wrong shape or type raises ``MalformedStateError`` (a distckpt error),
    never the TypeError/ValueError the conversions below would raise on their own."""
    try:
        return _decode_node(node, get_leaf, get_global)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        raise MalformedStateError(
            f"malformed stored value {node!r:.80} ({type(exc).__name__}: {exc})"
        ) from exc


def _decode_node(
    node: Json,
    get_leaf: Callable[[int, bool], Any],
    get_global: Callable[[int], Any] | None = None,
) -> Any:
    try:
        (tag, value), *rest = node.items()
    except (AttributeError, ValueError) as exc:
        raise MalformedStateError(f"malformed stored value {node!r:.80}") from exc
    if rest:
        raise MalformedStateError(f"malformed stored value {node!r:.80}")
    if tag == "v":
        return value
    if tag == "tensor":
        return get_leaf(int(value), False)
    if tag == "global":
        if get_global is None:
            raise CheckpointSerializationError("stored value refers to a global array here")
        return get_global(int(value))
    if tag == "ndarray":
        return get_leaf(int(value), True)
    if tag == "np_time_array":
        dtype = np.dtype(value[0])
        if dtype.kind not in "mM":
            raise CheckpointSerializationError(f"not a datetime dtype: {value[0]!r}")
        return get_leaf(int(value[1]), True).view(dtype)
    if tag == "np_str_array":
        dtype = np.dtype(value[0])
        if dtype.kind != "U":
            raise CheckpointSerializationError(f"not a str dtype: {value[0]!r}")
        return np.array(value[2], dtype=dtype).reshape(value[1])
    if tag == "dict":
        return {k: decode(v, get_leaf, get_global) for k, v in value}
    if tag == "list":
        return [decode(v, get_leaf, get_global) for v in value]
    if tag == "tuple":
        return tuple(decode(v, get_leaf, get_global) for v in value)
    if tag == "size":
        import torch

        return torch.Size(value)
    if tag == "float":
        return float(value)
    if tag == "datetime":
        return _dt.datetime.fromisoformat(value)
    if tag == "date":
        return _dt.date.fromisoformat(value)
    if tag == "timedelta":
        return _dt.timedelta(days=value[0], seconds=value[1], microseconds=value[2])
    if tag == "np_scalar":
        dtype = np.dtype(value[0])
        if dtype.hasobject:
            raise CheckpointSerializationError(f"refusing object dtype {value[0]!r}")
        v = value[1]
        if dtype.kind in "mM":
            return np.array(v, dtype=np.int64).view(dtype)[()]
        if dtype.kind == "c":
            return dtype.type(complex(float(v[0]), float(v[1])))
        if dtype.kind == "f":
            return dtype.type(float(v))
        return dtype.type(v)
    if tag == "dtype":
        from distckpt.format.dtypes import torch_dtype

        return torch_dtype(value)
    if tag == "bytes":
        return base64.b64decode(value)
    if tag == "complex":
        return complex(float(value[0]), float(value[1]))
    if tag == "dataclass":
        # Types are never imported from a checkpoint: fields come back as a dict and the
        # live object (if any) is filled in place by the binding layer.
        return {k: decode(v, get_leaf, get_global) for k, v in value["fields"]}
    if tag in EXTRA_TAGS:
        return decode_extra_kind(tag, value)
    raise CheckpointSerializationError(f"unknown stored value tag {tag!r}")


# -- descriptor kinds: torch.device and numpy dtypes --------------------------------------
#: Tags of the descriptor kinds (values that name a device or a dtype; no data).
EXTRA_TAGS = frozenset(("device", "np_dtype"))


def encode_extra_kind(obj: Any, path: Path) -> Json | None:
    """A node for a ``torch.device`` or a ``numpy.dtype``; None for any other value.

    Components keep these in their state (Earth2Studio's codec stores both), and they must
    come back as the same type: a device as ``torch.device``, a dtype as ``numpy.dtype``.
    """
    if isinstance(obj, np.dtype):
        if obj.hasobject or obj.fields is not None or obj.subdtype is not None:
            raise CheckpointSerializationError(
                f"numpy dtype {obj} at {path_str(path)!r} cannot be stored (plain dtypes only)"
            )
        return {"np_dtype": obj.str}
    import torch

    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    return None


def decode_extra_kind(tag: str, value: Json) -> Any:
    """The value of a node made by :func:`encode_extra_kind`."""
    if not isinstance(value, str):
        raise CheckpointSerializationError(f"malformed {tag} node {value!r:.80}")
    if tag == "np_dtype":
        try:
            dtype = np.dtype(value)
        except TypeError as exc:
            raise CheckpointSerializationError(f"unknown numpy dtype {value!r}") from exc
        if dtype.hasobject:
            raise CheckpointSerializationError(f"refusing object dtype {value!r}")
        return dtype
    import torch

    try:
        return torch.device(value)
    except RuntimeError as exc:
        raise CheckpointSerializationError(f"unknown device {value!r}") from exc


# -- metadata: a tree whose tensors and arrays are kept inline -----------------------------
#: Tag of a metadata node that holds tensors or arrays: ``[tree, [blob, ...]]``.
INLINE_TAG = "with_arrays"


def encode_metadata(metadata: dict[str, Any]) -> Json:
    """Metadata is a tree kept inline in the manifest; its tensors and arrays (small masks,
    scores) are kept inline too, as raw little-endian bytes with dtype and shape."""
    leaves: list[Leaf] = []
    node = encode(dict(metadata), leaves)
    if not leaves:
        return node
    return {INLINE_TAG: [node, [_inline_blob(leaf) for leaf in leaves]]}


def _inline_blob(leaf: Leaf) -> Json:
    tensor = leaf.tensor.detach().cpu().contiguous()
    if leaf.numpy:
        array = tensor.numpy()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        return ["numpy", array.dtype.newbyteorder("<").str, list(array.shape), _b64(data)]
    import torch

    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    name = str(tensor.dtype).removeprefix("torch.")
    return ["torch", name, list(tensor.shape), _b64(raw)]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _inline_leaf(blob: Json) -> Any:
    """A tensor (torch imported only here) or an ndarray from an inline metadata blob."""
    try:
        kind, dtype_name, shape, data = blob
        raw = base64.b64decode(data)
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError) as exc:
        raise CheckpointSerializationError(f"malformed inline array {blob!r:.80}") from exc
    if kind == "numpy":
        dtype = np.dtype(dtype_name)
        if dtype.hasobject:
            raise CheckpointSerializationError(f"refusing object dtype {dtype_name!r}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return array.astype(dtype.newbyteorder("="))
    if kind != "torch":
        raise CheckpointSerializationError(f"malformed inline array kind {kind!r}")
    import torch

    from distckpt.format.dtypes import torch_dtype

    dtype = torch_dtype(dtype_name)
    buffer = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
    return buffer.to(torch.uint8).view(dtype).reshape(shape).clone()


def decode_metadata(node: Json) -> dict[str, Any]:
    blobs: list[Json] = []
    if isinstance(node, dict) and INLINE_TAG in node:
        try:
            node, blobs = node[INLINE_TAG]
        except (TypeError, ValueError) as exc:
            raise CheckpointSerializationError("malformed metadata with arrays") from exc

    def inline_leaf(index: int, numpy: bool) -> Any:
        if not 0 <= index < len(blobs):
            raise CheckpointSerializationError(f"metadata refers to a missing array {index}")
        return _inline_leaf(blobs[index])

    value = decode(node, inline_leaf)
    if not isinstance(value, dict):
        raise CheckpointSerializationError("stored metadata is not a mapping")
    return value


_SCALAR = (type(None), bool, int, float, str)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pair(x: Any, first: type | tuple[type, ...]) -> bool:
    return isinstance(x, list) and len(x) == 2 and isinstance(x[0], first)


# What the value of each known tag must look like (children are checked by the walk).
_SHAPES: dict[str, Callable[[Any], bool]] = {
    "v": lambda v: isinstance(v, _SCALAR),
    "tensor": _is_int,
    "ndarray": _is_int,
    "global": _is_int,
    "np_time_array": lambda v: _pair(v, str) and _is_int(v[1]),
    "np_str_array": lambda v: (
        isinstance(v, list)
        and len(v) == 3
        and isinstance(v[0], str)
        and isinstance(v[1], list)
        and all(_is_int(d) and d >= 0 for d in v[1])
        and isinstance(v[2], list)
        and math.prod(v[1]) == len(v[2])
    ),
    "dict": lambda v: isinstance(v, list),
    "list": lambda v: isinstance(v, list),
    "tuple": lambda v: isinstance(v, list),
    "size": lambda v: isinstance(v, list) and all(_is_int(d) for d in v),
    "float": lambda v: isinstance(v, str),
    "datetime": lambda v: isinstance(v, str),
    "date": lambda v: isinstance(v, str),
    "timedelta": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) for x in v),
    "np_scalar": lambda v: _pair(v, str),
    "dtype": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, str),
    "complex": lambda v: isinstance(v, list) and len(v) == 2,
    "dataclass": lambda v: (
        isinstance(v, dict) and isinstance(v.get("type"), str) and isinstance(v.get("fields"), list)
    ),
}


def check_tree(
    node: Json,
    *,
    leaves: int | None = None,
    globals_: int | None = None,
    root: Path = (),
    refs: list[tuple[str, str, int]] | None = None,
) -> None:
    """Check that ``node`` has the structure :func:`encode` writes, without decoding it:
    every node one tag, every known tag's value of the right type, tensor and global
    references within ``leaves`` / ``globals_`` (when given), dict keys unique.

    Raises ``MalformedStateError`` naming the path of the first bad node. Tags this reader
    does not know are left to :func:`decode`. Iterative, so depth cannot exhaust the stack.
    ``root`` is the path of ``node`` itself; ``refs`` (if given) receives every reference
    as (``"leaf"`` or ``"global"``, path, index), for checks against what they refer to.
    """
    stack: list[tuple[Json, Path]] = [(node, root)]
    limits = {"tensor": leaves, "ndarray": leaves, "global": globals_, "np_time_array": leaves}
    while stack:
        item, path = stack.pop()
        if not (isinstance(item, dict) and len(item) == 1):
            raise MalformedStateError(f"stored value at {path_str(path)!r} is not a tagged node")
        ((tag, value),) = item.items()
        if tag == "v":  # the commonest nodes first, without a call
            if not isinstance(value, _SCALAR):
                raise MalformedStateError(f"stored 'v' value at {path_str(path)!r} is malformed")
            continue
        shape = _SHAPES.get(tag)
        if shape is None:
            continue
        if not shape(value):
            raise MalformedStateError(f"stored {tag!r} value at {path_str(path)!r} is malformed")
        if tag in limits:
            limit = limits[tag]
            index = value[1] if tag == "np_time_array" else value
            if index < 0 or (limit is not None and index >= limit):
                raise MalformedStateError(
                    f"stored value at {path_str(path)!r} refers to {tag} {index} of {limit}"
                )
            if refs is not None:
                refs.append(("global" if tag == "global" else "leaf", path_str(path), index))
        elif tag == "dict":
            seen: set[Any] = set()
            for pair in value:
                if not (
                    type(pair) is list
                    and len(pair) == 2
                    and type(pair[0]) in (str, int)
                    and pair[0] not in seen
                ):
                    raise MalformedStateError(
                        f"dict at {path_str(path)!r} has a malformed or repeated key"
                    )
                seen.add(pair[0])
                stack.append((pair[1], (*path, pair[0])))
        elif tag in ("list", "tuple"):
            stack.extend((child, (*path, i)) for i, child in enumerate(value))
        elif tag == "dataclass":
            for pair in value["fields"]:
                if not _pair(pair, str):
                    raise MalformedStateError(
                        f"dataclass at {path_str(path)!r} has a malformed field"
                    )
                stack.append((pair[1], (*path, pair[0])))
