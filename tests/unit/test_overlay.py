"""The overlay (layerfs.fs.overlay) driven directly, without FUSE: upper format, copy-up, whiteouts, errors."""
from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from mounthelpers import MTIME_NS, BytesReader, fix_dir_nlinks
from layerfs.fs import (OPAQUE_MARKER, OVERRIDE_XATTR, RENAME_EXCHANGE, RENAME_NOREPLACE, WHITEOUTS_XATTR, Overlay,
    UpperDirty, UpperInUse, work_dir_for)
from layerfs.fs import ROOT_INO, MergedTree
from layerfs.fs.upper import NOSYNC_MARKER

BIG = bytes(range(256)) * 8192 + b"tail"       # 2 MiB + 4


def make_tree() -> MergedTree:
    stream = b"\0" * 512 + BIG
    t = MergedTree([BytesReader(stream)])
    t.nodes[ROOT_INO].mtime_ns = MTIME_NS
    kw = dict(mtime_ns=MTIME_NS)
    etc = t.add(ROOT_INO, "etc", stat.S_IFDIR | 0o755, **kw)
    t.add(etc.ino, "hostname", stat.S_IFREG | 0o644, inline=b"box\n", size=4, uid=3, gid=4,
          xattrs={"user.note": b"lower"}, **kw)
    t.add(etc.ino, "big", stat.S_IFREG | 0o600, layer=0, offset=512, size=len(BIG), **kw)
    t.add(etc.ino, "motd", stat.S_IFLNK | 0o777, target="../usr/motd", **kw)
    sub = t.add(etc.ino, "sub", stat.S_IFDIR | 0o750, uid=5, gid=6, **kw)
    t.add(sub.ino, "deep", stat.S_IFREG | 0o644, inline=b"deep", size=4, **kw)
    usr = t.add(ROOT_INO, "usr", stat.S_IFDIR | 0o755, **kw)
    h = t.add(usr.ino, "h1", stat.S_IFREG | 0o755, inline=b"linked", size=6, nlink=2, **kw)
    t.link(usr.ino, "h2", h.ino)
    t.add(usr.ino, "su", stat.S_IFREG | 0o4755, inline=b"#!", size=2, **kw)
    dev = t.add(ROOT_INO, "dev", stat.S_IFDIR | 0o755, **kw)
    t.add(dev.ino, "null", stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), **kw)
    t.add(ROOT_INO, "empty", stat.S_IFDIR | 0o755, **kw)
    fix_dir_nlinks(t)
    return t


@pytest.fixture
def upper(tmp_path) -> Path:
    return tmp_path / "upper"


@pytest.fixture
def ovl(upper):
    o = Overlay(make_tree(), upper)
    yield o
    o.close()


def ino(ovl: Overlay, path: str) -> int:
    cur = ROOT_INO
    for part in path.split("/"):
        if part:
            cur = ovl.lookup(cur, part).ino
    return cur


def names(ovl: Overlay, path: str) -> list[str]:
    return sorted(n for n, _ in ovl.readdir(ino(ovl, path)))


def read_all(ovl: Overlay, path: str) -> bytes:
    fh = ovl.open(ino(ovl, path), os.O_RDONLY)
    try:
        out = b""
        while True:
            chunk = ovl.read(fh, len(out), 1 << 20)
            if not chunk:
                return out
            out += chunk
    finally:
        ovl.release(fh)


def write_file(ovl: Overlay, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
    fh = ovl.open(ino(ovl, path), flags)
    try:
        ovl.write(fh, 0, data)
    finally:
        ovl.release(fh)


def errno_of(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def upper_listing(upper: Path) -> list[str]:
    return sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))


# --- reading --------------------------------------------------------------------------------

def test_lower_view_and_fresh_upper_root(ovl, upper):
    assert names(ovl, "") == ["dev", "empty", "etc", "usr"]
    a = ovl.lookup(ino(ovl, "etc"), "hostname")
    assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.size, a.mtime_ns) == (0o644, 3, 4, 4, MTIME_NS)
    assert read_all(ovl, "etc/big") == BIG
    assert ovl.readlink(ino(ovl, "etc/motd")) == "../usr/motd"
    assert ovl.getxattr(ino(ovl, "etc/hostname"), "user.note") == b"lower"
    assert errno_of(ovl.lookup, ROOT_INO, "nothing") == errno.ENOENT
    # nothing is written by reading; the upper root took the image root's mode and times
    assert upper_listing(upper) == []
    st = os.stat(upper)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime_ns == MTIME_NS
    assert Path(work_dir_for(upper)).is_dir() and Path(work_dir_for(upper)).name == ".upper.work"


