"""The union view: merge layer indexes into one read-only :class:`~layerfs.fs.tree.MergedTree`.

The OCI image-spec layer rules, seen from the top layer down:

* ``DIR/.wh.NAME`` hides ``DIR/NAME`` (any type, with everything below it)
  of the *lower* layers only; entries of its own layer are never hidden by it.
* ``DIR/.wh..wh..opq`` hides everything of the lower layers below ``DIR``,
  wherever it appears in its layer (before or after ``DIR``'s own entries).
* Whiteout files themselves are never shown (nor other ``.wh..wh.*`` AUFS
  metadata, nor anything below a ``.wh.*`` name).
* A non-directory hides a lower entry of the same path and everything
  below it. A directory over a directory merges; the attributes come from
  the higher one. A directory over a non-directory replaces it.
* A directory a layer never lists but needs as a parent (an implicit
  parent) keeps its attributes from below; if there is nothing below (or a
  non-directory) it is created with mode 0755, owner root, mtime 0.
  Whiteouts and opaque markers never create directories: a whiteout of a
  path that never existed is ignored.
* Entries of a layer below a path the same layer makes a non-directory
  (file, symlink, ...) are ignored, including whiteouts. Symlinks are never
  followed: an upper symlink over a lower directory hides what was below.
* Hard links resolve within their own layer (``./a`` and ``a`` name the
  same target; chains are followed). All names of a link group are one
  inode and ``st_nlink`` counts the names still visible. A link whose
  target is missing from its layer (or is a directory) is skipped with a
  warning.

Inode numbers are assigned depth first in name order, so they are stable for
a given image; directory ``nlink`` is 2 + number of subdirectories.

The merged tree of a stored image, cached, is :func:`layerfs.fs.imagetree.open_image_tree`'s
(cache format: :mod:`layerfs.fs.treecache`); one layer's own tree in the form a container
engine's ``diff/`` directory holds is :func:`layerfs.fs.difftree.build_diff_tree`.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
from typing import Callable, Sequence

from layerfs.fs.tree import ROOT_INO, LayerReader, MergedTree
from layerfs.fs.upper import AUFS_META_PREFIX
from layerfs.image import OPAQUE_WHITEOUT, WHITEOUT_PREFIX
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, LayerIndex

log = logging.getLogger(__name__)

__all__ = ["build_tree", "merge_layers", "to_tree", "layer_tree", "LayerDir", "Merged", "leaf_maker",
           "node_attrs", "merged_mode", "no_cycle_collection"]

# Entry field positions (layerindex.Entry order)
(R_PATH, R_TYPE, R_MODE, R_UID, R_GID, R_SIZE, R_MTIME, R_LINK, R_MAJ, R_MIN, R_OFF, R_XATTR,
 R_SPARSE) = range(13)

_IFMT = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
         BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_MAX_LINK_CHAIN = 64
_BAD_NAMES = frozenset({"", ".", ".."})


# --- one layer as a tree ------------------------------------------------------------

class LayerDir:
    """A directory of one layer: its own entry (None: implicit), children,
    whiteouts and opaque flag. ``real``: the layer puts something here
    (an entry at or below it), so the directory must exist in the union."""

    __slots__ = ("row", "kids", "wh", "opaque", "real")

    def __init__(self, row: tuple | None = None):
        self.row = row
        self.kids: dict[str, LayerDir | tuple] = {}
        self.wh: list[str] = []
        self.opaque = False
        self.real = False


def layer_tree(index: LayerIndex, li: int) -> tuple[LayerDir, dict[int, tuple]]:
    """The layer's entries as a tree; and {id(hard link row): final target row} for its valid links."""
    root = LayerDir()
    links: list[tuple[str, tuple]] = []
    for row in index.rows(keep=False):
        path = row[R_PATH]
        if not path:                          # the root directory itself ("./")
            if row[R_TYPE] == DIR:
                root.row = row
            continue
        parts = path.split("/")
        base = parts.pop()
        if base in _BAD_NAMES:                # not from LayerIndexer (a damaged or foreign index)
            continue
        d = root
        ok = True
        for p in parts:
            k = d.kids.get(p)
            if k is None:
                if p.startswith(WHITEOUT_PREFIX) or p in _BAD_NAMES:   # nothing lives below a whiteout name
                    ok = False
                    break
                k = d.kids[p] = LayerDir()
            elif type(k) is not LayerDir:        # below a non-directory of the same layer
                ok = False
                break
            d = k
        if not ok:
            log.debug("layer %d: ignoring %r below a non-directory of the same layer", li, path)
            continue
        if base.startswith(WHITEOUT_PREFIX):
            if base == OPAQUE_WHITEOUT:
                d.opaque = True
            elif not base.startswith(AUFS_META_PREFIX):
                name = base[len(WHITEOUT_PREFIX):]
                if name and name != "." and name != "..":
                    d.wh.append(name)
            continue
        if row[R_TYPE] == DIR:
            k = d.kids.get(base)
            if type(k) is LayerDir:
                k.row = row
            else:
                d.kids[base] = LayerDir(row)
        else:
            d.kids[base] = row                # replaces an implicit dir made by earlier children
            if row[R_TYPE] == HARDLINK:
                links.append((path, row))
    resolved: dict[int, tuple] = {}
    for path, row in links:
        if _find(root, path) is not row:      # dropped meanwhile (below a non-directory)
            continue
        target = row
        seen = 0
        while target is not None and type(target) is not LayerDir and target[R_TYPE] == HARDLINK \
                and seen < _MAX_LINK_CHAIN:
            target = _find(root, target[R_LINK])
            seen += 1
        if target is None or type(target) is LayerDir or target[R_TYPE] == HARDLINK:
            log.warning("layer %d: skipping hard link %r: its target %r is not a file of the same layer",
                        li, path, row[R_LINK])
            parent = _find(root, path.rpartition("/")[0])
            parent.kids.pop(path.rpartition("/")[2], None)
            continue
        resolved[id(row)] = target
    _mark_real(root)
    return root, resolved


