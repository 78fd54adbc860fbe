"""What a writable mount changed, and what to make of it: ``diff``, ``commit`` and ``export``.

The upper directory (the contract with the overlay, :mod:`layerfs.mount.daemon` records it
in ``MountRecord.upper``) is a real directory mirroring paths:

* ``DIR/.wh.NAME`` (an empty regular file) deletes the lower entry ``DIR/NAME``
  (the OCI whiteout form, so a commit tars it as is); so does a name listed
  in the xattr ``user.layerfs.whiteouts`` of ``DIR``, or a character device
  0:0 named ``NAME`` (the forms for names too long for the prefix, see
  :mod:`layerfs.fs.overlay`); a commit writes each as a ``.wh.NAME`` entry;
* ``DIR/.wh..wh..opq`` (an empty regular file) makes ``DIR`` opaque: a lower
  directory removed and created again, nothing of the lower ``DIR`` shows;
* as in an OCI layer a whiteout hides the *lower* entry only: an upper
  ``NAME`` beside ``.wh.NAME`` shows (a directory is then not merged with the
  lower one), and a commit keeps both, the whiteout first;
* ownership and mode the host could not take (rootless) are in the xattr
  ``user.layerfs.override_stat`` = ``UID:GID:MODE`` (MODE octal, with
  setuid/setgid/sticky); a device node that could not be created is an empty
  regular file with ``UID:GID:MODE:TYPE:MAJOR:MINOR`` (TYPE ``c`` or ``b``).

Kernel-overlayfs uppers are read too: a character device 0:0 is a whiteout, a
directory with ``trusted.overlay.opaque`` (or ``user.overlay.opaque``) = ``y``
is opaque.

:func:`scan_upper` reads an upper directory once into :class:`UpperEntry`
records (in layer order: depth first, names sorted by their bytes; in each
directory the opaque marker first, then the whiteouts, then the entries).
The upper directory is untrusted input: symlinks are never followed, files are
opened with ``O_NOFOLLOW`` and must still be what the scan saw.

:func:`diff` compares it with the image below, as ``docker diff`` does on the
containerd image store (``archive.ChangesDirs``: the merged lower tree against
the merged result): ``A`` for a path the image does not have, ``C`` for one it
has (a directory only when its mode or owner changed or something below it
did, so every directory above a change is ``C``), ``D`` for a path that is
gone (only the top of a deleted subtree; for an opaque directory every lower
entry not created again). Lines are sorted by path.

:func:`commit` turns the upper directory into one new gzip layer on top of the
image (see :func:`write_layer` for the format), a new config (``rootfs.diff_ids``
and ``history`` extended, ``docker commit --change`` instructions applied, see
:func:`apply_changes`) and a new OCI manifest, stored through the store's
verified writes, indexed so it mounts at once, and tagged.

:func:`overlay_tree` is the merged view of an image plus an upper directory as
one :class:`~layerfs.fs.tree.MergedTree` (for ``export`` of a mount, and as the
oracle of what a commit must produce); :func:`export_tree` writes any merged
tree as one deterministic tar.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

from layerfs.errors import ContentError, ImageNotFound, LayerfsError, StoreError, UsageError
from layerfs.fs import OVERRIDE_XATTR, WHITEOUTS_XATTR, fd_path, parse_whiteout_record
from layerfs.fs import ROOT_INO, MergedTree, Node
from layerfs.image import (OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, OPAQUE_WHITEOUT, WHITEOUT_PREFIX, XATTR_PREFIX,
    Descriptor, Digest, ImageConfig, Manifest, json_bytes, parse_manifest)
from layerfs.image import Reference
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, SYMLINK_MODE, LayerIndexer, index_path
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = [
    "OVERRIDE_XATTR", "EMPTY_TAR_DIGEST", "WHITEOUT", "OPAQUE",
    "UpperEntry", "UpperScan", "scan_upper", "parse_override",
    "Change", "diff", "Target", "resolve_target",
    "overlay_tree", "export_tree", "write_layer", "LayerResult",
    "CommitOptions", "CommitResult", "commit", "apply_changes", "ChangeSyntaxError",
    "UnknownTarget", "UpperDirError",
]

#: xattrs that describe the upper directory itself, never content (ours, kernel overlayfs', host labels)
_SKIP_XATTR_PREFIXES = ("user.layerfs.", "trusted.overlay.", "user.overlay.")
_SKIP_XATTRS = frozenset({"security.selinux"})
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_AUFS_META = ".wh..wh."

#: sha256 of 1024 zero bytes, an empty tar (docker's DigestSHA256EmptyTar): a commit without changes
EMPTY_TAR_DIGEST = Digest("sha256", "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")

WHITEOUT = "whiteout"
OPAQUE = "opaque"

_BLOCKSIZE = tarfile.BLOCKSIZE
_READ = 1 << 20
_GZIP_LEVEL = 6      # as imagebuild.compress: the same upper gives the same bytes


# --- errors ----------------------------------------------------------------------------

class UnknownTarget(LayerfsError):
    """A MOUNTPOINT|UPPER argument that is neither."""

    errno = errno.ENOENT


class UpperDirError(ContentError):
    """An upper directory that cannot be read or breaks the format."""


class ChangeSyntaxError(UsageError):
    """A ``--change`` instruction docker commit would refuse."""

    default_hint = ("use Dockerfile syntax, e.g. -c 'CMD [\"nginx\", \"-g\", \"daemon off;\"]' or -c 'ENV A=1'; "
                    "allowed: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR")


# --- the upper directory -----------------------------------------------------------------

@dataclass(frozen=True)
class UpperEntry:
    """One entry of an upper directory, with its effective attributes (overrides applied).

    ``path`` is relative (``"etc/motd"``; surrogate-escaped str). ``kind`` is a
    :mod:`layerfs.index.layerindex` type (``FILE``, ``DIR``, ``SYMLINK``, ``CHAR``,
    ``BLOCK``, ``FIFO``) or :data:`WHITEOUT` (``path`` is then the deleted path)
    or :data:`OPAQUE` (``path`` is the opaque directory). ``mode`` holds the
    permission bits incl. setuid/setgid/sticky. ``inode`` is (st_dev, st_ino)
    for non-directories with more than one name (hard links), else None.
    ``host`` is the entry's path on the host."""

    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    devmajor: int = 0
    devminor: int = 0
    target: str | None = None
    xattrs: Mapping[str, bytes] | None = None
    host: str = ""
    inode: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass
