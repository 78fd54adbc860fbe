"""The file system views: read-only merged tree, union of layers and its cache, writable overlay and its upper format.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "Attr": "inodes", "Overlay": "overlay", "RENAME_EXCHANGE": "hostcalls", "RENAME_NOREPLACE": "hostcalls",
    "UpperDirty": "overlay", "UpperInUse": "overlay", "fd_path": "hostcalls",
    "MergedTree": "tree", "Node": "tree", "ROOT_INO": "tree", "read_sparse": "tree",
    "LazyNodes": "treecache", "TREE_FORMAT_VERSION": "treecache", "load_tree": "treecache", "save_tree": "treecache",
    "tree_cache_current": "treecache", "tree_cache_path": "treecache",
    "build_diff_tree": "difftree", "build_tree": "union", "open_image_tree": "imagetree",
    "META_XATTR_PREFIXES": "upper", "OPAQUE_MARKER": "upper", "OVERRIDE_XATTR": "upper", "Override": "upper",
    "WHITEOUTS_XATTR": "upper", "is_device_whiteout": "upper", "is_opaque_marker": "upper",
    "is_opaque_xattr": "upper", "is_reserved_name": "upper", "parse_override": "upper",
    "parse_whiteout_record": "upper", "whiteout_target": "upper", "work_dir_for": "upper",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.fs.hostcalls import RENAME_EXCHANGE, RENAME_NOREPLACE, fd_path  # noqa: F401
    from layerfs.fs.inodes import Attr  # noqa: F401
    from layerfs.fs.overlay import Overlay, UpperDirty, UpperInUse  # noqa: F401
    from layerfs.fs.tree import MergedTree, Node, ROOT_INO, read_sparse  # noqa: F401
    from layerfs.fs.difftree import build_diff_tree  # noqa: F401
    from layerfs.fs.imagetree import open_image_tree  # noqa: F401
    from layerfs.fs.treecache import LazyNodes, TREE_FORMAT_VERSION, load_tree, save_tree, tree_cache_current, tree_cache_path  # noqa: F401
    from layerfs.fs.union import build_tree  # noqa: F401
    from layerfs.fs.upper import META_XATTR_PREFIXES, OPAQUE_MARKER, OVERRIDE_XATTR, Override, WHITEOUTS_XATTR, is_device_whiteout, is_opaque_marker, is_opaque_xattr, is_reserved_name, parse_override, parse_whiteout_record, whiteout_target, work_dir_for  # noqa: F401
