"""distckpt: distributed-first restart checkpoints for PyTorch, in zarr v3 stores."""

from .api import latest, load, metadata, save
from .errors import (
    CheckpointError,
    CheckpointSerializationError,
    CheckpointStateCollision,
    CheckpointStateSchemaError,
    CheckpointWriteError,
    CommunicatorError,
    CorruptCheckpointError,
    NoCommittedRowError,
    StoreFormatError,
    WorldSizeMismatchError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointSerializationError",
    "CheckpointStateCollision",
    "CheckpointStateSchemaError",
    "CheckpointWriteError",
    "CommunicatorError",
    "CorruptCheckpointError",
    "NoCommittedRowError",
    "StoreFormatError",
    "WorldSizeMismatchError",
    "__version__",
    "latest",
    "load",
    "metadata",
    "save",
]
