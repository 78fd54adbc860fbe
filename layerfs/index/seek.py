"""The seek index of a compressed layer blob: where inflating can start again (checkpoints).

gzip
    zran-style (zlib's ``examples/zran.c``): at a deflate block boundary
    roughly every ``span`` bytes of output a checkpoint keeps the compressed
    byte offset, the number of bits (0-7) of the previous byte still to be
    used, and the 32 KiB of output before it (the window, stored
    zlib-compressed).  A checkpoint at the start of a gzip member (files made
    of concatenated members, as pigz -i / bgzip / estargz write) needs no
    window: ``window is None`` there.

zstd
    zstd frames cannot be entered in the middle, so checkpoints are only at
    frame boundaries (one roughly every ``span`` bytes of output, if the
    blob has several frames).  A large single-frame zstd layer has a single
    checkpoint at 0.

uncompressed
    No checkpoints.

A seek index serialises to a compact, versioned byte string
(:meth:`SeekIndex.to_bytes` / :meth:`SeekIndex.from_bytes`) that the layer
TOC file embeds: little-endian ``"LFZI"``, u8 version (2), u8 compression
(0 none, 1 gzip, 2 zstd), u16 flags (0), u64 span, u64 compressed size, u64
uncompressed size, u32 count; per checkpoint u64 uoffset, u64 coffset, u8
bits, u8 has_window, u32 window length, window bytes; u32 count of stored
blocks and per stored block u64 uoffset, u64 coffset, u16 length (version 1
has no stored blocks and is still read); then a CRC-32 of all that.

Stored blocks: deflate writes incompressible data as stored blocks, whose
output is the compressed bytes themselves.  The gzip indexer records them
and readers serve reads inside them straight from the blob.  Everything read
back is validated; a bad seek index raises :class:`BadIndex`.  The C code
checks again what it is given, so even a seek index built by hand can only
make reads raise.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from layerfs import _zran
from layerfs.errors import ContentError
from layerfs.index.compression import CODE_COMPRESSION, COMPRESSION_CODES, normalize_compression

__all__ = ["DEFAULT_SPAN", "INDEX_VERSION", "WINDOW_SIZE", "MAX_COMPRESSED_WINDOW", "MAX_SPAN", "BadIndex",
           "Checkpoint", "SeekIndex"]

KiB = 1024
MiB = 1024 * KiB

DEFAULT_SPAN = 4 * MiB
INDEX_VERSION = 2                 # 2 adds the stored blocks; version 1 is still read
WINDOW_SIZE = _zran.WINSIZE
MAX_COMPRESSED_WINDOW = _zran.MAX_CWIN
MAX_SPAN = 1 << 40


class BadIndex(ContentError):
    """A serialised seek index that is malformed or does not fit its blob."""

    default_hint = "the layer index is damaged; rebuild it (pull the layer again)"


class Checkpoint(NamedTuple):
    """A place where decompression can restart.

    ``uoffset``: offset in the uncompressed stream; ``coffset``: offset in
    the blob; ``bits``: for gzip, how many bits (0-7) of the byte at
    ``coffset - 1`` belong to the data after the checkpoint; ``window``: the
    zlib-compressed 32 KiB (or less) of output before the checkpoint, or
    ``None`` where no window is needed -- the start of a gzip member or of a
    zstd frame, which is always the case for zstd.
    """

    uoffset: int
    coffset: int
    bits: int = 0
    window: bytes | None = None

    @property
    def at_member_start(self) -> bool:
        return self.window is None


_HEADER = struct.Struct("<4sBBHQQQI")   # magic, version, compression, flags, span, csize, usize, count
_POINT = struct.Struct("<QQBBI")        # uoffset, coffset, bits, has_window, window length
_STORED = struct.Struct("<QQH")         # uoffset, coffset, length of a stored block
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")
_MAGIC = b"LFZI"
_SIZE_LIMIT = 1 << 62


@dataclass(frozen=True)
class SeekIndex:
    """Checkpoints of one blob plus its sizes; serialisable."""

    compression: str | None
    span: int
    compressed_size: int
    uncompressed_size: int
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)
    #: gzip: (uoffset, coffset, length) of each stored deflate block (its output is
    #: the blob's bytes at coffset), by uoffset; readers serve them without inflating
    stored: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compression", normalize_compression(self.compression))
        object.__setattr__(self, "checkpoints", tuple(Checkpoint(*c) for c in self.checkpoints))
        object.__setattr__(self, "stored", tuple(tuple(b) for b in self.stored))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`BadIndex` unless the index is self-consistent."""
        comp = self.compression
        if not (1 <= self.span <= MAX_SPAN):
            raise BadIndex(f"span {self.span} out of range")
        if not (0 <= self.compressed_size < _SIZE_LIMIT and 0 <= self.uncompressed_size < _SIZE_LIMIT):
            raise BadIndex("sizes out of range")
        cps = self.checkpoints
        if comp is None:
            if cps:
                raise BadIndex("an uncompressed blob has no checkpoints")
            if self.compressed_size != self.uncompressed_size:
                raise BadIndex("uncompressed blob: sizes differ")
            return
        if not cps:
            raise BadIndex("no checkpoints")
        first = cps[0]
        if first.uoffset != 0 or first.coffset != 0 or first.bits != 0 or first.window is not None:
            raise BadIndex("the first checkpoint must be the start of the blob")
        prev_u, prev_bitpos = -1, -1
        for cp in cps:
            u, c, bits, win = cp
            if not (isinstance(u, int) and isinstance(c, int) and isinstance(bits, int)):
                raise BadIndex("checkpoint fields must be integers")
            if not (0 <= bits <= 7):
                raise BadIndex(f"bit offset {bits} out of range")
            if win is None:
                if bits:
                    raise BadIndex("bit offset without window")
            else:
                if comp != "gzip":
                    raise BadIndex(f"{comp} checkpoints carry no window")
                if not isinstance(win, (bytes, bytearray)) or not (0 < len(win) <= MAX_COMPRESSED_WINDOW):
                    raise BadIndex("bad window length")
            if bits and c < 1:
                raise BadIndex("bit offset at byte 0")
            if not (0 <= c < self.compressed_size):
                raise BadIndex(f"checkpoint offset {c} outside the blob ({self.compressed_size} bytes)")
            if not (0 <= u <= self.uncompressed_size):
                raise BadIndex(f"checkpoint at {u} beyond the uncompressed size {self.uncompressed_size}")
            bitpos = c * 8 - bits
            if u <= prev_u or bitpos <= prev_bitpos:
                raise BadIndex("checkpoints out of order")
            prev_u, prev_bitpos = u, bitpos
        self._validate_stored()

    def _validate_stored(self) -> None:
        if self.stored and self.compression != "gzip":
            raise BadIndex(f"{self.compression or 'plain'} blobs have no stored blocks")
        prev_u = prev_c = 0
        for b in self.stored:
            if len(b) != 3 or not all(isinstance(x, int) for x in b):
                raise BadIndex("stored blocks must be (uoffset, coffset, length) integers")
            u, c, n = b
            if not (1 <= n <= 65535):
                raise BadIndex(f"stored block length {n} out of range")
            if u < prev_u or c < prev_c + 4 or u + n > self.uncompressed_size or c + n > self.compressed_size:
                raise BadIndex("stored blocks out of order or outside the blob")
            prev_u, prev_c = u + n, c + n

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(_MAGIC, INDEX_VERSION, COMPRESSION_CODES[self.compression], 0,
                              self.span, self.compressed_size, self.uncompressed_size,
                              len(self.checkpoints))]
        for u, c, bits, win in self.checkpoints:
            parts.append(_POINT.pack(u, c, bits, win is not None, len(win or b"")))
            if win is not None:
                parts.append(bytes(win))
        parts.append(_COUNT.pack(len(self.stored)))
        parts.extend(_STORED.pack(*b) for b in self.stored)
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "SeekIndex":
        data = bytes(data)
        if len(data) < _HEADER.size + _CRC.size:
            raise BadIndex("index too short")
        magic, version = data[:4], data[4]
        if magic != _MAGIC:
            raise BadIndex("not a layerfs seek index (bad magic)")
        if version not in (1, INDEX_VERSION):
            raise BadIndex(f"unsupported seek index version {version} (this layerfs reads 1 to {INDEX_VERSION})")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        body = memoryview(data)[: len(data) - _CRC.size]
        if zlib.crc32(body) != crc:
            raise BadIndex("seek index checksum mismatch")
        _, _, code, flags, span, csize, usize, count = _HEADER.unpack_from(body, 0)
        if code not in CODE_COMPRESSION:
            raise BadIndex(f"unknown compression code {code}")
        if flags:
            raise BadIndex(f"unknown index flags {flags:#x}")
        if count > (len(body) - _HEADER.size) // _POINT.size:
            raise BadIndex("checkpoint count exceeds the index size")
        pos = _HEADER.size
        cps = []
        for _ in range(count):
            if pos + _POINT.size > len(body):
                raise BadIndex("index truncated")
            u, c, bits, has_win, wlen = _POINT.unpack_from(body, pos)
            pos += _POINT.size
            if has_win not in (0, 1) or (not has_win and wlen):
                raise BadIndex("bad checkpoint flags")
            win = None
            if has_win:
                if not (0 < wlen <= MAX_COMPRESSED_WINDOW) or pos + wlen > len(body):
                    raise BadIndex("bad window length")
                win = bytes(body[pos:pos + wlen])
                pos += wlen
            cps.append(Checkpoint(u, c, bits, win))
        stored = []
        if version >= 2:
            if pos + _COUNT.size > len(body):
                raise BadIndex("index truncated")
            (n,) = _COUNT.unpack_from(body, pos)
            pos += _COUNT.size
            if n > (len(body) - pos) // _STORED.size:
                raise BadIndex("stored block count exceeds the index size")
            stored = list(_STORED.iter_unpack(body[pos:pos + n * _STORED.size]))
            pos += n * _STORED.size
        if pos != len(body):
            raise BadIndex("trailing bytes in index")
        return cls(CODE_COMPRESSION[code], span, csize, usize, tuple(cps), tuple(stored))
