"""The one error hierarchy: every failure distckpt raises is a ``CheckpointError``.

Messages name the store, row, rank, array or file at fault so a restart script's log says
what to fix without a debugger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class RankFailure:
    """What one rank raised in a collective step (the exception itself stays on that rank)."""

    type: str  # the exception's class name, e.g. "PermissionError"
    message: str
    ours: bool  # a CheckpointError (its class is kept when it is the first failure)


class CheckpointError(RuntimeError):
    """Base of every error raised by distckpt (a RuntimeError, as Earth2Studio's is).

    Raised by a failed collective step (``distckpt.dist.step``), it also says which step
    failed and what each failing rank raised; otherwise ``step`` is None.
    """

    step: str | None = None
    failures: Mapping[int, RankFailure] = MappingProxyType({})


class CheckpointStateCollision(CheckpointError):
    """Two live objects tried to bind state under the same id."""


class CheckpointSerializationError(CheckpointError):
    """A value cannot be stored without pickle (or cannot be decoded back)."""


class CheckpointStateSchemaError(CheckpointError):
    """Saved state does not match the live object's schema (fields, versions)."""


class SchemaVersionError(CheckpointStateSchemaError):
    """A state was saved by a newer schema version than the reading code knows."""


class MigrationError(CheckpointError):
    """A saved state cannot be migrated: a missing step in the chain, or an operation that
    does not apply to the saved value."""


class StoreFormatError(CheckpointError):
    """The directory is not a distckpt store, or was written by a newer format version."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes fail their checksum, are truncated or missing."""


class NoCommittedRowError(CheckpointError):
    """There is no row that every rank committed."""


class WorldSizeMismatchError(CheckpointError):
    """A row was written by a different number of ranks than are restoring it."""


class CommunicatorError(CheckpointError):
    """Ranks cannot be coordinated (no process group where one is needed, a failed peer)."""


class CollectiveStepError(CheckpointError):
    """A collective step failed on some rank with an error that is not distckpt's own
    (``OSError``, ``MemoryError``, ``KeyError``...); raised on every rank alike."""

    def __init__(
        self, message: str, step: str | None = None, failures: Mapping[int, RankFailure] = {}
    ) -> None:
        super().__init__(message)
        self.step = step
        self.failures = MappingProxyType(dict(failures))


class CheckpointWriteError(CheckpointError):
    """A rank failed to write its part of a row; the row is not committed."""


class ImportFormatError(CheckpointError):
    """A file or directory cannot be imported: unknown format, damaged, or it would need
    arbitrary code (pickle globals) to load. Nothing is written when this is raised."""


class ExportFormatError(CheckpointError):
    """A row cannot be written in the requested external format (a value it cannot hold)."""


class LeaseHeldError(CheckpointError):
    """Another live writer holds the store's lease."""

    def __init__(self, message: str, holder: object | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # the holder's LeaseInfo, when known


class LeaseLostError(LeaseHeldError):
    """This process's lease was taken over (or removed) since it was acquired."""


__all__ = [
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
    "MigrationError",
    "NoCommittedRowError",
    "RankFailure",
    "SchemaVersionError",
    "StoreFormatError",
    "WorldSizeMismatchError",
]
