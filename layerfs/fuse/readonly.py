"""The FUSE adapter: serve a :class:`~layerfs.fs.tree.MergedTree` read-only through libfuse.

The kernel talks in inode numbers, and a tree :class:`~layerfs.fs.tree.Node`'s
``ino`` *is* the FUSE inode (``ROOT_INO`` == 1). This module only maps
requests onto the tree: errno mapping, caching hints, attribute tuples. It
never looks below the tree protocol.

Requests are served by :mod:`layerfs._fuse` (native/fuse/fuseloop.h): libfuse's
low-level API with a pool of native threads calling these plain methods
(see that file for the protocol). Blocking work (decompression, disk reads)
releases the GIL, so concurrent readers and the kernel's parallel readahead
overlap; a request costs a few microseconds of binding, not an event loop.

Caching: lower layers never change, so every entry (also a negative one: a
name that does not exist) and every attribute is given a long timeout.
There are no ``open``/``opendir`` handlers: the kernel then stops sending
OPEN, OPENDIR, FLUSH and RELEASE(DIR) at all and treats every file as
``keep_cache`` and every directory as ``cache_readdir``, so file data and
directory listings stay in the kernel's caches across opens (a warm
``find`` never reaches this process). Symlink targets are cached too
(CACHE_SYMLINKS). The mount is made with ``ro``, so the VFS itself refuses
writes with EROFS before they reach us; the write handlers answer EROFS anyway.

Directory listings are readdirplus only (one request lists a batch of
entries *with* their attributes; ``find``/``ls -l`` need no per-entry
LOOKUP/GETATTR). The kernel's readahead window is raised after mounting
through the mount's BDI (``read_ahead_kb``, see :func:`tune_readahead`), so
each read request carries 1 MiB.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import sys
import threading
import time
from typing import Callable, Iterable

from layerfs import _fuse
from layerfs.errors import LayerfsError
from layerfs.fs import ROOT_INO, MergedTree, Node

log = logging.getLogger(__name__)

#: entry/attribute validity in seconds: lower layers never change
CACHE_TIMEOUT = 365 * 86400.0
BLOCK_SIZE = 4096
#: readahead (KiB) set on the mount's BDI: big sequential FUSE reads (the kernel caps one at max_pages, 1 MiB)
READ_AHEAD_KB = 1024
#: trees up to this many inodes get all their Node objects made in the background after mounting,
#: this many at a time (~0.3 ms)
WARM_MAX_NODES = 500_000
WARM_SLICE = 64
#: FUSE requests the kernel keeps in flight in the background (readahead, async reads)
MAX_BACKGROUND = 64

_FSENC = sys.getfilesystemencoding()
assert ROOT_INO == _fuse.ROOT_INO


def default_threads() -> int:
    """Threads serving requests: enough to overlap I/O and GIL-free decompression, and, on lazy mounts and
    the engine layer store, the Range reads of many files at once (each waits on the network)."""
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


def fuse_error(no: int) -> OSError:
    """The exception a handler raises to answer *no* (an errno)."""
    return OSError(no, os.strerror(no))


def attributes(node: Node) -> tuple:
    """*node*'s metadata as the binding's attribute tuple (everything ``stat`` shows)."""
    mode = node.mode
    size = node.size
    if node.target is not None and stat.S_ISLNK(mode):
        size = len(node.target.encode(_FSENC, "surrogateescape"))
    if node.sparse is None:
        blocks = (size + 511) >> 9
    else:
        blocks = (sum(ext[1] for ext in node.sparse) + 511) >> 9
    t = node.mtime_ns
    return (node.ino, mode, node.nlink, node.uid, node.gid, node.rdev, size, blocks, t, t, t, CACHE_TIMEOUT)


class LayerFS:
    """The handlers serving one MergedTree, read-only (the protocol of :mod:`layerfs._fuse`)."""

    def __init__(self, tree: MergedTree):
        self.tree = tree
        self._nodes = tree.nodes
        self._listings: dict[int, list[tuple[bytes, int]]] = {}
        self._statfs: tuple | None = None

    def _node(self, ino: int) -> Node:
        node = self.tree.get(ino)
        if node is None:
            raise fuse_error(errno.ENOENT)
        return node

    def error(self, op: str, e: BaseException) -> int:
        """The errno reply for a failure that is not an ordinary answer (EIO and the like), logged:
        a bug or a bad tree node fails one request, never the mount."""
        if isinstance(e, LayerfsError):
            log.error("%s failed: %s", op, e.one_line())
            return e.errno or errno.EIO
        if isinstance(e, OSError):
            log.error("%s failed: %s", op, e)
            return e.errno or errno.EIO
        log.error("%s failed", op, exc_info=e)
        return errno.EIO

    # -- names and attributes -----------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes):
        parent = self._node(parent_ino)
        children = parent.children
        if children is None:
            raise fuse_error(errno.ENOTDIR)
        ino = children.get(name.decode(_FSENC, "surrogateescape"))
        if ino is None:
            if name == b".":
                ino = parent.ino
            elif name == b"..":
                ino = parent.parent
            else:
                return None
        return attributes(self._nodes[ino])

    #: inodes are the tree's table entries and live as long as the mount: nothing to forget
    forget = None

    def getattr(self, ino: int, fh):
        return attributes(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if node.target is None or not stat.S_ISLNK(node.mode):
            raise fuse_error(errno.EINVAL)
        return node.target.encode(_FSENC, "surrogateescape")

    # -- extended attributes --------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        xattrs = self._node(ino).xattrs
        value = xattrs.get(name.decode(_FSENC, "surrogateescape")) if xattrs else None
        if value is None:
            raise fuse_error(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        xattrs = self._node(ino).xattrs
        return [k.encode(_FSENC, "surrogateescape") for k in xattrs] if xattrs else []

    # -- directories ----------------------------------------------------------------
    def readdir(self, ino: int, fh: int, off: int, count: int) -> list:
        # offsets: 0 is ".", 1 is "..", 2 + i the i-th child
        node = self._node(ino)
        if node.children is None:
            raise fuse_error(errno.ENOTDIR)
        nodes = self._nodes
        out = []
        if off == 0:
            out.append((b".", attributes(node), 1))
        if off <= 1:
            out.append((b"..", attributes(nodes[node.parent]), 2))
        listing = self._listings.get(ino)
        if listing is None:        # the tree never changes: names are encoded once per directory
            listing = [(name.encode(_FSENC, "surrogateescape"), child) for name, child in node.children.items()]
            self._listings[ino] = listing
        first = max(off, 2) - 2
        for i, (name, child) in enumerate(listing[first:first + count], first + 3):
            out.append((name, attributes(nodes[child]), i))
        if not listing or first + count >= len(listing):
            self._listings.pop(ino, None)     # listed to the end: the kernel caches it from here on
        return out

    # -- files ------------------------------------------------------------------------
    def read(self, ino: int, fh: int, off: int, size: int) -> bytes:
        return self.tree.read(ino, off, size)

    # -- the file system ---------------------------------------------------------------
    def statfs(self) -> tuple:
        if self._statfs is None:
            st = self.tree.statfs()
            blocks = (st.total_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE
            self._statfs = (BLOCK_SIZE, BLOCK_SIZE, blocks, 0, 0, st.total_files, 0, 0, 255)
        return self._statfs

    # -- everything that writes: EROFS -------------------------------------------------
    def _read_only(self, *args):
        raise fuse_error(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = create = _read_only
    setxattr = removexattr = fallocate = _read_only


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
    the BDI's sysfs knob can raise it.
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


def serve(tree: MergedTree | None, mountpoint: str, options: Iterable[str], *,
          on_ready: Callable[[], None] | None = None, threads: int | None = None,
          ops: object | None = None, writeback: bool = False) -> None:
    """Mount *tree* at *mountpoint* and serve it until unmounted or SIGTERM/SIGINT/SIGHUP.

    *on_ready* is called once the mount answers a ``stat`` of its root. On a
    signal the file system is unmounted (lazily, so busy files do not keep
    it), never left dead. *ops* serves other operations than the read-only
    :class:`LayerFS` of *tree* (the writable overlay's); it gets the running
    session as ``ops.session`` (for kernel cache invalidations). Raises
    :class:`LayerfsError` when libfuse refuses the options or the mount.
    """
    ops = ops if ops is not None else LayerFS(tree)
    try:
        session, said = _stderr_of(functools.partial(
            _fuse.Session, ops, mountpoint, sorted(options), negative_timeout=CACHE_TIMEOUT,
            attr_timeout=CACHE_TIMEOUT, writeback=writeback, max_background=MAX_BACKGROUND))
    except _Failed as f:
        lines = [l.strip() for l in f.stderr.splitlines() if l.strip()]
        why = lines[-1] if lines else str(f.error)
        raise LayerfsError(f"cannot mount {mountpoint}: {why}",
                           hint="check the -o options (man mount.fuse3), /dev/fuse and fusermount3") from None
    if said.strip():
        log.info("libfuse: %s", " ".join(said.split()))
    ops.session = session
    restore = _on_signals(session, mountpoint)
    try:
        session.start(threads or default_threads())
        st = os.stat(mountpoint)
        if st.st_ino != ROOT_INO:
            raise LayerfsError(f"the mount at {mountpoint} does not answer", where=mountpoint)
        tune_readahead(mountpoint)
        if on_ready is not None:
            on_ready()
        if tree is not None:        # a file system of another kind (tree None) has no tree to warm up
            threading.Thread(target=_warm, args=(tree.nodes, session), name="warm", daemon=True).start()
        while not session.wait(0.25):     # wakes up for Python's signal handlers
            pass
    finally:
        restore()
        session.close()


def _on_signals(session, mountpoint: str) -> Callable[[], None]:
    """Stop serving *session* on SIGTERM/SIGINT/SIGHUP; returns what puts the old handlers back."""
    def stop(signum, frame) -> None:
        log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
        session.exit()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[sig] = signal.signal(sig, stop)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return restore


def _warm(nodes, session) -> None:
    """Make the Node objects of a tree loaded from the union's cache (~5 us each, made on first access)
    while the mount is idle rather than on the first ``find``: a slice at a time, and only after a
    millisecond without new requests and none in progress (a request waiting for the disk must not
    come back to a held GIL), so it never holds the GIL while requests are being served (a cold
    ``cat`` lost a fifth of its speed to it). Huge trees stay lazy (memory)."""
    n = len(nodes)
    if n > min(WARM_MAX_NODES, getattr(nodes, "retain", n)):   # more than a loaded table keeps made
        return
    seen = session.requests
    lo = 1
    while lo < n:
        time.sleep(0.001)
        now = session.requests
        if now != seen or session.busy:
            seen = now
            continue
        for i in range(lo, min(n, lo + WARM_SLICE)):
            nodes[i]
        lo += WARM_SLICE


class _Failed(Exception):
    def __init__(self, error: BaseException, stderr: str):
        super().__init__(str(error))
        self.error = error
        self.stderr = stderr


def _stderr_of(fn):
    """Run *fn* with fd 2 captured (libfuse and fusermount3 explain failures there).

    Returns (its result, the text); raises :class:`_Failed` (the exception and the text) if *fn* fails.
    """
    import tempfile
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        error = result = None
        try:
            result = fn()
        except Exception as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    if error is not None:
        raise _Failed(error, text)
    return result, text
