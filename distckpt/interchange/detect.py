"""Which external checkpoint format a path holds, and the evidence for that answer.

Detection reads only magic bytes, zip member names, a safetensors header length and the
string constants of a torch pickle (listed with ``pickletools``, never executed).
"""

from __future__ import annotations

import json
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass

from distckpt.errors import ImportFormatError

TORCH = "torch"
LIGHTNING = "lightning"
SAFETENSORS = "safetensors"
DCP = "dcp"
DISTCKPT = "distckpt"
ZARR = "zarr"  # export only: a per-tensor zarr v3 view of a row (``zarrview``)
IMPORT_FORMATS = (TORCH, LIGHTNING, SAFETENSORS, DCP)
EXPORT_FORMATS = (SAFETENSORS, TORCH, ZARR)

DCP_METADATA = ".metadata"
LIGHTNING_KEY = "pytorch-lightning_version"
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format: pickle protocol 2, then its magic number as a long.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_PICKLE_SCAN_LIMIT = 64 << 20  # data.pkl of a state_dict is small: tensors live elsewhere


@dataclass(frozen=True)
class Detection:
    """A detected format (None: not recognised), the path, and why."""

    format: str | None
    path: str
    evidence: tuple[str, ...]

    def explain(self) -> str:
        return "; ".join(self.evidence)


def detect(path: str | os.PathLike[str]) -> Detection:
    """Say what ``path`` holds, from its first bytes or directory listing alone."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImportFormatError(f"{p} does not exist")
    if os.path.isdir(p):
        return _detect_dir(p)
    return _detect_file(p)


def _detect_dir(path: str) -> Detection:
    names = os.listdir(path)
    distcp = sorted(n for n in names if n.endswith(".distcp"))
    if "zarr.json" in names and _is_distckpt_root(os.path.join(path, "zarr.json")):
        return Detection(DISTCKPT, path, ("directory with a zarr.json naming a distckpt store",))
    if DCP_METADATA in names:
        return Detection(
            DCP,
            path,
            (
                f"directory with a {DCP_METADATA} file and {len(distcp)} .distcp data file(s) "
                "(torch.distributed.checkpoint)",
            ),
        )
    if distcp:
        return Detection(
            DCP,
            path,
            (
                f"directory with {len(distcp)} .distcp data file(s) but no {DCP_METADATA} file "
                "(a torch.distributed.checkpoint directory missing its metadata)",
            ),
        )
    return Detection(
        None,
        path,
        (
            f"directory without a {DCP_METADATA} file (torch.distributed.checkpoint) or a "
            "distckpt zarr.json",
        ),
    )


def _is_distckpt_root(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
        return isinstance(doc["attributes"]["distckpt"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _detect_file(path: str) -> Detection:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return _detect_zip(path)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return Detection(
            TORCH, path, ("pickle stream opening with torch.save's legacy magic number",)
        )
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        evidence = f"8-byte little-endian header length ({n}) then a JSON header (safetensors)"
        if n > size - 8:
            evidence += f"; the header length exceeds the {size}-byte file"
        return Detection(SAFETENSORS, path, (evidence,))
    if size == 0:
        return Detection(None, path, ("empty file",))
    return Detection(
        None,
        path,
        (
            f"first bytes {head[:8]!r} match no known format (a zip archive from torch.save, "
            "torch's legacy pickle, or a safetensors header)",
        ),
    )


def _detect_zip(path: str) -> Detection:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
            if not pkl:
                return Detection(
                    None, path, ("zip archive without a data.pkl member: not a torch.save file",)
                )
            if pkl[0].file_size > _PICKLE_SCAN_LIMIT:
                strings: set[str] = set()
            else:
                strings = _pickle_strings(zf.read(pkl[0]))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return Detection(
            None,
            path,
            (
                f"starts with a zip signature but the archive is unreadable, truncated or damaged "
                f"({exc})",
            ),
        )
    what = f"zip archive with {pkl[0].filename} (torch.save format)"
    if LIGHTNING_KEY in strings:
        keys = " and 'state_dict'" if "state_dict" in strings else ""
        return Detection(LIGHTNING, path, (f"{what} whose pickle names '{LIGHTNING_KEY}'{keys}",))
    return Detection(TORCH, path, (what,))


def _pickle_strings(data: bytes) -> set[str]:
    """String constants of a pickle, listed without executing it."""
    out: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS and isinstance(arg, str):
                out.add(arg)
    except (ValueError, EOFError):
        pass  # a damaged pickle: torch.load will say what is wrong
    return out
