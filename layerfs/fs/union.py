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

:func:`open_image_tree` caches the merged tree of an image (per manifest
digest and number of layers) in ``ROOT/trees/`` in a versioned, xxhash-checked
binary format, so a later mount loads it without looking at the layer records.
"""
from __future__ import annotations

import array
import bisect
import contextlib
import gc
import itertools
import logging
import operator
import os
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import zstandard

from layerfs.errors import UsageError
from layerfs.fs.tree import ROOT_INO, LayerReader, MergedTree, Node
from layerfs.image import Manifest
from layerfs.index import DEFAULT_CACHE_BYTES, SpanCache
from layerfs.index import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, U32, U64, IndexFormatError, LayerIndex,
    int_col, load_or_build, open_layer_reader, pack_file, pack_ints, unpack_file)
from layerfs.store import Store, atomic_write

log = logging.getLogger(__name__)

__all__ = ["build_tree", "build_diff_tree", "OVERLAY_OPAQUE_XATTR", "open_image_tree", "tree_cache_path",
           "tree_cache_current", "save_tree", "load_tree", "LazyNodes", "TREE_FORMAT_VERSION", "RETAIN_NODES"]

# Entry field positions (layerindex.Entry order)
_P, _T, _MODE, _UID, _GID, _SIZE, _MTIME, _LINK, _MAJ, _MIN, _OFF, _XATTR, _SPARSE = range(13)

_IFMT = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
         BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_WH = ".wh."
_OPQ = ".wh..wh..opq"
_WH_META = ".wh..wh."
_MAX_LINK_CHAIN = 64
_BAD_NAMES = frozenset({"", ".", ".."})


# --- one layer as a tree ------------------------------------------------------------

class _LDir:
    """A directory of one layer: its own entry (None: implicit), children,
    whiteouts and opaque flag. ``real``: the layer puts something here
    (an entry at or below it), so the directory must exist in the union."""

    __slots__ = ("row", "kids", "wh", "opaque", "real")

    def __init__(self, row: tuple | None = None):
        self.row = row
        self.kids: dict[str, _LDir | tuple] = {}
        self.wh: list[str] = []
        self.opaque = False
        self.real = False


def _layer_tree(index: LayerIndex, li: int) -> tuple[_LDir, dict[int, tuple]]:
    """The layer's entries as a tree; and {id(hard link row): final target row} for its valid links."""
    root = _LDir()
    links: list[tuple[str, tuple]] = []
    for row in index.rows(keep=False):
        path = row[_P]
        if not path:                          # the root directory itself ("./")
            if row[_T] == DIR:
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
                if p.startswith(_WH) or p in _BAD_NAMES:   # nothing lives below a whiteout name
                    ok = False
                    break
                k = d.kids[p] = _LDir()
            elif type(k) is not _LDir:        # below a non-directory of the same layer
                ok = False
                break
            d = k
        if not ok:
            log.debug("layer %d: ignoring %r below a non-directory of the same layer", li, path)
            continue
        if base.startswith(_WH):
            if base == _OPQ:
                d.opaque = True
            elif not base.startswith(_WH_META):
                name = base[len(_WH):]
                if name and name != "." and name != "..":
                    d.wh.append(name)
            continue
        if row[_T] == DIR:
            k = d.kids.get(base)
            if type(k) is _LDir:
                k.row = row
            else:
                d.kids[base] = _LDir(row)
        else:
            d.kids[base] = row                # replaces an implicit dir made by earlier children
            if row[_T] == HARDLINK:
                links.append((path, row))
    resolved: dict[int, tuple] = {}
    for path, row in links:
        if _find(root, path) is not row:      # dropped meanwhile (below a non-directory)
            continue
        target = row
        seen = 0
        while target is not None and type(target) is not _LDir and target[_T] == HARDLINK \
                and seen < _MAX_LINK_CHAIN:
            target = _find(root, target[_LINK])
            seen += 1
        if target is None or type(target) is _LDir or target[_T] == HARDLINK:
            log.warning("layer %d: skipping hard link %r: its target %r is not a file of the same layer",
                        li, path, row[_LINK])
            parent = _find(root, path.rpartition("/")[0])
            parent.kids.pop(path.rpartition("/")[2], None)
            continue
        resolved[id(row)] = target
    _mark_real(root)
    return root, resolved


