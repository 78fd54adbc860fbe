"""Snapshot a directory tree entry by entry, compare snapshots, and build kernel-overlayfs references.

Used by ``test_mount_equivalence.py`` to compare a layerfs mount with two
independent references of the same image: ``umoci raw unpack`` and the
kernel's overlayfs over the layers extracted one by one in overlay form.

* :func:`snapshot` walks a tree (never following symlinks) and records for
  every entry its type, permission bits, owner, size, content hash, link
  target, device numbers, xattrs, mtime, ``st_nlink`` and its hard-link
  group (the other visible names of the same inode).
* :func:`compare` lists every :class:`Difference` between two snapshots,
  field by field; callers decide which differences are legitimate, one
  documented rule at a time (never a blanket ignore).
* :func:`extract_overlay_layers` turns layer tars (uncompressed) into
  overlayfs lower directories: whiteouts become 0/0 character devices,
  opaque markers the ``trusted.overlay.opaque=y`` xattr. It is written from
  the OCI image-spec and tar semantics with :mod:`tarfile`, independently of
  layerfs' own code; layer *N* is extracted while the kernel overlay of the
  layers below it is mounted, and that mount answers the questions a layer
  cannot answer by itself (does a whiteout's parent exist below, which
  attributes an implicit parent directory keeps).
* :func:`kernel_overlay` and :func:`tmpfs` mount (and always unmount).

Run as a script (``python treecompare.py DIR``) it prints the snapshot of DIR
as JSON, so a snapshot can be taken as another user.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

__all__ = ["Entry", "Snapshot", "Difference", "snapshot", "compare", "link_problems", "norm_path",
           "extract_overlay_layers", "kernel_overlay", "tmpfs", "unmount", "pax_mtime_ns", "OPAQUE_XATTR"]

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}

#: the fields :func:`compare` looks at, in this order
FIELDS = ("kind", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs", "mtime_ns", "nlink", "links")

OPAQUE_XATTR = "trusted.overlay.opaque"


# --- snapshots --------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One name of a tree as ``lstat`` and friends see it."""

    kind: str                               # file, dir, symlink, char, block, fifo, socket
    mode: int                               # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None                        # st_size; None for directories (file system specific)
    sha256: str | None                      # regular files: hash of the content
    target: str | None                      # symlinks: the target (surrogate-escaped str)
    rdev: tuple[int, int] | None            # devices: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...]   # sorted (name, value) pairs
    mtime_ns: int
    nlink: int
    links: tuple[str, ...] = ()             # non-directories: every visible name of this inode (if > 1)
    ino: int = field(default=0, compare=False)
    dev: int = field(default=0, compare=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["xattrs"] = [[k, v.hex()] for k, v in self.xattrs]
        d["links"] = list(self.links)
        d["rdev"] = list(self.rdev) if self.rdev else None
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "Entry":
        d = dict(d)
        d["xattrs"] = tuple((k, bytes.fromhex(v)) for k, v in d["xattrs"])
        d["links"] = tuple(d["links"])
        d["rdev"] = tuple(d["rdev"]) if d["rdev"] else None
        return cls(**d)


#: path ("" for the root, "a/b" below it) -> Entry
Snapshot = dict


def _hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for n in names:
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:   # listed but gone: not ours to judge here
                raise
    return tuple(sorted(out))


def _entry(path: str, st: os.stat_result) -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    kind = KINDS[fmt]
    return Entry(
        kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        size=None if kind == "dir" else st.st_size,
        sha256=_hash(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=_xattrs(path), mtime_ns=st.st_mtime_ns, nlink=st.st_nlink, ino=st.st_ino, dev=st.st_dev)


def snapshot(root: str | os.PathLike[str]) -> Snapshot:
    """Every entry below *root* (and *root* itself as ``""``), symlinks never followed."""
    root = os.fspath(root)
    out: dict[str, Entry] = {"": _entry(root, os.lstat(root))}
    stack = [("", root)]
    while stack:
        rel, full = stack.pop()
        for name in sorted(os.listdir(full)):
            p = os.path.join(full, name)
            r = f"{rel}/{name}" if rel else name
            e = out[r] = _entry(p, os.lstat(p))
            if e.kind == "dir":
                stack.append((r, p))
    groups: dict[tuple[int, int], list[str]] = {}
    for path, e in out.items():
        if e.kind != "dir":
            groups.setdefault((e.dev, e.ino), []).append(path)
    for names in groups.values():
        if len(names) > 1:
            names.sort()
            for n in names:
                out[n] = _replace(out[n], links=tuple(names))
    return out


def _replace(e: Entry, **kw) -> Entry:
    d = {f: getattr(e, f) for f in e.__dataclass_fields__}
    d.update(kw)
    return Entry(**d)


def snapshot_to_json(snap: Snapshot) -> str:
    return json.dumps({p: e.to_json() for p, e in snap.items()}, sort_keys=True)


def snapshot_from_json(text: str) -> Snapshot:
    return {p: Entry.from_json(d) for p, d in json.loads(text).items()}


# --- comparing --------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    path: str
    field: str          # one of FIELDS, or "presence" (the path exists on one side only)
    left: object
    right: object

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.field}: {self.left!r} != {self.right!r}"


def compare(left: Snapshot, right: Snapshot, fields: Sequence[str] = FIELDS) -> list[Difference]:
    """Every difference between two snapshots, path by path and field by field."""
    out = []
    for path in sorted(left.keys() | right.keys()):
        a, b = left.get(path), right.get(path)
        if a is None or b is None:
            out.append(Difference(path, "presence", a is not None and a.kind, b is not None and b.kind))
            continue
        for f in fields:
            va, vb = getattr(a, f), getattr(b, f)
            if va != vb:
                out.append(Difference(path, f, va, vb))
    return out


def link_problems(snap: Snapshot, *, exact_nlink: bool = True) -> list[str]:
    """Inconsistencies inside one snapshot: the names of a hard-link group must show one inode with
    the same attributes, and ``st_nlink`` must equal the number of names (``exact_nlink``) or be
    at least that; directories must have ``st_nlink`` = 2 + subdirectories (when ``exact_nlink``)."""
    problems = []
    for path, e in snap.items():
        if e.links:
            first = snap[e.links[0]]
            if (e.dev, e.ino) != (first.dev, first.ino) or e != first:
                problems.append(f"{path}: differs from {e.links[0]} of the same link group")
            n = len(e.links)
            if e.nlink != n if exact_nlink else e.nlink < n:
                problems.append(f"{path}: st_nlink {e.nlink} for {n} visible names")
        elif e.kind != "dir" and exact_nlink and e.nlink != 1:
            problems.append(f"{path}: st_nlink {e.nlink} but it is the only visible name")
    if exact_nlink:
        subdirs = {p: 0 for p, e in snap.items() if e.kind == "dir"}
        for p, e in snap.items():
            if e.kind == "dir" and p:
                subdirs[p.rpartition("/")[0]] += 1
        for p, n in subdirs.items():
            if snap[p].nlink != 2 + n:
                problems.append(f"{p or '/'}: directory st_nlink {snap[p].nlink}, expected {2 + n}")
    return problems


# --- mounts -------------------------------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(path: str | os.PathLike[str]) -> None:
    """Unmount whatever is mounted at *path* (``umount``, then ``umount -l`` as a last resort)."""
    p = os.path.realpath(path)
    for _ in range(5):
        if not _mounted(p):
            return
        if _run("umount", p).returncode != 0:
            _run("umount", "-l", p)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2g") -> Iterator[Path]:
    """A tmpfs at *path* (xattrs incl. trusted.* and user.*, device nodes), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    p = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "layerfs-test", str(path))
    if p.returncode != 0:
        raise OSError(f"cannot mount a tmpfs at {path}: {p.stderr.strip()}")
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def kernel_overlay(layers: Sequence[Path], mountpoint: Path) -> Iterator[Path]:
    """The kernel's read-only overlayfs of *layers* (bottom first) at *mountpoint*.

    Without an upper directory the kernel wants two lower directories at
    least: an empty one is put below when there is only one layer.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    lowers = [str(p) for p in reversed(layers)]
    empty = None
    if len(lowers) < 2:
        empty = mountpoint.parent / f".empty-{uuid.uuid4().hex[:8]}"
        empty.mkdir()
        lowers.append(str(empty))
    for low in lowers:
        if ":" in low or "," in low:
            raise ValueError(f"overlay lower directory {low!r} needs escaping")
    p = _run("mount", "-t", "overlay", "-o", "ro,lowerdir=" + ":".join(lowers), "overlay", str(mountpoint))
    if p.returncode != 0:
        raise OSError(f"cannot mount overlayfs at {mountpoint}: {p.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        if empty is not None:
            empty.rmdir()


# --- overlay-form extraction -------------------------------------------------------------

WH = ".wh."
OPQ = ".wh..wh..opq"


def pax_mtime_ns(ti: tarfile.TarInfo) -> int:
    """The member's mtime in exact nanoseconds (tarfile's float loses the last digits)."""
    text = ti.pax_headers.get("mtime")
    if text is None:
        return int(ti.mtime) * 1_000_000_000
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "0" * 9)[:9] or "0"))


