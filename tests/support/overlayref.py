"""Kernel overlayfs as the reference for writable layerfs mounts: layer extraction, op runner, tree snapshots.

* :func:`extract_layers` turns an image's layer tars into overlayfs lower
  directories (whiteouts become 0/0 character devices, ``.wh..wh..opq`` the
  ``trusted.overlay.opaque=y`` xattr; owners, modes, times, xattrs, devices,
  hard links kept) with :mod:`tarfile`, independently of layerfs' own code.
* :func:`kernel_overlay` mounts them (rw, its own upper + work) and always
  unmounts.
* :class:`Runner` applies one operation (a tuple like ``("rename", "a",
  "b", 0)``) to a mount point through real syscalls and returns a comparable
  result: ``("ok", value)`` or ``("err", "ENOENT")``.
* :func:`snapshot` records the visible tree (type, mode, owner, size,
  content hash, link target, device numbers, xattrs without
  ``trusted.overlay.*``, mtime class, link count, hard-link groups).
* :func:`random_ops` generates a replayable sequence from a seed, choosing
  paths from the reference mount's current state.

Times: an mtime from before the test (``Runner.t0``) is compared exactly, a
newer one only as "new" (the two mounts do the same thing a few microseconds
apart).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

OPAQUE_XATTR = "trusted.overlay.opaque"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
OLD_NS = 1_000_000_000_123_456_789        # 2001-09-09: explicit times set by utime ops

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- the reference: layers in overlayfs form ----------------------------------------------------

def extract_layers(layers: Sequence[bytes], dest: Path) -> list[Path]:
    """Extract uncompressed layer tars to ``dest/L0``, ``dest/L1``...; returns them bottom first."""
    out = []
    for i, data in enumerate(layers):
        d = dest / f"L{i}"
        d.mkdir(parents=True)
        _extract_one(data, d, list(reversed(out)))
        out.append(d)
    return out


def _extract_one(data: bytes, d: Path, below: list[Path]) -> None:
    """One layer; a parent directory the layer has no entry for keeps the attributes it has below."""
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    implicit: list[Path] = []

    def parents(p: Path) -> None:
        missing = []
        q = p.parent
        while q != d and not q.exists():
            missing.append(q)
            q = q.parent
        for q in reversed(missing):
            q.mkdir()
            implicit.append(q)

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            name = m.name.rstrip("/")
            if name in ("", "."):
                continue
            p = d / name
            parents(p)
            base = p.name
            if base == ".wh..wh..opq":
                os.setxattr(p.parent, OPAQUE_XATTR, b"y")
                continue
            if base.startswith(".wh."):
                os.mknod(p.parent / base[4:], stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            if m.isdir():
                p.mkdir(exist_ok=True)
                dirs.append((p, m))
                if p in implicit:
                    implicit.remove(p)
                continue
            if m.isreg():
                p.write_bytes(tf.extractfile(m).read())
            elif m.issym():
                os.symlink(m.linkname, p)
            elif m.islnk():
                os.link(d / m.linkname, p)
                continue
            elif m.ischr() or m.isblk():
                os.mknod(p, (stat.S_IFCHR if m.ischr() else stat.S_IFBLK) | 0o600, os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(p)
            _meta(p, m)
    for p, m in reversed(dirs):
        _meta(p, m)
    for q in reversed(implicit):
        rel = q.relative_to(d)
        for b in below:
            if (b / rel).is_dir() and not (b / rel).is_symlink():
                st = os.lstat(b / rel)
                os.chown(q, st.st_uid, st.st_gid)
                os.chmod(q, stat.S_IMODE(st.st_mode))
                os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
                break


def _meta(p: Path, m: tarfile.TarInfo) -> None:
    os.lchown(p, m.uid, m.gid)
    if not m.issym():
        os.chmod(p, m.mode & 0o7777)
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            os.setxattr(p, k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    ns = int(m.mtime * 1_000_000_000)
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


@contextlib.contextmanager
def kernel_overlay(lowers: Sequence[Path], base: Path, *, root_like: os.stat_result | None = None,
                   options: str = "") -> Iterator[Path]:
    """Mount overlayfs over *lowers* (bottom first) at ``base/kmnt``; ``base/kupper`` is its upper;
    *options* are more mount options (e.g. ``index=on``)."""
    upper, work, mnt = base / "kupper", base / "kwork", base / "kmnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    if root_like is not None:      # layerfs gives a fresh upper root the image root's attributes
        os.chown(upper, root_like.st_uid, root_like.st_gid)
        os.chmod(upper, stat.S_IMODE(root_like.st_mode))
        os.utime(upper, ns=(root_like.st_mtime_ns, root_like.st_mtime_ns))
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    opts = f"lowerdir={lowerdir},upperdir={upper},workdir={work}" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        for _ in range(3):
            r = subprocess.run(["umount", str(mnt)], capture_output=True)
            if r.returncode == 0:
                break
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- running operations -------------------------------------------------------------------------------

def kind_of(mode: int) -> str:
    return {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
            stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}.get(stat.S_IFMT(mode), "?")


class Runner:
    """Applies operations to one mount point; results are comparable across mounts."""

    def __init__(self, root: Path | str, t0: int):
        self.root = str(root)
        self.t0 = t0
        self.fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def when(self, ns: int):
        return ns if ns < self.t0 - 600 * 10**9 else "new"     # file system clocks are coarse

    def norm(self, st: os.stat_result) -> tuple:
        k = kind_of(st.st_mode)
        return (k, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                None if k == "d" else st.st_size, None if k == "d" else st.st_nlink,
                st.st_rdev if k in "cb" else None, self.when(st.st_mtime_ns))

    def run(self, op: Sequence) -> tuple:
        name, *args = op
        try:
            return ("ok", getattr(self, "op_" + name)(*args))
        except OSError as e:
            return ("err", errno.errorcode.get(e.errno, str(e.errno)))

    # reading
    def op_stat(self, path):
        return self.norm(os.lstat(self.p(path)))

    # every open is O_NONBLOCK: a fifo never blocks the runner (no effect on other files)
    def op_read(self, path):
        fd = os.open(self.p(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            out = b""
            while chunk := os.read(fd, 1 << 20):
                out += chunk
            return out
        finally:
            os.close(fd)

    def op_listdir(self, path):
        return sorted(os.listdir(self.p(path)))

    def op_readlink(self, path):
        return os.readlink(self.p(path))

    def op_access(self, path, mode):
        return os.access(self.p(path), mode)

    def op_statfs(self, path):
        return os.statvfs(self.p(path)).f_namemax

    # files
    def op_create(self, path, mode, data=b""):
        fd = os.open(self.p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NONBLOCK, mode)
        try:
            os.write(fd, data)
            return self.norm(os.fstat(fd))
        finally:
            os.close(fd)

    _FLAGS = {"trunc": os.O_WRONLY | os.O_TRUNC, "append": os.O_WRONLY | os.O_APPEND, "rdwr": os.O_RDWR,
              "creat": os.O_WRONLY | os.O_CREAT, "creat_trunc": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              "excl": os.O_WRONLY | os.O_CREAT | os.O_EXCL}

    def op_write(self, path, data, how="trunc"):
        fd = os.open(self.p(path), self._FLAGS[how] | os.O_NONBLOCK, 0o644)
        try:
            n = os.write(fd, data)
            return n, os.fstat(fd).st_size
        finally:
            os.close(fd)

    def op_overwrite(self, path, data):
        """Write *data* over the start of an existing file (no truncation)."""
        fd = os.open(self.p(path), os.O_WRONLY | os.O_NONBLOCK)
        try:
            return os.pwrite(fd, data, 0), os.fstat(fd).st_size
        finally:
            os.close(fd)

    def op_pwrite(self, path, off, data):
        fd = os.open(self.p(path), os.O_WRONLY | os.O_NONBLOCK)
        try:
            return os.pwrite(fd, data, off), os.fstat(fd).st_size
        finally:
            os.close(fd)

    def op_truncate(self, path, size):
        os.truncate(self.p(path), size)
        return os.lstat(self.p(path)).st_size

    def op_ftruncate(self, path, size):
        fd = os.open(self.p(path), os.O_RDWR | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, size)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def op_fallocate(self, path, off, length):
        fd = os.open(self.p(path), os.O_RDWR | os.O_NONBLOCK)
        try:
            os.posix_fallocate(fd, off, length)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def op_fsync(self, path):
        fd = os.open(self.p(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # names
    def op_unlink(self, path):
        os.unlink(self.p(path))

    def op_mkdir(self, path, mode=0o755):
        os.mkdir(self.p(path), mode)
        return self.norm(os.lstat(self.p(path)))

    def op_rmdir(self, path):
        os.rmdir(self.p(path))

    def op_rename(self, a, b, flags=0):
        if flags:
            renameat2(self.p(a), self.p(b), flags)
        else:
            os.rename(self.p(a), self.p(b))

    def op_link(self, a, b):
        os.link(self.p(a), self.p(b), follow_symlinks=False)
        return os.lstat(self.p(b)).st_nlink

    def op_symlink(self, target, path):
        os.symlink(target, self.p(path))
        return self.norm(os.lstat(self.p(path)))

    def op_mkfifo(self, path, mode=0o644):
        os.mkfifo(self.p(path), mode)
        return self.norm(os.lstat(self.p(path)))

    def op_mknod(self, path, kind, major, minor, mode=0o600):
        os.mknod(self.p(path), (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | mode, os.makedev(major, minor))
        return self.norm(os.lstat(self.p(path)))

    # attributes
    def op_chmod(self, path, mode):
        os.chmod(self.p(path), mode)
        return self.norm(os.lstat(self.p(path)))

    def op_chown(self, path, uid, gid):
        os.lchown(self.p(path), uid, gid)
        return self.norm(os.lstat(self.p(path)))

    def op_utime(self, path, atime_ns, mtime_ns):
        os.utime(self.p(path), ns=(atime_ns, mtime_ns), follow_symlinks=False)
        return self.norm(os.lstat(self.p(path)))

    def op_touch(self, path):
        os.utime(self.p(path), follow_symlinks=False)      # UTIME_NOW
        return self.norm(os.lstat(self.p(path)))

    def op_setxattr(self, path, name, value, flags=0):
        os.setxattr(self.p(path), name, value, flags, follow_symlinks=False)

    def op_getxattr(self, path, name):
        return os.getxattr(self.p(path), name, follow_symlinks=False)

    def op_listxattr(self, path):
        return sorted(n for n in os.listxattr(self.p(path), follow_symlinks=False) if not n.startswith("trusted.overlay."))

    def op_removexattr(self, path, name):
        os.removexattr(self.p(path), name, follow_symlinks=False)

    # open files (kept across steps: open-unlinked files)
    def op_open(self, key, path, how="rdwr"):
        self.op_close(key)
        self.fds[key] = os.open(self.p(path), {"ro": os.O_RDONLY, **self._FLAGS}[how] | os.O_NONBLOCK, 0o644)

    def op_close(self, key):
        fd = self.fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def _fd(self, key):
        if key not in self.fds:
            raise OSError(errno.EBADF, "not open")
        return self.fds[key]

    def op_fdwrite(self, key, off, data):
        return os.pwrite(self._fd(key), data, off)

    def op_fdread(self, key, off, n):
        return os.pread(self._fd(key), n, off)

    def op_fdstat(self, key):
        return self.norm(os.fstat(self._fd(key)))

    def op_fdtruncate(self, key, size):
        os.ftruncate(self._fd(key), size)

    def op_fdchmod(self, key, mode):
        os.fchmod(self._fd(key), mode)

    def op_fdchown(self, key, uid, gid):
        os.fchown(self._fd(key), uid, gid)

    def op_fdutime(self, key, atime_ns, mtime_ns):
        os.utime(self._fd(key), ns=(atime_ns, mtime_ns))


# --- snapshots ------------------------------------------------------------------------------------------

def snapshot(root: Path | str, t0: int, *, dir_nlink: Callable[[str], bool] = lambda rel: True) -> dict:
    """path → attributes of everything visible under *root*, plus ``"<links>"``: the hard-link groups."""
    root = str(root)
    out: dict = {}
    groups: dict[int, list[str]] = {}
    runner = Runner(root, t0)

    def walk(rel: str) -> None:
        with os.scandir(runner.p(rel)) as it:
            names = sorted(e.name for e in it)
        for name in names:
            r = f"{rel}/{name}" if rel else name
            p = runner.p(r)
            st = os.lstat(p)
            k = kind_of(st.st_mode)
            info = list(runner.norm(st))
            if k == "d" and dir_nlink(r):
                info[5] = st.st_nlink
            if k == "f":
                with open(p, "rb") as f:
                    info.append(hashlib.sha256(f.read()).hexdigest()[:16])
            elif k == "l":
                info.append(os.readlink(p))
            try:
                xs = sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in os.listxattr(p, follow_symlinks=False)
                            if not n.startswith("trusted.overlay."))
            except OSError:
                xs = []
            info.append(tuple(xs))
            out[r] = tuple(info)
            if k != "d":
                groups.setdefault(st.st_ino, []).append(r)
            else:
                walk(r)

    walk("")
    out["<links>"] = sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)
    return out


def diff_snapshots(a: dict, b: dict) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: kernel {a.get(k)!r} != layerfs {b.get(k)!r}")
    return lines


# --- generated sequences -----------------------------------------------------------------------------------

#: new names: short ones, and long ones up to NAME_MAX (255 bytes; 251 is the longest with room for ".wh.")
NEW_NAMES = ("n1", "n2", "sub", "x.txt", "L".ljust(255, "l"), "M".ljust(252, "m"), "W".ljust(251, "w"),
             "\u00e9t\u00e9-".ljust(200, "e"))
#: generated paths stay this short (the runner's and the snapshot's paths are absolute)
MAX_REL_PATH = 2000
XATTRS = ("user.a", "user.b")


def _existing(root: str) -> tuple[list[str], list[str]]:
    files, dirs = [], [""]
    for dp, dns, fns in os.walk(root):
        rel = os.path.relpath(dp, root)
        rel = "" if rel == "." else rel
        for d in dns:
            dirs.append(os.path.join(rel, d))
        for f in fns:
            files.append(os.path.join(rel, f))
    return sorted(files), sorted(dirs)


def random_ops(seed: int, steps: int, reference_root: str, apply: Callable[[tuple], None]) -> list[tuple]:
    """Generate *steps* ops from *seed*, picking paths from the reference mount; *apply* runs each one
    on both mounts before the next is chosen. Returns the sequence (for the failure message)."""
    rnd = random.Random(seed)
    done: list[tuple] = []
    open_keys = ["fa", "fb"]
    for _ in range(steps):
        files, dirs = _existing(reference_root)
        anyp = files + dirs[1:]

        def pick_file():
            return rnd.choice(files) if files and rnd.random() < 0.85 else new_path()

        def pick_dir():
            return rnd.choice(dirs)

        def new_path():
            d = pick_dir()
            name = rnd.choice(NEW_NAMES)
            if len(os.fsencode(d)) + len(os.fsencode(name)) > MAX_REL_PATH:
                name = NEW_NAMES[0]
            return os.path.join(d, name)

        def pick_any():
            return rnd.choice(anyp) if anyp and rnd.random() < 0.8 else new_path()

        data = rnd.randbytes(rnd.choice((0, 1, 7, 100, 5000)))
        r = rnd.random()
        r = rnd.random()
        choice = rnd.choices(
            ["create", "write", "pwrite", "truncate", "unlink", "mkdir", "rmdir", "rename", "link", "symlink",
             "mkfifo", "chmod", "chown", "utime", "setxattr", "removexattr", "stat", "read", "listdir",
             "open", "fdwrite", "fdread", "fdstat", "close", "listxattr", "mknod", "fallocate", "touch", "overwrite"],
            weights=[6, 8, 3, 3, 7, 5, 4, 9, 3, 2, 1, 3, 2, 2, 2, 1, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 3])[0]
        if choice == "create":
            op = ("create", new_path() if r < 0.8 else pick_file(), rnd.choice((0o644, 0o600, 0o755)), data)
        elif choice == "write":
            op = ("write", pick_file(), data, rnd.choice(["trunc", "append", "rdwr", "creat", "creat_trunc", "excl"]))
        elif choice == "overwrite":
            op = ("overwrite", pick_file(), data or b"o")
        elif choice == "pwrite":
            op = ("pwrite", pick_file(), rnd.choice((0, 3, 4096, 70000)), data or b"z")
        elif choice == "truncate":
            op = (rnd.choice(("truncate", "ftruncate")), pick_file(), rnd.choice((0, 1, 10, 5000, 1 << 20)))
        elif choice == "fallocate":
            op = ("fallocate", pick_file(), rnd.choice((0, 100)), rnd.choice((1, 9000)))
        elif choice == "unlink":
            op = ("unlink", pick_any())
        elif choice == "mkdir":
            op = ("mkdir", new_path() if r < 0.85 else pick_any(), rnd.choice((0o755, 0o700, 0o1777)))
        elif choice == "rmdir":
            op = ("rmdir", rnd.choice(dirs[1:]) if len(dirs) > 1 and r < 0.9 else new_path())
        elif choice == "rename":
            src = pick_any()
            dst = rnd.choice((new_path(), pick_any(), pick_file()))
            op = ("rename", src, dst, rnd.choice((0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE)))
        elif choice == "link":
            op = ("link", pick_file(), new_path())
        elif choice == "symlink":
            # relative targets inside the mount only: an absolute one would reach the host's files
            op = ("symlink", rnd.choice(("target", "n1", "x.txt", "sub/n2")), new_path())
        elif choice == "mkfifo":
            op = ("mkfifo", new_path())
        elif choice == "mknod":
            op = ("mknod", new_path(), "c", 1, 3)
        elif choice == "chmod":
            op = ("chmod", pick_any(), rnd.choice((0o644, 0o4755, 0o700, 0o2755, 0o1777, 0o600)))
        elif choice == "chown":
            op = ("chown", pick_any(), rnd.choice((0, 1000, 33)), rnd.choice((0, 1000, 44)))
        elif choice == "utime":
            op = ("utime", pick_any(), OLD_NS + rnd.randrange(10**9), OLD_NS + rnd.randrange(10**15))
        elif choice == "touch":
            op = ("touch", pick_any())
        elif choice == "setxattr":
            op = ("setxattr", pick_any(), rnd.choice(XATTRS), data[:50])
        elif choice == "removexattr":
            op = ("removexattr", pick_any(), rnd.choice(XATTRS))
        elif choice == "listxattr":
            op = ("listxattr", pick_any())
        elif choice == "stat":
            op = ("stat", pick_any())
        elif choice == "read":
            op = ("read", pick_file())
        elif choice == "listdir":
            op = ("listdir", pick_dir())
        elif choice == "open":
            op = ("open", rnd.choice(open_keys), pick_file(), rnd.choice(("ro", "rdwr", "append")))
        elif choice == "fdwrite":
            op = ("fdwrite", rnd.choice(open_keys), rnd.choice((0, 2, 9000)), data or b"w")
        elif choice == "fdread":
            op = ("fdread", rnd.choice(open_keys), 0, 100000)
        elif choice == "fdstat":
            op = ("fdstat", rnd.choice(open_keys))
        else:
            op = ("close", rnd.choice(open_keys))
        done.append(op)
        apply(op)
    return done


def now_ns() -> int:
    return time.time_ns()
