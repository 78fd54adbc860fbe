"""The inodes of the writable overlay: what ``stat`` shows (:class:`Attr`), the directories and files
of the merged view that are no longer plain lower entries (:class:`Dir`, :class:`File`), open files
(:class:`Handle`)."""
from __future__ import annotations

import os
import stat

from layerfs.fs.tree import Node
from layerfs.fs.upper import Override


class Attr:
    """What ``stat`` shows for one inode (``ino`` is the FUSE inode, ``st_ino`` the number shown)."""

    __slots__ = ("ino", "st_ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blocks",
                 "atime_ns", "mtime_ns", "ctime_ns", "unstable_name")

    def __init__(self, ino: int, st_ino: int, mode: int, nlink: int, uid: int, gid: int, rdev: int, size: int,
                 blocks: int, atime_ns: int, mtime_ns: int, ctime_ns: int):
        self.ino = ino
        self.st_ino = st_ino
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.blocks = blocks
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.unstable_name = False     # the name→inode binding may change behind the kernel: no entry caching

    def __repr__(self) -> str:
        return (f"Attr(ino={self.ino}, st_ino={self.st_ino}, mode={oct(self.mode)}, nlink={self.nlink}, "
                f"uid={self.uid}, gid={self.gid}, size={self.size})")


UNKNOWN = object()    # an inode's override not read yet

class Dir:
    """A directory of the merged view."""

    __slots__ = ("ino", "parent", "name", "lower", "upper", "entries", "whiteouts", "opaque", "override", "dead")
    is_dir = True

    def __init__(self, ino: int, parent: int, name: str, lower: Node | None, upper: bool):
        self.ino = ino
        self.parent = parent          # parent Dir's ino (the root is its own parent)
        self.name = name
        self.lower = lower            # lower directory merged in (None: pure upper or opaque)
        self.upper = upper            # the upper directory exists
        self.entries: dict[str, int] | None = None   # merged listing, loaded on first use
        self.whiteouts: dict[str, str] = {}           # whited-out names of the upper dir → WH_* form
        self.opaque = False           # the upper dir holds the opaque marker
        self.override: Override | None | object = UNKNOWN
        self.dead = False


class File:
    """A non-directory of the merged view that is no longer a plain lower file."""

    __slots__ = ("ino", "lower", "upper", "links", "anon_fd", "override", "nopen", "dead", "dead_attr", "wfd")
    is_dir = False

    def __init__(self, ino: int, lower: Node | None, upper: bool):
        self.ino = ino
        self.lower = lower            # the lower file (data and attributes while not copied up)
        self.upper = upper            # an upper file exists (at links, or anon_fd when unlinked)
        self.links: dict[tuple[int, str], None] = {}   # (dir ino, name) of each name (ordered set)
        self.anon_fd: int | None = None   # O_PATH fd of an upper file whose last name was removed while open
        self.override: Override | None | object = UNKNOWN
        self.nopen = 0
        self.dead = False
        self.dead_attr: Attr | None = None   # what fstat shows once its last name is gone (fifos open
                                             # without asking us, so they are never "open" here)
        self.wfd: int | None = None   # the upper file's fd of an open writable handle: attribute calls on
                                      # it need no path walk (fstat, fchown, futimens...)


class Handle:
    """An open file: the upper fd, or None while reading a lower file."""

    __slots__ = ("ino", "fd", "writable", "lower_ino", "link")

    def __init__(self, ino: int, fd: int | None, writable: bool, lower_ino: int,
                 link: tuple[int, str] | None = None):
        self.ino = ino
        self.fd = fd
        self.writable = writable
        self.lower_ino = lower_ino
        self.link = link          # the name a lower hard-linked file was opened by


def node_attr(ino: int, node: Node) -> Attr:
    """The attributes of inode *ino* while it is the plain lower file or directory *node*."""
    mode = node.mode
    size = node.size
    if stat.S_ISLNK(mode) and node.target is not None:
        size = len(os.fsencode(node.target))
    if node.sparse is None:
        blocks = (size + 511) >> 9 if stat.S_ISREG(mode) or stat.S_ISLNK(mode) else 0
    else:
        blocks = (sum(e[1] for e in node.sparse) + 511) >> 9
    t = node.mtime_ns
    a = Attr(ino, ino, mode, node.nlink, node.uid, node.gid, node.rdev, size, blocks, t, t, t)
    a.unstable_name = node.nlink > 1 and not stat.S_ISDIR(mode)
    return a
