"""Lazy remote mounts of eStargz images (``layerfs mount --lazy REF MNT``).

Nothing is downloaded up front but the manifest, the config and, for each
eStargz layer (one with the ``containerd.io/snapshot/stargz/toc.digest``
annotation), its footer and TOC, fetched with HTTP Range requests; the TOC
is checked against the annotation. The TOC becomes the layer's records
(:class:`~layerfs.index.layerindex.LayerIndex`), so :func:`layerfs.fs.union.build_tree`
merges lazy and ordinary layers alike.

A plain gzip layer is mounted lazily when an index was published for its
image (``layerfs index push``, see :mod:`layerfs.transfer.indexpush`): found through
the referrers API or the ``<alg>-<hex>`` tag, its head (records and
checkpoints) is fetched by Range and checked against the artifact manifest,
and a read fetches the inflate window and the compressed span of each
checkpoint it touches (:class:`LazyGzipLayer`), checks both against their
published sha256, keeps them in ``ROOT/lazy/<alg>-<hex>/spans-*/`` and inflates
from the checkpoint. Other layers, and gzip layers without a usable index,
are pulled whole (logged).

A lazy layer's reader (:class:`LazyLayer`) serves its files from a private
address space: file *k* occupies ``[base_k, base_k + size_k)`` (the records'
``offset`` points there, not into the tar stream). A read fetches the gzip
member of each chunk it touches by Range, inflates it, checks ``chunkDigest``
and stores the verified bytes in the layer's cache in the store
(``ROOT/lazy/<alg>-<hex>/data``, a sparse file laid out as that address space,
plus ``chunks.json``: the chunks present), which later reads and later mounts
use. A fetch that fails or does not verify fails that read with EIO; nothing
is cached from it and the mount goes on.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layerfs.errors import ContentError, LayerfsError, ManifestError
from layerfs.image import LAYER_COMPRESSION, Descriptor, Digest, ImageConfig, Manifest, iter_layer_compression
from layerfs.index import CompressedDataError, SpanCache, inflate_at
from layerfs.index import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, SYMLINK_MODE, Entry, LayerIndex,
    layer_too_large, load_or_build, max_layer_size, normalize_path, open_layer_reader)
from layerfs.registry import RegistryClient
from layerfs.store import Store, atomic_write, file_lock
from layerfs.transfer import (FOOTER_SIZE, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
    EStargzError, is_estargz, parse_footer, parse_rfc3339_ns, parse_toc_member)

log = logging.getLogger(__name__)

__all__ = ["LazyLayer", "LazyGzipLayer", "LazyImage", "LazyImageLayer", "open_lazy_layers", "note_lazy_readers", "served_blobs", "LazyReadError", "PREFETCH_MODES", "lazy_status", "prune_lazy", "open_lazy_tree", "mount_lazy", "lazy_cache_dir"]

#: retries of one chunk fetch (each with the client's backoff) before the read fails
READ_RETRIES = 1
_TYPES = {"reg": FILE, "dir": DIR, "symlink": SYMLINK, "hardlink": HARDLINK, "char": CHAR, "block": BLOCK,
          "fifo": FIFO}
_MAX_TOC = 256 << 20
_INFLATE_PIECE = 4 << 20     # a chunk is inflated into the cache this much at a time
#: background fetch of a lazy mount: nothing, the files before an eStargz layer's ``.prefetch.landmark``, all
PREFETCH_MODES = ("none", "landmark", "all")
LANDMARK = ".prefetch.landmark"
NO_LANDMARK = ".no.prefetch.landmark"
#: the background fetch pauses while reads have fetched something within this many seconds
PREFETCH_YIELD = 0.5


class LazyReadError(ContentError):
    """A lazy read could not be served (fetch failed or did not verify): EIO for that read."""
    errno = errno.EIO


def lazy_cache_dir(store: Store, digest: Digest) -> Path:
    return store.root / "lazy" / f"{digest.algorithm}-{digest.hex}"


@dataclass
class _Chunk:
    off: int            # in the file
    size: int
    start: int          # compressed range of its gzip member (start, end) in the blob
    end: int
    digest: str
    cid: int            # chunk number within the layer
    inner: int = 0      # innerOffset: where the chunk starts in its member's inflated bytes


@dataclass
class _File:
    name: str
    base: int           # in the layer's private address space
    size: int
    chunks: list[_Chunk]
    inline: bytes | None = None


def _toc_records(toc: dict, toc_json: bytes, toc_offset: int, where: str) -> tuple[list[Entry], list[_File]]:
    """Records and file table of a TOC (the TOC file itself included, as the tar holds it)."""
    entries: dict[str, Entry] = {}
    files: list[_File] = []
    regs: dict[str, tuple[_File, dict, list[dict]]] = {}
    pending: list[tuple[_File, dict, list[dict]]] = []
    base = 0
    for e in toc["entries"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("type"), str):
            raise EStargzError("eStargz TOC entry without name or type", where=where)
        typ = e["type"]
        if typ == "chunk":
            ent = regs.get(normalize_path(e["name"], where=where))
            if ent is None:
                raise EStargzError(f"eStargz TOC: chunk of unknown file {e['name']!r}", where=where)
            ent[2].append(e)
            continue
        t = _TYPES.get(typ)
        if t is None:
            log.warning("%s: ignoring TOC entry %r of type %r", where, e["name"], typ)
            continue
        path = normalize_path(e["name"], where=where)
        size = int(e.get("size") or 0) if t == FILE else 0
        if size < 0:
            raise EStargzError(f"eStargz TOC: negative size for {path!r}", where=where)
        link = e.get("linkName") or None
        if t == HARDLINK and link is not None:
            link = normalize_path(link, where=where, what="link target")
        if t in (SYMLINK, HARDLINK) and link is None:
            link = ""
        xattrs = None
        if isinstance(e.get("xattrs"), dict) and e["xattrs"]:
            xattrs = {str(k): base64.b64decode(v) for k, v in e["xattrs"].items()}
        mtime = parse_rfc3339_ns(e["modtime"]) if isinstance(e.get("modtime"), str) and e["modtime"] else 0
        off = 0
        if t == FILE and size:
            f = _File(path, base, size, [])
            files.append(f)
            regs[path] = (f, e, [e])
            pending.append(regs[path])
            off = base
            base += size
        entries.pop(path, None)
        mode = SYMLINK_MODE if t == SYMLINK else int(e.get("mode") or 0) & 0o7777
        entries[path] = Entry(path, t, mode, int(e.get("uid") or 0),
                              int(e.get("gid") or 0), size, mtime, link, int(e.get("devMajor") or 0),
                              int(e.get("devMinor") or 0), off, xattrs, None)
    # chunk ranges: a chunk's member ends where the next known member starts (or the TOC)
    starts = sorted({int(c.get("offset") or 0) for _, _, cs in pending for c in cs} | {toc_offset})
    cid = 0
    for f, e, cs in pending:
        for c in cs:
            coff = int(c.get("chunkOffset") or 0)
            csize = int(c.get("chunkSize") or 0) or (f.size - coff)
            start = int(c.get("offset") or 0)
            i = bisect.bisect_right(starts, start)
            end = starts[i] if i < len(starts) else toc_offset
            dg = c.get("chunkDigest") or (e.get("digest") if len(cs) == 1 else None)
            if not isinstance(dg, str) or not dg.startswith("sha256:"):
                raise EStargzError(f"eStargz TOC: {f.name!r} chunk at {coff} has no sha256 digest", where=where)
            if coff < 0 or csize <= 0 or coff + csize > f.size or not 0 <= start < end:
                raise EStargzError(f"eStargz TOC: bad chunk of {f.name!r} at {coff}", where=where)
            inner = int(c.get("innerOffset") or 0)
            if inner < 0:
                raise EStargzError(f"eStargz TOC: bad innerOffset of {f.name!r} at {coff}", where=where)
            f.chunks.append(_Chunk(coff, csize, start, end, dg, cid, inner))
            cid += 1
        f.chunks.sort(key=lambda c: c.off)
        covered = 0
        for c in f.chunks:
            if c.off != covered:
                raise EStargzError(f"eStargz TOC: chunks of {f.name!r} do not cover it", where=where)
            covered += c.size
        if covered != f.size:
            raise EStargzError(f"eStargz TOC: chunks of {f.name!r} do not cover it", where=where)
    # the TOC file itself is a member of the tar (a full pull shows it too)
    if TOC_TAR_NAME not in entries:
        tf = _File(TOC_TAR_NAME, base, len(toc_json), [], inline=toc_json)
        files.append(tf)
        entries[TOC_TAR_NAME] = Entry(TOC_TAR_NAME, FILE, 0o644, 0, 0, len(toc_json), 0, None, 0, 0, base, None, None)
    return list(entries.values()), files


class LazyLayer:
    """The LayerReader of one eStargz layer: Range fetches on first read, verified, cached in the store."""

    def __init__(self, store: Store, client: Callable[[], RegistryClient], repository: str, desc: Descriptor,
                 files: list[_File], toc_digest: str):
        self.store = store
        self._client = client
        self.repository = repository
        self.desc = desc
        self.files = files
        self._bases = [f.base for f in files]
        self.dir = lazy_cache_dir(store, desc.digest)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._data_path = self.dir / "data"
        self._map_path = self.dir / "chunks.json"
        self._toc_digest = toc_digest
        self._lock = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self._have: set[int] = self._load_map()
        self.fetched_bytes = 0
        self.last_demand = 0.0

    # -- background fetch (see _Prefetcher) ---------------------------------------------------
    @property
    def pieces(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def fetched_fraction(self) -> float:
        n = self.pieces
        return len(self._load_map()) / n if n else 1.0

    def prefetch_pieces(self, mode: str) -> list:
        names = [f.name for f in self.files]
        if mode == "landmark":
            if NO_LANDMARK in names or LANDMARK not in names:
                return []
            files = self.files[:names.index(LANDMARK)]
        else:
            files = self.files
        return [(f, c) for f in files for c in f.chunks if c.cid not in self._have]

    def prefetch(self, piece) -> None:
        self._fetch(*piece)

    def _load_map(self) -> set[int]:
        try:
            doc = json.loads(self._map_path.read_bytes())
            if doc.get("toc") == self._toc_digest and self._data_path.exists():
                return {int(x) for x in doc.get("chunks", [])}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            pass
        return set()

    def _save_map(self, new: int) -> None:
        with self._lock, file_lock(self.dir / "chunks.lock"):
            have = self._load_map() | self._have | {new}
            atomic_write(self._map_path, json.dumps({"toc": self._toc_digest, "chunks": sorted(have)}).encode())
            self._have = have

    # -- LayerReader ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        return self._read(offset, size, fetch=True)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        return self._read(offset, size, fetch=False)

    def _read(self, offset: int, size: int, *, fetch: bool) -> bytes | None:
        i = bisect.bisect_right(self._bases, offset) - 1
        if i < 0 or size <= 0:
            return b""
        f = self.files[i]
        rel = offset - f.base
        end = min(rel + size, f.size)
        if rel >= end:
            return b""
        if f.inline is not None:
            return f.inline[rel:end]
        out = bytearray()
        k = bisect.bisect_right([c.off for c in f.chunks], rel) - 1
        for c in f.chunks[max(k, 0):]:
            if c.off >= end:
                break
            if c.cid not in self._have:
                if not fetch:
                    return None
                self.last_demand = time.monotonic()
                self._fetch(f, c)
            lo, hi = max(rel, c.off), min(end, c.off + c.size)
            out += self._pread(f.base + lo, hi - lo)
        return bytes(out)

    def _pread(self, pos: int, n: int) -> bytes:
        with open(self._data_path, "rb") as fh:
            b = os.pread(fh.fileno(), n, pos)
        if len(b) != n:
            raise LazyReadError(f"lazy cache {self._data_path} is short")
        return b

    def _chunk_lock(self, cid: int) -> threading.Lock:
        with self._lock:
            lk = self._locks.get(cid)
            if lk is None:
                lk = self._locks[cid] = threading.Lock()
            return lk

    def _fetch(self, f: _File, c: _Chunk) -> None:
        # one fetch per chunk at a time (readers of the same chunk wait for it); other chunks go in parallel
        with self._chunk_lock(c.cid):
            if c.cid in self._have:
                return
            where = f"{self.desc.digest.short}:{f.name}"
            try:
                raw = self._client().read_range(self.repository, self.desc, c.start, c.end, retries=READ_RETRIES)
            except LayerfsError as e:
                raise LazyReadError(f"{where}: fetching bytes {c.start}-{c.end} failed: {e.message}") from None
            with self._lock:
                self.fetched_bytes += len(raw)
            # inflated in pieces straight into the cache file (memory stays bounded whatever the chunk
            # claims); the chunk counts as cached only once its digest matched (_save_map)
            try:
                fd = os.open(self._data_path, os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError as e:
                raise LazyReadError(f"{where}: cannot write the lazy cache: {e}") from None
            try:
                d = zlib.decompressobj(31)
                h = hashlib.sha256()
                skip, left, pos, buf = c.inner, c.size, f.base + c.off, raw
                while left and (buf or not d.eof):
                    piece = d.decompress(buf, min(_INFLATE_PIECE, skip + left))
                    buf = d.unconsumed_tail
                    if not piece:
                        break
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    h.update(piece)
                    os.pwrite(fd, piece, pos)
                    pos += len(piece)
                    left -= len(piece)
                if left or "sha256:" + h.hexdigest() != c.digest:
                    raise LazyReadError(f"{where}: chunk at {c.off} does not match its chunkDigest; not cached")
                os.fsync(fd)
            except zlib.error as e:
                raise LazyReadError(f"{where}: chunk at {c.off} is not gzip ({e})") from None
            except OSError as e:
                raise LazyReadError(f"{where}: cannot write the lazy cache: {e}") from None
            finally:
                os.close(fd)
            try:
                self._save_map(c.cid)
            except OSError as e:
                raise LazyReadError(f"{where}: cannot write the lazy cache: {e}") from None


class _DecodedSpan:
    """One inflated span in the shared :class:`~layerfs.index.gzindex.SpanCache` (made on first get)."""

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
        self._client = client
        self.repository = repository
        self.desc = desc
        self.index_desc = index_desc
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
        self.fetched_bytes = 0
        self.last_demand = 0.0

    @property
    def size(self) -> int:
        return self.pub.size

    # -- background fetch (see _Prefetcher) ---------------------------------------------------
    @property
    def pieces(self) -> int:
        return len(self.spans)

    def fetched_fraction(self) -> float:
        try:
            have = sum(1 for n in os.listdir(self.dir) if n.isdigit())
        except OSError:
            have = 0
        return min(1.0, have / len(self.spans))

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
            try:
                client = self._client()
                w = b""
                if sp.wlen:
                    a = self._head_size + sp.woff
                    w = client.read_range(self.repository, self.index_desc, a, a + sp.wlen, retries=READ_RETRIES)
                c = client.read_range(self.repository, self.desc, sp.cstart, sp.cend, retries=READ_RETRIES)
            except LayerfsError as e:
                raise LazyReadError(f"{self._where(i)}: fetching bytes {sp.cstart}-{sp.cend} failed: "
                                    f"{e.message}") from None
            with self._lock:
                self.fetched_bytes += len(w) + len(c)
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


class _Prefetcher:
    """Fetches the pieces of lazy layers in the background, at low priority: one at a time, in a thread
    of its own (niced), pausing while reads fetch (within :data:`PREFETCH_YIELD` s). It runs in the mount
    daemon: :meth:`arm` before the daemon is forked starts it there (after a short delay), and only there."""

    def __init__(self, readers: list, mode: str):
        self.readers = [r for r in readers if hasattr(r, "prefetch_pieces")]
        self.mode = mode
        self.done = threading.Event()
        self.errors = 0

    def arm(self) -> None:
        global _AT_FORK
        if not _AT_FORK:
            os.register_at_fork(after_in_child=_start_armed)
            _AT_FORK = True
        _ARMED.add(self)

    def disarm(self) -> None:
        _ARMED.discard(self)

    def start(self, delay: float = 0.0) -> None:
        self.done.clear()
        threading.Thread(target=self._run, args=(delay,), name="layerfs-prefetch", daemon=True).start()

    def _run(self, delay: float) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        if delay:
            time.sleep(delay)
        try:
            for r in self.readers:
                todo = r.prefetch_pieces(self.mode)
                if todo:
                    log.info("prefetch: layer %s, %d pieces", r.desc.digest.short, len(todo))
                for piece in todo:
                    while time.monotonic() - r.last_demand < PREFETCH_YIELD:
                        time.sleep(PREFETCH_YIELD)
                    try:
                        r.prefetch(piece)
                    except LazyReadError as e:
                        self.errors += 1
                        log.info("prefetch: %s", e.message)
                        time.sleep(min(30.0, 0.5 * 2 ** min(self.errors, 6)))
                    except Exception as e:  # never let the background fetch take the daemon down
                        log.warning("prefetch stopped: %s: %s", type(e).__name__, e)
                        return
            log.info("prefetch (%s) done", self.mode)
        finally:
            self.done.set()


_ARMED: "weakref.WeakSet[_Prefetcher]" = weakref.WeakSet()
_AT_FORK = False


def _start_armed() -> None:
    # in a forked child: the mount daemon to be (or the short-lived process that forks it, which exits
    # before the delay is over)
    for p in list(_ARMED):
        p.start(delay=0.5)


def _status_path(store: Store, pid: int) -> Path:
    return store.root / "lazy" / "mounts" / f"{pid}.json"


def _write_status(store: Store, record, readers: list, prefetch: str, blobs: tuple = ()) -> None:
    layers = []
    for r in readers:
        if isinstance(r, LazyGzipLayer):
            layers.append({"digest": str(r.desc.digest), "kind": "gzip", "dir": str(r.dir), "pieces": r.pieces})
        elif isinstance(r, LazyLayer):
            layers.append({"digest": str(r.desc.digest), "kind": "estargz", "dir": str(r.dir),
                           "toc": r._toc_digest, "pieces": r.pieces})
        else:
            layers.append({"kind": "pulled"})
    doc = {"mountpoint": str(record.mountpoint), "pid": record.pid, "prefetch": prefetch, "layers": layers}
    if blobs:
        doc["blobs"] = [str(d) for d in blobs]
    with contextlib.suppress(OSError, LayerfsError):
        atomic_write(_status_path(store, record.pid), json.dumps(doc).encode())


def note_lazy_readers(store: Store, mountpoint: str, pid: int, readers: list, blobs=()) -> None:
    """Record that process *pid* serves *readers* at *mountpoint* (a file system of another kind, e.g. the
    layer store) and reads the stored *blobs* (digests) that no image may tag: ``layerfs prune`` and
    ``rmi`` keep both while it runs (:func:`served_blobs`) and ``layerfs mounts`` shows the readers."""
    from types import SimpleNamespace
    _write_status(store, SimpleNamespace(mountpoint=mountpoint, pid=pid), readers, "none", tuple(blobs))


def served_blobs(store: Store) -> set[Digest]:
    """The stored blobs running servers read without an image tagging them (see :func:`note_lazy_readers`)."""
    out: set[Digest] = set()
    for p in _status_files(store):
        if not _alive(int(p.stem)):
            continue
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError, LayerfsError):
            out.update(Digest.parse(d) for d in json.loads(p.read_bytes()).get("blobs", ()))
    return out


def lazy_status(store: Store, record) -> list[float] | None:
    """Per layer, the fraction of a lazy mount's data in the local cache (1.0 for layers pulled whole);
    None when *record* is not a lazy mount."""
    try:
        doc = json.loads(_status_path(store, record.pid).read_bytes())
        if doc.get("mountpoint") != str(record.mountpoint):
            return None
        out = []
        for layer in doc["layers"]:
            kind, n = layer.get("kind"), int(layer.get("pieces") or 0)
            if kind == "gzip":
                with contextlib.suppress(OSError):
                    have = sum(1 for x in os.listdir(layer["dir"]) if x.isdigit())
                    out.append(min(1.0, have / n) if n else 1.0)
                    continue
                out.append(0.0)
            elif kind == "estargz":
                have = 0
                with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                    m = json.loads((Path(layer["dir"]) / "chunks.json").read_bytes())
                    if m.get("toc") == layer.get("toc"):
                        have = len(m.get("chunks") or [])
                out.append(min(1.0, have / n) if n else 1.0)
            else:
                out.append(1.0)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    from layerfs.mount import pid_alive
    return pid_alive(pid)


def _status_files(store: Store) -> list[Path]:
    try:
        return [p for p in (store.root / "lazy" / "mounts").iterdir() if p.suffix == ".json" and p.stem.isdigit()]
    except OSError:
        return []


def forget_stale_status(store: Store) -> None:
    """Drop the status files of lazy mounts whose process is gone."""
    for p in _status_files(store):
        if not _alive(int(p.stem)):
            with contextlib.suppress(OSError):
                p.unlink()


def prune_lazy(store: Store) -> tuple[int, int]:
    """Delete the lazy caches (``ROOT/lazy/<alg>-<hex>``) of layers that neither an image of the store nor
    a running lazy mount uses. Returns (caches removed, bytes freed)."""
    import shutil
    base = store.root / "lazy"
    if not base.is_dir():
        return 0, 0
    removed = freed = 0
    with store.lock("gc"):          # lazy mounts being set up hold it shared
        keep = {f"{d.algorithm}-{d.hex}" for d in store.referenced_blobs()}
        for p in _status_files(store):
            if not _alive(int(p.stem)):
                with contextlib.suppress(OSError):
                    p.unlink()
                continue
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
                for layer in json.loads(p.read_bytes())["layers"]:
                    if layer.get("digest"):
                        d = Digest.parse(layer["digest"])
                        keep.add(f"{d.algorithm}-{d.hex}")
        for d in base.iterdir():
            if d.name == "mounts" or d.name in keep or not d.is_dir() or "-" not in d.name:
                continue
            size = 0
            for f in d.rglob("*"):
                with contextlib.suppress(OSError):
                    if f.is_file():
                        size += f.stat().st_blocks * 512
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            freed += size
    return removed, freed


# --- opening an image lazily -----------------------------------------------------------------

def _fetch_toc(store: Store, client: RegistryClient, repository: str, desc: Descriptor) -> tuple[bytes, dict, int]:
    """(TOC JSON, TOC, TOC offset) of an eStargz layer: from the lazy cache, else by Range; verified."""
    want = desc.annotations[TOC_DIGEST_ANNOTATION]
    cached = lazy_cache_dir(store, desc.digest) / "toc.json"
    with contextlib.suppress(FileNotFoundError, ValueError):
        doc = cached.read_bytes()
        off_s, _, js = doc.partition(b"\n")
        if "sha256:" + hashlib.sha256(js).hexdigest() == want:
            return js, json.loads(js), int(off_s)
    where = f"layer {desc.digest.short}"
    if desc.size < FOOTER_SIZE:
        raise EStargzError(f"{where} is too small for eStargz", where=where)
    toc_off = parse_footer(client.read_range(repository, desc, desc.size - FOOTER_SIZE, desc.size))
    if not 0 <= toc_off < desc.size - FOOTER_SIZE or desc.size - FOOTER_SIZE - toc_off > _MAX_TOC:
        raise EStargzError(f"{where}: TOC offset {toc_off} out of range", where=where)
    js, toc = parse_toc_member(client.read_range(repository, desc, toc_off, desc.size - FOOTER_SIZE))
    got = "sha256:" + hashlib.sha256(js).hexdigest()
    if got != want:
        from layerfs.errors import DigestMismatch
        raise DigestMismatch(f"{where}: TOC digest is {got}, the manifest says {want}", where=where)
    d = lazy_cache_dir(store, desc.digest)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, b"%d\n" % toc_off + js)
    return js, toc, toc_off


def _find_published(client: RegistryClient, repo: str, manifest: Manifest):
    """(artifact manifest, its index blobs by layer, how found) of the image's published index, or None."""
    from layerfs.transfer import find_index, index_blobs
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


