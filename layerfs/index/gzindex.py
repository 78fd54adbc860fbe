"""Random access into compressed layer blobs.

A layer blob is downloaded once.  While it streams in, an *indexer* inflates
it (the caller feeds the output to the tar parser and to the diff_id sha256)
and records *checkpoints*: places in the blob where decompression can start
again.  Later a *reader* serves ``read(offset, length)`` of the uncompressed
tar by decompressing only from the nearest checkpoint at or before
``offset``.

gzip (``GzipIndexer`` / ``GzipReader``)
    zran-style (zlib's ``examples/zran.c``): at a deflate block boundary
    roughly every ``span`` bytes of output a checkpoint keeps the compressed
    byte offset, the number of bits (0-7) of the previous byte still to be
    used, and the 32 KiB of output before it (the window, stored
    zlib-compressed).  A checkpoint at the start of a gzip member (files made
    of concatenated members, as pigz -i / bgzip / estargz write) needs no
    window: ``window is None`` there.  The work is done by the C extension
    ``layerfs._zran``, which releases the GIL while it inflates, so layers
    downloaded in several threads use several cores.  CRC-32 and length of
    every member are checked by the indexer.

zstd (``ZstdIndexer`` / ``ZstdReader``)
    zstd frames cannot be entered in the middle, so checkpoints are only at
    frame boundaries (one roughly every ``span`` bytes of output, if the
    blob has several frames).  A large single-frame zstd layer -- what
    ``zstd`` and most image builders write -- has a single checkpoint at 0:
    a read there decompresses from the start of the frame up to the offset.
    To keep that bearable the reader keeps a few open decompression cursors
    (a read at or after a cursor's position continues from it, so reading
    a layer front to back costs one pass) and caches decompressed pieces of
    ``span`` bytes.  Random reads far into a big single-frame layer stay
    O(offset); build such layers with several frames if that matters.

uncompressed (``PlainIndexer`` / ``PlainReader``)
    Direct ``pread``.

Readers are thread-safe and keep an LRU :class:`SpanCache` of decompressed
spans (``cache_bytes``, default 32 MiB; 0 disables; one cache may be shared
by many readers).  A gzip span is filled front to back by a resumable
decoder: the first read in a span decompresses from its checkpoint only up
to the end of that read (plus 256 KiB read-ahead), later reads in the span
are served from memory or continue where decompression stopped -- many small
files in one span cost one decompression.  Spans larger than half the cache
are read uncached.  A gzip reader that is read sequentially also inflates
the next spans ahead of it on worker threads (decode-ahead, see
:class:`GzipReader`).  Reading inflates with ISA-L's igzip (the indexer
uses zlib, which reports the deflate block boundaries checkpoints need).

Indexes serialise to a compact, versioned byte string
(:meth:`SeekIndex.to_bytes` / :meth:`SeekIndex.from_bytes`) that the layer
index file embeds: little-endian ``"LFZI"``, u8 version (2), u8 compression
(0 none, 1 gzip, 2 zstd), u16 flags (0), u64 span, u64 compressed size, u64
uncompressed size, u32 count; per checkpoint u64 uoffset, u64 coffset, u8
bits, u8 has_window, u32 window length, window bytes; u32 count of stored
blocks and per stored block u64 uoffset, u64 coffset, u16 length (version 1
has no stored blocks and is still read); then a CRC-32 of all that.

Stored blocks: deflate writes incompressible data as stored blocks, whose
output is the compressed bytes themselves.  The gzip indexer records them;
a read that falls entirely in a run of consecutive stored blocks is served
with one ``preadv`` straight into the result (each block's LEN/NLEN
checked), without inflating or caching anything.  Everything read back is validated; a bad index raises
:class:`BadIndex`, bad compressed data raises :class:`CompressedDataError`
(:class:`TruncatedStream` when it ends early).  The C code checks again what
it is given, so even an index built by hand can only make reads raise.

Memory: indexers keep no output; a gzip indexer keeps its checkpoints (about
20-33 KiB each, one per ``span``).  ``feed`` returns a chunk's whole output
(a decompression bomb can make that huge): use ``feed_iter(chunk,
max_out)``, which decompresses in steps and yields the output in pieces of
at most ``max_out`` bytes, for gzip and zstd alike, so memory stays bounded
whatever the ratio.  A zstd frame may not need a window above libzstd's
default limit (128 MiB).

Typical use::

    ix = make_indexer(compression)            # "gzip", "zstd" or None
    for chunk in response.iter_content(1 << 20):
        blob_file.write(chunk)
        data = ix.feed(chunk)
        tar_parser.feed(data); diff_id.update(data)
    ix.finish()                                # raises on truncation / bad CRC
    index_bytes = ix.to_bytes()
    ...
    with open_reader(blob_path, compression, index_bytes) as r:
        r.read(offset, length)
"""
from __future__ import annotations

import array
import bisect
import functools
import os
import stat
import struct
import threading
import weakref
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol, Union, runtime_checkable

