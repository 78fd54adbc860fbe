"""rename(2) in the overlay, with RENAME_NOREPLACE and RENAME_EXCHANGE, as kernel overlayfs does it
(index=off/on, redirect_dir=off)."""
from __future__ import annotations

import errno
import os

from layerfs.fs.dirfds import request
from layerfs.fs.hostcalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, os_error, renameat2, touch_at
from layerfs.fs.inodes import Dir, File
from layerfs.fs.tree import ROOT_INO, Node
from layerfs.fs.upper import OPAQUE_MARKER, WH_DEVICE


class Renames:
    """Renames (a part of :class:`~layerfs.fs.overlay.Overlay`)."""

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

    @request
    def rename(self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0) -> None:
        self.check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise os_error(errno.EINVAL)
        d1, d2 = self.dir_inode(parent), self.dir_inode(new_parent)
        e1, e2 = self.entries_of(d1), self.entries_of(d2)
        sino = e1.get(name)
        if sino is None:
            raise os_error(errno.ENOENT)
        if d2.dead:
            raise os_error(errno.ENOENT)
        tino = e2.get(new_name)
        if flags & RENAME_EXCHANGE and tino is None:
            raise os_error(errno.ENOENT)
        if flags & RENAME_NOREPLACE and tino is not None:
            raise os_error(errno.EEXIST)
        src = self.inode_of(sino)
        tgt = self.inode_of(tino) if tino is not None else None
        if d1 is d2 and name == new_name:
            return
        if not flags & RENAME_EXCHANGE:
            self.check_name(new_name)
        if tgt is not None and not flags & RENAME_EXCHANGE:
            if isinstance(src, Dir) and not isinstance(tgt, Dir):
                raise os_error(errno.ENOTDIR)
            if not isinstance(src, Dir) and isinstance(tgt, Dir):
                raise os_error(errno.EISDIR)
        if isinstance(src, Dir) and self._is_ancestor(src, d2):
            raise os_error(errno.EINVAL)
        if flags & RENAME_EXCHANGE and isinstance(tgt, Dir) and self._is_ancestor(tgt, d1):
            raise os_error(errno.EINVAL)
        if tino == sino:    # two names of one file: nothing to do (rename(2))
            return
        if not self._movable(src) or (flags & RENAME_EXCHANGE and not self._movable(tgt)):  # type: ignore[arg-type]
            raise os_error(errno.EXDEV)
        if isinstance(tgt, Dir) and not flags & RENAME_EXCHANGE and not self.is_empty(tgt):
            raise os_error(errno.ENOTEMPTY)
        if flags & RENAME_EXCHANGE:
            self._exchange(d1, name, sino, d2, new_name, tino)  # type: ignore[arg-type]
        else:
            self._move(d1, name, sino, d2, new_name, tino)

    def _copy_up_named(self, ino: int) -> Dir | File:
        return self.ensure_upper(ino)

    def _move(self, d1: Dir, name: str, sino: int, d2: Dir, new_name: str, tino: int | None) -> None:
        self.copy_up_dir(d1)
        self.copy_up_dir(d2)
        src = self._copy_up_named(sino)
        f1, f2 = self.dirfds.get(d1), self.dirfds.get(d2)
        tgt = self.inodes.get(tino) if tino is not None else None
        if tino is not None and tgt is None:
            tgt = self.file_inode(tino)
        if (self.index and isinstance(tgt, File) and not tgt.upper and tgt.lower is not None
                and tgt.lower.nlink > 1):
            self.last_name[tgt.ino] = (d2.ino, new_name)
            self.copy_up(tgt)          # as unlink: the other names' count goes down
        if isinstance(src, Dir):
            # a directory moved where a lower entry of that name exists must hide it
            if self.lower_child(d2, new_name) is not None and not src.opaque:
                touch_at(self.dirfds.get(src), OPAQUE_MARKER)
                src.opaque = True
        form = None
        if self.needs_whiteout(d1, name) and name not in d1.whiteouts:
            form = self.whiteout_form(name)
            if form != WH_DEVICE:   # first: the old name stays shown by the upper entry until the rename
                self.remove_name(d1, f1, name, None, True)
        if isinstance(tgt, Dir) and tgt.upper:
            self.discard_upper_dir(f2, new_name)  # empty in the merged view: only whiteouts inside
            self.dirfds.drop(tgt.ino)
        if isinstance(tgt, File):
            self.last_name_going(tgt, (f2, new_name))
        over_device = d2.whiteouts.get(new_name) == WH_DEVICE
        if isinstance(src, Dir) and over_device:
            # rename(2) moves no directory over a device: swap them; the device is the old name's
            # whiteout now, or goes
            renameat2(f1, name, f2, new_name, RENAME_EXCHANGE)
            if form == WH_DEVICE:
                d1.whiteouts[name] = WH_DEVICE
            else:
                os.unlink(name, dir_fd=f1)
        elif form == WH_DEVICE:
            try:
                renameat2(f1, name, f2, new_name, RENAME_WHITEOUT)     # moved, and a device left behind
                d1.whiteouts[name] = WH_DEVICE
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.ENOSYS):
                    raise
                os.rename(name, new_name, src_dir_fd=f1, dst_dir_fd=f2)
                self.remove_name(d1, f1, name, None, True)
        else:
            os.rename(name, new_name, src_dir_fd=f1, dst_dir_fd=f2)
        if over_device:
            del d2.whiteouts[new_name]
        else:
            self.drop_whiteout(d2, f2, new_name)
        # bookkeeping
        e1, e2 = self.entries_of(d1), self.entries_of(d2)
        del e1[name]
        if tgt is not None:
            if isinstance(tgt, Dir):
                tgt.dead = True
                tgt.upper = False
            else:
                tgt.links.pop((d2.ino, new_name), None)
                if not tgt.links and tgt.nopen == 0:
                    self.forget_file(tgt)
        e2[new_name] = sino
        if isinstance(src, Dir):
            src.parent = d2.ino         # its fd (and those below it) stay valid
            src.name = new_name
        else:
            del src.links[(d1.ino, name)]
            src.links[(d2.ino, new_name)] = None

    def _exchange(self, d1: Dir, name: str, sino: int, d2: Dir, new_name: str, tino: int) -> None:
        self.copy_up_dir(d1)
        self.copy_up_dir(d2)
        src = self._copy_up_named(sino)
        tgt = self._copy_up_named(tino)
        f1, f2 = self.dirfds.get(d1), self.dirfds.get(d2)
        for moved, dest_dir, dest_name in ((src, d2, new_name), (tgt, d1, name)):
            if isinstance(moved, Dir) and not moved.opaque and self.lower_child(dest_dir, dest_name) is not None:
                touch_at(self.dirfds.get(moved), OPAQUE_MARKER)
                moved.opaque = True
        renameat2(f1, name, f2, new_name, RENAME_EXCHANGE)
        e1, e2 = self.entries_of(d1), self.entries_of(d2)
        e1[name], e2[new_name] = tino, sino
        for moved, (od, on), (nd, nn) in ((src, (d1, name), (d2, new_name)), (tgt, (d2, new_name), (d1, name))):
            if isinstance(moved, Dir):
                moved.parent, moved.name = nd.ino, nn
            else:
                del moved.links[(od.ino, on)]
                moved.links[(nd.ino, nn)] = None