def _mark_real(root: _LDir) -> None:
    """Set ``real`` on every directory that has an entry of the layer at or below it."""
    order = []
    stack = [root]
    while stack:
        d = stack.pop()
        order.append(d)
        stack.extend(k for k in d.kids.values() if type(k) is _LDir)
    for d in reversed(order):                 # children before parents
        if d.row is not None or any(type(k) is not _LDir or k.real for k in d.kids.values()):
            d.real = True
    root.real = True


def _find(root: _LDir, path: str):
    """The layer tree node (a _LDir or a row) at *path*, or None."""
    d = root
    if not path:
        return root
    parts = path.split("/")
    for p in parts[:-1]:
        d = d.kids.get(p)
        if type(d) is not _LDir:
            return None
    return d.kids.get(parts[-1])


# --- the merged tree while it is built -----------------------------------------------

class _M:
    """A merged node: the row that defines it (None: implicit directory),
    the layer it comes from, and children for directories."""

    __slots__ = ("row", "layer", "kids")

    def __init__(self, row: tuple | None, layer: int, kids: dict | None):
        self.row = row
        self.layer = layer
        self.kids = kids


def _merge_layer(top: _M, ltree: _LDir, links: dict[int, tuple], li: int) -> None:
    made: dict[int, _M] = {}              # id(row) -> node: one inode per link group

    def leaf(row: tuple) -> _M:
        if row[_T] == HARDLINK:
            row = links[id(row)]
        m = made.get(id(row))
        if m is None:
            m = made[id(row)] = _M(row, li, None)
        return m

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
            if type(k) is _LDir:
                cur = kids.get(name)
                if not k.real:                # only whiteouts below: apply them where a directory exists
                    if cur is not None and cur.kids is not None:
                        stack.append((k, cur))
                    continue
                if cur is None or cur.kids is None:
                    cur = kids[name] = _M(k.row, li, {})
                elif k.row is not None:
                    cur.row, cur.layer = k.row, li
                stack.append((k, cur))
            else:
                kids[name] = leaf(k)


def _node_attrs(m: _M) -> dict:
    row = m.row
    if row is None:
        return {}
    t = row[_T]
    kw = {"uid": row[_UID], "gid": row[_GID], "mtime_ns": row[_MTIME]}
    if row[_XATTR]:
        kw["xattrs"] = dict(row[_XATTR])
    if t == FILE:
        kw["size"] = row[_SIZE]
        if row[_SIZE] > 0:
            kw["layer"] = m.layer
            kw["offset"] = row[_OFF]
            if row[_SPARSE] is not None:
                kw["sparse"] = list(row[_SPARSE])
    elif t == SYMLINK:
        kw["target"] = row[_LINK]
        kw["size"] = len(os.fsencode(row[_LINK]))
    elif t == CHAR or t == BLOCK:
        try:
            kw["rdev"] = os.makedev(row[_MAJ], row[_MIN])
        except (OverflowError, ValueError):
            log.warning("device %r: numbers %d,%d out of range", row[_P], row[_MAJ], row[_MIN])
    return kw


def _mode(m: _M) -> int:
    row = m.row
    if row is None:
        return stat.S_IFDIR | 0o755
    return _IFMT[row[_T]] | row[_MODE]


def build_tree(layers: Sequence[LayerIndex], readers: Sequence[LayerReader]) -> MergedTree:
    """The merged view of *layers* (bottom first, as in the manifest).
    ``readers[i]`` reads layer ``i``'s uncompressed stream."""
    if len(readers) != len(layers):
        raise ValueError("one reader per layer is needed")
    with _no_cycle_collection():
        return _to_tree(_merge(layers), list(readers))


def _merge(layers: Sequence[LayerIndex]) -> _M:
    top = _M(None, -1, {})
    for li, index in enumerate(layers):
        ltree, links = _layer_tree(index, li)
        _merge_layer(top, ltree, links, li)
    return top


