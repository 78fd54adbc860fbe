"""File-system operations run the same way on two mounts, with comparable results; random sequences of them.

* :class:`Runner` applies one operation (a tuple like ``("rename", "a",
  "b", 0)``) to a mount point through real syscalls and returns a comparable
  result: ``("ok", value)`` or ``("err", "ENOENT")``; stat results are
  compared as :func:`treecompare.stat_view` shows them.
* :func:`random_ops` generates a replayable sequence from a seed, choosing
  paths from the reference mount's current state.

The reference mount is the kernel's overlayfs (:mod:`kerneloverlay`); the
trees after a sequence are compared with :func:`treecompare.view_snapshot`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import stat
import time
from pathlib import Path
from typing import Callable, Sequence

from treecompare import stat_view

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
OLD_NS = 1_000_000_000_123_456_789        # 2001-09-09: explicit times set by utime ops

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- running operations -------------------------------------------------------------------------------

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

    def norm(self, st: os.stat_result) -> tuple:
        return stat_view(st, self.t0)

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
