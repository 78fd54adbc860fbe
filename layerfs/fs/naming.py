"""Name operations of the overlay: creating entries (create, mknod, mkdir, symlink, link) and removing
them (unlink, rmdir, forget), with the whiteouts that hide lower names."""
from __future__ import annotations

import contextlib
import errno
import os
import stat

from layerfs.fs.dirfds import request
from layerfs.fs.hostcalls import RENAME_EXCHANGE, fd_path, loc_stat, os_error, renameat2, touch_at
from layerfs.fs.inodes import Attr, Dir, File, Handle
from layerfs.fs.upper import (
    OPAQUE_MARKER,
    WH_DEVICE,
    WH_FILE,
    WH_RECORD,
    WHITEOUTS_XATTR,
    format_whiteout_record,
    make_device_whiteout,
    whiteout_file_fits,
    whiteout_file_name,
)


class NameOps:
    """Creating and removing names (a part of :class:`~layerfs.fs.overlay.Overlay`)."""

    # -- creating entries ----------------------------------------------------------------------------------
    def _prepare_create(self, parent: int, name: str) -> tuple[Dir, int]:
        self.check_writable()
        d = self.dir_inode(parent)
        if d.dead:
            raise os_error(errno.ENOENT)
        self.check_name(name)
        if name in self.entries_of(d):
            raise os_error(errno.EEXIST)
        self.copy_up_dir(d)
        return d, self.dirfds.get(d)

    def _owner_for(self, d: Dir, uid: int, gid: int, mode: int, is_dir: bool) -> tuple[int, int, int]:
        da = self.attr_of(d.ino)
        if da.mode & stat.S_ISGID:
            gid = da.gid
            if is_dir:
                mode |= stat.S_ISGID
        return uid, gid, mode

    def _make_at(self, d: Dir, dfd: int, name: str) -> tuple[int, str]:
        """Where to make the new entry *name* of *d*: at its name, or as a work-dir temporary when a
        device whiteout holds the name (:meth:`_settle` then moves it over the device atomically)."""
        if d.whiteouts.get(name) == WH_DEVICE:
            return self.work_fd, self.work_name("n")
        return dfd, name

    def _settle(self, d: Dir, dfd: int, name: str, at: tuple[int, str], is_dir: bool) -> None:
        """The entry just made at *at* takes the name *name* of *d*; the name's whiteout goes."""
        if at != (dfd, name):
            if d.whiteouts.get(name) == WH_DEVICE:
                if is_dir:      # rename(2) moves no directory over a device: swap them, drop the device
                    renameat2(at[0], at[1], dfd, name, RENAME_EXCHANGE)
                    os.unlink(at[1], dir_fd=at[0])
                else:
                    os.rename(at[1], name, src_dir_fd=at[0], dst_dir_fd=dfd)
                del d.whiteouts[name]
                return
            os.rename(at[1], name, src_dir_fd=at[0], dst_dir_fd=dfd)
        self.drop_whiteout(d, dfd, name)

    def drop_whiteout(self, d: Dir, dfd: int, name: str) -> None:
        """The whiteout of *name* goes (an upper entry of that name exists now)."""
        form = d.whiteouts.get(name)
        if form == WH_FILE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(whiteout_file_name(name), dir_fd=dfd)
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
            raise os_error(errno.ENOSPC if e.errno == errno.E2BIG else e.errno,
                       "no room for more whiteouts of long names in this directory") from None

    def _add_file(self, d: Dir, name: str, ino: int | None = None) -> File:
        ino = self.new_ino() if ino is None else ino
        f = File(ino, None, True)
        f.links[(d.ino, name)] = None
        self.inodes[ino] = f
        self.entries_of(d)[name] = ino
        return f

    @staticmethod
    def _unmake(at: tuple[int, str]) -> None:
        with contextlib.suppress(OSError):
            os.unlink(at[1], dir_fd=at[0])

    @request
    def create(self, parent: int, name: str, mode: int, flags: int, *, uid: int, gid: int) -> tuple[int, Attr]:
        """Create and open a regular file (O_EXCL implied: the name must not exist). Returns (fh, attr)."""
        d, dfd = self._prepare_create(parent, name)
        uid, gid, mode = self._owner_for(d, uid, gid, stat.S_IMODE(mode), False)
        at = self._make_at(d, dfd, name)
        fd = os.open(at[1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=at[0])
        try:
            f = self._add_file(d, name)
            f.override = None          # a new file has no xattrs
            self.apply_stat(fd, stat.S_IFREG, uid, gid, mode, i=f)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            os.close(fd)
            self._unmake(at)
            self.entries_of(d).pop(name, None)
            raise
        f.nopen += 1
        f.wfd = fd
        fh = self.new_handle(Handle(f.ino, fd, True, 0))
        return fh, self.attr_of(f.ino)

    @request
    def mknod(self, parent: int, name: str, mode: int, rdev: int = 0, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        uid, gid, perm = self._owner_for(d, uid, gid, stat.S_IMODE(mode), False)
        if ftype not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise os_error(errno.EINVAL)
        if ftype == stat.S_IFCHR and rdev == 0:
            raise os_error(errno.EPERM, "a character device 0/0 is a whiteout")     # as overlayfs says
        at = self._make_at(d, dfd, name)
        placeholder = False
        if ftype == stat.S_IFREG:
            os.close(os.open(at[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=at[0]))
        else:
            placeholder = not self.make_special(at[0], at[1], ftype, rdev)
        return self._register_made(d, dfd, name, at, ftype, uid, gid, perm, rdev=rdev, placeholder=placeholder)

    def _register_made(self, d: "Dir", dfd: int, name: str, at: tuple[int, str], ftype: int, uid: int, gid: int,
                       perm: int, **stat_kw) -> Attr:
        """Record a non-directory just made at *at* (see :meth:`_make_at`): owner and mode applied,
        the name entered, its whiteout dropped; on failure the file is removed again."""
        try:
            f = self._add_file(d, name)
            self.apply_stat(at, ftype, uid, gid, perm, i=f, **stat_kw)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            self._unmake(at)
            self.entries_of(d).pop(name, None)
            raise
        return self.attr_of(f.ino)

    @request
    def mkdir(self, parent: int, name: str, mode: int, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        uid, gid, mode = self._owner_for(d, uid, gid, stat.S_IMODE(mode), True)
        hides_lower = self.lower_child(d, name) is not None or d.whiteouts.get(name) == WH_DEVICE
        ino = self.new_ino()
        child = Dir(ino, d.ino, name, None, True)
        child.entries = {}
        if hides_lower:
            # over a whiteout: made complete (opaque) in the work dir, then renamed into place
            wfd = self.work_fd
            tmp = self.work_name("m")
            os.mkdir(tmp, 0o700, dir_fd=wfd)
            try:
                tfd = os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
                try:
                    touch_at(tfd, OPAQUE_MARKER)
                finally:
                    os.close(tfd)
                self.apply_stat((wfd, tmp), stat.S_IFDIR, uid, gid, mode, i=child)
                self._settle(d, dfd, name, (wfd, tmp), True)
            except BaseException:
                self.rm_work(tmp)
                raise
            child.opaque = True
        else:
            os.mkdir(name, 0o700, dir_fd=dfd)
            try:
                self.apply_stat((dfd, name), stat.S_IFDIR, uid, gid, mode, i=child)
                self.drop_whiteout(d, dfd, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=dfd)
                raise
        self.inodes[ino] = child
        self.entries_of(d)[name] = ino
        return self.attr_of(ino)

    @request
    def symlink(self, parent: int, name: str, target: str, *, uid: int, gid: int) -> Attr:
        d, dfd = self._prepare_create(parent, name)
        uid, gid, _ = self._owner_for(d, uid, gid, 0o777, False)
        at = self._make_at(d, dfd, name)
        os.symlink(target, at[1], dir_fd=at[0])
        return self._register_made(d, dfd, name, at, stat.S_IFLNK, uid, gid, 0o777)

    @request
    def link(self, ino: int, parent: int, name: str) -> Attr:
        self.check_writable()
        i = self.inode_of(ino)
        if isinstance(i, Dir):
            raise os_error(errno.EPERM)
        d, dfd = self._prepare_create(parent, name)
        f = self.file_inode(ino)
        if not f.links and not f.upper:
            raise os_error(errno.ENOENT)
        self.copy_up(f)
        if not f.links:
            raise os_error(errno.ENOENT)
        sfd, sname = self.file_loc(f)
        at = self._make_at(d, dfd, name)
        os.link(sname, at[1], src_dir_fd=sfd, dst_dir_fd=at[0], follow_symlinks=False)
        try:
            st = loc_stat(at)
            self._settle(d, dfd, name, at, False)
        except BaseException:
            self._unmake(at)
            raise
        self.upper_inos[(st.st_dev, st.st_ino)] = f.ino
        f.links[(d.ino, name)] = None
        self.entries_of(d)[name] = f.ino
        return self.attr_of(f.ino)

    # -- removing entries ----------------------------------------------------------------------------------------
    def whiteout_form(self, name: str) -> str:
        if whiteout_file_fits(name):
            return WH_FILE
        return WH_DEVICE if self.device_whiteouts else WH_RECORD

    def remove_name(self, d: Dir, dfd: int, name: str, kind: str | None, whiteout: bool) -> None:
        """Remove the upper entry *name* of *d* (*kind* ``"file"``, ``"dir"`` or None: there is none),
        leaving a whiteout of the lower entry when *whiteout*. A ``.wh.`` file or a recorded name
        is written before the entry goes; a device whiteout replaces the entry in one rename."""
        form = self.whiteout_form(name) if whiteout and name not in d.whiteouts else None
        if form == WH_DEVICE:
            try:
                self._device_whiteout(d, dfd, name, kind)
                return
            except PermissionError:     # no CAP_MKNOD after all: the record
                self.device_whiteouts = False
                form = WH_RECORD
        if form == WH_FILE:
            touch_at(dfd, whiteout_file_name(name))
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
            self.discard_upper_dir(dfd, name)

    def _device_whiteout(self, d: Dir, dfd: int, name: str, kind: str | None) -> None:
        if kind is None:
            make_device_whiteout(name, dfd)
        else:
            wfd = self.work_fd
            tmp = self.work_name("w")
            make_device_whiteout(tmp, wfd)
            try:
                if kind == "file":
                    os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=dfd)    # replaces the file atomically
                else:
                    renameat2(wfd, tmp, dfd, name, RENAME_EXCHANGE)
            finally:
                self.rm_work(tmp)      # the device if the rename failed, the directory after a swap
        d.whiteouts[name] = WH_DEVICE

    def needs_whiteout(self, d: Dir, name: str) -> bool:
        return self.lower_child(d, name) is not None

    def last_name_going(self, f: File, loc: tuple[int, str]) -> None:
        """Before the last upper name of *f* goes: keep an fd of it while it is open, else its attributes."""
        if len(f.links) != 1 or not f.upper:
            return
        if f.nopen > 0 and f.anon_fd is None:
            f.anon_fd = os.open(loc[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc[0])
        else:
            f.dead_attr = self.upper_attr(f, loc)
            f.dead_attr.nlink = 0

    def _name_gone(self, f: File, d: Dir, name: str) -> None:
        del f.links[(d.ino, name)]
        if not f.links and f.nopen == 0:
            self.forget_file(f)

    def forget_file(self, f: File) -> None:
        f.dead = True
        if f.anon_fd is not None:
            with contextlib.suppress(OSError):
                os.close(f.anon_fd)
            f.anon_fd = None
        # kept until the kernel forgets the inode (see forget): fstat of an open fifo, devices
        if f.upper and f.dead_attr is None and f.ino >= len(self.nodes):
            self.inodes.pop(f.ino, None)

    @request
    def forget(self, ino: int) -> None:
        """The kernel dropped *ino*: a file without names is gone for good."""
        f = self.inodes.get(ino)
        if isinstance(f, File) and f.dead and not f.links and f.nopen <= 0 and f.ino >= len(self.nodes):
            del self.inodes[ino]

    def _removable(self, parent: int, name: str) -> tuple[Dir, dict[str, int], int]:
        """(parent dir, its entries, the inode) of a name about to be removed; EROFS, ENOENT."""
        self.check_writable()
        d = self.dir_inode(parent)
        entries = self.entries_of(d)
        ino = entries.get(name)
        if ino is None:
            raise os_error(errno.ENOENT)
        return d, entries, ino

    @request
    def unlink(self, parent: int, name: str) -> None:
        d, entries, ino = self._removable(parent, name)
        if isinstance(self.inodes.get(ino), Dir):
            raise os_error(errno.EISDIR)
        f = self.file_inode(ino)
        self.copy_up_dir(d)
        if self.index and not f.upper and f.lower is not None and f.lower.nlink > 1:
            self.last_name[f.ino] = (d.ino, name)
            self.copy_up(f)            # as overlayfs with index=on: the other names' count goes down
        dfd = self.dirfds.get(d)
        whiteout = self.needs_whiteout(d, name)
        if f.upper:
            self.last_name_going(f, (dfd, name))
            self.remove_name(d, dfd, name, "file", whiteout)
            self._name_gone(f, d, name)
        else:
            if whiteout:
                self.remove_name(d, dfd, name, None, True)
            del f.links[(d.ino, name)]
        del entries[name]

    def is_empty(self, d: Dir) -> bool:
        return not self.entries_of(d)

    def discard_upper_dir(self, dfd: int, name: str) -> None:
        """Move an upper directory (holding only whiteouts) away atomically, then delete it."""
        trash = self.work_name("r")
        os.rename(name, trash, src_dir_fd=dfd, dst_dir_fd=self.work_fd)
        self.rm_work(trash)

    @request
    def rmdir(self, parent: int, name: str) -> None:
        d, entries, ino = self._removable(parent, name)
        child = self.inodes.get(ino)
        if not isinstance(child, Dir):
            raise os_error(errno.ENOTDIR)
        if not self.is_empty(child):
            raise os_error(errno.ENOTEMPTY)
        self.copy_up_dir(d)
        dfd = self.dirfds.get(d)
        whiteout = self.needs_whiteout(d, name)
        if child.upper:
            self.remove_name(d, dfd, name, "dir", whiteout)
            self.dirfds.drop(child.ino)
        elif whiteout:
            self.remove_name(d, dfd, name, None, True)
        del entries[name]
        child.dead = True
        child.upper = False
