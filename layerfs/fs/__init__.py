"""The file system views: read-only merged tree, union of layers, writable overlay and its upper format.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "Attr": "overlay", "OPAQUE_MARKER": "overlay", "OVERRIDE_XATTR": "overlay", "Overlay": "overlay",
    "RENAME_EXCHANGE": "overlay", "RENAME_NOREPLACE": "overlay", "UpperDirty": "overlay", "UpperInUse": "overlay",
    "WHITEOUTS_XATTR": "overlay", "fd_path": "overlay", "parse_whiteout_record": "overlay",
    "work_dir_for": "overlay",
    "MergedTree": "tree", "Node": "tree", "ROOT_INO": "tree", "read_sparse": "tree",
    "LazyNodes": "union", "TREE_FORMAT_VERSION": "union", "build_diff_tree": "union", "build_tree": "union",
    "load_tree": "union", "open_image_tree": "union", "save_tree": "union", "tree_cache_current": "union",
    "tree_cache_path": "union",
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
    from layerfs.fs.overlay import Attr, OPAQUE_MARKER, OVERRIDE_XATTR, Overlay, RENAME_EXCHANGE, RENAME_NOREPLACE, UpperDirty, UpperInUse, WHITEOUTS_XATTR, fd_path, parse_whiteout_record, work_dir_for  # noqa: F401
    from layerfs.fs.tree import MergedTree, Node, ROOT_INO, read_sparse  # noqa: F401
    from layerfs.fs.union import LazyNodes, TREE_FORMAT_VERSION, build_diff_tree, build_tree, load_tree, open_image_tree, save_tree, tree_cache_current, tree_cache_path  # noqa: F401
