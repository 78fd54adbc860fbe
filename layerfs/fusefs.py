"""The FUSE adapter: serve a :class:`~layerfs.tree.MergedTree` read-only through pyfuse3.

pyfuse3 is libfuse 3's low-level API on trio: the kernel talks in inode
numbers, and a tree :class:`~layerfs.tree.Node`'s ``ino`` *is* the FUSE
inode (``ROOT_INO`` == ``pyfuse3.ROOT_INODE`` == 1). This module only maps
requests onto the tree: errno mapping, file handles, caching hints. It never
looks below the tree protocol.

Caching: lower layers never change, so every entry (also a negative one: a
name that does not exist) and every attribute is given a long timeout, and
files are opened with ``keep_cache`` so the kernel page cache survives
close/open. The mount is made with ``ro``, so the VFS itself refuses writes
with EROFS before they reach us; the write handlers answer EROFS anyway.

Performance notes (measure with ``python tests/mounthelpers.py DIR``):

* libfuse answers ``readdir`` with readdirplus only (pyfuse3 disables
  READDIRPLUS_AUTO), so one request lists a batch of entries *with* their
  attributes and ``find``/``ls -l`` need no per-entry LOOKUP/GETATTR. A
  directory costs OPENDIR, two READDIRPLUS (the second one says EOF) and
  RELEASEDIR; the directory's inode is its handle (no handle table).
* pyfuse3 copies an :class:`EntryAttributes` into the reply right after the
  handler returns, without yielding to trio in between; handlers that fill
  attributes never ``await`` before returning, so one scratch object is
  reused for every lookup/getattr/readdir entry instead of allocating one
  per call. Names are encoded only when sent.
* ``MergedTree.read`` may block (decompression, disk reads): it runs in
  worker threads behind a :class:`trio.CapacityLimiter`, so concurrent
  readers (and the kernel's parallel readahead requests) overlap. Reads
  that need no I/O (inline bytes, empty or hole-only files, reads at EOF)
  are answered on the event loop.
* A tree loaded lazily (the union's cache makes Node objects on first
  access) is completed in the background once the mount answers, so the
  first ``find`` does not pay for it.
* pyfuse3 3.5 gives handlers no way to set FOPEN_CACHE_DIR (kernel readdir
  cache) or the ``max_readahead``/``max_background`` connection fields, and
  its ``read``/``readdir`` handlers get only the file handle, so
  FUSE_NO_OPEN(DIR) cannot be used either; replies are copied
  (``fuse_reply_buf``, no splice). The kernel's readahead window is raised
  after mounting through the mount's BDI (``read_ahead_kb``) instead, see
  :func:`tune_readahead`; each read request then carries 1 MiB (libfuse's
  maximum). Pushing sequentially read files into the page cache ahead of
  the reader (FUSE NOTIFY_STORE from threads) was tried and measured: no
  gain on 2 CPUs, a loss when the reader is CPU-bound (duplicate work).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
from itertools import islice
from typing import Callable, Iterable

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, StatvfsData

from .errors import LayerfsError
from .tree import ROOT_INO, MergedTree, Node

log = logging.getLogger(__name__)

#: entry/attribute validity in seconds: lower layers never change
CACHE_TIMEOUT = 365 * 86400.0
BLOCK_SIZE = 4096
#: readahead (KiB) set on the mount's BDI: big sequential FUSE reads (the kernel caps one at max_pages, 1 MiB)
READ_AHEAD_KB = 1024
#: trees up to this many inodes get all their Node objects made in the background after mounting
WARM_MAX_NODES = 500_000

_FSENC = sys.getfilesystemencoding()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
assert ROOT_INO == pyfuse3.ROOT_INODE


def default_threads() -> int:
    """Worker threads for blocking reads: enough to overlap I/O and GIL-free decompression."""
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


def fill_attributes(a: EntryAttributes, node: Node) -> EntryAttributes:
    """Copy *node*'s metadata into *a* (everything ``stat`` shows)."""
    a.st_ino = node.ino
    mode = node.mode
    a.st_mode = mode
    a.st_nlink = node.nlink
    a.st_uid = node.uid
    a.st_gid = node.gid
    a.st_rdev = node.rdev
    size = node.size
    if node.target is not None and stat.S_ISLNK(mode):
        size = len(node.target.encode(_FSENC, "surrogateescape"))
    a.st_size = size
    if node.sparse is None:
        a.st_blocks = (size + 511) >> 9
    else:
        a.st_blocks = (sum(ext[1] for ext in node.sparse) + 511) >> 9
    t = node.mtime_ns
    a.st_mtime_ns = t
    a.st_atime_ns = t
    a.st_ctime_ns = t
    return a


