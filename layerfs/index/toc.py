"""The TOC of a layer: :class:`LayerIndex`, one record per tar member, and its file format.

A TOC is saved beside the store (``ROOT/indexes/<algo>-<hex>.idx``, see
:mod:`layerfs.index.tocbuild`) in a versioned, xxhash-checked binary file
(:func:`~layerfs.index.columns.pack_file`): JSON metadata, the records as one
zstd frame of the column encoding, and the layer's serialised seek index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import zstandard

from layerfs.errors import LayerfsError
from layerfs.image import Digest
from layerfs.index.columns import IndexFormatError, decode_columns, encode_columns, pack_file, unpack_file
from layerfs.index.records import Entry, new_entry
from layerfs.store import atomic_write

__all__ = ["FORMAT_VERSION", "LayerIndex"]

FORMAT_VERSION = 2   # 2: hard links keep the file their target named when read (rewritten names)
_MAX_RECORDS = 1 << 31      # bound on a decoded records section


class LayerIndex:
    """The TOC of one layer blob: entries, diff_id, sizes and the serialised seek index
    (:attr:`checkpoints`, see :class:`~layerfs.index.seek.SeekIndex`).

    There is one record per path (a later duplicate replaces an earlier one,
    as extraction does), in archive order of the surviving records; a hard
    link keeps the file its target held when the link was read (see
    :func:`~layerfs.index.spool.dedupe`).
    :attr:`entries` gives them as :class:`Entry` tuples; :meth:`rows` as
    plain tuples in the same field order (cheaper, for bulk consumers such
    as the union view). After :meth:`load` the records are decoded on first use.
    """

    def __init__(self, entries: list[Entry] | None, *, diff_id: Digest, size: int, compression: str | None,
                 checkpoints: bytes, digest: Digest | None = None, compressed_size: int | None = None,
                 _raw_entries: bytes | None = None, _count: int | None = None):
        self._entries = entries
        self._count = _count
        self._cols: tuple[list, ...] | None = None
        self._raw_entries = _raw_entries
        self.diff_id = diff_id
        self.size = size
        self.compression = compression
        self.checkpoints = checkpoints
        self.digest = digest
        self.compressed_size = compressed_size
        if entries is None and _raw_entries is None:
            self._entries = []

    def columns(self) -> tuple[list, ...]:
        """One list per :class:`Entry` field."""
        if self._cols is None:
            if self._entries is not None:
                self._cols = tuple(map(list, zip(*self._entries))) if self._entries \
                    else tuple([] for _ in Entry._fields)
            else:
                self._cols = self._decode()
                self._raw_entries = None
        return self._cols

    def _decode(self) -> tuple[list, ...]:
        try:
            raw = zstandard.ZstdDecompressor().decompress(self._raw_entries, max_output_size=_MAX_RECORDS)
        except zstandard.ZstdError:
            raise IndexFormatError("layer index records are corrupt") from None
        cols = decode_columns(raw)
        if self._count is not None and len(cols[0]) != self._count:
            raise IndexFormatError("layer index records do not match its metadata")
        return cols

    def rows(self, *, keep: bool = True) -> Iterable[tuple]:
        """The records as plain tuples in :class:`Entry` field order. With ``keep=False`` the
        records of a loaded index are decoded for this one pass only (the index keeps them
        compressed), for a consumer that keeps what it needs of the rows itself."""
        if self._entries is not None:
            return iter(self._entries)
        if self._cols is None and not keep:
            return zip(*self._decode())
        return zip(*self.columns())

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = list(map(new_entry, zip(*self.columns())))
        return self._entries

    def __len__(self) -> int:
        if self._entries is not None:
            return len(self._entries)
        if self._cols is None and self._count is not None:
            return self._count
        return len(self.columns()[0])

    def __repr__(self) -> str:
        d = self.digest.short if self.digest else "?"
        return f"LayerIndex({d}, diff_id={self.diff_id.short}, size={self.size}, compression={self.compression})"

    # -- file format --------------------------------------------------------------
    #   head:  magic "LFSLIDX\n", u32 version, u32 flags, u64 xxh3_64(body)
    #   body:  u32 meta length, u64 records length, u64 checkpoints length,
    #          meta (JSON: digest, diff_id, size, compression, compressed_size, count),
    #          records (zstd frame of the columnar encoding, see encode_columns),
    #          checkpoints (the seek index: SeekIndex.to_bytes(), as is)
    #   A symlink record reads back with SYMLINK_MODE whatever mode it holds: indexes saved (or
    #   published with 'index push') before symlinks were normalised stay valid, no rebuild needed.
    def to_bytes(self) -> bytes:
        if self._raw_entries is not None:
            records = self._raw_entries
            count = self._count
        else:
            cols = self.columns()
            records = zstandard.ZstdCompressor(level=3).compress(encode_columns(cols))
            count = len(cols[0])
        meta = {"digest": str(self.digest) if self.digest else None, "diff_id": str(self.diff_id),
                "size": self.size, "compression": self.compression, "compressed_size": self.compressed_size,
                "count": count}
        return pack_file(FORMAT_VERSION, meta, [records, bytes(self.checkpoints)])

    @classmethod
    def from_bytes(cls, data: bytes) -> "LayerIndex":
        meta, (records, checkpoints) = unpack_file(data, FORMAT_VERSION, 2)
        try:
            digest = Digest.parse(meta["digest"]) if meta.get("digest") else None
            diff_id = Digest.parse(meta["diff_id"])
            size = meta["size"]
            comp = meta["compression"]
            csize = meta.get("compressed_size")
            count = meta.get("count")
            if not isinstance(size, int) or comp not in ("gzip", "zstd", None) \
                    or not (csize is None or isinstance(csize, int)) or not isinstance(count, int):
                raise ValueError
        except (KeyError, ValueError, TypeError, LayerfsError):
            raise IndexFormatError("layer index metadata is corrupt") from None
        return cls(None, diff_id=diff_id, size=size, compression=comp, checkpoints=bytes(checkpoints),
                   digest=digest, compressed_size=csize, _raw_entries=bytes(records), _count=count)

    def save(self, path: Path | str) -> None:
        """Write atomically (temp file + fsync + rename)."""
        atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path | str) -> "LayerIndex":
        """Read and check an index file. Raises FileNotFoundError when absent and
        :class:`IndexFormatError` when corrupt, truncated or of another version."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(data)