def test_hard_linked_lower_names_are_one_inode_until_one_is_copied_up(ovl):
    usr = ino(ovl, "usr")
    a1, a2 = ovl.lookup(usr, "h1"), ovl.lookup(usr, "h2")
    assert a1.ino == a2.ino and a1.nlink == 2 and a1.unstable_name   # entry timeout 0: lookups name the inode
    ovl.lookup(usr, "h2")
    write_file(ovl, "usr/h1", b"changed")     # looks h1 up, then opens the shared inode: h1 is copied up
    b1, b2 = ovl.lookup(usr, "h1"), ovl.lookup(usr, "h2")
    assert b1.ino == a1.ino                   # the written name keeps the kernel's inode (it is open)
    assert b2.ino != b1.ino and b1.nlink == 1 and b2.nlink == 2 and not b1.unstable_name
    assert read_all(ovl, "usr/h1") == b"changed" and read_all(ovl, "usr/h2") == b"linked"
    ovl.setattr(b2.ino, mode=0o700)           # the other name can be copied up too
    assert ovl.lookup(usr, "h2").ino == b2.ino and read_all(ovl, "usr/h2") == b"linked"


# --- copy-up ------------------------------------------------------------------------------------

def test_copy_up_keeps_data_mode_owner_times_xattrs_and_parent_times(ovl, upper):
    fh = ovl.open(ino(ovl, "etc/hostname"), os.O_RDWR)
    ovl.write(fh, 4, b"more\n")
    ovl.release(fh)
    st = os.lstat(upper / "etc/hostname")
    assert (upper / "etc/hostname").read_bytes() == b"box\nmore\n"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, 3, 4)
    assert os.getxattr(upper / "etc/hostname", "user.note") == b"lower"
    pst = os.stat(upper / "etc")
    assert pst.st_mtime_ns == MTIME_NS and stat.S_IMODE(pst.st_mode) == 0o755
    # a big file is copied whole (in chunks), then changed
    write_file(ovl, "etc/big", b"XY", os.O_WRONLY)
    assert (upper / "etc/big").read_bytes() == b"XY" + BIG[2:]
    assert read_all(ovl, "etc/big") == b"XY" + BIG[2:]
    assert os.listdir(work_dir_for(upper)) == []


def test_truncating_open_copies_no_data(ovl, upper, monkeypatch):
    reads = []
    orig = ovl.tree.read
    monkeypatch.setattr(ovl.tree, "read", lambda *a: reads.append(a) or orig(*a))
    write_file(ovl, "etc/big", b"new", os.O_WRONLY | os.O_TRUNC)
    assert reads == [] and (upper / "etc/big").read_bytes() == b"new"
    a = ovl.setattr(ino(ovl, "etc/hostname"), size=2)
    assert a.size == 2 and (upper / "etc/hostname").read_bytes() == b"bo"


def test_a_failed_copy_up_leaves_nothing_visible(ovl, upper, monkeypatch):
    def boom(fd):
        raise OSError(errno.EIO, "disk on fire")
    monkeypatch.setattr(os, "fsync", boom)
    assert errno_of(ovl.open, ino(ovl, "etc/big"), os.O_WRONLY) == errno.EIO
    monkeypatch.undo()
    assert not (upper / "etc/big").exists() and os.listdir(work_dir_for(upper)) == []
    assert read_all(ovl, "etc/big") == BIG


def test_reader_opened_before_copy_up_sees_new_data(ovl):
    rfh = ovl.open(ino(ovl, "etc/hostname"), os.O_RDONLY)
    assert ovl.read(rfh, 0, 100) == b"box\n"
    write_file(ovl, "etc/hostname", b"new!")
    assert ovl.read(rfh, 0, 100) == b"new!"
    ovl.release(rfh)


# --- whiteouts and opaque directories ---------------------------------------------------------------

def test_unlink_writes_a_whiteout_and_hides_it(ovl, upper):
    ovl.unlink(ino(ovl, "etc"), "hostname")
    assert "hostname" not in names(ovl, "etc")
    assert (upper / "etc/.wh.hostname").is_file() and (upper / "etc/.wh.hostname").stat().st_size == 0
    assert errno_of(ovl.lookup, ino(ovl, "etc"), ".wh.hostname") == errno.ENOENT
    # deleting an upper-only file leaves no whiteout
    fh, _ = ovl.create(ino(ovl, "etc"), "mine", 0o644, os.O_WRONLY, uid=0, gid=0)
    ovl.release(fh)
    ovl.unlink(ino(ovl, "etc"), "mine")
    assert not (upper / "etc/mine").exists() and not (upper / "etc/.wh.mine").exists()
    # re-creating a deleted name removes its whiteout
    fh, _ = ovl.create(ino(ovl, "etc"), "hostname", 0o600, os.O_WRONLY, uid=0, gid=0)
    ovl.release(fh)
    assert not (upper / "etc/.wh.hostname").exists() and read_all(ovl, "etc/hostname") == b""


def test_rmdir_then_mkdir_makes_an_opaque_directory(ovl, upper):
    sub = ino(ovl, "etc/sub")
    assert errno_of(ovl.rmdir, ino(ovl, "etc"), "sub") == errno.ENOTEMPTY
    ovl.unlink(sub, "deep")
    ovl.rmdir(ino(ovl, "etc"), "sub")          # empty in the merged view
    assert (upper / "etc/.wh.sub").is_file() and not (upper / "etc/sub").exists()
    a = ovl.mkdir(ino(ovl, "etc"), "sub", 0o700, uid=0, gid=0)
    assert a.ino != sub and names(ovl, "etc/sub") == []
    assert (upper / "etc/sub" / OPAQUE_MARKER).is_file() and not (upper / "etc/.wh.sub").exists()
    assert a.nlink == 2


