"""The read-only and writable mounts scripts/bench.py compares: layerfs (and layerfs -o volatile),
kernel overlayfs, fuse-overlayfs and ratarmount, each a :class:`Tool` that mounts the image's layers;
and the layers in overlay form (GNU tar, whiteouts as 0/0 devices) the overlayfs peers mount."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402


@dataclass
class Ctx:
    workdir: Path
    img: bi.Image
    lowers: list[Path]          # extracted layers, bottom first
    blobs: list[Path]           # layer blob names for ratarmount, bottom first
    store: Path
    ref: str | None
    ratar_index: Path


class Tool:
    name = "?"
    fuse = True
    reads = True                # takes part in the read-only part

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.pid: int | None = None

    def unavailable(self) -> str | None:
        return None

    def mount(self, mnt: Path) -> None:
        raise NotImplementedError

    writable = False            # takes part in the write workloads

    def write_unavailable(self) -> str | None:
        return None if self.writable else "read-only tool"

    def mount_rw(self, mnt: Path, base: Path) -> None:
        """A writable mount whose upper (and work) directories go in the fresh, empty directory *base*."""
        raise NotImplementedError

    def umount(self, mnt: Path) -> None:
        bl.run(["fusermount3", "-u", str(mnt)], timeout=60, what=f"{self.name}: fusermount3 -u")

    def find_pid(self, mnt: Path) -> int | None:
        if not self.fuse:
            return None
        pids = bl.pids_serving(mnt)
        return pids[-1] if pids else None


class KernelOverlay(Tool):
    name = "kernel overlayfs"
    fuse = False

    def mount(self, mnt):
        lower = ":".join(str(p) for p in reversed(self.ctx.lowers))
        bl.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(mnt)], timeout=60,
               what="mount -t overlay")

    def umount(self, mnt):
        bl.run(["umount", str(mnt)], timeout=60, what="umount overlay")

    writable = True

    def mount_rw(self, mnt, base):
        lower = ":".join(str(p) for p in reversed(self.ctx.lowers))
        (base / "upper").mkdir()
        (base / "work").mkdir()
        bl.run(["mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}", str(mnt)], timeout=60,
               what="mount -t overlay (writable)")


class FuseOverlayfs(Tool):
    name = "fuse-overlayfs"

    def unavailable(self):
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"

    def mount(self, mnt):
        lower = ":".join(str(p) for p in reversed(self.ctx.lowers))
        bl.run(["fuse-overlayfs", "-o", f"lowerdir={lower}", str(mnt)], timeout=60, what="fuse-overlayfs")

    writable = True

    def mount_rw(self, mnt, base):
        lower = ":".join(str(p) for p in reversed(self.ctx.lowers))
        (base / "upper").mkdir()
        (base / "work").mkdir()
        bl.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}",
                str(mnt)], timeout=60, what="fuse-overlayfs (writable)")


class Ratarmount(Tool):
    name = "ratarmount"

    def unavailable(self):
        return None if shutil.which("ratarmount") else "ratarmount not installed (pip install ratarmount)"

    def mount(self, mnt):
        self.ctx.ratar_index.mkdir(parents=True, exist_ok=True)
        bl.run(["ratarmount", "--index-folders", str(self.ctx.ratar_index), *map(str, self.ctx.blobs), str(mnt)],
               timeout=900, what="ratarmount")


class Layerfs(Tool):
    name = "layerfs"
    _why: str | None = None
    _ro: bool = False
    _rw: bool = False
    writable = True

    def unavailable(self):
        if self._why is not None:
            return self._why or None
        try:
            p = subprocess.run(bl.layerfs_cmd("mount", "--help"), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self._why = "`layerfs mount --help` hung"
            return self._why
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            self._why = f"`layerfs mount` not available yet ({last.strip()})"
            return self._why
        Layerfs._ro = "--read-only" in p.stdout
        Layerfs._rw = "--upper" in p.stdout
        if self.ctx.ref is None:
            self._why = "image not pulled (see the pull error)"
            return self._why
        self._why = ""
        return None

    def mount(self, mnt):
        args = ["--root", str(self.ctx.store), "mount"] + (["--read-only"] if self._ro else []) + [self.ctx.ref,
                                                                                                 str(mnt)]
        bl.run(bl.layerfs_cmd(*args), env=bl.layerfs_env(), cwd=bl.REPO_ROOT, timeout=300, what="layerfs mount")

    def write_unavailable(self):
        return self.unavailable() or (None if self._rw else "`layerfs mount --upper` not available")

    def mount_rw(self, mnt, base):
        # the overlay's work dir is the upper's sibling (base/.upper.work): both on base's file system
        bl.run(bl.layerfs_cmd("--root", str(self.ctx.store), "mount", "--upper", str(base / "upper"), self.ctx.ref,
                              str(mnt)), env=bl.layerfs_env(), cwd=bl.REPO_ROOT, timeout=300,
               what="layerfs mount (writable)")

    def umount(self, mnt):
        bl.run(bl.layerfs_cmd("--root", str(self.ctx.store), "umount", str(mnt)), env=bl.layerfs_env(),
               cwd=bl.REPO_ROOT, timeout=60, what="layerfs umount")

    def find_pid(self, mnt):
        pid = super().find_pid(mnt)
        if pid:
            return pid
        # the daemon's command line may not name the mount point: ask `layerfs mounts` (a PID column)
        try:
            out = bl.run(bl.layerfs_cmd("--root", str(self.ctx.store), "mounts"), env=bl.layerfs_env(),
                         cwd=bl.REPO_ROOT, timeout=30, what="layerfs mounts").stdout.splitlines()
        except bl.BenchError:
            return None
        rows = [re.split(r"\s{2,}|\t", l.strip()) for l in out if l.strip()]
        if not rows:
            return None
        head = [h.upper() for h in rows[0]]
        col = head.index("PID") if "PID" in head else None
        for r in rows[1:]:
            if any(os.path.normpath(c) == str(mnt) for c in r):
                cands = [r[col]] if col is not None and col < len(r) else r
                for c in cands:
                    if c.isdigit() and os.path.exists(f"/proc/{c}"):
                        return int(c)
        return None


class LayerfsVolatile(Layerfs):
    """layerfs with -o volatile (no copy-up or fsync syncs, as kernel overlayfs's option): write workloads only."""
    name = "layerfs -o volatile"
    reads = False

    def mount_rw(self, mnt, base):
        bl.run(bl.layerfs_cmd("--root", str(self.ctx.store), "mount", "-o", "volatile", "--upper",
                              str(base / "upper"), self.ctx.ref, str(mnt)), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
               timeout=300, what="layerfs mount -o volatile")


TOOLS = [Layerfs, KernelOverlay, FuseOverlayfs, Ratarmount, LayerfsVolatile]
KEYS = {"layerfs": "layerfs", "layerfs-volatile": "layerfs -o volatile", "overlay": "kernel overlayfs", "kernel": "kernel overlayfs",
        "fuse-overlayfs": "fuse-overlayfs", "ratarmount": "ratarmount"}


def extract_overlay_form(blob: Path, dest: Path) -> None:
    """GNU tar, then OCI whiteouts -> overlayfs whiteouts (char 0/0) and opaque xattrs."""
    dest.mkdir(parents=True)
    bl.run(["tar", "-xzpf", str(blob), "-C", str(dest), "--numeric-owner", "--xattrs", "--xattrs-include=*"],
           timeout=900, what=f"tar -xzf {blob.name[:12]}")
    r = bl.run(["find", str(dest), "-name", ".wh.*", "-print0"], timeout=300, what="find whiteouts")
    for p in filter(None, r.stdout.split("\0")):
        d, name = os.path.split(p)
        if name == ".wh..wh..opq":
            os.unlink(p)
            os.setxattr(d, "trusted.overlay.opaque", b"y")
        else:
            target = os.path.join(d, name[4:])
            os.unlink(p)
            if os.path.lexists(target):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def prepare_lowers(img: bi.Image, base: Path) -> list[Path]:
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    out = []
    for i, l in enumerate(img.layers):
        d = base / f"L{i + 1}"
        extract_overlay_form(l.path, d)
        out.append(d)
    return out
