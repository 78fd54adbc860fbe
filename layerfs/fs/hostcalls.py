"""Host calls on upper entries by location, and the libc calls Python's os module lacks.

A location is an open fd of the entry itself (int), or (dir fd, name) of a name in an upper
directory; the name "" means the dir fd (an O_PATH fd) is the entry itself. Everything works
relative to directory fds, so names reach NAME_MAX and paths in the upper have no length limit."""
from __future__ import annotations

import ctypes
import errno
import os

from layerfs import libc

#: renameat2(2) flags
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

def os_error(code: int, what: str = "") -> OSError:
    """An OSError of *code* with its message (and *what*, if given)."""
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


NOFOLLOW = {"follow_symlinks": False}


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) with its *mode* (os.posix_fallocate has none)."""
    f = libc.function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64))
    if f is None:
        raise os_error(errno.EOPNOTSUPP)
    if f(fd, mode, off, length) != 0:
        raise os_error(ctypes.get_errno())


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding *fd* (os.sync() where libc lacks it)."""
    f = libc.function("syncfs", (ctypes.c_int,))
    if f is None:
        os.sync()
    elif f(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    """renameat2(2): *old* in directory fd *olddir* to *new* in *newdir*, with *flags*."""
    f = libc.function("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
    if f is None:
        raise os_error(errno.ENOSYS)
    if f(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


def fd_path(fd: int, name: str = "") -> str:
    """A path to *name* in directory fd *fd* (or to *fd* itself) for calls that take no dir fd."""
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


def loc_stat(loc) -> os.stat_result:
    if isinstance(loc, int):
        return os.fstat(loc)
    fd, name = loc
    return os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)


def xattr_target(loc) -> tuple[str | int, dict]:
    """What the xattr (and truncate) calls take for *loc*, with their follow_symlinks keyword."""
    if isinstance(loc, int):
        return loc, {}
    fd, name = loc
    return (fd_path(fd, name), NOFOLLOW) if name else (fd_path(fd), {})


def chown_at(loc, uid: int, gid: int) -> None:
    if isinstance(loc, int):
        os.chown(loc, uid, gid)
    elif loc[1]:
        os.chown(loc[1], uid, gid, dir_fd=loc[0], follow_symlinks=False)
    else:
        os.chown(fd_path(loc[0]), uid, gid)


def chmod_at(loc, mode: int) -> None:
    if isinstance(loc, int):
        os.chmod(loc, mode)
    elif loc[1]:
        os.chmod(loc[1], mode, dir_fd=loc[0])      # never a symlink
    else:
        os.chmod(fd_path(loc[0]), mode)


def utime_at(loc, ns: tuple[int, int]) -> None:
    if isinstance(loc, int):
        os.utime(loc, ns=ns)
    elif loc[1]:
        os.utime(loc[1], ns=ns, dir_fd=loc[0], follow_symlinks=False)
    else:
        os.utime(fd_path(loc[0]), ns=ns)


def truncate_at(loc, size: int) -> None:
    if isinstance(loc, int):
        os.ftruncate(loc, size)
    else:
        os.truncate(xattr_target(loc)[0], size)


def touch_at(dfd: int, name: str, mode: int = 0o644) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dfd))
