"""distckpt: distributed-first restart checkpoints for PyTorch, in zarr v3 stores."""

from distckpt import logs
from distckpt.dist.comm import Communicator, MPIComm, SingleProcessComm, TorchDistComm
from distckpt.engine.api import latest, load, metadata, save
from distckpt.engine.asyncwrite import AsyncSaver
from distckpt.engine.policies import LoadPolicy, LoadReport, SkippedKey, WarmStart, load_model
from distckpt.engine.redistribute import SourceRanks, StateMapping
from distckpt.errors import (
    CheckpointError,
    CheckpointSerializationError,
    CheckpointStateCollision,
    CheckpointStateSchemaError,
    CheckpointWriteError,
    CollectiveStepError,
    CommunicatorError,
    CorruptCheckpointError,
    ExportFormatError,
    ImportFormatError,
    LeaseHeldError,
    LeaseLostError,
    MigrationError,
    NoCommittedRowError,
    RankFailure,
    SchemaVersionError,
    StoreFormatError,
    WorldSizeMismatchError,
)
from distckpt.format.shards import Sharded
from distckpt.interchange import export_row, import_checkpoint
from distckpt.migrate.migrations import (
    AppliedMigration,
    Migration,
    MigrationRegistry,
    default_registry,
    migration,
    register_migration,
)
from distckpt.migrate.surgery import (
    AddKey,
    DropKeys,
    MoveSlice,
    RenameKeys,
    Reshape,
    SliceOrPad,
    TransformMetadata,
    TransformState,
)
from distckpt.session import rng
from distckpt.session.binding import CheckpointState, bind_checkpoint_state
from distckpt.session.checkpoint import (
    Checkpoint,
    CheckpointEntry,
    CheckpointSession,
    NullCheckpoint,
    default_checkpoint_path,
)
from distckpt.session.members import MemberMapping
from distckpt.session.preempt import REQUEUE_EXIT_CODE, PreemptionHandler, preemption
from distckpt.session.rng import GeneratorState, GlobalRngState, RngStateError
from distckpt.session.rollout import ResumableRollout, RolloutBoundary
from distckpt.storage import lease
from distckpt.storage.store import Store

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
    "CollectiveStepError",
    "CommunicatorError",
    "CorruptCheckpointError",
    "ExportFormatError",
    "ImportFormatError",
    "LeaseHeldError",
    "LeaseLostError",
    "NoCommittedRowError",
    "RankFailure",
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