@contextlib.contextmanager
def _no_cycle_collection():
    """Pause Python's cycle collector: building makes millions of objects and no cycles, and each
    full collection would walk all of them again (half the build time of a 500k-entry image)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


#: how an overlay lower directory marks a whiteout (a 0/0 character device) and an opaque directory (this xattr)
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"


def build_diff_tree(index: LayerIndex, reader: LayerReader) -> MergedTree:
    """One layer's own contents in the form of a kernel overlayfs lower directory (what a container
    engine's layer ``diff/`` holds): a ``.wh.NAME`` becomes a 0/0 character device NAME, a
    ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory; everything else is the
    layer's entries as they are (hard links resolved within the layer, implicit parents 0755 root)."""
    ltree, links = _layer_tree(index, 0)
    made: dict[int, _M] = {}

    def leaf(row: tuple) -> _M:
        if row[_T] == HARDLINK:
            row = links[id(row)]
        m = made.get(id(row))
        if m is None:
            m = made[id(row)] = _M(row, 0, None)
        return m

    def dir_row(t: _LDir, path: str) -> tuple | None:
        if not t.opaque:
            return t.row
        row = t.row or (path, DIR, 0o755, 0, 0, 0, 0, None, 0, 0, 0, None, None)
        x = dict(row[_XATTR] or {})
        x[OVERLAY_OPAQUE_XATTR] = b"y"
        return row[:_XATTR] + (x,) + row[_XATTR + 1:]

    top = _M(dir_row(ltree, ""), 0, {})
    stack = [(ltree, top, "")]
    while stack:
        t, m, path = stack.pop()
        for name in t.wh:
            if name not in t.kids:
                wpath = f"{path}/{name}" if path else name
                m.kids[name] = _M((wpath, CHAR, 0, 0, 0, 0, 0, None, 0, 0, 0, None, None), 0, None)
        for name, k in t.kids.items():
            kpath = f"{path}/{name}" if path else name
            if type(k) is _LDir:
                cur = m.kids[name] = _M(dir_row(k, kpath), 0, {})
                stack.append((k, cur, kpath))
            else:
                m.kids[name] = leaf(k)
    return _to_tree(top, [reader])


def _to_tree(top: _M, readers: list) -> MergedTree:
    tree = MergedTree(readers)
    root = tree.nodes[ROOT_INO]
    if top.row is not None:
        for k, v in _node_attrs(top).items():
            setattr(root, k, v)
        root.mode = _mode(top)
    inos: dict[int, int] = {}             # id(_M) -> ino, for hard links
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
            node = tree.add(ino, name, _mode(c), **_node_attrs(c))
            inos[id(c)] = node.ino
            if c.kids is not None:
                subdirs.append((c, node.ino))
        nodes[ino].nlink = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
        m.kids = m.row = None     # done with: its files (and their records) go while the next are made
    return tree


# --- the tree cache -------------------------------------------------------------------

#: 4: columns read in place (per-node child ranges, offset tables for strings); 3: symlinks have mode 0777
#: (caches of version 2 may hold a tar header's mode). A cache of another version is rebuilt.
TREE_FORMAT_VERSION = 4
_TREE_MAGIC = b"LFSTREE\n"
#: the most Node objects a tree loaded from the cache keeps made at once: past it they are dropped and
#: made again on their next use, so memory follows what is in use, not the size of the image
RETAIN_NODES = 100_000

#   The body is one zstd frame (integers little-endian; a "column" is a type code byte + an array of
#   the narrowest type that holds its values; a "table" of m items is a column of m end offsets, a
#   u64 length and the items back to back; "rows" is a u32 count + that many ascending u32 row numbers):
#     u32 n (nodes; row r is inode r + 1, row 0 the root)
#     11 columns of n: mode, uid, gid, size, mtime seconds (signed), nanoseconds, rdev, nlink,
#        layer + 1, data offset, parent inode
#     2 columns of n: first child (in the child table), number of children (0 unless a directory)
#     u32 k; column of k child inodes; table of k child names (each directory's names in its order)
#     symlink targets: rows, table
#     xattrs: rows, column of first name, column of counts, u32 names, table of names, table of values
#     sparse maps: rows, column of first extent, column of counts, u64 3 x extents, u64 array of
#        (file offset, length, stream offset)
#     inline data: rows, table
#   Loading decompresses the body and checks its layout and ranges; a Node is made from it on first use.


def tree_cache_path(store: Store, manifest: Manifest, layers: int) -> Path:
    d = manifest.digest
    return store.root / "trees" / f"{d.algorithm}-{d.hex}-{layers}.tree"


