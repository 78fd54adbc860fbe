"""Reading an upper directory: :func:`scan_upper` and the records it makes.

The upper directory (the contract with the overlay; :mod:`layerfs.mount` records it
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

The format itself (names, xattrs, the override value and its one rule for a
malformed value, the whiteout forms) is defined by :mod:`layerfs.fs.upper`; this
module only walks an upper directory with its predicates.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from layerfs.errors import ContentError
from layerfs.fs import (META_XATTR_PREFIXES, OVERRIDE_XATTR, WHITEOUTS_XATTR, fd_path, is_device_whiteout,
    is_opaque_marker, is_opaque_xattr, is_reserved_name, parse_override, parse_whiteout_record, whiteout_target)
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK

log = logging.getLogger(__name__)

__all__ = ["OVERRIDE_XATTR", "WHITEOUT", "OPAQUE", "UpperDirError", "UpperEntry", "UpperDir", "UpperScan",
           "scan_upper", "open_long", "join_path"]

#: host labels, never content (the format's own xattrs are fs.META_XATTR_PREFIXES)
_SKIP_XATTRS = frozenset({"security.selinux"})

#: the kinds of :class:`UpperEntry` beside the file types of :mod:`layerfs.index`
WHITEOUT = "whiteout"
OPAQUE = "opaque"


class UpperDirError(ContentError):
    """An upper directory that cannot be read or breaks the format."""


@dataclass(frozen=True)
class UpperEntry:
    """One entry of an upper directory, with its effective attributes (overrides applied).

    ``path`` is relative (``"etc/motd"``; surrogate-escaped str). ``kind`` is a
    :mod:`layerfs.index` type (``FILE``, ``DIR``, ``SYMLINK``, ``CHAR``,
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

    def dir_entry(self, rel: str) -> UpperEntry | None:
        """The entry of the directory *rel* in its parent (None for the root, or when it is not there)."""
        if not rel:
            return None
        parent, _, name = rel.rpartition("/")
        d = self.dirs.get(parent)
        return d.kids.get(name) if d is not None else None


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
        elif is_opaque_xattr(name, value):
            opaque = True
        elif not name.startswith(META_XATTR_PREFIXES) and name not in _SKIP_XATTRS and "=" not in name:
            out[name] = value
    return out, override, opaque, whiteouts


def join_path(parent: str, name: str) -> str:
    """The relative path of *name* in the directory *parent* (``""``: the root)."""
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
            dfd = open_long(host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if rel else 0))
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


def open_long(path: str, flags: int) -> int:
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
        path = join_path(rel, name)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UpperDirError(f"{host} vanished while the upper directory was read",
                                hint="stop writing to the mount and try again") from None
        mode = st.st_mode
        if is_reserved_name(name):
            if is_opaque_marker(name, mode):
                d.opaque = UpperEntry(rel, OPAQUE, mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                                      mtime_ns=st.st_mtime_ns, host=host)
                continue
            victim = whiteout_target(name, mode)
            if victim is None:     # AUFS metadata, a .wh. name that is no regular file or names nothing
                log.info("upper %s: ignoring %r (a .wh. name that whites out nothing)", root, path)
                continue
            if st.st_size:
                log.warning("upper %s: whiteout %r is not empty; treated as a whiteout", root, path)
            d.whiteouts[victim] = UpperEntry(join_path(rel, victim), WHITEOUT, mode=0o600, uid=st.st_uid,
                                             gid=st.st_gid, mtime_ns=st.st_mtime_ns, host=host)
            continue
        if is_device_whiteout(mode, st.st_rdev):        # kernel overlayfs whiteout
            d.whiteouts[name] = UpperEntry(path, WHITEOUT, mode=0o600, uid=st.st_uid, gid=st.st_gid,
                                           mtime_ns=st.st_mtime_ns, host=host)
            continue
        if stat.S_ISSOCK(mode):
            log.warning("upper %s: skipping socket %r (a layer cannot hold sockets)", root, path)
            continue
        xattrs, override, opaque, wh_record = _xattrs(at, where=host)
        uid, gid, perm = st.st_uid, st.st_gid, stat.S_IMODE(mode)
        devkind, major, minor = None, 0, 0
        ov = parse_override(override, file_mode=mode, where=host) if override is not None else None
        if ov is not None:       # a malformed value is None: ignored whole, as the mount does
            uid, gid, perm = ov.uid, ov.gid, ov.mode
            devkind, major, minor = ov.type_char, os.major(ov.rdev), os.minor(ov.rdev)
        kw = dict(mode=perm, uid=uid, gid=gid, mtime_ns=st.st_mtime_ns, xattrs=xattrs or None, host=host)
        if devkind is not None:     # parse_override gives a file type for a regular file only
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
            d.whiteouts[victim] = UpperEntry(join_path(rel, victim), WHITEOUT, mode=0o600, uid=dst.st_uid,
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