class UpperDir:
    """One directory of the upper: its entries, whiteouts and opaque marker (by name)."""

    kids: dict[str, UpperEntry] = field(default_factory=dict)
    whiteouts: dict[str, UpperEntry] = field(default_factory=dict)
    opaque: UpperEntry | None = None


@dataclass
class UpperScan:
    """An upper directory read once: ``entries`` in layer order, ``dirs`` by relative path (``""`` = root)."""

    root: Path | None
    entries: list[UpperEntry]
    dirs: dict[str, UpperDir]

    @classmethod
    def empty(cls) -> "UpperScan":
        return cls(None, [], {"": UpperDir()})

    def __bool__(self) -> bool:
        return bool(self.entries)


def parse_override(value: bytes, *, where: str = "") -> tuple[int, int, int, str | None, int, int]:
    """``UID:GID:MODE[:TYPE:MAJOR:MINOR]`` → (uid, gid, mode, TYPE or None, major, minor);
    TYPE is ``c`` or ``b`` (devices), ``p`` (fifo) or ``s`` (socket)."""
    bad = UpperDirError(f"{where}: bad {OVERRIDE_XATTR} value {value[:80]!r}",
                        hint="expected UID:GID:MODE (MODE in octal) or UID:GID:MODE:c|b|p|s:MAJOR:MINOR")
    try:
        parts = value.decode("ascii").strip().split(":")
    except UnicodeDecodeError:
        raise bad from None
    if len(parts) not in (3, 6):
        raise bad
    try:
        if not all(p.isdigit() for p in parts[:3]) or not all(p.isdigit() for p in parts[4:]):
            raise ValueError
        uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
        kind = major = minor = None
        if len(parts) == 6:
            kind, major, minor = parts[3], int(parts[4]), int(parts[5])
            if kind not in ("c", "b", "p", "s"):
                raise ValueError
    except ValueError:
        raise bad from None
    if uid >= 1 << 32 or gid >= 1 << 32 or mode > 0o7777 or (major or 0) >= 1 << 32 or (minor or 0) >= 1 << 32:
        raise bad
    return uid, gid, mode, kind, major or 0, minor or 0