def tree_cache_current(path: Path | str) -> bool:
    """Whether *path* is a tree cache of this format version (its head only: the rest is checked on load)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_TREE_MAGIC) + 4)
    except OSError:
        return False
    return head == _TREE_MAGIC + U32.pack(TREE_FORMAT_VERSION)


def _table(items: list[bytes]) -> bytes:
    return int_col(list(itertools.accumulate(map(len, items)))) + U64.pack(sum(map(len, items))) + b"".join(items)


def _rows(rows: list[int]) -> bytes:
    return U32.pack(len(rows)) + pack_ints("I", rows)


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _tree_bytes(tree: MergedTree, meta: dict) -> bytes:
    nodes = tree.nodes
    if isinstance(nodes, LazyNodes) and list.__len__(nodes) == nodes.cols.n + 1:
        raw, n = nodes.cols.raw, nodes.cols.n        # as loaded (or built by open_image_tree), nothing added
    else:
        raw, n = _nodes_body(nodes[1:])
    body = zstandard.ZstdCompressor(level=3).compress(raw)
    return pack_file(TREE_FORMAT_VERSION, dict(meta, nodes=n), [body], magic=_TREE_MAGIC)


def _nodes_body(nodes: list[Node]) -> tuple[bytes, int]:
    """The uncompressed body for a list of Node objects (inodes 1, 2, ...)."""
    n = len(nodes)
    mt = [x.mtime_ns for x in nodes]
    parts = [U32.pack(n), int_col([x.mode for x in nodes]), int_col([x.uid for x in nodes]),
             int_col([x.gid for x in nodes]), int_col([x.size for x in nodes]),
             int_col([t // 1_000_000_000 for t in mt], True), int_col([t % 1_000_000_000 for t in mt]),
             int_col([x.rdev for x in nodes]), int_col([x.nlink for x in nodes]), int_col([x.layer + 1 for x in nodes]),
             int_col([x.offset for x in nodes]), int_col([x.parent for x in nodes])]
    first, count, kids, names = [], [], [], []
    for x in nodes:
        first.append(len(kids))
        ch = x.children
        count.append(len(ch) if ch else 0)
        if ch:
            names.extend(map(_enc, ch.keys()))
            kids.extend(ch.values())
    parts += [int_col(first), int_col(count), U32.pack(len(kids)), int_col(kids), _table(names)]
    rare = _Rare()
    for i, x in enumerate(nodes):
        rare.add(i, x.target, x.xattrs, x.sparse, x.inline)
    parts.append(rare.encode())
    return b"".join(parts), n


class _Rare:
    """The tables of what few inodes have: symlink targets, xattrs, sparse maps, inline data."""

    def __init__(self) -> None:
        self.t_rows, self.targets = [], []
        self.x_rows, self.x_first, self.x_cnt, self.x_names, self.x_vals = [], [], [], [], []
        self.s_rows, self.s_first, self.s_cnt, self.s_flat = [], [], [], []
        self.i_rows, self.inline = [], []

    def add(self, row: int, target, xattrs, sparse, inline) -> None:
        """Rows are added in ascending order."""
        if target is not None:
            self.t_rows.append(row)
            self.targets.append(_enc(target))
        if xattrs:
            self.x_rows.append(row)
            self.x_first.append(len(self.x_names))
            self.x_cnt.append(len(xattrs))
            self.x_names.extend(map(_enc, xattrs.keys()))
            self.x_vals.extend(map(bytes, xattrs.values()))
        if sparse is not None:
            self.s_rows.append(row)
            self.s_first.append(len(self.s_flat) // 3)
            self.s_cnt.append(len(sparse))
            for ext in sparse:
                self.s_flat.extend(ext)
        if inline is not None:
            self.i_rows.append(row)
            self.inline.append(bytes(inline))

    def encode(self) -> bytes:
        return b"".join([
            _rows(self.t_rows), _table(self.targets),
            _rows(self.x_rows), int_col(self.x_first), int_col(self.x_cnt), U32.pack(len(self.x_names)),
            _table(self.x_names), _table(self.x_vals),
            _rows(self.s_rows), int_col(self.s_first), int_col(self.s_cnt), U64.pack(len(self.s_flat)),
            pack_ints("Q", self.s_flat),
            _rows(self.i_rows), _table(self.inline)])


def _merged_body(top: _M) -> tuple[bytes, int]:
    """The uncompressed body for a merged tree, straight from the merge (no Node objects): the same
    inodes, attributes and directory listings as :func:`_to_tree` makes. Lets go of each merged
    directory, and the records of its files, once its children are written."""
    def col(code: str) -> array.array:
        return array.array(code)
    modes, uids, gids, sizes, secs, nsecs = col("Q"), col("Q"), col("Q"), col("Q"), col("q"), col("Q")
    rdevs, nlinks, layers, offsets, parents, first, count = (col("Q") for _ in range(7))
    kids, ends, names = col("Q"), col("Q"), bytearray()
    rare = _Rare()

    def add(m: _M, parent: int) -> int:
        row = len(modes)
        kw = _node_attrs(m)
        t = kw.get("mtime_ns", 0)
        modes.append(_mode(m))
        uids.append(kw.get("uid", 0))
        gids.append(kw.get("gid", 0))
        sizes.append(kw.get("size", 0))
        secs.append(t // 1_000_000_000)
        nsecs.append(t % 1_000_000_000)
        rdevs.append(kw.get("rdev", 0))
        nlinks.append(1)
        layers.append(kw.get("layer", -1) + 1)
        offsets.append(kw.get("offset", 0))
        parents.append(parent)
        first.append(0)
        count.append(0)
        rare.add(row, kw.get("target"), kw.get("xattrs"), kw.get("sparse"), None)
        return row + 1

    add(top, ROOT_INO)
    inos: dict[int, int] = {}             # id(_M) -> ino, for hard links
    stack = [(top, ROOT_INO)]
    while stack:
        m, ino = stack.pop()
        subdirs = []
        first[ino - 1] = len(kids)
        count[ino - 1] = len(m.kids)
        for name in sorted(m.kids):
            c = m.kids[name]
            have = inos.get(id(c))
            if have is None:
                have = inos[id(c)] = add(c, ino)
                if c.kids is not None:
                    subdirs.append((c, have))
            else:
                nlinks[have - 1] += 1
            kids.append(have)
            names += _enc(name)
            ends.append(len(names))
        nlinks[ino - 1] = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
        m.kids = m.row = None
    n = len(modes)
    parts = [U32.pack(n), *(int_col(c) for c in (modes, uids, gids, sizes)), int_col(secs, True),
             *(int_col(c) for c in (nsecs, rdevs, nlinks, layers, offsets, parents, first, count)),
             U32.pack(len(kids)), int_col(kids), int_col(ends), U64.pack(len(names)), bytes(names), rare.encode()]
    return b"".join(parts), n


def save_tree(tree: MergedTree, path: Path | str, meta: dict | None = None) -> None:
    """Write the tree's metadata (not its readers) atomically; *meta* (JSON) is checked on load."""
    atomic_write(Path(path), _tree_bytes(tree, meta or {}))


