"""Turning user-supplied names into safe, readable path components.

State ids, dict keys and metadata keys come from users; they must never select a path
outside the store. Escaping is injective, so distinct names never share a directory.
"""

from __future__ import annotations

import hashlib
import string

_SAFE = frozenset(string.ascii_letters + string.digits + "_-.")
_MAX_COMPONENT = 120
_KEEP_WHEN_HASHED = 80


def escape_component(name: str) -> str:
    """A filesystem-safe, injective encoding of ``name`` as one path component.

    Characters outside ``[A-Za-z0-9_.-]`` are percent-encoded as UTF-8 bytes, and so is a
    leading dot (no ``.``/``..``/hidden names). Long results keep a readable prefix plus a
    SHA-256 digest of the full name, staying far below NAME_MAX.
    """
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    escaped = "".join(out) or "%"
    if len(escaped) > _MAX_COMPONENT:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        escaped = f"{escaped[:_KEEP_WHEN_HASHED]}~{digest}"
    return escaped


def unescape_component(escaped: str) -> str | None:
    """The original name, or None when it was shortened with a digest."""
    if "~" in escaped:
        return None
    if escaped == "%":
        return ""
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "%":
            raw.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(escaped[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogatepass")
