"""Seek indexers: inflate a layer blob as it streams in and record its seek index.

While a blob is downloaded (or read once from the store), an indexer inflates
it -- the caller hands the output on to the tar scanner and the diff_id
sha256 -- and records the checkpoints of its :class:`~layerfs.index.seek.SeekIndex`.
The gzip indexer runs in C (``layerfs._zran``, zlib, which reports the
deflate block boundaries checkpoints need) and releases the GIL, so layers
downloaded in several threads use several cores; it checks every member's
CRC-32 and length unless told the bytes are verified otherwise.

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
        data = ix.feed(chunk)
        tar_parser.feed(data); diff_id.update(data)
    seek_index = ix.finish()                   # raises on truncation / bad CRC
"""
from __future__ import annotations

import os
from typing import Iterator, Protocol, Union, runtime_checkable

from layerfs import _zran
from layerfs.index.compression import (
    CompressedDataError,
    TruncatedStream,
    normalize_compression,
    wrap_zran_error,
    zstd_module,
)
from layerfs.index.seek import DEFAULT_SPAN, MAX_SPAN, Checkpoint, SeekIndex

__all__ = ["Indexer", "GzipIndexer", "ZstdIndexer", "PlainIndexer", "make_indexer", "build_index", "PathOrFd",
           "open_fd"]

MiB = 1 << 20

#: a blob given by path or by an open file descriptor
PathOrFd = Union[str, "os.PathLike[str]", int]


def open_fd(blob: PathOrFd) -> tuple[int, bool]:
    """(a readable fd of *blob*, whether it was opened here: the caller closes it then)."""
    if isinstance(blob, int):
        if blob < 0:
            raise ValueError("bad file descriptor")
        return blob, False
    return os.open(blob, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), True


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
            raise wrap_zran_error(exc) from None
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
                raise wrap_zran_error(exc) from None
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
                raise wrap_zran_error(exc) from None
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
        self._zstd = zstd_module()
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


def build_index(blob: PathOrFd, compression: str | None, span: int = DEFAULT_SPAN,
                chunk_size: int = 1 * MiB) -> SeekIndex:
    """Index a blob that is already on disk (reads it once).  The normal way
    is to index while downloading; this is for blobs that lost their index."""
    ix = make_indexer(compression, span)
    fd, own = open_fd(blob)
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
