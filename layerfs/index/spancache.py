"""The cache of inflated spans that blob readers share, and the threads that inflate ahead of a reader.

:class:`SpanCache` is a thread-safe LRU of decompressed spans bounded by the
bytes they hold; one cache may be shared by many readers (the layers of a
mount), so its bound holds for all of them.  A gzip span (:class:`GzipSpan`)
is filled front to back by a resumable decoder: the first read in a span
decompresses from its checkpoint only up to the end of that read (plus
256 KiB read-ahead), later reads in the span are served from what is there
or continue where decompression stopped -- many small files in one span
cost one decompression.  :data:`DECODE_AHEAD` is the pool of worker threads
that inflate the spans a sequential reader will want next.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict, deque

from layerfs import _zran
from layerfs.index.compression import wrap_zran_error
from layerfs.index.seek import Checkpoint

__all__ = ["DEFAULT_CACHE_BYTES", "SpanCache", "GzipSpan", "DECODE_AHEAD"]

KiB = 1024
MiB = 1024 * KiB

DEFAULT_CACHE_BYTES = 32 * MiB




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


class GzipSpan:
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
                raise wrap_zran_error(exc) from None
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
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DECODE_AHEAD._after_fork)
