"""Per-layer indexes: the TOC of a layer's tar and the seek index of its compressed blob.

Glossary -- "index" means five things in layerfs; in this package:
  TOC           the table of contents of one layer's tar, one record per member (:class:`LayerIndex`)
  seek index    checkpoints where inflating a compressed blob can start again (:class:`SeekIndex`)
  image index   an OCI image index (a manifest list): :mod:`layerfs.image`, never this package
  store index   the ``index.json`` of the OCI layout on disk: :mod:`layerfs.store`
  published TOC a TOC + seek index pushed as an OCI artifact: :mod:`layerfs.transfer`

Modules: ``records`` (the TOC record), ``tarscan`` (the streaming tar scanner and its hostility
rules), ``spool`` (records on their way to a TOC), ``columns`` (the column encoding and the index
file container), ``toc`` (:class:`LayerIndex` and its file), ``tocbuild`` (:class:`LayerIndexer`,
the TOCs of the store), ``limits`` (the bound on a layer's size), ``compression`` (compression names,
magic numbers, inflating from a checkpoint), ``seek`` (the seek index format), ``indexers``
(streaming seek indexers), ``spancache`` (inflated spans), ``readers`` (random reads of a blob).

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "CompressedDataError": "compression", "TruncatedStream": "compression", "inflate_at": "compression",
    "sniff_compression": "compression",
    "BadIndex": "seek", "Checkpoint": "seek", "MAX_COMPRESSED_WINDOW": "seek", "SeekIndex": "seek",
    "GzipIndexer": "indexers", "Indexer": "indexers", "ZstdIndexer": "indexers", "build_index": "indexers",
    "DEFAULT_CACHE_BYTES": "spancache", "SpanCache": "spancache",
    "open_reader": "readers",
    "BLOCK": "records", "CHAR": "records", "DIR": "records", "Entry": "records", "FIFO": "records",
    "FILE": "records", "HARDLINK": "records", "SYMLINK": "records", "SYMLINK_MODE": "records",
    "normalize_path": "tarscan",
    "IndexFormatError": "columns", "U32": "columns", "U64": "columns", "encode_columns": "columns",
    "int_col": "columns", "pack_file": "columns", "pack_ints": "columns", "unpack_file": "columns",
    "FORMAT_VERSION": "toc", "LayerIndex": "toc",
    "LayerIndexer": "tocbuild", "index_path": "tocbuild", "layer_facts_from_blob": "tocbuild", "load_or_build": "tocbuild",
    "open_layer_reader": "tocbuild",
    "layer_too_large": "limits", "max_layer_size": "limits",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.index.columns import (  # noqa: F401
        U32,
        U64,
        IndexFormatError,
        encode_columns,
        int_col,
        pack_file,
        pack_ints,
        unpack_file,
    )
    from layerfs.index.compression import CompressedDataError, TruncatedStream, inflate_at, sniff_compression  # noqa: F401
    from layerfs.index.indexers import GzipIndexer, Indexer, ZstdIndexer, build_index  # noqa: F401
    from layerfs.index.limits import layer_too_large, max_layer_size  # noqa: F401
    from layerfs.index.readers import open_reader  # noqa: F401
    from layerfs.index.records import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, SYMLINK_MODE, Entry  # noqa: F401
    from layerfs.index.seek import MAX_COMPRESSED_WINDOW, BadIndex, Checkpoint, SeekIndex  # noqa: F401
    from layerfs.index.spancache import DEFAULT_CACHE_BYTES, SpanCache  # noqa: F401
    from layerfs.index.tarscan import normalize_path  # noqa: F401
    from layerfs.index.toc import FORMAT_VERSION, LayerIndex  # noqa: F401
    from layerfs.index.tocbuild import layer_facts_from_blob, LayerIndexer, index_path, load_or_build, open_layer_reader  # noqa: F401