def test_whiteout_names_cannot_be_created(ovl):
    e = ino(ovl, "etc")
    for fn, args in ((ovl.mkdir, (e, ".wh.x", 0o755)), (ovl.symlink, (e, ".wh.x", "t")),
                     (ovl.mknod, (e, ".wh..wh..opq", stat.S_IFIFO | 0o644))):
        assert errno_of(fn, *args, uid=0, gid=0) == errno.EINVAL
    assert errno_of(ovl.create, e, ".wh.y", 0o644, os.O_WRONLY, uid=0, gid=0) == errno.EINVAL
    assert errno_of(ovl.rename, e, "hostname", e, ".wh.hostname") == errno.EINVAL
    assert errno_of(ovl.link, ino(ovl, "etc/hostname"), e, ".wh.z") == errno.EINVAL


def test_merged_directories_show_nlink_1(ovl):
    assert ovl.getattr(ino(ovl, "etc")).nlink == 3
    fh, _ = ovl.create(ino(ovl, "etc"), "n", 0o644, os.O_WRONLY, uid=0, gid=0)
    ovl.release(fh)
    assert ovl.getattr(ino(ovl, "etc")).nlink == 1


# --- rename ----------------------------------------------------------------------------------------

def test_rename_lower_file_and_directory_rules(ovl, upper):
    etc, usr = ino(ovl, "etc"), ino(ovl, "usr")
    ovl.rename(etc, "hostname", usr, "hn")
    assert (upper / "etc/.wh.hostname").exists() and (upper / "usr/hn").read_bytes() == b"box\n"
    assert errno_of(ovl.rename, ROOT_INO, "etc", ROOT_INO, "etc2") == errno.EXDEV
    assert errno_of(ovl.rename, etc, "sub", usr, "sub") == errno.EXDEV
    # a directory created here moves freely; moved onto a lower name it becomes opaque
    ovl.mkdir(usr, "new", 0o755, uid=0, gid=0)
    ovl.rename(usr, "new", ROOT_INO, "newer")
    assert (upper / "newer").is_dir() and not (upper / "newer" / OPAQUE_MARKER).exists()
    ovl.rmdir(ROOT_INO, "empty")
    ovl.rename(ROOT_INO, "newer", ROOT_INO, "empty")
    assert (upper / "empty" / OPAQUE_MARKER).exists() and names(ovl, "") == ["dev", "empty", "etc", "usr"]
    # dir over non-empty dir, dir over file, file over dir
    ovl.mkdir(ROOT_INO, "d2", 0o755, uid=0, gid=0)
    assert errno_of(ovl.rename, ROOT_INO, "d2", ROOT_INO, "etc") in (errno.ENOTEMPTY, errno.EXDEV)
    assert errno_of(ovl.rename, ROOT_INO, "d2", usr, "su") == errno.ENOTDIR
    assert errno_of(ovl.rename, usr, "su", ROOT_INO, "d2") == errno.EISDIR
    assert errno_of(ovl.rename, ROOT_INO, "d2", ino(ovl, "d2"), "x") == errno.EINVAL