def _failure(op: str, arg, e: BaseException) -> FUSEError:
    """The errno reply for an exception of a handler (logged unless it is one already).

    pyfuse3 ends its main loop (the mount goes dead) when a handler raises
    anything but FUSEError; so every handler turns any failure into one: a
    bug or a bad tree node fails one request with EIO, never the mount.
    """
    if isinstance(e, FUSEError):
        return e
    if isinstance(e, LayerfsError):
        log.error("%s(%r) failed: %s", op, arg, e.one_line())
        return FUSEError(e.errno or errno.EIO)
    if isinstance(e, OSError):
        log.error("%s(%r) failed: %s", op, arg, e)
        return FUSEError(e.errno or errno.EIO)
    log.error("%s(%r) failed", op, arg, exc_info=e)
    return FUSEError(errno.EIO)


class LayerFS(pyfuse3.Operations):
    """pyfuse3 operations serving one MergedTree, read-only."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: MergedTree, *, threads: int | None = None):
        super().__init__()
        self.tree = tree
        self._nodes = tree.nodes
        self._limiter = trio.CapacityLimiter(threads or default_threads())
        self._attr = self._new_attr()        # scratch: refilled by every handler, see module doc
        self._negative = self._new_attr()    # "no such name", cached by the kernel like a dentry
        self._negative.st_ino = 0
        self._fileinfo = FileInfo(fh=0, keep_cache=True)
        self._statfs: StatvfsData | None = None

    @staticmethod
    def _new_attr() -> EntryAttributes:
        a = EntryAttributes()
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_blksize = BLOCK_SIZE
        return a

    def _node(self, ino: int) -> Node:
        node = self.tree.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    # -- names and attributes -----------------------------------------------------
    # Every handler ends in `except Exception as e: raise _failure(...)` (zero cost until something fails).

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            parent = self._node(parent_inode)
            children = parent.children
            if children is None:
                raise FUSEError(errno.ENOTDIR)
            ino = children.get(name.decode(_FSENC, "surrogateescape"))
            if ino is None:
                if name == b".":
                    ino = parent.ino
                elif name == b"..":
                    ino = parent.parent
                else:
                    return self._negative
            return fill_attributes(self._attr, self._nodes[ino])
        except Exception as e:
            raise _failure("lookup", (parent_inode, name), e) from None

    async def forget(self, inode_list):
        # Inodes are the tree's table entries and live as long as the mount:
        # nothing is freed, so the kernel's lookup counts need no bookkeeping.
        pass

    async def getattr(self, inode, ctx=None):
        try:
            return fill_attributes(self._attr, self._node(inode))
        except Exception as e:
            raise _failure("getattr", inode, e) from None

    async def readlink(self, inode, ctx):
        try:
            node = self._node(inode)
            if node.target is None or not stat.S_ISLNK(node.mode):
                raise FUSEError(errno.EINVAL)
            return node.target.encode(_FSENC, "surrogateescape")
        except Exception as e:
            raise _failure("readlink", inode, e) from None

    async def access(self, inode, mode, ctx):
        # Only reached without default_permissions (the kernel checks by itself otherwise).
        try:
            node = self._node(inode)
            if mode & os.W_OK:
                raise FUSEError(errno.EROFS)
            if ctx.uid == 0:
                return not (mode & os.X_OK) or stat.S_ISDIR(node.mode) or bool(node.mode & 0o111)
            if ctx.uid == node.uid:
                bits = (node.mode >> 6) & 7
            elif ctx.gid == node.gid or node.gid in pyfuse3.get_sup_groups(ctx.pid):
                bits = (node.mode >> 3) & 7
            else:
                bits = node.mode & 7
            return (mode & 7) & ~bits == 0
        except Exception as e:
            raise _failure("access", inode, e) from None

    # -- extended attributes --------------------------------------------------------
    async def getxattr(self, inode, name, ctx):
        try:
            xattrs = self._node(inode).xattrs
            value = xattrs.get(name.decode(_FSENC, "surrogateescape")) if xattrs else None
            if value is None:
                raise FUSEError(errno.ENODATA)
            return value
        except Exception as e:
            raise _failure("getxattr", (inode, name), e) from None

    async def listxattr(self, inode, ctx):
        try:
            xattrs = self._node(inode).xattrs
            return [k.encode(_FSENC, "surrogateescape") for k in xattrs] if xattrs else []
        except Exception as e:
            raise _failure("listxattr", inode, e) from None

    # -- directories ----------------------------------------------------------------
    async def opendir(self, inode, ctx):
        # The tree never changes under a handle: the directory's inode is its handle.
        try:
            if self._node(inode).children is None:
                raise FUSEError(errno.ENOTDIR)
            return inode
        except Exception as e:
            raise _failure("opendir", inode, e) from None

    async def readdir(self, fh, start_id, token):
        # offsets: 0 is ".", 1 is "..", 2 + i the i-th child; names are encoded only when sent
        try:
            node = self._node(fh)
            reply = pyfuse3.readdir_reply
            a = self._attr
            nodes = self._nodes
            if start_id == 0:
                if not reply(token, b".", fill_attributes(a, node), 1):
                    return
                start_id = 1
            if start_id == 1:
                if not reply(token, b"..", fill_attributes(a, nodes[node.parent]), 2):
                    return
                start_id = 2
            items = iter(node.children.items())
            if start_id > 2:
                items = islice(items, start_id - 2, None)
            for off, (name, ino) in enumerate(items, start_id + 1):
                if not reply(token, name.encode(_FSENC, "surrogateescape"), fill_attributes(a, nodes[ino]), off):
                    break
        except Exception as e:
            raise _failure("readdir", fh, e) from None

    async def releasedir(self, fh):
        pass

    # -- files ------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        try:
            if flags & _WRITE_FLAGS:
                raise FUSEError(errno.EROFS)
            if self._node(inode).children is not None:
                raise FUSEError(errno.EISDIR)
            fi = self._fileinfo
            fi.fh = inode
            return fi
        except Exception as e:
            raise _failure("open", inode, e) from None

    async def read(self, fh, off, size):
        try:
            data = self.tree.read_nowait(fh, off, size)   # inline data, holes, decoded spans: no thread hop
            if data is not None:
                return data
            return await trio.to_thread.run_sync(self.tree.read, fh, off, size, limiter=self._limiter)
        except Exception as e:
            raise _failure("read", (fh, off, size), e) from None

    async def release(self, fh):
        pass

    # -- the file system ---------------------------------------------------------------
    async def statfs(self, ctx):
        try:
            if self._statfs is None:
                st = self.tree.statfs()
                s = StatvfsData()
                s.f_bsize = BLOCK_SIZE
                s.f_frsize = BLOCK_SIZE
                s.f_blocks = (st.total_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE
                s.f_bfree = s.f_bavail = 0
                s.f_files = st.total_files
                s.f_ffree = s.f_favail = 0
                s.f_namemax = 255
                self._statfs = s
            return self._statfs
        except Exception as e:
            raise _failure("statfs", None, e) from None

    # -- everything that writes: EROFS -------------------------------------------------
    async def _read_only(self, *args):
        raise FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = create = _read_only
    setxattr = removexattr = _read_only


# --- running a mount -------------------------------------------------------------------

def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_options(fsname: str, extra: Iterable[str] = (), *, read_only: bool = True) -> set[str]:
    """The libfuse ``-o`` options for a mount (validated by libfuse when mounting)."""
    extra = list(extra)
    opts = {"default_permissions"}
    if not any(o.startswith("subtype=") for o in extra):
        opts.add("subtype=layerfs")
    if not any(o.startswith("fsname=") for o in extra):
        opts.add(f"fsname={_escape_option(fsname)}")
    if read_only:
        opts.add("ro")
    opts.update(extra)
    return opts


def tune_readahead(mountpoint: str, kib: int | None = None) -> bool:
    """Raise the kernel readahead of the FUSE mount at *mountpoint* (needs root; best effort).

    The FUSE INIT reply can only lower the BDI's 128 KiB default and
    pyfuse3 does not expose it anyway; the BDI's sysfs knob can raise it.
    """
    kib = READ_AHEAD_KB if kib is None else kib
    if kib <= 0:
        return False
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kib))
        return True
    except OSError as e:
        log.debug("cannot raise readahead of %s: %s", mountpoint, e)
        return False


def serve(tree: MergedTree, mountpoint: str, options: Iterable[str], *,
          on_ready: Callable[[], None] | None = None, threads: int | None = None,
          ops: pyfuse3.Operations | None = None) -> None:
    """Mount *tree* at *mountpoint* and serve it until unmounted or SIGTERM/SIGINT/SIGHUP.

    *on_ready* is called (on the event loop) once the mount answers a
    ``stat`` of its root. On a signal the file system is unmounted (lazily,
    so busy files do not keep it), never left dead. *ops* serves other
    operations than the read-only :class:`LayerFS` of *tree* (the writable
    overlay's; it needs ``_limiter`` and ``_nodes`` like LayerFS).
    Raises :class:`LayerfsError` when libfuse refuses the options or the mount.
    """
    ops = ops if ops is not None else LayerFS(tree, threads=threads)
    opts = set(options)
    try:
        said = _stderr_of(pyfuse3.init, ops, mountpoint, opts)
    except _Failed as f:
        lines = [l.strip() for l in f.stderr.splitlines() if l.strip()]
        why = lines[-1] if lines else str(f.error)
        raise LayerfsError(f"cannot mount {mountpoint}: {why}",
                           hint="check the -o options (man mount.fuse3), /dev/fuse and fusermount3") from None
    if said.strip():
        log.info("libfuse: %s", " ".join(said.split()))
    try:
        trio.run(_run, ops, mountpoint, on_ready)
    finally:
        pyfuse3.close(unmount=True)


class _Failed(Exception):
    def __init__(self, error: BaseException, stderr: str):
        super().__init__(str(error))
        self.error = error
        self.stderr = stderr


def _stderr_of(fn, *args) -> str:
    """Run *fn* with fd 2 captured (libfuse and fusermount3 explain failures there).

    Returns the text; raises :class:`_Failed` (the exception and the text) if *fn* fails.
    """
    import tempfile
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        error = None
        try:
            fn(*args)
        except Exception as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    if error is not None:
        raise _Failed(error, text)
    return text


async def _run(ops: LayerFS, mountpoint: str, on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        async def fs() -> None:
            await pyfuse3.main(min_tasks=1, max_tasks=ops._limiter.total_tokens + 32)
            nursery.cancel_scope.cancel()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
                    pyfuse3.terminate()
                    return

        async def ready() -> None:
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            if st.st_ino != ROOT_INO:
                raise LayerfsError(f"the mount at {mountpoint} does not answer", where=mountpoint)
            await trio.to_thread.run_sync(tune_readahead, mountpoint)
            if on_ready is not None:
                on_ready()
            ready_event.set()

        async def warm() -> None:
            # A tree loaded from the union's cache makes its Node objects on first access (~5 us each):
            # make them while the mount is idle rather than on the first `find`, in slices so requests
            # never wait long behind it. Huge trees stay lazy (memory).
            nodes = ops._nodes
            n = len(nodes)
            if n > WARM_MAX_NODES:
                return
            await ready_event.wait()
            for lo in range(1, n, 128):
                for i in range(lo, min(n, lo + 128)):
                    nodes[i]
                await trio.sleep(0)

        ready_event = trio.Event()
        nursery.start_soon(fs)
        nursery.start_soon(signals)
        nursery.start_soon(ready)
        nursery.start_soon(warm)
