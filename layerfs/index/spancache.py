"""The cache of inflated spans that blob readers share, and the threads that inflate ahead of a reader.

:class:`SpanCache` is a thread-safe LRU of decompressed spans bounded by the
bytes they hold; one cache may be shared by many readers (the layers of a
mount), so its bound holds for all of them.  The inflated bytes do not live
in the process's memory but in the cache's span file (:class:`SpanFile`, an
unlinked temporary file, written with ``pwrite`` and read with ``pread``):
its pages are in the kernel's page cache, which the kernel reclaims under
pressure, and only the bookkeeping is in Python.  The file holds at most
about ``max_bytes`` (plus the spans that readers are still reading right
then) and goes away with the cache.

A gzip span (:class:`GzipSpan`) is filled front to back by a resumable
decoder: the first read in a span decompresses from its checkpoint only up
to the end of that read (plus 256 KiB read-ahead), later reads in the span
are served from what is there or continue where decompression stopped --
many small files in one span cost one decompression.  A zstd piece
(:class:`ZstdPiece`) is decompressed whole on its first read.
:data:`DECODE_AHEAD` is the pool of worker threads that inflate the spans a
sequential reader will want next.
"""
from __future__ import annotations

import array
import contextlib
import errno
import heapq
import os
import tempfile
import threading
import weakref
from collections import OrderedDict, deque

from layerfs import _zran
from layerfs.index.compression import wrap_zran_error
from layerfs.index.seek import Checkpoint

__all__ = ["DEFAULT_CACHE_BYTES", "SpanCache", "SpanFile", "GzipSpan", "ZstdPiece", "DECODE_AHEAD"]

KiB = 1024
MiB = 1024 * KiB

DEFAULT_CACHE_BYTES = 32 * MiB
_READAHEAD = 256 * KiB      # a read that must inflate goes this far past its end
_PIECE = 256 * KiB          # inflated through a per-thread buffer of this size into the span file


