"""Layer tars: the tar writer shared by ``commit`` and ``export``, and the committed gzip layer.

:class:`TarWriter` writes tar members as Go's archive/tar does (PAX, no padding to a
record) with headers made by :func:`tar_header` (fixed conventions, so the same input
gives the same bytes); :func:`tree_members` and :func:`tree_chunks` are the members of a
merged tree (``export``), :func:`write_layer_tar` the tar of an upper directory, and
:func:`write_layer` stores that tar as a new gzip layer blob, indexed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from layerfs.changes.scan import OPAQUE, WHITEOUT, UpperDirError, UpperEntry, UpperScan, join_path, open_long
from layerfs.errors import StoreError
from layerfs.fs import ROOT_INO, MergedTree, Node
from layerfs.image import OCI_LAYER_GZIP, OPAQUE_WHITEOUT, WHITEOUT_PREFIX, XATTR_PREFIX, Descriptor, Digest
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, SYMLINK_MODE, LayerIndexer, index_path
from layerfs.store import Store, store_error

log = logging.getLogger(__name__)

__all__ = ["EMPTY_TAR_DIGEST", "TarWriter", "tar_header", "tree_members", "tree_chunks", "write_layer_tar",
           "write_layer", "LayerResult"]

#: sha256 of 1024 zero bytes, an empty tar (docker's DigestSHA256EmptyTar): a commit without changes
EMPTY_TAR_DIGEST = Digest("sha256", "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")

_BLOCKSIZE = tarfile.BLOCKSIZE
_READ = 1 << 20
_GZIP_LEVEL = 6      # as imagebuild.compress: the same upper gives the same bytes


def tar_header(name: str, type_: bytes, *, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
               linkname: str = "", devmajor: int = 0, devminor: int = 0,
               xattrs: Mapping[str, bytes] | None = None, keep_ns: bool = False) -> tarfile.TarInfo:
    """A PAX header with fixed conventions: no user/group names, whole-second mtime unless
    *keep_ns* (then a PAX ``mtime`` record carries the nanoseconds), xattrs as sorted
    ``SCHILY.xattr.*`` records (binary values via ``hdrcharset=BINARY``); a symlink's mode is
    always :data:`~layerfs.index.SYMLINK_MODE`."""
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = SYMLINK_MODE if type_ == tarfile.SYMTYPE else mode & 0o7777
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    ti.mtime = sec
    ti.size = size
    ti.linkname = linkname
    ti.devmajor, ti.devminor = devmajor, devminor
    pax: dict[str, str] = {}
    if keep_ns and ns:
        pax["mtime"] = f"{sec}.{ns:09d}".rstrip("0")
    for k in sorted(xattrs or ()):
        pax[XATTR_PREFIX + k] = bytes(xattrs[k]).decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    return ti


class TarWriter:
    """Writes tar members to *sink* as Go's archive/tar does: PAX, no padding to a 10240-byte record."""

    def __init__(self, sink: Callable[[bytes], object]):
        self.sink = sink

    def add(self, ti: tarfile.TarInfo, chunks: Iterable[bytes] = ()) -> None:
        self.sink(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        n = 0
        for c in chunks:
            n += len(c)
            if n > ti.size:
                raise UpperDirError(f"{ti.name} grew while it was written", hint="stop writing to it and try again")
            self.sink(c)
        if n != ti.size:
            raise UpperDirError(f"{ti.name} shrank while it was written ({n} of {ti.size} bytes)",
                                hint="stop writing to it and try again")
        if n % _BLOCKSIZE:
            self.sink(b"\0" * (_BLOCKSIZE - n % _BLOCKSIZE))

    def close(self) -> None:
        self.sink(b"\0" * (2 * _BLOCKSIZE))


def tree_chunks(tree: MergedTree, node: Node) -> Iterator[bytes]:
    off = 0
    while off < node.size:
        b = tree.read(node.ino, off, min(_READ, node.size - off))
        if not b:
            raise StoreError(f"short read of inode {node.ino} at {off} of {node.size} bytes")
        off += len(b)
        yield b


def tree_members(tree: MergedTree, *, keep_ns: bool = True) -> Iterator[tuple[tarfile.TarInfo, Node | None]]:
    """Tar headers for every name in *tree*, depth first, names sorted by their bytes;
    a node seen again (hard link) becomes a link to its first name."""
    seen: dict[int, str] = {}

    def kids(ino: int, prefix: str) -> Iterator[tuple[str, Node]]:
        node = tree.get(ino)
        for name in sorted(node.children, key=os.fsencode):
            yield f"{prefix}{name}", tree.get(node.children[name])

    stack = [kids(ROOT_INO, "")]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        path, n = item
        kw = dict(mode=n.mode, uid=n.uid, gid=n.gid, mtime_ns=n.mtime_ns, xattrs=n.xattrs, keep_ns=keep_ns)
        fmt = stat.S_IFMT(n.mode)
        if fmt == stat.S_IFDIR:
            yield tar_header(path, tarfile.DIRTYPE, **kw), None
            stack.append(kids(n.ino, path + "/"))
            continue
        if n.ino in seen:
            yield tar_header(path, tarfile.LNKTYPE, linkname=seen[n.ino], **kw), None
            continue
        if fmt == stat.S_IFSOCK:
            log.warning("export: skipping socket /%s", path)
            continue
        seen[n.ino] = path
        if fmt == stat.S_IFREG:
            yield tar_header(path, tarfile.REGTYPE, size=n.size, **kw), n
        elif fmt == stat.S_IFLNK:
            yield tar_header(path, tarfile.SYMTYPE, linkname=n.target or "", **kw), None
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            yield tar_header(path, tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE,
                             devmajor=os.major(n.rdev), devminor=os.minor(n.rdev), **kw), None
        elif fmt == stat.S_IFIFO:
            yield tar_header(path, tarfile.FIFOTYPE, **kw), None


# --- the new layer ----------------------------------------------------------------------------

def _upper_file_chunks(e: UpperEntry) -> Iterator[bytes]:
    """The bytes of an upper file, opened without following symlinks; it must still be the file scanned."""
    try:
        fd = open_long(e.host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise UpperDirError(f"cannot open {e.host}: {err.strerror}",
                            hint="the upper directory changed while it was read; try again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (e.inode is not None and (st.st_dev, st.st_ino) != e.inode):
            raise UpperDirError(f"{e.host} was replaced while the upper directory was read",
                                hint="stop writing to the mount and try again")
        off = 0
        while off < e.size:
            b = os.pread(fd, min(_READ, e.size - off), off)
            if not b:
                break
            off += len(b)
            yield b
    finally:
        os.close(fd)


def _layer_members(scan: UpperScan) -> Iterator[tuple[tarfile.TarInfo, UpperEntry | None]]:
    """Tar headers for the upper's records (whole-second mtimes, as docker commit writes them)."""
    links: dict[tuple[int, int], str] = {}
    for e in scan.entries:
        if e.kind == WHITEOUT:
            parent, _, name = e.path.rpartition("/")
            yield tar_header(join_path(parent, WHITEOUT_PREFIX + name), tarfile.REGTYPE, mode=0o600, uid=e.uid,
                             gid=e.gid, mtime_ns=e.mtime_ns), None
            continue
        if e.kind == OPAQUE:
            # docker's overlay driver gives the marker its directory's permissions, owner and time
            d = scan.dir_entry(e.path)
            src = d if d is not None else e
            yield tar_header(join_path(e.path, OPAQUE_WHITEOUT), tarfile.REGTYPE, mode=src.mode & 0o777,
                             uid=src.uid, gid=src.gid, mtime_ns=src.mtime_ns), None
            continue
        kw = dict(mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs=e.xattrs)
        if e.inode is not None:
            first = links.get(e.inode)
            if first is not None:
                yield tar_header(e.path, tarfile.LNKTYPE, linkname=first, **kw), None
                continue
            links[e.inode] = e.path
        if e.kind == DIR:
            yield tar_header(e.path, tarfile.DIRTYPE, **kw), None
        elif e.kind == FILE:
            yield tar_header(e.path, tarfile.REGTYPE, size=e.size, **kw), e
        elif e.kind == SYMLINK:
            yield tar_header(e.path, tarfile.SYMTYPE, linkname=e.target, **kw), None
        elif e.kind in (CHAR, BLOCK):
            yield tar_header(e.path, tarfile.CHRTYPE if e.kind == CHAR else tarfile.BLKTYPE,
                             devmajor=e.devmajor, devminor=e.devminor, **kw), None
        elif e.kind == FIFO:
            yield tar_header(e.path, tarfile.FIFOTYPE, **kw), None


def write_layer_tar(scan: UpperScan, sink: Callable[[bytes], object]) -> None:
    """The uncompressed layer tar of *scan* (see :func:`write_layer`)."""
    w = TarWriter(sink)
    for ti, e in _layer_members(scan):
        w.add(ti, _upper_file_chunks(e) if e is not None and e.size else ())
    w.close()


@dataclass(frozen=True)
class LayerResult:
    descriptor: Descriptor           # the stored gzip blob
    diff_id: Digest                  # sha256 of the uncompressed tar
    size: int                        # uncompressed size


class _Hashing:
    """A write sink that hashes and counts what passes, then hands it on."""

    def __init__(self, write: Callable[[bytes], object], *also: Callable[[bytes], object]):
        self._write = write
        self._also = also
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:
        self.hash.update(b)
        self.size += len(b)
        for f in self._also:
            f(b)
        self._write(b)
        return len(b)

    def flush(self) -> None:
        pass


def write_layer(store: Store, scan: UpperScan) -> LayerResult:
    """Tar *scan* into a new gzip layer blob in *store*, index it and record its facts.

    The tar: PAX headers, entries depth first with names sorted by their bytes
    (in each directory the opaque marker, then the whiteouts, then the
    entries), whole-second mtimes, no user/group names, xattrs (binary ones
    too) as ``SCHILY.xattr.*``, hard links within the upper (same inode) as
    tar hard links to the first name, ``user.layerfs.override_stat`` applied,
    no padding to a tar record. The gzip stream: zlib level 6 with its fixed
    header (mtime 0, no file name, OS 3), byte for byte what
    :func:`imagebuild.compress` writes (zlib's output does not depend
    on how the input is chunked). So the same upper gives the same bytes.

    The blob streams to a temporary file (memory stays bounded), is hashed
    while written, read back to verify its digest, and published through the
    store's ingest; the layer index (TOC + checkpoints) is built in the same
    pass from the compressed bytes, which checks the tar parses and agrees on
    the ``diff_id``."""
    store.init()
    ingest_dir = store.root / "ingest"
    tmp = ingest_dir / f".commit-{os.getpid()}-{time.monotonic_ns()}.tmp"
    indexer = LayerIndexer("gzip", where="committed layer")
    try:
        with open(tmp, "wb") as f:
            compressed = _Hashing(f.write, indexer.feed)
            # zlib's own gzip wrapper: mtime 0, no name, OS 3, as gzip.compress(mtime=0) in imagebuild.compress
            gz = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
            raw = _Hashing(lambda b: compressed.write(gz.compress(b)))
            write_layer_tar(scan, raw.write)
            compressed.write(gz.flush())
            f.flush()
            os.fsync(f.fileno())
        digest = Digest("sha256", compressed.hash.hexdigest())
        diff_id = Digest("sha256", raw.hash.hexdigest())
        indexer.digest = digest
        index = indexer.finish()
        if index.diff_id != diff_id or index.size != raw.size:
            raise StoreError(f"the new layer reads back as {index.diff_id} ({index.size} bytes), "
                             f"written as {diff_id} ({raw.size} bytes)")
        with store.ingest(digest, compressed.size) as ing:
            if not store.has_blob(digest, compressed.size):
                os.replace(tmp, ing.path)
                h = digest.hasher()
                with open(ing.path, "rb") as f:          # verify what is on disk, not what was meant
                    for b in iter(lambda: f.read(_READ), b""):
                        h.update(b)
                ing.commit(h.hexdigest())
        index.save(index_path(store, digest))
        store.set_layer_info(digest, {"diff_id": str(diff_id), "size": raw.size, "media_type": OCI_LAYER_GZIP})
        return LayerResult(Descriptor(OCI_LAYER_GZIP, digest, compressed.size), diff_id, raw.size)
    except OSError as e:
        raise store_error(e, "the new layer") from None
    finally:
        indexer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
