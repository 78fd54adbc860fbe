"""Per-layer indexes: the tar table of contents and its column format, compressed-blob seek points.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "BadIndex": "gzindex", "Checkpoint": "gzindex", "CompressedDataError": "gzindex",
    "DEFAULT_CACHE_BYTES": "gzindex", "GzipIndexer": "gzindex", "Indexer": "gzindex", "SeekIndex": "gzindex",
    "SpanCache": "gzindex", "TruncatedStream": "gzindex", "ZstdIndexer": "gzindex", "build_index": "gzindex",
    "open_reader": "gzindex",
    "BLOCK": "layerindex", "CHAR": "layerindex", "DIR": "layerindex", "Entry": "layerindex", "FIFO": "layerindex",
    "FILE": "layerindex", "FORMAT_VERSION": "layerindex", "HARDLINK": "layerindex", "IndexFormatError": "layerindex",
    "LayerIndex": "layerindex", "LayerIndexer": "layerindex", "SYMLINK": "layerindex", "SYMLINK_MODE": "layerindex",
    "U32": "layerindex", "U64": "layerindex", "encode_columns": "layerindex", "index_path": "layerindex",
    "int_col": "layerindex", "layer_too_large": "layerindex", "load_or_build": "layerindex",
    "max_layer_size": "layerindex", "normalize_path": "layerindex", "open_layer_reader": "layerindex",
    "pack_file": "layerindex", "pack_ints": "layerindex", "unpack_file": "layerindex",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__, not importlib.import_module: the import statement's path, which -X importtime reports
    value = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from layerfs.index.gzindex import BadIndex, Checkpoint, CompressedDataError, DEFAULT_CACHE_BYTES, GzipIndexer, Indexer, SeekIndex, SpanCache, TruncatedStream, ZstdIndexer, build_index, open_reader  # noqa: F401
    from layerfs.index.layerindex import BLOCK, CHAR, DIR, Entry, FIFO, FILE, FORMAT_VERSION, HARDLINK, IndexFormatError, LayerIndex, LayerIndexer, SYMLINK, SYMLINK_MODE, U32, U64, encode_columns, index_path, int_col, layer_too_large, load_or_build, max_layer_size, normalize_path, open_layer_reader, pack_file, pack_ints, unpack_file  # noqa: F401