class SpanFile:
    """The file that holds the inflated spans of a :class:`SpanCache`, in blocks of :data:`BLOCK`
    bytes: a span takes the blocks it needs (:meth:`allocate`; the lowest free ones, so they are
    mostly consecutive) and gives them back when it goes (:meth:`release`); bytes are moved with
    ``pwrite``/``pread`` (:meth:`write`, :meth:`read`; a run of consecutive blocks is one call).
    Blocks do not fragment: the file never grows beyond the most blocks in use at once, and it is
    cut to nothing whenever no span holds any.

    Made on first use, unlinked from the start (``O_TMPFILE`` in *directory*, else a temporary file
    removed at once; a directory that cannot take one falls back to the system's temporary directory,
    then to an anonymous memory file)."""

    BLOCK = 64 * KiB

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = directory
        self._fd = -1
        self._blocks = 0                    # the file's length in blocks
        self._free: list[int] = []          # heap of the free blocks below _blocks
        self._used = 0
        self._lock = threading.RLock()      # release() runs from __del__, wherever a span is dropped
        self._closed = False

    @property
    def size(self) -> int:
        """Bytes of the file (held by spans, or free for the next ones)."""
        return self._blocks * self.BLOCK

    @property
    def fileno(self) -> int:
        """The file's descriptor (-1 before first use and after :meth:`close`)."""
        return self._fd

    def _open(self) -> int:
        places = [self.directory] if self.directory is not None else []
        places.append(tempfile.gettempdir())
        for place in places:
            with contextlib.suppress(OSError):
                return os.open(place, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(OSError):
                fd, path = tempfile.mkstemp(prefix=".spans-", dir=place)
                os.unlink(path)
                return fd
        return os.memfd_create("layerfs-spans", os.MFD_CLOEXEC)

    def allocate(self, size: int) -> array.array:
        """The blocks (numbers, in order) that will hold a span of *size* bytes."""
        n = max(1, -(-size // self.BLOCK))
        with self._lock:
            if self._closed:
                raise ValueError("span file closed")
            if self._fd < 0:
                self._fd = self._open()
            free = self._free
            take = min(n, len(free))
            blocks = array.array("I", sorted(heapq.heappop(free) for _ in range(take)))
            if take < n:
                blocks.extend(range(self._blocks, self._blocks + n - take))
                self._blocks += n - take
            self._used += n
            return blocks

    def release(self, blocks: array.array) -> None:
        """Give a span's blocks back (the span is gone)."""
        with self._lock:
            if self._closed:
                return
            self._used -= len(blocks)
            if self._used == 0:                 # nothing held: cut the file to nothing
                self._free = []
                self._blocks = 0
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
                return
            for b in blocks:
                heapq.heappush(self._free, b)

    def _runs(self, blocks: array.array, a: int, b: int):
        """(file offset, length) of the runs of consecutive blocks that hold bytes [a, b) of a span."""
        bs = self.BLOCK
        i, last = a // bs, (b - 1) // bs
        while i <= last:
            j = i
            while j < last and blocks[j + 1] == blocks[j] + 1:
                j += 1
            start = max(a, i * bs)
            end = min(b, (j + 1) * bs)
            yield blocks[i] * bs + start - i * bs, end - start
            i = j + 1

    def write(self, blocks: array.array, pos: int, data) -> None:
        """Write *data* at byte *pos* of the span in *blocks*."""
        view = memoryview(data)
        done = 0
        for off, n in self._runs(blocks, pos, pos + len(view)):
            while n:
                k = os.pwrite(self._fd, view[done:done + n], off)
                done += k
                off += k
                n -= k

    def read(self, blocks: array.array, a: int, b: int) -> bytes:
        """Bytes [a, b) of the span in *blocks*."""
        if a >= b:
            return b""
        parts = []
        for off, n in self._runs(blocks, a, b):
            while n:
                data = os.pread(self._fd, n, off)
                if not data:
                    raise OSError(errno.EIO, "span file shorter than its spans")
                parts.append(data)
                off += len(data)
                n -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def abandon(self) -> None:
        """In a forked child: close this process's copy of the file without taking the lock (a thread
        of the parent may have held it at the fork)."""
        self._lock = threading.RLock()
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, -1
            self._free = []
            self._blocks = 0
        if fd >= 0:
            os.close(fd)


class SpanCache:
    """Thread-safe LRU of decompressed spans, bounded by the bytes they hold.

    Each reader makes its own unless one is passed in: several readers (the
    layers of a mount) may share one, so the bound holds for all of them.
    Keys are namespaced per reader; a reader's spans leave on its close().
    Entries that store their bytes in :attr:`file` (gzip spans, zstd pieces)
    keep no inflated data in memory.  *directory* is where the span file is
    made (see :class:`SpanFile`; :meth:`place` sets it later)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, *, directory: str | os.PathLike | None = None) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[object, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.file = SpanFile(directory)
        self._finalizer = weakref.finalize(self, SpanFile.close, self.file)
        _CACHES.add(self)

    def _after_fork(self) -> None:
        """In a forked child: forget the spans and use a span file of its own (the parent's is
        shared with it: both would write their spans into the same blocks)."""
        old = self.file
        old.abandon()           # first: the spans dropped below must not give blocks back (or cut the file)
        self._finalizer.detach()
        self.file = SpanFile(old.directory)
        self._finalizer = weakref.finalize(self, SpanFile.close, self.file)
        self._lock = threading.Lock()
        self._items = OrderedDict()
        self._bytes = 0

    def place(self, directory: str | os.PathLike) -> None:
        """Make the span file in *directory* (e.g. the store's), unless a directory is set already
        or the file exists."""
        f = self.file
        with f._lock:
            if f.directory is None and f.fileno < 0:
                f.directory = directory

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


class _Scratch(threading.local):
    """Per thread: the buffer spans are inflated into before they go to the span file."""

    buf: bytearray | None = None

    def get(self) -> bytearray:
        if self.buf is None:
            self.buf = _zran.empty_bytearray(_PIECE)
        return self.buf


_SCRATCH = _Scratch()


class SpanBlocks:
    """What a cached span holds in the span file: its blocks (None until written), given back to the file
    when nobody holds the span any more (not the cache, no reader, no inflating thread)."""

    __slots__ = ()

    def __del__(self) -> None:
        if self.blocks is not None:
            try:
                self.file.release(self.blocks)
            except Exception:   # noqa: BLE001 - interpreter shutdown
                pass


class GzipSpan(SpanBlocks):
    """One cached gzip span: blocks of the span file for the span's size,
    filled front to back by a resumable decoder, so a read costs
    decompression only up to its end and reads further on continue from there.

    One thread at a time inflates (``busy``), without holding the lock, so
    the bytes already there stay readable meanwhile; it publishes each piece
    it writes (``filled``).  A read that needs more waits for it
    (decode-ahead fills a span in steps) or, when nobody is inflating,
    inflates itself."""

    __slots__ = ("file", "blocks", "filled", "decoder", "cond", "nbytes", "busy")

    def __init__(self, file: SpanFile, fd: int, cp: Checkpoint, size: int) -> None:
        self.file = file
        self.nbytes = size
        self.blocks = None          # allocated when the first bytes are written (after the cache made room)
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
                cond.release()
                try:
                    self._inflate(start, target)
                finally:
                    cond.acquire()
                    self.busy = False
                    cond.notify_all()

    def _inflate(self, pos: int, target: int) -> None:
        """Inflate [pos, target) into the file, piece by piece, publishing each (called while ``busy``)."""
        if self.blocks is None:
            self.blocks = self.file.allocate(self.nbytes)
        buf = _SCRATCH.get()
        with memoryview(buf) as mv:
            while pos < target:
                n = min(len(buf), target - pos)
                piece = mv[:n]
                self.decoder.readinto(piece)
                self.file.write(self.blocks, pos, piece)
                pos += n
                with self.cond:
                    self.filled = pos
                    if pos == self.nbytes:
                        self.decoder = None
                    self.cond.notify_all()

    def get(self, a: int, b: int) -> bytes:
        if b > self.filled:
            try:
                self.fill(b, _READAHEAD)
            except _zran.Error as exc:
                raise wrap_zran_error(exc) from None
        return self.file.read(self.blocks, a, b)

    def ready(self, b: int) -> bool:
        """True when bytes up to *b* are decoded: get() will not block on I/O or inflation."""
        return b <= self.filled


class ZstdPiece(SpanBlocks):
    """One cached piece of a zstd blob: decompressed whole by *produce()* on its first read, kept in
    blocks of the span file."""

    __slots__ = ("file", "blocks", "produce", "done", "lock", "nbytes")

    def __init__(self, file: SpanFile, produce, size: int) -> None:
        self.file = file
        self.produce = produce
        self.done = False
        self.nbytes = size
        self.blocks = None
        self.lock = threading.Lock()

    def ready(self, b: int) -> bool:
        return self.done

    def get(self, a: int, b: int) -> bytes:
        if not self.done:
            with self.lock:
                if not self.done:
                    data = self.produce()
                    self.blocks = self.file.allocate(self.nbytes)
                    self.file.write(self.blocks, 0, data)
                    self.produce = None
                    self.done = True
                    return data[a:b]
        return self.file.read(self.blocks, a, b)


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
        self._readers: weakref.WeakSet = weakref.WeakSet()

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
        for r in list(self._readers):
            r.reset_ahead()

    def register(self, reader) -> None:
        """Have *reader*'s ``reset_ahead()`` called in a forked child (its decode-ahead state is void there)."""
        self._readers.add(reader)


DECODE_AHEAD = _DecodeAhead(max(1, min(4, os.cpu_count() or 1)))
_CACHES: "weakref.WeakSet[SpanCache]" = weakref.WeakSet()


def _caches_after_fork() -> None:
    for cache in list(_CACHES):
        cache._after_fork()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DECODE_AHEAD._after_fork)
    os.register_at_fork(after_in_child=_caches_after_fork)
