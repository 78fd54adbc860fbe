"""Random reads of the uncompressed content of a layer blob through its seek index.

A reader serves ``read(offset, length)`` of the uncompressed tar by
decompressing only from the nearest checkpoint at or before ``offset``.

gzip (:class:`GzipReader`)
    ``pread`` plus inflation in C (ISA-L's igzip) without the GIL, through
    the shared :class:`~layerfs.index.spancache.SpanCache` of inflated spans.
    A read that falls entirely in a run of consecutive stored deflate blocks
    is served with one ``preadv`` straight into the result (each block's
    LEN/NLEN checked), without inflating or caching anything.  A gzip reader
    that is read sequentially also inflates the next spans ahead of it on
    worker threads (decode-ahead).

zstd (:class:`ZstdReader`)
    Checkpoints are frame starts.  A large single-frame zstd layer -- what
    ``zstd`` and most image builders write -- has a single checkpoint at 0:
    a read there decompresses from the start of the frame up to the offset.
    To keep that bearable the reader keeps a few open decompression cursors
    (a read at or after a cursor's position continues from it, so reading
    a layer front to back costs one pass) and caches decompressed pieces of
    ``span`` bytes.  Random reads far into a big single-frame layer stay
    O(offset); build such layers with several frames if that matters.

uncompressed (:class:`PlainReader`)
    Direct ``pread``.

Readers are thread-safe.  Spans larger than half the cache are read
uncached.  Bad compressed data raises
:class:`~layerfs.index.compression.CompressedDataError`
(:class:`~layerfs.index.compression.TruncatedStream` when it ends early)::

    with open_reader(blob_path, compression, seek_index_bytes) as r:
        r.read(offset, length)
"""
from __future__ import annotations

import array
import bisect
import functools
import os
import stat
import threading

import zstandard

from layerfs import _zran
from layerfs.index.compression import (
    CompressedDataError,
    TruncatedStream,
    inflate_at,
    normalize_compression,
    wrap_zran_error,
)
from layerfs.index.indexers import PathOrFd, build_index, open_fd
from layerfs.index.seek import DEFAULT_SPAN, BadIndex, SeekIndex
from layerfs.index.spancache import DECODE_AHEAD, DEFAULT_CACHE_BYTES, GzipSpan, SpanCache, ZstdPiece

__all__ = ["BlobReader", "GzipReader", "ZstdReader", "PlainReader", "open_reader"]

KiB = 1024
MiB = 1024 * KiB

_AHEAD_STEP = 512 * KiB     # decode-ahead inflates a span in steps of this size
_SEQ_TRIGGER = 1 * MiB      # sequential bytes that switch decode-ahead on
_AHEAD_SPANS = 3            # spans decoded ahead of a sequential reader


class BlobReader:
    """``read(offset, length)`` of the uncompressed content of a blob.
    Thread-safe.  Closes the blob's fd on :meth:`close` only if it opened it."""

    compression: str | None = None

    def __init__(self, blob: PathOrFd, index: SeekIndex, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache: SpanCache | None = None):
        self.index = index
        self._cache = cache if cache is not None else SpanCache(cache_bytes)
        self._token = object()  # this reader's namespace in the cache
        self._fd, self._own_fd = open_fd(blob)
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
    the cache by the :data:`DECODE_AHEAD` worker threads (one per core, at most
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
        ahead = (_AHEAD_SPANS if DECODE_AHEAD.workers else 0) if ahead is None else max(0, ahead)
        biggest = max((b - a for a, b in zip(self._starts, self._starts[1:] + [self.size])), default=0)
        self._ahead = ahead if (ahead + 2) * biggest <= self._cache.max_bytes else 0
        self._seq_end = -1          # end of the latest read of a sequential run
        self._seq_run = 0           # bytes read in that run
        self._stopping = False
        self.reset_ahead()
        DECODE_AHEAD.register(self)
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

    def reset_ahead(self) -> None:
        self._noted = -1                    # the span whose followers were last queued
        self._queued: set[int] = set()     # spans queued for decode-ahead
        self._inflight = 0                  # decode-ahead jobs running
        self._ahead_cond = threading.Condition(threading.Lock())

    def _span_of(self, offset: int) -> tuple[object, int, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        return i, self._starts[i], end

    def _new_entry(self, key, start: int, size: int) -> GzipSpan:
        return GzipSpan(self._cache.file, self._fd, self._cps[key], size)

    def _decode(self, key, start: int, skip: int, length: int) -> bytes:
        cp = self._cps[key]
        return inflate_at(self._fd, cp.coffset, cp.bits, cp.window, length, skip)

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
            raise wrap_zran_error(exc) from None

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
            DECODE_AHEAD.submit(functools.partial(self._ahead_job, k))

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

    def _new_entry(self, key, start: int, size: int) -> ZstdPiece:
        return ZstdPiece(self._cache.file, lambda: self._decode(key, start, 0, size), size)

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
        reader = zstandard.ZstdDecompressor().stream_reader(
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
        except zstandard.ZstdError as exc:
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
            fd, own = open_fd(blob)
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