def _xattrs(host: str, *, where: str) -> tuple[dict[str, bytes], bytes | None, bool, list[str]]:
    """(content xattrs, override value or None, opaque flag, recorded whiteouts) of *host*, never
    following a symlink."""
    try:
        names = os.listxattr(host, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
            return {}, None, False, []
        raise UpperDirError(f"{where}: cannot list xattrs: {e.strerror}") from None
    out: dict[str, bytes] = {}
    override = None
    opaque = False
    whiteouts: list[str] = []
    for name in sorted(names):
        try:
            value = os.getxattr(host, name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise UpperDirError(f"{where}: cannot read xattr {name}: {e.strerror}") from None
        if name == OVERRIDE_XATTR:
            override = value
        elif name == WHITEOUTS_XATTR:
            whiteouts = parse_whiteout_record(value)
        elif name in _OPAQUE_XATTRS:
            opaque = opaque or value == b"y"
        elif not name.startswith(_SKIP_XATTR_PREFIXES) and name not in _SKIP_XATTRS and "=" not in name:
            out[name] = value
    return out, override, opaque, whiteouts


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def scan_upper(upper: str | os.PathLike[str]) -> UpperScan:
    """Read an upper directory (see the module docs) into an :class:`UpperScan`."""
    root = Path(upper)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise UpperDirError(f"upper directory {root} does not exist") from None
    except OSError as e:
        raise UpperDirError(f"cannot read upper directory {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UpperDirError(f"upper directory {root} is not a directory")
    dirs: dict[str, UpperDir] = {}
    _, _, root_opaque, root_wh = _xattrs(str(root), where=str(root))
    # depth first; a directory's own entry is emitted before its contents
    stack: list[tuple[str, bool, list[str], os.stat_result]] = [("", root_opaque, root_wh, st)]
    while stack:
        rel, opaque_xattr, recorded, dst = stack.pop()
        host_dir = os.path.join(root, rel) if rel else str(root)
        try:
            dfd = _open_long(host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if rel else 0))
        except OSError as e:
            raise UpperDirError(f"cannot read {host_dir}: {e.strerror}",
                                hint="the upper directory changed while it was read; try again") from None
        try:
            subdirs = _scan_dir(root, rel, host_dir, dfd, dirs, recorded, dst)
        finally:
            os.close(dfd)
        d = dirs[rel]
        if opaque_xattr and d.opaque is None:
            d.opaque = UpperEntry(rel, OPAQUE, mode=0o755, host=host_dir)
        stack.extend(reversed(subdirs))
    return UpperScan(root, _layer_order(dirs), dirs)


def _open_long(path: str, flags: int) -> int:
    """os.open(*path*, *flags*), also for a path longer than PATH_MAX: its start is opened as a path,
    the rest one name at a time without following symlinks."""
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    parts = path.split("/")
    head: list[str] = []
    size = 0
    while len(parts) > 1 and size + len(os.fsencode(parts[0])) + 1 < 2048:
        size += len(os.fsencode(parts[0])) + 1
        head.append(parts.pop(0))
    fd = os.open("/".join(head) or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            if not name:
                continue
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def _scan_dir(root: Path, rel: str, host_dir: str, dfd: int, dirs: dict[str, UpperDir], recorded: list[str],
              dst: os.stat_result) -> list[tuple[str, bool, list[str], os.stat_result]]:
    """One directory of :func:`scan_upper` (open at *dfd*) into ``dirs[rel]``; returns its subdirectories."""
    d = dirs[rel] = UpperDir()
    try:
        with os.scandir(dfd) as it:
            names = sorted((e.name for e in it), key=os.fsencode)
    except OSError as e:
        raise UpperDirError(f"cannot read {host_dir}: {e.strerror}",
                            hint="the upper directory changed while it was read; try again") from None
    subdirs: list[tuple[str, bool, list[str], os.stat_result]] = []
    for name in names:
        host = os.path.join(host_dir, name)
        at = fd_path(dfd, name)     # for the calls that take no dir fd
        path = _join(rel, name)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UpperDirError(f"{host} vanished while the upper directory was read",
                                hint="stop writing to the mount and try again") from None
        mode = st.st_mode
        if name.startswith(WHITEOUT_PREFIX):
            if not stat.S_ISREG(mode):
                log.warning("upper %s: ignoring %r: a whiteout name that is not a regular file", root, path)
                continue
            if st.st_size:
                log.warning("upper %s: whiteout %r is not empty; treated as a whiteout", root, path)
            if name == OPAQUE_WHITEOUT:
                d.opaque = UpperEntry(rel, OPAQUE, mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                                      mtime_ns=st.st_mtime_ns, host=host)
                continue
            if name.startswith(_AUFS_META):
                log.info("upper %s: ignoring AUFS metadata %r", root, path)
                continue
            victim = name[len(WHITEOUT_PREFIX):]
            if victim in ("", ".", ".."):
                log.warning("upper %s: ignoring bad whiteout %r", root, path)
                continue
            d.whiteouts[victim] = UpperEntry(_join(rel, victim), WHITEOUT, mode=0o600, uid=st.st_uid,
                                             gid=st.st_gid, mtime_ns=st.st_mtime_ns, host=host)
            continue
        if stat.S_ISCHR(mode) and st.st_rdev == 0:        # kernel overlayfs whiteout
            d.whiteouts[name] = UpperEntry(path, WHITEOUT, mode=0o600, uid=st.st_uid, gid=st.st_gid,
                                           mtime_ns=st.st_mtime_ns, host=host)
            continue
        if stat.S_ISSOCK(mode):
            log.warning("upper %s: skipping socket %r (a layer cannot hold sockets)", root, path)
            continue
        xattrs, override, opaque, wh_record = _xattrs(at, where=host)
        uid, gid, perm = st.st_uid, st.st_gid, stat.S_IMODE(mode)
        devkind, major, minor = None, 0, 0
        if override is not None:
            uid, gid, perm, devkind, major, minor = parse_override(override, where=host)
        kw = dict(mode=perm, uid=uid, gid=gid, mtime_ns=st.st_mtime_ns, xattrs=xattrs or None, host=host)
        if devkind is not None:
            if not stat.S_ISREG(mode):
                raise UpperDirError(f"{host}: a file type override on something that is not a regular file")
            if st.st_size:
                log.warning("upper %s: placeholder %r is not empty; its bytes are ignored", root, path)
            if devkind == "s":
                log.warning("upper %s: skipping socket %r (a layer cannot hold sockets)", root, path)
                continue
            kind = {"c": CHAR, "b": BLOCK, "p": FIFO}[devkind]
            if kind != FIFO:
                kw.update(devmajor=major, devminor=minor)
        elif stat.S_ISDIR(mode):
            kind = DIR
        elif stat.S_ISREG(mode):
            kind = FILE
            kw["size"] = st.st_size
        elif stat.S_ISLNK(mode):
            kind = SYMLINK
            try:
                kw["target"] = os.readlink(name, dir_fd=dfd)
            except OSError as e:
                raise UpperDirError(f"cannot read symlink {host}: {e.strerror}") from None
            if not kw["target"]:
                raise UpperDirError(f"{host}: empty symlink target")
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = CHAR if stat.S_ISCHR(mode) else BLOCK
            kw.update(devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev))
        elif stat.S_ISFIFO(mode):
            kind = FIFO
        else:
            log.warning("upper %s: skipping %r of unknown type %o", root, path, stat.S_IFMT(mode))
            continue
        if kind != DIR and st.st_nlink > 1:
            kw["inode"] = (st.st_dev, st.st_ino)
        e = UpperEntry(path, kind, **kw)
        d.kids[name] = e
        if kind == DIR:
            subdirs.append((path, opaque, wh_record, st))
    for victim in recorded:
        if victim not in d.whiteouts:
            d.whiteouts[victim] = UpperEntry(_join(rel, victim), WHITEOUT, mode=0o600, uid=dst.st_uid,
                                             gid=dst.st_gid, mtime_ns=dst.st_mtime_ns, host=host_dir)
    return subdirs


def _dir_items(d: UpperDir) -> list[UpperEntry]:
    """A directory's records in layer order: opaque marker, whiteouts, entries (names by their bytes)."""
    out = [d.opaque] if d.opaque is not None else []
    out += [d.whiteouts[v] for v in sorted(d.whiteouts, key=os.fsencode)]   # before an entry of the same name
    out += [d.kids[n] for n in sorted(d.kids, key=os.fsencode)]
    return out


def _layer_order(dirs: dict[str, UpperDir]) -> list[UpperEntry]:
    """Depth first: each directory's contents right after its own entry."""
    out: list[UpperEntry] = []
    stack = [iter(_dir_items(dirs[""]))]
    while stack:
        e = next(stack[-1], None)
        if e is None:
            stack.pop()
            continue
        out.append(e)
        if e.kind == DIR:
            stack.append(iter(_dir_items(dirs[e.path])))
    return out


# --- diff ------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Change:
    """One ``docker diff`` line: ``kind`` is ``A``, ``C`` or ``D``; ``path`` is absolute (``/etc/motd``)."""

    path: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _dir_attrs_differ(e: UpperEntry, n: Node) -> bool:
    return e.mode != stat.S_IMODE(n.mode) or e.uid != n.uid or e.gid != n.gid


def diff(lower: MergedTree, scan: UpperScan) -> list[Change]:
    """The changes *scan* makes to the image *lower*, sorted by path (see the module docs)."""
    out: list[Change] = []

    def added(rel: str) -> None:              # everything below a new directory is new
        todo = [rel]
        while todo:
            for e in scan.dirs[todo.pop()].kids.values():
                out.append(Change("/" + e.path, "A"))
                if e.kind == DIR:
                    todo.append(e.path)

    def visit(rel: str, lower_ino: int | None, opaque: bool) -> bool:
        d = scan.dirs[rel]
        ln = lower.get(lower_ino) if lower_ino is not None else None
        lkids = ln.children if ln is not None and ln.children is not None else {}
        n0 = len(out)
        for name, e in d.kids.items():
            path = "/" + e.path
            lk = lkids.get(name)
            node = lower.get(lk) if lk is not None else None
            if node is None:
                out.append(Change(path, "A"))
                if e.kind == DIR:
                    added(e.path)
            elif e.kind == DIR and node.is_dir:
                # below an opaque directory, or a directory beside its own whiteout, nothing lower shows
                sub_opaque = opaque or scan.dirs[e.path].opaque is not None or name in d.whiteouts
                if visit(e.path, lk, sub_opaque) or _dir_attrs_differ(e, node):
                    out.append(Change(path, "C"))
            else:
                out.append(Change(path, "C"))
                if e.kind == DIR:
                    added(e.path)
        for name in d.whiteouts:
            if name in lkids and name not in d.kids:
                out.append(Change("/" + _join(rel, name), "D"))
        if opaque:
            for name in lkids:
                if name not in d.kids and name not in d.whiteouts:
                    out.append(Change("/" + _join(rel, name), "D"))
        return len(out) > n0

    visit("", ROOT_INO, scan.dirs[""].opaque is not None)
    out.sort(key=lambda c: c.path)
    return out


# --- what a MOUNTPOINT|UPPER argument names ---------------------------------------------------

@dataclass(frozen=True)
class Target:
    """An upper directory over an image: from a mount record, or an upper dir with ``--image``."""

    manifest: Manifest
    upto: int | None                 # the mount shows only the first N layers
    image: str                       # the image as the user knows it
    upper: Path | None               # None: a read-only mount (nothing changed)
    mountpoint: str | None = None

    def lower_tree(self, store: Store) -> MergedTree:
        from layerfs.fs import open_image_tree
        return open_image_tree(store, self.manifest, upto=self.upto)

    def scan(self) -> UpperScan:
        return scan_upper(self.upper) if self.upper is not None else UpperScan.empty()


def _abs(path: str) -> str:
    """The real path of *path* without touching it (it may be a dead FUSE mount)."""
    p = os.path.abspath(path)
    if p == "/":
        return p
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _image_name(rec) -> str:
    r = rec.reference
    return r.familiar() if r is not None else rec.name


def resolve_target(store: Store, text: str, *, image: str | None = None) -> Target:
    """What ``diff``/``commit`` act on: a mount point (or the upper dir of a mount), an upper
    directory the store kept after its mount ended (by path or id), or, with *image*, any
    upper directory over that local image."""
    from layerfs.mount import mount_states
    real = _abs(text)
    # a dead mount (its daemon gone) too: its upper is intact (copy-ups are renamed into place)
    records = [r for r, _ in mount_states(store)] if (store.root / "mounts").is_dir() else []
    for rec in records:
        by_mount = rec.mountpoint == real
        by_upper = rec.upper is not None and _abs(rec.upper) == real
        if not (by_mount or by_upper):
            continue
        if image is not None:
            raise UsageError(f"{text} is a layerfs mount of {rec.image}; --image applies to an upper directory only")
        try:
            m = store.manifest(Digest.parse(rec.manifest_digest))
        except StoreError:
            raise ImageNotFound(f"the image of mount {rec.mountpoint} ({rec.image}) is gone from the store") from None
        if not isinstance(m, Manifest):
            raise StoreError(f"mount {rec.mountpoint}: {rec.manifest_digest} is not an image manifest")
        return Target(m, rec.layer, rec.image, Path(rec.upper) if rec.upper else None, rec.mountpoint)
    if image is None:
        stored = _stored_upper(store, text, real)
        if stored is not None:
            return stored
        if os.path.isdir(real):
            raise UnknownTarget(f"{text} is not a layerfs mount point",
                                hint="list mounts with 'layerfs mounts'; for an upper directory name its image "
                                     "with --image REF")
        raise UnknownTarget(f"unknown mount point {text}", hint="list mounts with 'layerfs mounts'")
    if not os.path.isdir(real):
        raise UnknownTarget(f"upper directory {text} does not exist or is not a directory")
    rec, m = store.resolve(image)
    return Target(m, None, _image_name(rec), Path(real))


def _stored_upper(store: Store, text: str, real: str) -> Target | None:
    """An upper directory the store keeps after its mount ended (``ROOT/uppers/<id>/upper``, named by
    path or by id): its ``info.json`` names the image it was made on."""
    base = store.root / "uppers"
    path = Path(real)
    if "/" not in text and (base / text / "upper").is_dir():
        path = base / text / "upper"
    if path.name != "upper" or _abs(str(path.parent.parent)) != _abs(str(base)) or not path.is_dir():
        return None
    try:
        info = json.loads((path.parent / "info.json").read_bytes())
        digest = Digest.parse(info["manifest_digest"])
        image = str(info.get("image") or digest)
    except (OSError, ValueError, KeyError, TypeError, LayerfsError):
        return None
    try:
        m = store.manifest(digest)
    except StoreError:
        raise ImageNotFound(f"the image of upper directory {path} ({image}) is gone from the store") from None
    if not isinstance(m, Manifest):
        return None
    layer = info.get("layer")
    return Target(m, layer if isinstance(layer, int) and not isinstance(layer, bool) else None, image, path)


# --- an image plus an upper directory, as one merged tree ---------------------------------------

class _HostFile:
    """A LayerReader for one regular file of the upper directory (opened without following symlinks)."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size

    def read(self, offset: int, size: int) -> bytes:
        fd = _open_long(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


def _upper_mode(e: UpperEntry) -> int:
    return {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
            BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.kind] | e.mode


def overlay_tree(lower: MergedTree, scan: UpperScan) -> MergedTree:
    """*lower* with the upper directory *scan* on top, as one read-only merged tree.

    The OCI layer rules: a whiteout hides the lower entry, an opaque directory
    everything lower below it, an upper non-directory replaces, an upper
    directory over a lower one merges (attributes from the upper). Files of the
    upper are read from the host. The root keeps the image's attributes (a
    layer never changes them)."""
    out = MergedTree(list(lower.readers))
    root = out.nodes[ROOT_INO]
    lroot = lower.get(ROOT_INO)
    for attr in ("mode", "uid", "gid", "mtime_ns", "xattrs"):
        setattr(root, attr, getattr(lroot, attr))
    made_lower: dict[int, int] = {}
    made_upper: dict[tuple[int, int], int] = {}

    def copy_lower(parent: int, name: str, n: Node) -> Node | None:
        have = made_lower.get(n.ino)
        if have is not None:
            out.link(parent, name, have)
            out.nodes[have].nlink += 1
            return None
        c = out.add(parent, name, n.mode, uid=n.uid, gid=n.gid, size=n.size, mtime_ns=n.mtime_ns, rdev=n.rdev,
                    target=n.target, xattrs=dict(n.xattrs) if n.xattrs else None, layer=n.layer,
                    offset=n.offset, sparse=n.sparse, inline=n.inline)
        if not c.is_dir:
            made_lower[n.ino] = c.ino
        return c

    def add_upper(parent: int, e: UpperEntry) -> Node | None:
        if e.inode is not None:
            have = made_upper.get(e.inode)
            if have is not None:
                out.link(parent, e.name, have)
                out.nodes[have].nlink += 1
                return None
        kw = dict(uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs=dict(e.xattrs) if e.xattrs else None)
        if e.kind == FILE:
            kw["size"] = e.size
            if e.size:
                out.readers.append(_HostFile(e.host, e.size))
                kw["layer"] = len(out.readers) - 1
        elif e.kind == SYMLINK:
            kw["target"] = e.target
            kw["size"] = len(os.fsencode(e.target))
        elif e.kind in (CHAR, BLOCK):
            kw["rdev"] = os.makedev(e.devmajor, e.devminor)
        c = out.add(parent, e.name, _upper_mode(e), **kw)
        if e.inode is not None:
            made_upper[e.inode] = c.ino
        return c

    # (lower dir ino or None, upper dir path or None, output dir ino, lower hidden)
    stack: list[tuple[int | None, str | None, int, bool]] = [
        (ROOT_INO, "", ROOT_INO, scan.dirs[""].opaque is not None)]
    while stack:
        lino, urel, oino, opaque = stack.pop()
        ud = scan.dirs.get(urel) if urel is not None else None
        names: dict[str, tuple[str, object]] = {}
        ln = lower.get(lino) if lino is not None else None
        if ln is not None and ln.children is not None and not opaque:
            for name, ino in ln.children.items():
                if ud is None or name not in ud.whiteouts:
                    names[name] = ("L", ino)
        if ud is not None:
            for name, e in ud.kids.items():
                names[name] = ("U", e)
        subdirs = []
        for name in sorted(names, key=os.fsencode):
            src, obj = names[name]
            if src == "L":
                n = lower.get(obj)
                c = copy_lower(oino, name, n)
                if c is not None and c.is_dir:
                    subdirs.append((obj, None, c.ino, False))
            else:
                e = obj
                c = add_upper(oino, e)
                if c is not None and c.is_dir:
                    below = None
                    if ln is not None and ln.children is not None and not opaque and name in ln.children \
                            and name not in ud.whiteouts:      # beside its whiteout a directory is not merged
                        lk = ln.children[name]
                        if lower.get(lk).is_dir:
                            below = lk
                    subdirs.append((below, e.path, c.ino, scan.dirs[e.path].opaque is not None))
        out.nodes[oino].nlink = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
    return out


# --- tar output --------------------------------------------------------------------------------

def _tarinfo(name: str, type_: bytes, *, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
             linkname: str = "", devmajor: int = 0, devminor: int = 0,
             xattrs: Mapping[str, bytes] | None = None, keep_ns: bool = False) -> tarfile.TarInfo:
    """A PAX header with fixed conventions: no user/group names, whole-second mtime unless
    *keep_ns* (then a PAX ``mtime`` record carries the nanoseconds), xattrs as sorted
    ``SCHILY.xattr.*`` records (binary values via ``hdrcharset=BINARY``); a symlink's mode is
    always :data:`~layerfs.index.layerindex.SYMLINK_MODE`."""
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


class _TarWriter:
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


def _tree_chunks(tree: MergedTree, node: Node) -> Iterator[bytes]:
    off = 0
    while off < node.size:
        b = tree.read(node.ino, off, min(_READ, node.size - off))
        if not b:
            raise StoreError(f"short read of inode {node.ino} at {off} of {node.size} bytes")
        off += len(b)
        yield b


def _tree_members(tree: MergedTree, *, keep_ns: bool = True) -> Iterator[tuple[tarfile.TarInfo, Node | None]]:
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
            yield _tarinfo(path, tarfile.DIRTYPE, **kw), None
            stack.append(kids(n.ino, path + "/"))
            continue
        if n.ino in seen:
            yield _tarinfo(path, tarfile.LNKTYPE, linkname=seen[n.ino], **kw), None
            continue
        if fmt == stat.S_IFSOCK:
            log.warning("export: skipping socket /%s", path)
            continue
        seen[n.ino] = path
        if fmt == stat.S_IFREG:
            yield _tarinfo(path, tarfile.REGTYPE, size=n.size, **kw), n
        elif fmt == stat.S_IFLNK:
            yield _tarinfo(path, tarfile.SYMTYPE, linkname=n.target or "", **kw), None
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            yield _tarinfo(path, tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE,
                           devmajor=os.major(n.rdev), devminor=os.minor(n.rdev), **kw), None
        elif fmt == stat.S_IFIFO:
            yield _tarinfo(path, tarfile.FIFOTYPE, **kw), None


def export_tree(tree: MergedTree, out: BinaryIO) -> int:
    """Write *tree* to *out* as one tar (whiteouts already applied by the tree): depth first,
    names sorted by their bytes, hard links as links, xattrs, devices, nanosecond mtimes
    as PAX records. Returns the number of bytes written."""
    written = 0

    def sink(b: bytes) -> None:
        nonlocal written
        out.write(b)
        written += len(b)

    w = _TarWriter(sink)
    for ti, node in _tree_members(tree):
        w.add(ti, _tree_chunks(tree, node) if node is not None and node.size else ())
    w.close()
    return written


@contextlib.contextmanager
def output_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file written under a temporary name beside *path* and renamed over it only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- the new layer -------------------------------------------------------------------------------

def _upper_file_chunks(e: UpperEntry) -> Iterator[bytes]:
    """The bytes of an upper file, opened without following symlinks; it must still be the file scanned."""
    try:
        fd = _open_long(e.host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
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
            yield _tarinfo(_join(parent, WHITEOUT_PREFIX + name), tarfile.REGTYPE, mode=0o600, uid=e.uid,
                           gid=e.gid, mtime_ns=e.mtime_ns), None
            continue
        if e.kind == OPAQUE:
            # docker's overlay driver gives the marker its directory's permissions, owner and time
            d = _dir_entry(scan, e.path)
            src = d if d is not None else e
            yield _tarinfo(_join(e.path, OPAQUE_WHITEOUT), tarfile.REGTYPE, mode=src.mode & 0o777, uid=src.uid,
                           gid=src.gid, mtime_ns=src.mtime_ns), None
            continue
        kw = dict(mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs=e.xattrs)
        if e.inode is not None:
            first = links.get(e.inode)
            if first is not None:
                yield _tarinfo(e.path, tarfile.LNKTYPE, linkname=first, **kw), None
                continue
            links[e.inode] = e.path
        if e.kind == DIR:
            yield _tarinfo(e.path, tarfile.DIRTYPE, **kw), None
        elif e.kind == FILE:
            yield _tarinfo(e.path, tarfile.REGTYPE, size=e.size, **kw), e
        elif e.kind == SYMLINK:
            yield _tarinfo(e.path, tarfile.SYMTYPE, linkname=e.target, **kw), None
        elif e.kind in (CHAR, BLOCK):
            yield _tarinfo(e.path, tarfile.CHRTYPE if e.kind == CHAR else tarfile.BLKTYPE,
                           devmajor=e.devmajor, devminor=e.devminor, **kw), None
        elif e.kind == FIFO:
            yield _tarinfo(e.path, tarfile.FIFOTYPE, **kw), None


def _dir_entry(scan: UpperScan, rel: str) -> UpperEntry | None:
    if not rel:
        return None
    parent, _, name = rel.rpartition("/")
    d = scan.dirs.get(parent)
    return d.kids.get(name) if d is not None else None


def write_layer_tar(scan: UpperScan, sink: Callable[[bytes], object]) -> None:
    """The uncompressed layer tar of *scan* (see :func:`write_layer`)."""
    w = _TarWriter(sink)
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
        from layerfs.store import store_error
        raise store_error(e, "the new layer") from None
    finally:
        indexer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --- docker commit --change ----------------------------------------------------------------------

_COMMIT_INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "STOPSIGNAL", "USER",
                        "VOLUME", "WORKDIR")
_ALL_INSTRUCTIONS = frozenset(_COMMIT_INSTRUCTIONS + ("ADD", "ARG", "COPY", "FROM", "HEALTHCHECK", "MAINTAINER",
                                                      "RUN", "SHELL"))
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")
_SIGNALS = {"ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL", "PIPE",
            "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP", "TTIN",
            "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "UNUSED"}


def _instructions(changes: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """(INSTRUCTION, rest, original) per instruction; the changes are read as one Dockerfile
    (docker joins them with newlines): ``\\`` at the end of a line continues it, ``#`` lines are comments."""
    logical: list[str] = []
    cur = ""
    for line in "\n".join(changes).split("\n"):
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1]
            continue
        logical.append(cur + line)
        cur = ""
    if cur:
        logical.append(cur)
    for text in logical:
        text = text.strip()
        if not text:
            continue
        m = re.match(r"(\S+)\s*(.*)", text, re.S)
        yield m.group(1).upper(), m.group(2).strip(), text