def _open_published(store: Store, client: RegistryClient, reader_client, repo: str, desc: Descriptor,
                    diff_id: Digest, found, cache: SpanCache):
    """(LayerIndex, LazyGzipLayer) of a gzip layer from its published index, or None (none or unusable: logged)."""
    from layerfs.transfer import HEAD_DIGEST_ANNOTATION, HEAD_SIZE_ANNOTATION, parse_head
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
                from layerfs.transfer import IndexArtifactError
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


@dataclass
class LazyImageLayer:
    """One layer of a remotely opened image: its descriptor, diff_id, records and reader; ``lazy`` is False
    when it had to be pulled whole (its reader reads the stored blob)."""
    desc: Descriptor
    diff_id: Digest
    index: LayerIndex
    reader: object
    lazy: bool


@dataclass
class LazyImage:
    """A remote image opened lazily (:func:`open_lazy_layers`): its reference, manifest and layers, bottom first.
    ``client()`` is the registry client of the process that calls it (readers and blob reads use it)."""
    ref: object
    manifest: Manifest
    layers: list[LazyImageLayer]
    client: Callable[[], RegistryClient]


def open_lazy_layers(store: Store, ref_text: str, *, platform=None, registry_options=None) -> LazyImage:
    """Open the layers of a remote image lazily where they allow it (see the module docs), each on its own."""
    from layerfs.image import Reference
    from layerfs.registry import ClientPool
    from layerfs.transfer import Puller, PullOptions, check_diff_id
    ref = Reference.parse(ref_text)
    store.init()
    puller = Puller(store, PullOptions(platform=platform, registry=registry_options))
    manifest, _ = puller.resolve(ref)
    client = puller.client(ref.registry)
    repo = ref.repository
    config = ImageConfig.parse(client.get_blob_bytes(repo, manifest.config), where=f"{ref.registry}/{repo}")
    diff_ids = config.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise ManifestError(f"image config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers",
                            where=f"{ref.registry}/{repo}")
    compressions = iter_layer_compression(manifest.layers, where=ref.registry)
    # the readers make their own client in the process that serves (the mount daemon is forked)
    state: dict = {}

    def reader_client() -> RegistryClient:
        if state.get("pid") != os.getpid():
            state["pid"] = os.getpid()
            state["client"] = ClientPool(registry_options)(ref.registry)
        return state["client"]

    layers: list[LazyImageLayer] = []
    published: list = []                  # [(artifact, via) or None], looked up once, when needed
    span_cache = SpanCache()
    for i, desc in enumerate(manifest.layers):
        lazy_gzip = None
        lazy = True
        if not is_estargz(desc) and LAYER_COMPRESSION.get(desc.media_type) == "gzip":
            if not published:
                published.append(_find_published(client, repo, manifest))
            lazy_gzip = _open_published(store, client, reader_client, repo, desc, diff_ids[i], published[0],
                                        span_cache)
        if lazy_gzip is not None:
            idx, reader = lazy_gzip
        elif is_estargz(desc):
            js, toc, toc_off = _fetch_toc(store, client, repo, desc)
            where = f"layer {desc.digest.short}"
            entries, files = _toc_records(toc, js, toc_off, where)
            limit = max_layer_size(desc.size)
            if sum(f.size for f in files) > limit:     # as a pull would stop: the lazy cache fills up to that
                raise layer_too_large(desc.digest, limit, where=where)
            usize = int((desc.annotations or {}).get(UNCOMPRESSED_SIZE_ANNOTATION) or 0)
            idx = LayerIndex(entries, diff_id=diff_ids[i], size=usize, compression="gzip", checkpoints=b"",
                             digest=desc.digest, compressed_size=desc.size)
            reader = LazyLayer(store, reader_client, repo, desc, files, desc.annotations[TOC_DIGEST_ANNOTATION])
            log.info("layer %s: eStargz, %d entries, mounted lazily", desc.digest.short, len(entries))
        else:
            lazy = False
            if LAYER_COMPRESSION.get(desc.media_type) != "gzip":
                log.warning("layer %s is neither eStargz nor gzip: pulling it whole", desc.digest.short)
            elif published[0] is None:
                log.warning("layer %s is not eStargz and its image has no published index ('layerfs index "
                            "push'): pulling it whole", desc.digest.short)
            if not store.has_blob(desc.digest, desc.size):
                with store.lock("gc", shared=True):
                    puller._download_layer(client, repo, desc, compressions[i], diff_ids[i])
            idx = load_or_build(store, desc)
            check_diff_id(desc, idx.diff_id, diff_ids[i], where=f"{ref.registry}/{repo}")
            reader = open_layer_reader(store, desc, idx)
        layers.append(LazyImageLayer(desc, diff_ids[i], idx, reader, lazy))
    return LazyImage(ref, manifest, layers, reader_client)


