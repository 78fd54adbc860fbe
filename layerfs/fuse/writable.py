"""The FUSE adapter of the writable overlay: handlers serving a :class:`~layerfs.fs.overlay.Overlay`.

Thin like :mod:`layerfs.fuse.readonly` (whose mount loop, options and attribute
constants it reuses): names are decoded, errors become errnos, the caller's
uid/gid go to new entries; the semantics live in the overlay.

Threads: requests are served by the native threads of :mod:`layerfs._fuse`
(see :mod:`layerfs.fuse.readonly`), each calling these plain methods. The overlay
serialises namespace changes with its own lock; reads and writes on open
handles run in parallel (the GIL is released in every syscall).

Caching (correctness first): everything that changes does so through the
kernel, which updates or drops its own cached entries and attributes for the
request it sent (create, unlink, rename, setattr, write...). What changes
behind its back is invalidated synchronously, before the reply, with
attribute-only invalidations (no inode lock is involved, so no deadlock):
a lower directory becoming merged (``st_nlink`` 1), a hard-linked lower
file copied up. Names of lower hard-linked files get entry timeout 0, so the
kernel looks them up on every path walk: their inode can change when another
name of the same lower file is copied up; files opened by such names use direct I/O (the page
cache belongs to the inode, and its names may become different files).
Everything else keeps long
timeouts, negative entries included; file data stays in the page cache
across opens (``keep_cache``): only this mount writes the upper directory.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import sys
from typing import Callable, Iterable

from layerfs import _fuse
from layerfs.errors import LayerfsError
from layerfs.fs import Attr, Overlay
from layerfs.fs import ROOT_INO
from layerfs.fuse.readonly import CACHE_TIMEOUT, fuse_error, serve

log = logging.getLogger(__name__)

_FSENC = sys.getfilesystemencoding()
#: rename(2) flags the overlay knows (RENAME_NOREPLACE, RENAME_EXCHANGE)
_RENAME_FLAGS = 1 | 2
_CAPABILITY = "security.capability"
_SET_ANY = (_fuse.SET_ATTR_MODE | _fuse.SET_ATTR_UID | _fuse.SET_ATTR_GID | _fuse.SET_ATTR_SIZE | _fuse.SET_ATTR_ATIME
            | _fuse.SET_ATTR_MTIME)


def _name(raw: bytes) -> str:
    return raw.decode(_FSENC, "surrogateescape")


def _entry(a: Attr) -> tuple:
    return (a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size, a.blocks, a.atime_ns, a.mtime_ns, a.ctime_ns,
            0.0 if a.unstable_name else CACHE_TIMEOUT)


class OverlayFS:
    """The handlers serving one :class:`Overlay` (writable unless the overlay is read-only)."""

    def __init__(self, overlay: Overlay):
        self.ovl = overlay
        self._nodes = overlay.nodes            # the mount loop makes lazy lower nodes in the background
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._dir_ino: dict[int, int] = {}
        self._dir_fhs = itertools.count(1)      # next() is atomic: handlers run in several threads
        self.session = None                    # set by serve(); kernel notifications once the mount answers
        self.live = False
        overlay.on_attr_changed = self._attr_changed

    def error(self, op: str, e: BaseException) -> int:
        """The errno reply for a failure that is not an ordinary answer (EIO and the like), logged."""
        if isinstance(e, OSError):
            log.warning("%s: %s", op, e)
            return e.errno or errno.EIO
        if isinstance(e, LayerfsError):
            log.error("%s failed: %s", op, e.one_line())
            return e.errno or errno.EIO
        log.error("%s failed", op, exc_info=e)
        return errno.EIO

    def _attr_changed(self, ino: int) -> None:
        if not self.live:
            return
        try:
            self.session.invalidate_inode(ino, True)
        except OSError as e:     # ENOENT: the kernel does not know the inode
            log.debug("invalidate_inode(%d): %s", ino, e)

    # -- names and attributes -------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes):
        try:
            return _entry(self.ovl.lookup(parent, _name(name)))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def forget(self, inodes):
        # inodes with names live as long as the overlay; a forgotten one without names goes
        for ino, _ in inodes:
            self.ovl.forget(ino)

    def getattr(self, ino: int, fh):
        return _entry(self.ovl.getattr(ino))

    def setattr(self, ino, to_set, mode, uid, gid, size, atime_ns, mtime_ns, fh):
        if not to_set & _SET_ANY:     # ctime only (e.g. a write that cleared nothing): nothing to store
            return _entry(self.ovl.getattr(ino))
        return _entry(self.ovl.setattr(
            ino, fh=fh,
            mode=mode if to_set & _fuse.SET_ATTR_MODE else None,
            uid=uid if to_set & _fuse.SET_ATTR_UID else None,
            gid=gid if to_set & _fuse.SET_ATTR_GID else None,
            size=size if to_set & _fuse.SET_ATTR_SIZE else None,
            atime_ns=atime_ns if to_set & _fuse.SET_ATTR_ATIME else None,
            mtime_ns=mtime_ns if to_set & _fuse.SET_ATTR_MTIME else None))

    def readlink(self, ino: int) -> bytes:
        return os.fsencode(self.ovl.readlink(ino))

    # -- creating and removing ---------------------------------------------------------------------------
    def mknod(self, parent, name, mode, rdev, uid, gid):
        return _entry(self.ovl.mknod(parent, _name(name), mode, rdev, uid=uid, gid=gid))

    def mkdir(self, parent, name, mode, uid, gid):
        return _entry(self.ovl.mkdir(parent, _name(name), mode, uid=uid, gid=gid))

    def symlink(self, parent, name, target, uid, gid):
        return _entry(self.ovl.symlink(parent, _name(name), _name(target), uid=uid, gid=gid))

    def link(self, ino, new_parent, new_name):
        return _entry(self.ovl.link(ino, new_parent, _name(new_name)))

    def unlink(self, parent, name):
        self.ovl.unlink(parent, _name(name))

    def rmdir(self, parent, name):
        self.ovl.rmdir(parent, _name(name))

    def rename(self, parent, name, new_parent, new_name, flags):
        if flags & ~_RENAME_FLAGS:
            raise fuse_error(errno.EINVAL)
        self.ovl.rename(parent, _name(name), new_parent, _name(new_name), flags)

    # -- extended attributes -----------------------------------------------------------------------------
    def getxattr(self, ino, name):
        return self.ovl.getxattr(ino, _name(name))

    def listxattr(self, ino):
        return [os.fsencode(n) for n in self.ovl.listxattr(ino)]

    def setxattr(self, ino, name, value, flags):
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise fuse_error(errno.EINVAL)
        if flags:
            try:
                self.ovl.getxattr(ino, _name(name))
            except OSError as e:
                if e.errno != errno.ENODATA or flags & os.XATTR_REPLACE:
                    raise
            else:
                if flags & os.XATTR_CREATE:
                    raise fuse_error(errno.EEXIST)
        self.ovl.setxattr(ino, _name(name), value)

    def removexattr(self, ino, name):
        self.ovl.removexattr(ino, _name(name))

    # -- directories ----------------------------------------------------------------------------------------
    def opendir(self, ino):
        if not stat.S_ISDIR(self.ovl.getattr(ino).mode):
            raise fuse_error(errno.ENOTDIR)
        fh = next(self._dir_fhs)
        self._dir_ino[fh] = ino
        return fh, 0

    def _snapshot(self, fh: int) -> list[tuple[bytes, Attr]]:
        ino = self._dir_ino[fh]
        entries = self.ovl.readdir(ino)
        here = self.ovl.getattr(ino)
        try:
            up = self.ovl.getattr(self.ovl.parent_of(ino))
        except OSError:
            up = here
        snap = [(b".", here), (b"..", up)] + [(os.fsencode(n), a) for n, a in entries]
        self._dirs[fh] = snap
        return snap

    def readdir(self, ino, fh, off, count):
        # offsets: 0 ".", 1 "..", 2 + i the i-th entry of a snapshot taken when reading starts (or restarts)
        snap = self._dirs.get(fh)
        if snap is None or off == 0:
            snap = self._snapshot(fh)
        return [(name, _entry(a), i) for i, (name, a) in enumerate(snap[off:off + count], off + 1)]

    def releasedir(self, fh):
        self._dirs.pop(fh, None)
        self._dir_ino.pop(fh, None)

    # -- files --------------------------------------------------------------------------------------------------
    def open(self, ino, flags):
        fh = self.ovl.open(ino, flags)
        if self.ovl.handle_is_shared(fh):      # one name of a lower hard-linked file: no page cache
            bits = _fuse.DIRECT_IO | _fuse.NOFLUSH
        else:
            bits = _fuse.KEEP_CACHE | _fuse.NOFLUSH
        if flags & os.O_ACCMODE != os.O_RDONLY and not self.ovl.has_xattr(ino, _CAPABILITY):
            bits |= _fuse.NO_CAPABILITY        # the kernel asks before every write: answered without us
        return fh, bits | self._direct_bits(fh), self.ovl.direct_fd(fh)

    def create(self, parent, name, mode, flags, uid, gid):
        fh, a = self.ovl.create(parent, _name(name), mode, flags, uid=uid, gid=gid)
        # a new file has no xattrs; its writes (and, as root, its stat, chown, chmod and utimes through
        # the handle) are done by the binding on the upper fd itself
        return (fh, _fuse.KEEP_CACHE | _fuse.NOFLUSH | _fuse.NO_CAPABILITY | self._direct_bits(fh), _entry(a),
                self.ovl.direct_fd(fh))

    def _direct_bits(self, fh: int) -> int:
        return _fuse.DIRECT_ATTR if self.ovl.direct_attrs(fh) else 0

    def read(self, ino, fh, off, size):
        return self.ovl.read(fh, off, size)

    def write(self, fh, off, data):
        return self.ovl.write(fh, off, data)

    def fsync(self, fh, datasync):
        self.ovl.fsync(fh, bool(datasync))

    def fallocate(self, fh, mode, off, length):
        self.ovl.fallocate(fh, mode, off, length)

    def release(self, fh):
        self.ovl.release(fh)

    # -- the file system -------------------------------------------------------------------------------------------
    def statfs(self):
        st = self.ovl.statfs()
        return (st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                st.f_favail, st.f_namemax)


def serve_overlay(overlay: Overlay, mountpoint: str, options: Iterable[str], *,
                  on_ready: Callable[[], None] | None = None, threads: int | None = None) -> None:
    """Mount *overlay* at *mountpoint* and serve it until unmounted (see :func:`layerfs.fuse.readonly.serve`)."""
    ops = OverlayFS(overlay)

    def ready() -> None:
        ops.live = True
        if on_ready is not None:
            on_ready()

    serve(overlay.tree, mountpoint, options, on_ready=ready, threads=threads, ops=ops)


assert ROOT_INO == _fuse.ROOT_INO
