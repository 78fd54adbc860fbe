"""An image plus an upper directory as one merged read-only tree.

:func:`overlay_tree` is the merged view of an image plus an upper directory as one
:class:`~layerfs.fs.tree.MergedTree`: what ``export`` of a mount writes, and the
oracle of what a commit must produce.
"""
from __future__ import annotations

import os
import stat

from layerfs.changes.scan import UpperEntry, UpperScan, open_long
from layerfs.fs import ROOT_INO, MergedTree, Node
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK

__all__ = ["overlay_tree"]


class _HostFile:
    """A LayerReader for one regular file of the upper directory (opened without following symlinks)."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size

    def read(self, offset: int, size: int) -> bytes:
        fd = open_long(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


def _upper_mode(e: UpperEntry) -> int:
    return {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
            BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.kind] | e.mode


def overlay_tree(lower: MergedTree, scan: UpperScan) -> MergedTree:
    """*lower* with the upper directory *scan* on top, as one read-only merged tree.

    The OCI layer rules: a whiteout hides the lower entry, an opaque directory
    everything lower below it, an upper non-directory replaces, an upper
    directory over a lower one merges (attributes from the upper). Files of the
    upper are read from the host. The root keeps the image's attributes (a
    layer never changes them)."""
    out = MergedTree(list(lower.readers))
    root = out.nodes[ROOT_INO]
    lroot = lower.get(ROOT_INO)
    for attr in ("mode", "uid", "gid", "mtime_ns", "xattrs"):
        setattr(root, attr, getattr(lroot, attr))
    made_lower: dict[int, int] = {}
    made_upper: dict[tuple[int, int], int] = {}

    def copy_lower(parent: int, name: str, n: Node) -> Node | None:
        have = made_lower.get(n.ino)
        if have is not None:
            out.link(parent, name, have)
            out.nodes[have].nlink += 1
            return None
        c = out.add(parent, name, n.mode, uid=n.uid, gid=n.gid, size=n.size, mtime_ns=n.mtime_ns, rdev=n.rdev,
                    target=n.target, xattrs=dict(n.xattrs) if n.xattrs else None, layer=n.layer,
                    offset=n.offset, sparse=n.sparse, inline=n.inline)
        if not c.is_dir:
            made_lower[n.ino] = c.ino
        return c

    def add_upper(parent: int, e: UpperEntry) -> Node | None:
        if e.inode is not None:
            have = made_upper.get(e.inode)
            if have is not None:
                out.link(parent, e.name, have)
                out.nodes[have].nlink += 1
                return None
        kw = dict(uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs=dict(e.xattrs) if e.xattrs else None)
        if e.kind == FILE:
            kw["size"] = e.size
            if e.size:
                out.readers.append(_HostFile(e.host, e.size))
                kw["layer"] = len(out.readers) - 1
        elif e.kind == SYMLINK:
            kw["target"] = e.target
            kw["size"] = len(os.fsencode(e.target))
        elif e.kind in (CHAR, BLOCK):
            kw["rdev"] = os.makedev(e.devmajor, e.devminor)
        c = out.add(parent, e.name, _upper_mode(e), **kw)
        if e.inode is not None:
            made_upper[e.inode] = c.ino
        return c

    # (lower dir ino or None, upper dir path or None, output dir ino, lower hidden)
    stack: list[tuple[int | None, str | None, int, bool]] = [
        (ROOT_INO, "", ROOT_INO, scan.dirs[""].opaque is not None)]
    while stack:
        lino, urel, oino, opaque = stack.pop()
        ud = scan.dirs.get(urel) if urel is not None else None
        names: dict[str, tuple[str, object]] = {}
        ln = lower.get(lino) if lino is not None else None
        if ln is not None and ln.children is not None and not opaque:
            for name, ino in ln.children.items():
                if ud is None or name not in ud.whiteouts:
                    names[name] = ("L", ino)
        if ud is not None:
            for name, e in ud.kids.items():
                names[name] = ("U", e)
        subdirs = []
        for name in sorted(names, key=os.fsencode):
            src, obj = names[name]
            if src == "L":
                n = lower.get(obj)
                c = copy_lower(oino, name, n)
                if c is not None and c.is_dir:
                    subdirs.append((obj, None, c.ino, False))
            else:
                e = obj
                c = add_upper(oino, e)
                if c is not None and c.is_dir:
                    below = None
                    if ln is not None and ln.children is not None and not opaque and name in ln.children \
                            and name not in ud.whiteouts:      # beside its whiteout a directory is not merged
                        lk = ln.children[name]
                        if lower.get(lk).is_dir:
                            below = lk
                    subdirs.append((below, e.path, c.ino, scan.dirs[e.path].opaque is not None))
        out.nodes[oino].nlink = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
    return out