def open_lazy_tree(store: Store, ref_text: str, *, platform=None, registry_options=None):
    """(image name, manifest, merged tree, lazy readers) of a remote image, mounted lazily."""
    from layerfs.fs import build_tree
    image = open_lazy_layers(store, ref_text, platform=platform, registry_options=registry_options)
    readers = [layer.reader for layer in image.layers]
    tree = build_tree([layer.index for layer in image.layers], readers)
    return image.ref.familiar(), image.manifest, tree, readers


def mount_lazy(store: Store, ref_text: str, mountpoint, options, *, registry_options=None, prefetch: str = "none"):
    """Mount *ref_text* from its registry lazily (see the module docs); returns the MountRecord.
    *prefetch* (:data:`PREFETCH_MODES`) fetches pieces in the background while the mount serves."""
    from layerfs.errors import UsageError
    from layerfs.mount import check_mountpoint, mount_tree
    if prefetch not in PREFETCH_MODES:
        raise UsageError(f"unknown prefetch mode {prefetch!r}", hint="use " + ", ".join(PREFETCH_MODES))
    real = check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)
    if options.layer is not None:
        raise UsageError("--layer is not supported with --lazy")
    from types import SimpleNamespace
    here = SimpleNamespace(mountpoint=str(real), pid=os.getpid())
    store.init()
    # prune keeps the caches of running lazy mounts (their status files); until this one has its status
    # (written with this process's pid, replaced by the daemon's below), the gc lock keeps prune away
    with store.lock("gc", shared=True):
        image, manifest, tree, readers = open_lazy_tree(store, ref_text, platform=options.platform,
                                                        registry_options=registry_options)
        _write_status(store, here, readers, prefetch)
    pf = _Prefetcher(readers, prefetch) if prefetch != "none" else None
    if options.foreground:      # serves here until unmounted: the status written above is the mount's
        if pf is not None:
            pf.start(delay=0.5)
        return mount_tree(tree, mountpoint, options, store=store, image=image, manifest_digest=str(manifest.digest))
    if pf is not None:
        pf.arm()
    try:
        record = mount_tree(tree, mountpoint, options, store=store, image=image,
                            manifest_digest=str(manifest.digest))
        _write_status(store, record, readers, prefetch)
    finally:
        if pf is not None:
            pf.disarm()
        with contextlib.suppress(OSError):
            _status_path(store, here.pid).unlink()
    return record
