"""Imports from and exports to other checkpoint formats (torch.save, Lightning,
safetensors, torch.distributed.checkpoint); see docs/import.md."""

from distckpt.interchange.api import (
    EXPORT_FORMATS,
    ImportResult,
    export_row,
    import_checkpoint,
    import_report,
    read_row,
    resolve_format,
)
from distckpt.interchange.detect import IMPORT_FORMATS, Detection, detect
from distckpt.interchange.records import Exported, Imported

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
