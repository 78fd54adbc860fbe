"""The open directory fds of an upper directory tree, by inode, and the request that releases them.

Every upper call works relative to an O_PATH fd of the directory holding the entry (names reach
NAME_MAX, paths have no limit); those fds are cached, least recently used first. The fds a request
took stay open until it ends (the cache is cut to :data:`DIR_FD_CACHE` only then), also those of
directories removed meanwhile."""
from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Mapping

from layerfs.fs.inodes import Dir, File
from layerfs.fs.tree import ROOT_INO

#: directory fds kept open between requests (least recently used ones are closed)
DIR_FD_CACHE = 256


class DirFds:
    """O_PATH fds of the upper directories of *inodes* (an overlay's inode table); :attr:`root` is the
    upper root's fd (set by its owner, closed by :meth:`close`)."""

    def __init__(self, inodes: Mapping[int, Dir | File]):
        self.inodes = inodes
        self.root = -1
        self.depth = 0                # requests running (nested calls of one thread)
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._closing: list[int] = []  # fds of removed directories, closed when the request ends

    def get(self, d: Dir) -> int:
        """An O_PATH fd of *d*'s upper directory (cached; valid until the current request ends)."""
        fd = self._fds.get(d.ino)
        if fd is not None:
            self._fds.move_to_end(d.ino)
            return fd
        if d.ino == ROOT_INO:
            return self.root
        chain = []                  # walk up to a directory whose fd is known, then open down
        top = d
        while True:
            chain.append(top)
            top = self.inodes[top.parent]  # type: ignore[assignment]
            if top.ino == ROOT_INO:
                fd = self.root
                break
            fd = self._fds.get(top.ino)
            if fd is not None:
                self._fds.move_to_end(top.ino)
                break
        for sub in reversed(chain):
            fd = os.open(sub.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            self._fds[sub.ino] = fd
        return fd

    def drop(self, ino: int) -> None:
        """Forget the fd of a directory that is gone (closed when no request uses it)."""
        fd = self._fds.pop(ino, None)
        if fd is not None:
            self._closing.append(fd)        # the request may still use it

    def end_request(self) -> None:
        while self._closing:
            os.close(self._closing.pop())
        while len(self._fds) > DIR_FD_CACHE:
            _, fd = self._fds.popitem(last=False)
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1


def request(method):
    """Run an overlay *method* as one request (or part of the one running): under the overlay's lock;
    when the outermost call ends, the directory fds it took are released."""
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        with self.lock:
            fds = self.dirfds
            fds.depth += 1
            try:
                return method(self, *args, **kw)
            finally:
                fds.depth -= 1
                if not fds.depth:
                    fds.end_request()
    return wrapper
