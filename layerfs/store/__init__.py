"""The local OCI image layout: blobs, tags, locks, garbage collection.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "ImageRecord": "layout", "Ingest": "layout", "Store": "layout", "atomic_write": "layout", "file_lock": "layout",
    "store_error": "layout", "REPO_DIGEST_ANNOTATION": "layout",
    "SOURCE_MANIFEST_ANNOTATION": "layout",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.store.layout import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, ImageRecord, Ingest, Store, atomic_write, file_lock, store_error  # noqa: F401
