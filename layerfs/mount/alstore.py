"""An Additional Layer Store for container engines (``layerfs store serve MOUNTPOINT``).

containers/storage (podman, CRI-O, buildah) can take an image's layers from
a file system instead of downloading them: with ``additionallayerstores =
["MOUNTPOINT:ref"]`` in ``storage.conf`` its overlay driver looks, for each
layer of an image it pulls, at ``MOUNTPOINT/<base64(image reference)>/<key>/``
where *key* is the layer's compressed digest (containers/storage ≥ 1.54 also
asks by the TOC digest of an eStargz layer). That directory holds:

* ``diff/``: the layer's own contents as an overlay lower directory: a
  whiteout is a 0/0 character device, an opaque directory carries
  ``trusted.overlay.opaque=y`` (:func:`layerfs.fs.build_diff_tree`),
  served from the layer's records without extracting anything;
* ``info``: JSON (``compressed-diff-digest``, ``compressed-size``,
  ``diff-digest``, ``diff-size``, ``compression`` (2: gzip), and for an
  eStargz layer ``toc-digest``);
* ``blob``: the compressed layer as the registry has it.

The engine creates ``<layer>/use`` when it takes the layer and removes the
``<layer>`` directory when it lets it go; both are answered ENOENT (the
protocol's "understood") and counted. A layer nobody uses is dropped from
memory after a grace period (its cached pieces stay in the store for
``layerfs prune``). The counts are kept in ``ROOT/alstore/uses.json``, and
since every path is resolved again on lookup, the engine's symlinks into
the store work again after a restart.

The image of a reference is resolved on the first lookup below its
directory: manifest and config from the registry (credentials as for
``pull``), then each layer lazily where it allows it (eStargz, or gzip with
a published layerfs index; :func:`layerfs.lazy.image.open_lazy_layers`), else
pulled whole into the store. A lookup that fails (registry unreachable, no
such layer) answers ENOENT without the kernel caching it, so the next
lookup tries again; the error is logged.

Inodes: 1 is the root; reference and layer directories, ``info`` and ``blob``
get numbers as they are first looked up; the ``diff/`` tree of each layer
directory gets a range of its own (``base + tree inode``). Nothing is ever
renumbered, so the kernel's caches stay valid.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from layerfs.errors import LayerfsError
from layerfs.fs import ROOT_INO, MergedTree
from layerfs.fuse import CACHE_TIMEOUT, LayerFS, attributes, fuse_error, serve
from layerfs.image import LAYER_COMPRESSION, Digest, Reference
from layerfs.store import Store, atomic_write

log = logging.getLogger(__name__)

__all__ = ["AdditionalLayerStore", "StoreFS", "COMPRESSION_CODES", "layer_info", "encode_reference",
           "DEFAULT_GRACE", "STORE_IMAGE_NAME", "serve_store"]

#: containers/storage pkg/archive Compression values
COMPRESSION_CODES = {None: 0, "gzip": 2, "zstd": 4}
#: what ``layerfs mounts`` shows as the image of a layer store
STORE_IMAGE_NAME = "<layer store>"
#: seconds an unused layer stays in memory
DEFAULT_GRACE = 600.0
#: kernel cache validity of the store's own directories (they appear and go)
DYNAMIC_TIMEOUT = 1.0
#: seconds a reference that failed to resolve answers with that failure
FAILURE_MEMO = 5.0
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_B64 = re.compile(r"^[A-Za-z0-9+/=]+$")
_MAX_REF = 4096


def encode_reference(ref: str) -> str:
    """The directory name containers/storage uses for an image reference (standard base64)."""
    return base64.b64encode(ref.encode()).decode()


def _decode_reference(text: str) -> str | None:
    try:
        raw = base64.b64decode(text, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _plausible_reference(ref: str) -> bool:
    try:
        Reference.parse(ref)
        return True
    except LayerfsError:
        return False


def layer_info(desc, diff_id, index, toc_digest: str | None = None) -> bytes:
    """The ``info`` file of a layer (containers/storage's Layer JSON fields)."""
    info = {"compressed-diff-digest": str(desc.digest), "compressed-size": desc.size,
            "diff-digest": str(diff_id), "compression": COMPRESSION_CODES.get(LAYER_COMPRESSION.get(desc.media_type), 0)}
    if index.size:
        info["diff-size"] = index.size
    if toc_digest:
        info["toc-digest"] = toc_digest
    return json.dumps(info, separators=(",", ":")).encode()


# --- the store's model --------------------------------------------------------------------

@dataclass(eq=False)
class _Layer:
    """One layer served (shared by every path that names it)."""
    digest: str
    toc_digest: str | None
    info: bytes
    tree: MergedTree
    blob_size: int
    read_blob: Callable[[int, int], bytes]
    lazy: bool
    fs: LayerFS                 # the read-only handlers of its diff tree
    reader: object              # its LayerReader (lazy or of the stored blob)
    views: list = field(default_factory=list)


@dataclass(eq=False)
class _Dir:
    """A directory of the store's own: the root, a reference directory (``prefix``: its name, the base64
    form of the reference; that of a valid reference never holds a '/') or a layer directory (``view``)."""
    ino: int
    parent: int
    name: str
    prefix: str | None = None
    view: "_View | None" = None
    children: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _View:
    """One ``<ref>/<key>`` directory: the layer and the inode numbers of its entries."""
    ref: str
    key: str
    layer: _Layer
    dir_ino: int
    info_ino: int
    blob_ino: int
    base: int                   # diff/'s tree inode t is base + t


@dataclass(eq=False)
class _File:
    ino: int
    parent: int
    view: _View
    what: str                   # "info" or "blob"


class AdditionalLayerStore:
    """The store's state: references resolved, layers served, use counts. Thread-safe.

    *open_image(ref)* returns a :class:`layerfs.lazy.image.LazyImage` (tests may pass another)."""

    def __init__(self, store: Store, *, registry_options=None, grace: float = DEFAULT_GRACE,
                 open_image: Callable | None = None, mountpoint: str | None = None):
        self.store = store
        self.mountpoint = mountpoint
        self.grace = grace
        self._registry_options = registry_options
        self._open_image = open_image or self._open_lazy
        self._lock = threading.RLock()
        self._ref_locks: dict[str, threading.Lock] = {}
        self._next = ROOT_INO + 1
        self.dirs: dict[int, _Dir] = {ROOT_INO: _Dir(ROOT_INO, ROOT_INO, "", prefix="")}
        self.files: dict[int, _File] = {}
        self._bases: list[int] = []           # sorted diff ranges: start inode ...
        self._ranges: list[tuple[int, int, _View]] = []   # ... (start, end, view)
        self.layers: dict[str, _Layer] = {}   # compressed digest -> layer
        self._images: dict[str, dict[str, _Layer]] = {}   # reference -> {key: layer}
        self._uses_path = store.root / "alstore" / "uses.json"
        self.uses: dict[str, int] = self._load_uses()
        self._idle: dict[str, float] = {}     # digest -> when its uses went to 0
        self._failed: dict[str, tuple[float, LayerfsError]] = {}   # reference -> (when, why) it failed
        self.session = None                   # set by fusefs.serve (kernel cache invalidations)

    # -- uses ------------------------------------------------------------------------------------
    def _load_uses(self) -> dict[str, int]:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            doc = json.loads(self._uses_path.read_bytes())
            if isinstance(doc, dict):
                return {str(k): int(v) for k, v in doc.items() if isinstance(v, int) and v > 0}
        return {}

    def _save_uses(self) -> None:
        try:
            self._uses_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._uses_path, json.dumps(self.uses, indent=1, sort_keys=True).encode())
        except (OSError, LayerfsError) as e:
            log.warning("cannot save the layer use counts: %s", e)

    def use(self, view: _View) -> int:
        with self._lock:
            n = self.uses.get(view.layer.digest, 0) + 1
            self.uses[view.layer.digest] = n
            self._idle.pop(view.layer.digest, None)
            self._save_uses()
        log.info("layer %s used (%d) by %s", view.layer.digest, n, view.ref)
        return n

    def release(self, view: _View) -> int:
        with self._lock:
            n = max(0, self.uses.get(view.layer.digest, 0) - 1)
            if n:
                self.uses[view.layer.digest] = n
            else:
                self.uses.pop(view.layer.digest, None)
                self._idle[view.layer.digest] = time.monotonic()
            self._save_uses()
        log.info("layer %s released (%d) by %s", view.layer.digest, n, view.ref)
        return n

    # -- resolving -------------------------------------------------------------------------------
    def _alloc(self, n: int = 1) -> int:
        ino = self._next
        self._next += n
        return ino

    def _open_lazy(self, ref: str):
        # here and below: the lazy, transfer and union code load at the first image lookup, so that the store
        # answers its engine without waiting for them (the registry client alone costs ~100 ms)
        from layerfs.lazy import open_lazy_layers
        return open_lazy_layers(self.store, ref, registry_options=self._registry_options)

    def image_layers(self, ref: str) -> dict[str, _Layer]:
        """{key: layer} of image *ref* (compressed digests and eStargz TOC digests), resolved once."""
        with self._lock:
            have = self._images.get(ref)
            if have is not None:
                return have
            lock = self._ref_locks.setdefault(ref, threading.Lock())
        with lock:                      # one resolution per reference; other references go on meanwhile
            with self._lock:
                have = self._images.get(ref)
            if have is not None:
                return have
            t0 = time.monotonic()
            with self._lock:
                failed = self._failed.get(ref)
            if failed is not None and t0 - failed[0] < FAILURE_MEMO:
                raise failed[1]               # the engine asks once per layer: one attempt answers them all
            # prune waits until the blobs and caches this resolution fetches are noted as in use
            with self.store.lock("gc", shared=True):
                try:
                    image = self._open_image(ref)
                except LayerfsError as e:
                    with self._lock:
                        self._failed[ref] = (time.monotonic(), e)
                    raise
                keys: dict[str, _Layer] = {}
                for il in image.layers:
                    layer = self._make_layer(image, il)
                    keys[layer.digest] = layer
                    if layer.toc_digest:
                        keys[layer.toc_digest] = layer
                with self._lock:
                    self._images[ref] = keys
                    self._ref_locks.pop(ref, None)      # later lookups find the image
                self._note_readers()
            log.info("resolved %s: %d layers in %.2fs", ref, len(image.layers), time.monotonic() - t0)
            return keys

    def _note_readers(self) -> None:
        """Keep the lazy caches of the layers in memory from ``layerfs prune`` (and show them in ``mounts``)."""
        if self.mountpoint is None:
            return
        from layerfs.lazy import note_lazy_readers
        with self._lock:
            readers = [layer.reader for layer in self.layers.values()]
            pulled = [layer.digest for layer in self.layers.values() if not layer.lazy]
        note_lazy_readers(self.store, self.mountpoint, os.getpid(), readers, [Digest.parse(d) for d in pulled])

    def _make_layer(self, image, il) -> _Layer:
        from layerfs.fs import build_diff_tree
        from layerfs.transfer import TOC_DIGEST_ANNOTATION
        digest = str(il.desc.digest)
        with self._lock:
            have = self.layers.get(digest)
            if have is not None:
                return have
        toc = (il.desc.annotations or {}).get(TOC_DIGEST_ANNOTATION)
        tree = build_diff_tree(il.index, il.reader)
        layer = _Layer(digest, toc, layer_info(il.desc, il.diff_id, il.index, toc), tree, il.desc.size,
                       self._blob_reader(image, il), il.lazy, LayerFS(tree), il.reader)
        with self._lock:
            have = self.layers.setdefault(digest, layer)
            if have is layer and digest not in self.uses:     # collected if no engine ever uses it
                self._idle.setdefault(digest, time.monotonic())
            return have

    def _blob_reader(self, image, il) -> Callable[[int, int], bytes]:
        desc = il.desc
        if not il.lazy and self.store.has_blob(desc.digest, desc.size):
            path = self.store.blob_path(desc.digest)

            def read_stored(off: int, size: int) -> bytes:
                with open(path, "rb") as f:
                    return os.pread(f.fileno(), size, off)
            return read_stored
        repo = image.ref.repository

        def read_remote(off: int, size: int) -> bytes:
            end = min(desc.size, off + size)
            if off >= end:
                return b""
            return image.client().read_range(repo, desc, off, end)
        return read_remote

    def view(self, parent: _Dir, key: str) -> _View | None:
        """The layer directory *key* below reference directory *parent* (made on first lookup), or None."""
        if key in parent.children:
            d = self.dirs.get(parent.children[key])
            if d is not None and d.view is not None:
                return d.view
        ref = _decode_reference(parent.prefix or "")
        if not ref or len(ref) > _MAX_REF:
            return None
        layer = self.image_layers(ref).get(key)
        if layer is None:
            log.info("%s has no layer %s", ref, key)
            return None
        with self._lock:
            if key in parent.children:
                d = self.dirs.get(parent.children[key])
                if d is not None and d.view is not None:
                    return d.view
            n = len(layer.tree.nodes)
            first = self._alloc(3)
            dir_ino, info_ino, blob_ino = first, first + 1, first + 2
            base = self._alloc(n) - ROOT_INO
            v = _View(ref, key, layer, dir_ino, info_ino, blob_ino, base)
            self.dirs[dir_ino] = _Dir(dir_ino, parent.ino, key, view=v)
            self.files[info_ino] = _File(info_ino, dir_ino, v, "info")
            self.files[blob_ino] = _File(blob_ino, dir_ino, v, "blob")
            self._ranges.append((base + ROOT_INO, base + n, v))
            self._bases.append(base + ROOT_INO)
            layer.views.append(v)
            parent.children[key] = dir_ino
            return v

    def ref_dir(self, parent: _Dir, name: str) -> _Dir | None:
        """The reference directory *name* (the base64 form of an image reference) below the root, or None."""
        if parent.ino != ROOT_INO or not _B64.match(name) or len(name) > 2 * _MAX_REF:
            return None
        with self._lock:
            ino = parent.children.get(name)
            if ino is not None:
                return self.dirs[ino]
        ref = _decode_reference(name)
        if not ref or not _plausible_reference(ref):
            return None
        with self._lock:
            ino = parent.children.get(name)
            if ino is not None:
                return self.dirs[ino]
            d = _Dir(self._alloc(), parent.ino, name, prefix=name)
            self.dirs[d.ino] = d
            parent.children[name] = d.ino
            return d

    def tree_of(self, ino: int) -> tuple[_View, int] | None:
        """(view, tree inode) of an inode inside a ``diff/`` tree."""
        with self._lock:            # collect() changes both lists
            i = bisect.bisect_right(self._bases, ino) - 1
            if i < 0:
                return None
            _, end, v = self._ranges[i]
        if ino > end:
            return None
        return v, ino - v.base

    # -- garbage collection ---------------------------------------------------------------------
    def collect(self, now: float | None = None) -> list[str]:
        """Forget layers unused for longer than the grace period (their directories vanish); returns their digests."""
        now = time.monotonic() if now is None else now
        gone: list[tuple[str, int]] = []
        dropped = []
        with self._lock:
            for digest, since in list(self._idle.items()):
                if now - since < self.grace or self.uses.get(digest):
                    continue
                layer = self.layers.pop(digest, None)
                del self._idle[digest]
                if layer is None:
                    continue
                dropped.append(digest)
                for v in layer.views:
                    d = self.dirs.pop(v.dir_ino, None)
                    self.files.pop(v.info_ino, None)
                    self.files.pop(v.blob_ino, None)
                    if d is not None:
                        parent = self.dirs.get(d.parent)
                        if parent is not None and parent.children.get(v.key) == v.dir_ino:
                            del parent.children[v.key]
                            gone.append((d.parent, v.key))
                    i = self._bases.index(v.base + ROOT_INO)
                    del self._bases[i]
                    del self._ranges[i]
                for ref, keys in list(self._images.items()):
                    if any(lay is layer for lay in keys.values()):
                        del self._images[ref]      # resolved again when asked for again
        session = self.session
        for parent, name in gone:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.invalidate_entry(parent, name.encode())
        for digest in dropped:
            log.info("layer %s unused for %.0fs: dropped", digest, self.grace)
        if dropped:
            self._note_readers()
        return dropped


