#!/usr/bin/env python3
"""Scale benchmark: how pull and mount grow with the number of entries in an image.

    python scripts/bench_scale.py [--workdir DIR] [--sizes 25000,100000,500000]

For each size N it generates (once, cached in --workdir) a two-layer gzip image of
N entries shaped like a big node_modules tree (packages of a directory, a lib/
directory and eight small text files; the upper layer adds packages, rewrites some
files of the lower one and deletes a few), pushes it to its own docker-registry on
127.0.0.1, then, with a fresh store:

- pull: ``layerfs pull`` wall time and peak RSS (the process's own VmHWM, threads included);
- first mount: ``layerfs mount --read-only`` wall time (builds the tree cache), then umount;
- mount-ready: the same on a remount (tree cache present): the command returns once the mount answers;
  beside it, in parentheses, the time of ``layerfs mounts`` (what starting the command line costs);
- the daemon's RSS (VmRSS) right after that mount, idle;
- cold find: ``find MNT`` over the whole fresh mount (no entry seen by the kernel yet);
- the daemon's RSS after the find.

Prints a Markdown table. Exit status: 0 ok, 1 a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchregistry as br  # noqa: E402

FILES_PER_PACKAGE = 8          # + the package directory and its lib/ directory: 10 entries per package


def image_spec(entries: int) -> dict:
    return {"version": 1, "shape": "node_modules", "entries": entries}


def build_layers(entries: int):
    def build(blobdir: Path):
        rng = random.Random(entries)
        text = bi.TextSource(seed=3, pool=1 << 20)
        packages = max(2, entries // (FILES_PER_PACKAGE + 2))
        lower = packages * 2 // 5
        layers = []

        def package(w: bi.LayerWriter, p: int) -> None:
            base = f"app/node_modules/pkg{p:06d}"
            w.dir(base)
            w.dir(base + "/lib")
            w.file(base + "/package.json", text.take(rng.randint(60, 400)))
            w.file(base + "/index.js", text.take(rng.randint(60, 400)))
            for k in range(FILES_PER_PACKAGE - 2):
                w.file(f"{base}/lib/f{k}.js", text.take(rng.randint(40, 600)))

        with bi.LayerWriter(blobdir, level=6, comment="lower: packages") as w:
            for d in ("app", "app/node_modules"):
                w.dir(d)
            for p in range(lower):
                package(w, p)
        layers.append(w.blob)
        with bi.LayerWriter(blobdir, level=6, comment="upper: more packages, rewrites, deletions") as w:
            for p in range(lower, packages):
                package(w, p)
            for p in range(0, lower, 97):     # rewrite a file of the lower layer
                w.file(f"app/node_modules/pkg{p:06d}/index.js", text.take(100))
            for p in range(50, lower, 211):   # delete a package of the lower layer
                w.whiteout(f"app/node_modules/pkg{p:06d}")
        layers.append(w.blob)
        return layers, {"entries": entries}
    return build


def run_measured(cmd: list[str], what: str, timeout: float = 1800) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one command. The peak is the command's own VmHWM, read
    while it runs (wait4's ru_maxrss would also count this process, which the child was forked from)."""
    t0 = time.monotonic()
    err_f = tempfile.TemporaryFile()       # not a pipe: a chatty command must not block on it
    p = subprocess.Popen(cmd, env=bl.layerfs_env(), cwd=bl.REPO_ROOT, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=err_f)
    deadline = t0 + timeout
    hwm_kb = 0
    while True:
        hwm_kb = max(hwm_kb, bl.proc_status_kb(p.pid, "VmHWM") or 0)
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            os.wait4(p.pid, 0)
            err_f.close()
            raise bl.BenchError(f"{what} timed out")
        time.sleep(0.01)
    secs = time.monotonic() - t0
    err_f.seek(0)
    err = err_f.read().decode(errors="replace")
    err_f.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise bl.BenchError(f"{what} failed ({p.returncode}): {err.strip()[-500:]}")
    return secs, hwm_kb * 1024


