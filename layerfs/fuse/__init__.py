"""Thin FUSE adapters over the native libfuse loop.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "CACHE_TIMEOUT": "readonly", "LayerFS": "readonly", "attributes": "readonly", "fuse_error": "readonly",
    "mount_options": "readonly", "serve": "readonly",
    "serve_overlay": "writable",
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
    from layerfs.fuse.readonly import CACHE_TIMEOUT, LayerFS, attributes, fuse_error, mount_options, serve  # noqa: F401
    from layerfs.fuse.writable import serve_overlay  # noqa: F401