def _mark_real(root: LayerDir) -> None:
    """Set ``real`` on every directory that has an entry of the layer at or below it."""
    order = []
    stack = [root]
    while stack:
        d = stack.pop()
        order.append(d)
        stack.extend(k for k in d.kids.values() if type(k) is LayerDir)
    for d in reversed(order):                 # children before parents
        if d.row is not None or any(type(k) is not LayerDir or k.real for k in d.kids.values()):
            d.real = True
    root.real = True


def _find(root: LayerDir, path: str):
    """The layer tree node (a LayerDir or a row) at *path*, or None."""
    d = root
    if not path:
        return root
    parts = path.split("/")
    for p in parts[:-1]:
        d = d.kids.get(p)
        if type(d) is not LayerDir:
            return None
    return d.kids.get(parts[-1])



# --- the merged tree while it is built -----------------------------------------------

class Merged:
    """A merged node: the row that defines it (None: implicit directory),
    the layer it comes from, and children for directories."""

    __slots__ = ("row", "layer", "kids")

    def __init__(self, row: tuple | None, layer: int, kids: dict | None):
        self.row = row
        self.layer = layer
        self.kids = kids


def leaf_maker(links: dict[int, tuple], layer: int) -> Callable[[tuple], Merged]:
    """The maker of the merged nodes of layer *layer*'s non-directories: one node per link group
    (a hard link's row gives its target's node; *links* from :func:`layer_tree`)."""
    made: dict[int, Merged] = {}              # id(row) -> node

    def leaf(row: tuple) -> Merged:
        if row[R_TYPE] == HARDLINK:
            row = links[id(row)]
        m = made.get(id(row))
        if m is None:
            m = made[id(row)] = Merged(row, layer, None)
        return m
    return leaf


