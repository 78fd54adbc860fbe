"""Writable layerfs mounts against the kernel's overlayfs, operation by operation.

Each test mounts one image twice: kernel overlayfs over its layers extracted
in overlay form (tests/support/kerneloverlay.py) with its own upper and work dir, and
layerfs (writable, allow_other) with its own upper. The same operations are
applied to both mount points through real syscalls; every result (return
value or errno) must be the same, and so must the visible trees afterwards
(type, mode, owner, size, content, link target, xattrs, mtime, link counts,
hard-link groups). Generated sequences print their seed on failure: replay
one with ``LAYERFS_DIFF_SEED=<seed> pytest tests/fuse/test_overlay_kernel_diff.py -k random``.
Names reach NAME_MAX (255 bytes) and paths PATH_MAX and beyond (below a
directory fd). The ``index`` tests mount both sides with ``index=on``
(layerfs ``-o index=on``), where the differences about lower hard links
below do not exist.

Documented, deliberate differences (asserted as such, not compared):
names beginning with ``.wh.`` cannot be created through layerfs (EINVAL),
the kernel allows them (its whiteouts are device nodes); renaming one name of
a lower hard-linked file onto another is a no-op on layerfs (they are one
inode for FUSE, and the VFS skips such renames, as POSIX says) while
overlayfs with index=off treats them as two files; ``fstat`` of a file
opened by one name of a lower hard-linked file, after *another* name was
copied up, shows the copied-up file (one FUSE inode for both names: the
kernel keeps one set of attributes for it; reads are right, they follow the
handle); a write by an unprivileged user outside the file's group keeps the
set-group-ID bit of a file that is not group-executable, where overlayfs'
upper file system drops it (the kernel's FUSE module clears set-group-ID
only on group-executable files).
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import MTIME_NS, put_image, require_fuse, track, wait_until, watchdog
from prereqs import require_root
from fsops import OLD_NS, RENAME_EXCHANGE, RENAME_NOREPLACE, Runner, random_ops
from kerneloverlay import extract_overlay_layers, kernel_overlay
from treecompare import diff_snapshots, view_snapshot
from imagebuild import LayerBuilder, build_image
from layerfs.mount import MountOptions, mount_image, umount
from layerfs.store import Store

WATCHDOG = 60.0
T = MTIME_NS // 10**9
BIG = bytes(range(256)) * 4096 + b"end"      # 1 MiB + 3: copy-up in chunks


def long_name(tag: str, n: int = 255) -> str:
    """A name of *n* bytes (NAME_MAX by default) starting with *tag*."""
    return (tag + "-").ljust(n, "x")


# lower entries with names of NAME_MAX bytes (and 251/252: a ".wh." prefix just fits / does not)
LF, LD, LS, LG, LE, LK = (long_name(t) for t in ("file", "dir", "sym", "gone", "empty", "kept"))
W251, W252 = long_name("w251", 251), long_name("w252", 252)


def _image():
    l1 = (LayerBuilder(mtime=T)
          .add_dir("etc").add_file("etc/hostname", b"box\n", xattrs={"user.origin": b"layer1"})
          .add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n").add_dir("etc/conf.d")
          .add_file("etc/conf.d/a.conf", b"a=1\n", uid=1000, gid=1000, mode=0o600)
          .add_dir("usr").add_dir("usr/bin").add_file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755)
          .add_file("usr/bin/sgid", b"#!", mode=0o2755, gid=50)
          .add_dir("usr/lib").add_file("usr/lib/libx.so", BIG, mode=0o755)
          .add_hardlink("usr/lib/libx.so.1", "usr/lib/libx.so", mode=0o755)
          .add_symlink("usr/lib/libx.so.2", "libx.so")
          .add_dir("var").add_dir("var/log").add_file("var/log/old.log", b"old\n")
          .add_dir("var/empty")
          .add_dir("home").add_dir("home/user", uid=1000, gid=1000, mode=0o700)
          .add_file("home/user/.profile", b"PS1=$\n", uid=1000, gid=1000)
          .add_dir("tmp", mode=0o1777).add_file("tmp/rootfile", b"r", mode=0o666)
          .add_dir("dev").add_device("dev/null", "c", 1, 3).add_fifo("dev/fifo")
          .add_dir("a").add_dir("a/b").add_dir("a/b/c").add_file("a/b/c/deep", b"deep\n")
          .add_file("a/b/file", b"file\n")
          .add_dir("sticky", mode=0o1777).add_file("sticky/owned", b"o", uid=1000, gid=1000)
          .add_dir("long").add_file(f"long/{LF}", b"lower long\n", xattrs={"user.origin": b"long"})
          .add_dir(f"long/{LD}").add_file(f"long/{LD}/inner", b"in").add_symlink(f"long/{LS}", "target-of-long")
          .add_file(f"long/{LG}", b"gone").add_dir(f"long/{LE}").add_file(f"long/{LK}", b"kept", mode=0o640)
          .add_file(f"long/{W251}", b"251").add_file(f"long/{W252}", b"252")
          .build())
    l2 = (LayerBuilder(mtime=T + 100)
          .add_dir("etc").add_file("etc/hostname", b"box2\n", xattrs={"user.origin": b"layer2"})
          .add_file("etc/conf.d/b.conf", b"b=2\n").add_whiteout("var/log/old.log")
          .add_file("var/log/new.log", b"new\n")
          .add_dir("opt").add_dir("opt/app").add_file("opt/app/v1", b"1").add_dir("opt/app/lib")
          .add_file("opt/app/lib/x", b"x")
          .add_dir("usr").add_dir("usr/share").add_file("usr/share/h1", b"linked\n")
          .add_hardlink("usr/share/h2", "usr/share/h1").add_hardlink("usr/share/h3", "usr/share/h1")
          .build())
    l3 = (LayerBuilder(mtime=T + 200)
          .add_dir("opt").add_dir("opt/app").add_opaque("opt/app").add_file("opt/app/v2", b"2")
          .add_dir("a").add_whiteout("a/b/c").add_dir("a/b")
          .add_file("var/empty2", b"", mode=0o644)
          .build())
    return build_image([l1, l2, l3])


@pytest.fixture(autouse=True)
def _watchdog():
    with watchdog(WATCHDOG):
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The image in a store and its layers extracted once for the module."""
    require_fuse()
    require_root("kernel overlayfs")
    base = tmp_path_factory.mktemp("kdiff")
    image = _image()
    store = Store(base / "store")
    put_image(store, "docker.io/library/kdiff:1", image)
    lowers = extract_overlay_layers(image.uncompressed_layers, base / "layers")
    return store, lowers


