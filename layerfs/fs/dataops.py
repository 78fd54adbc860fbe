"""Data and attribute operations of the overlay: setattr, xattrs, open files (read, write, fsync,
fallocate, release)."""
from __future__ import annotations

import contextlib
import errno
import os
import stat

from layerfs.fs.dirfds import request
from layerfs.fs.hostcalls import chmod_at, fallocate, fd_path, loc_stat, os_error, truncate_at, utime_at, xattr_target
from layerfs.fs.inodes import UNKNOWN, Attr, Dir, File, Handle
from layerfs.fs.tree import Node
from layerfs.fs.upper import RESERVED_XATTR_PREFIX, Override


class DataOps:
    """Attributes, xattrs and open files (a part of :class:`~layerfs.fs.overlay.Overlay`)."""

    # -- attributes: setattr -------------------------------------------------------------------------------------
    @request
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                fh: int | None = None) -> Attr:
        self.check_writable()
        i = self.inode_of(ino)
        if size is not None and isinstance(i, Dir):
            raise os_error(errno.EISDIR)
        i = self.ensure_upper(ino, size=size)
        loc = i.wfd if isinstance(i, File) and i.wfd is not None else self.loc_of(i)
        if size is not None:
            h = self.handles.get(fh) if fh is not None else None
            if h is not None and h.fd is not None and h.writable:
                os.ftruncate(h.fd, size)
            else:
                truncate_at(loc, size)
        if mode is not None or uid is not None or gid is not None:
            cur = self.attr_of(ino)
            nuid = cur.uid if uid is None else uid
            ngid = cur.gid if gid is None else gid
            nmode = stat.S_IMODE(cur.mode) if mode is None else stat.S_IMODE(mode)
            ftype = stat.S_IFMT(cur.mode)
            if mode is None and (uid is not None or gid is not None) and ftype != stat.S_IFDIR:
                # chown clears set-user-ID, and set-group-ID of group-executable files
                nmode &= ~stat.S_ISUID
                if nmode & stat.S_IXGRP:
                    nmode &= ~stat.S_ISGID
            ov = i.override if i.override is not UNKNOWN else None
            placeholder = isinstance(ov, Override) and ov.ftype is not None
            if (i.override is None and self.euid == 0 and (nuid, ngid) == (cur.uid, cur.gid)
                    and ftype != stat.S_IFLNK):
                chmod_at(loc, nmode)     # the owner stays: a chmod is all it takes
            else:
                self.apply_stat(loc, ftype, nuid, ngid, nmode, rdev=cur.rdev, placeholder=placeholder, i=i)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = loc_stat(loc)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            utime_at(loc, (atime_ns, mtime_ns))
        return self.attr_of(ino)

    # -- xattrs ------------------------------------------------------------------------------------------------------
    def _xattr_source(self, ino: int) -> tuple[tuple[int, str] | None, dict[str, bytes] | None]:
        i = self.inode_of(ino)
        if isinstance(i, Node):
            return None, i.xattrs
        if i.upper and not (isinstance(i, Dir) and i.dead):
            return self.loc_of(i), None
        return None, i.lower.xattrs if i.lower is not None else None

    @request
    def getxattr(self, ino: int, name: str) -> bytes:
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise os_error(errno.ENODATA)
        path, xattrs = self._xattr_source(ino)
        if path is None:
            value = (xattrs or {}).get(name)
            if value is None:
                raise os_error(errno.ENODATA)
            return value
        target, kw = xattr_target(path)
        return os.getxattr(target, name, **kw)

    @request
    def has_xattr(self, ino: int, name: str) -> bool:
        try:
            self.getxattr(ino, name)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return False
            raise
        return True

    @request
    def listxattr(self, ino: int) -> list[str]:
        path, xattrs = self._xattr_source(ino)
        if path is None:
            names = list(xattrs or ())
        else:
            target, kw = xattr_target(path)
            names = os.listxattr(target, **kw)
        return [n for n in names if not n.startswith(RESERVED_XATTR_PREFIX)]

    @request
    def setxattr(self, ino: int, name: str, value: bytes) -> None:
        self.check_writable()
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise os_error(errno.EPERM)
        i = self.ensure_upper(ino)
        target, kw = xattr_target(self.loc_of(i))
        os.setxattr(target, name, value, **kw)

    @request
    def removexattr(self, ino: int, name: str) -> None:
        self.check_writable()
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise os_error(errno.ENODATA)
        path, xattrs = self._xattr_source(ino)
        if path is None and name not in (xattrs or {}):
            raise os_error(errno.ENODATA)      # like overlayfs: no copy-up for nothing
        i = self.ensure_upper(ino)
        target, kw = xattr_target(self.loc_of(i))
        os.removexattr(target, name, **kw)

    # -- files -------------------------------------------------------------------------------------------------------
    def new_handle(self, h: Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    @request
    def open(self, ino: int, flags: int) -> int:
        """Open a regular file; writing (or O_TRUNC) copies it up first. Returns a handle number."""
        i = self.inode_of(ino)
        if isinstance(i, Dir):
            raise os_error(errno.EISDIR)
        acc = flags & os.O_ACCMODE
        write = acc != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if write:
            self.check_writable()
        f = self.file_inode(ino)
        if write:
            self.copy_up(f, size=0 if flags & os.O_TRUNC else None)
        if f.upper:
            fd = self._open_upper_file(f, os.O_RDWR if write else os.O_RDONLY)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
        else:
            fd = None
        f.nopen += 1
        if write and fd is not None:
            f.wfd = fd
        link = self.last_name.get(f.ino) if f.lower is not None and not f.upper else None
        return self.new_handle(Handle(f.ino, fd, write, f.lower.ino if f.lower is not None else 0, link))

    def _open_upper_file(self, f: File, flags: int) -> int:
        dfd, name = self.file_loc(f)
        if name:
            return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
        return os.open(fd_path(dfd), flags | os.O_CLOEXEC)       # unlinked: opened again through its fd

    def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise os_error(errno.EBADF)
        if h.fd is None:
            with self.lock:
                f = self.inodes.get(h.ino)
                if isinstance(f, File) and f.upper and h.fd is None:   # copied up since it was opened
                    h.fd = self._open_upper_file(f, os.O_RDONLY)
            if h.fd is None:
                return self.tree.read(h.lower_ino, off, size)
        return os.pread(h.fd, size, off)

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable:
            raise os_error(errno.EBADF)
        return os.pwrite(h.fd, data, off)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self.handles.get(fh)
        if h is not None and h.fd is not None and not self.volatile:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on an open handle's upper file, any *mode* the upper file system supports."""
        h = self.handles.get(fh)
        if h is None or h.fd is None or not h.writable:
            raise os_error(errno.EBADF)
        fallocate(h.fd, mode, off, length)

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

    @request
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
                self.forget_file(f)
