"""distckpt: distributed-first restart checkpoints for PyTorch, in zarr v3 stores."""

from . import lease, logs, rng
from .api import latest, load, metadata, save
from .asyncwrite import AsyncSaver
from .binding import CheckpointState, bind_checkpoint_state
from .checkpoint import (
    Checkpoint,
    CheckpointEntry,
    CheckpointSession,
    NullCheckpoint,
    default_checkpoint_path,
)
from .comm import Communicator, MPIComm, SingleProcessComm, TorchDistComm
from .errors import (
    CheckpointError,
    CheckpointSerializationError,
    CheckpointStateCollision,
    CheckpointStateSchemaError,
    CheckpointWriteError,
    CommunicatorError,
    CorruptCheckpointError,
    ExportFormatError,
    ImportFormatError,
    LeaseHeldError,
    LeaseLostError,
    MigrationError,
    NoCommittedRowError,
    SchemaVersionError,
    StoreFormatError,
    WorldSizeMismatchError,
)
from .interchange import export_row, import_checkpoint
from .members import MemberMapping
from .migrations import (
    AppliedMigration,
    Migration,
    MigrationRegistry,
    default_registry,
    migration,
    register_migration,
)
from .policies import LoadPolicy, LoadReport, SkippedKey, WarmStart, load_model
from .preempt import REQUEUE_EXIT_CODE, PreemptionHandler, preemption
from .redistribute import SourceRanks, StateMapping
from .rng import GeneratorState, GlobalRngState, RngStateError
from .rollout import ResumableRollout, RolloutBoundary
from .shards import Sharded
from .store import Store
from .surgery import (
    AddKey,
    DropKeys,
    MoveSlice,
    RenameKeys,
    Reshape,
    SliceOrPad,
    TransformMetadata,
    TransformState,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncSaver",
    "lease",
    "logs",
    "rng",
    "AddKey",
    "AppliedMigration",
    "DropKeys",
    "LoadPolicy",
    "LoadReport",
    "Migration",
    "MigrationError",
    "MigrationRegistry",
    "MoveSlice",
    "RenameKeys",
    "Reshape",
    "SchemaVersionError",
    "SkippedKey",
    "SliceOrPad",
    "TransformMetadata",
    "TransformState",
    "WarmStart",
    "default_registry",
    "load_model",
    "migration",
    "register_migration",
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointSession",
    "CheckpointState",
    "Communicator",
    "MPIComm",
    "MemberMapping",
    "GeneratorState",
    "GlobalRngState",
    "NullCheckpoint",
    "PreemptionHandler",
    "REQUEUE_EXIT_CODE",
    "ResumableRollout",
    "RngStateError",
    "RolloutBoundary",
    "Sharded",
    "SingleProcessComm",
    "SourceRanks",
    "StateMapping",
    "Store",
    "TorchDistComm",
    "bind_checkpoint_state",
    "default_checkpoint_path",
    "CheckpointError",
    "CheckpointSerializationError",
    "CheckpointStateCollision",
    "CheckpointStateSchemaError",
    "CheckpointWriteError",
    "CommunicatorError",
    "CorruptCheckpointError",
    "ExportFormatError",
    "ImportFormatError",
    "LeaseHeldError",
    "LeaseLostError",
    "NoCommittedRowError",
    "StoreFormatError",
    "WorldSizeMismatchError",
    "__version__",
    "export_row",
    "import_checkpoint",
    "latest",
    "preemption",
    "load",
    "metadata",
    "save",
]
