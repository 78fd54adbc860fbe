"""The union view: merge layer indexes into one read-only :class:`~layerfs.tree.MergedTree`.

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

import contextlib
import itertools
import logging
import operator
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import zstandard

from .errors import UsageError
from .layerindex import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, IndexFormatError, LayerIndex, _Cursor,
                         _U32, _U64, _arr, _col, _strings, load_or_build, open_layer_reader, pack_file, unpack_file)
from .oci import Manifest
from .store import Store, atomic_write
from .tree import ROOT_INO, LayerReader, MergedTree, Node

log = logging.getLogger(__name__)

__all__ = ["build_tree", "build_diff_tree", "OVERLAY_OPAQUE_XATTR", "open_image_tree", "tree_cache_path", "save_tree", "load_tree", "LazyNodes",
           "TREE_FORMAT_VERSION"]

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
    for row in index.rows():
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
    top = _M(None, -1, {})
    for li, index in enumerate(layers):
        ltree, links = _layer_tree(index, li)
        _merge_layer(top, ltree, links, li)
    return _to_tree(top, list(readers))


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
    return tree


# --- the tree cache -------------------------------------------------------------------

TREE_FORMAT_VERSION = 3   # 3: symlinks have mode 0777 (caches of version 2 may hold a tar header's mode)
_TREE_MAGIC = b"LFSTREE\n"


def tree_cache_path(store: Store, manifest: Manifest, layers: int) -> Path:
    d = manifest.digest
    return store.root / "trees" / f"{d.algorithm}-{d.hex}-{layers}.tree"


def _tree_bytes(tree: MergedTree, meta: dict) -> bytes:
    nodes = tree.nodes[1:]
    n = len(nodes)
    modes = [x.mode for x in nodes]
    mt = [x.mtime_ns for x in nodes]
    parts = [_U32.pack(n), _col(modes), _col([x.uid for x in nodes]), _col([x.gid for x in nodes]),
             _col([x.size for x in nodes]), _col([t // 1_000_000_000 for t in mt], True),
             _col([t % 1_000_000_000 for t in mt]), _col([x.rdev for x in nodes]),
             _col([x.nlink for x in nodes]), _col([x.layer + 1 for x in nodes]),
             _col([x.offset for x in nodes]), _col([x.parent for x in nodes])]
    targets = [x.target for x in nodes if x.target is not None]
    t_idx = [i for i, x in enumerate(nodes) if x.target is not None]
    parts += [_U32.pack(len(t_idx)), _arr("I", t_idx), _strings(targets)]
    x_idx, x_cnt, x_names, x_vals = [], [], [], []
    for i, x in enumerate(nodes):
        if x.xattrs:
            x_idx.append(i)
            x_cnt.append(len(x.xattrs))
            x_names.extend(x.xattrs.keys())
            x_vals.extend(x.xattrs.values())
    parts += [_U32.pack(len(x_idx)), _arr("I", x_idx), _arr("I", x_cnt), _U32.pack(len(x_names)),
              _strings(x_names), _arr("I", map(len, x_vals)), b"".join(x_vals)]
    s_idx, s_cnt, s_flat = [], [], []
    for i, x in enumerate(nodes):
        if x.sparse is not None:
            s_idx.append(i)
            s_cnt.append(len(x.sparse))
            for ext in x.sparse:
                s_flat.extend(ext)
    parts += [_U32.pack(len(s_idx)), _arr("I", s_idx), _arr("I", s_cnt), _U64.pack(len(s_flat)),
              _arr("Q", s_flat)]
    inl = [(i, x.inline) for i, x in enumerate(nodes) if x.inline is not None]   # hand-built trees only
    parts += [_U32.pack(len(inl)), _arr("I", [i for i, _ in inl]), _arr("Q", [len(b) for _, b in inl]),
              b"".join(bytes(b) for _, b in inl)]
    # directories in inode order: number of children, then all names and inodes
    dirs = [x for x in nodes if x.children is not None]
    names, inos = [], []
    for x in dirs:
        names.extend(x.children.keys())
        inos.extend(x.children.values())
    parts += [_U32.pack(len(dirs)), _col([x.ino for x in dirs]), _col([len(x.children) for x in dirs]),
              _U32.pack(len(names)), _strings(names), _col(inos)]
    body = zstandard.ZstdCompressor(level=3).compress(b"".join(parts))
    return pack_file(TREE_FORMAT_VERSION, dict(meta, nodes=n), [body], magic=_TREE_MAGIC)


def save_tree(tree: MergedTree, path: Path | str, meta: dict | None = None) -> None:
    """Write the tree's metadata (not its readers) atomically; *meta* (JSON) is checked on load."""
    atomic_write(Path(path), _tree_bytes(tree, meta or {}))