def _short(x) -> str:
    """repr with long byte strings cut (generated data)."""
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_short(i) for i in x) + ")"
    if isinstance(x, bytes) and len(x) > 24:
        return repr(x[:16]) + f"...<{len(x)} bytes>"
    return repr(x)


class Pair:
    """One kernel overlay and one layerfs mount of the image, with runners for both."""

    def __init__(self, store: Store, lowers, base: Path, *, read_only=False, index=False):
        self.store, self.base = store, base
        self.lmnt = base / "lmnt"
        self.lmnt.mkdir()
        self.upper = base / "lupper"
        opts = MountOptions(read_only=read_only, upper=None if read_only else str(self.upper),
                            fuse_options=["allow_other", "dev"] + (["index=on"] if index else []))
        # (dev: devices open like on overlayfs)
        self.rec = mount_image(store, "kdiff:1", self.lmnt, opts)
        track(self.lmnt, self.rec.pid)
        self._k = kernel_overlay(lowers, base / "kmnt", upper=base / "kupper", root_like=os.stat(self.lmnt),
                                 options="index=on" if index else "")
        self.kmnt = self._k.__enter__()
        self.kupper = base / "kupper"
        time.sleep(0.002)
        self.t0 = time.time_ns()
        self.k, self.l = Runner(self.kmnt, self.t0), Runner(self.lmnt, self.t0)
        self.log: list = []

    def close(self):
        self.k.close()
        self.l.close()
        try:
            umount(self.store, self.lmnt)
        finally:
            self._k.__exit__(None, None, None)

    def do(self, *op, expect=None):
        kr, lr = self.k.run(op), self.l.run(op)
        self.log.append(op)
        if kr != lr:
            raise AssertionError(f"step {len(self.log)} {_short(op)}: kernel {_short(kr)} != layerfs {_short(lr)}")
        if expect is not None:
            assert kr[0] == "ok" if expect == "ok" else kr == ("err", expect), (op, kr)
        return kr

    def same_tree(self, context=""):
        ks = view_snapshot(self.kmnt, self.t0, dir_nlink=lambda rel: (self.kupper / rel).is_dir())
        ls = view_snapshot(self.lmnt, self.t0, dir_nlink=lambda rel: (self.kupper / rel).is_dir())
        d = diff_snapshots(ks, ls)
        assert not d, f"{context}trees differ:\n" + "\n".join(d[:30])


@pytest.fixture
def pair(world, tmp_path):
    store, lowers = world
    p = Pair(store, lowers, tmp_path)
    try:
        yield p
    finally:
        p.close()


# --- the image as is -------------------------------------------------------------------------------

def test_untouched_image_is_the_same(pair):
    pair.same_tree()
    for path in ("usr/lib/libx.so", "usr/share/h2", "etc/hostname", "var/log/old.log", "opt/app/v1", "a/b/c"):
        pair.do("stat", path)
    pair.do("listxattr", "etc/hostname")
    pair.do("getxattr", "etc/hostname", "user.origin", expect="ok")
    pair.do("statfs", "")


# --- hand-written sequences, one per kind of operation ----------------------------------------------

def test_create_open_flags_and_data(pair):
    d = pair.do
    d("create", "etc/new", 0o640, b"hello", expect="ok")
    d("create", "etc/new", 0o640, b"again", expect="EEXIST")
    d("create", "etc/hostname", 0o600, b"x", expect="EEXIST")
    d("write", "etc/hostname", b"appended\n", "append", expect="ok")
    d("read", "etc/hostname")
    d("write", "etc/passwd", b"TRUNC", "trunc")
    d("write", "etc/passwd", b"", "creat")
    d("write", "etc/newer", b"made", "creat_trunc")
    d("write", "etc/newer", b"x", "excl", expect="EEXIST")
    d("write", "etc/nothing", b"x", "trunc", expect="ENOENT")
    d("write", "etc", b"x", "rdwr", expect="EISDIR")
    d("write", "etc/hostname/x", b"x", "creat", expect="ENOTDIR")
    d("pwrite", "usr/lib/libx.so", 70000, b"PATCH")
    d("pwrite", "etc/new", 10000, b"far")          # a hole
    d("read", "etc/new")
    d("read", "usr/lib/libx.so")
    d("read", "usr/lib/libx.so.1")                 # the other name of the hard link: untouched (index=off)
    d("truncate", "etc/passwd", 3)
    d("truncate", "var/log/new.log", 100000)
    d("ftruncate", "etc/conf.d/b.conf", 1)
    d("fallocate", "etc/conf.d/a.conf", 0, 9000)
    d("fsync", "etc/new")
    d("stat", "etc/new")
    d("stat", "etc")
    pair.same_tree()


def test_unlink_rmdir_mkdir_whiteouts_and_opaque_dirs(pair):
    d = pair.do
    d("unlink", "etc/passwd", expect="ok")
    d("unlink", "etc/passwd", expect="ENOENT")
    d("unlink", "etc", expect="EISDIR")
    d("rmdir", "etc/hostname", expect="ENOTDIR")
    d("rmdir", "etc/conf.d", expect="ENOTEMPTY")
    d("unlink", "etc/conf.d/a.conf")
    d("unlink", "etc/conf.d/b.conf")
    d("rmdir", "etc/conf.d", expect="ok")
    d("listdir", "etc")
    d("mkdir", "etc/conf.d", 0o700, expect="ok")   # over the whiteout: opaque
    d("listdir", "etc/conf.d")
    d("create", "etc/conf.d/a.conf", 0o644, b"fresh")
    d("rmdir", "a/b", expect="ENOTEMPTY")
    d("unlink", "a/b/file")
    d("rmdir", "a/b")
    d("rmdir", "a")
    d("mkdir", "a")
    d("mkdir", "a/b")
    d("listdir", "a/b")
    d("rmdir", "var/empty")
    d("create", "var/empty", 0o644, b"now a file")
    d("unlink", "var/log/new.log")
    d("rmdir", "var/log")
    d("mkdir", "var/log/x", expect="ENOENT")
    d("mkdir", "opt/app/v1", expect="ok")          # v1 is hidden by the opaque dir of layer 3
    d("unlink", "dev/null")
    d("unlink", "dev/fifo")
    d("rmdir", "dev")
    d("unlink", "tmp/rootfile")
    d("unlink", "usr/share/h2")
    d("stat", "usr/share/h1")
    pair.same_tree()


