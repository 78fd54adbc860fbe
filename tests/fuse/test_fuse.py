"""Real FUSE mounts of hand-built trees (layerfs.fuse.readonly) and the mount lifecycle (layerfs.mount.daemon, CLI).

Every test that mounts unmounts in its teardown (fusermount3 -u, umount -l
as a last resort) and kills the daemon it started; a FUSE call that hangs is
ended by the watchdog (mount daemons SIGKILLed), so it fails one test
instead of hanging the run. Without FUSE the tests skip, except under
CI=true where they fail.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mounthelpers import (MTIME_NS, Sample, is_mounted, mounted, put_fake_image, put_image,
                          require_fuse, track, wait_until, watchdog)
from layerfs.errors import UsageError
from layerfs.mount import (FSTYPE, MountError, MountOptions, MountRecord, MountTable, mount_image, kernel_mounts,
    mount_tree, mounts, umount)
from layerfs.libc import pid_alive
from layerfs.store import Store
from layerfs.fs import ROOT_INO

REPO = Path(__file__).resolve().parents[2]
SLOW_DELAY = 0.25      # seconds per read of the "slow" layer
WATCHDOG = 30.0


@pytest.fixture(autouse=True)
def _watchdog():
    with watchdog(WATCHDOG):
        yield


@pytest.fixture(scope="module")
def sample() -> Sample:
    return Sample(slow_delay=SLOW_DELAY)


@pytest.fixture(scope="module")
def mnt(sample, tmp_path_factory) -> Path:
    """One daemonised mount of the sample tree shared by the read-only checks of this module."""
    require_fuse()
    base = tmp_path_factory.mktemp("sample")
    with mounted(sample.tree, base / "mnt", Store(base / "store"), image="sample/tree:1") as rec:
        assert rec.pid != os.getpid() and pid_alive(rec.pid)
        yield base / "mnt"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def _expected_size(node) -> int:
    if stat.S_ISLNK(node.mode):
        return len(os.fsencode(node.target))
    return node.size


# --- attributes ------------------------------------------------------------------------------

def test_every_attribute_matches_the_tree(sample, mnt):
    seen = 0
    for path, node in sample.tree.walk():
        st = os.lstat(mnt / path)
        where = f"{path}: "
        assert st.st_ino == node.ino, where + "inode"
        assert st.st_mode == node.mode, where + f"mode {oct(st.st_mode)} != {oct(node.mode)}"
        assert (st.st_uid, st.st_gid) == (node.uid, node.gid), where + "owner"
        assert st.st_size == _expected_size(node), where + "size"
        assert st.st_mtime_ns == node.mtime_ns, where + "mtime"
        assert st.st_atime_ns == st.st_ctime_ns == node.mtime_ns, where + "atime/ctime"
        assert st.st_nlink == node.nlink, where + "nlink"
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st.st_rdev == node.rdev, where + "rdev"
        if stat.S_ISREG(node.mode):
            data = node.size if node.sparse is None else sum(e[1] for e in node.sparse)
            assert st.st_blocks == (data + 511) // 512, where + "blocks"
        seen += 1
    # every node but the root (and the unused slot 0) by each of its names: the hard link has two more
    assert seen == len(sample.tree.nodes) - 2 + 2


def test_root_and_directory_link_counts(sample, mnt):
    st = os.stat(mnt)
    root = sample.tree.nodes[ROOT_INO]
    assert st.st_ino == ROOT_INO
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    subdirs = sum(1 for p in mnt.iterdir() if p.is_dir() and not p.is_symlink())
    assert st.st_nlink == root.nlink == 2 + subdirs
    assert st.st_mtime_ns == MTIME_NS


def test_setuid_setgid_sticky_bits(mnt):
    assert stat.S_IMODE(os.lstat(mnt / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(mnt / "bin/wall").st_mode) == 0o2755
    assert stat.S_IMODE(os.lstat(mnt / "bin/both").st_mode) == 0o6711
    tmp = os.lstat(mnt / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mode & stat.S_ISVTX
    sub = os.lstat(mnt / "tmp/sticky-sub")
    assert stat.S_IMODE(sub.st_mode) == 0o3775 and (sub.st_uid, sub.st_gid) == (7, 8)


def test_devices_fifos_sockets(mnt, tmp_path):
    null, sda, bigdev = (os.lstat(mnt / "dev" / n) for n in ("null", "sda", "bigdev"))
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_ISCHR(bigdev.st_mode) and (os.major(bigdev.st_rdev), os.minor(bigdev.st_rdev)) == (4000, 70000)
    assert stat.S_ISFIFO(os.lstat(mnt / "dev/fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(mnt / "dev/sock").st_mode)
    # the rdev is what mknod(2) with the same numbers gives (where this container may create devices)
    for name, st in (("null", null), ("bigdev", bigdev)):
        try:
            os.mknod(tmp_path / name, stat.S_IFCHR | 0o600, os.makedev(os.major(st.st_rdev), os.minor(st.st_rdev)))
        except PermissionError:
            continue
        assert os.lstat(tmp_path / name).st_rdev == st.st_rdev


def test_hard_links_share_the_inode(sample, mnt):
    names = [mnt / "bin/hard1", mnt / "bin/hard2", mnt / "etc/hard3"]
    sts = [os.lstat(p) for p in names]
    assert {s.st_ino for s in sts} == {sample.hard_ino}
    assert all(s.st_nlink == 3 for s in sts)
    assert all(p.read_bytes() == b"same inode\n" for p in names)
    assert os.path.samefile(names[0], names[2])


def test_symlinks_and_undecodable_names(mnt):
    assert os.readlink(mnt / "etc/motd") == "../usr/share/motd"
    assert (mnt / "etc/motd").read_bytes() == b"welcome\n"          # followed by the kernel, inside the mount
    names = os.listdir(os.fsencode(mnt / "etc"))
    assert b"bad-\xff-name" in names and "ümlaut-ß".encode() in names
    assert os.readlink(os.path.join(os.fsencode(mnt / "etc"), b"bad-\xff-name")) == b"target-\xfe"
    assert os.lstat(mnt / "etc/bad-\udcff-name").st_size == len(b"target-\xfe")
    with pytest.raises(OSError) as e:
        os.readlink(mnt / "etc/hostname")
    assert e.value.errno == errno.EINVAL


def test_directory_listings(sample, mnt):
    for path, node in [("", sample.tree.nodes[ROOT_INO])] + list(sample.tree.walk()):
        if node.children is None:
            continue
        assert os.listdir(mnt / path) == list(node.children), path
    with os.scandir(mnt / "dev") as it:
        kinds = {e.name: (e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file(follow_symlinks=False))
                 for e in it}
    assert kinds["null"][1:] == (False, False, False)
    etc = {e.name: e for e in os.scandir(mnt / "etc")}
    assert etc["motd"].is_symlink() and etc["hostname"].is_file(follow_symlinks=False)
    assert etc["hard3"].inode() == sample.hard_ino
    listing = subprocess.run(["ls", "-a", str(mnt / "many")], capture_output=True, text=True, check=True).stdout
    lines = listing.split()
    assert lines[:2] == [".", ".."] and len(lines) == 1502


def test_find_prints_every_entry_like_the_tree(sample, mnt):
    out = subprocess.run(["find", str(mnt), "-mindepth", "1", "-printf", r"%P\0%s\0%m\0%U\0%G\0%y\0%l\0%n\n"],
                         capture_output=True, check=True).stdout
    got = sorted(out.splitlines())
    want = []
    for path, node in sample.tree.walk():
        kind = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
                stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}[stat.S_IFMT(node.mode)]
        fields = [os.fsencode(path), str(_expected_size(node)).encode(), f"{stat.S_IMODE(node.mode):o}".encode(),
                  str(node.uid).encode(), str(node.gid).encode(), kind.encode(),
                  os.fsencode(node.target or ""), str(node.nlink).encode()]
        want.append(b"\0".join(fields))
    assert got == sorted(want)


def test_xattrs(mnt):
    f = mnt / "usr/share/xattrs"
    assert sorted(os.listxattr(f)) == ["security.capability", "user.binary", "user.comment"]
    assert os.getxattr(f, "user.comment") == b"hello"
    assert os.getxattr(f, "user.binary") == bytes(range(256))
    assert os.getxattr(f, "security.capability") == b"\x01\x00\x00\x02" + bytes(16)
    for path, name in ((f, "user.missing"), (mnt / "etc/hostname", "user.comment")):
        with pytest.raises(OSError) as e:
            os.getxattr(path, name)
        assert e.value.errno == errno.ENODATA
    assert os.listxattr(mnt / "etc/hostname") == []
    assert os.listxattr(mnt / "etc/motd", follow_symlinks=False) == []


def test_statfs(sample, mnt):
    sv = os.statvfs(mnt)
    facts = sample.tree.statfs()
    assert sv.f_bsize == sv.f_frsize == 4096
    assert sv.f_blocks == (facts.total_bytes + 4095) // 4096
    assert sv.f_files == facts.total_files
    assert sv.f_bfree == sv.f_bavail == sv.f_ffree == 0
    assert sv.f_namemax == 255
    assert sv.f_flag & os.ST_RDONLY
    df = subprocess.run(["df", "--output=source,fstype", str(mnt)], capture_output=True, text=True, check=True)
    assert df.stdout.split()[-2:] == ["sample/tree:1", FSTYPE]


def test_kernel_mounts_entry(mnt):
    fstype, source = kernel_mounts()[str(mnt)]
    assert (fstype, source) == (FSTYPE, "sample/tree:1")


# --- reading ------------------------------------------------------------------------------

def test_read_whole_files(sample, mnt):
    assert (mnt / "bin/big").read_bytes() == sample.big
    assert (mnt / "etc/hostname").read_bytes() == sample.small
    assert (mnt / "etc/inline.conf").read_bytes() == b"abcde"
    assert (mnt / "etc/empty").read_bytes() == b""
    assert (mnt / "usr/share/zeros").read_bytes() == bytes(100_000)
    assert (mnt / "usr/share/sparse").read_bytes() == sample.sparse_expected


def test_read_at_random_offsets(sample, mnt):
    rnd = random.Random(42)
    size = len(sample.big)
    fd = os.open(mnt / "bin/big", os.O_RDONLY)
    try:
        for _ in range(300):
            off = rnd.randrange(size + 10)
            n = rnd.choice((1, 7, 4096, 65536, 131072 + 3, 1 << 20, 3 << 20))
            assert os.pread(fd, n, off) == sample.big[off:off + n], (off, n)
        assert os.pread(fd, 100, size) == b""
        assert os.pread(fd, 100, size - 1) == sample.big[-1:]
    finally:
        os.close(fd)
    fd = os.open(mnt / "usr/share/sparse", os.O_RDONLY)
    try:
        exp = sample.sparse_expected
        for off in (0, 2999, 3000, 4000, 6999, 7000, 11999, len(exp)):
            assert os.pread(fd, 2000, off) == exp[off:off + 2000], off
    finally:
        os.close(fd)


def test_concurrent_readers_get_the_right_bytes(sample, mnt):
    rnd = random.Random(7)
    jobs = [(rnd.randrange(len(sample.big)), rnd.randrange(1, 1 << 20)) for _ in range(200)]

    def check(job):
        off, n = job
        with open(mnt / "bin/big", "rb", buffering=0) as f:
            f.seek(off)
            return f.read(n) == sample.big[off:off + n]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, jobs))


def test_blocking_reads_overlap(sample, mnt):
    """Each read of the slow layer blocks SLOW_DELAY s in the daemon: served one by one, 8 files take 8x that."""
    def read(i):
        return (mnt / f"slow/f{i}").read_bytes() == sample.slow_data[i]

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, range(8)))
    elapsed = time.monotonic() - t0
    assert elapsed < 8 * SLOW_DELAY / 2, f"reads did not overlap: {elapsed:.2f}s for 8 reads of {SLOW_DELAY}s"


# --- errors --------------------------------------------------------------------------------

def _errno_of(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def test_every_write_is_erofs(mnt):
    f, d = mnt / "etc/hostname", mnt / "etc"
    attempts = [
        (open, f, "wb"), (open, f, "ab"), (open, f, "r+b"), (open, d / "new", "wb"),
        (os.open, f, os.O_RDONLY | os.O_TRUNC), (os.mkdir, d / "newdir"), (os.rmdir, mnt / "tmp/sticky-sub"),
        (os.unlink, f), (os.rename, f, d / "renamed"), (os.symlink, "x", d / "sym"), (os.link, f, d / "lnk"),
        (os.chmod, f, 0o600), (os.chown, f, 1, 1), (os.utime, f, (1, 1)), (os.truncate, f, 0),
        (os.setxattr, f, "user.x", b"1"), (os.removexattr, mnt / "usr/share/xattrs", "user.comment"),
        (os.mknod, d / "node", stat.S_IFIFO | 0o600),
    ]
    for fn, *args in attempts:
        assert _errno_of(fn, *args) == errno.EROFS, (fn.__name__, args)
    assert (mnt / "etc/hostname").read_bytes() == b"hello, layerfs\n"


def test_missing_names_and_wrong_types(mnt):
    for _ in range(2):   # the second answer comes from the kernel's negative dentry
        assert _errno_of(os.stat, mnt / "no-such-file") == errno.ENOENT
    assert _errno_of(os.stat, mnt / "etc/no/deeper") == errno.ENOENT
    assert _errno_of(os.listdir, mnt / "etc/hostname") == errno.ENOTDIR
    assert _errno_of(os.stat, mnt / "etc/hostname/x") == errno.ENOTDIR
    assert _errno_of(open, mnt / "etc", "rb") == errno.EISDIR
    assert _errno_of(os.getxattr, mnt / "nothing", "user.x") == errno.ENOENT
    assert os.access(mnt / "etc/hostname", os.R_OK) and not os.access(mnt / "etc/hostname", os.W_OK)


def test_a_failing_read_or_bad_node_fails_one_request_not_the_mount(store, tmp_path):
    require_fuse()
    from layerfs.errors import ContentError
    from layerfs.fs import MergedTree

    class Broken:
        def read(self, offset, size):
            if offset == 0:
                raise ContentError("corrupt span")
            raise ValueError("a bug")

    t = MergedTree([Broken()])
    t.add(ROOT_INO, "corrupt", stat.S_IFREG | 0o644, size=10, layer=0, offset=0)
    t.add(ROOT_INO, "buggy", stat.S_IFREG | 0o644, size=10, layer=0, offset=5)
    t.add(ROOT_INO, "bad-node", stat.S_IFREG | 0o644, size=1, inline=b"x").mtime_ns = None
    t.add(ROOT_INO, "fine", stat.S_IFREG | 0o644, size=2, inline=b"ok")
    with mounted(t, tmp_path / "m", store) as rec:
        m = tmp_path / "m"
        assert _errno_of((m / "corrupt").read_bytes) == errno.EIO
        assert _errno_of((m / "buggy").read_bytes) == errno.EIO
        assert _errno_of(os.stat, m / "bad-node") == errno.EIO
        assert (m / "fine").read_bytes() == b"ok" and pid_alive(rec.pid)
    log = Path(rec.log).read_text()
    assert "corrupt span" in log and "ValueError: a bug" in log


# --- lifecycle -----------------------------------------------------------------------------

def _tiny_tree():
    from layerfs.fs import MergedTree
    t = MergedTree()
    t.add(ROOT_INO, "hello", stat.S_IFREG | 0o644, inline=b"hi\n", size=3)
    return t


def test_daemon_mount_lists_and_unmounts(store, tmp_path):
    require_fuse()
    m = tmp_path / "m"
    m.mkdir()
    rec = mount_tree(_tiny_tree(), m, MountOptions(), store=store, image="tiny:1", manifest_digest="sha256:" + "1" * 64)
    track(m, rec.pid)
    # returned only once the mount answers
    assert (m / "hello").read_bytes() == b"hi\n"
    assert pid_alive(rec.pid) and rec.pid != os.getpid()
    assert rec.mountpoint == str(m.resolve()) and rec.upper is None and rec.started.endswith("Z")
    [listed] = mounts(store)
    assert listed == rec
    out = _cli(store, "mounts").stdout.splitlines()
    assert out[0].split() == ["IMAGE", "MOUNTPOINT", "PID", "STATE", "UPPER"]
    assert out[1].split() == ["tiny:1", str(m.resolve()), str(rec.pid), "running", "<none>"]
    doc = json.loads(_cli(store, "mounts", "--format", "json").stdout)
    assert doc["pid"] == rec.pid and doc["state"] == "running"
    assert "mounted tiny:1" in Path(rec.log).read_text()

    assert umount(store, m) == rec
    assert not pid_alive(rec.pid)
    assert not is_mounted(m) and os.listdir(m) == []
    assert mounts(store) == [] and not MountTable(store).record_path(rec.mountpoint).exists()


def test_sigterm_unmounts_cleanly_even_with_a_file_open(store, tmp_path):
    require_fuse()
    m = tmp_path / "m"
    m.mkdir()
    rec = mount_tree(_tiny_tree(), m, MountOptions(), store=store, image="tiny:1")
    track(m, rec.pid)
    f = open(m / "hello", "rb")
    try:
        os.kill(rec.pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(rec.pid) and not is_mounted(m))
    finally:
        try:
            f.close()   # the daemon is gone: the kernel may fail the FLUSH of this close
        except OSError as e:
            assert e.errno == errno.ENOTCONN
    assert mounts(store) == []
    assert os.listdir(m) == []
    assert "SIGTERM" in Path(rec.log).read_text()


def test_stale_records_are_cleaned(store, tmp_path):
    reg = MountTable(store)
    reg.dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid, mp in ((dead.pid, tmp_path / "gone"), (os.getpid(), tmp_path / "not-mounted")):
        reg.write(MountRecord(image="x:1", manifest_digest="", mountpoint=str(mp), pid=pid, upper=None,
                              started="2024-01-01T00:00:00Z"))
    (reg.dir / "junk.json").write_text("{not json")
    assert mounts(store) == []
    assert list(reg.dir.glob("*.json")) == []


def test_dead_mount_is_listed_until_umount_cleans_it_up(store, tmp_path):
    """A daemon killed with SIGKILL leaves its mount point mounted but dead (ENOTCONN): ``mounts``
    lists it as dead (beside a running one), and ``umount --rm`` detaches it, drops its record
    and deletes its upper; the mount point is a plain directory again. Until then, ``diff`` and
    ``commit`` read its upper."""
    require_fuse()
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    dead, alive = tmp_path / "dead", tmp_path / "alive"
    _cli(store, "mount", "two:1", str(dead))                       # writable: an upper in the store
    [rec] = mounts(store)
    track(dead, rec.pid)
    _cli(store, "mount", "--read-only", "two:1", str(alive))
    other = next(r for r in mounts(store) if r.mountpoint == str(alive.resolve()))
    track(alive, other.pid)
    (dead / "etc/new").write_bytes(b"new\n")
    os.kill(rec.pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(rec.pid))
    assert _errno_of(os.listdir, dead) in (errno.ENOTCONN, errno.ECONNABORTED)
    assert _errno_of(os.stat, dead / "etc/new") == errno.ENOTCONN
    assert is_mounted(dead) and MountTable(store).get(rec.mountpoint) == rec
    # listed with its state (table, json, -q), not hidden; the running mount is unaffected
    assert [r.pid for r in mounts(store)] == [other.pid]
    out = _cli(store, "mounts").stdout.splitlines()
    assert out[0].split() == ["IMAGE", "MOUNTPOINT", "PID", "STATE", "UPPER"]
    assert sorted(line.split() for line in out[1:]) == sorted([
        ["two:1", rec.mountpoint, str(rec.pid), "dead", rec.upper],
        ["two:1", other.mountpoint, str(other.pid), "running", "<none>"]])
    docs = {d["mountpoint"]: d for d in map(json.loads, _cli(store, "mounts", "--format", "json").stdout.splitlines())}
    assert (docs[rec.mountpoint]["state"], docs[other.mountpoint]["state"]) == ("dead", "running")
    assert docs[rec.mountpoint]["upper"] == rec.upper
    assert sorted(_cli(store, "mounts", "-q").stdout.split()) == sorted([rec.mountpoint, other.mountpoint])
    # its upper is intact: diff and commit still work on it
    assert _cli(store, "diff", str(dead)).stdout.split() == ["C", "/etc", "A", "/etc/new"]
    _cli(store, "commit", str(dead), "two:saved")
    saved = tmp_path / "saved"
    _cli(store, "mount", "--read-only", "two:saved", str(saved))
    track(saved, next(r.pid for r in mounts(store) if r.mountpoint == str(saved.resolve())))
    assert (saved / "etc/new").read_bytes() == b"new\n"
    _cli(store, "umount", str(saved))
    # mounting over it says what it is; umount cleans it up (the record names the upper to remove)
    p = _cli(store, "mount", "two:1", str(dead), check=False)
    assert p.returncode == 1 and "dead FUSE mount" in p.stderr and "layerfs umount" in p.stderr
    assert Path(rec.upper, "etc/new").read_bytes() == b"new\n"
    _cli(store, "umount", "--rm", str(dead))
    assert not is_mounted(dead) and os.listdir(dead) == []
    (dead / "plain").write_bytes(b"x")                            # an ordinary directory again
    assert os.listdir(dead) == ["plain"]
    assert not Path(rec.upper).exists() and not MountTable(store).record_path(rec.mountpoint).exists()
    assert _cli(store, "mounts", "-q").stdout.split() == [other.mountpoint]
    _cli(store, "umount", str(alive))
    assert _cli(store, "mounts").stdout.split() == ["IMAGE", "MOUNTPOINT", "PID", "STATE", "UPPER"]


def test_mountpoint_errors(store, tmp_path):
    require_fuse()
    tree = _tiny_tree()

    def fails(path, **kw) -> str:
        with pytest.raises(MountError) as e:
            mount_tree(tree, path, MountOptions(**kw), store=store, image="tiny:1")
        return e.value.one_line()

    assert "does not exist" in fails(tmp_path / "missing" / "deeper")
    # a missing last component is created, as docker does for bind mounts
    created = tmp_path / "created"
    rec = mount_tree(tree, created, MountOptions(), store=store, image="tiny:1")
    try:
        assert created.is_dir() and os.path.ismount(created)
    finally:
        umount(store, created)
    (tmp_path / "file").write_text("x")
    assert "not a directory" in fails(tmp_path / "file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    msg = fails(full)
    assert "not empty" in msg and "nonempty" in msg
    # -o nonempty: mounts over it (hiding it) and gives it back unchanged
    rec = mount_tree(tree, full, MountOptions(fuse_options=["nonempty"]), store=store, image="tiny:1")
    track(full, rec.pid)
    assert os.listdir(full) == ["hello"]
    assert "already mounted" in fails(full, fuse_options=["nonempty"])
    umount(store, full)
    assert (full / "keep").read_text() == "mine"
    assert mounts(store) == []


def test_bad_fuse_option_is_one_clear_error(store, tmp_path):
    require_fuse()
    m = tmp_path / "m"
    m.mkdir()
    with pytest.raises(MountError) as e:
        mount_tree(_tiny_tree(), m, MountOptions(fuse_options=["no_such_option"]), store=store, image="tiny:1")
    msg = e.value.one_line()
    assert "unknown option" in msg and "no_such_option" in msg and "\n" not in msg
    assert not is_mounted(m) and mounts(store) == []
    with pytest.raises(UsageError):
        MountOptions(read_only=False, fuse_options=["ro"])
    with pytest.raises(UsageError):
        MountOptions(fuse_options=["allow_other", "rw"])
    with pytest.raises(UsageError):
        MountOptions(layer=-1)


def test_umount_errors(store, tmp_path):
    require_fuse()
    with pytest.raises(MountError, match="not a layerfs mount"):
        umount(store, tmp_path)
    m = tmp_path / "m"
    m.mkdir()
    rec = mount_tree(_tiny_tree(), m, MountOptions(), store=store, image="tiny:1")
    track(m, rec.pid)
    f = open(m / "hello", "rb")
    try:
        with pytest.raises(MountError) as e:
            umount(store, m)
        assert "busy" in e.value.one_line()
        assert is_mounted(m) and pid_alive(rec.pid)
    finally:
        f.close()
    umount(store, m)
    assert not pid_alive(rec.pid)


def test_foreground_mount_reports_readiness_and_stops_on_sigint(store, tmp_path):
    require_fuse()
    m = tmp_path / "m"
    m.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the foreground server, as `layerfs mount -f --ready-fd N` runs it
        code = 1
        try:
            os.close(r)
            mount_tree(_tiny_tree(), m, MountOptions(foreground=True, ready_fd=w), store=store, image="tiny:1")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    track(m, pid)
    with os.fdopen(r, "rb") as pipe:
        assert pipe.readline() == b"ok\n"
    assert (m / "hello").read_bytes() == b"hi\n"
    assert [r.pid for r in mounts(store)] == [pid]
    os.kill(pid, signal.SIGINT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not is_mounted(m) and mounts(store) == []


# --- images: mount_image and the CLI ------------------------------------------------------

def _cli(store: Store, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(store.root), *args], capture_output=True,
                       text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _two_layer_image():
    from imagebuild import LayerBuilder, build_image
    l1 = (LayerBuilder().add_dir("etc").add_file("etc/os-release", b"ID=one\n")
          .add_file("bin/tool", b"#!", mode=0o4755).add_device("dev/null", "c", 1, 3).build())
    l2 = LayerBuilder().add_file("etc/motd", b"hi\n").add_whiteout("etc/os-release").build()
    return build_image([l1, l2])


def test_cli_mount_umount_and_layers(store, tmp_path):
    require_fuse()
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    m = tmp_path / "m"
    m.mkdir()
    _cli(store, "mount", "--read-only", "two:1", str(m))
    [rec] = mounts(store)
    track(m, rec.pid)
    assert rec.image == "two:1" and rec.layer is None
    assert sorted(os.listdir(m / "etc")) == ["motd"]
    assert stat.S_IMODE(os.stat(m / "bin/tool").st_mode) == 0o4755
    assert os.stat(m / "dev/null").st_rdev == os.makedev(1, 3)
    p = _cli(store, "mount", "two:1", str(m), check=False)
    assert p.returncode == 1 and "already mounted" in p.stderr and len(p.stderr.splitlines()) == 1
    _cli(store, "umount", str(m))
    assert not pid_alive(rec.pid) and not is_mounted(m)

    _cli(store, "mount", "--layer", "1", "two:1", str(m))
    [rec] = mounts(store)
    track(m, rec.pid)
    assert rec.layer == 1
    assert (m / "etc/os-release").read_bytes() == b"ID=one\n" and not (m / "etc/motd").exists()
    assert "two:1 (layer 1)" in _cli(store, "mounts").stdout
    _cli(store, "umount", str(m))
    assert mounts(store) == []


def test_concurrent_mounts_of_one_mount_point_one_wins(store, tmp_path):
    require_fuse()
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    m = tmp_path / "m"
    m.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "layerfs", "--root", str(store.root), "mount", "two:1", str(m)]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
             for _ in range(3)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    recs = mounts(store)
    for rec in recs:
        track(m, rec.pid)
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    assert all("already mounted" in err for code, err in results if code)
    assert len(recs) == 1 and kernel_mounts()[str(m)][0] == FSTYPE
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {m} " in line) == 1
    umount(store, m)


def test_cli_errors_are_one_line(store, tmp_path):
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("mount", "two:1", str(tmp_path / "missing" / "deeper")), 1, "does not exist"),
        (("mount", "two:1", str(tmp_path)), 1, "is not empty"),
        (("umount", str(empty)), 1, "not a layerfs mount"),
        (("mount", "Bad_Name", str(empty)), 2, "invalid reference"),
        (("mount", "--layer", "9", "two:1", str(empty)), 2, "out of range"),
        (("mount", "--platform", "nope", "two:1", str(empty)), 2, "invalid platform"),
    ]
    for args, code, text in cases:
        p = _cli(store, *args, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert len(p.stderr.splitlines()) == 1 and text in p.stderr and p.stderr.startswith("layerfs: error:"), args
    assert mounts(store) == []


def test_mount_image_pulls_only_when_absent(store, tmp_path):
    require_fuse()
    from layerfs.image import Platform
    calls = []

    def pull(ref):
        calls.append(str(ref))
        put_fake_image(store, str(ref))

    def factory(st, manifest, *, upto):
        assert st is store and upto is None
        return _tiny_tree()

    m = tmp_path / "m"
    m.mkdir()
    rec = mount_image(store, "example.com/app:2", m, MountOptions(), tree_factory=factory, pull=pull)
    track(m, rec.pid)
    assert calls == ["example.com/app:2"] and rec.image == "example.com/app:2"
    assert rec.manifest_digest == str(store.resolve("example.com/app:2")[1].digest)
    umount(store, m)
    rec = mount_image(store, "example.com/app:2", m, MountOptions(), tree_factory=factory, pull=pull)
    track(m, rec.pid)
    assert calls == ["example.com/app:2"]   # local now: no pull
    umount(store, m)
    # a local image of another platform is pulled again for --platform
    rec = mount_image(store, "example.com/app:2", m, MountOptions(platform=Platform.parse("linux/arm64")),
                      tree_factory=factory, pull=pull)
    track(m, rec.pid)
    assert len(calls) == 2
    umount(store, m)


# --- the mount daemon forked early (mount_image's helper) -----------------------------------

def _processes_of(store: Store) -> set[int]:
    """Live processes (not zombies) whose command line names *store* (the CLI and every process it forked)."""
    key = str(store.root).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if key in cmdline and pid_alive(int(entry)):
            found.add(int(entry))
    return found


def _ppid(pid: int) -> int | None:
    try:
        st = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(st[st.rfind(b")") + 2:].split()[1])


def test_failed_cli_mounts_leave_no_process_behind(store, tmp_path):
    """The mount daemon is forked before the image is resolved; every failure after that ends it too."""
    require_fuse()
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    busy = tmp_path / "busy"
    busy.mkdir()
    _cli(store, "mount", "--read-only", "two:1", str(busy))
    [rec] = mounts(store)
    track(busy, rec.pid)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (("two:1", str(tmp_path / "missing" / "deeper")), 1, "does not exist"),                    # mount point
        (("two:1", str(tmp_path / "full")), 1, "is not empty"),
        (("two:1", str(busy)), 1, "already mounted"),
        (("localhost:1/nowhere/none:1", str(empty)), 1, "cannot reach"),                          # pull fails
        (("--layer", "9", "two:1", str(empty)), 2, "out of range"),                                # the tree
        (("-o", "no_such_option", "two:1", str(empty)), 1, "unknown option"),                      # the daemon
        (("--upper", str(tmp_path / "full" / "x"), "two:1", str(empty)), 1, "not a directory"),    # the upper
    ]
    for args, code, text in cases:
        p = _cli(store, "mount", *args, check=False)
        assert p.returncode == code, (args, p.stderr)
        lines = p.stderr.splitlines()
        assert text in lines[-1] and lines[-1].startswith("layerfs: error:"), (args, p.stderr)
        assert wait_until(lambda: _processes_of(store) <= {rec.pid}), (args, _processes_of(store))
        assert not is_mounted(empty) and os.listdir(empty) == []
    assert mounts(store) == [rec]
    umount(store, busy)
    assert wait_until(lambda: not _processes_of(store))


def test_the_early_mount_daemon_ends_with_a_killed_mount_command(store, tmp_path):
    """SIGKILL the command while it waits on a registry: the daemon it forked sees its pipe close and exits."""
    require_fuse()
    import socket
    m = tmp_path / "m"
    m.mkdir()
    with socket.socket() as silent:          # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "layerfs", "--root", str(store.root), "--insecure-registry",
               f"127.0.0.1:{port}", "mount", f"127.0.0.1:{port}/silent/app:1", str(m)]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:

            def forked() -> set[int]:   # the daemon, not the intermediate child (which exits at once)
                return {p for p in _processes_of(store) - {proc.pid} if _ppid(p) != proc.pid}

            assert wait_until(lambda: len(forked()) == 1, timeout=20), "the mount command forked no daemon"
            [helper] = forked()
            time.sleep(0.2)                  # still waiting for the registry
            assert proc.poll() is None and pid_alive(helper)
        finally:
            proc.kill()
            proc.wait()
        assert wait_until(lambda: not pid_alive(helper), timeout=10)
    assert not _processes_of(store) and not is_mounted(m) and mounts(store) == []


def test_cli_mount_imports(store, tmp_path):
    """A local image mounts without the registry client (requests & co.); only the daemon imports the FUSE adapter."""
    require_fuse()
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    m = tmp_path / "m"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args in (("--read-only",), ()):      # the first mount builds the tree cache, the second one loads it
        p = subprocess.run([sys.executable, "-X", "importtime", "-m", "layerfs", "--root", str(store.root), "mount",
                            *args, "two:1", str(m)], capture_output=True, text=True, env=env, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        [rec] = mounts(store)
        track(m, rec.pid)
        assert sorted(os.listdir(m / "etc")) == ["motd"]
        imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if "|" in line}
        assert "layerfs.mount.daemon" in imported
        assert not imported & {"requests", "urllib3", "charset_normalizer", "layerfs.transfer.pull", "layerfs.transfer.sources",
                               "layerfs.registry.client", "layerfs._fuse", "layerfs.fuse.readonly"}, sorted(imported)
        umount(store, m, remove_upper=True)
    assert not _processes_of(store)


def test_mount_image_tree_cache_missing_unwritable_or_corrupt(store, tmp_path, monkeypatch):
    """The daemon loads the tree from the store's tree cache; the caller builds it first when missing or of
    another format, shares the tree it built when the cache cannot be written, and a cache damaged behind a
    current head is rebuilt by the daemon."""
    require_fuse()
    from layerfs.fs import imagetree, treecache
    put_image(store, "docker.io/library/two:1", _two_layer_image())
    _, manifest = store.resolve("two:1")
    cache = treecache.tree_cache_path(store, manifest, 2)
    m = tmp_path / "m"

    def mount_and_check(**kw) -> MountRecord:
        rec = mount_image(store, "two:1", m, MountOptions(**kw))
        track(m, rec.pid)
        if kw.get("layer") == 1:
            assert os.listdir(m / "etc") == ["os-release"]
        else:
            assert sorted(os.listdir(m / "etc")) == ["motd"] and (m / "etc/motd").read_bytes() == b"hi\n"
        assert os.stat(m / "dev/null").st_rdev == os.makedev(1, 3)
        umount(store, m, remove_upper=True)
        return rec

    def no_save(*args, **kw):
        raise OSError(errno.EROFS, "read-only file system")

    with monkeypatch.context() as mp:        # the cache cannot be written: the daemon is forked with the tree
        mp.setattr(imagetree, "save_tree", no_save)
        rec = mount_and_check()
        assert not cache.exists() and "tree cache" not in Path(rec.log).read_text()   # built once, here
    mount_and_check(read_only=True)          # built by the caller, loaded by the daemon
    assert cache.is_file()
    good = cache.read_bytes()
    cache.write_bytes(b"garbage")            # not a current cache: the caller rebuilds it before the daemon starts
    rec = mount_and_check()
    assert cache.read_bytes() == good and "rebuilding" not in Path(rec.log).read_text()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    cache.write_bytes(bytes(bad))            # a current head: looks cached to the caller, the daemon rebuilds it
    rec = mount_and_check()
    assert "rebuilding" in Path(rec.log).read_text()
    assert cache.read_bytes() == good
    mount_and_check(read_only=True, layer=1)
    assert treecache.tree_cache_path(store, manifest, 1).is_file()
    assert mounts(store) == []
