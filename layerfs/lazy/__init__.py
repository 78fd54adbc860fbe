"""Lazy layers: remote images opened with their layers served by Range reads before (or without) a
download, the caches of what those reads fetched, and the status of the processes serving them.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "lazy_cache_dir": "cachedir",
    "open_lazy_layers": "image", "open_lazy_tree": "image",
    "PREFETCH_MODES": "prefetch", "Prefetcher": "prefetch",
    "drop_lazy_status": "status", "forget_stale_status": "status", "lazy_status": "status",
    "note_lazy_readers": "status", "prune_lazy": "status", "served_blobs": "status",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.lazy.cachedir import lazy_cache_dir  # noqa: F401
    from layerfs.lazy.image import open_lazy_layers, open_lazy_tree  # noqa: F401
    from layerfs.lazy.prefetch import PREFETCH_MODES, Prefetcher  # noqa: F401
    from layerfs.lazy.status import drop_lazy_status, forget_stale_status, lazy_status, note_lazy_readers, prune_lazy, served_blobs  # noqa: F401
