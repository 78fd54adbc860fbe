"""Making layer TOCs: the streaming :class:`LayerIndexer`, and the TOCs of the store.

While a layer blob streams in (from the network, or from the store when a
TOC has to be rebuilt), :class:`LayerIndexer`:

* decompresses it with a seek indexer (:mod:`layerfs.index.indexers`), which
  also records the seek index a reader needs later;
* hashes the uncompressed tar (the layer's diff_id) and counts its size;
* parses the tar headers (:class:`~layerfs.index.tarscan.TarScanner`) into
  records, spooled to a temporary file (:class:`~layerfs.index.spool.RecordSpool`).

By default the hashing and parsing run in one helper thread per indexer,
behind a bounded queue, so they overlap with inflating the next chunk (C
code without the GIL).

The store side: :func:`index_path` (``ROOT/indexes/<algo>-<hex>.idx``),
:func:`load_or_build` (rebuilds a missing, corrupt or outdated TOC from the
stored blob with one read of it) and :func:`open_layer_reader`.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import weakref
from pathlib import Path

from layerfs.errors import LayerfsError, StoreError
from layerfs.image import LAYER_COMPRESSION, Descriptor, Digest
from layerfs.index.columns import IndexFormatError
from layerfs.index.compression import detect_compression, normalize_compression
from layerfs.index.indexers import PlainIndexer, make_indexer
from layerfs.index.limits import layer_too_large
from layerfs.index.readers import BlobReader, open_reader
from layerfs.index.seek import DEFAULT_SPAN
from layerfs.index.spancache import DEFAULT_CACHE_BYTES, SpanCache
from layerfs.index.spool import RecordSpool
from layerfs.index.tarscan import TarScanner
from layerfs.index.toc import LayerIndex
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = ["LayerIndexer", "build_from_blob", "index_path", "layer_facts_from_blob", "load_or_build", "open_layer_reader"]


# --- the streaming indexer -----------------------------------------------------

_OUT_PIECE = 4 << 20    # bound on decompressed bytes handled at once
_QUEUE_PIECES = 4       # decompressed pieces in flight to the worker thread (<= 16 MiB)
_BATCH = 256 << 10      # smaller pieces are gathered up to this size before the hand-off


class _Consumer:
    """The uncompressed side: diff_id hash, size, tar scanner."""

    def __init__(self, where: str, spool: RecordSpool):
        self.hash = hashlib.sha256()
        self.size = 0
        self.scan = TarScanner(where, spool.add)

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self.scan.feed(data)


class _Worker:
    """Runs a :class:`_Consumer` in a helper thread behind a bounded queue, so
    that inflating (C, without the GIL) and tar parsing overlap.

    The thread never blocks anything but its own ``get``: after an error it
    keeps draining the queue (``put`` cannot deadlock) and it stops at the
    sentinel, which :meth:`close` sends — or a finalizer, when the owning
    indexer is dropped without finishing (no thread is left behind).
    The consumer is only touched by the thread until :meth:`close` returns."""

    _STOP = object()

    def __init__(self, consumer: _Consumer, owner: object):
        self.consumer = consumer
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(_QUEUE_PIECES)
        self.thread = threading.Thread(target=self._run, name="layerindex", daemon=True)
        self.thread.start()
        self._finalizer = weakref.finalize(owner, _Worker._stop, self.q)

    @staticmethod
    def _stop(q: queue.Queue) -> None:
        q.put(_Worker._STOP)

    def _run(self) -> None:
        q, consume = self.q, self.consumer
        while True:
            item = q.get()
            if item is _Worker._STOP:
                return
            if self.error is None:
                try:
                    consume(item)
                except BaseException as e:   # noqa: BLE001 - handed to the feeding thread
                    self.error = e

    def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        """Stop the thread and wait for it; raise the consumer's error, if any."""
        if self._finalizer.detach() is not None:
            self.q.put(_Worker._STOP)
        self.thread.join()
        if self.error is not None:
            raise self.error