def norm_path(name: str) -> str:
    """A member name as a layer-relative path: no leading "/" or "./", "." and ".." resolved lexically."""
    parts: list[str] = []
    for p in name.split("/"):
        if p == "..":
            if not parts:
                raise ValueError(f"tar member {name!r} climbs out of the layer")
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


def _tar_xattrs(ti: tarfile.TarInfo) -> dict[str, bytes]:
    return {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
            for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}


@dataclass
class _DirAttrs:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict = field(default_factory=dict)


def _lower_dir(view: Path | None, rel: str) -> _DirAttrs | None:
    """The attributes of directory *rel* in the lower view, or None when it is not a directory there.
    Walks component by component with O_NOFOLLOW: a lower symlink is never followed."""
    if view is None:
        return None
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in [p for p in rel.split("/") if p]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        xattrs = {n: os.getxattr(fd, n) for n in os.listxattr(fd)}
        return _DirAttrs(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
    finally:
        os.close(fd)


class _LayerExtractor:
    """Extract one layer tar into *dest* in overlay form, *view* (or None) being the merged layers below.

    Rules (OCI image-spec "Representing changes" plus tar semantics):

    * a later member of the same path replaces an earlier one (a directory
      over a directory only updates its attributes);
    * members below a path this layer makes a non-directory are ignored, and
      symlinks are never followed (they only exist where this layer put them);
    * ``.wh.NAME`` hides NAME of the lower layers only: it becomes a 0/0
      character device unless this layer has NAME itself (a non-directory
      hides the lower one anyway; a directory becomes opaque, as its lower
      content is gone while its own stays);
    * ``.wh..wh..opq`` makes its directory opaque (before or after the
      directory's own members); other ``.wh..wh.*`` names are AUFS metadata
      and are dropped;
    * whiteouts and opaque markers never create a directory that neither this
      layer nor the lower view has;
    * a directory this layer needs but does not list (an implicit parent)
      keeps the attributes it has in the lower view, or gets mode 0755,
      owner 0:0, mtime 0 when there is none;
    * hard links resolve in their own layer (``./a`` and ``a`` are the same
      name) to the file their target names at that point of the archive; a
      link to a name the layer does not have (yet) is skipped.
    """

    def __init__(self, dest: Path, view: Path | None):
        self.dest = dest
        self.view = view
        self.kinds: dict[str, str] = {"": "dir"}        # what this layer has at each path
        self.dir_attrs: dict[str, _DirAttrs] = {}       # explicit directories
        self.whiteouts: list[str] = []
        self.opaque: list[str] = []

    def _blocked(self, rel: str) -> bool:
        """True when an ancestor of *rel* is a non-directory of this layer."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            k = self.kinds.get("/".join(parts[:i]))
            if k is not None and k != "dir":
                return True
        return False

    def _ensure_parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.kinds:
                os.mkdir(self.dest / d)
                self.kinds[d] = "dir"

    def _remove(self, rel: str) -> None:
        p = self.dest / rel
        kind = self.kinds.pop(rel, None)
        if kind is None:
            return
        if kind == "dir":
            for k in [k for k in self.kinds if k.startswith(rel + "/")]:
                del self.kinds[k]
            for k in [k for k in self.dir_attrs if k == rel or k.startswith(rel + "/")]:
                del self.dir_attrs[k]
            shutil.rmtree(p)
        else:
            os.unlink(p)

    def extract(self, tar: bytes) -> None:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            for ti in tf:
                self._member(tf, ti)
        self._apply_markers()
        self._set_dir_attrs()

    def _member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        rel = norm_path(ti.name)
        if rel and self._blocked(rel):
            return
        base = rel.rpartition("/")[2]
        if base.startswith(WH):
            parent = rel.rpartition("/")[0]
            if base == OPQ:
                self.opaque.append(parent)
            elif not base.startswith(WH + WH) and len(base) > len(WH):
                self.whiteouts.append(f"{parent}/{base[len(WH):]}" if parent else base[len(WH):])
            return
        if not rel:                      # the root directory itself
            if ti.isdir():
                self.dir_attrs[""] = _DirAttrs(ti.mode & 0o7777, ti.uid, ti.gid, pax_mtime_ns(ti), _tar_xattrs(ti))
            return
        old = self.kinds.get(rel)
        if old is not None and not (old == "dir" and ti.isdir()):
            self._remove(rel)
        self._ensure_parents(rel)
        p = self.dest / rel
        if ti.isdir():
            if old != "dir":
                os.mkdir(p)
            self.kinds[rel] = "dir"
            self.dir_attrs[rel] = _DirAttrs(ti.mode & 0o7777, ti.uid, ti.gid, pax_mtime_ns(ti), _tar_xattrs(ti))
            return
        if ti.islnk():
            target = norm_path(ti.linkname)
            kind = self.kinds.get(target)
            if kind in (None, "dir", "whiteout"):
                return                   # not a non-directory of this layer: skipped, as the union view does
            os.link(self.dest / target, p, follow_symlinks=False)    # a link to a symlink links the symlink
            self.kinds[rel] = kind
            return                       # a hard link's own header attributes are not the inode's
        if ti.isreg():
            with open(p, "wb") as out, tf.extractfile(ti) as src:
                while True:
                    b = src.read(1 << 20)
                    if not b:
                        break
                    out.write(b)
            kind = "file"
        elif ti.issym():
            os.symlink(ti.linkname, p)
            kind = "symlink"
        elif ti.ischr() or ti.isblk():
            os.mknod(p, (stat.S_IFCHR if ti.ischr() else stat.S_IFBLK) | 0o600, os.makedev(ti.devmajor, ti.devminor))
            kind = "device"
        elif ti.isfifo():
            os.mkfifo(p, 0o600)
            kind = "fifo"
        else:
            return
        self.kinds[rel] = kind
        os.chown(p, ti.uid, ti.gid, follow_symlinks=False)
        if kind != "symlink":
            os.chmod(p, ti.mode & 0o7777)           # after chown, which clears setuid/setgid
        for k, v in _tar_xattrs(ti).items():
            os.setxattr(p, k, v, follow_symlinks=False)
        t = pax_mtime_ns(ti)
        os.utime(p, ns=(t, t), follow_symlinks=False)

    def _lower(self, rel: str) -> _DirAttrs | None:
        """Directory *rel* of the lower view, unless this layer hides it: a whiteout of it or of an
        ancestor, or an opaque marker on an ancestor (that lower directory is gone; a directory
        this layer puts there is a new one)."""
        parts = rel.split("/") if rel else []
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) in self.whiteouts:
                return None
        for i in range(0, len(parts)):
            if "/".join(parts[:i]) in self.opaque:
                return None
        return _lower_dir(self.view, rel)

    def _has_dir(self, rel: str) -> bool:
        """The directory exists in this layer or, not shadowed by this layer, in the lower view."""
        if self.kinds.get(rel) == "dir":
            return True
        if self._blocked(rel) or rel in self.kinds:
            return False
        return _lower_dir(self.view, rel) is not None

    def _apply_markers(self) -> None:
        for d in self.opaque:
            if d and self._blocked(d):
                continue
            if d and not self._has_dir(d):
                continue                 # an opaque marker never creates a directory
            self._ensure_parents(d + "/x" if d else "x")
            os.setxattr(self.dest / d if d else self.dest, OPAQUE_XATTR, b"y")
        for w in self.whiteouts:
            if self._blocked(w):
                continue
            own = self.kinds.get(w)
            if own == "dir":             # lower W is hidden, this layer's W stays: an opaque directory
                os.setxattr(self.dest / w, OPAQUE_XATTR, b"y")
                continue
            if own is not None:          # this layer's non-directory hides the lower one anyway
                continue
            parent = w.rpartition("/")[0]
            if parent and not self._has_dir(parent):
                continue                 # a whiteout never creates a directory
            self._ensure_parents(w)
            os.mknod(self.dest / w, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            self.kinds[w] = "whiteout"

    def _set_dir_attrs(self) -> None:
        dirs = sorted((k for k, v in self.kinds.items() if v == "dir"), key=lambda d: -d.count("/") - (d != ""))
        for d in dirs:
            a = self.dir_attrs.get(d) or self._lower(d) or _DirAttrs()
            p = self.dest / d if d else self.dest
            os.chown(p, a.uid, a.gid)
            os.chmod(p, a.mode)
            for k, v in a.xattrs.items():
                os.setxattr(p, k, v)
            os.utime(p, ns=(a.mtime_ns, a.mtime_ns))


def extract_overlay_layers(tars: Sequence[bytes], dest: Path) -> list[Path]:
    """Extract each uncompressed layer tar (bottom first) into ``dest/layer-N`` in overlay form.

    While layer N is extracted, the kernel overlay of layers 0..N-1 is
    mounted at ``dest/view`` (the lower view). Returns the layer directories.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[Path] = []
    for i, tar in enumerate(tars):
        d = dest / f"layer-{i}"
        d.mkdir()
        with contextlib.ExitStack() as stack:
            view = stack.enter_context(kernel_overlay(dirs, dest / "view")) if dirs else None
            _LayerExtractor(d, view).extract(tar)
        dirs.append(d)
    return dirs


if __name__ == "__main__":
    sys.stdout.write(snapshot_to_json(snapshot(sys.argv[1])))
