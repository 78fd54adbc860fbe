"""The local OCI image layout: blobs, tags, locks, garbage collection.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "ImageRecord": "layout", "Ingest": "layout", "Store": "layout", "atomic_write": "layout", "file_lock": "layout",
    "store_error": "layout", "REPO_DIGEST_ANNOTATION": "layout",
    "SOURCE_MANIFEST_ANNOTATION": "layout",
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
    from layerfs.store.layout import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, ImageRecord, Ingest, Store, atomic_write, file_lock, store_error  # noqa: F401
