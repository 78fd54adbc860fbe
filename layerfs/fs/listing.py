"""The merged view of the overlay, read: directory listings (upper entries, whiteouts and the opaque
marker over the lower directory) and the attributes of every inode."""
from __future__ import annotations

import errno
import logging
import os
import stat

from layerfs.fs.dirfds import request
from layerfs.fs.hostcalls import loc_stat, os_error, xattr_target
from layerfs.fs.inodes import UNKNOWN, Attr, Dir, File, node_attr
from layerfs.fs.tree import Node
from layerfs.fs.upper import (
    NAME_MAX,
    OVERRIDE_XATTR,
    WH_DEVICE,
    WH_FILE,
    WH_RECORD,
    WHITEOUTS_XATTR,
    Override,
    is_device_whiteout,
    is_opaque_marker,
    is_reserved_name,
    parse_override,
    parse_whiteout_record,
    whiteout_target,
)

log = logging.getLogger(__name__)


class Listing:
    """Reading the merged view: directory listings and attributes (a part of :class:`~layerfs.fs.overlay.Overlay`)."""

    # -- merged directory listings ----------------------------------------------------------------
    def entries_of(self, d: Dir) -> dict[str, int]:
        if d.entries is not None:
            return d.entries
        entries: dict[str, int] = {}
        upper: dict[str, os.stat_result | None] = {}    # name → stat (None: a directory)
        if d.upper:
            try:
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dirfds.get(d))
            except FileNotFoundError:
                log.warning("upper directory of %r vanished", d.name)
                d.upper = False
            else:
                try:
                    self._scan_upper_dir(d, rfd, upper)
                finally:
                    os.close(rfd)
        if d.opaque:
            d.lower = None
        lower = d.lower
        if lower is not None and lower.children:
            nodes = self.nodes
            wh = d.whiteouts
            for name, lino in lower.children.items():
                if name in upper or name in wh:
                    continue
                node = nodes[lino]
                assert node is not None
                if node.is_dir:
                    self.inodes[lino] = Dir(lino, d.ino, name, node, False)
                    entries[name] = lino
                elif node.nlink > 1:    # one inode for all its lower names, until one is copied up
                    aid = self.alias.get(lino, lino)
                    f = self.inodes.get(aid)
                    if not isinstance(f, File):
                        f = File(aid, node, False)
                        self.inodes[aid] = f
                    f.links[(d.ino, name)] = None
                    entries[name] = aid
                else:
                    entries[name] = lino
        for name, st in upper.items():
            entries[name] = self._upper_child(d, name, st)
        d.entries = entries
        return entries

    def _scan_upper_dir(self, d: Dir, rfd: int, upper: dict[str, os.stat_result | None]) -> None:
        """Read the upper directory open at *rfd*: entries into *upper*, whiteouts and opaque marker into *d*."""
        wh = d.whiteouts
        with os.scandir(rfd) as it:
            for e in it:
                name = e.name
                if is_reserved_name(name):     # never shown; a regular file may be a whiteout or the marker
                    try:
                        mode = stat.S_IFREG if e.is_file(follow_symlinks=False) else 0
                    except OSError:
                        continue
                    victim = whiteout_target(name, mode)
                    if victim is not None:
                        wh[victim] = WH_FILE
                    elif is_opaque_marker(name, mode):
                        d.opaque = True
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        upper[name] = None
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if is_device_whiteout(st.st_mode, st.st_rdev):
                    wh[name] = WH_DEVICE
                    continue
                upper[name] = st
            try:
                record = os.getxattr(rfd, WHITEOUTS_XATTR)
            except OSError:
                record = b""
        for name in parse_whiteout_record(record):
            wh.setdefault(name, WH_RECORD)

    def lower_child(self, d: Dir, name: str) -> Node | None:
        """The lower entry *name* of *d* that a new upper entry would hide (whiteouts aside)."""
        if d.lower is None or not d.lower.children:
            return None
        lino = d.lower.children.get(name)
        return self.nodes[lino] if lino is not None else None

    def _upper_child(self, d: Dir, name: str, st: os.stat_result | None) -> int:
        is_dir = st is None
        lower = None if name in d.whiteouts else self.lower_child(d, name)
        if is_dir:
            ldir = lower if lower is not None and lower.is_dir else None
            ino = ldir.ino if ldir is not None else self.new_ino()
            self.inodes[ino] = Dir(ino, d.ino, name, ldir, True)
            return ino
        assert st is not None
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.upper_inos:
            ino = self.upper_inos[key]
            f = self.inodes[ino]
        else:
            ino = self.new_ino()
            f = File(ino, None, True)
            self.inodes[ino] = f
            if st.st_nlink > 1:
                self.upper_inos[key] = ino
        f.links[(d.ino, name)] = None  # type: ignore[union-attr]
        return ino

    # -- attributes ----------------------------------------------------------------------------------
    def _override(self, i: Dir | File, loc, st: os.stat_result) -> Override | None:
        if i.override is UNKNOWN:
            ov = None
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                target, kw = xattr_target(loc)
                try:
                    raw = os.getxattr(target, OVERRIDE_XATTR, **kw)
                except OSError:
                    raw = None
                if raw is not None:
                    ov = parse_override(raw, file_mode=st.st_mode, where=self._where(i))
            i.override = ov
        return i.override  # type: ignore[return-value]

    def _where(self, i: Dir | File) -> str:
        """*i*'s upper entry, for a log line."""
        name = i.name if isinstance(i, Dir) else next((n for _, n in i.links), "(unlinked)")
        return f"upper {self.upper_root}: {name!r}"

    def upper_attr(self, i: Dir | File, loc, st: os.stat_result | None = None, *,
                   nlink: int | None = None) -> Attr:
        if st is None:
            st = loc_stat(loc)
        mode, uid, gid, rdev, size = st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_size
        ov = self._override(i, loc, st)
        if ov is not None:
            uid, gid = ov.uid, ov.gid
            if ov.ftype is not None:
                mode, rdev, size = ov.ftype | ov.mode, ov.rdev, 0
            else:
                mode = stat.S_IFMT(mode) | ov.mode
        return Attr(i.ino, i.ino, mode, st.st_nlink if nlink is None else nlink, uid, gid, rdev, size,
                    st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def attr_of(self, ino: int) -> Attr:
        i = self.inode_of(ino)
        if isinstance(i, Node):
            return node_attr(ino, i)
        if isinstance(i, Dir):
            if i.upper and not i.dead:
                if i.lower is not None and i.entries is None:
                    self.entries_of(i)      # learn whether it is opaque
                return self.upper_attr(i, (self.dirfds.get(i), ""), nlink=1 if i.lower is not None else None)
            if i.lower is not None:
                a = node_attr(ino, i.lower)
                if i.dead:
                    a.nlink = 0
                return a
            raise os_error(errno.ENOENT)
        if i.upper:
            if i.links:
                if i.wfd is not None:
                    return self.upper_attr(i, i.wfd, os.fstat(i.wfd))
                return self.upper_attr(i, self.file_loc(i))
            if i.anon_fd is not None:
                return self.upper_attr(i, (i.anon_fd, ""))
            if i.dead_attr is not None:
                return i.dead_attr
            raise os_error(errno.ENOENT)
        return node_attr(ino, i.lower)  # type: ignore[arg-type]

    @request
    def getattr(self, ino: int) -> Attr:
        return self.attr_of(ino)

    @request
    def lookup(self, parent: int, name: str) -> Attr:
        d = self.dir_inode(parent)
        if name == ".":
            return self.attr_of(parent)
        if name == "..":
            return self.attr_of(d.parent)
        ino = self.entries_of(d).get(name)
        if ino is None:
            if len(name) > NAME_MAX // 4 and len(os.fsencode(name)) > NAME_MAX:
                raise os_error(errno.ENAMETOOLONG)     # as the upper file system's lookup says
            raise os_error(errno.ENOENT)
        a = self.attr_of(ino)
        if a.unstable_name:
            self.last_name[ino] = (d.ino, name)
        return a

    @request
    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """Every entry of directory *ino* with its attributes (without ``.`` and ``..``)."""
        d = self.dir_inode(ino)
        if d.dead:
            return []
        return [(name, self.attr_of(child)) for name, child in list(self.entries_of(d).items())]

    @request
    def listdir(self, ino: int) -> list[tuple[str, int]]:
        d = self.dir_inode(ino)
        return [] if d.dead else list(self.entries_of(d).items())

    def parent_of(self, ino: int) -> int:
        return self.dir_inode(ino).parent

    @request
    def readlink(self, ino: int) -> str:
        i = self.inode_of(ino)
        if isinstance(i, Dir):
            raise os_error(errno.EINVAL)
        if isinstance(i, File) and i.upper:
            if i.links:
                dfd, name = self.file_loc(i)
                return os.readlink(name, dir_fd=dfd)
            raise os_error(errno.EINVAL)
        node = i if isinstance(i, Node) else i.lower
        if node is None or not stat.S_ISLNK(node.mode) or node.target is None:
            raise os_error(errno.EINVAL)
        return node.target
