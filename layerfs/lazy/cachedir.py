"""The layout of ``ROOT/lazy``, the lazy caches in the store.

``ROOT/lazy/<alg>-<hex>/`` holds what lazy reads of one layer blob fetched and verified (its readers
own what goes inside: :mod:`layerfs.lazy.stargz`, :mod:`layerfs.lazy.gzipspans`);
``ROOT/lazy/mounts/<pid>.json`` says what a running process serves (:mod:`layerfs.lazy.status`)."""
from __future__ import annotations

from pathlib import Path

from layerfs.image import Digest
from layerfs.store import Store

__all__ = ["lazy_cache_dir", "lazy_root", "status_dir", "status_path"]


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