def daemon_pid(store: Path, mnt: Path) -> int | None:
    """The mount daemon's pid, from ``layerfs mounts --format json`` (one record a line)."""
    out = bl.run(bl.layerfs_cmd("--root", str(store), "mounts", "--format", "json"), env=bl.layerfs_env(),
                 cwd=bl.REPO_ROOT, timeout=60, what="layerfs mounts").stdout
    for line in out.splitlines():
        rec = json.loads(line)
        if os.path.normpath(rec.get("mountpoint", "")) == str(mnt):
            return int(rec["pid"])
    return None


def rss_mb(pid: int | None) -> float | None:
    kb = bl.proc_status_kb(pid, "VmRSS") if pid else None
    return kb / 1024 if kb is not None else None


def measure(reg: br.Registry, img: bi.Image, entries: int, base: Path) -> dict:
    repo = f"bench/scale{entries}"
    br.push_image(reg.host, repo, "v1", img)
    ref = f"{reg.host}/{repo}:v1"
    store = base / f"store-{entries}"
    mnt = base / f"mnt-{entries}"
    shutil.rmtree(store, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    lf = ["--root", str(store)]
    r: dict = {"entries": img.entries}
    subprocess.run(["sync"], check=False)
    r["pull_s"], r["pull_rss"] = run_measured(bl.layerfs_cmd(*lf, "pull", ref), "layerfs pull")
    mount = bl.layerfs_cmd(*lf, "mount", "--read-only", ref, str(mnt))
    umount = bl.layerfs_cmd(*lf, "umount", str(mnt))
    try:
        r["mount1_s"], _ = run_measured(mount, "layerfs mount (first)")
        run_measured(umount, "layerfs umount")
        r["cli_s"], _ = run_measured(bl.layerfs_cmd(*lf, "mounts"), "layerfs mounts")
        r["mount_s"], _ = run_measured(mount, "layerfs mount (remount)")
        pid = daemon_pid(store, mnt)
        time.sleep(0.3)
        r["rss_idle"] = rss_mb(pid)
        t0 = time.monotonic()
        out = subprocess.run(["find", str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)
        r["find_s"] = time.monotonic() - t0
        r["found"] = out.stdout.count(b"\n")
        r["rss_find"] = rss_mb(pid)
        run_measured(umount, "layerfs umount")
    finally:
        if bl.is_mounted(mnt):
            bl.force_unmount(mnt)
    shutil.rmtree(store, ignore_errors=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "layerfs-bench-scale")
    ap.add_argument("--sizes", default="25000,100000,500000")
    a = ap.parse_args(argv)
    bl.install_signal_handlers()
    a.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    rows = []
    base = Path(tempfile.mkdtemp(prefix="run-", dir=a.workdir))
    try:
        with br.Registry(a.workdir) as reg:
            for n in sizes:
                img = bi.cached_image(a.workdir, f"scale{n}", image_spec(n), build_layers(n))
                bl.log(f"{n} entries: measuring")
                r = measure(reg, img, n, base)
                bl.log(f"{n}: {r}")
                rows.append([f"{r['entries']:,}", bl.fmt_s(r["pull_s"]), bl.mb(r["pull_rss"]),
                             bl.fmt_s(r["mount1_s"]), f"{bl.fmt_s(r['mount_s'])} ({bl.fmt_s(r['cli_s'])})",
                             f"{r['rss_idle']:.0f} MB" if r["rss_idle"] else "?",
                             bl.fmt_s(r["find_s"]), f"{r['rss_find']:.0f} MB" if r["rss_find"] else "?",
                             f"{r['found']:,}"])
    except bl.BenchError as e:
        print(f"bench_scale: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(bl.markdown_table(["entries", "pull", "pull peak RSS", "first mount", "mount-ready, remount (CLI start)",
                             "daemon RSS idle", "cold find", "daemon RSS after find", "names found"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
