"""Helpers for tests (and scripts/bench_fuse.py) that mount hand-built MergedTrees with real FUSE.

Every mount made through :func:`mounted` is torn down in its ``finally``:
``fusermount3 -u``, then ``umount -l`` as a last resort, and the daemon pid
is killed if it still runs, so one broken test cannot leave a hung mount
behind for the next.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

from prereqs import missing_prerequisite, require_binary, require_module

from layerfs.fs import ROOT_INO, MergedTree, Node
from layerfs.image import OCI_CONFIG, OCI_MANIFEST, Descriptor, Digest
from layerfs.libc import pid_alive
from layerfs.mount import FSTYPE, MountOptions, MountRecord, kernel_mounts, mount_lazy, mount_tree
from layerfs.store import Store

MTIME_NS = 1_704_067_200_123_456_789      # 2024-01-01T00:00:00.123456789Z


# --- layer readers -----------------------------------------------------------------------

class BytesReader:
    """A LayerReader over an in-memory uncompressed stream; counts calls, optional delay per read."""

    def __init__(self, data: bytes, *, delay: float = 0.0):
        self.data = data
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.data[offset:offset + size]


# --- trees ---------------------------------------------------------------------------------

def fix_dir_nlinks(tree: MergedTree) -> None:
    """Give every directory nlink = 2 + its subdirectories (what the union view is expected to do)."""
    for node in tree.nodes:
        if node is not None and node.children is not None:
            node.nlink = 2 + sum(1 for i in node.children.values() if tree.nodes[i].children is not None)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Sample:
    """The hand-built tree used by the attribute tests, with the facts tests compare against."""

    BIG_SIZE = 6 * 1024 * 1024 + 123

    def __init__(self, *, slow_delay: float = 0.0):
        self.big = random_bytes(self.BIG_SIZE, 1)
        self.slow_data = [random_bytes(256 * 1024, 100 + i) for i in range(8)]
        stream = bytearray(b"\0" * 512)                  # a tar header's worth of something else
        self.big_offset = len(stream)
        stream += self.big
        self.small_offset = len(stream)
        self.small = b"hello, layerfs\n"
        stream += self.small
        self.sparse_data = b"D" * 5000 + b"E" * 3000
        self.sparse_offset = len(stream)
        stream += self.sparse_data
        self.reader = BytesReader(bytes(stream))
        slow = bytearray()
        self.slow_offsets = []
        for d in self.slow_data:
            self.slow_offsets.append(len(slow))
            slow += d
        self.slow_reader = BytesReader(bytes(slow), delay=slow_delay)
        t = self.tree = MergedTree([self.reader, self.slow_reader])
        root = t.nodes[ROOT_INO]
        root.mtime_ns = MTIME_NS
        kw = dict(mtime_ns=MTIME_NS)
        etc = t.add(ROOT_INO, "etc", stat.S_IFDIR | 0o755, **kw)
        t.add(etc.ino, "hostname", stat.S_IFREG | 0o644, size=len(self.small), layer=0,
              offset=self.small_offset, uid=0, gid=0, mtime_ns=MTIME_NS + 1)
        t.add(etc.ino, "inline.conf", stat.S_IFREG | 0o600, size=5, inline=b"abcde", uid=101, gid=102, **kw)
        t.add(etc.ino, "empty", stat.S_IFREG | 0o444, size=0, **kw)
        t.add(etc.ino, "motd", stat.S_IFLNK | 0o777, target="../usr/share/motd", **kw)
        t.add(etc.ino, "ümlaut-ß", stat.S_IFREG | 0o644, inline=b"u", size=1, **kw)
        t.add(etc.ino, "bad-\udcff-name", stat.S_IFLNK | 0o777, target="target-\udcfe", **kw)
        bin_ = t.add(ROOT_INO, "bin", stat.S_IFDIR | 0o755, **kw)
        self.big_node = t.add(bin_.ino, "big", stat.S_IFREG | 0o755, size=self.BIG_SIZE, layer=0,
                              offset=self.big_offset, uid=1000, gid=1000, mtime_ns=MTIME_NS + 999)
        t.add(bin_.ino, "su", stat.S_IFREG | 0o4755, inline=b"#!", size=2, **kw)
        t.add(bin_.ino, "wall", stat.S_IFREG | 0o2755, inline=b"#!", size=2, gid=5, **kw)
        t.add(bin_.ino, "both", stat.S_IFREG | 0o6711, inline=b"#!", size=2, **kw)
        hard = t.add(bin_.ino, "hard1", stat.S_IFREG | 0o755, inline=b"same inode\n", size=11, nlink=3, **kw)
        t.link(bin_.ino, "hard2", hard.ino)
        t.link(etc.ino, "hard3", hard.ino)
        self.hard_ino = hard.ino
        tmp = t.add(ROOT_INO, "tmp", stat.S_IFDIR | 0o1777, **kw)
        t.add(tmp.ino, "sticky-sub", stat.S_IFDIR | 0o3775, uid=7, gid=8, **kw)
        dev = t.add(ROOT_INO, "dev", stat.S_IFDIR | 0o755, **kw)
        t.add(dev.ino, "null", stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), **kw)
        t.add(dev.ino, "sda", stat.S_IFBLK | 0o660, rdev=os.makedev(8, 0), gid=6, **kw)
        t.add(dev.ino, "bigdev", stat.S_IFCHR | 0o600, rdev=os.makedev(4000, 70000), **kw)
        t.add(dev.ino, "fifo", stat.S_IFIFO | 0o644, **kw)
        t.add(dev.ino, "sock", stat.S_IFSOCK | 0o755, **kw)
        usr = t.add(ROOT_INO, "usr", stat.S_IFDIR | 0o755, **kw)
        share = t.add(usr.ino, "share", stat.S_IFDIR | 0o755, **kw)
        t.add(share.ino, "motd", stat.S_IFREG | 0o644, inline=b"welcome\n", size=8, **kw)
        t.add(share.ino, "xattrs", stat.S_IFREG | 0o644, inline=b"x", size=1,
              xattrs={"user.comment": b"hello", "user.binary": bytes(range(256)),
                      "security.capability": b"\x01\x00\x00\x02" + bytes(16)}, **kw)
        # 8000 bytes with a 4000-byte hole at 3000: [0,3000) data, [3000,7000) hole, [7000,12000) data
        self.sparse_expected = self.sparse_data[:3000] + bytes(4000) + self.sparse_data[3000:]
        t.add(share.ino, "sparse", stat.S_IFREG | 0o644, size=len(self.sparse_expected), layer=0,
              offset=self.sparse_offset,
              sparse=[(0, 3000, self.sparse_offset), (7000, len(self.sparse_data) - 3000, self.sparse_offset + 3000)],
              **kw)
        t.add(share.ino, "zeros", stat.S_IFREG | 0o644, size=100_000, layer=-1, **kw)
        slowdir = t.add(ROOT_INO, "slow", stat.S_IFDIR | 0o755, **kw)
        for i, off in enumerate(self.slow_offsets):
            t.add(slowdir.ino, f"f{i}", stat.S_IFREG | 0o644, size=len(self.slow_data[i]), layer=1, offset=off, **kw)
        many = t.add(ROOT_INO, "many", stat.S_IFDIR | 0o755, **kw)
        for i in range(1500):   # more than one readdirplus buffer
            t.add(many.ino, f"entry-{i:05d}-" + "x" * (i % 40), stat.S_IFREG | 0o644, inline=b"", **kw)
        fix_dir_nlinks(t)

    def content(self, node: Node) -> bytes:
        return self.tree.read(node.ino, 0, node.size)


# --- an image in a store, without layers (the tree comes from a factory) -----------------

def put_fake_image(store: Store, name: str, *, architecture: str = "amd64") -> Digest:
    """Tag a manifest + config (no layer blobs) as *name*; returns the manifest digest."""
    store.init()
    config = json.dumps({"architecture": architecture, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cdig = store.put_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": str(cdig), "size": len(config)},
                           "layers": []}).encode()
    mdig = store.put_blob(manifest)
    store.tag(name, Descriptor(OCI_MANIFEST, mdig, len(manifest)))
    return mdig


def put_image(store: Store, name: str, image) -> Digest:
    """Store a :class:`imagebuild.BuiltImage` (every blob) and tag it *name* (canonical reference)."""
    store.init()
    for digest, data in image.blobs.items():
        store.put_blob(data, digest)
    store.tag(name, image.manifest_descriptor)
    return image.manifest_digest


# --- mounting --------------------------------------------------------------------------------

def require_fuse() -> None:
    """Skip without FUSE (/dev/fuse, fusermount3, layerfs._fuse), except under CI=true where that is a failure."""
    if not os.path.exists("/dev/fuse"):
        missing_prerequisite("FUSE is not usable here: /dev/fuse is missing")
    require_binary("fusermount3")
    require_module("layerfs._fuse")


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return os.path.realpath(mountpoint) in kernel_mounts()


def force_unmount(mountpoint: str | os.PathLike[str], pid: int | None = None) -> None:
    """Tear a mount down whatever state it is in; kill *pid* if it survives."""
    mnt = os.path.realpath(mountpoint)
    for _ in range(5):   # mounts may be stacked
        if not is_mounted(mnt):
            break
        subprocess.run(["fusermount3", "-u", "-q", mnt], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    if pid and pid_alive(pid):
        deadline = time.monotonic() + 3
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


#: (mount point, daemon pid or None) of every mount the current test started; see :func:`watchdog`
STARTED: list[tuple[str, int | None]] = []


def track(mountpoint: str | os.PathLike[str], pid: int | None) -> None:
    STARTED.append((os.path.realpath(mountpoint), pid))


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail a test whose FUSE call hangs instead of hanging the run.

    A process stuck in a FUSE request cannot be woken by a signal handler
    (pytest-timeout's default), so after *seconds* a timer thread SIGKILLs
    the daemons the test started and detaches their mounts: the kernel then
    aborts the connection and the stuck call returns an error. Afterwards
    every mount the test started is torn down.
    """
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        for mnt, pid in list(STARTED):
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", mnt], stdin=subprocess.DEVNULL, capture_output=True)

    STARTED.clear()
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        for mnt, pid in STARTED:
            force_unmount(mnt, pid)
        STARTED.clear()
        if fired.is_set():
            raise AssertionError(f"a FUSE call hung: the test's mount daemons were killed after {seconds:g}s")


