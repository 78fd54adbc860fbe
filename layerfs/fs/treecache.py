"""The tree cache: a merged tree's metadata on disk (``ROOT/trees/``), in a versioned, xxhash-checked
binary format of columns read in place, so a later mount loads an image's tree without looking at its
layer records; :class:`LazyNodes` makes each Node on first use."""
from __future__ import annotations

import array
import bisect
import itertools
import logging
import operator
import stat
import sys
import threading
from pathlib import Path
from typing import Sequence

import zstandard

from layerfs.fs.tree import ROOT_INO, LayerReader, MergedTree, Node
from layerfs.fs.union import Merged, merged_mode, node_attrs
from layerfs.image import Manifest
from layerfs.index import U32, U64, IndexFormatError, int_col, pack_file, pack_ints, unpack_file
from layerfs.store import Store, atomic_write

log = logging.getLogger(__name__)

__all__ = ["tree_cache_path", "tree_cache_current", "save_tree", "load_tree", "merged_body", "tree_of",
           "LazyNodes", "TREE_FORMAT_VERSION", "RETAIN_NODES"]

#: 4: columns read in place (per-node child ranges, offset tables for strings); 3: symlinks have mode 0777
#: (caches of version 2 may hold a tar header's mode). A cache of another version is rebuilt.
TREE_FORMAT_VERSION = 4
_TREE_MAGIC = b"LFSTREE\n"
#: the most Node objects a tree loaded from the cache keeps made at once: past it they are dropped and
#: made again on their next use, so memory follows what is in use, not the size of the image
RETAIN_NODES = 100_000
#: the most distinct int values (modes, mtimes, parents) a loaded tree's Nodes share (see _TreeTable.node)
SHARED_INTS = 16_384

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


def merged_body(top: Merged) -> tuple[bytes, int]:
    """The uncompressed body for a merged tree, straight from the merge (no Node objects): the same
    inodes, attributes and directory listings as :func:`to_tree` makes. Lets go of each merged
    directory, and the records of its files, once its children are written."""
    def col(code: str) -> array.array:
        return array.array(code)
    modes, uids, gids, sizes, secs, nsecs = col("Q"), col("Q"), col("Q"), col("Q"), col("q"), col("Q")
    rdevs, nlinks, layers, offsets, parents, first, count = (col("Q") for _ in range(7))
    kids, ends, names = col("Q"), col("Q"), bytearray()
    rare = _Rare()

    def add(m: Merged, parent: int) -> int:
        row = len(modes)
        kw = node_attrs(m)
        t = kw.get("mtime_ns", 0)
        modes.append(merged_mode(m))
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
    inos: dict[int, int] = {}             # id(Merged) -> ino, for hard links
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
    return tree_of(raw, got.get("nodes"), readers)


def tree_of(raw: bytes, count, readers: Sequence[LayerReader]) -> MergedTree:
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
        #: one int object per distinct mode, mtime and parent of the Nodes made (few distinct values: a
        #: layer's files share their times), up to SHARED_INTS of them: 28-36 bytes less per field and Node
        self._shared: dict[int, int] = {}
        # references in range (a directory's own list is checked when its Node is made)
        if (max(self.parents) > n or min(self.parents) < 1 or max(self.layers) > nreaders
                or (k and (max(self.kids) > n or min(self.kids) < 1))
                or max(self.first) > k or max(self.count) > k or not stat.S_ISDIR(self.modes[0])):
            raise IndexFormatError("tree cache: reference out of range")

    def node(self, ino: int) -> Node:
        k = ino - 1
        x = _new_node(Node)
        x.ino = ino
        shared = self._shared
        mode = self.modes[k]
        mtime = self.secs[k] * 1_000_000_000 + self.nsecs[k]
        parent = self.parents[k]
        if len(shared) < SHARED_INTS:
            mode = shared.setdefault(mode, mode)
            mtime = shared.setdefault(mtime, mtime)
            parent = shared.setdefault(parent, parent)
        else:
            mode = shared.get(mode, mode)
            mtime = shared.get(mtime, mtime)
            parent = shared.get(parent, parent)
        x.mode = mode
        x.uid = self.uids[k]
        x.gid = self.gids[k]
        x.size = self.sizes[k]
        x.mtime_ns = mtime
        x.rdev = self.rdevs[k]
        x.nlink = self.nlinks[k]
        x.layer = self.layers[k] - 1
        x.offset = self.offsets[k]
        x.parent = parent
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

