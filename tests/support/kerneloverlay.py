"""The kernel-overlayfs reference: image layers extracted in overlay form, and kernel mounts of them.

* :func:`extract_overlay_layers` turns layer tars (uncompressed) into
  overlayfs lower directories: whiteouts become 0/0 character devices,
  opaque markers the ``trusted.overlay.opaque=y`` xattr; owners, modes,
  exact mtimes, xattrs, devices and hard links are kept. It is written from
  the OCI image-spec and tar semantics with :mod:`tarfile`, independently of
  layerfs' own code; layer *N* is extracted while the kernel overlay of the
  layers below it is mounted, and that mount answers the questions a layer
  cannot answer by itself (does a whiteout's parent exist below, which
  attributes an implicit parent directory keeps).
* :func:`kernel_overlay` mounts the kernel's overlayfs of such layers,
  read-only or with an upper directory (the oracle for writable mounts);
  :func:`tmpfs` mounts a tmpfs; both always unmount (:func:`unmount`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import subprocess
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

OPAQUE_XATTR = "trusted.overlay.opaque"
WH = ".wh."
OPQ = ".wh..wh..opq"


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
def kernel_overlay(lowers: Sequence[Path], mountpoint: Path, *, upper: Path | None = None,
                   root_like: os.stat_result | None = None, options: str = "") -> Iterator[Path]:
    """The kernel's overlayfs of *lowers* (bottom first) at *mountpoint*, unmounted afterwards.

    Without *upper* it is read-only, and then the kernel wants two lower directories at least: an
    empty one is put below when there is only one layer.  With *upper* it is writable: *upper* and
    its work directory (``UPPER-work``, beside it) are made; *root_like* (a stat result) gives the
    fresh upper root its owner, mode and mtime, as layerfs gives a fresh upper root the image
    root's.  *options* are more mount options (e.g. ``index=on``).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    low = [str(p) for p in reversed(lowers)]
    empty = None
    if upper is None and len(low) < 2:
        empty = mountpoint.parent / f".empty-{uuid.uuid4().hex[:8]}"
        empty.mkdir()
        low.append(str(empty))
    for d in low:
        if ":" in d or "," in d:
            raise ValueError(f"overlay lower directory {d!r} needs escaping")
    if upper is None:
        opts = "ro,lowerdir=" + ":".join(low)
    else:
        work = upper.with_name(upper.name + "-work")
        for d in (upper, work):
            d.mkdir(parents=True)
        if root_like is not None:
            os.chown(upper, root_like.st_uid, root_like.st_gid)
            os.chmod(upper, stat.S_IMODE(root_like.st_mode))
            os.utime(upper, ns=(root_like.st_mtime_ns, root_like.st_mtime_ns))
        opts = f"lowerdir={':'.join(low)},upperdir={upper},workdir={work}"
    if options:
        opts += "," + options
    p = _run("mount", "-t", "overlay", "-o", opts, "overlay", str(mountpoint))
    if p.returncode != 0:
        raise OSError(f"cannot mount overlayfs at {mountpoint}: {p.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        if empty is not None:
            empty.rmdir()


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