def merge_layer(top: Merged, ltree: LayerDir, links: dict[int, tuple], li: int) -> None:
    leaf = leaf_maker(links, li)
    if ltree.row is not None:
        top.row, top.layer = ltree.row, li
    stack = [(ltree, top)]
    while stack:
        t, m = stack.pop()
        kids = m.kids
        if t.opaque:
            kids.clear()
        for name in t.wh:
            kids.pop(name, None)
        for name, k in t.kids.items():
            if type(k) is LayerDir:
                cur = kids.get(name)
                if not k.real:                # only whiteouts below: apply them where a directory exists
                    if cur is not None and cur.kids is not None:
                        stack.append((k, cur))
                    continue
                if cur is None or cur.kids is None:
                    cur = kids[name] = Merged(k.row, li, {})
                elif k.row is not None:
                    cur.row, cur.layer = k.row, li
                stack.append((k, cur))
            else:
                kids[name] = leaf(k)


def node_attrs(m: Merged) -> dict:
    row = m.row
    if row is None:
        return {}
    t = row[R_TYPE]
    kw = {"uid": row[R_UID], "gid": row[R_GID], "mtime_ns": row[R_MTIME]}
    if row[R_XATTR]:
        kw["xattrs"] = dict(row[R_XATTR])
    if t == FILE:
        kw["size"] = row[R_SIZE]
        if row[R_SIZE] > 0:
            kw["layer"] = m.layer
            kw["offset"] = row[R_OFF]
            if row[R_SPARSE] is not None:
                kw["sparse"] = list(row[R_SPARSE])
    elif t == SYMLINK:
        kw["target"] = row[R_LINK]
        kw["size"] = len(os.fsencode(row[R_LINK]))
    elif t == CHAR or t == BLOCK:
        try:
            kw["rdev"] = os.makedev(row[R_MAJ], row[R_MIN])
        except (OverflowError, ValueError):
            log.warning("device %r: numbers %d,%d out of range", row[R_PATH], row[R_MAJ], row[R_MIN])
    return kw


def merged_mode(m: Merged) -> int:
    row = m.row
    if row is None:
        return stat.S_IFDIR | 0o755
    return _IFMT[row[R_TYPE]] | row[R_MODE]


def build_tree(layers: Sequence[LayerIndex], readers: Sequence[LayerReader]) -> MergedTree:
    """The merged view of *layers* (bottom first, as in the manifest).
    ``readers[i]`` reads layer ``i``'s uncompressed stream."""
    if len(readers) != len(layers):
        raise ValueError("one reader per layer is needed")
    with no_cycle_collection():
        return to_tree(merge_layers(layers), list(readers))


def merge_layers(layers: Sequence[LayerIndex]) -> Merged:
    top = Merged(None, -1, {})
    for li, index in enumerate(layers):
        ltree, links = layer_tree(index, li)
        merge_layer(top, ltree, links, li)
    return top


@contextlib.contextmanager
def no_cycle_collection():
    """Pause Python's cycle collector: building makes millions of objects and no cycles, and each
    full collection would walk all of them again (half the build time of a 500k-entry image)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def to_tree(top: Merged, readers: list) -> MergedTree:
    tree = MergedTree(readers)
    root = tree.nodes[ROOT_INO]
    if top.row is not None:
        for k, v in node_attrs(top).items():
            setattr(root, k, v)
        root.mode = merged_mode(top)
    inos: dict[int, int] = {}             # id(Merged) -> ino, for hard links
    nodes = tree.nodes
    stack = [(top, ROOT_INO)]
    while stack:
        m, ino = stack.pop()
        subdirs = []
        for name in sorted(m.kids):
            c = m.kids[name]
            have = inos.get(id(c))
            if have is not None:
                tree.link(ino, name, have)
                nodes[have].nlink += 1
                continue
            node = tree.add(ino, name, merged_mode(c), **node_attrs(c))
            inos[id(c)] = node.ino
            if c.kids is not None:
                subdirs.append((c, node.ino))
        nodes[ino].nlink = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
        m.kids = m.row = None     # done with: its files (and their records) go while the next are made
    return tree