def test_renames(pair):
    d = pair.do
    d("rename", "etc/hostname", "etc/hostname.bak", expect="ok")
    d("rename", "etc/passwd", "var/passwd")
    d("rename", "var/passwd", "etc/hostname.bak")          # over an upper file
    d("rename", "etc/conf.d/a.conf", "var/log/new.log")    # over a lower file
    d("rename", "etc", "etc2", expect="EXDEV")             # a lower directory (redirect_dir=off)
    d("rename", "a/b", "a/b2", expect="EXDEV")
    d("rename", "etc/conf.d", "var/empty", expect="EXDEV")
    d("mkdir", "newdir")
    d("create", "newdir/f", 0o644, b"f")
    d("rename", "newdir", "moved", expect="ok")
    d("rename", "moved", "var/empty", expect="ok")         # over an empty lower dir: opaque now
    d("listdir", "var/empty")
    d("rename", "var/empty", "etc", expect="ENOTEMPTY")
    d("rename", "var/empty", "etc/hostname.bak", expect="ENOTDIR")
    d("rename", "etc/hostname.bak", "var/empty", expect="EISDIR")
    d("rename", "var/empty", "var/empty/f/x", expect="ENOTDIR")
    d("mkdir", "var/empty/sub")
    d("rename", "var/empty", "var/empty/sub/x", expect="EINVAL")
    d("rename", "nothing", "x", expect="ENOENT")
    # two names of one lower file: overlayfs (index=off) moves h1 over h2, FUSE's VFS sees one inode: no-op
    assert pair.k.run(("rename", "usr/share/h1", "usr/share/h2")) == ("ok", None)
    assert pair.l.run(("rename", "usr/share/h1", "usr/share/h2")) == ("ok", None)
    assert pair.l.run(("stat", "usr/share/h1"))[0] == "ok" and pair.k.run(("stat", "usr/share/h1"))[0] == "err"
    pair.l.run(("unlink", "usr/share/h1"))         # the same state on both sides again: h2 copied up
    pair.l.run(("chmod", "usr/share/h2", 0o644))
    d("stat", "usr/share/h2")
    d("stat", "usr/share/h3")
    d("rename", "etc/hostname.bak", "etc/motd", RENAME_NOREPLACE, expect="ok")
    d("rename", "etc/motd", "usr/share/h3", RENAME_NOREPLACE, expect="EEXIST")
    d("rename", "etc/motd", "usr/share/h3", RENAME_EXCHANGE, expect="ok")
    d("read", "etc/motd")
    d("rename", "etc/motd", "etc/none", RENAME_EXCHANGE, expect="ENOENT")
    d("rename", "usr/bin", "etc/motd", RENAME_EXCHANGE, expect="EXDEV")
    d("mkdir", "d1")
    d("mkdir", "d2")
    d("create", "d2/in2", 0o644, b"2")
    d("rename", "d1", "d2", RENAME_EXCHANGE, expect="ok")
    d("listdir", "d1")
    d("rename", "d2", "d1", expect="ENOTEMPTY")
    d("rename", "d1", "d2", expect="ok")
    d("rename", "d2", "var", RENAME_EXCHANGE, expect="EXDEV")
    d("rename", "etc/motd", "etc/motd", expect="ok")
    pair.same_tree()


def test_links_symlinks_devices_fifos(pair):
    d = pair.do
    d("link", "etc/hostname", "etc/hostname.link", expect="ok")
    d("stat", "etc/hostname")
    d("write", "etc/hostname.link", b"via link", "trunc")
    d("read", "etc/hostname")
    d("link", "etc", "etc.link", expect="EPERM")
    d("link", "etc/hostname", "etc/passwd", expect="EEXIST")
    d("link", "nothing", "x", expect="ENOENT")
    d("link", "usr/lib/libx.so.2", "usr/lib/sym.link")      # hard link to a symlink
    d("symlink", "../etc/hostname", "tmp/sl", expect="ok")
    d("readlink", "tmp/sl")
    d("read", "tmp/sl")
    d("readlink", "etc/hostname", expect="EINVAL")
    d("symlink", "x", "etc/hostname", expect="EEXIST")
    d("mkfifo", "tmp/fifo", 0o640, expect="ok")
    d("mknod", "tmp/null", "c", 1, 3, expect="ok")
    d("mknod", "tmp/disk", "b", 8, 1)
    d("mknod", "tmp/whiteout", "c", 0, 0, expect="EPERM")      # the upper's whiteout form
    d("chmod", "dev/null", 0o600)                  # copy-up of a device
    d("chown", "dev/fifo", 5, 6)
    d("link", "usr/share/h1", "usr/share/h4")      # copy-up of one name of a lower hard link
    d("stat", "usr/share/h1")
    d("stat", "usr/share/h2")
    pair.same_tree()


def test_attributes(pair):
    d = pair.do
    d("chmod", "etc/hostname", 0o600, expect="ok")
    d("chmod", "usr/bin", 0o700)
    d("chown", "usr/bin/tool", 1000, 1000)         # clears set-user-ID
    d("chown", "usr/bin/sgid", 0, 51)               # clears set-group-ID (group-executable)
    d("chown", "usr/lib/libx.so.2", 7, 8)           # the symlink itself
    d("chmod", "usr/lib/libx.so.2", 0o600)          # follows the link
    d("utime", "etc/passwd", OLD_NS, OLD_NS + 5)
    d("utime", "var/log", OLD_NS, OLD_NS + 7)
    d("utime", "usr/lib/libx.so.2", OLD_NS, OLD_NS + 9)
    d("touch", "etc/conf.d/a.conf")
    d("chmod", "nothing", 0o600, expect="ENOENT")
    d("stat", "usr/lib/libx.so.1")
    d("create", "home/user/new", 0o644, b"")
    d("chmod", "tmp", 0o2775)
    d("mkdir", "tmp/sgid-sub")                      # inherits set-group-ID and the group
    d("stat", "tmp/sgid-sub")
    pair.same_tree()


