"""Plain gzip layers read lazily through a published index (``layerfs index push``).

A plain gzip layer is mounted lazily when an index was published for its image (see
:mod:`layerfs.transfer.indexpush`): found through the referrers API or the ``<alg>-<hex>`` tag
(:func:`find_published`), its head (records and checkpoints) is fetched by Range and checked
against the artifact manifest (:func:`open_published`), and a read fetches the inflate window
and the compressed span of each checkpoint it touches (:class:`LazyGzipLayer`), checks both
against their published sha256, keeps them in ``ROOT/lazy/<alg>-<hex>/spans-*/`` and inflates
from the checkpoint.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from layerfs.errors import LayerfsError
from layerfs.image import Descriptor, Digest, Manifest
from layerfs.index import CompressedDataError, LayerIndex, SpanCache, inflate_at
from layerfs.lazy.cachedir import cached_spans, lazy_cache_dir
from layerfs.lazy.remote import LazyReadError, RemoteBlob
from layerfs.registry import RegistryClient
from layerfs.store import Store, atomic_write
from layerfs.transfer import (HEAD_DIGEST_ANNOTATION, HEAD_SIZE_ANNOTATION, IndexArtifactError, find_index,
    index_blobs, parse_head)

log = logging.getLogger(__name__)

__all__ = ["LazyGzipLayer", "find_published", "open_published"]


class _DecodedSpan:
    """One inflated span in the shared :class:`~layerfs.index.SpanCache` (made on first get)."""

    __slots__ = ("nbytes", "data", "lock")

    def __init__(self, size: int):
        self.nbytes = size
        self.data: bytes | None = None
        self.lock = threading.Lock()

    def ready(self, b: int) -> bool:
        return self.data is not None

    def get(self, produce: Callable[[], bytes], a: int, b: int) -> bytes:
        if self.data is None:
            with self.lock:
                if self.data is None:
                    self.data = produce()
        return self.data[a:b]


class LazyGzipLayer:
    """The LayerReader of a plain gzip layer with a published index (:mod:`layerfs.transfer.indexpush`).

    ``read(offset, size)`` addresses the layer's uncompressed tar stream, as for a pulled layer. Each
    span a read touches is fetched once (its window from the index blob, its compressed bytes from the
    layer blob, two Range requests), checked against the published sha256s, kept in
    ``ROOT/lazy/<alg>-<hex>/spans-<head>/<n>`` (window then span) and inflated from its checkpoint; inflated
    spans stay in a shared in-memory cache. A failed or bad fetch fails that read with EIO and leaves
    nothing behind."""

    def __init__(self, store: Store, client: Callable[[], RegistryClient], repository: str, desc: Descriptor,
                 index_desc: Descriptor, pub, head_size: int, cache: SpanCache, head_digest: Digest):
        self.store = store
        self.blob = RemoteBlob(client, repository, desc)
        self.index_blob = RemoteBlob(client, repository, index_desc)
        self.desc = desc
        self.pub = pub
        self.spans = pub.spans
        self._starts = [sp.ustart for sp in pub.spans]
        self._head_size = head_size
        self._cache = cache
        self._token = object()
        # span numbers are those of one published index: its spans live apart from another index's
        self.dir = lazy_cache_dir(store, desc.digest) / f"spans-{head_digest.hex[:16]}"
        self._lock = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self._verified: set[int] = set()
        self.last_demand = 0.0

    @property
    def size(self) -> int:
        return self.pub.size

    @property
    def fetched_bytes(self) -> int:
        return self.blob.fetched_bytes + self.index_blob.fetched_bytes

    def status_entry(self) -> dict:
        """This layer in a status file (:mod:`layerfs.lazy.status`)."""
        return {"digest": str(self.desc.digest), "kind": "gzip", "dir": str(self.dir), "pieces": self.pieces}

    # -- background fetch (see layerfs.lazy.prefetch) -------------------------------------------
    @property
    def pieces(self) -> int:
        return len(self.spans)

    def fetched_fraction(self) -> float:
        return min(1.0, cached_spans(self.dir) / len(self.spans))

    def prefetch_pieces(self, mode: str) -> list:
        if mode != "all":           # a gzip layer has no landmark
            return []
        return [i for i in range(len(self.spans)) if i not in self._verified and not self.has_span(i)]

    def prefetch(self, piece) -> None:
        self._ensure(piece, demand=False)

    def read(self, offset: int, size: int) -> bytes:
        return self._read(offset, size, fetch=True)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        return self._read(offset, size, fetch=False)

    def _read(self, offset: int, size: int, *, fetch: bool) -> bytes | None:
        end = min(offset + size, self.pub.size)
        if offset < 0 or offset >= end:
            return b""
        parts = []
        while offset < end:
            i = bisect.bisect_right(self._starts, offset) - 1
            sp = self.spans[i]
            stop = min(end, sp.uend)
            key = (self._token, i)
            if not fetch:
                e = self._cache.peek(key)
                if e is None or e.data is None:
                    return None
                parts.append(e.data[offset - sp.ustart:stop - sp.ustart])
            else:
                e = self._cache.entry(key, lambda: _DecodedSpan(sp.uend - sp.ustart))
                try:
                    parts.append(e.get(lambda: self._inflate(i), offset - sp.ustart, stop - sp.ustart))
                except BaseException:
                    self._cache.discard(key, e)
                    raise
            offset = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _where(self, i: int) -> str:
        return f"layer {self.desc.digest.short} span {i}"

    def _inflate(self, i: int) -> bytes:
        sp = self.spans[i]
        path = self._ensure(i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise LazyReadError(f"{self._where(i)}: cannot read the lazy cache: {e.strerror}") from None
        try:
            window = os.pread(fd, sp.wlen, 0) if sp.wlen else None
            return inflate_at(fd, sp.wlen + sp.coffset - sp.cstart, sp.bits, window, sp.uend - sp.ustart)
        except CompressedDataError as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            with self._lock:
                self._verified.discard(i)
            raise LazyReadError(f"{self._where(i)}: does not inflate ({e.message}); not kept") from None
        finally:
            os.close(fd)

    def _span_lock(self, i: int) -> threading.Lock:
        with self._lock:
            lk = self._locks.get(i)
            if lk is None:
                lk = self._locks[i] = threading.Lock()
            return lk

    def _good(self, i: int, data: bytes) -> bool:
        sp = self.spans[i]
        w, c = data[:sp.wlen], data[sp.wlen:]
        return len(c) == sp.cend - sp.cstart and hashlib.sha256(c).digest() == sp.ssha \
            and (not sp.wlen or hashlib.sha256(w).digest() == sp.wsha)

    def has_span(self, i: int) -> bool:
        return (self.dir / str(i)).exists()

    def _ensure(self, i: int, *, demand: bool = True) -> Path:
        """The cache file of span *i*, fetched and verified if needed."""
        path = self.dir / str(i)
        if i in self._verified:
            return path
        if demand:
            self.last_demand = time.monotonic()
        with self._span_lock(i):
            if i in self._verified:
                return path
            with contextlib.suppress(FileNotFoundError):
                if self._good(i, path.read_bytes()):
                    self._verified.add(i)
                    return path
                log.warning("%s: the cached copy is damaged; fetching it again", self._where(i))
            sp = self.spans[i]
            w = b""
            if sp.wlen:
                a = self._head_size + sp.woff
                w = self.index_blob.read(a, a + sp.wlen, f"{self._where(i)} window")
            c = self.blob.read(sp.cstart, sp.cend, self._where(i))
            if not self._good(i, w + c):
                raise LazyReadError(f"{self._where(i)}: bytes {sp.cstart}-{sp.cend} do not match the published "
                                    f"sha256; not kept")
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write(path, w + c)
            except OSError as e:
                raise LazyReadError(f"{self._where(i)}: cannot write the lazy cache: {e}") from None
            self._verified.add(i)
            return path


def find_published(client: RegistryClient, repo: str, manifest: Manifest):
    """(artifact manifest, its index blobs by layer, how found) of the image's published index, or None."""
    try:
        found = find_index(client, repo, manifest)
        if found is None:
            log.info("%s/%s@%s: no published layer index", client.registry, repo, manifest.digest.short)
            return None
        art, via = found
        return art, index_blobs(art), via
    except LayerfsError as e:
        log.warning("published layer index of %s: %s", manifest.digest.short, e.one_line())
        return None