_new_node = Node.__new__


def load_tree(path: Path | str, readers: Sequence[LayerReader], meta: dict | None = None) -> MergedTree:
    """Load a tree written by :func:`save_tree`. Raises FileNotFoundError, or
    :class:`IndexFormatError` when corrupt, of another version, or when its
    meta differs from *meta*. Node objects are made on first use (see
    :class:`LazyNodes`) from the columns, which are read in place; the
    layout and the ranges of the references are checked here, up front."""
    with open(path, "rb") as f:
        data = f.read()
    got, (body,) = unpack_file(data, TREE_FORMAT_VERSION, 1, magic=_TREE_MAGIC, what="tree cache")
    del data
    want = dict(meta or {})
    if any(got.get(k) != v for k, v in want.items()):
        raise IndexFormatError("tree cache is for other layers")
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 31)
    except zstandard.ZstdError:
        raise IndexFormatError("tree cache is corrupt") from None
    del body
    return _tree_of(raw, got.get("nodes"), readers)


def _tree_of(raw: bytes, count, readers: Sequence[LayerReader]) -> MergedTree:
    try:
        nodes = LazyNodes(_TreeTable(raw, count, len(readers)))
    except (IndexError, KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, IndexFormatError):
            raise
        raise IndexFormatError(f"tree cache is corrupt ({type(e).__name__})") from None
    tree = MergedTree(readers)
    tree.nodes = nodes
    return tree


