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

Every failure is an :class:`OSError` with the errno the kernel's overlayfs
gives for the same call (checked against it by tests/fuse/test_overlay_kernel_diff.py).

The upper directory's format (whiteout forms, opaque marker, override xattr, work
directory) is defined by :mod:`layerfs.fs.upper`.

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

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import stat
import threading
from typing import Callable, Iterator

from layerfs import libc
from layerfs.fs.tree import ROOT_INO, MergedTree, Node
from layerfs.fs.upper import (
    NAME_MAX,
    NOSYNC_MARKER,
    OPAQUE_MARKER,
    OVERRIDE_XATTR,
    RESERVED_XATTR_PREFIX,
    WH_DEVICE,
    WH_FILE,
    WH_PREFIX,
    WH_RECORD,
    WHITEOUTS_XATTR,
    Override,
    format_whiteout_record,
    is_device_whiteout,
    is_opaque_marker,
    is_reserved_name,
    parse_override,
    parse_whiteout_record,
    whiteout_file_fits,
    whiteout_target,
    work_dir_for,
)

log = logging.getLogger(__name__)

#: directory fds kept open between requests (least recently used ones are closed)
DIR_FD_CACHE = 256

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

COPY_CHUNK = 1 << 20


class UpperInUse(OSError):
    """Another mount holds the upper directory (its work dir lock)."""


class UpperDirty(OSError):
    """A ``-o volatile`` mount of the upper directory (no syncs) did not end cleanly (*filename*: its marker)."""


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


_NOFOLLOW = {"follow_symlinks": False}


def _fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) with its *mode* (os.posix_fallocate has none)."""
    f = libc.function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64))
    if f is None:
        raise _err(errno.EOPNOTSUPP)
    if f(fd, mode, off, length) != 0:
        raise _err(ctypes.get_errno())


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


_UNKNOWN = object()    # override not read yet


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
        self.override = _UNKNOWN
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
        self.override = _UNKNOWN
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


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        with self._lock:
            self._depth += 1
            try:
                return method(self, *args, **kw)
            finally:
                self._depth -= 1
                if not self._depth:
                    self._end_request()
    return wrapper


def _syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding *fd* (os.sync() where libc lacks it)."""
    f = libc.function("syncfs", (ctypes.c_int,))
    if f is None:
        os.sync()
    elif f(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _renameat2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    """renameat2(2): *old* in directory fd *olddir* to *new* in *newdir*, with *flags*."""
    f = libc.function("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
    if f is None:
        raise _err(errno.ENOSYS)
    if f(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


# -- upper entries by location --------------------------------------------------------------------
# A location is an open fd of the entry itself (int), or (dir fd, name) of a name in an upper
# directory; the name "" means the dir fd (an O_PATH fd) is the entry itself. Everything works
# relative to directory fds, so names reach NAME_MAX and paths in the upper have no length limit.


def fd_path(fd: int, name: str = "") -> str:
    """A path to *name* in directory fd *fd* (or to *fd* itself) for calls that take no dir fd."""
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


def _lstat(loc) -> os.stat_result:
    if isinstance(loc, int):
        return os.fstat(loc)
    fd, name = loc
    return os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)


def _xtarget(loc) -> tuple[str | int, dict]:
    """What the xattr (and truncate) calls take for *loc*, with their follow_symlinks keyword."""
    if isinstance(loc, int):
        return loc, {}
    fd, name = loc
    return (fd_path(fd, name), _NOFOLLOW) if name else (fd_path(fd), {})


def _chown(loc, uid: int, gid: int) -> None:
    if isinstance(loc, int):
        os.chown(loc, uid, gid)
    elif loc[1]:
        os.chown(loc[1], uid, gid, dir_fd=loc[0], follow_symlinks=False)
    else:
        os.chown(fd_path(loc[0]), uid, gid)


def _chmod(loc, mode: int) -> None:
    if isinstance(loc, int):
        os.chmod(loc, mode)
    elif loc[1]:
        os.chmod(loc[1], mode, dir_fd=loc[0])      # never a symlink
    else:
        os.chmod(fd_path(loc[0]), mode)


def _utime(loc, ns: tuple[int, int]) -> None:
    if isinstance(loc, int):
        os.utime(loc, ns=ns)
    elif loc[1]:
        os.utime(loc[1], ns=ns, dir_fd=loc[0], follow_symlinks=False)
    else:
        os.utime(fd_path(loc[0]), ns=ns)


def _truncate(loc, size: int) -> None:
    if isinstance(loc, int):
        os.ftruncate(loc, size)
    else:
        os.truncate(_xtarget(loc)[0], size)


def _touch(dfd: int, name: str, mode: int = 0o644) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dfd))