class LayerIndexer:
    """Index a layer blob in one streaming pass: ``feed`` it compressed chunks
    as they arrive, then ``finish()`` for the :class:`LayerIndex`.

    *compression* is what the media type says; as docker and containerd do,
    the blob's magic number decides (a mismatch is logged). Errors (bad
    compressed data, bad tar headers, path escapes) are raised from ``feed``
    or ``finish`` and stick: every later call raises the same error.

    With *threaded* (the default) the decompressed data is hashed and parsed
    in a helper thread while the caller's thread inflates the next chunk; a
    tar error then surfaces from a later ``feed`` or from ``finish``. Call
    :meth:`close` (or ``finish``) when abandoning an indexer early; dropping
    it also stops the thread. One indexer is fed by one thread at a time.

    *digest* names the blob, and says its bytes are verified against it by
    the caller (the pull's hash, a verifying read of a stored blob): gzip's
    own CRC-32 is then not computed again. Without it the CRC is checked.

    *max_size* bounds the uncompressed size (see :func:`max_layer_size`):
    the output beyond it raises :class:`~layerfs.errors.DecompressionLimit`.
    Whatever the ratio, memory stays bounded: the blob is inflated in pieces
    of at most 4 MiB, each handed on before the next is made.

    The caller saves the result: ``indexer.finish().save(index_path(store, digest))``.
    """

    def __init__(self, compression: str | None, *, where: str, digest: Digest | None = None,
                 span: int = DEFAULT_SPAN, threaded: bool = True, max_size: int | None = None,
                 spool_dir: str | os.PathLike | None = None):
        self.declared = normalize_compression(compression)
        self.where = where
        self.digest = digest
        self.max_size = max_size
        self._made = 0            # uncompressed bytes made so far
        self.span = span
        self.threaded = threaded
        self._ix = None
        self._head = b""
        self.compressed_size = 0
        self._spool = RecordSpool(spool_dir)
        self._consumer = _Consumer(where, self._spool)
        self._worker: _Worker | None = None
        self._batch: list[bytes] = []
        self._batched = 0
        self._error: BaseException | None = None
        self._result: LayerIndex | None = None

    @property
    def compression(self) -> str | None:
        return self._ix.compression if self._ix is not None else self.declared

    @property
    def size(self) -> int:
        """Uncompressed bytes seen so far (final after :meth:`finish`)."""
        return self._consumer.size

    def _start(self, head: bytes) -> None:
        actual = detect_compression(head)
        if actual != self.declared:
            log.info("%s: media type says %s but the data is %s", self.where,
                     self.declared or "uncompressed", actual or "uncompressed")
        # a blob named by its digest is verified by whoever reads it (and what comes out by the diff_id):
        # gzip's own CRC-32 would only check the same bytes again
        self._ix = make_indexer(actual, self.span, check=self.digest is None)

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            raise RuntimeError("feed() after finish()")
        try:
            self._feed(chunk)
        except BaseException as e:
            self._fail(e)
            raise self._error from None

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.compressed_size += len(chunk)
        if self._ix is None:
            self._head += bytes(chunk)
            if len(self._head) < 4:
                return
            chunk, self._head = self._head, b""
            self._start(chunk)
        ix = self._ix
        if isinstance(ix, PlainIndexer):
            self._out(ix.feed(chunk))
        else:
            for out in ix.feed_iter(chunk, _OUT_PIECE):
                self._out(out)

    def _out(self, data: bytes) -> None:
        if not data:
            return
        self._made += len(data)
        if self.max_size is not None and self._made > self.max_size:
            raise layer_too_large(self.digest, self.max_size)
        if not self.threaded:
            self._consumer(data)
            return
        # small pieces (small network chunks) are batched: one hand-off per _BATCH bytes at least
        if self._batch or len(data) < _BATCH:
            self._batch.append(data)
            self._batched += len(data)
            if self._batched < _BATCH:
                return
            data = b"".join(self._batch)
            self._batch, self._batched = [], 0
        self._hand_off(data)

    def _hand_off(self, data: bytes) -> None:
        if self._worker is None:
            self._worker = _Worker(self._consumer, self)
        self._worker.put(data)

    def _flush(self) -> None:
        if self._batch:
            data = b"".join(self._batch)
            self._batch, self._batched = [], 0
            self._hand_off(data)

    def _fail(self, e: BaseException) -> None:
        """Record the first error (with ``where``), stop the worker."""
        if self._error is None:
            if isinstance(e, LayerfsError) and e.where is None:
                e.where = self.where
            self._error = e
        w, self._worker = self._worker, None
        if w is not None:
            try:
                w.close()
            except BaseException:   # noqa: BLE001 - the first error is the one reported
                pass
        self._spool.close()

    def close(self) -> None:
        """Stop the helper thread without finishing (idempotent)."""
        w, self._worker = self._worker, None
        if w is not None:
            try:
                w.close()
            except BaseException as e:   # noqa: BLE001
                if self._error is None:
                    self._error = e
        self._spool.close()

    def finish(self) -> LayerIndex:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            if self._ix is None:
                head, self._head = self._head, b""
                self._start(head)
                if head:
                    self._out(self._ix.feed(head))
            seek = self._ix.finish()
            self._flush()
            w, self._worker = self._worker, None
            if w is not None:
                w.close()
            self._consumer.scan.finish()
            records, count = self._spool.finish()
        except BaseException as e:
            self._fail(e)
            raise self._error from None
        finally:
            self._spool.close()
        c = self._consumer
        self._result = LayerIndex(None, diff_id=Digest("sha256", c.hash.hexdigest()),
                                  size=c.size, compression=self._ix.compression, checkpoints=seek.to_bytes(),
                                  digest=self.digest, compressed_size=self.compressed_size,
                                  _raw_entries=records, _count=count)
        return self._result