@contextlib.contextmanager
def started_mounts(seconds: float) -> Iterator[list[tuple[Path, int]]]:
    """Under a :func:`watchdog` of *seconds*: a list the test appends (mount point, daemon pid) of
    each mount it starts to; all of them are torn down whatever happens."""
    started: list[tuple[Path, int]] = []
    with watchdog(seconds):
        yield started
        for mnt, pid in started:
            force_unmount(mnt, pid)


def mount_lazy_read_only(store: Store, ref: str, mnt: Path, started: list[tuple[Path, int]]) -> Path:
    """Mount *ref* lazily and read-only at *mnt* (made if missing), recorded in *started* for teardown."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    rec = mount_lazy(store, ref, mnt, MountOptions(read_only=True))
    track(mnt, rec.pid)
    started.append((mnt, rec.pid))
    return mnt


@contextlib.contextmanager
def mounted(tree: MergedTree, mountpoint: Path, store: Store, *, image: str = "test/tree:1",
            **options) -> Iterator[MountRecord]:
    """Mount *tree* daemonised at *mountpoint*; always unmount and kill the daemon afterwards."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    record = None
    try:
        record = mount_tree(tree, mountpoint, MountOptions(**options), store=store, image=image,
                            manifest_digest="sha256:" + "0" * 64)
        track(mountpoint, record.pid)
        yield record
    finally:
        force_unmount(mountpoint, record.pid if record else None)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


__all__ = ["BytesReader", "Sample", "random_bytes", "put_fake_image", "put_image", "started_mounts",
           "mount_lazy_read_only", "require_fuse", "is_mounted", "force_unmount", "mounted", "wait_until", "watchdog",
           "track", "fix_dir_nlinks", "MTIME_NS", "FSTYPE"]
