"""The read-only tree protocol shared by the union view and the FUSE adapter.

A :class:`MergedTree` is a flat table of :class:`Node` objects indexed by
inode number (``ROOT_INO`` is the root directory). Directory nodes map child
names to inode numbers; file nodes say which layer holds their bytes and at
which offset of that layer's *uncompressed* tar stream. Reading goes through
one :class:`LayerReader` per layer (random access into the stored blob).

The union view (``layerfs.fs.union``) builds a MergedTree from layer indexes; the
FUSE adapter (``layerfs.fuse.readonly``) serves any MergedTree and never looks
further. Tests can build one by hand with :meth:`MergedTree.add`.
"""
from __future__ import annotations

import stat
import threading
from dataclasses import dataclass
from typing import Iterable, Protocol

ROOT_INO = 1

S_IFMT = stat.S_IFMT


class LayerReader(Protocol):
    """Random access into one layer's uncompressed tar stream. Thread-safe; may block."""

    def read(self, offset: int, size: int) -> bytes: ...


class Node:
    """One inode of the merged tree.

    ``mode`` is the full ``st_mode`` (type bits | permission bits incl.
    setuid/setgid/sticky). ``target`` is the symlink target (str, surrogate-escaped).
    ``layer``/``offset`` locate a regular file's data: byte ``offset`` of layer
    ``layer``'s uncompressed stream (``layer`` is -1 for an empty file or a
    file whose bytes are held in ``inline``). ``sparse`` is a list of
    (file_offset, length, stream_offset) extents for sparse files, else None.
    ``children`` maps names to inode numbers for directories (else None).
    """

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "target",
                 "xattrs", "layer", "offset", "sparse", "children", "inline", "parent")

    def __init__(self, ino: int, mode: int, *, uid: int = 0, gid: int = 0, size: int = 0,
                 mtime_ns: int = 0, rdev: int = 0, nlink: int = 1, target: str | None = None,
                 xattrs: dict[str, bytes] | None = None, layer: int = -1, offset: int = 0,
                 sparse: list[tuple[int, int, int]] | None = None, inline: bytes | None = None,
                 parent: int = ROOT_INO):
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.nlink = nlink
        self.target = target
        self.xattrs = xattrs
        self.layer = layer
        self.offset = offset
        self.sparse = sparse
        self.children: dict[str, int] | None = {} if stat.S_ISDIR(mode) else None
        self.inline = inline
        self.parent = parent

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def __repr__(self) -> str:
        return f"Node(ino={self.ino}, mode={oct(self.mode)}, size={self.size})"


@dataclass(frozen=True)
class FsStats:
    total_bytes: int
    total_files: int


class MergedTree:
    """The merged, read-only view of an image: inode table + layer readers."""

    def __init__(self, readers: list[LayerReader] | None = None):
        self.nodes: list[Node | None] = [None]          # index 0 unused
        self.readers: list[LayerReader] = list(readers or [])
        self._lock = threading.Lock()
        root = Node(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, parent=ROOT_INO)
        self.nodes.append(root)

    # -- building ---------------------------------------------------------------------
    def new_ino(self) -> int:
        return len(self.nodes)

    def add(self, parent: int, name: str, mode: int, **kw) -> Node:
        """Append a new node named *name* under directory *parent* (for builders and tests)."""
        ino = len(self.nodes)
        node = Node(ino, mode, parent=parent, **kw)
        self.nodes.append(node)
        p = self.nodes[parent]
        assert p is not None and p.children is not None, "parent is not a directory"
        p.children[name] = ino
        return node

    def link(self, parent: int, name: str, ino: int) -> None:
        """Add another name for an existing inode (hard link)."""
        p = self.nodes[parent]
        assert p is not None and p.children is not None
        p.children[name] = ino

    # -- the protocol the FUSE adapter uses --------------------------------------------
    def get(self, ino: int) -> Node | None:
        if 0 < ino < len(self.nodes):
            return self.nodes[ino]
        return None

    def lookup(self, parent: int, name: str) -> Node | None:
        p = self.get(parent)
        if p is None or p.children is None:
            return None
        if name == ".":
            return p
        if name == "..":
            return self.get(p.parent)
        ino = p.children.get(name)
        return self.nodes[ino] if ino is not None else None

    def readdir(self, ino: int) -> list[tuple[str, int]]:
        p = self.get(ino)
        if p is None or p.children is None:
            return []
        return list(p.children.items())

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file (short at EOF). Blocking."""
        n = self.get(ino)
        if n is None or offset >= n.size or size <= 0:
            return b""
        size = min(size, n.size - offset)
        if n.inline is not None:
            return n.inline[offset:offset + size]
        if n.layer < 0:
            return bytes(size)
        reader = self.readers[n.layer]
        if n.sparse is None:
            return reader.read(n.offset + offset, size)
        return read_sparse(reader, n.sparse, offset, size)

    def statfs(self) -> FsStats:
        fast = getattr(self.nodes, "fs_stats", None)     # a table loaded from the tree cache: from its columns
        if fast is not None:
            return FsStats(*fast())
        total = 0
        files = 0
        for n in self.nodes:
            if n is None:
                continue
            files += 1
            if stat.S_ISREG(n.mode):
                total += n.size
        return FsStats(total, files)

    def walk(self, ino: int = ROOT_INO, prefix: str = "") -> Iterable[tuple[str, Node]]:
        """(path, node) for every name below *ino*, depth first (for tests and export)."""
        node = self.get(ino)
        if node is None or node.children is None:
            return
        for name, child in node.children.items():
            cn = self.nodes[child]
            path = f"{prefix}/{name}" if prefix else name
            yield path, cn
            if cn is not None and cn.children is not None:
                yield from self.walk(child, path)


def read_sparse(reader: LayerReader, extents: list[tuple[int, int, int]], offset: int, size: int) -> bytes:
    """Assemble a sparse file's bytes: data extents from the stream, holes as zeros."""
    out = bytearray(size)
    end = offset + size
    for foff, length, soff in extents:
        lo, hi = max(foff, offset), min(foff + length, end)
        if lo >= hi:
            continue
        data = reader.read(soff + (lo - foff), hi - lo)
        out[lo - offset: lo - offset + len(data)] = data
    return bytes(out)