def test_attributes_through_open_files(pair):
    """What tar does to each file it writes, through the open file (fchown, fchmod, futimens, fstat,
    ftruncate): layerfs serves these from the upper file's fd while it is open, also after the file
    is renamed, linked and unlinked; and likewise for a lower file opened for writing (copied up)."""
    d = pair.do
    d("open", "n", "home/user/made", "excl")
    d("fdwrite", "n", 0, b"hello world")
    d("fdchown", "n", 1000, 1000)
    d("fdchmod", "n", 0o4755)
    d("fdstat", "n")
    d("fdchown", "n", 1000, 1001)                 # clears set-user-ID
    d("fdstat", "n")
    d("fdchmod", "n", 0o2775)
    d("fdchown", "n", 0, 0)                       # clears set-group-ID of a group-executable file
    d("fdutime", "n", OLD_NS, OLD_NS + 3)
    d("fdtruncate", "n", 5)
    d("fdstat", "n")
    d("stat", "home/user/made")
    d("rename", "home/user/made", "home/user/moved")
    d("fdchmod", "n", 0o640)
    d("stat", "home/user/moved")
    d("link", "home/user/moved", "home/user/second")
    d("fdstat", "n")                              # two names now
    d("unlink", "home/user/moved")
    d("unlink", "home/user/second")
    d("fdstat", "n")                              # no name left, still open
    d("fdutime", "n", OLD_NS, OLD_NS)
    d("close", "n")
    d("open", "e", "etc/hostname", "rdwr")        # a copy-up
    d("fdchmod", "e", 0o600)
    d("fdutime", "e", OLD_NS, OLD_NS + 1)
    d("fdtruncate", "e", 2)
    d("fdstat", "e")
    d("close", "e")
    d("stat", "etc/hostname")
    pair.same_tree()