def test_rename_noreplace_and_exchange(ovl, upper):
    usr = ino(ovl, "usr")
    assert errno_of(ovl.rename, usr, "h1", usr, "su", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(ovl.rename, usr, "h1", usr, "none", RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(ovl.rename, usr, "h1", usr, "su", 4) == errno.EINVAL      # RENAME_WHITEOUT
    ovl.rename(usr, "h1", usr, "su", RENAME_EXCHANGE)
    assert read_all(ovl, "usr/su") == b"linked" and read_all(ovl, "usr/h1") == b"#!"
    assert stat.S_IMODE(ovl.lookup(usr, "h1").mode) == 0o4755
    assert errno_of(ovl.rename, ROOT_INO, "etc", ROOT_INO, "usr", RENAME_EXCHANGE) == errno.EXDEV
    ovl.rename(usr, "h2", usr, "fresh", RENAME_NOREPLACE)
    assert "h2" not in names(ovl, "usr") and (upper / "usr/.wh.h2").exists()


# --- links, special files, attributes --------------------------------------------------------------

def test_link_symlink_mknod_and_setattr(ovl, upper):
    usr = ino(ovl, "usr")
    a = ovl.link(ino(ovl, "etc/hostname"), usr, "hn")
    assert a.nlink == 2 and ovl.lookup(ino(ovl, "etc"), "hostname").ino == a.ino
    assert os.stat(upper / "usr/hn").st_ino == os.stat(upper / "etc/hostname").st_ino
    s = ovl.symlink(usr, "sl", "hn", uid=7, gid=8)
    assert stat.S_ISLNK(s.mode) and (s.uid, s.gid) == (7, 8) and ovl.readlink(s.ino) == "hn"
    f = ovl.mknod(usr, "fifo", stat.S_IFIFO | 0o640, uid=1, gid=2)
    assert stat.S_ISFIFO(f.mode) and stat.S_IMODE(f.mode) == 0o640
    a = ovl.setattr(ino(ovl, "usr/su"), uid=9, gid=9)
    assert (a.uid, a.gid) == (9, 9) and stat.S_IMODE(a.mode) == 0o755     # chown clears set-user-ID
    a = ovl.setattr(ino(ovl, "etc/motd"), atime_ns=5, mtime_ns=7)
    assert a.mtime_ns == 7 and os.readlink(upper / "etc/motd") == "../usr/motd"
    a = ovl.setattr(ino(ovl, "etc/sub"), mode=0o1777)
    assert stat.S_IMODE(a.mode) == 0o1777 and a.nlink == 1
    assert sorted(os.listdir(upper / "etc/sub")) == []


def test_xattrs_copy_up_and_reserved_names(ovl, upper):
    h = ino(ovl, "etc/hostname")
    assert errno_of(ovl.removexattr, h, "user.none") == errno.ENODATA
    assert not (upper / "etc").exists()          # nothing to remove: no copy-up
    ovl.setxattr(h, "user.new", b"1")
    assert sorted(ovl.listxattr(h)) == ["user.new", "user.note"]
    ovl.removexattr(h, "user.note")
    assert ovl.listxattr(h) == ["user.new"]
    assert errno_of(ovl.setxattr, h, OVERRIDE_XATTR, b"0:0:777") == errno.EPERM


def test_open_unlinked_files_keep_working(ovl, upper):
    fh, a = ovl.create(ROOT_INO, "tmpfile", 0o600, os.O_RDWR, uid=0, gid=0)
    ovl.unlink(ROOT_INO, "tmpfile")
    assert ovl.write(fh, 0, b"still here") == 10
    assert ovl.read(fh, 0, 100) == b"still here"
    st = ovl.getattr(a.ino)
    assert st.size == 10 and st.nlink == 0
    ovl.setattr(a.ino, mode=0o644)
    assert stat.S_IMODE(ovl.getattr(a.ino).mode) == 0o644
    ovl.release(fh)
    assert errno_of(ovl.getattr, a.ino) == errno.ENOENT
    # a lower file opened, then deleted: still readable; changing it fails like overlayfs (EEXIST)
    h = ino(ovl, "etc/hostname")
    rfh = ovl.open(h, os.O_RDONLY)
    ovl.unlink(ino(ovl, "etc"), "hostname")
    assert ovl.read(rfh, 0, 10) == b"box\n"
    assert errno_of(ovl.setattr, h, mode=0o600) == errno.EEXIST
    ovl.release(rfh)


def test_errors(ovl):
    etc = ino(ovl, "etc")
    assert errno_of(ovl.mkdir, etc, "hostname", 0o755, uid=0, gid=0) == errno.EEXIST
    assert errno_of(ovl.unlink, etc, "sub") == errno.EISDIR
    assert errno_of(ovl.rmdir, etc, "hostname") == errno.ENOTDIR
    assert errno_of(ovl.unlink, etc, "nothing") == errno.ENOENT
    assert errno_of(ovl.lookup, ino(ovl, "etc/hostname"), "x") == errno.ENOTDIR
    assert errno_of(ovl.open, etc, os.O_RDONLY) == errno.EISDIR
    assert errno_of(ovl.readlink, ino(ovl, "etc/hostname")) == errno.EINVAL


# --- persistence, locking, read-only, rootless -----------------------------------------------------

def test_remount_shows_earlier_changes(upper):
    o = Overlay(make_tree(), upper)
    write_file(o, "etc/hostname", b"v2")
    o.unlink(ino(o, "etc/sub"), "deep")
    o.rmdir(ino(o, "etc"), "sub")
    o.mkdir(ino(o, "etc"), "sub", 0o755, uid=0, gid=0)
    o.link(ino(o, "usr/su"), ino(o, "usr"), "su2")
    o.unlink(ino(o, "usr"), "h2")
    o.close()
    o = Overlay(make_tree(), upper)
    try:
        assert read_all(o, "etc/hostname") == b"v2"
        assert names(o, "etc/sub") == []
        assert names(o, "usr") == ["h1", "su", "su2"]
        a, b = o.lookup(ino(o, "usr"), "su"), o.lookup(ino(o, "usr"), "su2")
        assert a.ino == b.ino and a.nlink == 2
        assert o.getattr(ino(o, "etc")).nlink == 1
    finally:
        o.close()
    ro = Overlay(make_tree(), upper, read_only=True)
    assert read_all(ro, "etc/hostname") == b"v2"
    assert errno_of(ro.unlink, ino(ro, "etc"), "hostname") == errno.EROFS
    assert errno_of(ro.open, ino(ro, "etc/hostname"), os.O_WRONLY) == errno.EROFS


def test_one_mount_per_upper_and_work_leftovers_are_cleaned(upper):
    o = Overlay(make_tree(), upper)
    with pytest.raises(UpperInUse):
        Overlay(make_tree(), upper)
    o.close()
    work = Path(work_dir_for(upper))
    (work / "copyup-123-1").write_bytes(b"half")
    (work / "rm-1").mkdir()
    (work / "rm-1" / ".wh.x").touch()
    Overlay(make_tree(), upper).close()
    assert os.listdir(work) == []


def test_volatile_skips_syncs_and_marks_the_upper_until_a_clean_close(upper, monkeypatch):
    """-o volatile (kernel overlayfs's option): no fsync for copy-ups or fsync(2); the work dir carries a
    marker while mounted, removed by a clean close after a syncfs; a marker left by a crash is refused."""
    from layerfs.fs import overlay as ovlmod
    synced = []
    monkeypatch.setattr(ovlmod.os, "fsync", lambda fd: synced.append(("fsync", fd)))
    monkeypatch.setattr(ovlmod, "syncfs", lambda fd: synced.append(("syncfs", fd)))
    marker = Path(work_dir_for(upper)) / NOSYNC_MARKER
    o = Overlay(make_tree(), upper, volatile=True)
    assert marker.is_dir()
    n0 = len(synced)                        # the marker's own directory sync
    write_file(o, "etc/hostname", b"v2")    # a copy-up
    fh = o.open(ino(o, "etc/hostname"), os.O_WRONLY)
    o.fsync(fh)
    o.release(fh)
    assert synced[n0:] == []
    o.close()
    assert [k for k, _ in synced[n0:]] == ["syncfs", "fsync"] and not marker.exists()
    # a volatile mount that never closed (its process was killed): the upper is refused, marker named
    o = Overlay(make_tree(), upper, volatile=True)
    os.close(o._lock_fd)
    o._lock_fd = None
    with pytest.raises(UpperDirty) as e:
        Overlay(make_tree(), upper)
    assert e.value.filename == str(marker) and "volatile" in e.value.strerror
    marker.rmdir()                          # the user accepts the upper as it is
    o = Overlay(make_tree(), upper)
    assert read_all(o, "etc/hostname") == b"v2"
    n0 = len(synced)
    write_file(o, "etc/sub/deep", b"m")     # not volatile: the copy-up is synced before its rename
    assert synced[n0:] and not marker.exists()
    o.close()
    ro = Overlay(make_tree(), upper, read_only=True, volatile=True)
    assert not ro.volatile and not marker.exists()


def test_a_whiteout_beside_an_upper_entry_shows_the_upper_entry(upper):
    (upper / "etc" / "sub").mkdir(parents=True)
    (upper / "etc" / "sub" / "mine").write_bytes(b"m")
    (upper / "etc" / ".wh.sub").touch()
    (upper / "etc" / "hostname").write_bytes(b"up")
    (upper / "etc" / ".wh.hostname").touch()
    o = Overlay(make_tree(), upper)
    try:
        assert names(o, "etc/sub") == ["mine"]          # not merged with the lower sub (deep hidden)
        assert read_all(o, "etc/hostname") == b"up"
        o.unlink(ino(o, "etc"), "hostname")
        assert "hostname" not in names(o, "etc") and (upper / "etc/.wh.hostname").exists()
    finally:
        o.close()


def test_rootless_owner_mode_and_devices_go_to_the_override_xattr(upper, monkeypatch):
    def no_chown(*a, **kw):
        raise PermissionError(errno.EPERM, "not permitted")

    def no_devices(path, mode=0o600, device=0, **kw):
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise PermissionError(errno.EPERM, "not permitted")
        return real_mknod(path, mode, device)

    real_mknod = os.mknod
    monkeypatch.setattr(os, "lchown", no_chown)
    monkeypatch.setattr(os, "chown", no_chown)
    monkeypatch.setattr(os, "mknod", no_devices)
    o = Overlay(make_tree(), upper)
    o.euid = 1000      # act as a rootless daemon: keep its own access bits on the host
    try:
        a = o.setattr(ino(o, "usr/su"), mode=0o4511)       # the daemon keeps u+rw on the host
        assert (stat.S_IMODE(a.mode), a.uid, a.gid) == (0o4511, 0, 0)
        assert os.getxattr(upper / "usr/su", OVERRIDE_XATTR) == b"0:0:4511"
        assert stat.S_IMODE(os.stat(upper / "usr/su").st_mode) == 0o4711
        a = o.setattr(ino(o, "usr/su"), uid=1234)          # cannot chown on the host
        assert (a.uid, stat.S_IMODE(a.mode)) == (1234, 0o511)
        assert os.getxattr(upper / "usr/su", OVERRIDE_XATTR) == b"1234:0:0511"
        n = o.mknod(ROOT_INO, "tty", stat.S_IFCHR | 0o620, os.makedev(4, 1), uid=0, gid=5)
        assert stat.S_ISCHR(n.mode) and n.rdev == os.makedev(4, 1) and (n.uid, n.gid) == (0, 5)
        assert os.getxattr(upper / "tty", OVERRIDE_XATTR) == b"0:5:0620:c:4:1"
        assert stat.S_ISREG(os.lstat(upper / "tty").st_mode) and os.lstat(upper / "tty").st_size == 0
        d = o.lookup(ino(o, "dev"), "null")            # copy-up of a lower device
        o.setattr(d.ino, mode=0o600)
        assert os.getxattr(upper / "dev/null", OVERRIDE_XATTR) == b"0:0:0600:c:1:3"
        assert OVERRIDE_XATTR not in o.listxattr(d.ino)
        assert errno_of(o.getxattr, d.ino, OVERRIDE_XATTR) == errno.ENODATA
    finally:
        o.close()
    monkeypatch.undo()
    o = Overlay(make_tree(), upper)       # shown the same way after a remount
    try:
        n = o.lookup(ROOT_INO, "tty")
        assert stat.S_ISCHR(n.mode) and n.rdev == os.makedev(4, 1) and stat.S_IMODE(n.mode) == 0o620
        su = o.lookup(ino(o, "usr"), "su")
        assert (su.uid, stat.S_IMODE(su.mode)) == (1234, 0o511)
    finally:
        o.close()


# --- writable mounts through the CLI ---------------------------------------------------------------

def _cli(store, *args, check=True):
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(store.root), *args], capture_output=True,
                       text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_cli_writable_mounts_uppers_and_removal(tmp_path):
    from mounthelpers import put_image, require_fuse, track, watchdog
    from imagebuild import LayerBuilder, build_image
    from layerfs.mount import mounts, uppers_dir
    from layerfs.store import Store
    require_fuse()
    store = Store(tmp_path / "store")
    put_image(store, "docker.io/library/w:1",
              build_image([LayerBuilder().add_dir("etc").add_file("etc/motd", b"hi\n").build()]))
    m = tmp_path / "m"
    m.mkdir()
    with watchdog(60):
        _cli(store, "mount", "w:1", str(m))                 # writable by default, upper in the store
        [rec] = mounts(store)
        track(m, rec.pid)
        mid = Path(rec.upper).parent.name
        assert Path(rec.upper) == uppers_dir(store) / mid / "upper" and len(mid) == 12
        (m / "etc/motd").write_bytes(b"changed\n")
        os.unlink(m / "etc/motd")
        (m / "new").write_bytes(b"n")
        assert (Path(rec.upper) / "etc/.wh.motd").exists()
        assert rec.upper in _cli(store, "mounts").stdout
        _cli(store, "umount", str(m))
        assert (uppers_dir(store) / mid / "upper" / "new").exists()          # kept after unmounting
        # remounting with that upper shows the changes; a read-only view of it refuses new ones
        _cli(store, "mount", "--read-only", "--upper", rec.upper, "w:1", str(m))
        track(m, mounts(store)[0].pid)
        assert sorted(os.listdir(m)) == ["etc", "new"] and os.listdir(m / "etc") == []
        assert errno_of(os.unlink, m / "new") == errno.EROFS
        p = _cli(store, "rm", mid, check=False)
        assert p.returncode == 1 and "in use" in p.stderr
        _cli(store, "umount", str(m))
        _cli(store, "rm", mid)
        assert not (uppers_dir(store) / mid).exists()
        # --upper DIR: made if missing, kept by umount --rm; a second mount of one upper is refused
        up = tmp_path / "myupper"
        _cli(store, "mount", "--upper", str(up), "w:1", str(m))
        track(m, mounts(store)[0].pid)
        (m / "x").write_bytes(b"x")
        m2 = tmp_path / "m2"
        m2.mkdir()
        p = _cli(store, "mount", "--upper", str(up), "w:1", str(m2), check=False)
        assert p.returncode == 1 and "in use" in p.stderr
        p = _cli(store, "umount", "--rm", str(m))
        assert "kept" in p.stderr and (up / "x").read_bytes() == b"x"
        assert (tmp_path / ".myupper.work").is_dir()
        # umount --rm deletes a store upper
        _cli(store, "mount", "w:1", str(m))
        [rec] = mounts(store)
        track(m, rec.pid)
        _cli(store, "umount", "--rm", str(m))
        assert not Path(rec.upper).exists() and list(uppers_dir(store).iterdir()) == []
        assert mounts(store) == []


def test_cli_volatile_mount_and_an_upper_left_by_a_killed_one(tmp_path):
    import signal
    from mounthelpers import force_unmount, put_image, require_fuse, track, wait_until, watchdog
    from imagebuild import LayerBuilder, build_image
    from layerfs.mount import mounts
    from layerfs.store import Store
    require_fuse()
    store = Store(tmp_path / "store")
    put_image(store, "docker.io/library/v:1",
              build_image([LayerBuilder().add_dir("etc").add_file("etc/motd", b"hi\n").build()]))
    m, up = tmp_path / "m", tmp_path / "up"
    m.mkdir()
    marker = tmp_path / ".up.work" / "volatile"
    with watchdog(60):
        p = _cli(store, "mount", "--read-only", "-o", "volatile", "v:1", str(m), check=False)
        assert p.returncode == 2 and "volatile" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        _cli(store, "mount", "-o", "volatile", "--upper", str(up), "v:1", str(m))
        [rec] = mounts(store)
        track(m, rec.pid)
        assert marker.is_dir()
        with open(m / "etc/motd", "a") as f:       # a copy-up, and an fsync that does nothing
            f.write("more\n")
            os.fsync(f.fileno())
        _cli(store, "umount", str(m))               # a clean end: everything synced, the marker gone
        assert not marker.exists() and (up / "etc/motd").read_bytes() == b"hi\nmore\n"
        _cli(store, "mount", "-o", "volatile", "--upper", str(up), "v:1", str(m))
        [rec] = mounts(store)
        track(m, rec.pid)
        (m / "new").write_bytes(b"n")
        os.kill(rec.pid, signal.SIGKILL)            # a crash: what was not synced may be lost
        assert wait_until(lambda: not os.path.exists(f"/proc/{rec.pid}"), 10)
        force_unmount(m)
        p = _cli(store, "mount", "--upper", str(up), "v:1", str(m), check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "-o volatile" in p.stderr and str(marker) in p.stderr
        marker.rmdir()                              # the user keeps the upper as it is
        _cli(store, "mount", "--upper", str(up), "v:1", str(m))
        track(m, mounts(store)[0].pid)
        assert (m / "etc/motd").read_bytes() == b"hi\nmore\n"
        _cli(store, "umount", str(m))


# --- whiteouts of long names ---------------------------------------------------------------------------

LONG = ["a".ljust(255, "a"), "b".ljust(255, "b"), "c".ljust(252, "c"), "d".ljust(255, "d"), "e".ljust(251, "e")]


def long_tree() -> MergedTree:
    t = make_tree()
    d = t.add(ROOT_INO, "long", stat.S_IFDIR | 0o755, mtime_ns=MTIME_NS)
    for name in LONG[:3] + LONG[4:]:
        t.add(d.ino, name, stat.S_IFREG | 0o644, inline=name[:1].encode(), size=1, mtime_ns=MTIME_NS)
    sub = t.add(d.ino, LONG[3], stat.S_IFDIR | 0o755, mtime_ns=MTIME_NS)
    t.add(sub.ino, "x", stat.S_IFREG | 0o644, inline=b"x", size=1, mtime_ns=MTIME_NS)
    fix_dir_nlinks(t)
    return t


def _remove_long_names(o: Overlay) -> None:
    lo = ino(o, "long")
    o.unlink(lo, LONG[0])                                  # a lower file
    o.rename(lo, LONG[1], lo, "short")                     # moved away: its name needs a whiteout
    o.unlink(ino(o, f"long/{LONG[3]}"), "x")
    o.rmdir(lo, LONG[3])                                   # a lower directory
    o.unlink(lo, LONG[4])                                  # 251 bytes: ".wh." still fits
    o.unlink(lo, LONG[2])
    fh, _ = o.create(lo, LONG[2], 0o600, os.O_WRONLY, uid=0, gid=0)     # again, over its whiteout
    o.write(fh, 0, b"new")
    o.release(fh)


@pytest.mark.skipif(os.geteuid() != 0, reason="device whiteouts need CAP_MKNOD")
def test_long_name_whiteouts_are_devices_as_root(upper):
    o = Overlay(long_tree(), upper)
    try:
        _remove_long_names(o)
        assert names(o, "long") == sorted(["short", LONG[2]])
    finally:
        o.close()
    host = upper / "long"
    kinds = {n: stat.S_IFMT(os.lstat(host / n).st_mode) for n in os.listdir(host)}
    assert kinds == {LONG[0]: stat.S_IFCHR, LONG[1]: stat.S_IFCHR, LONG[3]: stat.S_IFCHR, "short": stat.S_IFREG,
                     LONG[2]: stat.S_IFREG, ".wh." + LONG[4]: stat.S_IFREG}
    assert all(os.lstat(host / n).st_rdev == 0 for n, k in kinds.items() if k == stat.S_IFCHR)
    assert not os.listdir(work_dir_for(upper))
    o = Overlay(long_tree(), upper)          # remounted: the same view
    try:
        assert names(o, "long") == sorted(["short", LONG[2]])
        assert read_all(o, f"long/{LONG[2]}") == b"new"
        o.mkdir(ino(o, "long"), LONG[3], 0o755, uid=0, gid=0)       # over a device whiteout: opaque
        assert names(o, f"long/{LONG[3]}") == []
        assert os.listdir(host / LONG[3]) == [OPAQUE_MARKER]
    finally:
        o.close()


def test_long_name_whiteouts_without_devices_are_recorded_in_an_xattr(upper, monkeypatch):
    """Without CAP_MKNOD (rootless), a whiteout of a name too long for ".wh." is listed in the parent's
    user.layerfs.whiteouts; it hides the lower entry only, survives a remount, and goes when the name
    is created again."""
    real_mknod = os.mknod

    def no_devices(path, mode=0o600, device=0, **kw):
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise PermissionError(errno.EPERM, "not permitted")
        return real_mknod(path, mode, device, **kw)

    monkeypatch.setattr(os, "mknod", no_devices)
    o = Overlay(long_tree(), upper)
    try:
        _remove_long_names(o)
        assert names(o, "long") == sorted(["short", LONG[2]])
        assert WHITEOUTS_XATTR not in o.listxattr(ino(o, "long"))
    finally:
        o.close()
    monkeypatch.undo()
    host = upper / "long"
    recorded = os.getxattr(host, WHITEOUTS_XATTR).split(b"/")
    assert sorted(recorded) == sorted(n.encode() for n in (LONG[0], LONG[1], LONG[3]))
    assert sorted(os.listdir(host)) == sorted(["short", LONG[2], ".wh." + LONG[4]])
    o = Overlay(long_tree(), upper)
    try:
        assert names(o, "long") == sorted(["short", LONG[2]])
        o.rename(ino(o, "long"), "short", ino(o, "long"), LONG[1])     # back: its record entry goes
        assert names(o, "long") == sorted([LONG[1], LONG[2]])
        assert read_all(o, f"long/{LONG[1]}") == b"b"
    finally:
        o.close()
    assert sorted(os.getxattr(host, WHITEOUTS_XATTR).split(b"/")) == sorted(n.encode() for n in (LONG[0], LONG[3]))



def test_index_mount_option_parsing():
    from layerfs.errors import UsageError
    from layerfs.mount import MountOptions
    on = MountOptions(read_only=False, fuse_options=["allow_other", "index=on"])
    assert on.index and on.libfuse_options == ("allow_other",)
    assert not MountOptions(read_only=False).index
    assert not MountOptions(read_only=False, fuse_options=["index=on", "index=off"]).index
    with pytest.raises(UsageError, match="index=on or index=off"):
        MountOptions(read_only=False, fuse_options=["index=yes"])


def test_an_upper_in_the_earlier_format_mounts_and_diffs_as_before(upper):
    """An upper written before long-name whiteouts existed (only ``.wh.`` files, ``.wh..wh..opq``,
    the override xattr, work-dir leftovers with the earlier temporary names) is served unchanged."""
    from layerfs.changes import diff, scan_upper
    (upper / "etc" / "sub").mkdir(parents=True)
    (upper / "etc" / ".wh.hostname").touch()                  # deleted lower file
    (upper / "etc" / "sub" / ".wh..wh..opq").touch()          # re-created lower directory, opaque
    (upper / "etc" / "sub" / "fresh").write_bytes(b"new")
    (upper / "usr").mkdir()
    (upper / "usr" / "su").write_bytes(b"#!changed")
    os.setxattr(upper / "usr" / "su", OVERRIDE_XATTR, b"0:0:4755")
    work = Path(work_dir_for(upper))
    work.mkdir()
    (work / "copyup-99-1").write_bytes(b"half")               # an earlier version's temporary
    o = Overlay(make_tree(), upper)
    try:
        assert names(o, "etc") == ["big", "motd", "sub"]
        assert names(o, "etc/sub") == ["fresh"]
        assert read_all(o, "usr/su") == b"#!changed"
        a = o.getattr(ino(o, "usr/su"))
        assert (a.uid, a.gid, stat.S_IMODE(a.mode)) == (0, 0, 0o4755)
        o.unlink(ino(o, "etc"), "motd")                       # new whiteouts of short names: still .wh. files
        assert (upper / "etc" / ".wh.motd").is_file()
    finally:
        o.close()
    assert os.listdir(work) == []
    got = {str(c) for c in diff(make_tree(), scan_upper(upper))}
    assert got == {"C /etc", "C /etc/sub", "C /usr", "C /usr/su", "D /etc/hostname", "D /etc/motd",
                   "D /etc/sub/deep", "A /etc/sub/fresh"}, sorted(got)


def test_malformed_override_values_are_ignored_whole(upper, caplog):
    """An override value that breaks the format counts for nothing (layerfs.fs.upper's one rule): the entry
    shows its real owner, mode and type, with a warning; a well-formed neighbour still applies; a file type
    on a directory is malformed too; ``.wh.`` names that are no whiteout (a directory, AUFS metadata) hide nothing."""
    (upper / "usr").mkdir(parents=True)
    (upper / "usr" / "su").write_bytes(b"#!")
    os.chmod(upper / "usr" / "su", 0o640)
    os.setxattr(upper / "usr" / "su", OVERRIDE_XATTR, b"0:0:17777")       # mode out of range
    (upper / "usr" / "ok").write_bytes(b"")
    os.setxattr(upper / "usr" / "ok", OVERRIDE_XATTR, b"7:8:4711")
    (upper / "etc").mkdir()
    os.chmod(upper / "etc", 0o751)
    os.setxattr(upper / "etc", OVERRIDE_XATTR, b"0:0:0600:c:1:3")        # a device type on a directory
    (upper / "etc" / ".wh.sub").mkdir()                                    # not a regular file: no whiteout
    (upper / "etc" / ".wh..wh.plnk").touch()                              # AUFS metadata: no whiteout
    me = os.stat(upper)
    with caplog.at_level(logging.WARNING, logger="layerfs.fs.upper"):
        o = Overlay(make_tree(), upper)
        try:
            su, ok, etc = (o.getattr(ino(o, p)) for p in ("usr/su", "usr/ok", "etc"))
            assert (su.uid, su.gid, su.mode) == (me.st_uid, me.st_gid, stat.S_IFREG | 0o640)
            assert (ok.uid, ok.gid, ok.mode) == (7, 8, stat.S_IFREG | 0o4711)
            assert (etc.uid, etc.gid, etc.mode) == (me.st_uid, me.st_gid, stat.S_IFDIR | 0o751)
            assert names(o, "etc") == ["big", "hostname", "motd", "sub"]
        finally:
            o.close()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all(OVERRIDE_XATTR in w for w in warned)
    assert any("'su'" in w for w in warned) and any("'etc'" in w for w in warned)
