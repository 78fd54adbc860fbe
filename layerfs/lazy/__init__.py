"""Lazy mounts: layers served by Range reads before (or without) a download.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "forget_stale_status": "image", "lazy_cache_dir": "image", "lazy_status": "image", "mount_lazy": "image",
    "note_lazy_readers": "image", "open_lazy_layers": "image", "open_lazy_tree": "image", "prune_lazy": "image",
    "served_blobs": "image",
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
    from layerfs.lazy.image import forget_stale_status, lazy_cache_dir, lazy_status, mount_lazy, note_lazy_readers, open_lazy_layers, open_lazy_tree, prune_lazy, served_blobs  # noqa: F401
