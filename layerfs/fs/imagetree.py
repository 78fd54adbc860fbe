"""The merged tree of a stored image: its layer indexes and readers, merged once and then loaded from
the tree cache."""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from layerfs.errors import UsageError
from layerfs.fs.tree import MergedTree
from layerfs.fs.treecache import load_tree, merged_body, save_tree, tree_cache_path, tree_of
from layerfs.fs.union import merge_layers, no_cycle_collection
from layerfs.image import Manifest
from layerfs.index import DEFAULT_CACHE_BYTES, IndexFormatError, SpanCache, load_or_build, open_layer_reader
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = ["open_image_tree"]


def open_image_tree(store: Store, manifest: Manifest, *, upto: int | None = None) -> MergedTree:
    """The merged view of the first *upto* layers of *manifest* (all by default).

    Layer indexes come from :func:`~layerfs.index.load_or_build`; the
    merged metadata is computed once per (manifest digest, number of layers)
    and cached in ``ROOT/trees/``; a corrupt or outdated cache is rebuilt.
    The layers' readers share one cache of decompressed spans (``DEFAULT_CACHE_BYTES`` in all)."""
    total = len(manifest.layers)
    n = total if upto is None else upto
    if not (0 <= n <= total):
        raise UsageError(f"layer {upto} out of range: the image has {total} layers",
                         hint=f"use a number from 0 to {total}")
    descs = manifest.layers[:n]
    if n > 1:   # indexes missing (a store written by another tool): build them in parallel
        with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1, 4)) as pool:
            indexes = list(pool.map(lambda d: load_or_build(store, d), descs))
    else:
        indexes = [load_or_build(store, d) for d in descs]
    cache = SpanCache(DEFAULT_CACHE_BYTES)     # one bound on decompressed spans for all the layers
    readers = [open_layer_reader(store, d, ix, cache=cache) for d, ix in zip(descs, indexes)]
    path = tree_cache_path(store, manifest, n)
    meta = {"manifest": str(manifest.digest), "layers": [str(d.digest) for d in descs]}
    with contextlib.suppress(FileNotFoundError):
        try:
            return load_tree(path, readers, meta)
        except IndexFormatError as e:
            log.warning("tree cache %s: %s; rebuilding", path, e.message)
    with no_cycle_collection():        # built straight into the cache's columns: no object per inode
        raw, count = merged_body(merge_layers(indexes))
    tree = tree_of(raw, count, readers)
    try:
        save_tree(tree, path, meta)
    except Exception as e:   # a read-only store still mounts, just slower next time
        log.warning("cannot write tree cache %s: %s", path, e)
    return tree
