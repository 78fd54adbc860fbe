"""The FUSE adapter of the writable overlay: pyfuse3 operations serving a :class:`~layerfs.overlay.Overlay`.

Thin like :mod:`layerfs.fusefs` (whose mount loop, options and attribute
constants it reuses): names are decoded, errors become errnos, the caller's
uid/gid go to new entries; the semantics live in the overlay.

Threads: every request that may touch the upper directory (or decompress
lower data) runs in a worker thread behind a :class:`trio.CapacityLimiter`;
attributes and reads of untouched lower files are answered on the event
loop. The overlay serialises namespace changes with its own lock, reads and
writes on open handles run in parallel.

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
import functools
import logging
import os
import stat
import sys
from typing import Callable, Iterable

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, StatvfsData

from .errors import LayerfsError
from .fusefs import BLOCK_SIZE, CACHE_TIMEOUT, default_threads, serve
from .overlay import Attr, Overlay
from .tree import ROOT_INO

log = logging.getLogger(__name__)

_FSENC = sys.getfilesystemencoding()
_FLAG_NAMES = {pyfuse3.RENAME_NOREPLACE: 1, pyfuse3.RENAME_EXCHANGE: 2}


def _name(raw: bytes) -> str:
    return raw.decode(_FSENC, "surrogateescape")


def _fail(op: str, arg, e: BaseException) -> FUSEError:
    """One errno reply for any failure of a handler (never an exception that ends pyfuse3's loop)."""
    if isinstance(e, FUSEError):
        return e
    if isinstance(e, OSError):
        if e.errno in (errno.EIO, None) or e.errno not in _QUIET:
            log.warning("%s(%r): %s", op, arg, e)
        return FUSEError(e.errno or errno.EIO)
    if isinstance(e, LayerfsError):
        log.error("%s(%r) failed: %s", op, arg, e.one_line())
        return FUSEError(e.errno or errno.EIO)
    log.error("%s(%r) failed", op, arg, exc_info=e)
    return FUSEError(errno.EIO)


#: errnos that are ordinary answers (not worth a log line)
_QUIET = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EXDEV,
                    errno.EINVAL, errno.ENODATA, errno.EPERM, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG,
                    errno.ERANGE, errno.ENOTSUP, errno.ENOSPC, errno.EDQUOT, errno.EBADF})