def _words(text: str) -> list[str]:
    """Split on unquoted whitespace, keeping quotes and escapes in the words (docker's parseWords)."""
    words: list[str] = []
    cur = ""
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is None and ch.isspace():
            if cur:
                words.append(cur)
                cur = ""
            i += 1
            continue
        if ch == "\\" and i + 1 < len(text) and quote != "'":
            cur += text[i:i + 2]
            i += 2
            continue
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        cur += ch
        i += 1
    if cur:
        words.append(cur)
    return words


class _Lex:
    """Docker's shell-word processing for ENV, LABEL, EXPOSE, USER, VOLUME, WORKDIR, STOPSIGNAL:
    quotes removed, ``\\`` escapes, ``$VAR`` / ``${VAR}`` / ``${VAR:-x}`` ``${VAR-x}``
    ``${VAR:+x}`` ``${VAR+x}`` ``${VAR:?msg}`` ``${VAR?msg}`` expanded from *env*."""

    def __init__(self, env: Mapping[str, str], what: str):
        self.env = env
        self.what = what

    def word(self, text: str) -> str:
        out = self._process(text, split=False)
        return out[0] if out else ""

    def words(self, text: str) -> list[str]:
        return self._process(text, split=True)

    def _err(self, msg: str) -> ChangeSyntaxError:
        return ChangeSyntaxError(f"{self.what}: {msg}")

    def _process(self, text: str, *, split: bool) -> list[str]:
        words: list[str] = []
        cur: list[str] = []
        have = False          # a word started (an empty quoted string is still a word)
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if split and ch.isspace():
                if have:
                    words.append("".join(cur))
                    cur, have = [], False
                i += 1
                continue
            have = True
            if ch == "'":
                j = text.find("'", i + 1)
                if j < 0:
                    raise self._err("unexpected end of statement while looking for matching single-quote")
                cur.append(text[i + 1:j])
                i = j + 1
            elif ch == '"':
                i += 1
                while True:
                    if i >= n:
                        raise self._err("unexpected end of statement while looking for matching double-quote")
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n and text[i + 1] in '"$\\':
                        cur.append(text[i + 1])
                        i += 2
                    elif c == "$":
                        val, i = self._var(text, i)
                        cur.append(val)
                    else:
                        cur.append(c)
                        i += 1
            elif ch == "\\":
                if i + 1 < n:
                    cur.append(text[i + 1])
                i += 2
            elif ch == "$":
                val, i = self._var(text, i)
                cur.append(val)
            else:
                cur.append(ch)
                i += 1
        if have:
            words.append("".join(cur))
        return words

    def _var(self, text: str, i: int) -> tuple[str, int]:
        """Expand the variable at text[i] == '$'; returns (value, index after it)."""
        n = len(text)
        if i + 1 >= n:
            return "$", i + 1
        if text[i + 1] != "{":
            j = i + 1
            while j < n and _NAME_CHARS.match(text[j]):
                j += 1
            if j == i + 1:
                return "$", i + 1
            return self.env.get(text[i + 1:j], ""), j
        j = i + 2
        while j < n and _NAME_CHARS.match(text[j]):
            j += 1
        name = text[i + 2:j]
        if not name:
            raise self._err(f"bad substitution in {text!r}")
        if j < n and text[j] == "}":
            return self.env.get(name, ""), j + 1
        op = ""
        if j < n and text[j] == ":":
            op = ":"
            j += 1
        if j >= n or text[j] not in "-+?":
            raise self._err(f"unsupported modifier in {text!r}")
        op += text[j]
        depth, k = 1, j + 1
        while k < n and depth:
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
            k += 1
        if depth:
            raise self._err(f"missing '}}' in {text!r}")
        arg = self.word(text[j + 1:k - 1])
        val = self.env.get(name)
        unset = val is None or (op.startswith(":") and val == "")
        kind = op[-1]
        if kind == "-":
            return (arg if unset else val), k
        if kind == "+":
            return ("" if unset else arg), k
        if unset:
            raise self._err(f"{name}: {arg or 'is not allowed to be unset'}")
        return val, k


