"""The writable overlay: a read-only :class:`~layerfs.fs.tree.MergedTree` plus an upper directory.

A plain Python object (no FUSE import): the FUSE adapter
(:mod:`layerfs.fuse.writable`) maps requests onto it, tests drive it
directly. Its API is inode based like FUSE's low-level protocol::

    ovl = Overlay(tree, "/var/lib/layerfs/uppers/ab12/upper")
    a = ovl.lookup(ROOT_INO, "etc")                   # Attr (st_* fields), raises OSError(ENOENT)
    fh, attr = ovl.create(a.ino, "new", 0o644, os.O_WRONLY, uid=0, gid=0)
    ovl.write(fh, 0, b"hi\\n"); ovl.release(fh)
    ovl.unlink(a.ino, "motd")                         # writes the whiteout upper/etc/.wh.motd
    ovl.close()

:class:`Overlay` is this module's setup, inode table and work directory, composed with one mixin
per concern: :mod:`layerfs.fs.listing` (listings and attributes), :mod:`layerfs.fs.copyup`
(copy-up, index=on), :mod:`layerfs.fs.naming` (creating and removing names, whiteouts),
:mod:`layerfs.fs.renames`, :mod:`layerfs.fs.dataops` (setattr, xattrs, open files). Inode types
live in :mod:`layerfs.fs.inodes`, upper directory fds in :mod:`layerfs.fs.dirfds`, host calls in
:mod:`layerfs.fs.hostcalls`; the upper directory's format is defined by :mod:`layerfs.fs.upper`.

Every failure is an :class:`OSError` with the errno the kernel's overlayfs
gives for the same call (checked against it by tests/fuse/test_overlay_kernel_diff.py).

Semantics (kernel overlayfs as on this machine: index=off or index=on, redirect_dir=off, metacopy=off)
-----------------------------------------------------------------------------------------
* copy-up before the first change of a lower entry (open for writing or with
  O_TRUNC, setattr, set/remove xattr, link, rename; parents when an entry is
  created or removed in them): data, mode, owner, times and xattrs are written
  to a temporary in the work dir, fsync'ed and renamed into place, so a crash
  never shows a half-copied file; the parent directory keeps its times;
* hard links of the lower layers break on copy-up (index=off): while lower,
  all names of a hard-linked file are one inode (FUSE shows the inode number
  it serves, so ``st_ino`` is shared like overlayfs shows the lower one); the
  name that is copied up keeps that inode and becomes a file of its own, the
  other names move to a fresh inode (still the lower file). FUSE requests on
  an inode carry no name: the name is the one the kernel last looked up for
  it, which is exact because such names are given entry timeout 0 (every path
  walk through them sends a LOOKUP, see :attr:`Attr.unstable_name`). Links made
  through the mount are real hard links in the upper;
* with ``index=on`` (kernel overlayfs' option) they stay one inode: the first
  copy-up of a lower hard-linked file (also unlinking one of its names, or
  renaming over one) copies its data once and makes every name the merged
  view shows a hard link of it in the upper (their parents copied up, keeping
  their times), so ``st_nlink`` counts the names, a write through one shows
  through all, and a remount, ``diff`` and ``commit`` see real hard links;
* renaming a directory that exists in a lower layer fails with EXDEV (no
  redirect_dir), as does RENAME_EXCHANGE with one; directories created through
  the mount move freely (made opaque when moved over a lower name);
* a merged directory (upper and lower) has ``st_nlink`` 1 like overlayfs; a
  lower-only directory keeps the union's count;
* RENAME_NOREPLACE and RENAME_EXCHANGE are supported, RENAME_WHITEOUT is EINVAL;
* changing attributes of an open, unlinked lower file fails with EEXIST (the
  kernel cannot copy it up either);
* xattrs ``user.layerfs.*`` are reserved (EPERM to set, never listed).

Thread safety: every method may be called from any thread; namespace and
metadata changes are serialised by one lock, data reads/writes on open
handles run in parallel.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
from typing import Callable

from layerfs.fs.copyup import CopyUp
from layerfs.fs.dataops import DataOps
from layerfs.fs.dirfds import DirFds
from layerfs.fs.hostcalls import os_error, syncfs, utime_at
from layerfs.fs.inodes import Dir, File, Handle
from layerfs.fs.listing import Listing
from layerfs.fs.naming import NameOps
from layerfs.fs.renames import Renames
from layerfs.fs.tree import ROOT_INO, MergedTree, Node
from layerfs.fs.upper import NOSYNC_MARKER, work_dir_for

log = logging.getLogger(__name__)

__all__ = ["Overlay", "UpperInUse", "UpperDirty"]


class UpperInUse(OSError):
    """Another mount holds the upper directory (its work dir lock)."""


class UpperDirty(OSError):
    """A ``-o volatile`` mount of the upper directory (no syncs) did not end cleanly (*filename*: its marker)."""


class Overlay(Listing, CopyUp, NameOps, Renames, DataOps):
    """The merged view of *tree* (read-only lower layers) and the directory *upper*.

    *read_only*: serve the upper's changes without allowing new ones (EROFS).
    *volatile*: as kernel overlayfs's ``volatile`` option, nothing is synced to disk while
    mounted (copy-ups are not fsynced before their rename, fsync(2) does nothing); a marker
    in the work dir says so until :meth:`close` has synced everything, and an upper whose
    volatile mount ended without that (a crash) is refused (:class:`UpperDirty`).
    *index*: as kernel overlayfs's ``index=on``, every name of a lower hard-linked file stays one
    inode when it is copied up (all its names become hard links in the upper, so a remount, ``diff``
    and ``commit`` see them so too); the default (index=off) splits them, as Docker's overlay2 does.
    *on_attr_changed(ino)* is called (with the overlay's lock held, from the
    thread of the request) when attributes of an inode changed without the
    caller asking for it (a directory became merged and shows nlink 1, a
    hard-linked lower file was copied up and shows its own inode number), so
    the FUSE adapter can drop the kernel's cached attributes.
    """

    def __init__(self, tree: MergedTree, upper: str | os.PathLike[str], *, read_only: bool = False,
                 volatile: bool = False, index: bool = False,
                 on_attr_changed: Callable[[int], None] | None = None):
        self.tree = tree
        self.nodes = tree.nodes
        self.read_only = read_only
        self.volatile = volatile and not read_only
        self.index = index
        self.upper_root = os.path.abspath(os.fspath(upper))
        self.work = work_dir_for(self.upper_root)
        self.on_attr_changed = on_attr_changed
        self.euid = os.geteuid()
        self.lock = threading.RLock()
        self._next_ino = len(tree.nodes)
        self.next_fh = 1
        self.inodes: dict[int, Dir | File] = {}
        self.handles: dict[int, Handle] = {}
        self.upper_inos: dict[tuple[int, int], int] = {}   # host (dev, ino) → our ino, for upper hard links
        self.alias: dict[int, int] = {}        # lower hard-linked node → the inode of its names still lower
        self.link_names: dict[int, list[tuple[int, str]]] | None = None   # index=on: lower names of hard links
        self.dir_names: dict[int, tuple[int, str]] = {}                    # index=on: lower dir → (parent, name)
        self.last_name: dict[int, tuple[int, str]] = {}    # that inode → the name last looked up
        self._tmp_seq = 0
        self.dirfds = DirFds(self.inodes)      # O_PATH fds of upper directories, by inode
        self._lock_fd: int | None = None          # the work directory (locked)
        self.device_whiteouts = self.euid == 0   # whiteouts of long names as 0/0 devices (else a record)
        self._open_upper()
        root = Dir(ROOT_INO, ROOT_INO, "", tree.nodes[ROOT_INO], True)
        self.inodes[ROOT_INO] = root

    # -- setup ------------------------------------------------------------------------------
    def _open_upper(self) -> None:
        fresh = False
        if not os.path.isdir(self.upper_root):
            if self.read_only:
                raise os_error(errno.ENOENT, f"upper directory {self.upper_root}")
            os.makedirs(self.upper_root, exist_ok=True)
            fresh = True
        elif not self.read_only:
            with os.scandir(self.upper_root) as it:
                fresh = next(it, None) is None
        self.dirfds.root = os.open(self.upper_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.read_only:
            return
        try:
            self._lock_work(fresh)
        except BaseException:
            os.close(self.dirfds.root)         # a refused upper keeps no fd
            raise

    def _lock_work(self, fresh: bool) -> None:
        """Take the work dir's lock (one mount per upper), clean it, and stamp a fresh upper's root."""
        os.makedirs(self.work, mode=0o700, exist_ok=True)
        fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UpperInUse(errno.EBUSY, f"the upper directory {self.upper_root} is in use by another mount")
        try:
            if os.stat(self.work).st_dev != os.stat(self.upper_root).st_dev:
                raise os_error(errno.EXDEV, f"work directory {self.work} is on another file system than "
                                        f"{self.upper_root}")
            marker = os.path.join(self.work, NOSYNC_MARKER)
            if os.path.lexists(marker):
                raise UpperDirty(errno.EUCLEAN, f"the upper directory {self.upper_root} was mounted with "
                                                "-o volatile and that mount did not end cleanly", marker)
            self._clean_work()
            if self.volatile:
                os.mkdir(marker, 0o700)
                os.fsync(fd)            # the marker is on disk before any change that is not
        except BaseException:
            os.close(fd)                # the upper is not ours after all
            raise
        self._lock_fd = fd
        if fresh:   # the mount's root shows the image root's mode, owner and times
            root = self.nodes[ROOT_INO]
            assert root is not None
            self.apply_stat((self.dirfds.root, ""), stat.S_IFDIR, root.uid, root.gid, stat.S_IMODE(root.mode))
            utime_at((self.dirfds.root, ""), (root.mtime_ns, root.mtime_ns))

    def _clean_work(self) -> None:
        with os.scandir(self.work) as it:
            for e in it:
                p = os.path.join(self.work, e.name)
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)

    def close(self) -> None:
        with self.lock:
            for h in self.handles.values():
                if h.fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(h.fd)
            self.handles.clear()
            for i in self.inodes.values():
                if isinstance(i, File) and i.anon_fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(i.anon_fd)
                    i.anon_fd = None
            if self._lock_fd is not None:
                if self.volatile:       # everything on disk, then the marker goes
                    syncfs(self._lock_fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(os.path.join(self.work, NOSYNC_MARKER))
                    os.fsync(self._lock_fd)
                os.close(self._lock_fd)
                self._lock_fd = None
            self.dirfds.close()

    # -- inode table ----------------------------------------------------------------------------
    def new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def inode_of(self, ino: int) -> Dir | File | Node:
        """The Dir/File of *ino*, or the lower Node of a plain (untouched, single-name) lower file."""
        i = self.inodes.get(ino)
        if i is not None:
            return i
        if 0 < ino < len(self.nodes) and not ino == ROOT_INO:
            node = self.nodes[ino]
            if node is not None and not node.is_dir:
                return node
        raise os_error(errno.ENOENT)

    def dir_inode(self, ino: int) -> Dir:
        i = self.inodes.get(ino)
        if isinstance(i, Dir):
            return i
        self.inode_of(ino)
        raise os_error(errno.ENOTDIR)

    def file_inode(self, ino: int) -> File:
        """The File object of *ino* (a plain lower file gets one, with its name)."""
        i = self.inode_of(ino)
        if isinstance(i, File):
            return i
        if isinstance(i, Dir):
            raise os_error(errno.EISDIR)
        node = i
        f = File(ino, node, False)
        parent = self.inodes.get(node.parent)
        if isinstance(parent, Dir) and not parent.dead:
            for name, child in self.entries_of(parent).items():
                if child == ino:
                    f.links[(parent.ino, name)] = None
                    break
        self.inodes[ino] = f
        return f

    # -- upper locations ---------------------------------------------------------------------------
    def file_loc(self, f: File) -> tuple[int, str]:
        """The location of *f*'s upper file (any of its names, or its fd once unlinked)."""
        for (dino, name) in f.links:
            return self.dirfds.get(self.inodes[dino]), name  # type: ignore[arg-type]
        if f.anon_fd is not None:
            return f.anon_fd, ""
        raise os_error(errno.ENOENT)

    def work_name(self, what: str) -> str:
        """A new short name in the work directory."""
        self._tmp_seq += 1
        return f"{what}{self._tmp_seq}"

    @property
    def work_fd(self) -> int:
        assert self._lock_fd is not None
        return self._lock_fd

    # -- the file system --------------------------------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.upper_root)
