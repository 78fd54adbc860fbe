"""The layout of ``ROOT/lazy``, the lazy caches in the store.

``ROOT/lazy/<alg>-<hex>/`` holds what lazy reads of one layer blob fetched and verified:

- an eStargz layer (:mod:`layerfs.lazy.stargz`): ``toc.json`` (the TOC's offset, a newline, the TOC),
  ``data`` (the files' bytes, a sparse file laid out as the layer's private address space) and
  ``chunks.json`` (``{"toc": TOC digest, "chunks": [numbers of the chunks in data]}``, changed under
  ``chunks.lock``): :func:`cached_chunks`, :func:`note_cached_chunk`;
- a gzip layer with a published index (:mod:`layerfs.lazy.gzipspans`): ``index-<alg>-<hex>`` (the index
  head) and ``spans-<16 hex of the head digest>/<n>`` (window and compressed bytes of span *n*):
  :func:`cached_spans`.

``ROOT/lazy/mounts/<pid>.json`` says what a running process serves (:mod:`layerfs.lazy.status`).
This module stays cheap to import: ``layerfs mounts`` and ``prune`` read the caches through it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from layerfs.image import Digest
from layerfs.store import Store, atomic_write, file_lock

__all__ = ["CHUNK_DATA", "cached_chunks", "cached_spans", "lazy_cache_dir", "lazy_root", "note_cached_chunk",
           "status_dir", "status_path"]

#: an eStargz layer's cached file bytes, in its cache directory
CHUNK_DATA = "data"
_CHUNK_MAP = "chunks.json"


def lazy_root(store: Store) -> Path:
    return store.root / "lazy"


def lazy_cache_dir(store: Store, digest: Digest) -> Path:
    """The cache directory of the layer blob *digest*."""
    return lazy_root(store) / f"{digest.algorithm}-{digest.hex}"


def status_dir(store: Store) -> Path:
    """Where the status files of running lazy servers live (never a cache directory: no ``-`` in its name)."""
    return lazy_root(store) / "mounts"


def status_path(store: Store, pid: int) -> Path:
    return status_dir(store) / f"{pid}.json"


def cached_chunks(cache_dir: Path, toc_digest: str) -> set[int]:
    """The chunks (numbers) of an eStargz layer in its cache *cache_dir*, as made for the TOC *toc_digest*."""
    try:
        doc = json.loads((cache_dir / _CHUNK_MAP).read_bytes())
        if doc.get("toc") == toc_digest and (cache_dir / CHUNK_DATA).exists():
            return {int(x) for x in doc.get("chunks", [])}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return set()


def note_cached_chunk(cache_dir: Path, toc_digest: str, have: set[int], new: int) -> set[int]:
    """Record chunk *new* (and *have*) as present in *cache_dir*, with what other processes recorded
    meanwhile; returns all the chunks now recorded. Raises OSError."""
    with file_lock(cache_dir / "chunks.lock"):
        have = cached_chunks(cache_dir, toc_digest) | have | {new}
        atomic_write(cache_dir / _CHUNK_MAP, json.dumps({"toc": toc_digest, "chunks": sorted(have)}).encode())
    return have


def cached_spans(spans_dir: Path) -> int:
    """How many spans a gzip layer's cache directory *spans_dir* (``spans-*``) holds."""
    try:
        return sum(1 for n in os.listdir(spans_dir) if n.isdigit())
    except OSError:
        return 0