def _maybe_json(rest: str) -> list[str] | None:
    """The JSON (exec) form of *rest*, or None for the shell form."""
    if not rest.startswith("["):
        return None
    try:
        v = json.loads(rest)
    except ValueError:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def _name_values(instr: str, rest: str, lex: _Lex) -> list[tuple[str, str]]:
    """ENV / LABEL: ``k=v k2="v 2"``, or the legacy ``KEY value with spaces``."""
    words = _words(rest)
    if not words:
        raise ChangeSyntaxError(f"{instr} requires at least one argument")
    if "=" not in words[0]:
        parts = rest.split(None, 1)
        if len(parts) < 2:
            raise ChangeSyntaxError(f"{instr} must have two arguments")
        pairs = [(parts[0], parts[1])]
    else:
        pairs = []
        for w in words:
            if "=" not in w:
                raise ChangeSyntaxError(f"Syntax error - can't find = in {w!r}. Must be of the form: name=value")
            k, _, v = w.partition("=")
            pairs.append((k, v))
    out = []
    for k, v in pairs:
        key = lex.word(k)
        if not key:
            raise ChangeSyntaxError(f"{instr} names can not be blank")
        out.append((key, lex.word(v)))
    return out


def _ports(words: list[str]) -> list[str]:
    out = []
    for w in words:
        spec, _, proto = w.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise ChangeSyntaxError(f"invalid proto: {proto}")
        lo, _, hi = spec.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ChangeSyntaxError(f"invalid containerPort: {spec}")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a > 65535 or b > 65535 or b < a:
            raise ChangeSyntaxError(f"invalid containerPort: {spec}")
        out.extend(f"{p}/{proto}" for p in range(a, b + 1))
    return out


