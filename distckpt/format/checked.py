"""Self-verifying JSON documents: strict parsing and a checksum over the canonical form.

A manifest (and any other small JSON record a store keeps, such as a row index) names the
bytes a restore trusts, so an edit of it must not pass unnoticed: a swapped tensor index or a
changed scalar would restore wrong values without any chunk failing its check. :func:`seal`
adds a ``"checksum"`` field computed over the canonical serialisation of the rest of the
object; :func:`parse` rejects what ``json.loads`` would let through silently (duplicate
keys, of which the last would win; nesting deep enough to exhaust the stack; integer
literals too long to convert)
and checks the checksum when the document has one. Documents written before checksums
existed have none and still parse unless the caller requires one.
"""

from __future__ import annotations

import json
from typing import Any

import crc32c

CHECKSUM_KEY = "checksum"
_ALGORITHM = "crc32c"


class MalformedDocument(ValueError):
    """A JSON document that cannot be trusted; ``problem`` says why, as a predicate that
    reads after the file's name ("is not valid JSON", "fails its checksum ...")."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class UnknownChecksum(MalformedDocument):
    """A checksum field this reader cannot compute (perhaps a newer format's)."""


def _canonical(doc: dict[str, Any]) -> bytes:
    """The bytes the checksum covers: the object without its checksum field, keys sorted,
    no whitespace, ASCII (so any writer that builds the same object gets the same bytes)."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def digest(doc: dict[str, Any]) -> str:
    """The checksum field's value for ``doc`` (its own checksum field ignored)."""
    return f"{_ALGORITHM}:{int(crc32c.crc32c(_canonical(doc))):08x}"


def seal(doc: dict[str, Any]) -> bytes:
    """``doc`` serialised with its checksum field, ready to write."""
    sealed = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    sealed[CHECKSUM_KEY] = digest(sealed)
    return json.dumps(sealed, separators=(",", ":")).encode()


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find which key, for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedDocument(f"has the key {key!r} twice")
            seen.add(key)
    return out


def loads_strict(data: bytes) -> Any:
    """``json.loads`` that raises :class:`MalformedDocument` for anything it would accept
    ambiguously or fail on with another exception type."""
    try:
        return json.loads(data, object_pairs_hook=_unique)
    except MalformedDocument:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer literal too long to convert; RecursionError:
        # nesting deeper than the interpreter's stack.
        raise MalformedDocument(f"is not valid JSON ({exc})") from exc


def verify(doc: dict[str, Any], *, require_checksum: bool = False) -> dict[str, Any]:
    """``doc`` without its checksum field, once the checksum (when present, or when
    required) matches the rest; :class:`MalformedDocument` otherwise."""
    if CHECKSUM_KEY not in doc:
        if require_checksum:
            raise MalformedDocument("has no checksum")
        return doc
    stored = doc[CHECKSUM_KEY]
    if not isinstance(stored, str) or not stored.startswith(f"{_ALGORITHM}:"):
        raise UnknownChecksum(f"has a checksum of unknown form {stored!r:.40}")
    computed = digest(doc)
    if stored != computed:
        raise MalformedDocument(
            f"fails its checksum (stored {stored}, content {computed}): the file was edited "
            "or damaged"
        )
    return {k: v for k, v in doc.items() if k != CHECKSUM_KEY}


def parse(data: bytes, *, require_checksum: bool = False) -> dict[str, Any]:
    """A JSON object whose checksum (when present, or when required) matches its content.

    Raises :class:`MalformedDocument` naming the problem; the caller adds which file."""
    doc = loads_strict(data)
    if not isinstance(doc, dict):
        raise MalformedDocument("is not a JSON object")
    return verify(doc, require_checksum=require_checksum)