class Overlay:
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
        self._lock = threading.RLock()
        self._next_ino = len(tree.nodes)
        self._next_fh = 1
        self.inodes: dict[int, Dir | File] = {}
        self.handles: dict[int, Handle] = {}
        self._upper_inos: dict[tuple[int, int], int] = {}   # host (dev, ino) → our ino, for upper hard links
        self._alias: dict[int, int] = {}        # lower hard-linked node → the inode of its names still lower
        self._link_names: dict[int, list[tuple[int, str]]] | None = None   # index=on: lower names of hard links
        self._dir_names: dict[int, tuple[int, str]] = {}                    # index=on: lower dir → (parent, name)
        self._last_name: dict[int, tuple[int, str]] = {}    # that inode → the name last looked up
        self._tmp_seq = 0
        # O_PATH fds of upper directories by inode, least recently used first; the fds a request
        # took stay open until it ends (the cache is cut to DIR_FD_CACHE only then)
        self._dfds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._closing: list[int] = []         # fds of removed directories, closed when the request ends
        self._depth = 0
        self._root_fd = -1
        self._lock_fd: int | None = None          # the work directory (locked)
        self._device_whiteouts = self.euid == 0   # whiteouts of long names as 0/0 devices (else a record)
        self._open_upper()
        root = Dir(ROOT_INO, ROOT_INO, "", tree.nodes[ROOT_INO], True)
        self.inodes[ROOT_INO] = root

    # -- setup ------------------------------------------------------------------------------
    def _open_upper(self) -> None:
        fresh = False
        if not os.path.isdir(self.upper_root):
            if self.read_only:
                raise _err(errno.ENOENT, f"upper directory {self.upper_root}")
            os.makedirs(self.upper_root, exist_ok=True)
            fresh = True
        elif not self.read_only:
            with os.scandir(self.upper_root) as it:
                fresh = next(it, None) is None
        self._root_fd = os.open(self.upper_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.read_only:
            return
        try:
            self._lock_work(fresh)
        except BaseException:
            os.close(self._root_fd)         # a refused upper keeps no fd
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
                raise _err(errno.EXDEV, f"work directory {self.work} is on another file system than "
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
            self._apply_stat((self._root_fd, ""), stat.S_IFDIR, root.uid, root.gid, stat.S_IMODE(root.mode))
            _utime((self._root_fd, ""), (root.mtime_ns, root.mtime_ns))

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
        with self._lock:
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
                    _syncfs(self._lock_fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(os.path.join(self.work, NOSYNC_MARKER))
                    os.fsync(self._lock_fd)
                os.close(self._lock_fd)
                self._lock_fd = None
            for fd in self._dfds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._dfds.clear()
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1

    # -- inode table ----------------------------------------------------------------------------
    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _get(self, ino: int) -> Dir | File | Node:
        """The Dir/File of *ino*, or the lower Node of a plain (untouched, single-name) lower file."""
        i = self.inodes.get(ino)
        if i is not None:
            return i
        if 0 < ino < len(self.nodes) and not ino == ROOT_INO:
            node = self.nodes[ino]
            if node is not None and not node.is_dir:
                return node
        raise _err(errno.ENOENT)

    def _dir(self, ino: int) -> Dir:
        i = self.inodes.get(ino)
        if isinstance(i, Dir):
            return i
        self._get(ino)
        raise _err(errno.ENOTDIR)

    def _file(self, ino: int) -> File:
        """The File object of *ino* (a plain lower file gets one, with its name)."""
        i = self._get(ino)
        if isinstance(i, File):
            return i
        if isinstance(i, Dir):
            raise _err(errno.EISDIR)
        node = i
        f = File(ino, node, False)
        parent = self.inodes.get(node.parent)
        if isinstance(parent, Dir) and not parent.dead:
            for name, child in self._entries(parent).items():
                if child == ino:
                    f.links[(parent.ino, name)] = None
                    break
        self.inodes[ino] = f
        return f

    # -- upper locations ---------------------------------------------------------------------------
    def _end_request(self) -> None:
        while self._closing:
            os.close(self._closing.pop())
        while len(self._dfds) > DIR_FD_CACHE:
            _, fd = self._dfds.popitem(last=False)
            os.close(fd)

    def _dfd(self, d: Dir) -> int:
        """An O_PATH fd of *d*'s upper directory (cached; valid until the current request ends)."""
        fd = self._dfds.get(d.ino)
        if fd is not None:
            self._dfds.move_to_end(d.ino)
            return fd
        if d.ino == ROOT_INO:
            return self._root_fd
        chain = []                  # walk up to a directory whose fd is known, then open down
        top = d
        while True:
            chain.append(top)
            top = self.inodes[top.parent]  # type: ignore[assignment]
            if top.ino == ROOT_INO:
                fd = self._root_fd
                break
            fd = self._dfds.get(top.ino)
            if fd is not None:
                self._dfds.move_to_end(top.ino)
                break
        for sub in reversed(chain):
            fd = os.open(sub.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            self._dfds[sub.ino] = fd
        return fd

    def _drop_dfd(self, ino: int) -> None:
        """Forget the fd of a directory that is gone (closed when no request uses it)."""
        fd = self._dfds.pop(ino, None)
        if fd is not None:
            self._closing.append(fd)        # the request may still use it

    def _floc(self, f: File) -> tuple[int, str]:
        """The location of *f*'s upper file (any of its names, or its fd once unlinked)."""
        for (dino, name) in f.links:
            return self._dfd(self.inodes[dino]), name  # type: ignore[arg-type]
        if f.anon_fd is not None:
            return f.anon_fd, ""
        raise _err(errno.ENOENT)

    def _tmp(self, what: str) -> str:
        """A new short name in the work directory."""
        self._tmp_seq += 1
        return f"{what}{self._tmp_seq}"

    @property
    def _wfd(self) -> int:
        assert self._lock_fd is not None
        return self._lock_fd

    # -- merged directory listings ----------------------------------------------------------------
    def _entries(self, d: Dir) -> dict[str, int]:
        if d.entries is not None:
            return d.entries
        entries: dict[str, int] = {}
        upper: dict[str, os.stat_result | None] = {}    # name → stat (None: a directory)
        if d.upper:
            try:
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dfd(d))
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
                    aid = self._alias.get(lino, lino)
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

    def _lower_child(self, d: Dir, name: str) -> Node | None:
        """The lower entry *name* of *d* that a new upper entry would hide (whiteouts aside)."""
        if d.lower is None or not d.lower.children:
            return None
        lino = d.lower.children.get(name)
        return self.nodes[lino] if lino is not None else None

    def _upper_child(self, d: Dir, name: str, st: os.stat_result | None) -> int:
        is_dir = st is None
        lower = None if name in d.whiteouts else self._lower_child(d, name)
        if is_dir:
            ldir = lower if lower is not None and lower.is_dir else None
            ino = ldir.ino if ldir is not None else self._new_ino()
            self.inodes[ino] = Dir(ino, d.ino, name, ldir, True)
            return ino
        assert st is not None
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self._upper_inos:
            ino = self._upper_inos[key]
            f = self.inodes[ino]
        else:
            ino = self._new_ino()
            f = File(ino, None, True)
            self.inodes[ino] = f
            if st.st_nlink > 1:
                self._upper_inos[key] = ino
        f.links[(d.ino, name)] = None  # type: ignore[union-attr]
        return ino

    # -- attributes ----------------------------------------------------------------------------------
    def _override(self, i: Dir | File, loc, st: os.stat_result) -> Override | None:
        if i.override is _UNKNOWN:
            ov = None
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                target, kw = _xtarget(loc)
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

    def _upper_attr(self, i: Dir | File, loc, st: os.stat_result | None = None, *,
                    nlink: int | None = None) -> Attr:
        if st is None:
            st = _lstat(loc)
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

    @staticmethod
    def _node_attr(ino: int, node: Node) -> Attr:
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

    def _attr(self, ino: int) -> Attr:
        i = self._get(ino)
        if isinstance(i, Node):
            return self._node_attr(ino, i)
        if isinstance(i, Dir):
            if i.upper and not i.dead:
                if i.lower is not None and i.entries is None:
                    self._entries(i)      # learn whether it is opaque
                return self._upper_attr(i, (self._dfd(i), ""), nlink=1 if i.lower is not None else None)
            if i.lower is not None:
                a = self._node_attr(ino, i.lower)
                if i.dead:
                    a.nlink = 0
                return a
            raise _err(errno.ENOENT)
        if i.upper:
            if i.links:
                if i.wfd is not None:
                    return self._upper_attr(i, i.wfd, os.fstat(i.wfd))
                return self._upper_attr(i, self._floc(i))
            if i.anon_fd is not None:
                return self._upper_attr(i, (i.anon_fd, ""))
            if i.dead_attr is not None:
                return i.dead_attr
            raise _err(errno.ENOENT)
        return self._node_attr(ino, i.lower)  # type: ignore[arg-type]

    @_locked
    def getattr(self, ino: int) -> Attr:
        return self._attr(ino)

    @_locked
    def lookup(self, parent: int, name: str) -> Attr:
        d = self._dir(parent)
        if name == ".":
            return self._attr(parent)
        if name == "..":
            return self._attr(d.parent)
        ino = self._entries(d).get(name)
        if ino is None:
            if len(name) > NAME_MAX // 4 and len(os.fsencode(name)) > NAME_MAX:
                raise _err(errno.ENAMETOOLONG)     # as the upper file system's lookup says
            raise _err(errno.ENOENT)
        a = self._attr(ino)
        if a.unstable_name:
            self._last_name[ino] = (d.ino, name)
        return a

    @_locked
    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """Every entry of directory *ino* with its attributes (without ``.`` and ``..``)."""
        d = self._dir(ino)
        if d.dead:
            return []
        return [(name, self._attr(child)) for name, child in list(self._entries(d).items())]

    @_locked
    def listdir(self, ino: int) -> list[tuple[str, int]]:
        d = self._dir(ino)
        return [] if d.dead else list(self._entries(d).items())

    def parent_of(self, ino: int) -> int:
        return self._dir(ino).parent

    @_locked
    def readlink(self, ino: int) -> str:
        i = self._get(ino)
        if isinstance(i, Dir):
            raise _err(errno.EINVAL)
        if isinstance(i, File) and i.upper:
            if i.links:
                dfd, name = self._floc(i)
                return os.readlink(name, dir_fd=dfd)
            raise _err(errno.EINVAL)
        node = i if isinstance(i, Node) else i.lower
        if node is None or not stat.S_ISLNK(node.mode) or node.target is None:
            raise _err(errno.EINVAL)
        return node.target

    # -- writing helpers -----------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    @staticmethod
    def _check_name(name: str) -> None:
        if is_reserved_name(name):
            raise _err(errno.EINVAL, f"names beginning with {WH_PREFIX} are reserved for whiteouts")
        if len(os.fsencode(name)) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if name in (".", "..") or "/" in name or not name:
            raise _err(errno.EINVAL)

    def _apply_stat(self, loc, ftype: int, uid: int, gid: int, mode: int, *, rdev: int = 0,
                    placeholder: bool = False, i: Dir | File | None = None) -> None:
        """Give the upper entry at *loc* owner and mode (really, or through the override xattr)."""
        exact = not placeholder
        try:
            if self.euid == 0:
                _chown(loc, uid, gid)
            else:
                st = _lstat(loc)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    _chown(loc, uid, gid)
        except PermissionError:
            exact = False
        except OSError as e:
            if e.errno != errno.EINVAL:     # EINVAL: an id not mapped in this user namespace
                raise
            exact = False
        if ftype != stat.S_IFLNK:
            real = mode
            if self.euid != 0:     # the daemon must keep reading, writing and listing its files
                real |= 0o700 if ftype == stat.S_IFDIR else 0o600
            _chmod(loc, real)
            if real != mode:
                exact = False
        target, kw = _xtarget(loc)
        if exact:
            if i is not None and i.override is not None:
                with contextlib.suppress(OSError):
                    os.removexattr(target, OVERRIDE_XATTR, **kw)
            if i is not None:
                i.override = None
            return
        ov = Override(uid, gid, mode, ftype if placeholder else None, rdev)
        try:
            os.setxattr(target, OVERRIDE_XATTR, ov.encode(), **kw)
        except OSError as e:
            # user.* xattrs exist only on regular files and directories
            raise _err(errno.EPERM, f"cannot record owner/mode: {e.strerror}") from None
        if i is not None:
            i.override = ov

    def _copy_xattrs(self, loc, xattrs: dict[str, bytes] | None, *, symlink: bool = False) -> None:
        target, kw = _xtarget(loc)
        for k, v in (xattrs or {}).items():
            if k.startswith(RESERVED_XATTR_PREFIX):
                continue
            try:
                os.setxattr(target, k, v, **kw)
            except OSError as e:
                if symlink and e.errno in (errno.EPERM, errno.ENOTSUP):
                    continue
                log.warning("copy-up: cannot set xattr %s: %s", k, e.strerror)

    @contextlib.contextmanager
    def _keep_times(self, dfd: int) -> Iterator[None]:
        st = os.fstat(dfd)
        yield
        _utime((dfd, ""), (st.st_atime_ns, st.st_mtime_ns))

    def _make_special(self, dfd: int, name: str, ftype: int, rdev: int) -> bool:
        """Create a fifo/socket/device *name* in *dfd*; False when devices need the placeholder form."""
        try:
            os.mknod(name, ftype | 0o600, rdev, dir_fd=dfd)
            return True
        except PermissionError:
            if ftype in (stat.S_IFCHR, stat.S_IFBLK):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                os.close(fd)
                return False
            raise

    # -- copy-up ---------------------------------------------------------------------------------------
    def _copy_up_dir(self, d: Dir) -> None:
        """Copy *d* up, and first those of its ancestors that are not (top down, without recursion)."""
        chain = []
        while not d.upper:
            if d.dead:
                raise _err(errno.ENOENT)
            chain.append(d)
            d = self.inodes[d.parent]  # type: ignore[assignment]
        for sub in reversed(chain):
            self._copy_up_one_dir(sub)

    def _copy_up_one_dir(self, d: Dir) -> None:
        parent = self.inodes[d.parent]
        assert isinstance(parent, Dir) and parent.upper
        node = d.lower
        assert node is not None
        pfd = self._dfd(parent)
        wfd = self._wfd
        tmp = self._tmp("d")
        os.mkdir(tmp, 0o700, dir_fd=wfd)
        try:
            at = (wfd, tmp)
            self._copy_xattrs(at, node.xattrs)
            self._apply_stat(at, stat.S_IFDIR, node.uid, node.gid, stat.S_IMODE(node.mode), i=d)
            _utime(at, (node.mtime_ns, node.mtime_ns))
            with self._keep_times(pfd):
                os.rename(tmp, d.name, src_dir_fd=wfd, dst_dir_fd=pfd)
        except BaseException:
            self._rm_work(tmp)
            raise
        d.upper = True
        if d.entries is None:
            d.entries = None      # loads from both sides when first listed
        self._changed(d.ino)

    def _changed(self, ino: int) -> None:
        if self.on_attr_changed is not None:
            try:
                self.on_attr_changed(ino)
            except Exception:  # never fail the operation for a cache hint
                log.debug("attribute invalidation of %d failed", ino, exc_info=True)

    def _copy_up(self, f: File, *, size: int | None = None) -> None:
        """Copy *f* up (only its first *size* bytes of data when given: a truncate follows)."""
        if f.upper:
            return
        node = f.lower
        assert node is not None
        if not f.links:   # open and unlinked: overlayfs cannot copy it up either
            raise _err(errno.EEXIST)
        indexed = self.index and node.nlink > 1
        if indexed:
            self._learn_names(f)
            (dino, name) = self._pick_link(f)
        else:
            (dino, name) = self._split_links(f)
        parent = self.inodes[dino]
        assert isinstance(parent, Dir)
        self._copy_up_dir(parent)
        pfd = self._dfd(parent)
        ftype = stat.S_IFMT(node.mode)
        wfd = self._wfd
        tmp = self._tmp("c")
        at = (wfd, tmp)
        placeholder = False
        try:
            if ftype == stat.S_IFREG:
                self._copy_data(node, tmp, node.size if size is None else min(size, node.size))
            elif ftype == stat.S_IFLNK:
                os.symlink(node.target or "", tmp, dir_fd=wfd)
            else:
                placeholder = not self._make_special(wfd, tmp, ftype, node.rdev)
            self._copy_xattrs(at, node.xattrs, symlink=ftype == stat.S_IFLNK)
            f.override = None       # the new file has no override xattr (reserved names are not copied)
            self._apply_stat(at, ftype, node.uid, node.gid, stat.S_IMODE(node.mode), rdev=node.rdev,
                             placeholder=placeholder, i=f)
            _utime(at, (node.mtime_ns, node.mtime_ns))
            with self._keep_times(pfd):
                os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=pfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=wfd)
            raise
        f.upper = True
        if indexed:
            self._link_names_up(f, (dino, name))
        if node.nlink > 1:      # now a file of its own: its own inode number and link count
            self._changed(f.ino)

    # -- index=on: the names of a lower hard-linked file stay one inode --------------------------------------
    def _learn_names(self, f: File) -> None:
        """Add every name of lower file *f* that the merged view still shows to ``f.links``."""
        if self._link_names is None:
            seen: dict[int, tuple[int, str]] = {}
            multi: dict[int, list[tuple[int, str]]] = {}
            dirs = []
            nodes = self.nodes
            for p in range(1, len(nodes)):
                n = nodes[p]
                if n is None or n.children is None:
                    continue
                dirs.append(p)
                for name, c in n.children.items():
                    if c in seen:
                        multi.setdefault(c, [seen[c]]).append((p, name))
                    else:
                        seen[c] = (p, name)
            self._dir_names = {p: seen[p] for p in dirs if p in seen}
            self._link_names = multi
        assert f.lower is not None
        for parent, _ in self._link_names.get(f.lower.ino, ()):
            d = self._shown_lower_dir(parent)
            if d is not None:
                self._entries(d)

    def _shown_lower_dir(self, lino: int) -> Dir | None:
        """The Dir of lower directory *lino* where the merged view shows it (None: it does not)."""
        path = []
        c = lino
        while c != ROOT_INO:
            pn = self._dir_names.get(c)
            if pn is None:
                return None
            path.append((c, pn[1]))
            c = pn[0]
        d = self.inodes[ROOT_INO]
        for c, name in reversed(path):
            if d.dead:
                return None
            sub = self.inodes.get(self._entries(d).get(name, -1))  # type: ignore[arg-type]
            if not isinstance(sub, Dir) or sub.ino != c or sub.lower is None:
                return None
            d = sub
        return d  # type: ignore[return-value]

    def _link_names_up(self, f: File, first: tuple[int, str]) -> None:
        """The other names of the just copied-up *f* become hard links of its upper file."""
        sfd, sname = self._dfd(self.inodes[first[0]]), first[1]  # type: ignore[arg-type]
        for (dino, name) in list(f.links):
            if (dino, name) == first:
                continue
            d = self.inodes[dino]
            assert isinstance(d, Dir)
            self._copy_up_dir(d)
            dfd = self._dfd(d)
            with self._keep_times(dfd):         # a name the merged view shows as lower has no whiteout
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        self._upper_inos[(st.st_dev, st.st_ino)] = f.ino

    def _pick_link(self, f: File) -> tuple[int, str]:
        """The name of *f* to copy up: the one the kernel last looked up, else any."""
        last = self._last_name.pop(f.ino, None)
        return last if last in f.links else next(iter(f.links))

    def _split_links(self, f: File) -> tuple[int, str]:
        """The name of lower file *f* to copy up; its other lower names move to a new inode."""
        node = f.lower
        assert node is not None
        link = self._pick_link(f)
        if node.nlink > 1:
            rest = File(self._new_ino(), node, False)
            for other in f.links:
                if other != link:
                    rest.links[other] = None
                    self.inodes[other[0]].entries[other[1]] = rest.ino  # type: ignore[union-attr,index]
            self.inodes[rest.ino] = rest
            self._alias[node.ino] = rest.ino
            f.links = {link: None}
            for h in self.handles.values():     # files opened by the other names stay theirs
                if h.ino == f.ino and h.link is not None and h.link in rest.links:
                    h.ino = rest.ino
                    f.nopen -= 1
                    rest.nopen += 1
        return link

    def _rm_work(self, name: str) -> None:
        """Remove a temporary of the work directory (a directory with its contents)."""
        try:
            st = os.stat(name, dir_fd=self._wfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=self._wfd, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._wfd)

    def _copy_data(self, node: Node, tmp: str, size: int) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self._wfd)
        try:
            os.ftruncate(fd, size)
            if node.sparse is not None:
                spans = [(o, min(l, size - o)) for o, l, _ in node.sparse if o < size]
            elif node.inline is None and node.layer < 0:
                spans = []   # all zeros
            else:
                spans = [(0, size)]
            for start, length in spans:
                off = start
                end = start + length
                while off < end:
                    n = min(COPY_CHUNK, end - off)
                    data = self.tree.read(node.ino, off, n)
                    if not data:
                        break
                    if data.count(0) != len(data):     # leave holes where the data is zeros
                        os.pwrite(fd, data, off)
                    off += len(data)
            if not self.volatile:
                os.fsync(fd)        # on disk before the rename makes it visible (as kernel overlayfs)
        finally:
            os.close(fd)

    def _ensure_upper(self, ino: int, *, size: int | None = None) -> Dir | File:
        i = self._get(ino)
        if isinstance(i, Dir):
            self._copy_up_dir(i)
            return i
        f = self._file(ino)
        self._copy_up(f, size=size)
        return f

    def _loc(self, i: Dir | File) -> tuple[int, str]:
        return (self._dfd(i), "") if isinstance(i, Dir) else self._floc(i)

    # -- creating entries ----------------------------------------------------------------------------------
    def _prepare_create(self, parent: int, name: str) -> tuple[Dir, int]:
        self._writable()
        d = self._dir(parent)
        if d.dead:
            raise _err(errno.ENOENT)
        self._check_name(name)
        if name in self._entries(d):
            raise _err(errno.EEXIST)
        self._copy_up_dir(d)
        return d, self._dfd(d)

    def _owner_for(self, d: Dir, uid: int, gid: int, mode: int, is_dir: bool) -> tuple[int, int, int]:
        da = self._attr(d.ino)
        if da.mode & stat.S_ISGID:
            gid = da.gid
            if is_dir:
                mode |= stat.S_ISGID
        return uid, gid, mode

    def _make_at(self, d: Dir, dfd: int, name: str) -> tuple[int, str]:
        """Where to make the new entry *name* of *d*: at its name, or as a work-dir temporary when a
        device whiteout holds the name (:meth:`_settle` then moves it over the device atomically)."""
        if d.whiteouts.get(name) == WH_DEVICE:
            return self._wfd, self._tmp("n")
        return dfd, name

    def _settle(self, d: Dir, dfd: int, name: str, at: tuple[int, str], is_dir: bool) -> None:
        """The entry just made at *at* takes the name *name* of *d*; the name's whiteout goes."""
        if at != (dfd, name):
            if d.whiteouts.get(name) == WH_DEVICE:
                if is_dir:      # rename(2) moves no directory over a device: swap them, drop the device
                    _renameat2(at[0], at[1], dfd, name, RENAME_EXCHANGE)
                    os.unlink(at[1], dir_fd=at[0])
                else:
                    os.rename(at[1], name, src_dir_fd=at[0], dst_dir_fd=dfd)
                del d.whiteouts[name]
                return
            os.rename(at[1], name, src_dir_fd=at[0], dst_dir_fd=dfd)
        self._drop_whiteout(d, dfd, name)

    def _drop_whiteout(self, d: Dir, dfd: int, name: str) -> None:
        """The whiteout of *name* goes (an upper entry of that name exists now)."""
        form = d.whiteouts.get(name)
        if form == WH_FILE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(WH_PREFIX + name, dir_fd=dfd)
        elif form == WH_RECORD:
            del d.whiteouts[name]
            self._write_record(d, dfd)
        elif form == WH_DEVICE:
            return          # it is the entry itself: replaced by _settle
        d.whiteouts.pop(name, None)

    def _write_record(self, d: Dir, dfd: int) -> None:
        record = format_whiteout_record(n for n, form in d.whiteouts.items() if form == WH_RECORD)
        try:
            if record:
                os.setxattr(fd_path(dfd), WHITEOUTS_XATTR, record)
            else:
                with contextlib.suppress(OSError):
                    os.removexattr(fd_path(dfd), WHITEOUTS_XATTR)
        except OSError as e:
            raise _err(errno.ENOSPC if e.errno == errno.E2BIG else e.errno,
                       "no room for more whiteouts of long names in this directory") from None

    def _add_file(self, d: Dir, name: str, ino: int | None = None) -> File:
        ino = self._new_ino() if ino is None else ino
        f = File(ino, None, True)
        f.links[(d.ino, name)] = None
        self.inodes[ino] = f
        self._entries(d)[name] = ino
        return f

    @staticmethod
    def _unmake(at: tuple[int, str]) -> None:
        with contextlib.suppress(OSError):
            os.unlink(at[1], dir_fd=at[0])

    @_locked
    def create(self, parent: int, name: str, mode: int, flags: int, *, uid: int, gid: int) -> tuple[int, Attr]:
        """Create and open a regular file (O_EXCL implied: the name must not exist). Returns (fh, attr)."""
        d, dfd = self._prepare_create(parent, name)
        uid, gid, mode = self._owner_for(d, uid, gid, stat.S_IMODE(mode), False)
        at = self._make_at(d, dfd, name)
        fd = os.open(at[1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=at[0])
        try:
            f = self._add_file(d, name)
            f.override = None          # a new file has no xattrs
            self._apply_stat(fd, stat.S_IFREG, uid, gid, mode, i=f)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            os.close(fd)
            self._unmake(at)
            self._entries(d).pop(name, None)
            raise
        f.nopen += 1
        f.wfd = fd
        fh = self._new_handle(Handle(f.ino, fd, True, 0))
        return fh, self._attr(f.ino)

    @_locked
    def mknod(self, parent: int, name: str, mode: int, rdev: int = 0, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        uid, gid, perm = self._owner_for(d, uid, gid, stat.S_IMODE(mode), False)
        if ftype not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL)
        if ftype == stat.S_IFCHR and rdev == 0:
            raise _err(errno.EPERM, "a character device 0/0 is a whiteout")     # as overlayfs says
        at = self._make_at(d, dfd, name)
        placeholder = False
        if ftype == stat.S_IFREG:
            os.close(os.open(at[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=at[0]))
        else:
            placeholder = not self._make_special(at[0], at[1], ftype, rdev)
        return self._register_made(d, dfd, name, at, ftype, uid, gid, perm, rdev=rdev, placeholder=placeholder)

    def _register_made(self, d: "Dir", dfd: int, name: str, at: tuple[int, str], ftype: int, uid: int, gid: int,
                       perm: int, **stat_kw) -> Attr:
        """Record a non-directory just made at *at* (see :meth:`_make_at`): owner and mode applied,
        the name entered, its whiteout dropped; on failure the file is removed again."""
        try:
            f = self._add_file(d, name)
            self._apply_stat(at, ftype, uid, gid, perm, i=f, **stat_kw)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            self._unmake(at)
            self._entries(d).pop(name, None)
            raise
        return self._attr(f.ino)

    @_locked
    def mkdir(self, parent: int, name: str, mode: int, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        uid, gid, mode = self._owner_for(d, uid, gid, stat.S_IMODE(mode), True)
        hides_lower = self._lower_child(d, name) is not None or d.whiteouts.get(name) == WH_DEVICE
        ino = self._new_ino()
        child = Dir(ino, d.ino, name, None, True)
        child.entries = {}
        if hides_lower:
            # over a whiteout: made complete (opaque) in the work dir, then renamed into place
            wfd = self._wfd
            tmp = self._tmp("m")
            os.mkdir(tmp, 0o700, dir_fd=wfd)
            try:
                tfd = os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
                try:
                    _touch(tfd, OPAQUE_MARKER)
                finally:
                    os.close(tfd)
                self._apply_stat((wfd, tmp), stat.S_IFDIR, uid, gid, mode, i=child)
                self._settle(d, dfd, name, (wfd, tmp), True)
            except BaseException:
                self._rm_work(tmp)
                raise
            child.opaque = True
        else:
            os.mkdir(name, 0o700, dir_fd=dfd)
            try:
                self._apply_stat((dfd, name), stat.S_IFDIR, uid, gid, mode, i=child)
                self._drop_whiteout(d, dfd, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=dfd)
                raise
        self.inodes[ino] = child
        self._entries(d)[name] = ino
        return self._attr(ino)

    @_locked
    def symlink(self, parent: int, name: str, target: str, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        uid, gid, _ = self._owner_for(d, uid, gid, 0o777, False)
        at = self._make_at(d, dfd, name)
        os.symlink(target, at[1], dir_fd=at[0])
        return self._register_made(d, dfd, name, at, stat.S_IFLNK, uid, gid, 0o777)

    @_locked
    def link(self, ino: int, parent: int, name: str) -> Attr:
        self._writable()
        i = self._get(ino)
        if isinstance(i, Dir):
            raise _err(errno.EPERM)
        d, dfd = self._prepare_create(parent, name)
        f = self._file(ino)
        if not f.links and not f.upper:
            raise _err(errno.ENOENT)
        self._copy_up(f)
        if not f.links:
            raise _err(errno.ENOENT)
        sfd, sname = self._floc(f)
        at = self._make_at(d, dfd, name)
        os.link(sname, at[1], src_dir_fd=sfd, dst_dir_fd=at[0], follow_symlinks=False)
        try:
            st = _lstat(at)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            self._unmake(at)
            raise
        self._upper_inos[(st.st_dev, st.st_ino)] = f.ino
        f.links[(d.ino, name)] = None
        self._entries(d)[name] = f.ino
        return self._attr(f.ino)

    # -- removing entries ----------------------------------------------------------------------------------------
    def _whiteout_form(self, name: str) -> str:
        if whiteout_file_fits(name):
            return WH_FILE
        return WH_DEVICE if self._device_whiteouts else WH_RECORD

    def _remove_name(self, d: Dir, dfd: int, name: str, kind: str | None, whiteout: bool) -> None:
        """Remove the upper entry *name* of *d* (*kind* ``"file"``, ``"dir"`` or None: there is none),
        leaving a whiteout of the lower entry when *whiteout*. A ``.wh.`` file or a recorded name
        is written before the entry goes; a device whiteout replaces the entry in one rename."""
        form = self._whiteout_form(name) if whiteout and name not in d.whiteouts else None
        if form == WH_DEVICE:
            try:
                self._device_whiteout(d, dfd, name, kind)
                return
            except PermissionError:     # no CAP_MKNOD after all: the record
                self._device_whiteouts = False
                form = WH_RECORD
        if form == WH_FILE:
            _touch(dfd, WH_PREFIX + name)
            d.whiteouts[name] = WH_FILE
        elif form == WH_RECORD:
            d.whiteouts[name] = WH_RECORD
            try:
                self._write_record(d, dfd)
            except OSError:
                del d.whiteouts[name]
                raise
        if kind == "file":
            os.unlink(name, dir_fd=dfd)
        elif kind == "dir":
            self._discard_upper_dir(dfd, name)

    def _device_whiteout(self, d: Dir, dfd: int, name: str, kind: str | None) -> None:
        if kind is None:
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=dfd)
        else:
            wfd = self._wfd
            tmp = self._tmp("w")
            os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=wfd)
            try:
                if kind == "file":
                    os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=dfd)    # replaces the file atomically
                else:
                    _renameat2(wfd, tmp, dfd, name, RENAME_EXCHANGE)
            finally:
                self._rm_work(tmp)      # the device if the rename failed, the directory after a swap
        d.whiteouts[name] = WH_DEVICE

    def _needs_whiteout(self, d: Dir, name: str) -> bool:
        return self._lower_child(d, name) is not None

    def _last_name_going(self, f: File, loc: tuple[int, str]) -> None:
        """Before the last upper name of *f* goes: keep an fd of it while it is open, else its attributes."""
        if len(f.links) != 1 or not f.upper:
            return
        if f.nopen > 0 and f.anon_fd is None:
            f.anon_fd = os.open(loc[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc[0])
        else:
            f.dead_attr = self._upper_attr(f, loc)
            f.dead_attr.nlink = 0

    def _name_gone(self, f: File, d: Dir, name: str) -> None:
        del f.links[(d.ino, name)]
        if not f.links and f.nopen == 0:
            self._forget_file(f)

    def _forget_file(self, f: File) -> None:
        f.dead = True
        if f.anon_fd is not None:
            with contextlib.suppress(OSError):
                os.close(f.anon_fd)
            f.anon_fd = None
        # kept until the kernel forgets the inode (see forget): fstat of an open fifo, devices
        if f.upper and f.dead_attr is None and f.ino >= len(self.nodes):
            self.inodes.pop(f.ino, None)

    @_locked
    def forget(self, ino: int) -> None:
        """The kernel dropped *ino*: a file without names is gone for good."""
        f = self.inodes.get(ino)
        if isinstance(f, File) and f.dead and not f.links and f.nopen <= 0 and f.ino >= len(self.nodes):
            del self.inodes[ino]

    def _removable(self, parent: int, name: str) -> tuple[Dir, dict[str, int], int]:
        """(parent dir, its entries, the inode) of a name about to be removed; EROFS, ENOENT."""
        self._writable()
        d = self._dir(parent)
        entries = self._entries(d)
        ino = entries.get(name)
        if ino is None:
            raise _err(errno.ENOENT)
        return d, entries, ino

    @_locked
    def unlink(self, parent: int, name: str) -> None:
        d, entries, ino = self._removable(parent, name)
        if isinstance(self.inodes.get(ino), Dir):
            raise _err(errno.EISDIR)
        f = self._file(ino)
        self._copy_up_dir(d)
        if self.index and not f.upper and f.lower is not None and f.lower.nlink > 1:
            self._last_name[f.ino] = (d.ino, name)
            self._copy_up(f)            # as overlayfs with index=on: the other names' count goes down
        dfd = self._dfd(d)
        whiteout = self._needs_whiteout(d, name)
        if f.upper:
            self._last_name_going(f, (dfd, name))
            self._remove_name(d, dfd, name, "file", whiteout)
            self._name_gone(f, d, name)
        else:
            if whiteout:
                self._remove_name(d, dfd, name, None, True)
            del f.links[(d.ino, name)]
        del entries[name]

    def _is_empty(self, d: Dir) -> bool:
        return not self._entries(d)

    def _discard_upper_dir(self, dfd: int, name: str) -> None:
        """Move an upper directory (holding only whiteouts) away atomically, then delete it."""
        trash = self._tmp("r")
        os.rename(name, trash, src_dir_fd=dfd, dst_dir_fd=self._wfd)
        self._rm_work(trash)

    @_locked
    def rmdir(self, parent: int, name: str) -> None:
        d, entries, ino = self._removable(parent, name)
        child = self.inodes.get(ino)
        if not isinstance(child, Dir):
            raise _err(errno.ENOTDIR)
        if not self._is_empty(child):
            raise _err(errno.ENOTEMPTY)
        self._copy_up_dir(d)
        dfd = self._dfd(d)
        whiteout = self._needs_whiteout(d, name)
        if child.upper:
            self._remove_name(d, dfd, name, "dir", whiteout)
            self._drop_dfd(child.ino)
        elif whiteout:
            self._remove_name(d, dfd, name, None, True)
        del entries[name]
        child.dead = True
        child.upper = False

    # -- rename ------------------------------------------------------------------------------------------------------
    def _movable(self, i: Dir | File | Node) -> bool:
        return not isinstance(i, Dir) or i.lower is None

    def _is_ancestor(self, a: Dir, d: Dir) -> bool:
        while True:
            if d.ino == a.ino:
                return True
            if d.ino == ROOT_INO:
                return False
            d = self.inodes[d.parent]  # type: ignore[assignment]

    @_locked
    def rename(self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        d1, d2 = self._dir(parent), self._dir(new_parent)
        e1, e2 = self._entries(d1), self._entries(d2)
        sino = e1.get(name)
        if sino is None:
            raise _err(errno.ENOENT)
        if d2.dead:
            raise _err(errno.ENOENT)
        tino = e2.get(new_name)
        if flags & RENAME_EXCHANGE and tino is None:
            raise _err(errno.ENOENT)
        if flags & RENAME_NOREPLACE and tino is not None:
            raise _err(errno.EEXIST)
        src = self._get(sino)
        tgt = self._get(tino) if tino is not None else None
        if d1 is d2 and name == new_name:
            return
        if not flags & RENAME_EXCHANGE:
            self._check_name(new_name)
        if tgt is not None and not flags & RENAME_EXCHANGE:
            if isinstance(src, Dir) and not isinstance(tgt, Dir):
                raise _err(errno.ENOTDIR)
            if not isinstance(src, Dir) and isinstance(tgt, Dir):
                raise _err(errno.EISDIR)
        if isinstance(src, Dir) and self._is_ancestor(src, d2):
            raise _err(errno.EINVAL)
        if flags & RENAME_EXCHANGE and isinstance(tgt, Dir) and self._is_ancestor(tgt, d1):
            raise _err(errno.EINVAL)
        if tino == sino:    # two names of one file: nothing to do (rename(2))
            return
        if not self._movable(src) or (flags & RENAME_EXCHANGE and not self._movable(tgt)):  # type: ignore[arg-type]
            raise _err(errno.EXDEV)
        if isinstance(tgt, Dir) and not flags & RENAME_EXCHANGE and not self._is_empty(tgt):
            raise _err(errno.ENOTEMPTY)
        if flags & RENAME_EXCHANGE:
            self._exchange(d1, name, sino, d2, new_name, tino)  # type: ignore[arg-type]
        else:
            self._move(d1, name, sino, d2, new_name, tino)

    def _copy_up_named(self, ino: int) -> Dir | File:
        return self._ensure_upper(ino)

    def _move(self, d1: Dir, name: str, sino: int, d2: Dir, new_name: str, tino: int | None) -> None:
        self._copy_up_dir(d1)
        self._copy_up_dir(d2)
        src = self._copy_up_named(sino)
        f1, f2 = self._dfd(d1), self._dfd(d2)
        tgt = self.inodes.get(tino) if tino is not None else None
        if tino is not None and tgt is None:
            tgt = self._file(tino)
        if (self.index and isinstance(tgt, File) and not tgt.upper and tgt.lower is not None
                and tgt.lower.nlink > 1):
            self._last_name[tgt.ino] = (d2.ino, new_name)
            self._copy_up(tgt)          # as unlink: the other names' count goes down
        if isinstance(src, Dir):
            # a directory moved where a lower entry of that name exists must hide it
            if self._lower_child(d2, new_name) is not None and not src.opaque:
                _touch(self._dfd(src), OPAQUE_MARKER)
                src.opaque = True
        form = None
        if self._needs_whiteout(d1, name) and name not in d1.whiteouts:
            form = self._whiteout_form(name)
            if form != WH_DEVICE:   # first: the old name stays shown by the upper entry until the rename
                self._remove_name(d1, f1, name, None, True)
        if isinstance(tgt, Dir) and tgt.upper:
            self._discard_upper_dir(f2, new_name)  # empty in the merged view: only whiteouts inside
            self._drop_dfd(tgt.ino)
        if isinstance(tgt, File):
            self._last_name_going(tgt, (f2, new_name))
        over_device = d2.whiteouts.get(new_name) == WH_DEVICE
        if isinstance(src, Dir) and over_device:
            # rename(2) moves no directory over a device: swap them; the device is the old name's
            # whiteout now, or goes
            _renameat2(f1, name, f2, new_name, RENAME_EXCHANGE)
            if form == WH_DEVICE:
                d1.whiteouts[name] = WH_DEVICE
            else:
                os.unlink(name, dir_fd=f1)
        elif form == WH_DEVICE:
            try:
                _renameat2(f1, name, f2, new_name, RENAME_WHITEOUT)     # moved, and a device left behind
                d1.whiteouts[name] = WH_DEVICE
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.ENOSYS):
                    raise
                os.rename(name, new_name, src_dir_fd=f1, dst_dir_fd=f2)
                self._remove_name(d1, f1, name, None, True)
        else:
            os.rename(name, new_name, src_dir_fd=f1, dst_dir_fd=f2)
        if over_device:
            del d2.whiteouts[new_name]
        else:
            self._drop_whiteout(d2, f2, new_name)
        # bookkeeping
        e1, e2 = self._entries(d1), self._entries(d2)
        del e1[name]
        if tgt is not None:
            if isinstance(tgt, Dir):
                tgt.dead = True
                tgt.upper = False
            else:
                tgt.links.pop((d2.ino, new_name), None)
                if not tgt.links and tgt.nopen == 0:
                    self._forget_file(tgt)
        e2[new_name] = sino
        if isinstance(src, Dir):
            src.parent = d2.ino         # its fd (and those below it) stay valid
            src.name = new_name
        else:
            del src.links[(d1.ino, name)]
            src.links[(d2.ino, new_name)] = None

    def _exchange(self, d1: Dir, name: str, sino: int, d2: Dir, new_name: str, tino: int) -> None:
        self._copy_up_dir(d1)
        self._copy_up_dir(d2)
        src = self._copy_up_named(sino)
        tgt = self._copy_up_named(tino)
        f1, f2 = self._dfd(d1), self._dfd(d2)
        for moved, dest_dir, dest_name in ((src, d2, new_name), (tgt, d1, name)):
            if isinstance(moved, Dir) and not moved.opaque and self._lower_child(dest_dir, dest_name) is not None:
                _touch(self._dfd(moved), OPAQUE_MARKER)
                moved.opaque = True
        _renameat2(f1, name, f2, new_name, RENAME_EXCHANGE)
        e1, e2 = self._entries(d1), self._entries(d2)
        e1[name], e2[new_name] = tino, sino
        for moved, (od, on), (nd, nn) in ((src, (d1, name), (d2, new_name)), (tgt, (d2, new_name), (d1, name))):
            if isinstance(moved, Dir):
                moved.parent, moved.name = nd.ino, nn
            else:
                del moved.links[(od.ino, on)]
                moved.links[(nd.ino, nn)] = None

    # -- attributes: setattr -------------------------------------------------------------------------------------
    @_locked
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                fh: int | None = None) -> Attr:
        self._writable()
        i = self._get(ino)
        if size is not None and isinstance(i, Dir):
            raise _err(errno.EISDIR)
        i = self._ensure_upper(ino, size=size)
        loc = i.wfd if isinstance(i, File) and i.wfd is not None else self._loc(i)
        if size is not None:
            h = self.handles.get(fh) if fh is not None else None
            if h is not None and h.fd is not None and h.writable:
                os.ftruncate(h.fd, size)
            else:
                _truncate(loc, size)
        if mode is not None or uid is not None or gid is not None:
            cur = self._attr(ino)
            nuid = cur.uid if uid is None else uid
            ngid = cur.gid if gid is None else gid
            nmode = stat.S_IMODE(cur.mode) if mode is None else stat.S_IMODE(mode)
            ftype = stat.S_IFMT(cur.mode)
            if mode is None and (uid is not None or gid is not None) and ftype != stat.S_IFDIR:
                # chown clears set-user-ID, and set-group-ID of group-executable files
                nmode &= ~stat.S_ISUID
                if nmode & stat.S_IXGRP:
                    nmode &= ~stat.S_ISGID
            ov = i.override if i.override is not _UNKNOWN else None
            placeholder = isinstance(ov, Override) and ov.ftype is not None
            if (i.override is None and self.euid == 0 and (nuid, ngid) == (cur.uid, cur.gid)
                    and ftype != stat.S_IFLNK):
                _chmod(loc, nmode)     # the owner stays: a chmod is all it takes
            else:
                self._apply_stat(loc, ftype, nuid, ngid, nmode, rdev=cur.rdev, placeholder=placeholder, i=i)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = _lstat(loc)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            _utime(loc, (atime_ns, mtime_ns))
        return self._attr(ino)

    # -- xattrs ------------------------------------------------------------------------------------------------------
    def _xattr_source(self, ino: int) -> tuple[tuple[int, str] | None, dict[str, bytes] | None]:
        i = self._get(ino)
        if isinstance(i, Node):
            return None, i.xattrs
        if i.upper and not (isinstance(i, Dir) and i.dead):
            return self._loc(i), None
        return None, i.lower.xattrs if i.lower is not None else None

    @_locked
    def getxattr(self, ino: int, name: str) -> bytes:
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise _err(errno.ENODATA)
        path, xattrs = self._xattr_source(ino)
        if path is None:
            value = (xattrs or {}).get(name)
            if value is None:
                raise _err(errno.ENODATA)
            return value
        target, kw = _xtarget(path)
        return os.getxattr(target, name, **kw)

    @_locked
    def has_xattr(self, ino: int, name: str) -> bool:
        try:
            self.getxattr(ino, name)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return False
            raise
        return True

    @_locked
    def listxattr(self, ino: int) -> list[str]:
        path, xattrs = self._xattr_source(ino)
        if path is None:
            names = list(xattrs or ())
        else:
            target, kw = _xtarget(path)
            names = os.listxattr(target, **kw)
        return [n for n in names if not n.startswith(RESERVED_XATTR_PREFIX)]

    @_locked
    def setxattr(self, ino: int, name: str, value: bytes) -> None:
        self._writable()
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise _err(errno.EPERM)
        i = self._ensure_upper(ino)
        target, kw = _xtarget(self._loc(i))
        os.setxattr(target, name, value, **kw)

    @_locked
    def removexattr(self, ino: int, name: str) -> None:
        self._writable()
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise _err(errno.ENODATA)
        path, xattrs = self._xattr_source(ino)
        if path is None and name not in (xattrs or {}):
            raise _err(errno.ENODATA)      # like overlayfs: no copy-up for nothing
        i = self._ensure_upper(ino)
        target, kw = _xtarget(self._loc(i))
        os.removexattr(target, name, **kw)

    # -- files -------------------------------------------------------------------------------------------------------
    def _new_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    @_locked
    def open(self, ino: int, flags: int) -> int:
        """Open a regular file; writing (or O_TRUNC) copies it up first. Returns a handle number."""
        i = self._get(ino)
        if isinstance(i, Dir):
            raise _err(errno.EISDIR)
        acc = flags & os.O_ACCMODE
        write = acc != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if write:
            self._writable()
        f = self._file(ino)
        if write:
            self._copy_up(f, size=0 if flags & os.O_TRUNC else None)
        if f.upper:
            fd = self._open_upper_file(f, os.O_RDWR if write else os.O_RDONLY)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
        else:
            fd = None
        f.nopen += 1
        if write and fd is not None:
            f.wfd = fd
        link = self._last_name.get(f.ino) if f.lower is not None and not f.upper else None
        return self._new_handle(Handle(f.ino, fd, write, f.lower.ino if f.lower is not None else 0, link))

    def _open_upper_file(self, f: File, flags: int) -> int:
        dfd, name = self._floc(f)
        if name:
            return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
        return os.open(fd_path(dfd), flags | os.O_CLOEXEC)       # unlinked: opened again through its fd

    def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        if h.fd is None:
            with self._lock:
                f = self.inodes.get(h.ino)
                if isinstance(f, File) and f.upper and h.fd is None:   # copied up since it was opened
                    h.fd = self._open_upper_file(f, os.O_RDONLY)
            if h.fd is None:
                return self.tree.read(h.lower_ino, off, size)
        return os.pread(h.fd, size, off)

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable:
            raise _err(errno.EBADF)
        return os.pwrite(h.fd, data, off)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self.handles.get(fh)
        if h is not None and h.fd is not None and not self.volatile:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on an open handle's upper file, any *mode* the upper file system supports."""
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable:
            raise _err(errno.EBADF)
        _fallocate(h.fd, mode, off, length)

    def direct_fd(self, fh: int) -> int | None:
        """The upper fd that writes on handle *fh* may go to without the overlay, or None: a write
        is a plain pwrite() on it (:meth:`write`), and it stays open until :meth:`release`."""
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable:
            return None
        return h.fd

    def direct_attrs(self, fh: int) -> bool:
        """True when the stat of :meth:`direct_fd`'s fd is the inode's attributes, and owner, mode,
        size and times set on it are what :meth:`setattr` does (as root, a regular upper file with
        no override, one name of its own: not a name of a lower hard-linked file)."""
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable or h.link is not None or self.euid != 0:
            return False
        f = self.inodes.get(h.ino)
        return isinstance(f, File) and f.upper and f.override is None and f.wfd == h.fd

    def handle_is_shared(self, fh: int) -> bool:
        """True for a file opened by one name of a lower hard-linked file: its data must bypass the
        kernel's page cache (which belongs to the inode, and the names may become different files)."""
        h = self.handles.get(fh)
        return h is not None and h.link is not None

    @_locked
    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.fd is not None:
            with contextlib.suppress(OSError):
                os.close(h.fd)
        f = self.inodes.get(h.ino)
        if isinstance(f, File):
            if f.wfd == h.fd:
                f.wfd = None
            f.nopen -= 1
            if f.nopen <= 0 and not f.links:
                self._forget_file(f)

    # -- the file system --------------------------------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.upper_root)
