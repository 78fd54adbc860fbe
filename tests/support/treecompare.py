"""Snapshot a directory tree entry by entry and compare snapshots.

* :func:`snapshot` walks a tree (never following symlinks) and records for
  every entry its type, permission bits, owner, size, content hash, link
  target, device numbers, xattrs, mtime, ``st_nlink`` and its hard-link
  group (the other visible names of the same inode).
* :func:`compare` lists every :class:`Difference` between two snapshots,
  field by field; callers decide which differences are legitimate, one
  documented rule at a time (never a blanket ignore); :func:`link_problems`
  checks one snapshot's link groups and link counts.
* :func:`view_snapshot` is the view of a writable mount after a sequence of
  operations, as :func:`stat_view` sees each entry: mtimes from before the
  test exact, newer ones only as "new" (two mounts do the same thing a few
  microseconds apart); :func:`diff_snapshots` lists the differences of two.

The references these are compared with (kernel overlayfs over layers in
overlay form) come from :mod:`kerneloverlay`.  Run as a script
(``python treecompare.py DIR``) it prints the snapshot of DIR as JSON, so a
snapshot can be taken as another user; it imports nothing but the standard
library.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

__all__ = ["Entry", "Snapshot", "Difference", "snapshot", "compare", "link_problems", "snapshot_to_json",
           "snapshot_from_json", "tree_snapshot", "stat_view", "view_snapshot", "diff_snapshots", "kind_of"]

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}

#: the fields :func:`compare` looks at, in this order
FIELDS = ("kind", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs", "mtime_ns", "nlink", "links")


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


def tree_snapshot(tree) -> dict:
    """path -> attributes and content hash of every node of a merged tree (``layerfs.fs.MergedTree``: its
    ``walk()`` and ``read()``), inode numbers included: two trees of the same image compare equal."""
    out = {}
    for path, n in tree.walk():
        content = None
        if stat.S_ISREG(n.mode):
            content = hashlib.sha256(tree.read(n.ino, 0, n.size) if n.size else b"").hexdigest()
        out[path] = (n.ino, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.nlink, n.rdev, n.target,
                     dict(n.xattrs or {}), content)
    return out


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


# --- the view of a writable mount, as operations see it -------------------------------------

#: one letter per file type, in :func:`stat_view` and :func:`view_snapshot`
KIND_LETTERS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
                stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def kind_of(mode: int) -> str:
    return KIND_LETTERS.get(stat.S_IFMT(mode), "?")


def stat_view(st: os.stat_result, t0: int) -> tuple:
    """A stat result as two mounts doing the same thing a few microseconds apart agree on it: type,
    mode, owner, size and link count (not for directories), device, and the mtime exactly when it
    is older than *t0* (less ten minutes: file system clocks are coarse), else only ``"new"``."""
    k = kind_of(st.st_mode)
    when = st.st_mtime_ns if st.st_mtime_ns < t0 - 600 * 10**9 else "new"
    return (k, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
            None if k == "d" else st.st_size, None if k == "d" else st.st_nlink,
            st.st_rdev if k in "cb" else None, when)


def view_snapshot(root: str | os.PathLike[str], t0: int, *,
                  dir_nlink: Callable[[str], bool] = lambda rel: True) -> dict:
    """path -> :func:`stat_view` of everything visible under *root* (a directory's link count only where
    *dir_nlink* says so), plus a short content hash, link target and xattrs (``trusted.overlay.*``
    left out); and ``"<links>"``: the hard-link groups."""
    root = os.fspath(root)
    out: dict = {}
    groups: dict[int, list[str]] = {}

    def walk(rel: str) -> None:
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            names = sorted(e.name for e in it)
        for name in names:
            r = f"{rel}/{name}" if rel else name
            p = os.path.join(root, r)
            st = os.lstat(p)
            k = kind_of(st.st_mode)
            info = list(stat_view(st, t0))
            if k == "d" and dir_nlink(r):
                info[5] = st.st_nlink
            if k == "f":
                info.append(_hash(p)[:16])
            elif k == "l":
                info.append(os.readlink(p))
            try:
                xs = tuple(x for x in _xattrs(p) if not x[0].startswith("trusted.overlay."))
            except OSError:
                xs = ()
            info.append(xs)
            out[r] = tuple(info)
            if k != "d":
                groups.setdefault(st.st_ino, []).append(r)
            else:
                walk(r)

    walk("")
    out["<links>"] = sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)
    return out


def diff_snapshots(kernel: dict, layerfs: dict) -> list[str]:
    """One line per path where two :func:`view_snapshot` results differ."""
    lines = []
    for k in sorted(set(kernel) | set(layerfs)):
        if kernel.get(k) != layerfs.get(k):
            lines.append(f"{k}: kernel {kernel.get(k)!r} != layerfs {layerfs.get(k)!r}")
    return lines


if __name__ == "__main__":
    sys.stdout.write(snapshot_to_json(snapshot(sys.argv[1])))
