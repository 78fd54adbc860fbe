"""Copy-up: giving a lower entry (and its parents) an upper one before its first change, its owner and
mode (really, or through the override xattr), and with index=on the names of lower hard-linked files."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from typing import Iterator

from layerfs.fs.hostcalls import chmod_at, chown_at, loc_stat, os_error, utime_at, xattr_target
from layerfs.fs.inodes import Dir, File
from layerfs.fs.tree import ROOT_INO, Node
from layerfs.fs.upper import NAME_MAX, OVERRIDE_XATTR, RESERVED_XATTR_PREFIX, WH_PREFIX, Override, is_reserved_name

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20


class CopyUp:
    """Copy-up of lower entries (a part of :class:`~layerfs.fs.overlay.Overlay`)."""

    # -- writing helpers -----------------------------------------------------------------------------
    def check_writable(self) -> None:
        if self.read_only:
            raise os_error(errno.EROFS)

    @staticmethod
    def check_name(name: str) -> None:
        if is_reserved_name(name):
            raise os_error(errno.EINVAL, f"names beginning with {WH_PREFIX} are reserved for whiteouts")
        if len(os.fsencode(name)) > NAME_MAX:
            raise os_error(errno.ENAMETOOLONG)
        if name in (".", "..") or "/" in name or not name:
            raise os_error(errno.EINVAL)

    def apply_stat(self, loc, ftype: int, uid: int, gid: int, mode: int, *, rdev: int = 0,
                   placeholder: bool = False, i: Dir | File | None = None) -> None:
        """Give the upper entry at *loc* owner and mode (really, or through the override xattr)."""
        exact = not placeholder
        try:
            if self.euid == 0:
                chown_at(loc, uid, gid)
            else:
                st = loc_stat(loc)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    chown_at(loc, uid, gid)
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
            chmod_at(loc, real)
            if real != mode:
                exact = False
        target, kw = xattr_target(loc)
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
            raise os_error(errno.EPERM, f"cannot record owner/mode: {e.strerror}") from None
        if i is not None:
            i.override = ov

    def _copy_xattrs(self, loc, xattrs: dict[str, bytes] | None, *, symlink: bool = False) -> None:
        target, kw = xattr_target(loc)
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
        utime_at((dfd, ""), (st.st_atime_ns, st.st_mtime_ns))

    def make_special(self, dfd: int, name: str, ftype: int, rdev: int) -> bool:
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
    def copy_up_dir(self, d: Dir) -> None:
        """Copy *d* up, and first those of its ancestors that are not (top down, without recursion)."""
        chain = []
        while not d.upper:
            if d.dead:
                raise os_error(errno.ENOENT)
            chain.append(d)
            d = self.inodes[d.parent]  # type: ignore[assignment]
        for sub in reversed(chain):
            self._copy_up_one_dir(sub)

    def _copy_up_one_dir(self, d: Dir) -> None:
        parent = self.inodes[d.parent]
        assert isinstance(parent, Dir) and parent.upper
        node = d.lower
        assert node is not None
        pfd = self.dirfds.get(parent)
        wfd = self.work_fd
        tmp = self.work_name("d")
        os.mkdir(tmp, 0o700, dir_fd=wfd)
        try:
            at = (wfd, tmp)
            self._copy_xattrs(at, node.xattrs)
            self.apply_stat(at, stat.S_IFDIR, node.uid, node.gid, stat.S_IMODE(node.mode), i=d)
            utime_at(at, (node.mtime_ns, node.mtime_ns))
            with self._keep_times(pfd):
                os.rename(tmp, d.name, src_dir_fd=wfd, dst_dir_fd=pfd)
        except BaseException:
            self.rm_work(tmp)
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

    def copy_up(self, f: File, *, size: int | None = None) -> None:
        """Copy *f* up (only its first *size* bytes of data when given: a truncate follows)."""
        if f.upper:
            return
        node = f.lower
        assert node is not None
        if not f.links:   # open and unlinked: overlayfs cannot copy it up either
            raise os_error(errno.EEXIST)
        indexed = self.index and node.nlink > 1
        if indexed:
            self._learn_names(f)
            (dino, name) = self._pick_link(f)
        else:
            (dino, name) = self._split_links(f)
        parent = self.inodes[dino]
        assert isinstance(parent, Dir)
        self.copy_up_dir(parent)
        pfd = self.dirfds.get(parent)
        ftype = stat.S_IFMT(node.mode)
        wfd = self.work_fd
        tmp = self.work_name("c")
        at = (wfd, tmp)
        placeholder = False
        try:
            if ftype == stat.S_IFREG:
                self._copy_data(node, tmp, node.size if size is None else min(size, node.size))
            elif ftype == stat.S_IFLNK:
                os.symlink(node.target or "", tmp, dir_fd=wfd)
            else:
                placeholder = not self.make_special(wfd, tmp, ftype, node.rdev)
            self._copy_xattrs(at, node.xattrs, symlink=ftype == stat.S_IFLNK)
            f.override = None       # the new file has no override xattr (reserved names are not copied)
            self.apply_stat(at, ftype, node.uid, node.gid, stat.S_IMODE(node.mode), rdev=node.rdev,
                             placeholder=placeholder, i=f)
            utime_at(at, (node.mtime_ns, node.mtime_ns))
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
        if self.link_names is None:
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
            self.dir_names = {p: seen[p] for p in dirs if p in seen}
            self.link_names = multi
        assert f.lower is not None
        for parent, _ in self.link_names.get(f.lower.ino, ()):
            d = self._shown_lower_dir(parent)
            if d is not None:
                self.entries_of(d)

    def _shown_lower_dir(self, lino: int) -> Dir | None:
        """The Dir of lower directory *lino* where the merged view shows it (None: it does not)."""
        path = []
        c = lino
        while c != ROOT_INO:
            pn = self.dir_names.get(c)
            if pn is None:
                return None
            path.append((c, pn[1]))
            c = pn[0]
        d = self.inodes[ROOT_INO]
        for c, name in reversed(path):
            if d.dead:
                return None
            sub = self.inodes.get(self.entries_of(d).get(name, -1))  # type: ignore[arg-type]
            if not isinstance(sub, Dir) or sub.ino != c or sub.lower is None:
                return None
            d = sub
        return d  # type: ignore[return-value]

    def _link_names_up(self, f: File, first: tuple[int, str]) -> None:
        """The other names of the just copied-up *f* become hard links of its upper file."""
        sfd, sname = self.dirfds.get(self.inodes[first[0]]), first[1]  # type: ignore[arg-type]
        for (dino, name) in list(f.links):
            if (dino, name) == first:
                continue
            d = self.inodes[dino]
            assert isinstance(d, Dir)
            self.copy_up_dir(d)
            dfd = self.dirfds.get(d)
            with self._keep_times(dfd):         # a name the merged view shows as lower has no whiteout
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        self.upper_inos[(st.st_dev, st.st_ino)] = f.ino

    def _pick_link(self, f: File) -> tuple[int, str]:
        """The name of *f* to copy up: the one the kernel last looked up, else any."""
        last = self.last_name.pop(f.ino, None)
        return last if last in f.links else next(iter(f.links))

    def _split_links(self, f: File) -> tuple[int, str]:
        """The name of lower file *f* to copy up; its other lower names move to a new inode."""
        node = f.lower
        assert node is not None
        link = self._pick_link(f)
        if node.nlink > 1:
            rest = File(self.new_ino(), node, False)
            for other in f.links:
                if other != link:
                    rest.links[other] = None
                    self.inodes[other[0]].entries[other[1]] = rest.ino  # type: ignore[union-attr,index]
            self.inodes[rest.ino] = rest
            self.alias[node.ino] = rest.ino
            f.links = {link: None}
            for h in self.handles.values():     # files opened by the other names stay theirs
                if h.ino == f.ino and h.link is not None and h.link in rest.links:
                    h.ino = rest.ino
                    f.nopen -= 1
                    rest.nopen += 1
        return link

    def rm_work(self, name: str) -> None:
        """Remove a temporary of the work directory (a directory with its contents)."""
        try:
            st = os.stat(name, dir_fd=self.work_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=self.work_fd, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.work_fd)

    def _copy_data(self, node: Node, tmp: str, size: int) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.work_fd)
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

    def ensure_upper(self, ino: int, *, size: int | None = None) -> Dir | File:
        i = self.inode_of(ino)
        if isinstance(i, Dir):
            self.copy_up_dir(i)
            return i
        f = self.file_inode(ino)
        self.copy_up(f, size=size)
        return f

    def loc_of(self, i: Dir | File) -> tuple[int, str]:
        return (self.dirfds.get(i), "") if isinstance(i, Dir) else self.file_loc(i)
