"""eStargz layers read lazily: the TOC, the records and file table made from it, the chunk reader.

Nothing of an eStargz layer (one with the ``containerd.io/snapshot/stargz/toc.digest``
annotation) is fetched up front but its footer and TOC, by Range; the TOC is checked against
the annotation (:func:`fetch_toc`) and becomes the layer's records (:func:`toc_records`), so
:func:`layerfs.fs.union.build_tree` merges lazy and ordinary layers alike.

The reader (:class:`LazyLayer`) serves the layer's files from a private address space: file *k*
occupies ``[base_k, base_k + size_k)`` (the records' ``offset`` points there, not into the tar
stream). A read fetches the gzip member of each chunk it touches by Range, inflates it, checks
``chunkDigest`` and stores the verified bytes in the layer's cache in the store
(``ROOT/lazy/<alg>-<hex>/data``, a sparse file laid out as that address space, plus
``chunks.json``: the chunks present, see :mod:`layerfs.lazy.cachedir`), which later reads and later
mounts use. A fetch that fails or does not verify fails that read with EIO; nothing is cached
from it and the mount goes on.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable

from layerfs.errors import DigestMismatch
from layerfs.image import Descriptor, Digest
from layerfs.index import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, SYMLINK_MODE, Entry, LayerIndex,
    layer_too_large, max_layer_size, normalize_path)
from layerfs.lazy.cachedir import CHUNK_DATA, cached_chunks, lazy_cache_dir, note_cached_chunk
from layerfs.lazy.remote import LazyReadError, RemoteBlob
from layerfs.registry import RegistryClient
from layerfs.store import Store, atomic_write
from layerfs.transfer import (FOOTER_SIZE, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
    EStargzError, parse_footer, parse_rfc3339_ns, parse_toc_member)

log = logging.getLogger(__name__)

__all__ = ["LANDMARK", "NO_LANDMARK", "LazyLayer", "fetch_toc", "open_estargz", "toc_records"]

_TYPES = {"reg": FILE, "dir": DIR, "symlink": SYMLINK, "hardlink": HARDLINK, "char": CHAR, "block": BLOCK,
          "fifo": FIFO}
_MAX_TOC = 256 << 20
_INFLATE_PIECE = 4 << 20     # a chunk is inflated into the cache this much at a time
#: prefetch "landmark" fetches the files a TOC lists before this one (none if the TOC has NO_LANDMARK)
LANDMARK = ".prefetch.landmark"
NO_LANDMARK = ".no.prefetch.landmark"


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


def toc_records(toc: dict, toc_json: bytes, toc_offset: int, where: str) -> tuple[list[Entry], list[_File]]:
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


def fetch_toc(store: Store, client: RegistryClient, repository: str, desc: Descriptor) -> tuple[bytes, dict, int]:
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
        raise DigestMismatch(f"{where}: TOC digest is {got}, the manifest says {want}", where=where)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, b"%d\n" % toc_off + js)
    return js, toc, toc_off


def open_estargz(store: Store, client: RegistryClient, reader_client: Callable[[], RegistryClient], repo: str,
                 desc: Descriptor, diff_id: Digest) -> tuple[LayerIndex, "LazyLayer"]:
    """(records, reader) of an eStargz layer: its TOC is fetched (or read from the cache) with *client*;
    the reader fetches with *reader_client* (see :func:`layerfs.lazy.remote.client_per_process`)."""
    js, toc, toc_off = fetch_toc(store, client, repo, desc)
    where = f"layer {desc.digest.short}"
    entries, files = toc_records(toc, js, toc_off, where)
    limit = max_layer_size(desc.size)
    if sum(f.size for f in files) > limit:     # as a pull would stop: the lazy cache fills up to that
        raise layer_too_large(desc.digest, limit, where=where)
    usize = int((desc.annotations or {}).get(UNCOMPRESSED_SIZE_ANNOTATION) or 0)
    idx = LayerIndex(entries, diff_id=diff_id, size=usize, compression="gzip", checkpoints=b"",
                     digest=desc.digest, compressed_size=desc.size)
    reader = LazyLayer(store, reader_client, repo, desc, files, desc.annotations[TOC_DIGEST_ANNOTATION])
    log.info("layer %s: eStargz, %d entries, mounted lazily", desc.digest.short, len(entries))
    return idx, reader


class LazyLayer:
    """The LayerReader of one eStargz layer: Range fetches on first read, verified, cached in the store."""

    def __init__(self, store: Store, client: Callable[[], RegistryClient], repository: str, desc: Descriptor,
                 files: list[_File], toc_digest: str):
        self.store = store
        self.blob = RemoteBlob(client, repository, desc)
        self.desc = desc
        self.files = files
        self._bases = [f.base for f in files]
        self.dir = lazy_cache_dir(store, desc.digest)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._data_path = self.dir / CHUNK_DATA
        self.toc_digest = toc_digest
        self._lock = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self._have: set[int] = self._load_map()
        self.last_demand = 0.0

    @property
    def fetched_bytes(self) -> int:
        return self.blob.fetched_bytes

    def status_entry(self) -> dict:
        """This layer in a status file (:mod:`layerfs.lazy.status`)."""
        return {"digest": str(self.desc.digest), "kind": "estargz", "dir": str(self.dir), "toc": self.toc_digest,
                "pieces": self.pieces}

    # -- background fetch (see layerfs.lazy.prefetch) -------------------------------------------
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
        return cached_chunks(self.dir, self.toc_digest)

    def _save_map(self, new: int) -> None:
        with self._lock:
            self._have = note_cached_chunk(self.dir, self.toc_digest, self._have, new)

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
            raw = self.blob.read(c.start, c.end, where)
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