def open_published(store: Store, client: RegistryClient, reader_client: Callable[[], RegistryClient], repo: str,
                   desc: Descriptor, diff_id: Digest, found,
                   cache: SpanCache) -> tuple[LayerIndex, LazyGzipLayer] | None:
    """(records, reader) of a gzip layer from its published index *found* (:func:`find_published`), or None
    (none or unusable: logged). The head is fetched with *client*, spans by the reader with *reader_client*."""
    if found is None:
        return None
    art, blobs, via = found
    bdesc = blobs.get(desc.digest)
    if bdesc is None:
        log.warning("layer %s: the published index %s does not cover it; pulling it whole", desc.digest.short,
                    art.digest.short)
        return None
    where = f"{client.registry}/{repo}"
    head_size = int(bdesc.annotations[HEAD_SIZE_ANNOTATION])
    want = Digest.parse(bdesc.annotations[HEAD_DIGEST_ANNOTATION])
    cached = lazy_cache_dir(store, desc.digest) / f"index-{want.algorithm}-{want.hex}"
    try:
        head = None
        with contextlib.suppress(FileNotFoundError):
            head = cached.read_bytes()
            if Digest.of(head, want.algorithm) != want:
                head = None
        if head is None:
            head = client.read_range(repo, bdesc, 0, head_size)
            if Digest.of(head, want.algorithm) != want:
                raise IndexArtifactError(f"index head of layer {desc.digest.short} does not match its digest",
                                         where=where)
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, head)
        pub = parse_head(head, desc, diff_id=diff_id, windows_size=bdesc.size - head_size, where=where)
    except (LayerfsError, OSError) as e:
        msg = e.one_line() if isinstance(e, LayerfsError) else str(e)
        log.warning("layer %s: the published index is unusable: %s; pulling it whole", desc.digest.short, msg)
        return None
    reader = LazyGzipLayer(store, reader_client, repo, desc, bdesc, pub, head_size, cache, want)
    log.info("layer %s: gzip, %d entries, %d spans, mounted lazily (index %s, found by %s)", desc.digest.short,
             len(pub.index), len(pub.spans), art.digest.short, via)
    return pub.index, reader
