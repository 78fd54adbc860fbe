"""Thin FUSE adapters over the native libfuse loop.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "CACHE_TIMEOUT": "readonly", "LayerFS": "readonly", "attributes": "readonly", "fuse_error": "readonly",
    "mount_options": "readonly", "serve": "readonly",
    "serve_overlay": "writable",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.fuse.readonly import CACHE_TIMEOUT, LayerFS, attributes, fuse_error, mount_options, serve  # noqa: F401
    from layerfs.fuse.writable import serve_overlay  # noqa: F401