_new_node = Node.__new__


def load_tree(path: Path | str, readers: Sequence[LayerReader], meta: dict | None = None) -> MergedTree:
    """Load a tree written by :func:`save_tree`. Raises FileNotFoundError, or
    :class:`IndexFormatError` when corrupt, of another version, or when its
    meta differs from *meta*. Node objects are made on first access (see
    :class:`LazyNodes`); everything is checked here, up front."""
    with open(path, "rb") as f:
        data = f.read()
    got, (body,) = unpack_file(data, TREE_FORMAT_VERSION, 1, magic=_TREE_MAGIC, what="tree cache")
    want = dict(meta or {})
    if any(got.get(k) != v for k, v in want.items()):
        raise IndexFormatError("tree cache is for other layers")
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 31)
    except zstandard.ZstdError:
        raise IndexFormatError("tree cache is corrupt") from None
    try:
        nodes = LazyNodes(_TreeColumns(raw, got.get("nodes"), len(readers)))
    except (IndexError, KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, IndexFormatError):
            raise
        raise IndexFormatError(f"tree cache is corrupt ({type(e).__name__})") from None
    tree = MergedTree(readers)
    tree.nodes = nodes
    return tree


class _TreeColumns:
    """The decoded (and checked) columns of a tree cache; :meth:`node` makes one Node."""

    def __init__(self, raw: bytes, count, nreaders: int):
        c = _Cursor(raw, "tree cache")
        (n,) = c.unpack(_U32)
        if n != count or n < 1 or n > len(raw):
            raise IndexFormatError("tree cache: bad node count")
        self.n = n
        # arrays, not lists: a node's fields are read when (if) it is first used
        cols = [c.col(n, k == 4, as_list=False) for k in range(11)]
        (self.modes, self.uids, self.gids, self.sizes, self.secs, self.nsecs, self.rdevs, self.nlinks, self.layers,
         self.offsets, self.parents) = cols
        (nt,) = c.unpack(_U32)
        t_idx = c.arr("I", nt)
        self.targets = dict(zip(t_idx, c.strings(nt)))
        (nx,) = c.unpack(_U32)
        x_idx, x_cnt = c.arr("I", nx), c.arr("I", nx)
        (nnames,) = c.unpack(_U32)
        if nnames != sum(x_cnt) or nnames > len(raw):
            raise IndexFormatError("tree cache: bad xattr table")
        self.x_names = c.strings(nnames)
        lens = c.arr("I", nnames)
        self.x_blob = c.take(sum(lens))
        self.x_ends = list(itertools.accumulate(lens))
        self.xattrs = dict(zip(x_idx, zip(itertools.accumulate(x_cnt, initial=0), x_cnt)))
        (ns,) = c.unpack(_U32)
        s_idx, s_cnt = c.arr("I", ns), c.arr("I", ns)
        (nflat,) = c.unpack(_U64)
        if nflat != 3 * sum(s_cnt) or nflat > len(raw):
            raise IndexFormatError("tree cache: bad sparse table")
        self.flat = c.arr("Q", nflat)
        self.sparse = dict(zip(s_idx, zip(itertools.accumulate(s_cnt, initial=0), s_cnt)))
        (ni,) = c.unpack(_U32)
        i_idx, i_len = c.arr("I", ni), c.arr("Q", ni)
        blob = c.take(sum(i_len))
        self.inline = dict(zip(i_idx, (blob[a - n:a] for a, n in zip(itertools.accumulate(i_len), i_len))))
        (nd,) = c.unpack(_U32)
        dir_inos, counts = c.col(nd), c.col(nd)
        (nnames2,) = c.unpack(_U32)
        if nnames2 != sum(counts) or nnames2 > len(raw):
            raise IndexFormatError("tree cache: bad directory table")
        self.names = c.strings(nnames2)
        self.child_inos = c.col(nnames2)
        c.end()
        self.dirs = dict(zip(dir_inos, zip(itertools.accumulate(counts, initial=0), counts)))
        total = n + 1
        if (max(self.parents) >= total or min(self.parents) < 1
                or max(self.child_inos, default=1) >= total or min(self.child_inos, default=1) < 1
                or max(self.layers) > nreaders
                or max(t_idx, default=0) >= n or max(x_idx, default=0) >= n or max(s_idx, default=0) >= n
                or max(i_idx, default=0) >= n):
            raise IndexFormatError("tree cache: reference out of range")
        if len(self.dirs) != nd or ROOT_INO not in self.dirs \
                or not all(0 < i < total and stat.S_ISDIR(self.modes[i - 1]) for i in dir_inos):
            raise IndexFormatError("tree cache: bad directory table")
        # the directories form one tree from the root: each listed exactly once, by its parent
        is_dir = set(dir_inos).__contains__
        seen = {ROOT_INO}
        todo = [ROOT_INO]
        kids, parents, dirs = self.child_inos, self.parents, self.dirs
        while todo:
            d = todo.pop()
            a, cnt = dirs[d]
            for ch in filter(is_dir, kids[a:a + cnt]):
                if ch in seen or parents[ch - 1] != d:
                    raise IndexFormatError("tree cache: directories do not form a tree")
                seen.add(ch)
                todo.append(ch)
        if len(seen) != nd:
            raise IndexFormatError("tree cache: directories do not form a tree")

    def node(self, ino: int) -> Node:
        k = ino - 1
        x = _new_node(Node)
        x.ino = ino
        x.mode = self.modes[k]
        x.uid = self.uids[k]
        x.gid = self.gids[k]
        x.size = self.sizes[k]
        x.mtime_ns = self.secs[k] * 1_000_000_000 + self.nsecs[k]
        x.rdev = self.rdevs[k]
        x.nlink = self.nlinks[k]
        x.target = self.targets.get(k)
        x.layer = self.layers[k] - 1
        x.offset = self.offsets[k]
        x.inline = self.inline.get(k)
        x.parent = self.parents[k]
        xa = self.xattrs.get(k)
        if xa is None:
            x.xattrs = None
        else:
            first, cnt = xa
            ends, blob = self.x_ends, self.x_blob
            x.xattrs = {self.x_names[j]: blob[(ends[j - 1] if j else 0):ends[j]] for j in range(first, first + cnt)}
        sp = self.sparse.get(k)
        if sp is None:
            x.sparse = None
        else:
            a, b = 3 * sp[0], 3 * (sp[0] + sp[1])
            f = self.flat
            x.sparse = list(zip(f[a:b:3], f[a + 1:b:3], f[a + 2:b:3]))
        d = self.dirs.get(ino)
        if d is None:
            x.children = {} if stat.S_ISDIR(x.mode) else None
        else:
            a, b = d[0], d[0] + d[1]
            x.children = dict(zip(self.names[a:b], self.child_inos[a:b]))
        return x


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
    mount does not pay for the inodes it never looks at. Behaves as a plain
    list of Nodes otherwise (every reading list method materialises first);
    thread-safe."""

    __slots__ = ("_cols", "_lock", "_pending")

    def __init__(self, cols: _TreeColumns):
        super().__init__(itertools.repeat(None, cols.n + 1))
        self._cols = cols
        self._lock = threading.Lock()
        self._pending = cols.n

    def _get(self, i: int):
        v = list.__getitem__(self, i)
        if v is None and self._pending:
            n = list.__len__(self)
            j = i + n if i < 0 else i
            if 0 < j <= self._cols.n:
                with self._lock:
                    v = list.__getitem__(self, j)
                    if v is None:
                        v = self._cols.node(j)
                        list.__setitem__(self, j, v)
                        self._pending -= 1
        return v

    def __getitem__(self, i):
        if type(i) is int:
            return self._get(i)
        if isinstance(i, slice):
            for j in range(*i.indices(list.__len__(self))):
                self._get(j)
            return list.__getitem__(self, i)
        return self._get(operator.index(i))

    def materialize(self) -> None:
        """Make every Node now."""
        if self._pending:
            for j in range(1, self._cols.n + 1):
                self._get(j)

    def __iter__(self):
        self.materialize()
        return list.__iter__(self)

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

    Layer indexes come from :func:`~layerfs.layerindex.load_or_build`; the
    merged metadata is computed once per (manifest digest, number of layers)
    and cached in ``ROOT/trees/``; a corrupt or outdated cache is rebuilt."""
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
    readers = [open_layer_reader(store, d, ix) for d, ix in zip(descs, indexes)]
    path = tree_cache_path(store, manifest, n)
    meta = {"manifest": str(manifest.digest), "layers": [str(d.digest) for d in descs]}
    with contextlib.suppress(FileNotFoundError):
        try:
            return load_tree(path, readers, meta)
        except IndexFormatError as e:
            log.warning("tree cache %s: %s; rebuilding", path, e.message)
    tree = build_tree(indexes, readers)
    try:
        save_tree(tree, path, meta)
    except Exception as e:   # a read-only store still mounts, just slower next time
        log.warning("cannot write tree cache %s: %s", path, e)
    return tree
