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
    LeaseHeldError,
    LeaseLostError,
    NoCommittedRowError,
    StoreFormatError,
    WorldSizeMismatchError,
)
from .preempt import REQUEUE_EXIT_CODE, PreemptionHandler, preemption
from .rng import GeneratorState, GlobalRngState, RngStateError
from .rollout import ResumableRollout, RolloutBoundary
from .store import Store

__version__ = "0.1.0"

__all__ = [
    "AsyncSaver",
    "lease",
    "logs",
    "rng",
    "Checkpoint",
    "CheckpointEntry",
    "CheckpointSession",
    "CheckpointState",
    "Communicator",
    "MPIComm",
    "GeneratorState",
    "GlobalRngState",
    "NullCheckpoint",
    "PreemptionHandler",
    "REQUEUE_EXIT_CODE",
    "ResumableRollout",
    "RngStateError",
    "RolloutBoundary",
    "SingleProcessComm",
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
    "LeaseHeldError",
    "LeaseLostError",
    "NoCommittedRowError",
    "StoreFormatError",
    "WorldSizeMismatchError",
    "__version__",
    "latest",
    "preemption",
    "load",
    "metadata",
    "save",
]
