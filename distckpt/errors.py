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


class MalformedStateError(StoreFormatError, CheckpointSerializationError):
    """A stored state tree (or metadata) is not one the codec wrote: a node of the wrong
    shape or type. Raised instead of the codec's internal TypeError/ValueError."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes fail their checksum, are truncated or missing."""


class CorruptChunkError(CorruptCheckpointError):
    """A chunk file, or one tensor's byte range in it, fails its check.

    The fields say where and what, so callers (``distckpt verify``, a restart script) never
    parse the message: ``store`` path, ``row``, saved ``rank`` (None: not known), ``array``
    (its directory relative to the row), ``chunk`` (the chunk's grid index), ``problem``
    (one of :attr:`PROBLEMS`), ``detail`` (the human sentence), ``tensor`` (the one tensor at
    fault, None when the damage is the whole chunk's), ``tensors`` (tensors found damaged in
    a chunk holding several) and ``path`` (the file).
    """

    CHECKSUM = "checksum"  # the bytes do not match their recorded checksum
    TRAILER = "trailer"  # the chunk's checksum trailer disagrees with the manifest
    TRUNCATED = "truncated"  # the file ended while being read
    MISSING = "missing"  # the file does not exist
    SIZE = "size"  # the file, or the manifest's record of it, has the wrong size
    UNREADABLE = "unreadable"  # reading the file failed (an OSError other than missing)
    UNLISTED = "unlisted"  # no manifest records a checksum for the chunk
    PROBLEMS = frozenset({CHECKSUM, TRAILER, TRUNCATED, MISSING, SIZE, UNREADABLE, UNLISTED})

    def __init__(
        self,
        message: str,
        *,
        store: str,
        row: int,
        rank: int | None,
        array: str,
        chunk: tuple[int, ...],
        problem: str,
        detail: str = "",
        tensor: str | None = None,
        tensors: tuple[str, ...] = (),
        path: str = "",
    ) -> None:
        if problem not in self.PROBLEMS:
            raise ValueError(f"unknown chunk problem {problem!r}")
        super().__init__(message)
        self.store = store
        self.row = row
        self.rank = rank
        self.array = array
        self.chunk = tuple(chunk)
        self.problem = problem
        self.detail = detail or message
        self.tensor = tensor
        self.tensors = tuple(tensors)
        self.path = path

    def fields(self) -> dict[str, object]:
        """The fields as JSON values: sent between ranks and rebuilt by ``cls(msg, **f)``."""
        return {
            "store": self.store,
            "row": self.row,
            "rank": self.rank,
            "array": self.array,
            "chunk": list(self.chunk),
            "problem": self.problem,
            "detail": self.detail,
            "tensor": self.tensor,
            "tensors": list(self.tensors),
            "path": self.path,
        }

    def __reduce__(self) -> tuple[object, ...]:
        return (self.from_fields, (str(self), self.fields()))

    @classmethod
    def from_fields(cls, message: str, fields: dict[str, object]) -> CorruptChunkError:
        """The error :meth:`fields` describes, with another message (e.g. prefixed by the
        step that failed)."""
        f = dict(fields)
        return cls(
            message,
            store=str(f["store"]),
            row=int(f["row"]),  # type: ignore[call-overload]
            rank=None if f["rank"] is None else int(f["rank"]),  # type: ignore[call-overload]
            array=str(f["array"]),
            chunk=tuple(int(i) for i in f["chunk"]),  # type: ignore[attr-defined]
            problem=str(f["problem"]),
            detail=str(f["detail"]),
            tensor=None if f["tensor"] is None else str(f["tensor"]),
            tensors=tuple(str(t) for t in f["tensors"]),  # type: ignore[attr-defined]
            path=str(f["path"]),
        )


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


class VersionConflictError(CheckpointWriteError):
    """A conditional write lost: ``path`` changed since the writer read version ``expected``
    (None: the writer expected no file). The file keeps what the winner wrote."""

    def __init__(self, message: str, path: str = "", expected: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected


class UnsupportedStorageError(CheckpointWriteError):
    """The storage lacks a feature the commit protocol needs (an object store without
    conditional writes): refused at the first save, never worked around with unsafe writes."""

    def __init__(self, message: str, store: str = "", feature: str = "") -> None:
        super().__init__(message)
        self.store = store
        self.feature = feature


class StorageUnavailableError(CheckpointError):
    """The storage service did not answer (connection refused, timeouts after retries): a
    clear error instead of a hang, and never mistaken for a missing or invalid file."""

    def __init__(self, message: str, store: str = "", operation: str = "") -> None:
        super().__init__(message)
        self.store = store
        self.operation = operation


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


class ForeignCheckpointStateError(CheckpointError, TypeError):
    """A state proxy of Earth2Studio's own checkpoint module was handed to distckpt (its
    component was built before ``use_distckpt()``); a TypeError too, as Earth2Studio raises
    for a value it cannot bind."""

    def __init__(self, message: str, state_id: str | None = None) -> None:
        super().__init__(message)
        self.state_id = state_id


__all__ = [
    "CheckpointError",
    "CheckpointSerializationError",
    "CheckpointStateCollision",
    "CheckpointStateSchemaError",
    "CheckpointWriteError",
    "CollectiveStepError",
    "CommunicatorError",
    "CorruptCheckpointError",
    "CorruptChunkError",
    "ExportFormatError",
    "ForeignCheckpointStateError",
    "ImportFormatError",
    "LeaseHeldError",
    "LeaseLostError",
    "MalformedStateError",
    "MigrationError",
    "NoCommittedRowError",
    "RankFailure",
    "SchemaVersionError",
    "StorageUnavailableError",
    "StoreFormatError",
    "UnsupportedStorageError",
    "VersionConflictError",
    "WorldSizeMismatchError",
]
