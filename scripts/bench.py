#!/usr/bin/env python3
"""Mount benchmark: layerfs against kernel overlayfs, fuse-overlayfs and ratarmount (read-only), and
against kernel overlayfs and fuse-overlayfs (write workloads on a writable mount).

    python scripts/bench.py [--workdir DIR] [--runs 3] [--quick] [--only TOOL,...]
                            [--writes-only | --no-writes] [--profile DIR]

Needs root (mounts, drop_caches), fuse3, fuse-overlayfs, docker-registry, and
ratarmount (pip install ratarmount). Generates once (cached in --workdir) an
image of about 450 MB uncompressed, ~25k entries in 6 gzip layers:

  1. a real rootfs base: the host's /usr (python stdlib and dist-packages,
     sbin, part of bin ...), real modes, owners, symlinks and hard links
  2. a 200 MB incompressible file (opt/big/blob.bin)
  3. 20k small text files (srv/small/dNNN/)
  4. whiteouts: files and whole directories of layers 1 and 3 deleted
  5. opaque directories (one in the base, one in the small files) with new content
  6. changes: overwritten base files, a file replacing a directory, a directory
     replacing a file, /etc with symlinks and hard links, a mode change

The image is pushed to a private docker-registry and pulled with `layerfs pull`.
The peers get the same layers: extracted with GNU tar into overlayfs form
(whiteouts as 0/0 char devices, opaque dirs with trusted.overlay.opaque=y) for
kernel overlayfs and fuse-overlayfs, and the gzip blobs as they are for
ratarmount (union of the six archives, its index in --workdir).

Per run and tool (order rotated per run), each session on a fresh mount:
  find:  drop caches, mount, `find MNT -printf '%p %s %m %u\\n'` cold, then warm
  cat:   drop caches, mount, `cat MNT/opt/big/blob.bin >/dev/null` cold, then warm
  tar:   drop caches, mount, `tar cf - -C MNT usr | wc -c` cold
  mount: mount + first readdir again with warm caches (ratarmount: index present)
Peak RSS is VmHWM of the FUSE daemon (and its children) just before each
unmount; the table shows the largest. "Cold" = `sync; echo 3 >
/proc/sys/vm/drop_caches` and a fresh mount. The table shows medians; peer cells
carry "layerfs time / peer time" (below 1 = layerfs faster). Before each mount
the script waits (up to 30 s) for an idle machine, since the box may be shared.

Write workloads (after the read-only part; --writes-only runs them alone,
--no-writes skips them), layerfs, kernel overlayfs and fuse-overlayfs on the
same image/layers, and layerfs -o volatile (no copy-up or fsync syncs, as
fuse-overlayfs; key layerfs-volatile for --only); each sample: drop caches, a fresh writable mount with a
fresh, empty upper in WORKDIR (kernel overlayfs: upperdir+workdir there;
fuse-overlayfs: -o lowerdir=...,upperdir=...,workdir=...; layerfs: --upper
there, its work dir beside it), the timed workload ending with `sync` (so
write-back to disk counts the same for all), an untimed check through the
mount, unmount, upper removed:
  untar:  `tar -xf` of a plain tar of 20k small files (generated once in
          --workdir, read from the page cache) into a new directory
  append: open(f, 'a').write('x\n') on 1000 lower files of the small-files
          layer (each a copy-up), in the benchmark's process, then sync
  dd:     `dd if=/dev/zero bs=1M count=500 conv=fsync`
  rm:     `rm -rf srv/small` (the small-files layer's tree, 20k lower files)
Target: layerfs <= 1.5x fuse-overlayfs on each. The table also shows the
FUSE daemon's CPU time (user+sys, /proc/PID/stat) over each timed workload.
--profile DIR: afterwards one more, untimed layerfs run of each workload with
`py-spy record --gil` (pip install py-spy) on the mount daemon (samples of the
thread holding the GIL: its Python CPU); raw stacks in DIR, a summary printed.

--quick: a ~40 MB image and 1 run (a smoke test; writes: 1500 files, 200
appends, 50 MB). Exit status: 0 ok (a column may be n/a, e.g. while `layerfs
mount` does not exist); 1 a step failed or a check after a write workload did.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchregistry as br  # noqa: E402
import benchlib as bl  # noqa: E402

REPO, TAG = "bench/mount", "v1"
BIG = "opt/big/blob.bin"
FIND_FMT = "%p %s %m %u\\n"
# waits for an idle machine before each mount (a session's steps then run back to back); main() enables it
GATE = bl.QuietGate(enabled=False)

# --- the image --------------------------------------------------------------------------------

BASE_SOURCES = ["usr/lib/python3.11", "usr/lib/python3", "usr/sbin", "usr/bin", "usr/lib/gcc", "usr/share"]


def image_spec(quick: bool) -> dict:
    M = 1 << 20
    if quick:
        return {"version": 2, "base_bytes": 6 * M, "big": 16 * M, "small": 1500, "small_per_dir": 100}
    return {"version": 2, "base_bytes": 200 * M, "big": 200 * M, "small": 20000, "small_per_dir": 200}


def _walk_host(rel_root: str):
    """(arcname, host path) for rel_root and everything below it, sorted, directories first."""
    host = Path("/") / rel_root
    if not host.is_dir() or host.is_symlink():
        return
    stack = [rel_root]
    while stack:
        rel = stack.pop()
        yield rel, Path("/") / rel
        try:
            names = sorted(os.listdir(Path("/") / rel))
        except OSError:
            continue
        subdirs = []
        for n in names:
            p = Path("/") / rel / n
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(f"{rel}/{n}")
            else:
                yield f"{rel}/{n}", p
        stack.extend(reversed(subdirs))


def build_layers(spec: dict):
    def build(blobdir: Path):
        rng = random.Random(42)
        text = bi.TextSource(pool=(1 << 20) if spec["small"] < 5000 else (4 << 20))
        layers: list[bi.LayerBlob] = []
        meta: dict = {}

        # 1. base: the host's /usr, real metadata, until the byte budget is reached
        base_files: list[str] = []
        base_dirs: dict[str, int] = {}          # dir -> number of entries below it
        with bi.LayerWriter(blobdir, comment="rootfs base from the host's /usr") as w:
            w.tar.dereference = False
            added_dirs: set[str] = set()
            total = 0

            def add_parents(rel: str):
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in added_dirs:
                        ti = w.tar.gettarinfo(str(Path("/") / d), arcname=d)
                        w.add(ti)
                        added_dirs.add(d)
                        base_dirs.setdefault(d, 0)

            done = False
            for src in BASE_SOURCES:
                if done:
                    break
                for rel, host in _walk_host(src):
                    try:
                        ti = w.tar.gettarinfo(str(host), arcname=rel)
                    except OSError:
                        continue
                    if ti is None or not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk()):
                        continue  # sockets, devices: not in a base image
                    add_parents(rel)
                    if ti.isdir():
                        if rel in added_dirs:
                            continue
                        added_dirs.add(rel)
                        base_dirs.setdefault(rel, 0)
                        w.add(ti)
                    elif ti.isreg():
                        if total + ti.size > spec["base_bytes"]:
                            done = True
                            break
                        try:
                            with open(host, "rb") as f:
                                w.add(ti, f)
                        except OSError:
                            continue
                        total += ti.size
                        base_files.append(rel)
                    else:
                        w.add(ti)
                    d = rel.rpartition("/")[0]
                    while d:
                        base_dirs[d] = base_dirs.get(d, 0) + 1
                        d = d.rpartition("/")[0]
        layers.append(w.blob)

        # 2. the big incompressible file
        with bi.LayerWriter(blobdir, comment="a 200 MB incompressible file") as w:
            w.dir("opt")
            w.dir("opt/big")
            w.stream_file(BIG, spec["big"], bi.random_chunks(spec["big"], seed=2024))
        layers.append(w.blob)

        # 3. small files
        per = spec["small_per_dir"]
        ndirs = (spec["small"] + per - 1) // per
        small: list[str] = []
        with bi.LayerWriter(blobdir, comment="20k small files") as w:
            w.dir("srv")
            w.dir("srv/small")
            for d in range(ndirs):
                w.dir(f"srv/small/d{d:03d}")
                for i in range(per):
                    n = d * per + i
                    if n >= spec["small"]:
                        break
                    p = f"srv/small/d{d:03d}/f{n:05d}.txt"
                    w.file(p, text.take(rng.randint(16, 3000)), mode=rng.choice([0o644, 0o644, 0o600, 0o755]))
                    small.append(p)
        layers.append(w.blob)

        # choose directories: one to delete, one to make opaque (both real base dirs with content)
        cands = sorted((d for d, n in base_dirs.items() if 15 <= n <= 400 and d.count("/") >= 3),
                       key=lambda d: (-base_dirs[d], d))
        del_dir = cands[len(cands) // 3] if cands else None
        opq_dir = next((d for d in cands if del_dir is None or not (d == del_dir or d.startswith(del_dir + "/")
                                                                     or del_dir.startswith(d + "/"))), None)

        def under(p: str, d: str | None) -> bool:
            return d is not None and (p == d or p.startswith(d + "/"))

        # 4. whiteouts
        deleted: list[str] = []
        with bi.LayerWriter(blobdir, comment="whiteouts") as w:
            seen_dirs: set[str] = set()

            def parent(p: str):
                d = p.rpartition("/")[0]
                parts = d.split("/")
                for i in range(1, len(parts) + 1):
                    x = "/".join(parts[:i])
                    if x not in seen_dirs:
                        seen_dirs.add(x)
                        w.dir(x)
            if del_dir:
                parent(del_dir)
                w.whiteout(del_dir)
                deleted.append(del_dir)
            for p in base_files[::20]:
                if under(p, del_dir) or under(p, opq_dir):
                    continue
                parent(p)
                w.whiteout(p)
                deleted.append(p)
            sd = f"srv/small/d{min(7, ndirs - 1):03d}"
            for p in small[::50]:
                if under(p, sd):  # no directory entry in the layer that whites the directory out
                    continue
                parent(p)
                w.whiteout(p)
                deleted.append(p)
            parent(sd)
            w.whiteout(sd)
            deleted.append(sd)
        layers.append(w.blob)

        # 5. opaque directories with new content
        opq_small = f"srv/small/d{min(10, ndirs - 1):03d}"
        with bi.LayerWriter(blobdir, comment="opaque directories") as w:
            for d in (opq_dir, opq_small):
                if d is None:
                    continue
                parts = d.split("/")
                for i in range(1, len(parts) + 1):
                    w.dir("/".join(parts[:i]))
                w.opaque(d)
                for i in range(5):
                    w.file(f"{d}/new-{i}.txt", text.take(500 + 100 * i))
        layers.append(w.blob)

        # 6. changes on top
        with bi.LayerWriter(blobdir, comment="changes: overwrites, type changes, /etc") as w:
            w.dir("usr")
            w.dir("usr/sbin", mode=0o750)  # a mode change of a base directory
            done_dirs: set[str] = {"usr", "usr/sbin"}

            def dirs_for(p: str):
                parts = p.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    x = "/".join(parts[:i])
                    if x not in done_dirs:
                        done_dirs.add(x)
                        w.dir(x)
            over = [p for p in base_files[7::37] if not any(under(p, d) for d in deleted) and not under(p, opq_dir)]
            for p in over[:100]:
                dirs_for(p)
                w.file(p, text.take(rng.randint(100, 4000)), mode=0o644)
            # a file replacing a directory, a directory replacing a file
            dir_victim = next((d for d in sorted(base_dirs) if d.count("/") >= 3 and base_dirs[d] >= 3
                               and not any(under(d, x) or under(x, d) for x in deleted + [opq_dir or "-"])
                               and not any(under(p, d) for p in over[:100])), None)
            if dir_victim:
                dirs_for(dir_victim)
                w.file(dir_victim, b"a file now\n")
            file_victim = next((p for p in base_files[3::41] if not any(under(p, d) for d in deleted)
                                and not under(p, opq_dir) and not under(p, dir_victim) and p not in over), None)
            if file_victim:
                dirs_for(file_victim)
                w.dir(file_victim, mode=0o750)
                w.file(file_victim + "/inside.txt", b"a directory now\n")
            w.dir("etc")
            for i in range(50):
                w.file(f"etc/conf-{i:02d}.conf", text.take(rng.randint(50, 2000)), mode=0o640)
            w.hardlink("etc/conf-hardlink.conf", "etc/conf-00.conf")
            w.symlink("etc/python3", "/usr/lib/python3.11")
            w.symlink("etc/big", "../opt/big/blob.bin")
        layers.append(w.blob)
        meta.update(big=BIG, deleted_dir=del_dir, opaque_dir=opq_dir, opaque_small=opq_small,
                    dir_replaced_by_file=dir_victim, file_replaced_by_dir=file_victim,
                    base_files=len(base_files), small_files=len(small), whiteouts=len(deleted))
        return layers, meta
    return build


# --- tools ------------------------------------------------------------------------------------

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
        import re
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


# --- preparation of the peers -----------------------------------------------------------------

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


# --- measurement ------------------------------------------------------------------------------

@dataclass
class Results:
    samples: dict = field(default_factory=dict)     # (tool, metric) -> [float]
    errors: dict = field(default_factory=dict)      # tool -> message
    na: dict = field(default_factory=dict)          # tool -> reason
    rss_kb: dict = field(default_factory=dict)      # tool -> max VmHWM
    find_lines: dict = field(default_factory=dict)
    tar_bytes: dict = field(default_factory=dict)
    cat_bytes: dict = field(default_factory=dict)
    find_out: dict = field(default_factory=dict)    # tool -> path of a (normalised, sorted) find listing
    checks: dict = field(default_factory=dict)      # (tool, write workload) -> what was wrong afterwards
    prepare_note: dict = field(default_factory=dict)

    def add(self, tool: str, metric: str, v: float) -> None:
        self.samples.setdefault((tool, metric), []).append(v)

    def med(self, tool: str, metric: str) -> float | None:
        xs = self.samples.get((tool, metric))
        return bl.median(xs) if xs else None


class Mounted:
    """A mount of *tool* at *mnt* for one session; always unmounted (cleanly, else forced)."""

    def __init__(self, tool: Tool, mnt: Path, res: Results, live: set, upper_base: Path | None = None):
        self.tool, self.mnt, self.res, self.live = tool, mnt, res, live
        self.upper_base = upper_base        # set: a writable mount with its upper in this fresh directory
        self.pid: int | None = None
        self.mount_s = 0.0

    def __enter__(self) -> "Mounted":
        if bl.is_mounted(self.mnt):
            bl.force_unmount(self.mnt)
        self.live.add(self.mnt)
        GATE.wait()
        t0 = time.perf_counter()
        if self.upper_base is None:
            self.tool.mount(self.mnt)
        else:
            self.tool.mount_rw(self.mnt, self.upper_base)
        bl.wait_mounted(self.mnt, timeout=60)
        os.listdir(self.mnt)  # ready = a first readdir answers
        self.mount_s = time.perf_counter() - t0
        self.pid = self.tool.find_pid(self.mnt)
        return self

    def __exit__(self, et, ev, tb) -> None:
        if self.pid:
            hwm = bl.tree_hwm_kb(self.pid)
            if hwm:
                self.res.rss_kb[self.tool.name] = max(self.res.rss_kb.get(self.tool.name, 0), hwm)
        try:
            if bl.is_mounted(self.mnt):
                self.tool.umount(self.mnt)
        except bl.BenchError as e:
            if et is None:
                self.res.errors.setdefault(self.tool.name, str(e))
        finally:
            bl.force_unmount(self.mnt)
            if self.pid and not bl.wait_gone(self.pid, 10):
                bl.kill_pid(self.pid)
            if not bl.is_mounted(self.mnt):
                self.live.discard(self.mnt)


def sh(cmd: str, what: str, timeout: float = 900) -> bl.Run:
    return bl.run(["bash", "-o", "pipefail", "-c", cmd], timeout=timeout, what=what)


def q(p: Path | str) -> str:
    import shlex
    return shlex.quote(str(p))


def t_find(mnt: Path, out: Path) -> float:
    return sh(f"find {q(mnt)} -printf '{FIND_FMT}' > {q(out)}", "find").seconds


def t_cat(mnt: Path) -> float:
    return sh(f"cat {q(mnt / BIG)} > /dev/null", "cat").seconds


def t_tar(mnt: Path) -> tuple[float, int]:
    r = sh(f"tar cf - -C {q(mnt)} usr | wc -c", "tar | wc -c")
    return r.seconds, int(r.stdout.split()[0])


CHECK_FMT = "%y %p %s %m %U %G %l\\n"


def listing(mnt: Path, dest: Path) -> int:
    """An untimed listing for the correctness check: type, path, size (not for directories: it is
    file-system specific), mode, numeric owner, symlink target; the root itself left out; sorted."""
    raw = dest.with_suffix(".raw")
    sh(f"find {q(mnt)} -mindepth 1 -printf '{CHECK_FMT}' > {q(raw)}", "find (listing)")
    prefix = str(mnt)
    lines = []
    with open(raw, "rb") as f:
        for line in f:
            s = line.decode("utf-8", "surrogateescape")
            typ, path, size, rest = s.split(" ", 3)
            if path.startswith(prefix):
                path = path[len(prefix):]
            if typ == "d":
                size = "-"
            lines.append(f"{typ} {path} {size} {rest}")
    raw.unlink()
    lines.sort()
    dest.write_text("".join(lines), errors="surrogateescape")
    return len(lines)


def session_find(tool, mnt, res, live, scratch, keep: bool):
    bl.drop_caches()
    with Mounted(tool, mnt, res, live) as m:
        res.add(tool.name, "mount_cold", m.mount_s)
        raw = scratch / "find.out"
        res.add(tool.name, "find_cold", t_find(mnt, raw))
        res.add(tool.name, "find_warm", t_find(mnt, raw))
        res.find_lines[tool.name] = sum(1 for _ in open(raw, "rb"))
        raw.unlink(missing_ok=True)
        if keep:
            dest = scratch / f"listing-{tool.name.replace(' ', '_')}.txt"
            listing(mnt, dest)
            res.find_out[tool.name] = dest


def session_cat(tool, mnt, res, live, keep: bool):
    bl.drop_caches()
    with Mounted(tool, mnt, res, live) as m:
        res.add(tool.name, "mount_cold", m.mount_s)
        res.add(tool.name, "cat_cold", t_cat(mnt))
        res.add(tool.name, "cat_warm", t_cat(mnt))
        if keep:
            r = sh(f"sha256sum {q(mnt / BIG)}", "sha256sum")
            res.cat_bytes[tool.name] = r.stdout.split()[0]


def session_tar(tool, mnt, res, live):
    bl.drop_caches()
    with Mounted(tool, mnt, res, live) as m:
        res.add(tool.name, "mount_cold", m.mount_s)
        dt, n = t_tar(mnt)
        res.add(tool.name, "tar_cold", dt)
        res.tar_bytes[tool.name] = n


def session_mount_warm(tool, mnt, res, live):
    with Mounted(tool, mnt, res, live) as m:
        res.add(tool.name, "mount_warm", m.mount_s)


def diff_listing(a: Path, b: Path, limit: int = 6) -> tuple[int, int, list[str]]:
    la = set(a.read_text(errors="surrogateescape").splitlines())
    lb = set(b.read_text(errors="surrogateescape").splitlines())
    only_a, only_b = sorted(la - lb), sorted(lb - la)
    ex = [f"-{x}" for x in only_b[:limit // 2]] + [f"+{x}" for x in only_a[:limit // 2]]
    return len(only_a), len(only_b), ex


# --- write workloads --------------------------------------------------------------------------

WRITES = ("untar", "append", "dd", "rm")
WRITE_FACTOR = 1.5      # target: layerfs <= 1.5x fuse-overlayfs on each write workload


def write_spec(quick: bool) -> dict:
    if quick:
        return {"untar_files": 1500, "append_files": 200, "dd_mb": 50}
    return {"untar_files": 20000, "append_files": 1000, "dd_mb": 500}


def append_targets(spec: dict, n: int) -> list[str]:
    """*n* files of the small-files layer that the image still shows (see build_layers: every 50th is
    whited out, d007 is deleted, d010 is opaque), spread evenly over the tree."""
    per = spec["small_per_dir"]
    ndirs = (spec["small"] + per - 1) // per
    hidden = {min(7, ndirs - 1), min(10, ndirs - 1)}
    cands = [f"srv/small/d{i // per:03d}/f{i:05d}.txt" for i in range(spec["small"])
             if i % 50 and i // per not in hidden]
    n = min(n, len(cands))
    return [cands[k * len(cands) // n] for k in range(n)]


@dataclass
class WriteCtx:
    archive: bi.Archive
    targets: list[str]          # lower files for copy-up-and-append
    dd_mb: int
    rm_tree: str = "srv/small"  # the 20k-small-files layer's tree


def w_untar(mnt: Path, wc: WriteCtx) -> float:
    d = mnt / "untar"
    return sh(f"mkdir {q(d)} && tar -xf {q(wc.archive.path)} -C {q(d)} && sync", "untar").seconds


def w_append(mnt: Path, wc: WriteCtx) -> float:
    # in-process, so that not a thousand shell or process starts are timed: the same for every tool
    paths = [os.path.join(mnt, p) for p in wc.targets]
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "a") as f:
            f.write("x\n")
    os.sync()
    return time.perf_counter() - t0


def w_dd(mnt: Path, wc: WriteCtx) -> float:
    return sh(f"dd if=/dev/zero of={q(mnt / 'dd.out')} bs=1M count={wc.dd_mb} conv=fsync status=none && sync",
              "dd").seconds


def w_rm(mnt: Path, wc: WriteCtx) -> float:
    return sh(f"rm -rf {q(mnt / wc.rm_tree)} && sync", "rm -rf").seconds


def check_write(wl: str, mnt: Path, wc: WriteCtx) -> str | None:
    """Untimed, through the mount, after the timed part: did the workload do what it should?"""
    if wl == "untar":
        got = bl.tree_counts(mnt / "untar")
        want = (wc.archive.files, wc.archive.dirs, wc.archive.file_bytes)
        return None if got == want else f"untar: (files, dirs, bytes) {got}, want {want}"
    if wl == "append":
        bad = 0
        for p in wc.targets:
            with open(mnt / p, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 2))
                if size <= 2 or f.read() != b"x\n":     # lower files have >= 16 bytes
                    bad += 1
        return None if not bad else f"append: {bad} of {len(wc.targets)} files not a lower file + 'x\\n'"
    if wl == "dd":
        size = os.stat(mnt / "dd.out").st_size
        return None if size == wc.dd_mb << 20 else f"dd: {size} bytes, want {wc.dd_mb << 20}"
    if wl == "rm":
        if os.path.lexists(mnt / wc.rm_tree):
            return f"rm: {wc.rm_tree} still there"
        return None if os.path.isdir(mnt / "srv") else "rm: srv gone too"
    return None


WRITE_FN = {"untar": w_untar, "append": w_append, "dd": w_dd, "rm": w_rm}


def write_labels(wc: WriteCtx) -> dict:
    n = wc.archive.files
    k = f"{n / 1000:g}k" if n >= 1000 else str(n)
    return {"untar": f"untar {k} files (tar -xf) + sync",
            "append": f"copy-up + append, {len(wc.targets)} lower files + sync",
            "dd": f"dd {wc.dd_mb} MB, bs=1M conv=fsync + sync",
            "rm": f"rm -rf {wc.rm_tree} (lower tree) + sync"}


class PySpy:
    """``py-spy record --gil`` (raw collapsed stacks) on a daemon while a workload runs; stop() ends it.
    Only samples of the thread holding the GIL: where the daemon's Python CPU time goes (without
    --gil, threads blocked in epoll or on the thread cache's lock show up as busy)."""

    def __init__(self, pid: int, out: Path, rate: int = 200):
        self.out = out
        self.log = open(out.with_suffix(".log"), "wb")
        self.proc = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", str(rate),
                                      "--threads", "--gil", "--nonblocking"], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        time.sleep(1.0)         # attached and sampling before the workload starts
        if self.proc.poll() is not None:
            self.log.close()
            raise bl.BenchError(f"py-spy exited ({self.proc.returncode}): "
                                + out.with_suffix(".log").read_text(errors="replace").strip()[-300:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def session_write(tool: Tool, wl: str, mnt: Path, res: Results, live: set, wc: WriteCtx, upper_root: Path,
                  profile: Path | None = None) -> float:
    """Drop caches, a fresh writable mount with a fresh, empty upper, the timed workload (ending with
    sync), an untimed check; the upper is removed after the unmount. Returns the workload's seconds."""
    base = upper_root / tool.name.replace(" ", "-")
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    try:
        bl.drop_caches()
        if wl == "untar":       # the archive comes from the page cache for every tool
            sh(f"cat {q(wc.archive.path)} > /dev/null", "cat archive")
        with Mounted(tool, mnt, res, live, upper_base=base) as m:
            spy = PySpy(m.pid, profile) if profile is not None and m.pid else None
            cpu0 = bl.proc_cpu_s(m.pid) if m.pid else None
            try:
                dt = WRITE_FN[wl](mnt, wc)
            finally:
                cpu1 = bl.proc_cpu_s(m.pid) if m.pid else None
                if spy is not None:
                    spy.stop()
            if profile is None:
                res.add(tool.name, wl, dt)
                if cpu0 and cpu1:
                    res.add(tool.name, wl + "_cpu", (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]))
                    res.add(tool.name, wl + "_sys", cpu1[1] - cpu0[1])
            bad = check_write(wl, mnt, wc)
            if bad:
                res.checks[(tool.name, wl)] = bad
        return dt
    finally:
        shutil.rmtree(base, ignore_errors=True)


def build_write_table(res: Results, tools: list[Tool], wc: WriteCtx) -> str:
    L, F, K = "layerfs", "fuse-overlayfs", "kernel overlayfs"
    names = [t.name for t in tools]
    labels = write_labels(wc)

    def failed(n, wl):
        return f"{n}|{wl}" in res.errors

    def cell(n, metric, wl):
        if n in res.na:
            return "n/a"
        v = res.med(n, metric)
        if v is None:
            return "failed" if failed(n, wl) or n in res.errors else "n/a"
        s = bl.fmt_s(v)
        lv, fv = res.med(L, metric), res.med(F, metric)
        if n == LayerfsVolatile.name:       # a variant of layerfs: its own ratio to fuse-overlayfs
            if fv:
                s += f" ({v / fv:.2f}x fuse-overlayfs)"
        elif n != L and lv is not None and v > 0:
            s += f" ({lv / v:.2f}x)"
        return s

    rows = []
    for wl in WRITES:
        lv, fv = res.med(L, wl), res.med(F, wl)
        ok = None if lv is None or fv is None or fv == 0 else lv / fv <= WRITE_FACTOR
        verdict = "n/a" if ok is None else ("met" if ok else "**NOT met**")
        rows.append([labels[wl]] + [cell(n, wl, wl) for n in names] + [f"<= {WRITE_FACTOR}x fuse-overlayfs", verdict])
        cpu = []
        for n in names:
            if n == K:
                cpu.append("(kernel)")
            elif res.med(n, wl + "_cpu") is None:
                cpu.append("n/a")
            else:
                cpu.append(f"{bl.fmt_s(res.med(n, wl + '_cpu'))} (sys {bl.fmt_s(res.med(n, wl + '_sys'))})")
        rows.append(["  mount daemon CPU during it"] + cpu + ["", ""])
    rows.append(["peak RSS of the mount process"] + [
        ("n/a" if n in res.na else ("(kernel)" if n == K else fmt_rss(res.rss_kb.get(n)))) for n in names] + ["", ""])
    header = ["workload (median)"] + names + ["target (layerfs)", "layerfs"]
    return bl.markdown_table(header, rows)


# --- the table --------------------------------------------------------------------------------

def fmt_rss(kb: int | None) -> str:
    return "n/a" if not kb else f"{kb / 1024:.0f} MB"


def build_table(res: Results, tools: list[Tool], prep: dict, big_mb: int) -> tuple[str, list[str]]:
    L = "layerfs"
    names = [t.name for t in tools]
    have_l = L in names and L not in res.na and L not in res.errors

    def cell(tool: str, metric: str) -> str:
        if tool in res.na:
            return "n/a"
        v = res.med(tool, metric)
        if v is None:
            return "n/a" if tool not in res.errors else "failed"
        s = bl.fmt_s(v)
        if tool != L and have_l:
            lv = res.med(L, metric)
            if lv is not None and v > 0:
                s += f" ({lv / v:.2f}x)"
        return s

    def ratio(metric, peer):
        a, b = res.med(L, metric), res.med(peer, metric)
        return None if a is None or b is None or b == 0 else a / b

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**NOT met**")

    rows = []

    def row(label, metric, target, ok):
        rows.append([label] + [cell(n, metric) for n in names] + [target, verdict(ok)])

    # preparation
    prow = ["prepare (one-time)"]
    for n in names:
        prow.append(prep.get(n, "n/a"))
    rows.append(prow + ["peers: extract / ratarmount index build", ""])

    lm = res.med(L, "mount_warm")
    rr = res.med("ratarmount", "mount_warm")
    ok = None
    if lm is not None:
        ok = lm <= 0.3 and (rr is None or rr / lm >= 5)
    row("mount ready (warm caches)", "mount_warm", "<= 0.3 s and >= 5x faster than ratarmount remount", ok)
    row("mount ready (cold caches)", "mount_cold", "", None)

    def cmp(metric, peer, factor):
        r = ratio(metric, peer)
        return None if r is None else r <= factor

    row("find -printf, cold", "find_cold", "<= fuse-overlayfs", cmp("find_cold", "fuse-overlayfs", 1.0))
    row("find -printf, warm", "find_warm", "<= fuse-overlayfs", cmp("find_warm", "fuse-overlayfs", 1.0))
    row(f"cat {big_mb} MB file, cold", "cat_cold", "<= 1.2x fuse-overlayfs", cmp("cat_cold", "fuse-overlayfs", 1.2))
    row(f"cat {big_mb} MB file, warm", "cat_warm", "<= 2x kernel overlayfs", cmp("cat_warm", "kernel overlayfs", 2.0))
    row("tar cf - usr | wc -c, cold", "tar_cold", "<= fuse-overlayfs", cmp("tar_cold", "fuse-overlayfs", 1.0))
    rows.append(["peak RSS of the mount process"] + [
        ("n/a" if n in res.na else ("(kernel)" if n == "kernel overlayfs" else fmt_rss(res.rss_kb.get(n))))
        for n in names] + ["", ""])
    rows.append(["find: lines"] + [str(res.find_lines.get(n, "n/a")) for n in names] + ["", ""])
    rows.append(["tar usr: bytes"] + [str(res.tar_bytes.get(n, "n/a")) for n in names] + ["", ""])
    header = ["metric (median)"] + names + ["target (layerfs)", "layerfs"]
    notes = []
    ref = "kernel overlayfs"
    if ref in res.find_out:
        for n in names:
            if n != ref and n in res.find_out:
                a, b, ex = diff_listing(res.find_out[n], res.find_out[ref])
                if a or b:
                    notes.append(f"tree listing of {n} differs from kernel overlayfs: {a} lines only in {n}, "
                                 f"{b} only in kernel overlayfs; e.g. " + "; ".join(ex))
                else:
                    notes.append(f"tree listing of {n} is identical to kernel overlayfs (types, paths, sizes, "
                                 "modes, owners, link targets)")
    sums = {n: h for n, h in res.cat_bytes.items()}
    if sums:
        want = next(iter(sums.values())) if ref not in sums else sums[ref]
        bad = [n for n, h in sums.items() if h != want]
        notes.append("cat: big file content identical on all tools" if not bad
                     else f"cat: big file CONTENT DIFFERS on {', '.join(bad)}")
    return bl.markdown_table(header, rows), notes


# --- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench"),
                    help="image cache, extracted layers, indexes, mount points (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=None, help="runs per tool (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="small image, 1 run: a smoke test")
    ap.add_argument("--only", help="comma-separated subset of: layerfs,overlay,fuse-overlayfs,ratarmount,"
                                   "layerfs-volatile")
    ap.add_argument("--no-pyc", action="store_true",
                    help="run layerfs with the environment's byte-code settings (default: byte code cached in "
                         "WORKDIR/pycache, as for an installed package)")
    ap.add_argument("--json", type=Path, help="also write the raw samples here")
    ap.add_argument("--no-wait-quiet", action="store_true",
                    help="do not wait for an idle machine before each mount (default: wait up to 30 s)")
    sec = ap.add_mutually_exclusive_group()
    sec.add_argument("--writes-only", action="store_true", help="only the write workloads (no read-only part)")
    sec.add_argument("--no-writes", action="store_true", help="only the read-only part")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="after the timed runs, one more (untimed) layerfs run of each write workload with "
                         "`py-spy record` on the mount daemon; raw stacks in DIR, a summary printed")
    args = ap.parse_args(argv)
    do_read, do_write = not args.writes_only, not args.no_writes
    runs = args.runs or (1 if args.quick else 3)
    if os.geteuid() != 0 or not bl.can_drop_caches():
        print("bench: needs root (mount, /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 1
    bl.install_signal_handlers()
    GATE.enabled = not (args.no_wait_quiet or args.quick)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if bl.fs_type(workdir) in ("tmpfs", "ramfs"):
        print(f"bench: warning: {workdir} is on {bl.fs_type(workdir)}: drop_caches cannot make it cold, "
              "so cold numbers are warm ones; use --workdir on a disk", file=sys.stderr)
    sub = workdir / ("quick" if args.quick else "full")
    sub.mkdir(exist_ok=True)
    pyc_note = bl.use_pycache(None if args.no_pyc else workdir / "pycache")
    res = Results()
    wres = Results()        # the write workloads
    wctx: WriteCtx | None = None
    upper_fs = "?"
    profiles: dict = {}     # write workload -> (seconds under py-spy, summary lines)
    live: set[Path] = set()
    failed = False
    prep: dict[str, str] = {}
    load0 = os.getloadavg()
    t_start = time.monotonic()
    tools: list[Tool] = []
    try:
        spec = image_spec(args.quick)
        img = bi.cached_image(workdir, "mount-quick" if args.quick else "mount", spec, build_layers(spec))
        # ratarmount gets the blobs under readable names (it keys its index on the path)
        blobs_dir = sub / "blobs"
        if blobs_dir.exists():
            shutil.rmtree(blobs_dir)
        blobs_dir.mkdir()
        blobs = []
        for i, l in enumerate(img.layers):
            p = blobs_dir / f"layer{i + 1}.tar.gz"
            os.symlink(l.path, p)
            blobs.append(p)
        ctx = Ctx(sub, img, [], blobs, sub / "store", None, sub / "ratarmount-index")
        wanted = None
        if args.only:
            wanted = set()
            for k in args.only.split(","):
                if k.strip() not in KEYS:
                    print(f"bench: unknown tool {k!r} (choose from {', '.join(KEYS)})", file=sys.stderr)
                    return 2
                wanted.add(KEYS[k.strip()])
        tools = [T(ctx) for T in TOOLS if (wanted is None or T.name in wanted) and (do_read or T.writable)]
        names = [t.name for t in tools]

        # layerfs: pull from a private registry into a fresh store
        if any(n.startswith("layerfs") for n in names):
            if ctx.store.exists():
                shutil.rmtree(ctx.store)
            try:
                with br.Registry(base=workdir) as reg:
                    br.push_image(reg.host, REPO, TAG, img)
                    ref = f"{reg.host}/{REPO}:{TAG}"
                    r = bl.run(bl.layerfs_cmd("--root", str(ctx.store), "pull", ref), env=bl.layerfs_env(),
                               cwd=bl.REPO_ROOT, timeout=900, what="layerfs pull")
                    ctx.ref = ref
                    prep["layerfs"] = f"pull {bl.fmt_s(r.seconds)}"
                    bl.log(f"layerfs pull: {r.seconds:.2f} s")
            except bl.BenchError as e:
                res.errors["layerfs"] = str(e)
                failed = True
        # the registry is stopped again: a pulled image must mount without it
        for t in tools:
            why = t.unavailable()
            if why:
                res.na[t.name] = why
        if any(n in names for n in ("kernel overlayfs", "fuse-overlayfs")):
            ts = []
            for r in range(runs if do_read else 1):
                bl.drop_caches()
                GATE.wait()
                t0 = time.perf_counter()
                ctx.lowers = prepare_lowers(img, sub / "lowers")
                ts.append(time.perf_counter() - t0)
                bl.log(f"extract into overlay form: {ts[-1]:.2f} s")
            for n in ("kernel overlayfs", "fuse-overlayfs"):
                prep[n] = f"extract {bl.fmt_s(bl.median(ts))}"
        mnt_root = sub / "mnt"
        mnt_root.mkdir(exist_ok=True)
        mnts = {}
        for t in tools:
            m = mnt_root / t.name.replace(" ", "-")
            if bl.is_mounted(m):
                bl.force_unmount(m)
            m.mkdir(exist_ok=True)
            mnts[t.name] = m.resolve()
        if do_read and "ratarmount" in names and "ratarmount" not in res.na:
            ts = []
            try:
                for r in range(runs):
                    shutil.rmtree(ctx.ratar_index, ignore_errors=True)
                    bl.drop_caches()
                    with Mounted(tools[names.index("ratarmount")], mnts["ratarmount"], res, live) as m:
                        ts.append(m.mount_s)
                    bl.log(f"ratarmount first mount (index build): {ts[-1]:.2f} s")
                prep["ratarmount"] = f"index {bl.fmt_s(bl.median(ts))}"
            except bl.BenchError as e:
                res.errors["ratarmount"] = str(e)
                failed = True

        scratch = sub / "scratch"
        scratch.mkdir(exist_ok=True)
        for r in range(runs if do_read else 0):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for t in order:
                if t.name in res.na or t.name in res.errors or not t.reads:
                    continue
                mnt = mnts[t.name]
                try:
                    session_find(t, mnt, res, live, scratch, keep=(r == 0))
                    session_cat(t, mnt, res, live, keep=(r == 0))
                    session_tar(t, mnt, res, live)
                    session_mount_warm(t, mnt, res, live)
                    bl.log(f"run {r + 1}/{runs} {t.name}: " + ", ".join(
                        f"{k} {bl.fmt_s(res.samples[(t.name, k)][-1])}" for k in
                        ("mount_warm", "find_cold", "find_warm", "cat_cold", "cat_warm", "tar_cold")))
                except (bl.BenchError, OSError) as e:
                    res.errors[t.name] = str(e)
                    failed = True
                    bl.log(f"run {r + 1}/{runs} {t.name} FAILED: {e}")

        # write workloads: each on a fresh writable mount with a fresh upper on the work dir's disk
        if do_write:
            wspec = write_spec(args.quick)
            archive = bi.cached_small_archive(workdir, wspec["untar_files"])
            wctx = WriteCtx(archive, append_targets(spec, wspec["append_files"]), wspec["dd_mb"])
            wtools = [t for t in tools if t.writable]
            for t in wtools:
                why = t.write_unavailable()
                if why:
                    wres.na[t.name] = why
            upper_root = sub / "uppers"
            upper_root.mkdir(exist_ok=True)
            upper_fs = bl.fs_type(upper_root)
            for r in range(runs):
                order = wtools[r % len(wtools):] + wtools[:r % len(wtools)] if wtools else []
                for wl in WRITES:
                    for t in order:
                        if t.name in wres.na or t.name in wres.errors or f"{t.name}|{wl}" in wres.errors:
                            continue
                        try:
                            dt = session_write(t, wl, mnts[t.name], wres, live, wctx, upper_root)
                            bl.log(f"writes run {r + 1}/{runs} {t.name}: {wl} {bl.fmt_s(dt)}")
                        except (bl.BenchError, OSError) as e:
                            wres.errors[f"{t.name}|{wl}"] = str(e)
                            failed = True
                            bl.log(f"writes run {r + 1}/{runs} {t.name} {wl} FAILED: {e}")
            lt = next((t for t in wtools if t.name == "layerfs"), None)
            if args.profile and lt is not None and "layerfs" not in wres.na:
                args.profile.mkdir(parents=True, exist_ok=True)
                for wl in WRITES:
                    out = args.profile.resolve() / f"layerfs-{wl}.txt"
                    try:
                        dt = session_write(lt, wl, mnts["layerfs"], wres, live, wctx, upper_root, profile=out)
                        profiles[wl] = (dt, bl.pyspy_summary(out) if out.exists() else ["(no py-spy output)"])
                        bl.log(f"profiled layerfs {wl}: {bl.fmt_s(dt)} (under py-spy) -> {out}")
                    except (bl.BenchError, OSError) as e:
                        profiles[wl] = (None, [f"FAILED: {e}"])
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except bl.BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        for m in list(live):
            bl.force_unmount(m)
            for pid in bl.pids_serving(m):
                bl.kill_pid(pid)

    m = img.meta
    image_line = (f"{len(img.layers)} gzip layers, {bl.mb(img.uncompressed_size)} "
                  f"uncompressed, {bl.mb(img.compressed_size)} compressed, {img.entries} tar entries "
                  f"({m.get('base_files')} base files from the host's /usr, {m.get('small_files')} small files, "
                  f"{m.get('whiteouts')} whiteouts, 2 opaque dirs)")
    def host_line() -> None:
        print(f"Host: {platform.node()} {platform.release()}, {os.cpu_count()} CPUs; load average before "
              f"{load0[0]:.1f}, after {os.getloadavg()[0]:.1f}; {time.monotonic() - t_start:.0f} s in all; "
              f"{GATE.summary()}.\n{pyc_note}.")

    if do_read:
        table, notes = build_table(res, [t for t in tools if t.reads], prep,
                                   round(image_spec(args.quick)["big"] / 2**20))
        print(f"\n## Read-only mount benchmark: {image_line}; {runs} run(s), medians\n")
        print(table)
        print("\nPeer cells: value (layerfs / peer; below 1 = layerfs faster). "
              "Cold = sync + drop_caches + fresh mount.")
        host_line()
        for n, why in res.na.items():
            print(f"- {n}: n/a: {why}")
        for n, e in res.errors.items():
            print(f"- {n}: FAILED: {e}")
        for line in notes:
            print(f"- {line}")
        if "ratarmount" in [t.name for t in tools]:
            print("- ratarmount does not apply OCI whiteouts/opaque dirs: it shows .wh.* files and deleted entries.")
    if do_write and wctx is not None:
        wtools = [t for t in tools if t.writable]
        print(f"\n## Write workloads on a writable mount of the same image; {runs} run(s), medians\n")
        print(build_write_table(wres, wtools, wctx))
        print(f"\nEach sample: sync + drop_caches, a fresh writable mount with a fresh, empty upper directory "
              f"(and work dir) on the work dir's {upper_fs}, then the timed workload, which ends with `sync`. "
              "Peer cells: value (layerfs / peer; below 1 = layerfs faster); the `layerfs -o volatile` column "
              "(copy-ups and fsync(2) not synced, as kernel overlayfs's option) shows its own ratio to "
              "fuse-overlayfs, which syncs neither. untar: a plain tar of "
              f"{wctx.archive.files} files ({bl.mb(wctx.archive.file_bytes)}), read from the page cache, into "
              f"a new directory at the mount's root; append: open(..., 'a').write('x\\n') in the benchmark's "
              "process on lower files of the small-files layer (each a copy-up), then os.sync(); rm -rf: the "
              "small-files layer's tree (every file a lower one: whiteouts in the upper). Daemon CPU: user+sys "
              "of the FUSE process from /proc/PID/stat over the timed part.")
        if not do_read:
            print(f"Image: {image_line}.")
            host_line()
        for (n, wl), bad in sorted(wres.checks.items()):
            print(f"- {n}: CHECK FAILED after {wl}: {bad}")
        if not wres.checks and wres.samples:
            print("- checks after each sample (through the mount): all passed")
        for n, why in wres.na.items():
            print(f"- {n}: writes n/a: {why}")
        for n, e in wres.errors.items():
            print(f"- {n.replace('|', ', ')}: writes FAILED: {e}")
        if any(t.name == "ratarmount" for t in tools):
            print("- ratarmount: read-only here, not in the write workloads")
        for wl, (dt, lines) in profiles.items():
            print(f"\n### py-spy --gil on the layerfs daemon: {write_labels(wctx)[wl]} "
                  f"({bl.fmt_s(dt)} under py-spy, not in the table)\n")
            print("```\n" + "\n".join(lines) + "\n```")
    if args.json:
        args.json.write_text(json.dumps({
            "samples": {f"{k[0]}|{k[1]}": v for k, v in res.samples.items()}, "rss_kb": res.rss_kb,
            "errors": res.errors, "na": res.na, "prepare": prep, "image": img.to_json(),
            "writes": {"samples": {f"{k[0]}|{k[1]}": v for k, v in wres.samples.items()}, "rss_kb": wres.rss_kb,
                       "errors": wres.errors, "na": wres.na,
                       "checks": {f"{k[0]}|{k[1]}": v for k, v in wres.checks.items()}}}, indent=1))
    return 1 if failed or res.errors or wres.errors or wres.checks else 0


if __name__ == "__main__":
    sys.exit(main())