def _workdir(current: str, requested: str) -> str:
    if not requested:
        raise ChangeSyntaxError("WORKDIR requires exactly one argument")
    p = requested if requested.startswith("/") else posixpath.join("/", current or "/", requested)
    p = posixpath.normpath(p)
    return "/" + p.lstrip("/")


def apply_changes(config: Mapping, changes: Sequence[str]) -> dict:
    """The image config's ``config`` object with ``docker commit --change`` instructions applied.

    CMD and ENTRYPOINT take the exec (JSON) or shell form (the image's
    ``Shell``, else ``/bin/sh -c``); an ENTRYPOINT resets CMD unless a CMD came
    before it in the same changes (docker's rule). ENV, LABEL, EXPOSE, USER,
    VOLUME, WORKDIR and STOPSIGNAL expand ``$VAR`` from the image's Env and
    remove quotes as docker's shell-word processing does. Raises
    :class:`ChangeSyntaxError` for anything docker commit would refuse."""
    cfg = copy.deepcopy(dict(config))
    cmd_set = False
    for instr, rest, original in _instructions(changes):
        if instr not in _COMMIT_INSTRUCTIONS:
            if instr in _ALL_INSTRUCTIONS:
                raise ChangeSyntaxError(f"{instr} is not a valid change command")
            raise ChangeSyntaxError(f"unknown instruction: {instr}", hint=ChangeSyntaxError.default_hint)
        env = dict(e.partition("=")[::2] for e in cfg.get("Env") or [] if isinstance(e, str))
        lex = _Lex(env, instr)
        if instr in ("CMD", "ENTRYPOINT"):
            if not rest:
                raise ChangeSyntaxError(f"{instr} requires at least one argument")
            args = _maybe_json(rest)
            if args is None:
                shell = cfg.get("Shell") if isinstance(cfg.get("Shell"), list) and cfg.get("Shell") else None
                args = list(shell or ["/bin/sh", "-c"]) + [rest]
            if instr == "CMD":
                cfg["Cmd"] = args
                cmd_set = True
            else:
                cfg["Entrypoint"] = args
                if not cmd_set:
                    cfg.pop("Cmd", None)
        elif instr == "ENV":
            cur = [e for e in cfg.get("Env") or [] if isinstance(e, str)]
            for key, value in _name_values(instr, rest, lex):
                item = f"{key}={value}"
                for i, e in enumerate(cur):
                    if e.partition("=")[0] == key:
                        cur[i] = item
                        break
                else:
                    cur.append(item)
            cfg["Env"] = cur
        elif instr == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            for key, value in _name_values(instr, rest, lex):
                labels[key] = value
            cfg["Labels"] = labels
        elif instr == "EXPOSE":
            words = lex.words(rest)
            if not words:
                raise ChangeSyntaxError("EXPOSE requires at least one argument")
            ports = dict(cfg.get("ExposedPorts") or {})
            for p in _ports(words):
                ports[p] = {}
            cfg["ExposedPorts"] = ports
        elif instr == "USER":
            words = lex.words(rest)
            if len(words) != 1 or not words[0]:
                raise ChangeSyntaxError("USER requires exactly one argument")
            cfg["User"] = words[0]
        elif instr == "WORKDIR":
            words = lex.words(rest)
            if len(words) != 1:
                raise ChangeSyntaxError("WORKDIR requires exactly one argument")
            cfg["WorkingDir"] = _workdir(cfg.get("WorkingDir") or "", words[0])
        elif instr == "VOLUME":
            vols = _maybe_json(rest)
            if vols is None:
                vols = lex.words(rest)
            if not vols:
                raise ChangeSyntaxError("VOLUME requires at least one argument")
            volumes = dict(cfg.get("Volumes") or {})
            for v in vols:
                v = v.strip()
                if not v:
                    raise ChangeSyntaxError("VOLUME specified can not be an empty string")
                volumes[v] = {}
            cfg["Volumes"] = volumes
        elif instr == "STOPSIGNAL":
            words = lex.words(rest)
            if len(words) != 1:
                raise ChangeSyntaxError("STOPSIGNAL requires exactly one argument")
            sig = words[0]
            name = sig.upper().removeprefix("SIG")
            ok = (sig.isdigit() and 0 < int(sig) <= 64) or name in _SIGNALS or re.fullmatch(r"RTM(IN|AX)([+-]\d+)?", name)
            if not ok:
                raise ChangeSyntaxError(f"invalid signal: {sig}")
            cfg["StopSignal"] = sig
        elif instr == "ONBUILD":
            trigger = rest.split(None, 1)[0].upper() if rest else ""
            if not trigger:
                raise ChangeSyntaxError("ONBUILD requires at least one argument")
            if trigger in ("ONBUILD", "FROM", "MAINTAINER"):
                raise ChangeSyntaxError(f"{trigger} isn't allowed as an ONBUILD trigger")
            if trigger not in _ALL_INSTRUCTIONS:
                raise ChangeSyntaxError(f"unknown instruction: {trigger}")
            cfg["OnBuild"] = list(cfg.get("OnBuild") or []) + [rest]
    return cfg