def _wrap(method):
    """Turn any exception of a handler into a FUSEError reply."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self, *args):
        try:
            return await method(self, *args)
        except Exception as e:
            raise _fail(name, args[:2], e) from None
    return handler


class OverlayFS(pyfuse3.Operations):
    """pyfuse3 operations serving one :class:`Overlay` (writable unless the overlay is read-only)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, overlay: Overlay, *, threads: int | None = None):
        super().__init__()
        self.ovl = overlay
        self._nodes = overlay.nodes            # the mount loop makes lazy lower nodes in the background
        self._limiter = trio.CapacityLimiter(threads or default_threads())
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._dir_ino: dict[int, int] = {}
        self._next_dir_fh = 1
        self.live = False                      # kernel notifications only once the mount answers
        overlay.on_attr_changed = self._attr_changed

    # -- helpers --------------------------------------------------------------------------------
    def _attr_changed(self, ino: int) -> None:
        if not self.live:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:     # ENOENT: the kernel does not know the inode
            log.debug("invalidate_inode(%d): %s", ino, e)

    async def _run(self, fn, *args, **kw):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self._limiter)

    async def _quick(self, fn, *args, **kw):
        """Run a cheap metadata operation on the loop thread: a handful of syscalls on the
        upper directory, no copy-up of file data. A worker-thread hop costs ~100 µs of
        trio machinery, many times the operation itself (untar, rm -rf). When a worker
        holds the overlay's lock (a copy-up), the call goes to a thread instead of
        blocking the loop."""
        lock = self.ovl._lock
        if not lock.acquire(blocking=False):
            return await self._run(fn, *args, **kw)
        try:
            return fn(*args, **kw)
        finally:
            lock.release()

    def _in_upper(self, ino: int) -> bool:
        """True when *ino* already lives in the upper (changing it copies no data up)."""
        i = self.ovl.inodes.get(ino)
        return i is not None and getattr(i, "upper", False)

    @staticmethod
    def _entry(a: Attr) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = a.ino
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blocks = a.blocks
        e.st_blksize = BLOCK_SIZE
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        t = 0.0 if a.volatile else CACHE_TIMEOUT
        e.entry_timeout = t
        e.attr_timeout = t
        return e

    @staticmethod
    def _negative() -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = CACHE_TIMEOUT
        return e

    # -- names and attributes -------------------------------------------------------------------------
    @_wrap
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            a = self.ovl.try_lookup(parent_inode, _name(name))      # lower entries: no thread needed
            if a is None:
                a = await self._quick(self.ovl.lookup, parent_inode, _name(name))
        except FileNotFoundError:
            return self._negative()
        except OSError as e:
            if e.errno == errno.ENOENT:
                return self._negative()
            raise
        return self._entry(a)

    async def forget(self, inode_list):
        # inodes with names live as long as the overlay; a forgotten one without names goes
        for ino, _ in inode_list:
            self.ovl.forget(ino)

    @_wrap
    async def getattr(self, inode, ctx=None):
        a = self.ovl.try_getattr(inode)
        if a is None:
            a = await self._quick(self.ovl.getattr, inode)
        return self._entry(a)

    @_wrap
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if not kw:      # ctime only (e.g. a write that cleared nothing): nothing to store
            return self._entry(await self._quick(self.ovl.getattr, inode))
        run = self._quick if self._in_upper(inode) and "size" not in kw else self._run
        return self._entry(await run(self.ovl.setattr, inode, fh=fh, **kw))

    @_wrap
    async def readlink(self, inode, ctx):
        return os.fsencode(await self._quick(self.ovl.readlink, inode))

    @_wrap
    async def access(self, inode, mode, ctx):
        # only reached without default_permissions: root-like answers, EROFS for writes on a read-only overlay
        await self._run(self.ovl.getattr, inode)
        if mode & os.W_OK and self.ovl.read_only:
            raise FUSEError(errno.EROFS)
        return True

    # -- creating and removing ---------------------------------------------------------------------------
    @_wrap
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(await self._quick(self.ovl.mknod, parent_inode, _name(name), mode, rdev,
                                           uid=ctx.uid, gid=ctx.gid))

    @_wrap
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(await self._quick(self.ovl.mkdir, parent_inode, _name(name), mode, uid=ctx.uid, gid=ctx.gid))

    @_wrap
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(await self._quick(self.ovl.symlink, parent_inode, _name(name), _name(target),
                                           uid=ctx.uid, gid=ctx.gid))

    @_wrap
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self._run(self.ovl.link, inode, new_parent_inode, _name(new_name)))

    @_wrap
    async def unlink(self, parent_inode, name, ctx):
        await self._quick(self.ovl.unlink, parent_inode, _name(name))

    @_wrap
    async def rmdir(self, parent_inode, name, ctx):
        await self._quick(self.ovl.rmdir, parent_inode, _name(name))

    @_wrap
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        ours = 0
        for theirs, mine in _FLAG_NAMES.items():
            if flags & theirs:
                ours |= mine
                flags &= ~theirs
        if flags:
            raise FUSEError(errno.EINVAL)
        await self._run(self.ovl.rename, parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), ours)

    # -- extended attributes -----------------------------------------------------------------------------
    @_wrap
    async def getxattr(self, inode, name, ctx):
        return await self._quick(self.ovl.getxattr, inode, _name(name))

    @_wrap
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in await self._quick(self.ovl.listxattr, inode)]

    @_wrap
    async def setxattr(self, inode, name, value, ctx):
        await self._run(self.ovl.setxattr, inode, _name(name), value)

    @_wrap
    async def removexattr(self, inode, name, ctx):
        await self._run(self.ovl.removexattr, inode, _name(name))

    # -- directories ----------------------------------------------------------------------------------------
    @_wrap
    async def opendir(self, inode, ctx):
        a = self.ovl.try_getattr(inode)
        if a is None:
            a = await self._run(self.ovl.getattr, inode)
        if not stat.S_ISDIR(a.mode):
            raise FUSEError(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_ino[fh] = inode
        return fh

    async def _snapshot(self, fh: int) -> list[tuple[bytes, Attr]]:
        ino = self._dir_ino[fh]

        def listing(nowait: bool = False):
            if nowait:
                entries = self.ovl.try_readdir(ino)
                if entries is None:
                    return None
                here = self.ovl.try_getattr(ino)
                up = self.ovl.try_getattr(self.ovl.parent_of(ino))
                if here is None or up is None:
                    return None
            else:
                entries = self.ovl.readdir(ino)
                here = self.ovl.getattr(ino)
                try:
                    up = self.ovl.getattr(self.ovl.parent_of(ino))
                except OSError:
                    up = here
            return [(b".", here), (b"..", up)] + [(os.fsencode(n), a) for n, a in entries]
        snap = listing(nowait=True)          # a lower-only directory: no thread needed
        if snap is None:
            snap = await self._run(listing)
        self._dirs[fh] = snap
        return snap

    @_wrap
    async def readdir(self, fh, start_id, token):
        # offsets: 0 ".", 1 "..", 2 + i the i-th entry of a snapshot taken when reading starts (or restarts)
        snap = self._dirs.get(fh)
        if snap is None or start_id == 0:
            snap = await self._snapshot(fh)
        reply = pyfuse3.readdir_reply
        for off in range(start_id, len(snap)):
            name, a = snap[off]
            if not reply(token, name, self._entry(a), off + 1):
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)
        self._dir_ino.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass

    # -- files --------------------------------------------------------------------------------------------------
    @_wrap
    async def open(self, inode, flags, ctx):
        fh = await self._run(self.ovl.open, inode, flags)
        if self.ovl.handle_is_shared(fh):      # one name of a lower hard-linked file: no page cache
            return FileInfo(fh=fh, keep_cache=False, direct_io=True)
        return FileInfo(fh=fh, keep_cache=True)

    @_wrap
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, a = await self._quick(self.ovl.create, parent_inode, _name(name), mode, flags, uid=ctx.uid, gid=ctx.gid)
        return FileInfo(fh=fh, keep_cache=True), self._entry(a)

    @_wrap
    async def read(self, fh, off, size):
        if not self.ovl.handle_needs_io(fh):
            h = self.ovl.handles.get(fh)
            node = self.ovl.nodes[h.lower_ino] if h is not None else None
            if node is not None and (node.inline is not None or node.layer < 0 or off >= node.size):
                return self.ovl.read(fh, off, size)
        return await self._run(self.ovl.read, fh, off, size)

    @_wrap
    async def write(self, fh, off, buf):
        return await self._quick(self.ovl.write, fh, off, buf)   # into the page cache; fsync is threaded

    async def flush(self, fh):
        pass

    @_wrap
    async def fsync(self, fh, datasync):
        await self._run(self.ovl.fsync, fh, datasync)

    @_wrap
    async def release(self, fh):
        await self._quick(self.ovl.release, fh)

    # -- the file system -------------------------------------------------------------------------------------------
    @_wrap
    async def statfs(self, ctx):
        st = await self._run(self.ovl.statfs)
        s = StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = st.f_namemax
        return s


def serve_overlay(overlay: Overlay, mountpoint: str, options: Iterable[str], *,
                  on_ready: Callable[[], None] | None = None, threads: int | None = None) -> None:
    """Mount *overlay* at *mountpoint* and serve it until unmounted (see :func:`layerfs.fusefs.serve`)."""
    ops = OverlayFS(overlay, threads=threads)

    def ready() -> None:
        ops.live = True
        if on_ready is not None:
            on_ready()

    serve(overlay.tree, mountpoint, options, on_ready=ready, threads=threads, ops=ops)


assert ROOT_INO == pyfuse3.ROOT_INODE
