"""distckpt: distributed-first restart checkpoints for PyTorch, in zarr v3 stores.

Public names load on first use (PEP 562): ``import distckpt`` stays cheap, and tools that
only read a store (the ``distckpt`` command's ``ls``, ``latest``, ``show``, ``verify``)
never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distckpt import logs
    from distckpt.dist.comm import Communicator, MPIComm, SingleProcessComm, TorchDistComm
    from distckpt.dist.retention import (
        AnyOf,
        KeepAll,
        KeepBest,
        KeepEveryNSteps,
        KeepLatest,
        RetentionPolicy,
    )
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
        CorruptChunkError,
        ExportFormatError,
        ForeignCheckpointStateError,
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
        CheckpointLevel,
        CheckpointSession,
        LoadedState,
        NullCheckpoint,
        PendingCheckpointState,
        default_checkpoint_path,
    )
    from distckpt.session.manager import CheckpointManager
    from distckpt.session.members import MemberMapping
    from distckpt.session.played import play_ranks, saved_world_size
    from distckpt.session.preempt import REQUEUE_EXIT_CODE, PreemptionHandler, preemption
    from distckpt.session.rng import GeneratorState, GlobalRngState, RngStateError
    from distckpt.session.rollout import ResumableRollout, RolloutBoundary
    from distckpt.storage import lease
    from distckpt.storage.store import Store

__version__ = "0.1.0"

__all__ = [
    "AnyOf",
    "AsyncSaver",
    "CheckpointManager",
    "KeepAll",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLatest",
    "RetentionPolicy",
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
    "CheckpointLevel",
    "CheckpointSession",
    "CheckpointState",
    "LoadedState",
    "PendingCheckpointState",
    "Communicator",
    "MPIComm",
    "MemberMapping",
    "play_ranks",
    "saved_world_size",
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
    "ForeignCheckpointStateError",
    "CheckpointWriteError",
    "CollectiveStepError",
    "CommunicatorError",
    "CorruptCheckpointError",
    "CorruptChunkError",
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


# Where each public name lives: a module of its own, or a name in a module.
_SUBMODULES = {
    "logs": "distckpt.logs",
    "rng": "distckpt.session.rng",
    "lease": "distckpt.storage.lease",
}
_FROM = {
    "distckpt.dist.comm": (
        "Communicator",
        "MPIComm",
        "SingleProcessComm",
        "TorchDistComm",
    ),
    "distckpt.dist.retention": (
        "AnyOf",
        "KeepAll",
        "KeepBest",
        "KeepEveryNSteps",
        "KeepLatest",
        "RetentionPolicy",
    ),
    "distckpt.engine.api": (
        "latest",
        "load",
        "metadata",
        "save",
    ),
    "distckpt.engine.asyncwrite": ("AsyncSaver",),
    "distckpt.engine.policies": (
        "LoadPolicy",
        "LoadReport",
        "SkippedKey",
        "WarmStart",
        "load_model",
    ),
    "distckpt.engine.redistribute": (
        "SourceRanks",
        "StateMapping",
    ),
    "distckpt.errors": (
        "CheckpointError",
        "CheckpointSerializationError",
        "CheckpointStateCollision",
        "CheckpointStateSchemaError",
        "ForeignCheckpointStateError",
        "CheckpointWriteError",
        "CollectiveStepError",
        "CommunicatorError",
        "CorruptCheckpointError",
        "CorruptChunkError",
        "ExportFormatError",
        "ImportFormatError",
        "LeaseHeldError",
        "LeaseLostError",
        "MigrationError",
        "NoCommittedRowError",
        "RankFailure",
        "SchemaVersionError",
        "StoreFormatError",
        "WorldSizeMismatchError",
    ),
    "distckpt.format.shards": ("Sharded",),
    "distckpt.interchange": (
        "export_row",
        "import_checkpoint",
    ),
    "distckpt.migrate.migrations": (
        "AppliedMigration",
        "Migration",
        "MigrationRegistry",
        "default_registry",
        "migration",
        "register_migration",
    ),
    "distckpt.migrate.surgery": (
        "AddKey",
        "DropKeys",
        "MoveSlice",
        "RenameKeys",
        "Reshape",
        "SliceOrPad",
        "TransformMetadata",
        "TransformState",
    ),
    "distckpt.session.binding": (
        "CheckpointState",
        "bind_checkpoint_state",
    ),
    "distckpt.session.checkpoint": (
        "Checkpoint",
        "CheckpointEntry",
        "CheckpointLevel",
        "CheckpointSession",
        "LoadedState",
        "NullCheckpoint",
        "PendingCheckpointState",
        "default_checkpoint_path",
    ),
    "distckpt.session.manager": ("CheckpointManager",),
    "distckpt.session.members": ("MemberMapping",),
    "distckpt.session.played": ("play_ranks", "saved_world_size"),
    "distckpt.session.preempt": (
        "REQUEUE_EXIT_CODE",
        "PreemptionHandler",
        "preemption",
    ),
    "distckpt.session.rng": (
        "GeneratorState",
        "GlobalRngState",
        "RngStateError",
    ),
    "distckpt.session.rollout": (
        "ResumableRollout",
        "RolloutBoundary",
    ),
    "distckpt.storage.store": ("Store",),
}
_OWNER = {name: module for module, names in _FROM.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used, then keep it here."""
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    elif name in _OWNER:
        value = getattr(importlib.import_module(_OWNER[name]), name)
    else:
        raise AttributeError(f"module 'distckpt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