class _View:
    """Reads the sections of a decoded tree cache in place (memoryviews, no copies); an overrun raises."""

    __slots__ = ("mv", "pos")

    def __init__(self, raw: bytes):
        self.mv = memoryview(raw)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.mv):
            raise IndexFormatError("tree cache is truncated")
        b = self.mv[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return U64.unpack(self.take(8))[0]

    def arr(self, code: str, n: int):
        size = array.array(code).itemsize
        if n > len(self.mv):
            raise IndexFormatError("tree cache is truncated")
        b = self.take(n * size)
        if sys.byteorder == "big":     # the file is little-endian: a swapped copy
            a = array.array(code)
            a.frombytes(b)
            a.byteswap()
            return a
        return b.cast(code)

    def col(self, n: int, signed: bool = False):
        code = str(self.take(1), "ascii", "replace")
        if code not in ("bhiq" if signed else "BHIQ"):
            raise IndexFormatError("tree cache: bad column type")
        return self.arr(code, n)

    def rows(self, n: int):
        m = self.u32()
        rows = self.arr("I", m)
        if m and (max(rows) >= n or any(a >= b for a, b in zip(rows, rows[1:]))):
            raise IndexFormatError("tree cache: bad row list")
        return rows

    def table(self, m: int) -> tuple:
        ends = self.col(m)
        blob = self.take(self.u64())
        if m and ends[-1] != len(blob):     # (offsets out of order only make damaged names, never overruns)
            raise IndexFormatError("tree cache: bad string table")
        return ends, blob


def _item(table: tuple, i: int) -> memoryview:
    ends, blob = table
    return blob[(ends[i - 1] if i else 0):ends[i]]


def _row(rows, r: int) -> int:
    """The position of row *r* in an ascending row list, or -1."""
    if not rows or r > rows[-1] or r < rows[0]:
        return -1
    j = bisect.bisect_left(rows, r)
    return j if rows[j] == r else -1


class _TreeTable:
    """The columns of a tree cache, read in place; :meth:`node` makes one Node."""

    def __init__(self, raw: bytes, count, nreaders: int):
        v = _View(raw)
        n = v.u32()
        if n != count or n < 1 or n > len(raw):
            raise IndexFormatError("tree cache: bad node count")
        self.n = n
        self.raw = raw
        (self.modes, self.uids, self.gids, self.sizes, self.secs, self.nsecs, self.rdevs, self.nlinks, self.layers,
         self.offsets, self.parents) = [v.col(n, k == 4) for k in range(11)]
        self.first, self.count = v.col(n), v.col(n)
        k = v.u32()
        if k > len(raw):
            raise IndexFormatError("tree cache: bad child table")
        self.kids = v.col(k)
        self.names = v.table(k)
        self.t_rows = v.rows(n)
        self.targets = v.table(len(self.t_rows))
        self.x_rows = v.rows(n)
        nx = len(self.x_rows)
        self.x_first, self.x_cnt = v.col(nx), v.col(nx)
        nnames = v.u32()
        if nnames > len(raw):
            raise IndexFormatError("tree cache: bad xattr table")
        self.x_names, self.x_vals = v.table(nnames), v.table(nnames)
        if nx and max(a + c for a, c in zip(self.x_first, self.x_cnt)) > nnames:
            raise IndexFormatError("tree cache: bad xattr table")
        self.s_rows = v.rows(n)
        ns = len(self.s_rows)
        self.s_first, self.s_cnt = v.col(ns), v.col(ns)
        nflat = v.u64()
        if nflat % 3 or nflat > len(raw):
            raise IndexFormatError("tree cache: bad sparse table")
        self.flat = v.arr("Q", nflat)
        if ns and max(a + c for a, c in zip(self.s_first, self.s_cnt)) * 3 > nflat:
            raise IndexFormatError("tree cache: bad sparse table")
        self.i_rows = v.rows(n)
        self.inline = v.table(len(self.i_rows))
        if v.pos != len(raw):
            raise IndexFormatError("tree cache has trailing bytes")
        self.rare = bool(len(self.t_rows) or len(self.i_rows) or len(self.x_rows) or len(self.s_rows))
        # references in range (a directory's own list is checked when its Node is made)
        if (max(self.parents) > n or min(self.parents) < 1 or max(self.layers) > nreaders
                or (k and (max(self.kids) > n or min(self.kids) < 1))
                or max(self.first) > k or max(self.count) > k or not stat.S_ISDIR(self.modes[0])):
            raise IndexFormatError("tree cache: reference out of range")

    def node(self, ino: int) -> Node:
        k = ino - 1
        x = _new_node(Node)
        x.ino = ino
        x.mode = mode = self.modes[k]
        x.uid = self.uids[k]
        x.gid = self.gids[k]
        x.size = self.sizes[k]
        x.mtime_ns = self.secs[k] * 1_000_000_000 + self.nsecs[k]
        x.rdev = self.rdevs[k]
        x.nlink = self.nlinks[k]
        x.layer = self.layers[k] - 1
        x.offset = self.offsets[k]
        x.parent = self.parents[k]
        x.target = x.inline = x.xattrs = x.sparse = None
        if self.rare:
            self._rare(x, k)
        x.children = self._children(ino, k) if mode & 0o170000 == 0o040000 else None
        return x

    def _rare(self, x: Node, k: int) -> None:
        """Symlink target, inline data, xattrs and sparse map of row *k*, where it has them."""
        j = _row(self.t_rows, k)
        if j >= 0:
            x.target = str(_item(self.targets, j), "utf-8", "surrogateescape")
        j = _row(self.i_rows, k)
        if j >= 0:
            x.inline = bytes(_item(self.inline, j))
        j = _row(self.x_rows, k)
        if j >= 0:
            a = self.x_first[j]
            x.xattrs = {str(_item(self.x_names, i), "utf-8", "surrogateescape"): bytes(_item(self.x_vals, i))
                        for i in range(a, a + self.x_cnt[j])}
        j = _row(self.s_rows, k)
        if j >= 0:
            a, b = 3 * self.s_first[j], 3 * (self.s_first[j] + self.s_cnt[j])
            f = self.flat
            x.sparse = list(zip(f[a:b:3], f[a + 1:b:3], f[a + 2:b:3]))

    def _children(self, ino: int, k: int) -> dict[str, int]:
        a = self.first[k]
        b = a + self.count[k]
        if b > len(self.kids):
            log.warning("tree cache: directory %d lists children beyond the table; shown empty", ino)
            return {}
        ends, blob = self.names
        kids = self.kids[a:b].tolist()
        start = ends[a - 1] if a else 0
        names = [str(blob[s:e], "utf-8", "surrogateescape")
                 for s, e in zip(itertools.chain((start,), ends[a:b - 1]), ends[a:b])]
        out = dict(zip(names, kids))
        # the directories form one tree from the root: a directory is listed by its parent only,
        # which has a lower inode number (inodes are numbered depth first)
        modes, parents = self.modes, self.parents
        bad = [name for name, c in out.items()
               if modes[c - 1] & 0o170000 == 0o040000 and (c <= ino or parents[c - 1] != ino)]
        if bad:
            log.warning("tree cache: directory %d lists %d directories that are not its own; left out", ino, len(bad))
            for name in bad:
                del out[name]
        return out

    def fs_stats(self) -> tuple[int, int]:
        """(bytes in regular files, number of inodes)."""
        reg = stat.S_IFREG
        return sum(s for m, s in zip(self.modes, self.sizes) if m & 0o170000 == reg), self.n


def _materialize_all(method):
    def wrapper(self, *args, **kw):
        self.materialize()
        return method(self, *args, **kw)
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class LazyNodes(list):
    """The inode table of a tree loaded from the cache: a list whose Node
    objects are made on first access (by index, slice, or iteration), so a
    mount does not pay for the inodes it never looks at. At most
    :attr:`retain` of them are kept made at once: past that they are all
    dropped and made again when next used (Nodes are read-only values: an
    equal one comes back, not necessarily the same object). Behaves as a
    plain list of Nodes otherwise (other list methods make every Node
    first); thread-safe."""

    __slots__ = ("cols", "_lock", "_pending", "_made", "retain")

    def __init__(self, cols: _TreeTable, retain: int = RETAIN_NODES):
        super().__init__(itertools.repeat(None, cols.n + 1))
        self.cols = cols
        self._lock = threading.Lock()
        self._pending = cols.n
        self._made = array.array("I")
        self.retain = retain

    def _get(self, i: int):
        v = list.__getitem__(self, i)
        if v is None and self._pending:
            n = list.__len__(self)
            j = i + n if i < 0 else i
            if 0 < j <= self.cols.n:
                with self._lock:
                    v = list.__getitem__(self, j)
                    if v is None:
                        v = self.cols.node(j)
                        if len(self._made) >= self.retain:
                            self._drop()
                        list.__setitem__(self, j, v)
                        self._made.append(j)
                        self._pending -= 1
        return v

    def _drop(self) -> None:
        """Forget every Node made so far (under the lock)."""
        for j in self._made:
            list.__setitem__(self, j, None)
        self._pending += len(self._made)
        self._made = array.array("I")

    def __getitem__(self, i):
        if type(i) is int:
            return self._get(i)
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(list.__len__(self)))]
        return self._get(operator.index(i))

    def materialize(self) -> None:
        """Make every Node now (up to :attr:`retain` of them stay made)."""
        if self._pending:
            for j in range(1, self.cols.n + 1):
                self._get(j)

    def __iter__(self):
        return (self._get(j) for j in range(list.__len__(self)))

    def fs_stats(self) -> tuple[int, int]:
        """(bytes in regular files, number of inodes), from the columns (no Node is made)."""
        total, files = self.cols.fs_stats()
        for x in list.__getitem__(self, slice(self.cols.n + 1, None)):   # added by hand after loading
            if x is not None:
                files += 1
                if stat.S_ISREG(x.mode):
                    total += x.size
        return total, files

    __reversed__ = _materialize_all(list.__reversed__)
    __contains__ = _materialize_all(list.__contains__)
    __eq__ = _materialize_all(list.__eq__)
    __ne__ = _materialize_all(list.__ne__)
    __repr__ = _materialize_all(list.__repr__)
    __reduce_ex__ = _materialize_all(list.__reduce_ex__)
    __add__ = _materialize_all(list.__add__)
    __mul__ = _materialize_all(list.__mul__)
    copy = _materialize_all(list.copy)
    index = _materialize_all(list.index)
    count = _materialize_all(list.count)
    pop = _materialize_all(list.pop)
    sort = _materialize_all(list.sort)
    reverse = _materialize_all(list.reverse)
    insert = _materialize_all(list.insert)
    remove = _materialize_all(list.remove)
    __hash__ = None