# --- commit --------------------------------------------------------------------------------------

#: config fields that describe how the parent was built, stale on a committed image
_STALE_CONFIG_FIELDS = ("container", "container_config", "docker_version", "id", "parent")
BASE_DIGEST_ANNOTATION = "org.opencontainers.image.base.digest"
BASE_NAME_ANNOTATION = "org.opencontainers.image.base.name"


@dataclass(frozen=True, kw_only=True)
class CommitOptions:
    message: str = ""                 # history comment (-m)
    author: str = ""                  # image author (--author)
    changes: Sequence[str] = ()       # docker commit --change instructions (-c)
    created: str | None = None        # RFC 3339; default: now, or SOURCE_DATE_EPOCH when set


@dataclass(frozen=True)
class CommitResult:
    reference: Reference
    name: str                         # the name tagged in the store
    manifest: Manifest
    image_id: Digest                  # the config digest, what docker commit prints
    layer: LayerResult | None         # None: nothing changed (an empty_layer history entry)


def _now_rfc3339() -> str:
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        return _dt.datetime.fromtimestamp(int(sde), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac_s = f"{frac:09d}".rstrip("0")
    return f"{base}.{frac_s}Z" if frac_s else f"{base}Z"      # Go's RFC3339Nano


def parse_new_reference(text: str | Reference) -> Reference:
    """NEWREF of commit: NAME[:TAG] (``latest`` implied); a digest is refused."""
    ref = text if isinstance(text, Reference) else Reference.parse(text)
    if ref.digest is not None:
        raise UsageError(f"invalid reference {str(text)!r}: cannot tag an image with a digest",
                         hint="use NAME[:TAG]")
    return ref


def _history_upto(history: list, upto: int) -> list:
    """History entries of the first *upto* non-empty layers (and the empty ones before the next)."""
    out, seen = [], 0
    for h in history:
        empty = isinstance(h, Mapping) and bool(h.get("empty_layer"))
        if not empty:
            if seen == upto:
                break
            seen += 1
        out.append(h)
    return out


def new_config(parent: ImageConfig, *, diff_id: Digest | None, created: str, options: CommitOptions,
               upto: int | None = None, nlayers: int | None = None) -> dict:
    """The committed image's config document (parent's, changes applied, one layer and history entry more)."""
    doc = json.loads(parent.raw)
    for k in _STALE_CONFIG_FIELDS:
        doc.pop(k, None)
    parent_cfg = doc.get("config") if isinstance(doc.get("config"), Mapping) else {}
    created_by = " ".join(c for c in parent_cfg.get("Cmd") or [] if isinstance(c, str))
    doc["config"] = apply_changes(parent_cfg, options.changes)
    doc["created"] = created
    if options.author:
        doc["author"] = options.author
    else:
        doc.pop("author", None)
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), Mapping) else {}
    diff_ids = [d for d in rootfs.get("diff_ids") or [] if isinstance(d, str)]
    history = [h for h in doc.get("history") or [] if isinstance(h, Mapping)]
    if upto is not None:
        diff_ids = diff_ids[:upto]
        history = _history_upto(history, upto)
    n = len(diff_ids) if nlayers is None else nlayers
    if not history and n:      # a parent without history: one plain entry per layer keeps rows and layers paired
        history = [{} for _ in range(n)]
    entry: dict = {"created": created, "created_by": created_by}
    if options.author:
        entry["author"] = options.author
    if options.message:
        entry["comment"] = options.message
    if diff_id is None:
        entry["empty_layer"] = True
    else:
        diff_ids.append(str(diff_id))
    history.append(entry)
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    doc["history"] = history
    return doc