from layerfs.errors import ContentError

try:
    from layerfs import _zran
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "layerfs._zran (native/zran/) is not built; run 'pip install -e .' "
        "(needs gcc, zlib and ISA-L headers: apt-get install zlib1g-dev libisal-dev)"
    ) from exc

__all__ = [
    "DEFAULT_SPAN", "DEFAULT_CACHE_BYTES", "INDEX_VERSION",
    "CompressedDataError", "TruncatedStream", "BadIndex",
    "Checkpoint", "SeekIndex", "Indexer", "GzipIndexer", "ZstdIndexer",
    "PlainIndexer", "make_indexer", "build_index", "SpanCache", "BlobReader", "GzipReader",
    "ZstdReader", "PlainReader", "open_reader", "normalize_compression",
    "detect_compression",
]

KiB = 1024
MiB = 1024 * KiB

DEFAULT_SPAN = 4 * MiB
DEFAULT_CACHE_BYTES = 32 * MiB
INDEX_VERSION = 2                 # 2 adds the stored blocks; version 1 is still read
WINDOW_SIZE = _zran.WINSIZE
MAX_COMPRESSED_WINDOW = _zran.MAX_CWIN
MAX_SPAN = 1 << 40


# --- errors ------------------------------------------------------------------

class CompressedDataError(ContentError):
    """A compressed blob is corrupt (bad header, bad data, CRC mismatch...)."""

    default_hint = "the blob is damaged; delete it from the store and pull again"


class TruncatedStream(CompressedDataError):
    """A compressed blob ends before its compressed stream does."""


class BadIndex(ContentError):
    """A serialised seek index that is malformed or does not fit its blob."""

    default_hint = "the layer index is damaged; rebuild it (pull the layer again)"


def _zstd_module():
    """The standard library's ``compression.zstd`` (Python 3.14), else its backport ``backports.zstd``."""
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    return zstd


def _wrap_zran(exc: Exception) -> ContentError:
    if isinstance(exc, _zran.Truncated):
        return TruncatedStream(str(exc))
    return CompressedDataError(str(exc))


# --- compression names -------------------------------------------------------

_COMPRESSION_CODES = {None: 0, "gzip": 1, "zstd": 2}
_CODE_COMPRESSION = {v: k for k, v in _COMPRESSION_CODES.items()}
_ALIASES = {None: None, "": None, "none": None, "identity": None, "uncompressed": None,
            "gzip": "gzip", "gz": "gzip", "zstd": "zstd", "zst": "zstd"}