# --- the store side ----------------------------------------------------------------

def index_path(store: Store, digest: Digest) -> Path:
    return store.root / "indexes" / f"{digest.algorithm}-{digest.hex}.idx"


def _fits(index: LayerIndex, desc: Descriptor) -> bool:
    """The index was made from this blob (an index saved without its digest is trusted by name and size)."""
    return (index.digest is None or index.digest == desc.digest) \
        and (index.compressed_size is None or index.compressed_size == desc.size)


def build_from_blob(store: Store, desc: Descriptor, *, chunk_size: int = 1 << 20) -> LayerIndex:
    """Index a stored layer blob (one verified read of it); does not save."""
    comp = LAYER_COMPRESSION.get(desc.media_type)
    ix = LayerIndexer(comp, where=f"layer {desc.digest.short}", digest=desc.digest)
    with store.open_blob(desc.digest, desc.size) as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                break
            ix.feed(b)
    return ix.finish()


def layer_facts_from_blob(store: Store, desc: Descriptor) -> dict:
    """Index a stored layer that has no index yet (one read of the blob) and record its facts."""
    idx = load_or_build(store, desc)
    info = {"diff_id": str(idx.diff_id), "size": idx.size, "media_type": desc.media_type}
    store.set_layer_info(desc.digest, info)
    return info


def load_or_build(store: Store, desc: Descriptor) -> LayerIndex:
    """The layer's index: loaded from ``indexes/``, or (missing, corrupt, of an
    older format, or for another blob) rebuilt from the stored blob with one
    verified read of it, and saved. A read-only store still works: the index
    is then built in memory each time."""
    path = index_path(store, desc.digest)
    with contextlib.suppress(FileNotFoundError):
        try:
            idx = LayerIndex.load(path)
            if _fits(idx, desc):
                return idx
            log.warning("layer index %s does not match blob %s; rebuilding", path, desc.digest.short)
        except IndexFormatError as e:
            log.warning("layer index %s: %s; rebuilding", path, e.message)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock(f"index-{desc.digest.algorithm}-{desc.digest.hex}"))
        except OSError as e:
            log.info("cannot lock %s (%s); indexing without the lock", path, e.strerror or e)
        else:
            with contextlib.suppress(FileNotFoundError, IndexFormatError):   # built meanwhile by another process?
                idx = LayerIndex.load(path)
                if _fits(idx, desc):
                    return idx
        idx = build_from_blob(store, desc)
        try:
            idx.save(path)
            if store.layer_info(desc.digest) is None:
                store.set_layer_info(desc.digest, {"diff_id": str(idx.diff_id), "size": idx.size,
                                                   "media_type": desc.media_type})
        except (OSError, LayerfsError) as e:
            log.warning("cannot save layer index %s: %s", path, e)
    return idx


def open_layer_reader(store: Store, desc: Descriptor, index: LayerIndex, *,
                      cache_bytes: int = DEFAULT_CACHE_BYTES,
                      cache: SpanCache | None = None) -> BlobReader:
    """Thread-safe random reads of the layer's uncompressed tar stream
    (``read(offset, length)``); *cache_bytes* bounds its cache of decompressed spans,
    or *cache* is one shared with other readers (the layers of an image). The cache's
    span file goes to the store's ``ingest/`` (disk, not memory) unless it is placed already."""
    spans_dir = store.root / "ingest"
    if cache is None:
        cache = SpanCache(cache_bytes, directory=spans_dir)
    else:
        cache.place(spans_dir)
    try:
        return open_reader(store.blob_path(desc.digest), index.compression, index.checkpoints, cache=cache)
    except FileNotFoundError:
        raise StoreError(f"blob {desc.digest} is missing from the store", where=str(store.root),
                         hint="pull the image again") from None
