"""Remote images opened lazily (``layerfs mount --lazy REF MNT``, the engine layer store).

Nothing is downloaded up front but the manifest and the config; each layer then gets its records
and a reader on its own:

- an eStargz layer (one with the ``containerd.io/snapshot/stargz/toc.digest`` annotation): its
  footer and TOC by Range, its files' chunks on first read (:mod:`layerfs.lazy.stargz`);
- a plain gzip layer whose image has a published index (``layerfs index push``): the index head
  by Range, the spans on first read (:mod:`layerfs.lazy.gzipspans`);
- any other layer, or a gzip layer without a usable index, is pulled whole (logged) and read
  from the store as after a pull.

What lazy reads fetch is verified and kept in ``ROOT/lazy/<alg>-<hex>/``
(:mod:`layerfs.lazy.cachedir`); a fetch that fails or does not verify fails that read with EIO.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from layerfs.errors import ManifestError
from layerfs.fs import build_tree
from layerfs.image import (LAYER_COMPRESSION, Descriptor, Digest, ImageConfig, Manifest, Reference,
    iter_layer_compression)
from layerfs.index import LayerIndex, SpanCache, load_or_build, open_layer_reader
from layerfs.lazy.gzipspans import find_published, open_published
from layerfs.lazy.remote import client_per_process
from layerfs.lazy.stargz import open_estargz
from layerfs.registry import RegistryClient
from layerfs.store import Store
from layerfs.transfer import Puller, PullOptions, check_diff_id, is_estargz

log = logging.getLogger(__name__)

__all__ = ["LazyImage", "LazyImageLayer", "open_lazy_layers", "open_lazy_tree"]


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
    ref: Reference
    manifest: Manifest
    layers: list[LazyImageLayer]
    client: Callable[[], RegistryClient]


def open_lazy_layers(store: Store, ref_text: str, *, platform=None, registry_options=None) -> LazyImage:
    """Open the layers of a remote image lazily where they allow it (see the module docs), each on its own."""
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
    reader_client = client_per_process(ref.registry, registry_options)

    layers: list[LazyImageLayer] = []
    published: list = []                  # [(artifact, blobs, via) or None], looked up once, when needed
    span_cache = SpanCache()
    for i, desc in enumerate(manifest.layers):
        opened = None
        gzip = LAYER_COMPRESSION.get(desc.media_type) == "gzip"
        if is_estargz(desc):
            opened = open_estargz(store, client, reader_client, repo, desc, diff_ids[i])
        elif gzip:
            if not published:
                published.append(find_published(client, repo, manifest))
            opened = open_published(store, client, reader_client, repo, desc, diff_ids[i], published[0],
                                    span_cache)
        if opened is not None:
            idx, reader = opened
        else:
            if not gzip:
                log.warning("layer %s is neither eStargz nor gzip: pulling it whole", desc.digest.short)
            elif published[0] is None:
                log.warning("layer %s is not eStargz and its image has no published index ('layerfs index "
                            "push'): pulling it whole", desc.digest.short)
            if not store.has_blob(desc.digest, desc.size):
                with store.lock("gc", shared=True):
                    puller.download_layer(client, repo, desc, compressions[i], diff_ids[i])
            idx = load_or_build(store, desc)
            check_diff_id(desc, idx.diff_id, diff_ids[i], where=f"{ref.registry}/{repo}")
            reader = open_layer_reader(store, desc, idx)
        layers.append(LazyImageLayer(desc, diff_ids[i], idx, reader, opened is not None))
    return LazyImage(ref, manifest, layers, reader_client)


def open_lazy_tree(store: Store, ref_text: str, *, platform=None, registry_options=None):
    """(image name, manifest, merged tree, lazy readers) of a remote image, mounted lazily."""
    image = open_lazy_layers(store, ref_text, platform=platform, registry_options=registry_options)
    readers = [layer.reader for layer in image.layers]
    tree = build_tree([layer.index for layer in image.layers], readers)
    return image.ref.familiar(), image.manifest, tree, readers