def test_many_open_files_keep_their_own_attributes(pair):
    """Hundreds of files open for writing at once, closed in a shuffled order: attribute calls through
    each open file keep reaching that file (the binding's inode table grows and shrinks)."""
    import random
    d = pair.do
    n = 300
    for i in range(n):
        d("open", f"k{i}", f"tmp/many{i}", "excl")
        d("fdchmod", f"k{i}", 0o600 | (i % 8) << 3)
    order = list(range(n))
    random.Random(5).shuffle(order)
    for i in order[: n // 2]:
        d("close", f"k{i}")
    for i in order[n // 2:]:
        d("fdchmod", f"k{i}", 0o644)
        d("fdtruncate", f"k{i}", i)
        d("fdstat", f"k{i}")
    for i in order[n // 2:]:
        d("close", f"k{i}")
    pair.same_tree()


def test_closed_files_are_released_soon(pair):
    """Releases are answered at once and handled later in batches: the daemon's upper fds are all
    closed again shortly after a burst of creates and closes."""
    pid = pair.rec.pid

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    (pair.lmnt / "tmp" / "warm").write_bytes(b"")     # the daemon keeps an fd of the directory (bounded cache)
    base = fds()
    for i in range(300):
        fd = os.open(pair.lmnt / "tmp" / f"burst{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x")
        os.close(fd)
    assert wait_until(lambda: fds() <= base, 5), f"{fds()} fds open in the daemon, {base} before"
    assert (pair.lmnt / "tmp" / "burst299").read_bytes() == b"x"


def test_xattrs(pair):
    d = pair.do
    d("setxattr", "etc/passwd", "user.new", b"v", expect="ok")
    d("getxattr", "etc/passwd", "user.new", expect="ok")
    d("listxattr", "etc/passwd")
    d("removexattr", "etc/hostname", "user.origin", expect="ok")
    d("removexattr", "etc/hostname", "user.origin", expect="ENODATA")
    d("removexattr", "etc/conf.d", "user.none", expect="ENODATA")
    d("getxattr", "etc/hostname", "user.origin", expect="ENODATA")
    d("setxattr", "usr/bin", "user.dir", b"d")
    d("setxattr", "etc/passwd", "user.new", b"w", os.XATTR_CREATE, expect="EEXIST")
    d("setxattr", "etc/passwd", "user.other", b"w", os.XATTR_REPLACE, expect="ENODATA")
    d("setxattr", "etc/passwd", "user.new", b"w2", os.XATTR_REPLACE, expect="ok")
    d("setxattr", "etc/passwd", "trusted.t", b"t")
    d("setxattr", "usr/lib/libx.so.2", "user.x", b"x", expect="EPERM")     # user.* on a symlink
    d("listxattr", "usr/bin")
    pair.same_tree()


def test_open_unlinked_files_keep_working(pair):
    d = pair.do
    d("open", "f1", "etc/passwd", "rdwr")
    d("unlink", "etc/passwd")
    d("fdwrite", "f1", 0, b"written after unlink")
    d("fdread", "f1", 0, 100)
    d("fdstat", "f1")
    d("fdtruncate", "f1", 4)
    d("fdread", "f1", 0, 100)
    d("close", "f1")
    d("create", "tmp/t", 0o600, b"temp")
    d("open", "f2", "tmp/t", "ro")
    d("unlink", "tmp/t")
    d("fdread", "f2", 0, 10)
    d("fdstat", "f2")
    d("open", "f3", "etc/hostname", "ro")        # a lower file, opened, then deleted
    d("unlink", "etc/hostname")
    d("fdread", "f3", 0, 10)
    d("fdstat", "f3")
    d("fdchmod", "f3", 0o600)                     # overlayfs cannot copy it up: EEXIST
    d("open", "f4", "var/log/new.log", "ro")      # opened before a copy-up: sees the new data
    d("write", "var/log/new.log", b"rewritten", "trunc")
    d("fdread", "f4", 0, 100)
    d("open", "f5", "usr/share/h1", "ro")
    d("write", "usr/share/h2", b"h2 only", "trunc")
    d("fdread", "f5", 0, 100)
    d("read", "usr/share/h3")
    for k in ("f2", "f3", "f4", "f5"):
        d("close", k)
    pair.same_tree()


def test_permissions_as_another_user(pair):
    """EACCES/EPERM decided by the kernel on both sides (default_permissions), as uid/gid 1000."""
    ops = [("create", "etc/u", 0o644, b""), ("write", "etc/hostname", b"x", "trunc"), ("unlink", "etc/passwd"),
           ("write", "home/user/.profile", b"mine", "append"), ("create", "home/user/new", 0o600, b"n"),
           ("chmod", "home/user/.profile", 0o600), ("chown", "home/user/.profile", 0, 0),
           ("chmod", "etc/hostname", 0o777), ("unlink", "sticky/owned"), ("create", "tmp/mine", 0o644, b"m"),
           ("unlink", "tmp/rootfile"), ("listdir", "home/user"), ("read", "etc/conf.d/a.conf"),
           ("utime", "etc/hostname", OLD_NS, OLD_NS), ("touch", "home/user/new"), ("mkdir", "home/user/d"),
           ("rename", "home/user/new", "home/user/renamed"), ("setxattr", "etc/hostname", "user.x", b"1"),
           ("setxattr", "home/user/.profile", "user.x", b"1"), ("access", "usr/bin/tool", os.X_OK)]
    import pickle
    results = []
    for root in (pair.kmnt, pair.lmnt):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.chdir(root)            # the test's temporary directories are root's (0700)
                os.setgroups([])
                os.setgid(1000)
                os.setuid(1000)
                runner = Runner(".", pair.t0)
                os.write(w, pickle.dumps([runner.run(op) for op in ops]))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            results.append(pickle.loads(f.read()))
        os.waitpid(pid, 0)
    for op, kr, lr in zip(ops, *results):
        assert kr == lr, f"{op!r} as uid 1000: kernel {kr!r} != layerfs {lr!r}"
    assert ("err", "EACCES") in results[0] and ("err", "EPERM") in results[0]
    pair.same_tree()


def test_whiteout_names_are_refused_by_layerfs(pair):
    for op in (("create", "etc/.wh.x", 0o644, b""), ("mkdir", "etc/.wh.d"), ("symlink", "t", ".wh.l"),
               ("rename", "etc/hostname", "etc/.wh.hostname"), ("link", "etc/passwd", ".wh..wh..opq")):
        assert pair.k.run(op)[0] == "ok"            # a plain name for the kernel
        assert pair.l.run(op) == ("err", "EINVAL"), op
    assert pair.l.run(("stat", "etc/.wh.hostname")) == ("err", "ENOENT")


# --- long names and long paths (NAME_MAX, PATH_MAX) ----------------------------------------------------------

def test_long_names_of_new_entries(pair):
    """Every operation on names of 255 bytes works as on the kernel; 256 bytes are ENAMETOOLONG."""
    d = pair.do
    n, m = long_name("new"), long_name("mid")
    d("create", f"long/{n}", 0o640, b"data", expect="ok")
    d("write", f"long/{n}", b"more", "append", expect="ok")
    d("truncate", f"long/{n}", 3, expect="ok")
    d("chmod", f"long/{n}", 0o600, expect="ok")
    d("chown", f"long/{n}", 7, 8, expect="ok")
    d("utime", f"long/{n}", OLD_NS, OLD_NS + 1, expect="ok")
    d("setxattr", f"long/{n}", "user.k", b"v", expect="ok")
    d("getxattr", f"long/{n}", "user.k", expect="ok")
    d("link", f"long/{n}", f"long/{long_name('link')}", expect="ok")
    d("mkdir", f"long/{long_name('newdir')}", 0o750, expect="ok")
    d("create", f"long/{long_name('newdir')}/{n}", 0o644, b"inside", expect="ok")
    d("mkfifo", f"long/{long_name('fifo')}", expect="ok")
    d("mknod", f"long/{long_name('node')}", "c", 1, 3, expect="ok")
    d("symlink", n, f"long/{long_name('symnew')}", expect="ok")
    d("readlink", f"long/{long_name('symnew')}", expect="ok")
    d("rename", f"long/{n}", f"long/{m}", expect="ok")
    d("rename", f"long/{m}", "long/short", expect="ok")
    d("rename", "long/short", f"long/{n}", expect="ok")
    d("rename", f"long/{long_name('newdir')}", f"long/{long_name('newdir2')}", expect="ok")
    d("rename", f"long/{n}", f"long/{long_name('link')}", RENAME_EXCHANGE, expect="ok")
    d("unlink", f"long/{long_name('link')}", expect="ok")
    d("unlink", f"long/{long_name('newdir2')}/{n}", expect="ok")
    d("rmdir", f"long/{long_name('newdir2')}", expect="ok")
    d("unlink", f"long/{long_name('fifo')}", expect="ok")
    too = "y" * 256
    for op in (("create", f"long/{too}", 0o644, b""), ("mkdir", f"long/{too}"), ("symlink", "t", f"long/{too}"),
               ("link", f"long/{n}", f"long/{too}"), ("rename", f"long/{n}", f"long/{too}"),
               ("mkfifo", f"long/{too}"), ("mknod", f"long/{too}", "c", 1, 3), ("stat", f"long/{too}"),
               ("unlink", f"long/{too}"), ("rmdir", f"long/{too}"), ("write", f"long/{too}", b"x", "creat")):
        d(*op, expect="ENAMETOOLONG")
    d("listdir", "long")
    pair.same_tree()
    assert max(len(os.fsencode(x)) for x in os.listdir(pair.upper / "long")) <= 255


def test_long_names_of_lower_entries(pair):
    """Lower entries with 255-byte names: copy-up, removal and rename leave whiteouts no longer than the
    name (the ``.wh.`` prefix does not fit), and new entries over those whiteouts replace them."""
    d = pair.do
    d("chmod", f"long/{LF}", 0o600, expect="ok")
    d("chown", f"long/{LF}", 5, 6, expect="ok")
    d("utime", f"long/{LF}", OLD_NS, OLD_NS + 2, expect="ok")
    d("setxattr", f"long/{LF}", "user.more", b"m", expect="ok")
    d("write", f"long/{LF}", b"appended\n", "append", expect="ok")
    d("truncate", f"long/{LF}", 5, expect="ok")
    d("rename", f"long/{LK}", "long/kept-short", expect="ok")      # the kernel says ok: so must we
    d("stat", f"long/{LK}", expect="ENOENT")
    d("rename", "long/kept-short", f"long/{LK}", expect="ok")      # back, over its own whiteout
    d("read", f"long/{LK}")
    d("unlink", f"long/{LG}", expect="ok")
    d("stat", f"long/{LG}", expect="ENOENT")
    d("create", f"long/{LG}", 0o600, b"again", expect="ok")       # over the whiteout
    d("unlink", f"long/{LD}/inner", expect="ok")
    d("rmdir", f"long/{LD}", expect="ok")
    d("mkdir", f"long/{LD}", 0o700, expect="ok")                  # opaque, over the whiteout
    d("listdir", f"long/{LD}")
    d("rmdir", f"long/{LE}", expect="ok")
    d("mkdir", "long/newd", expect="ok")
    d("create", "long/newd/f", 0o644, b"f")
    d("rename", "long/newd", f"long/{LE}", expect="ok")           # a directory moved onto the whiteout
    d("listdir", f"long/{LE}")
    d("unlink", f"long/{LS}", expect="ok")
    d("symlink", "elsewhere", f"long/{LS}", expect="ok")
    d("unlink", f"long/{W251}", expect="ok")                      # ".wh." + 251 bytes: still a .wh. file
    d("unlink", f"long/{W252}", expect="ok")
    d("mkfifo", f"long/{W252}", expect="ok")
    d("rename", f"long/{LF}", f"long/{long_name('moved')}", expect="ok")
    d("link", f"long/{long_name('moved')}", f"long/{LF}", expect="ok")       # a link onto the whiteout
    d("rename", f"long/{LK}", f"long/{long_name('moved')}", expect="ok")     # over an upper file
    d("unlink", f"long/{LG}", expect="ok")
    d("mknod", f"long/{LG}", "c", 1, 3, expect="ok")
    d("listdir", "long")
    pair.same_tree()
    assert max(len(os.fsencode(x)) for x in os.listdir(pair.upper / "long")) <= 255


def _at(op, *args):
    """Run os.*(*args) and return a comparable result."""
    try:
        r = op(*args[:-1], **args[-1])
        return ("ok", r if isinstance(r, (bytes, str, type(None))) else None)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def _long_path_ops(root: Path) -> list:
    """Operations on paths of up to PATH_MAX - 1 bytes relative to the mount's root (the VFS takes them
    whole), one byte more (ENAMETOOLONG from the VFS), and below a directory fd deeper than PATH_MAX."""
    out = []
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    comps = [f"{i:02d}".ljust(255, "d") for i in range(15)] + ["z" * 200]
    try:
        for i in range(len(comps)):
            out.append(_at(os.mkdir, "/".join(comps[: i + 1]), 0o755, {"dir_fd": rfd}))
        base = "/".join(comps)                    # 4039 bytes
        tail = 4095 - len(base) - 1               # a name that makes the path 4095 bytes long
        ok, over = f"{base}/{'n' * tail}", f"{base}/{'n' * (tail + 1)}"
        assert len(os.fsencode(ok)) == 4095
        for p in (ok, over):
            out.append(_at(lambda q: os.close(os.open(q, os.O_CREAT | os.O_WRONLY, 0o640, dir_fd=rfd)), p, {}))
            out.append(_at(lambda q: os.stat(q, dir_fd=rfd).st_size, p, {}))
            out.append(_at(os.chmod, p, 0o600, {"dir_fd": rfd}))
            out.append(_at(os.chown, p, 3, 4, {"dir_fd": rfd, "follow_symlinks": False}))
            out.append(_at(os.utime, p, {"dir_fd": rfd, "ns": (OLD_NS, OLD_NS)}))
            out.append(_at(lambda q: _trunc_at(rfd, q, 9), p, {}))
            out.append(_at(os.link, p, p[:-1] + "L", {"src_dir_fd": rfd, "dst_dir_fd": rfd}))
            out.append(_at(os.rename, p, p[:-1] + "R", {"src_dir_fd": rfd, "dst_dir_fd": rfd}))
            out.append(_at(os.rename, p[:-1] + "R", p, {"src_dir_fd": rfd, "dst_dir_fd": rfd}))
            out.append(_at(os.unlink, p[:-1] + "L", {"dir_fd": rfd}))
            out.append(_at(os.symlink, "t", p[:-1] + "S", {"dir_fd": rfd}))
            out.append(_at(os.readlink, p[:-1] + "S", {"dir_fd": rfd}))
            out.append(_at(os.mkfifo, p[:-1] + "F", 0o600, {"dir_fd": rfd}))
            out.append(_at(os.mknod, p[:-1] + "N", stat.S_IFCHR | 0o600, os.makedev(1, 3), {"dir_fd": rfd}))
            out.append(_at(os.mkdir, p[:-1] + "D", 0o700, {"dir_fd": rfd}))
            out.append(_at(os.rmdir, p[:-1] + "D", {"dir_fd": rfd}))
            out.append(_at(os.unlink, p, {"dir_fd": rfd}))
        # deeper than PATH_MAX below a directory fd: the upper's paths are longer still
        dfd = os.open(base, os.O_PATH | os.O_DIRECTORY, dir_fd=rfd)
        try:
            for name in ("q" * 255, "r" * 255):
                out.append(_at(os.mkdir, name, 0o755, {"dir_fd": dfd}))
                nfd = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            out.append(_at(lambda: _write_at(dfd, "f" * 255, b"deep data"), {}))
            out.append(_at(os.setxattr, f"/proc/self/fd/{dfd}/{'f' * 255}", "user.deep", b"1",
                           {"follow_symlinks": False}))
            out.append(_at(os.getxattr, f"/proc/self/fd/{dfd}/{'f' * 255}", "user.deep", {"follow_symlinks": False}))
            out.append(_at(os.rename, "f" * 255, "g" * 255, {"src_dir_fd": dfd, "dst_dir_fd": dfd}))
            out.append(_at(lambda: _read_at(dfd, "g" * 255), {}))
            out.append(_at(lambda: _list_at(dfd), {}))
            out.append(_at(os.unlink, "g" * 255, {"dir_fd": dfd}))
        finally:
            os.close(dfd)
        # remove what is deeper than the tree snapshot can walk (its paths are absolute)
        bfd = os.open(base, os.O_PATH | os.O_DIRECTORY, dir_fd=rfd)
        qfd = os.open("q" * 255, os.O_PATH | os.O_DIRECTORY, dir_fd=bfd)
        try:
            out.append(_at(os.rmdir, "r" * 255, {"dir_fd": qfd}))
            out.append(_at(os.rmdir, "q" * 255, {"dir_fd": bfd}))
        finally:
            os.close(qfd)
            os.close(bfd)
        for p in (f"{base}/{'n' * tail}"[:-1] + s for s in "SFN"):
            out.append(_at(os.unlink, p, {"dir_fd": rfd}))
        for i in range(len(comps), 12, -1):
            out.append(_at(os.rmdir, "/".join(comps[:i]), {"dir_fd": rfd}))
    finally:
        os.close(rfd)
    return out


def _trunc_at(dfd: int, path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=dfd)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _write_at(dfd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def _list_at(dfd: int) -> str:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
    try:
        return "/".join(sorted(os.listdir(fd)))
    finally:
        os.close(fd)


def test_paths_near_and_beyond_path_max(pair):
    k, l = _long_path_ops(pair.kmnt), _long_path_ops(pair.lmnt)
    assert k == l
    assert ("err", "ENAMETOOLONG") in k and k.count(("err", "ENAMETOOLONG")) < len(k) // 2
    pair.same_tree()


# --- index=on: hard links across copy-up ----------------------------------------------------------------------

@pytest.fixture
def ipair(world, tmp_path):
    """Both mounts with index=on (kernel overlayfs' option, and layerfs' -o index=on)."""
    store, lowers = world
    p = Pair(store, lowers, tmp_path, index=True)
    try:
        yield p
    finally:
        p.close()


def test_index_on_keeps_the_names_of_a_copied_up_hard_link_one_inode(ipair):
    d = ipair.do
    for n in ("h1", "h2", "h3"):
        d("stat", f"usr/share/{n}")
    d("write", "usr/share/h1", b"more\n", "append", expect="ok")     # a copy-up: all names follow
    d("read", "usr/share/h2")
    d("stat", "usr/share/h2")
    d("open", "f", "usr/share/h3", "rdwr")
    d("fdwrite", "f", 0, b"via h3")
    d("fdstat", "f")
    d("read", "usr/share/h1")
    d("unlink", "usr/share/h3", expect="ok")                        # the others keep the data, nlink 2
    d("stat", "usr/share/h1")
    d("fdstat", "f")
    d("close", "f")
    d("link", "usr/share/h2", "etc/h4", expect="ok")
    d("stat", "usr/share/h1")
    d("rename", "usr/share/h2", "var/h2", expect="ok")
    d("stat", "var/h2")
    d("unlink", "usr/lib/libx.so.1", expect="ok")                   # not copied up yet: copied up first
    d("stat", "usr/lib/libx.so")
    d("chmod", "usr/lib/libx.so", 0o700, expect="ok")
    d("read", "usr/lib/libx.so")
    ipair.same_tree()
    up = ipair.upper
    assert os.stat(up / "usr/share/h1").st_ino == os.stat(up / "etc/h4").st_ino == os.stat(up / "var/h2").st_ino
    assert os.stat(up / "usr/share/h1").st_nlink == 3


def test_index_off_and_on_differ_as_on_the_kernel(world, tmp_path):
    """The same writes, index=off then index=on: the other names split off, or follow."""
    store, lowers = world
    seen = []
    for index in (False, True):
        (tmp_path / str(index)).mkdir()
        p = Pair(store, lowers, tmp_path / str(index), index=index)
        try:
            p.do("write", "usr/share/h1", b"new", "trunc")
            seen.append((p.do("read", "usr/share/h2"), p.do("stat", "usr/share/h2")[1][5]))
            p.same_tree()
        finally:
            p.close()
    assert seen == [(("ok", b"linked\n"), 3), (("ok", b"new"), 3)]


# --- generated sequences ------------------------------------------------------------------------------------

SEEDS = [int(s) for s in os.environ.get("LAYERFS_DIFF_SEED", ",".join(map(str, range(1, 11)))).split(",")]


def _size(p: Pair, path: str) -> int:
    try:
        return os.stat(p.kmnt / path).st_size
    except OSError:
        return -1


def _lower_hard_link(p: Pair, path: str) -> bool:
    """*path* names a file of the lower layers with other names (following a symlink like open does)."""
    try:
        st = os.stat(p.kmnt / path)
        real = os.path.relpath(os.path.realpath(p.kmnt / path), p.kmnt)
    except OSError:
        return False
    return not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and not (p.kupper / real).exists()


def _same_lower_file(p: Pair, a: str, b: str) -> bool:
    try:
        sa, sb = os.lstat(p.lmnt / a), os.lstat(p.lmnt / b)
    except OSError:
        return False
    return sa.st_ino == sb.st_ino and not stat.S_ISDIR(sa.st_mode) and sa.st_nlink > 1 and a != b


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences(world, tmp_path, seed):
    _random_sequence(world, tmp_path, seed, index=False)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_random_sequences_index_on(world, tmp_path, seed):
    """As above with index=on on both sides: the image's lower hard links stay one inode when copied up."""
    _random_sequence(world, tmp_path, seed, index=True)


def _random_sequence(world, tmp_path, seed: int, *, index: bool) -> None:
    store, lowers = world
    p = Pair(store, lowers, tmp_path, index=index)
    try:

        shared: set[str] = set()

        def apply(op):
            if not index and op[0] == "rename" and _same_lower_file(p, op[1], op[2]):
                return           # documented difference (see the module doc)
            if op[0] == "open":
                shared.discard(op[1])
                if _lower_hard_link(p, op[2]):
                    shared.add(op[1])
            if not index and op[0] == "fdstat" and op[1] in shared:
                return           # documented difference (see the module doc)
            p.do(*op)
            if len(p.log) % 60 == 0:
                p.same_tree(f"after step {len(p.log)}: ")
        try:
            random_ops(seed, 400, str(p.kmnt), apply)
            for key in ("fa", "fb"):
                p.do("close", key)
            p.same_tree()
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, index={'on' if index else 'off'} (replay: LAYERFS_DIFF_SEED={seed}): "
                                 f"{e}\nlast ops: "
                                 + "\n".join(map(_short, p.log[-15:]))) from None
    finally:
        p.close()


# --- read-only ---------------------------------------------------------------------------------------------------

def test_read_only_mount_is_erofs_like_a_kernel_overlay_without_upper(world, tmp_path):
    store, lowers = world
    m = tmp_path / "ro"
    m.mkdir()
    rec = mount_image(store, "kdiff:1", m, MountOptions(read_only=True))
    track(m, rec.pid)
    k = tmp_path / "kro"
    k.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(map(str, reversed(lowers))),
                    str(k)], check=True)
    try:
        t0 = time.time_ns()
        kr, lr = Runner(k, t0), Runner(m, t0)
        for op in (("create", "etc/x", 0o644, b""), ("write", "etc/hostname", b"x", "append"), ("unlink", "etc/passwd"),
                   ("mkdir", "d"), ("rename", "etc/hostname", "etc/h"), ("chmod", "etc/hostname", 0o600),
                   ("setxattr", "etc/hostname", "user.x", b"1"), ("symlink", "t", "s"), ("read", "etc/hostname")):
            assert kr.run(op) == lr.run(op), op
        assert lr.run(("unlink", "etc/passwd")) == ("err", "EROFS")
    finally:
        subprocess.run(["umount", str(k)])
        umount(store, m)


# --- a real workload ----------------------------------------------------------------------------------------------

C_MAIN = b'#include <stdio.h>\n#include "greet.h"\nint main(void) { greet("layerfs"); return 0; }\n'
C_GREET = b'#include <stdio.h>\nvoid greet(const char *w) { printf("hello, %s\\n", w); }\n'
MAKEFILE = (b"CFLAGS=-O2 -Wall\nhello: main.o greet.o\n\t$(CC) -o $@ $^\n"
            b"main.o: main.c greet.h\ngreet.o: greet.c\nclean:\n\trm -f hello *.o\n")


def test_build_workload_unpack_make_git(pair, tmp_path):
    from prereqs import require_binary
    for tool in ("gcc", "make", "git", "tar"):      # skipped without them, a failure under CI=true
        require_binary(tool)
    src = tmp_path / "src" / "hello-1.0"
    src.mkdir(parents=True)
    (src / "main.c").write_bytes(C_MAIN)
    (src / "greet.c").write_bytes(C_GREET)
    (src / "greet.h").write_bytes(b"void greet(const char *w);\n")
    (src / "Makefile").write_bytes(MAKEFILE)
    tarball = tmp_path / "hello-1.0.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(src.parent), "hello-1.0"], check=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2024-01-01T00:00:00Z", HOME=str(tmp_path))
    outputs = []
    for root in (pair.kmnt, pair.lmnt):
        work = root / "home" / "build"

        def sh(*cmd, cwd=None):
            p = subprocess.run(cmd, cwd=cwd or work, env=env, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, f"{cmd} in {root}: {p.stdout}{p.stderr}"
            return p.stdout
        os.makedirs(work)
        sh("tar", "-xzf", str(tarball))
        proj = work / "hello-1.0"
        sh("make", "-j2", cwd=proj)
        run = sh("./hello", cwd=proj)
        sh("make", cwd=proj)                       # nothing to do: timestamps work
        (proj / "greet.h").write_bytes(b"void greet(const char *w);\n/* changed */\n")
        os.utime(proj / "greet.h", ns=(time.time_ns() + 10**9,) * 2)
        rebuilt = sh("make", cwd=proj)
        sh("git", "init", "-q", cwd=proj)
        sh("git", "add", "main.c", "greet.c", "greet.h", "Makefile", cwd=proj)
        sh("git", "commit", "-qm", "import", cwd=proj)
        log = sh("git", "log", "--format=%H %s", cwd=proj)
        sh("git", "status", "--porcelain", cwd=proj)
        sh("git", "gc", "-q", cwd=proj)
        sh("git", "fsck", "--strict", cwd=proj)
        sh("make", "clean", cwd=proj)
        outputs.append((run, "main.o" in rebuilt, log, sorted(os.listdir(proj))))
    assert outputs[0] == outputs[1]
    assert outputs[1][0] == "hello, layerfs\n" and outputs[1][1]


def _write_as_nobody(path: Path, flags: int, data: bytes) -> None:
    """Open *path* as root, then write *data* to it as the unprivileged user 65534 (no CAP_FSETID:
    the kernel decides at write time; the path stays reachable whatever the test dirs' modes)."""
    fd = os.open(path, flags)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                os.write(fd, data)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"write to {path} as 65534 failed"
    finally:
        os.close(fd)


def test_unprivileged_writes_clear_setuid_and_setgid(pair):
    """A write by a user without CAP_FSETID drops set-user-ID and the set-group-ID of group-executable
    files (see the module doc for set-group-ID files that are not group-executable)."""
    d = pair.do
    d("mkdir", "tmp/w", 0o777)
    d("chmod", "tmp/w", 0o777)
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6775)):
        d("create", f"tmp/w/{name}", 0o644, b"data")
        d("chmod", f"tmp/w/{name}", mode)
        for mnt in (pair.kmnt, pair.lmnt):
            _write_as_nobody(mnt / "tmp/w" / name, os.O_WRONLY | os.O_APPEND, b"more")
        d("stat", f"tmp/w/{name}")
        d("read", f"tmp/w/{name}")
    # a lower file made setuid and world-writable by root, then written by the user
    d("chmod", "usr/lib/libx.so.1", 0o4777)
    for mnt in (pair.kmnt, pair.lmnt):
        _write_as_nobody(mnt / "usr/lib/libx.so.1", os.O_WRONLY, b"Z")
    d("stat", "usr/lib/libx.so.1")
    pair.same_tree()
