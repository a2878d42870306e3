"""Imports from and exports to other checkpoint formats (torch.save, Lightning,
safetensors, torch.distributed.checkpoint); see docs/import.md.

The readers and writers load on first use (PEP 562), so format detection (``distckpt show``
on a foreign file) imports neither torch nor them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported here, not lazily: the function ``detect`` must shadow the submodule of that name.
from distckpt.interchange.detect import EXPORT_FORMATS, IMPORT_FORMATS, Detection, detect
from distckpt.interchange.records import Exported, Imported

if TYPE_CHECKING:
    from distckpt.interchange.api import (
        ImportResult,
        export_row,
        import_checkpoint,
        import_report,
        read_row,
        resolve_format,
    )

__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "Detection",
    "Exported",
    "ImportResult",
    "Imported",
    "detect",
    "export_row",
    "import_checkpoint",
    "import_report",
    "read_row",
    "resolve_format",
]

_FROM = {
    "distckpt.interchange.api": (
        "ImportResult",
        "export_row",
        "import_checkpoint",
        "import_report",
        "read_row",
        "resolve_format",
    ),
}
_OWNER = {name: module for module, names in _FROM.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a name's module the first time the name is used, then keep it here."""
    if name not in _OWNER:
        raise AttributeError(f"module 'distckpt.interchange' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNER[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