# --- images -----------------------------------------------------------------------------

def open_image_tree(store: Store, manifest: Manifest, *, upto: int | None = None) -> MergedTree:
    """The merged view of the first *upto* layers of *manifest* (all by default).

    Layer indexes come from :func:`~layerfs.index.layerindex.load_or_build`; the
    merged metadata is computed once per (manifest digest, number of layers)
    and cached in ``ROOT/trees/``; a corrupt or outdated cache is rebuilt.
    The layers' readers share one cache of decompressed spans (``DEFAULT_CACHE_BYTES`` in all)."""
    total = len(manifest.layers)
    n = total if upto is None else upto
    if not (0 <= n <= total):
        raise UsageError(f"layer {upto} out of range: the image has {total} layers",
                         hint=f"use a number from 0 to {total}")
    descs = manifest.layers[:n]
    if n > 1:   # indexes missing (a store written by another tool): build them in parallel
        with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1, 4)) as pool:
            indexes = list(pool.map(lambda d: load_or_build(store, d), descs))
    else:
        indexes = [load_or_build(store, d) for d in descs]
    cache = SpanCache(DEFAULT_CACHE_BYTES)     # one bound on decompressed spans for all the layers
    readers = [open_layer_reader(store, d, ix, cache=cache) for d, ix in zip(descs, indexes)]
    path = tree_cache_path(store, manifest, n)
    meta = {"manifest": str(manifest.digest), "layers": [str(d.digest) for d in descs]}
    with contextlib.suppress(FileNotFoundError):
        try:
            return load_tree(path, readers, meta)
        except IndexFormatError as e:
            log.warning("tree cache %s: %s; rebuilding", path, e.message)
    with _no_cycle_collection():        # built straight into the cache's columns: no object per inode
        raw, count = _merged_body(_merge(indexes))
    tree = _tree_of(raw, count, readers)
    try:
        save_tree(tree, path, meta)
    except Exception as e:   # a read-only store still mounts, just slower next time
        log.warning("cannot write tree cache %s: %s", path, e)
    return tree