def normalize_compression(compression: str | None) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` for the accepted spellings."""
    key = compression.lower() if isinstance(compression, str) else compression
    try:
        return _ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compression {compression!r} (use 'gzip', 'zstd' or None)") from None


def detect_compression(head: bytes) -> str | None:
    """Guess the compression from the first bytes of a blob (magic numbers)."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


# --- index -------------------------------------------------------------------

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
        parts = [_HEADER.pack(_MAGIC, INDEX_VERSION, _COMPRESSION_CODES[self.compression], 0,
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
        if code not in _CODE_COMPRESSION:
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
        return cls(_CODE_COMPRESSION[code], span, csize, usize, tuple(cps), tuple(stored))


# --- indexers ----------------------------------------------------------------

@runtime_checkable
class Indexer(Protocol):
    """Consumes a blob chunk by chunk, returns its decompressed bytes and
    records checkpoints."""

    compression: str | None

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> "SeekIndex": ...

    @property
    def checkpoints(self) -> list[Checkpoint]: ...

    def to_bytes(self) -> bytes: ...


class _IndexerBase:
    compression: str | None = None

    def __init__(self, span: int) -> None:
        if not (isinstance(span, int) and 1 <= span <= MAX_SPAN):
            raise ValueError(f"span must be an int in 1..{MAX_SPAN}")
        self.span = span
        self._index: SeekIndex | None = None

    @property
    def index(self) -> SeekIndex:
        if self._index is None:
            raise RuntimeError("the index is complete only after finish()")
        return self._index

    def to_bytes(self) -> bytes:
        return self.index.to_bytes()

    def feed_iter(self, chunk: bytes, max_out: int = 1 * MiB) -> Iterator[bytes]:
        """Like :meth:`feed` but yields the output in pieces of at most
        ``max_out`` bytes.  :class:`GzipIndexer` and :class:`ZstdIndexer`
        also bound the memory they use; here (uncompressed) the output is
        the chunk itself."""
        if max_out <= 0:
            raise ValueError("max_out must be positive")
        out = self.feed(chunk)
        if len(out) <= max_out:
            if out:
                yield out
            return
        with memoryview(out) as mv:
            for i in range(0, len(out), max_out):
                yield bytes(mv[i:i + max_out])


class GzipIndexer(_IndexerBase):
    """Streaming gzip inflater that records a checkpoint about every ``span``
    bytes of output.  ``window_level`` is the zlib level the 32 KiB windows
    are stored with.  Not for use by two threads at once (one indexer per
    blob; several indexers in several threads run in parallel)."""

    compression = "gzip"

    def __init__(self, span: int = DEFAULT_SPAN, *, window_level: int = 1, check: bool = True) -> None:
        super().__init__(span)
        self._inf = _zran.Inflater(span, window_level, check)

    def feed(self, chunk: bytes) -> bytes:
        """Inflate one chunk of the blob; returns all its output (a chunk of
        1 MiB gives at most ~1 GiB; use :meth:`feed_iter` to bound memory)."""
        if self._index is not None:
            raise RuntimeError("feed() after finish()")
        try:
            out, _ = self._inf.feed(chunk)
        except _zran.Error as exc:
            raise _wrap_zran(exc) from None
        return out

    def feed_iter(self, chunk: bytes, max_out: int = 1 * MiB) -> Iterator[bytes]:
        """Inflate one chunk, yielding output pieces of at most ``max_out``
        bytes (memory stays bounded even for a decompression bomb)."""
        if self._index is not None:
            raise RuntimeError("feed() after finish()")
        if max_out <= 0:
            raise ValueError("max_out must be positive")
        mv = memoryview(chunk).cast("B")
        pos = 0
        while True:
            try:
                out, used = self._inf.feed(mv[pos:], max_out)
            except _zran.Error as exc:
                raise _wrap_zran(exc) from None
            pos += used
            if out:
                yield out
            if pos >= len(mv) and len(out) < max_out:
                return

    def finish(self) -> SeekIndex:
        """Check that the stream ended cleanly (complete members, CRCs
        checked, nothing but zero padding after the last) and return the
        index.  Raises :class:`TruncatedStream` or :class:`CompressedDataError`."""
        if self._index is None:
            try:
                self._inf.finish()
            except _zran.Error as exc:
                raise _wrap_zran(exc) from None
            self._index = SeekIndex("gzip", self.span, self._inf.total_in, self._inf.total_out,
                                    tuple(self.checkpoints), tuple(self._inf.stored()))
        return self._index

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(*p) for p in self._inf.points()]

    @property
    def total_in(self) -> int:
        return self._inf.total_in

    @property
    def total_out(self) -> int:
        return self._inf.total_out

    @property
    def members(self) -> int:
        return self._inf.members


class ZstdIndexer(_IndexerBase):
    """Streaming zstd decompressor that records frame boundaries (one
    checkpoint about every ``span`` bytes of output, at a frame start).
    Frame checksums are verified when present.

    Memory stays bounded whatever the input: :meth:`feed_iter` hands out
    the output in pieces of at most ``max_out`` bytes (python-zstandard's
    ``decompressobj`` cannot stop early, so this uses the standard
    library's ``compression.zstd``, or its backport before Python 3.14),
    and a frame may not ask for a window above libzstd's default limit
    (128 MiB, ``ZSTD_WINDOWLOG_LIMIT_DEFAULT``)."""

    compression = "zstd"

    def __init__(self, span: int = DEFAULT_SPAN) -> None:
        super().__init__(span)
        self._zstd = _zstd_module()
        self._dec = None            # the decompressor of the frame being read
        self._cin = 0               # compressed bytes of the frames that ended
        self._fed = 0               # compressed bytes handed to the current frame's decompressor
        self._cout = 0
        self._frames = 0
        self._points: list[Checkpoint] = []
        self._error: Exception | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Decompress one chunk; returns all its output (use :meth:`feed_iter` to bound memory)."""
        return b"".join(self.feed_iter(chunk, 16 * MiB))

    def feed_iter(self, chunk: bytes, max_out: int = 1 * MiB) -> Iterator[bytes]:
        """Decompress one chunk, yielding output pieces of at most ``max_out`` bytes."""
        if self._index is not None:
            raise RuntimeError("feed() after finish()")
        if self._error is not None:
            raise self._error
        if max_out <= 0:
            raise ValueError("max_out must be positive")
        data = bytes(chunk)
        try:
            while True:
                if self._dec is None:
                    if not data:
                        return
                    if not self._points or self._cout - self._points[-1].uoffset >= self.span:
                        self._points.append(Checkpoint(self._cout, self._cin))
                    self._dec = self._zstd.ZstdDecompressor()
                    self._fed = 0
                dec = self._dec
                self._fed += len(data)
                out = dec.decompress(data, max_out)
                data = b""
                if out:
                    self._cout += len(out)
                    yield out
                if dec.eof:
                    data = dec.unused_data
                    self._cin += self._fed - len(data)
                    self._dec = None
                    self._frames += 1
                elif dec.needs_input:
                    return
        except (self._zstd.ZstdError, EOFError) as exc:
            self._error = CompressedDataError(f"invalid zstd data: {exc}")
            raise self._error from None

    def finish(self) -> SeekIndex:
        if self._index is None:
            if self._error is not None:
                raise self._error
            if self._dec is not None:
                raise TruncatedStream(f"zstd stream truncated after {self._cin + self._fed} compressed bytes "
                                      f"({self._cout} bytes decompressed)")
            if not self._frames:
                raise TruncatedStream("empty blob: no zstd data")
            self._index = SeekIndex("zstd", self.span, self._cin, self._cout, tuple(self._points))
        return self._index

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return list(self._points)

    @property
    def total_in(self) -> int:
        return self._cin

    @property
    def total_out(self) -> int:
        return self._cout

    @property
    def frames(self) -> int:
        return self._frames


class PlainIndexer(_IndexerBase):
    """Uncompressed blob: output is the input, no checkpoints."""

    compression = None

    def __init__(self, span: int = DEFAULT_SPAN) -> None:
        super().__init__(span)
        self._n = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._index is not None:
            raise RuntimeError("feed() after finish()")
        data = bytes(chunk)
        self._n += len(data)
        return data

    def finish(self) -> SeekIndex:
        if self._index is None:
            self._index = SeekIndex(None, self.span, self._n, self._n, ())
        return self._index

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return []

    @property
    def total_in(self) -> int:
        return self._n

    total_out = total_in


def make_indexer(compression: str | None, span: int = DEFAULT_SPAN, *, check: bool = True) -> Indexer:
    """An indexer for ``"gzip"``, ``"zstd"`` or ``None`` (uncompressed). ``check=False`` skips
    gzip's own CRC-32/ISIZE check, for callers that verify stronger digests of the same bytes."""
    comp = normalize_compression(compression)
    if comp == "gzip":
        return GzipIndexer(span, check=check)
    if comp == "zstd":
        return ZstdIndexer(span)
    return PlainIndexer(span)


PathOrFd = Union[str, "os.PathLike[str]", int]


def build_index(blob: PathOrFd, compression: str | None, span: int = DEFAULT_SPAN,
                chunk_size: int = 1 * MiB) -> SeekIndex:
    """Index a blob that is already on disk (reads it once).  The normal way
    is to index while downloading; this is for blobs that lost their index."""
    ix = make_indexer(compression, span)
    fd, own = _open_fd(blob)
    try:
        pos = 0
        while True:
            chunk = os.pread(fd, chunk_size, pos)
            if not chunk:
                break
            pos += len(chunk)
            for _ in ix.feed_iter(chunk, 16 * MiB):
                pass
        return ix.finish()
    finally:
        if own:
            os.close(fd)


# --- readers -----------------------------------------------------------------

def _open_fd(blob: PathOrFd) -> tuple[int, bool]:
    if isinstance(blob, int):
        if blob < 0:
            raise ValueError("bad file descriptor")
        return blob, False
    return os.open(blob, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), True


class SpanCache:
    """Thread-safe LRU of decompressed spans, bounded by the bytes they hold.

    Each reader makes its own unless one is passed in: several readers (the
    layers of a mount) may share one, so the bound holds for all of them.
    Keys are namespaced per reader; a reader's spans leave on its close()."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[object, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def entry(self, key: object, factory, *, count: bool = True):
        """The entry for *key*, made by *factory()* when absent (LRU order
        refreshed).  ``count=False``: not counted in hits/misses (decode-ahead)."""
        with self._lock:
            e = self._items.get(key)
            if e is not None:
                self._items.move_to_end(key)
                self.hits += count
                return e
            self.misses += count
            e = factory()
            self._items[key] = e
            self._bytes += e.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
            return e

    def peek(self, key: object):
        """The entry for *key* if cached, else None; never creates one (no stats)."""
        with self._lock:
            return self._items.get(key)

    def discard(self, key: object, e: object) -> None:
        with self._lock:
            if self._items.get(key) is e:
                del self._items[key]
                self._bytes -= e.nbytes

    def purge(self, owner: object) -> None:
        """Drop the entries of one reader (keys are ``(owner, ...)``)."""
        with self._lock:
            for k in [k for k in self._items if k[0] is owner]:
                self._bytes -= self._items.pop(k).nbytes


_READAHEAD = 256 * KiB      # a read that must inflate goes this far past its end
_AHEAD_STEP = 512 * KiB     # decode-ahead inflates a span in steps of this size
_SEQ_TRIGGER = 1 * MiB      # sequential bytes that switch decode-ahead on
_AHEAD_SPANS = 3            # spans decoded ahead of a sequential reader


class _BufferPool:
    """Span buffers of spans that left the cache, for the next spans to fill:
    memory that is already mapped and faulted in (a new 4 MiB buffer costs
    a thousand page faults and the zeroing of every page).  Holds at most
    ``max_items`` buffers."""

    def __init__(self, max_items: int = 4) -> None:
        self.max_items = max_items
        self._bufs: list[bytearray] = []
        self._lock = threading.RLock()     # give() runs from __del__, wherever a span is dropped

    def take(self, size: int) -> bytearray:
        """A buffer of at least *size* bytes (at most a quarter more), contents undefined."""
        with self._lock:
            best = -1
            for i, b in enumerate(self._bufs):
                if size <= len(b) <= size + size // 4 and (best < 0 or len(b) < len(self._bufs[best])):
                    best = i
            if best >= 0:
                return self._bufs.pop(best)
        # sizes rounded up to 64 KiB, so that spans of about the same size share buffers
        return _zran.empty_bytearray(-(-size // (64 * KiB)) * (64 * KiB))

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._bufs.append(buf)
            if len(self._bufs) > self.max_items:
                del self._bufs[0]


_BUFFERS = _BufferPool()


class _GzipSpan:
    """One cached gzip span: a buffer of the span's size filled front to
    back by a resumable decoder, so a read costs decompression only up to
    its end and reads further on continue from there.

    One thread at a time inflates (``busy``), without holding the lock, so
    the bytes already there stay readable meanwhile; a read that needs more
    waits for it (decode-ahead fills a span in steps, and publishes each)
    or, when nobody is inflating, inflates itself."""

    __slots__ = ("buf", "filled", "decoder", "cond", "nbytes", "busy")

    def __init__(self, fd: int, cp: Checkpoint, size: int) -> None:
        self.buf = _BUFFERS.take(size)      # may be longer than the span: only nbytes are used
        self.nbytes = size
        self.filled = 0
        self.decoder = _zran.Decoder(fd, cp.coffset, cp.bits, cp.window)
        self.cond = threading.Condition(threading.Lock())
        self.busy = False

    def fill(self, goal: int, extra: int, step: int | None = None, *, wait: bool = True) -> None:
        """Inflate until ``filled >= goal`` (each inflation going up to
        ``extra`` bytes further, at most ``step`` bytes at a time).  With
        ``wait=False`` return instead of waiting for another inflating thread."""
        cond = self.cond
        with cond:
            while self.filled < goal:
                if self.busy:
                    if not wait:
                        return
                    cond.wait()
                    continue
                start = self.filled
                target = min(self.nbytes, max(goal, start + extra))
                if step is not None:
                    target = min(target, start + step)
                self.busy = True
                ok = False
                cond.release()
                try:
                    with memoryview(self.buf) as mv:
                        self.decoder.readinto(mv[start:target])
                    ok = True
                finally:
                    cond.acquire()
                    self.busy = False
                    if ok:
                        self.filled = target
                        if target == self.nbytes:
                            self.decoder = None
                    cond.notify_all()

    def get(self, a: int, b: int) -> bytes:
        if b > self.filled:
            try:
                self.fill(b, _READAHEAD)
            except _zran.Error as exc:
                raise _wrap_zran(exc) from None
        with memoryview(self.buf) as mv:
            return bytes(mv[a:b])

    def ready(self, b: int) -> bool:
        """True when bytes up to *b* are decoded: get() will not block on I/O or inflation."""
        return b <= self.filled

    def __del__(self) -> None:
        # nobody holds the span any more (not the cache, no reader, no inflating thread)
        try:
            _BUFFERS.give(self.buf)
        except Exception:   # noqa: BLE001 - interpreter shutdown
            pass


class _DecodeAhead:
    """Worker threads that inflate spans a sequential reader will want next,
    on the other cores, while it consumes the current one.  Jobs are
    callables; when too many wait, the oldest are dropped (the reader has
    moved on)."""

    MAX_QUEUED = 32

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._jobs: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._started = 0

    def submit(self, job) -> None:
        with self._cond:
            self._jobs.append(job)
            while len(self._jobs) > self.MAX_QUEUED:
                self._jobs.popleft()
            if self._started < self.workers:
                self._started += 1
                threading.Thread(target=self._run, name="layerfs-decode-ahead", daemon=True).start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            try:
                job()
            except Exception:   # noqa: BLE001 - the reader that needs the span inflates it and raises
                pass

    def _after_fork(self) -> None:
        """In a forked child: no worker threads, no jobs (and no reader waits for one)."""
        self._jobs = deque()
        self._cond = threading.Condition(threading.Lock())
        self._started = 0
        for r in list(_GZIP_READERS):
            r._reset_ahead()


_AHEAD = _DecodeAhead(max(1, min(4, os.cpu_count() or 1)))
_GZIP_READERS: "weakref.WeakSet[GzipReader]" = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_AHEAD._after_fork)


class BlobReader:
    """``read(offset, length)`` of the uncompressed content of a blob.
    Thread-safe.  Closes the blob's fd on :meth:`close` only if it opened it."""

    compression: str | None = None

    def __init__(self, blob: PathOrFd, index: SeekIndex, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache: SpanCache | None = None):
        self.index = index
        self._cache = cache if cache is not None else SpanCache(cache_bytes)
        self._token = object()  # this reader's namespace in the cache
        self._fd, self._own_fd = _open_fd(blob)
        self._closed = False
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode) and st.st_size != index.compressed_size:
                raise BadIndex(f"blob is {st.st_size} bytes, the index says {index.compressed_size}")
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """Uncompressed size."""
        return self.index.uncompressed_size

    @property
    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) of the span cache (shared counts if it is shared)."""
        return self._cache.hits, self._cache.misses

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        if self._closed:
            raise ValueError("read from a closed reader")
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        return offset, min(offset + length, self.size)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end)."""
        raise NotImplementedError

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._cache.purge(self._token)
            if self._own_fd:
                os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _SpannedReader(BlobReader):
    """Shared logic: the uncompressed stream cut in spans; a read gathers the
    pieces of every span it touches, through the cache when the span is
    small enough to be cached (at most half the cache)."""

    def _span_of(self, offset: int) -> tuple[object, int, int]:
        """(cache key, span start, span end) of the span holding offset."""
        raise NotImplementedError

    def _new_entry(self, key: object, start: int, size: int):
        raise NotImplementedError

    def _decode(self, key: object, start: int, skip: int, length: int) -> bytes:
        """Uncached: ``length`` bytes at ``start + skip``."""
        raise NotImplementedError

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes when every span they touch is already decoded in the cache,
        else None: a read that never blocks (the FUSE adapter answers it inline)."""
        offset, end = self._range(offset, length)
        parts = []
        while offset < end:
            key, s0, s1 = self._span_of(offset)
            stop = min(end, s1)
            entry = self._cache.peek((self._token, key))
            if entry is None or not entry.ready(stop - s0):
                return None
            parts.append(entry.get(offset - s0, stop - s0))
            offset = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, offset: int, length: int) -> bytes:
        offset, end = self._range(offset, length)
        parts = []
        cache_limit = self._cache.max_bytes // 2
        while offset < end:
            key, s0, s1 = self._span_of(offset)
            stop = min(end, s1)
            if s1 - s0 <= cache_limit:
                ckey = (self._token, key)
                entry = self._cache.entry(ckey, lambda: self._new_entry(key, s0, s1 - s0))
                try:
                    parts.append(entry.get(offset - s0, stop - s0))
                except BaseException:
                    self._cache.discard(ckey, entry)
                    raise
            else:
                parts.append(self._decode(key, s0, offset - s0, stop - offset))
            offset = stop
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)


class GzipReader(_SpannedReader):
    """Random access into a gzip blob through its checkpoints (``pread``
    plus inflation in C without the GIL).

    Decode-ahead: once reads run sequentially (``_SEQ_TRIGGER`` bytes, each
    read starting near where an earlier one ended), the ``ahead`` spans
    (default ``_AHEAD_SPANS``) after the one being read are inflated into
    the cache by the :data:`_AHEAD` worker threads (one per core, at most
    4; a span is inflated by one thread), so the reader finds them ready,
    the other cores inflate while it consumes, and the blob's reads overlap.
    Only when the cache holds them with room to spare (``ahead`` spans plus
    two)."""

    compression = "gzip"

    def __init__(self, blob: PathOrFd, index: SeekIndex, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache: SpanCache | None = None, ahead: int | None = None):
        if index.compression != "gzip":
            raise BadIndex(f"a {index.compression or 'plain'} index for a gzip blob")
        super().__init__(blob, index, cache_bytes=cache_bytes, cache=cache)
        self._cps = index.checkpoints
        self._starts = [cp.uoffset for cp in self._cps]
        ahead = (_AHEAD_SPANS if _AHEAD.workers else 0) if ahead is None else max(0, ahead)
        biggest = max((b - a for a, b in zip(self._starts, self._starts[1:] + [self.size])), default=0)
        self._ahead = ahead if (ahead + 2) * biggest <= self._cache.max_bytes else 0
        self._seq_end = -1          # end of the latest read of a sequential run
        self._seq_run = 0           # bytes read in that run
        self._stopping = False
        self._reset_ahead()
        _GZIP_READERS.add(self)
        # stored blocks, and for each the end of the run of back-to-back stored blocks it is in
        st = index.stored
        self._st_u = [u for u, _, _ in st]
        self._st_c = [c for _, c, _ in st]
        self._st_n = array.array("H", [n for _, _, n in st])
        run_end = [0] * len(st)
        for k in range(len(st) - 1, -1, -1):
            u, c, n = st[k]
            nxt = st[k + 1] if k + 1 < len(st) else None
            run_end[k] = run_end[k + 1] if nxt and nxt[0] == u + n and nxt[1] == c + n + 5 else u + n
        self._st_run_end = run_end

    def _reset_ahead(self) -> None:
        self._noted = -1                    # the span whose followers were last queued
        self._queued: set[int] = set()     # spans queued for decode-ahead
        self._inflight = 0                  # decode-ahead jobs running
        self._ahead_cond = threading.Condition(threading.Lock())

    def _span_of(self, offset: int) -> tuple[object, int, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        return i, self._starts[i], end

    def _new_entry(self, key, start: int, size: int) -> _GzipSpan:
        return _GzipSpan(self._fd, self._cps[key], size)

    def _decode(self, key, start: int, skip: int, length: int) -> bytes:
        cp = self._cps[key]
        try:
            return _zran.read_at(self._fd, cp.coffset, cp.bits, cp.window, skip, length)
        except _zran.Error as exc:
            raise _wrap_zran(exc) from None

    def read(self, offset: int, length: int) -> bytes:
        if length > 0 and 0 <= offset < self.size and not self._closed:
            end = min(offset + length, self.size)
            if self._st_u:
                k = bisect.bisect_right(self._st_u, offset) - 1
                if k >= 0 and end <= self._st_run_end[k] and offset < self._st_u[k] + self._st_n[k]:
                    return self._read_stored(k, offset, end)
            if self._ahead:
                self._note(offset, end)
        return super().read(offset, length)

    def _read_stored(self, k: int, offset: int, end: int) -> bytes:
        """[offset, end) from the run of stored blocks that starts with block *k*: straight from the blob."""
        j = bisect.bisect_left(self._st_u, end, k)
        try:
            return _zran.read_stored(self._fd, self._st_c[k], offset - self._st_u[k], end - offset,
                                     self._st_n[k:j])
        except _zran.Error as exc:
            raise _wrap_zran(exc) from None

    def _note(self, offset: int, end: int) -> None:
        """Track sequential reading; when on, queue the spans after *end*'s."""
        prev = self._seq_end
        span = self.index.span
        # near the end of the run: parallel requests come a little out of order, and a
        # reader of files skips the tar headers and the files it does not read
        if prev - span // 4 <= offset <= prev + span:
            self._seq_run += end - offset
            if end > prev:
                self._seq_end = end
        else:
            self._seq_run = end - offset
            self._seq_end = end
            self._noted = -1
        if self._seq_run < _SEQ_TRIGGER:
            return
        i = bisect.bisect_right(self._starts, end - 1) - 1
        if i == self._noted:      # the spans after this one were looked at by an earlier read
            return
        self._noted = i
        last = min(i + self._ahead, len(self._starts) - 1)
        for k in range(i + 1, last + 1):
            if k in self._queued:
                continue
            e = self._cache.peek((self._token, k))
            if e is not None and (e.busy or e.filled == e.nbytes):
                continue
            with self._ahead_cond:
                if k in self._queued or self._stopping:
                    continue
                self._queued.add(k)
            _AHEAD.submit(functools.partial(self._ahead_job, k))

    def _ahead_job(self, k: int) -> None:
        with self._ahead_cond:
            self._queued.discard(k)
            if self._stopping:
                return
            # the reader went elsewhere meanwhile: not needed any more
            i = bisect.bisect_right(self._starts, max(self._seq_end - 1, 0)) - 1
            if not (i < k <= i + self._ahead + 1):
                return
            self._inflight += 1
        try:
            s0 = self._starts[k]
            s1 = self._starts[k + 1] if k + 1 < len(self._starts) else self.size
            entry = self._cache.entry((self._token, k), lambda: self._new_entry(k, s0, s1 - s0), count=False)
            entry.fill(entry.nbytes, 0, _AHEAD_STEP, wait=False)
        finally:
            with self._ahead_cond:
                self._inflight -= 1
                self._ahead_cond.notify_all()

    def close(self) -> None:
        cond = getattr(self, "_ahead_cond", None)
        if cond is not None and not self._closed:
            with cond:
                self._stopping = True   # no new decode-ahead; wait for running ones (they use the fd)
                while self._inflight:
                    cond.wait()
        super().close()


class _PreadFile:
    """Minimal file object over an fd from a position (for zstandard)."""

    def __init__(self, fd: int, pos: int) -> None:
        self._fd = fd
        self._pos = pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 * MiB
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


class _ZstdCursor:
    __slots__ = ("seg", "upos", "reader")

    def __init__(self, seg: int, upos: int, reader) -> None:
        self.seg = seg
        self.upos = upos
        self.reader = reader


class _ZstdPiece:
    __slots__ = ("produce", "data", "lock", "nbytes")

    def __init__(self, produce, size: int) -> None:
        self.produce = produce
        self.data: bytes | None = None
        self.nbytes = size
        self.lock = threading.Lock()

    def ready(self, b: int) -> bool:
        return self.data is not None

    def get(self, a: int, b: int) -> bytes:
        if self.data is None:
            with self.lock:
                if self.data is None:
                    self.data = self.produce()
                    self.produce = None
        return self.data[a:b]


class ZstdReader(_SpannedReader):
    """Random access into a zstd blob.  Checkpoints are frame starts; inside
    a frame the reader decompresses from the frame start -- or from an open
    cursor already before the offset -- in cached pieces of ``index.span``
    bytes."""

    compression = "zstd"
    MAX_CURSORS = 4

    def __init__(self, blob: PathOrFd, index: SeekIndex, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache: SpanCache | None = None):
        if index.compression != "zstd":
            raise BadIndex(f"a {index.compression or 'plain'} index for a zstd blob")
        import zstandard
        self._zstd = zstandard
        super().__init__(blob, index, cache_bytes=cache_bytes, cache=cache)
        self._cps = index.checkpoints
        self._starts = [cp.uoffset for cp in self._cps]
        self._piece = min(max(index.span, 64 * KiB), 64 * MiB)
        self._cursors: list[_ZstdCursor] = []
        self._cursor_lock = threading.Lock()

    def _span_of(self, offset: int) -> tuple[object, int, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        seg_start = self._starts[i]
        seg_end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        k = (offset - seg_start) // self._piece
        s0 = seg_start + k * self._piece
        return (i, k), s0, min(seg_end, s0 + self._piece)

    def _new_entry(self, key, start: int, size: int) -> _ZstdPiece:
        return _ZstdPiece(lambda: self._decode(key, start, 0, size), size)

    def _take_cursor(self, seg: int, upos: int) -> _ZstdCursor:
        with self._cursor_lock:
            best = None
            for c in self._cursors:
                if c.seg == seg and c.upos <= upos and (best is None or c.upos > best.upos):
                    best = c
            if best is not None:
                self._cursors.remove(best)
                return best
        cp = self._cps[seg]
        # A ZstdDecompressor holds one DCtx that its streams share: one per cursor.
        reader = self._zstd.ZstdDecompressor().stream_reader(
            _PreadFile(self._fd, cp.coffset), read_size=128 * KiB, read_across_frames=True,
            closefd=False)
        return _ZstdCursor(seg, cp.uoffset, reader)

    def _put_cursor(self, cur: _ZstdCursor) -> None:
        with self._cursor_lock:
            self._cursors.append(cur)
            while len(self._cursors) > self.MAX_CURSORS:
                self._cursors.pop(0)

    def _decode(self, key, start: int, skip: int, length: int) -> bytes:
        seg = key[0]
        target = start + skip
        cur = self._take_cursor(seg, target)
        parts = []
        try:
            while cur.upos < target:
                data = cur.reader.read(min(target - cur.upos, 1 * MiB))
                if not data:
                    raise TruncatedStream("zstd stream ends before the data the index promises")
                cur.upos += len(data)
            need = length
            while need > 0:
                data = cur.reader.read(need)
                if not data:
                    raise TruncatedStream("zstd stream ends before the data the index promises")
                parts.append(data)
                need -= len(data)
                cur.upos += len(data)
        except self._zstd.ZstdError as exc:
            raise CompressedDataError(f"invalid zstd data: {exc}") from None
        self._put_cursor(cur)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        lock = getattr(self, "_cursor_lock", None)
        if lock is not None:
            with lock:
                self._cursors.clear()
        super().close()


class PlainReader(BlobReader):
    """An uncompressed blob: ``pread``."""

    compression = None

    def __init__(self, blob: PathOrFd, index: SeekIndex | None = None, *,
                 cache_bytes: int = 0, cache: SpanCache | None = None):
        if index is None:
            fd, own = _open_fd(blob)
            try:
                size = os.fstat(fd).st_size
            finally:
                if own:
                    os.close(fd)
            index = SeekIndex(None, DEFAULT_SPAN, size, size, ())
        if index.compression is not None:
            raise BadIndex(f"a {index.compression} index for an uncompressed blob")
        super().__init__(blob, index, cache_bytes=0)

    def read(self, offset: int, length: int) -> bytes:
        offset, end = self._range(offset, length)
        parts = []
        while offset < end:
            data = os.pread(self._fd, end - offset, offset)
            if not data:
                raise TruncatedStream("blob shorter than its index says")
            parts.append(data)
            offset += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def open_reader(blob: PathOrFd, compression: str | None, index_bytes: bytes | None = None, *,
                cache_bytes: int = DEFAULT_CACHE_BYTES, cache: SpanCache | None = None) -> BlobReader:
    """A reader for a blob (path or fd) of the given compression, from its
    serialised index (:meth:`SeekIndex.to_bytes`).  ``index_bytes=None``
    indexes the blob first (a full read of it).  ``cache_bytes`` bounds the
    reader's own cache of decompressed spans (0 disables it); pass ``cache``
    to share one :class:`SpanCache` between readers instead.  Raises :class:`BadIndex`
    for an index that is malformed, for another compression or another
    blob size."""
    comp = normalize_compression(compression)
    if index_bytes is None:
        index = build_index(blob, comp) if comp is not None else None
    else:
        index = SeekIndex.from_bytes(index_bytes)
        if index.compression != comp:
            raise BadIndex(f"the index is for {index.compression or 'uncompressed'} data, "
                           f"the blob is {comp or 'uncompressed'}")
    if comp == "gzip":
        return GzipReader(blob, index, cache_bytes=cache_bytes, cache=cache)
    if comp == "zstd":
        return ZstdReader(blob, index, cache_bytes=cache_bytes, cache=cache)
    return PlainReader(blob, index)