def commit(store: Store, target: Target, newref: str | Reference, options: CommitOptions | None = None) -> CommitResult:
    """Commit *target*'s upper directory as a new image tagged *newref* (see the module docs).

    An upper directory without changes adds no layer, only a history entry
    marked ``empty_layer`` (as docker does for an empty diff)."""
    options = options or CommitOptions()
    ref = parse_new_reference(newref)
    store.init()
    base = target.manifest
    parent = store.config(base)
    created = options.created or _now_rfc3339()
    n = len(base.layers) if target.upto is None else min(target.upto, len(base.layers))
    # the changes are checked before anything is written
    new_config(parent, diff_id=None, created=created, options=options, upto=target.upto, nlayers=n)
    scan = target.scan()
    with store.lock("gc", shared=True):     # no prune between storing the blobs and tagging them
        layer = write_layer(store, scan) if scan else None
        if layer is not None and layer.diff_id == EMPTY_TAR_DIGEST:
            layer = None
        doc = new_config(parent, diff_id=layer.diff_id if layer else None, created=created, options=options,
                         upto=target.upto, nlayers=n)
        config_raw = json_bytes(doc)
        config_digest = store.put_blob(config_raw)
        layers = [d.to_json() for d in base.layers[:n]]
        if layer is not None:
            layers.append(layer.descriptor.to_json())
        mdoc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": Descriptor(OCI_CONFIG, config_digest, len(config_raw)).to_json(),
                "layers": layers,
                "annotations": {BASE_DIGEST_ANNOTATION: str(base.digest), BASE_NAME_ANNOTATION: target.image}}
        raw = json_bytes(mdoc)
        manifest = parse_manifest(raw)
        assert isinstance(manifest, Manifest)
        store.put_blob(raw, manifest.digest)
        cfg = ImageConfig.parse(config_raw)
        store.tag(str(ref), Descriptor(OCI_MANIFEST, manifest.digest, len(raw), None, cfg.platform))
    try:    # the merged-tree cache now, so the first mount opens at once
        from layerfs.fs import open_image_tree
        open_image_tree(store, manifest)
    except LayerfsError as e:
        log.warning("cannot prepare the tree cache of %s: %s", ref.familiar(), e)
    return CommitResult(ref, str(ref), manifest, config_digest, layer)


# --- export ------------------------------------------------------------------------------------

def export_source(store: Store, text: str, *, upper: str | os.PathLike[str] | None = None) -> MergedTree:
    """The merged tree ``export`` writes: a mount point (its image plus its upper directory), or a
    local image (plus *upper*, an upper directory over it, when given)."""
    from layerfs.mount import mount_states
    real = _abs(text)
    if (store.root / "mounts").is_dir():
        for rec, _ in mount_states(store):
            if rec.mountpoint == real:
                if upper is not None:
                    raise UsageError(f"{text} is a layerfs mount; --upper applies to an image only")
                t = resolve_target(store, text)
                lower = t.lower_tree(store)
                return overlay_tree(lower, t.scan()) if t.upper is not None else lower
    try:
        rec, m = store.resolve(text)
    except ImageNotFound:
        if os.path.isdir(real):
            raise UnknownTarget(f"{text} is neither a local image nor a layerfs mount point",
                                hint="list them with 'layerfs images' and 'layerfs mounts'") from None
        raise
    from layerfs.fs import open_image_tree
    lower = open_image_tree(store, m)
    if upper is None:
        return lower
    return overlay_tree(lower, scan_upper(upper))