# --- the FUSE handlers ------------------------------------------------------------------------

def _dir_attr(ino: int, timeout: float = DYNAMIC_TIMEOUT) -> tuple:
    return (ino, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 0, 0, 0, 0, timeout)


def _file_attr(ino: int, size: int) -> tuple:
    return (ino, stat.S_IFREG | 0o444, 1, 0, 0, 0, size, (size + 511) >> 9, 0, 0, 0, CACHE_TIMEOUT)


def _shift(attr: tuple, base: int) -> tuple:
    return (attr[0] + base,) + attr[1:]


class StoreFS:
    """The handlers of the layer store (the protocol of :mod:`layerfs._fuse`)."""

    def __init__(self, als: AdditionalLayerStore):
        self.als = als
        self._session = None

    @property
    def session(self):
        return self._session

    @session.setter
    def session(self, value) -> None:
        self._session = value
        self.als.session = value

    #: failures that are not ordinary answers: logged, EIO (or the error's own errno)
    error = LayerFS.error

    # -- names ---------------------------------------------------------------------------------
    def _attr(self, ino: int) -> tuple:
        als = self.als
        d = als.dirs.get(ino)
        if d is not None:
            return _dir_attr(ino)
        f = als.files.get(ino)
        if f is not None:
            return _file_attr(ino, len(f.view.layer.info) if f.what == "info" else f.view.layer.blob_size)
        t = als.tree_of(ino)
        if t is None:
            raise fuse_error(errno.ENOENT)
        v, tino = t
        node = v.layer.tree.get(tino)
        if node is None:
            raise fuse_error(errno.ENOENT)
        return _shift(attributes(node), v.base)

    def lookup(self, parent_ino: int, name: bytes):
        als = self.als
        text = name.decode("utf-8", "surrogateescape")
        d = als.dirs.get(parent_ino)
        if d is not None:
            if d.view is not None:            # a layer directory
                v = d.view
                if text == "diff":
                    return _shift(attributes(v.layer.tree.nodes[ROOT_INO]), v.base)
                if text == "info":
                    return _file_attr(v.info_ino, len(v.layer.info))
                if text == "blob":
                    return _file_attr(v.blob_ino, v.layer.blob_size)
                raise fuse_error(errno.ENOENT)      # "use" included: never cached
            if d.ino != ROOT_INO and _DIGEST.match(text):
                try:
                    v = als.view(d, text)
                except LayerfsError as e:
                    log.error("%s: %s", _decode_reference(d.prefix or "") or d.prefix, e.one_line())
                    v = None
                except Exception:
                    log.exception("resolving %s failed", _decode_reference(d.prefix or "") or d.prefix)
                    v = None
                if v is None:
                    raise fuse_error(errno.ENOENT)
                return _dir_attr(v.dir_ino)
            sub = als.ref_dir(d, text)
            if sub is None:
                raise fuse_error(errno.ENOENT)
            return _dir_attr(sub.ino)
        if parent_ino in als.files:
            raise fuse_error(errno.ENOTDIR)
        t = als.tree_of(parent_ino)
        if t is None:
            raise fuse_error(errno.ENOENT)
        v, tino = t
        got = v.layer.fs.lookup(tino, name)
        return None if got is None else _shift(got, v.base)

    forget = None

    def getattr(self, ino: int, fh):
        return self._attr(ino)

    def readlink(self, ino: int) -> bytes:
        t = self.als.tree_of(ino)
        if t is None:
            raise fuse_error(errno.EINVAL)
        v, tino = t
        return v.layer.fs.readlink(tino)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        t = self.als.tree_of(ino)
        if t is None:
            raise fuse_error(errno.ENODATA)
        v, tino = t
        return v.layer.fs.getxattr(tino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        t = self.als.tree_of(ino)
        if t is None:
            return []
        v, tino = t
        return v.layer.fs.listxattr(tino)

    # -- directories -----------------------------------------------------------------------------
    def opendir(self, ino: int):
        # the store's own directories change: their listings are not cached; diff/ trees never change
        return (0, 0) if ino in self.als.dirs else (0, 4)

    def readdir(self, ino: int, fh: int, off: int, count: int) -> list:
        als = self.als
        d = als.dirs.get(ino)
        if d is None:
            t = als.tree_of(ino)
            if t is None:
                raise fuse_error(errno.ENOENT)
            v, tino = t
            out = v.layer.fs.readdir(tino, fh, off, count)
            return [(name, _shift(attr, v.base), nxt) for name, attr, nxt in out]
        if d.view is not None:
            v = d.view
            entries = [(b"diff", _shift(attributes(v.layer.tree.nodes[ROOT_INO]), v.base)),
                       (b"info", _file_attr(v.info_ino, len(v.layer.info))),
                       (b"blob", _file_attr(v.blob_ino, v.layer.blob_size))]
        else:
            with als._lock:
                kids = list(d.children.items())
            entries = [(name.encode("utf-8", "surrogateescape"), _dir_attr(cino)) for name, cino in kids
                       if cino in als.dirs]
        entries = [(b".", _dir_attr(ino)), (b"..", _dir_attr(d.parent))] + entries
        return [(name, attr, i + 1) for i, (name, attr) in enumerate(entries)][off:off + count]

    # -- files -------------------------------------------------------------------------------------
    def read(self, ino: int, fh: int, off: int, size: int) -> bytes:
        f = self.als.files.get(ino)
        if f is not None:
            if f.what == "info":
                return f.view.layer.info[off:off + size]
            return f.view.layer.read_blob(off, size)
        t = self.als.tree_of(ino)
        if t is None:
            raise fuse_error(errno.ENOENT)
        v, tino = t
        return v.layer.tree.read(tino, off, size)

    def statfs(self) -> tuple:
        return (4096, 4096, 0, 0, 0, 0, 0, 0, 255)

    # -- the protocol's notifications, and everything else that writes -----------------------------
    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int):
        d = self.als.dirs.get(parent)
        if d is not None and d.view is not None and name == b"use":
            self.als.use(d.view)
            raise fuse_error(errno.ENOENT)
        raise fuse_error(errno.EROFS)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        return self.create(parent, name, mode, 0, uid, gid)

    def rmdir(self, parent: int, name: bytes) -> None:
        d = self.als.dirs.get(parent)
        if d is not None and d.view is None:
            ino = d.children.get(name.decode("utf-8", "surrogateescape"))
            child = self.als.dirs.get(ino) if ino is not None else None
            if child is not None and child.view is not None:
                self.als.release(child.view)
                raise fuse_error(errno.ENOENT)
        raise fuse_error(errno.EROFS)

    def _read_only(self, *args):
        raise fuse_error(errno.EROFS)

    setattr = mkdir = unlink = symlink = rename = link = write = _read_only
    setxattr = removexattr = fallocate = _read_only


# --- serving ----------------------------------------------------------------------------------------

def serve_store(store: Store, mountpoint: str, fuse_options, *, on_ready: Callable[[], None] | None = None,
                registry_options=None, grace: float = DEFAULT_GRACE, gc_interval: float | None = None) -> None:
    """Mount the layer store at *mountpoint* and serve it until unmounted (see :func:`layerfs.fuse.readonly.serve`)."""
    store.init()
    als = AdditionalLayerStore(store, registry_options=registry_options, grace=grace,
                               mountpoint=os.path.realpath(mountpoint))
    ops = StoreFS(als)
    stop = threading.Event()
    interval = gc_interval if gc_interval is not None else max(1.0, min(60.0, grace / 4))

    def gc() -> None:
        while not stop.wait(interval):
            try:
                als.collect()
            except Exception:
                log.exception("layer store garbage collection failed")

    threading.Thread(target=gc, name="als-gc", daemon=True).start()
    try:
        serve(None, mountpoint, fuse_options, on_ready=on_ready, ops=ops)
    finally:
        stop.set()
