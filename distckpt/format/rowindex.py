"""The row index (formats 2 and 3): ``rows/<row>/index.json``, one summary of a committed row.

The coordinator publishes it atomically after every rank's manifest is published and the
commit step agreed, so its presence means "every rank committed this row". It records what a
reader of any rank's global pieces needs without opening every manifest: the world size, the
write count, and for each global tensor where every rank's boxes lie in that rank's data
array (version 2, format 3: the row's shared data array, ``data_array``). Each piece's
checksums stay in its writer's manifest (a reader opens the manifests
of the ranks whose pieces it reads, not all of them). A missing or malformed index is never
an error: readers fall back to the manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distckpt.errors import StoreFormatError
from distckpt.format import checked
from distckpt.format.layout import DATA_ARRAY, ROW_INDEX_VERSION
from distckpt.format.manifest import MAX_WORLD_SIZE, InvalidManifest


@dataclass(frozen=True)
class IndexedPiece:
    """One box of a global tensor in ``rank``'s data array."""

    rank: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    offset: int
    nbytes: int
    rows: int  # rows of dimension 0 per checksum block

    @property
    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.offsets, self.lengths

    def to_json(self) -> list[Any]:
        box = [list(self.offsets), list(self.lengths)]
        return [self.rank, *box, self.offset, self.nbytes, self.rows]

    @staticmethod
    def from_json(doc: Any) -> IndexedPiece:
        if not (isinstance(doc, list) and len(doc) == 6):
            raise InvalidManifest("index piece is not [rank, offsets, lengths, offset, size, rows]")
        rank, offsets, lengths, offset, nbytes, rows = doc
        ints = [rank, offset, nbytes, rows]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise InvalidManifest("index piece has a bad rank, offset, size or block")
        for box in (offsets, lengths):
            if not (isinstance(box, list) and all(isinstance(v, int) and v >= 0 for v in box)):
                raise InvalidManifest("index piece has a bad box")
        if len(offsets) != len(lengths) or rows < 1:
            raise InvalidManifest("index piece has a bad box")
        return IndexedPiece(rank, tuple(offsets), tuple(lengths), offset, nbytes, rows)


@dataclass(frozen=True)
class IndexedGlobal:
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[IndexedPiece, ...]
    #: The world size when every rank holds its ``shards.even_box`` of the tensor (then no
    #: piece is listed: readers compute them), else 0.
    even: int = 0


@dataclass(frozen=True)
class RowIndex:
    row: int
    world_size: int
    write_count: int
    globals: dict[str, IndexedGlobal]
    #: Format 3: the row's shared data array holds every rank's pieces; "" (format 2): each
    #: rank's own array.
    data_array: str = DATA_ARRAY

    def to_json(self) -> bytes:
        doc = {
            "distckpt_row_index": ROW_INDEX_VERSION,
            "row": self.row,
            "world_size": self.world_size,
            "write_count": self.write_count,
            "data_array": self.data_array,
            "globals": {name: _global_json(g) for name, g in self.globals.items()},
        }
        return checked.seal(doc)  # self-verifying, as manifests are

    @staticmethod
    def from_json(data: bytes, *, where: str = "row index") -> RowIndex:
        """Parse strictly: InvalidManifest if malformed or failing its checksum (every
        index carries one), StoreFormatError if newer."""
        try:
            doc = checked.parse(data, require_checksum=True)
        except checked.MalformedDocument as exc:
            raise InvalidManifest(f"{where} {exc}") from exc
        version = doc.get("distckpt_row_index")
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidManifest(f"{where} has no version")
        if version > ROW_INDEX_VERSION:
            raise StoreFormatError(
                f"{where} was written by row index version {version}; this distckpt reads up "
                f"to version {ROW_INDEX_VERSION}: upgrade distckpt to read it"
            )
        try:
            fields = [doc["row"], doc["world_size"], doc["write_count"]]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields):
                raise InvalidManifest("row, world size or write count is not an integer")
            globals_ = {}
            for name, g in doc["globals"].items():
                shape = tuple(int(d) for d in g["shape"])
                even = g.get("even", 0)
                if even not in (0, doc["world_size"]) or (even and not shape):
                    raise InvalidManifest(f"global {name!r} has a bad even split")
                pieces = tuple(IndexedPiece.from_json(p) for p in g.get("pieces", []))
                globals_[str(name)] = IndexedGlobal(str(g["dtype"]), shape, pieces, even)
        except InvalidManifest as exc:
            raise InvalidManifest(f"{where}: {exc}") from exc
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise InvalidManifest(f"{where}: malformed ({exc})") from exc
        if not 1 <= fields[1] <= MAX_WORLD_SIZE:
            raise InvalidManifest(f"{where}: world size {fields[1]}")
        data_array = doc.get("data_array", "") if version >= 2 else ""
        if data_array not in ("", DATA_ARRAY):
            raise InvalidManifest(f"{where}: unknown data array {data_array!r}")
        return RowIndex(fields[0], fields[1], fields[2], globals_, data_array)


def _global_json(g: IndexedGlobal) -> dict[str, Any]:
    if g.even:
        return {"dtype": g.dtype, "shape": list(g.shape), "even": g.even}
    return {"dtype": g.dtype, "shape": list(g.shape), "pieces": [p.to_json() for p in g.pieces]}
