#!/usr/bin/env python3
"""In-process read benchmark of the data path below the FUSE adapter:
``MergedTree.read(ino, off, size)`` on the image of ``scripts/bench.py``, cold.

    python scripts/bench_read.py [--workdir DIR] [--runs 5] [--threads 1,4,8]
                                 [--workload tar,cat] [--profile FILE] [--warm]

Needs root (drop_caches). The image is the one ``scripts/bench.py`` generates
(cached in --workdir, built on first use); it is imported once with
``layerfs load oci:LAYOUT`` into a store of its own (WORKDIR/read/store).

Workloads, each sample after ``sync; echo 3 > /proc/sys/vm/drop_caches`` and
with a freshly opened merged tree (new layer readers, empty span caches):

  tar: every regular file under usr/ in directory-walk order (what
       ``tar cf - usr`` reads), each in requests of up to --chunk bytes
       (1 MiB, the adapter's request size).
  cat: opt/big/blob.bin (200 MB, incompressible) front to back in 1 MiB requests.

With 1 thread the requests are served one after the other (a reader that
waits for each reply, like tar on small files). With N threads, N workers take
the next request of the same ordered list as soon as they are free (the
kernel's parallel readahead requests): at most N requests are in flight, all
near the reader's position. Every sample checks the total byte count; the
first also a hash of the bytes, against a warm single-thread pass.

--fuse times instead the commands of scripts/bench.py (`tar cf - -C MNT usr |
wc -c`, `cat MNT/opt/big/blob.bin`) through a fresh `layerfs mount
--read-only` after drop_caches: the whole path, adapter included; and the same
through fuse-overlayfs if scripts/bench.py left its extracted layers in
WORKDIR/full/lowers.

Prints per workload and thread count the median and all samples (seconds),
MB/s of file data and the process's CPU time (user+sys, all threads); --profile FILE writes a cProfile of one more sample
(1 thread, both workloads) to FILE and prints its top entries.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchrootfs as rootfs  # noqa: E402

from layerfs.index import spancache  # noqa: E402
from layerfs.fs import imagetree  # noqa: E402
from layerfs.store import Store  # noqa: E402
from layerfs.transfer import LoadOptions, load  # noqa: E402

MiB = 1 << 20


def prepare(workdir: Path) -> tuple[Store, object]:
    """The bench image in a store of its own (imported from the cached OCI layout on first use)."""
    spec = rootfs.image_spec(False)
    img = bi.cached_image(workdir, "mount", spec, rootfs.build_layers(spec))
    store = Store(workdir / "read" / "store")
    store.init()
    recs = store.images()
    if not recs:
        bl.log(f"importing {img.layout} into {store.root}")
        load(store, f"oci:{img.layout}", LoadOptions(single=True))
        recs = store.images()
    _, manifest = store.resolve(recs[0].name)
    return store, manifest


def open_tree(store: Store, manifest):
    return imagetree.open_image_tree(store, manifest)


def requests_for(tree, workload: str, chunk: int) -> list[tuple[int, int, int]]:
    reqs: list[tuple[int, int, int]] = []
    if workload == "tar":
        root = tree.lookup(1, "usr")
        for _, node in tree.walk(root.ino, "usr"):
            if node is None or (node.mode & 0o170000) != 0o100000:
                continue
            for off in range(0, max(node.size, 1), chunk):
                reqs.append((node.ino, off, chunk))
    else:
        node = tree.get(1)
        for part in rootfs.BIG.split("/"):
            node = tree.lookup(node.ino, part)
        for off in range(0, node.size, MiB):
            reqs.append((node.ino, off, MiB))
    return reqs


def run_requests(tree, reqs, threads: int, digest: bool = False) -> tuple[float, int, str]:
    """Serve *reqs* with *threads* workers; returns (seconds, bytes, sha256 of the bytes in order or '')."""
    results: list[bytes | None] = [None] * len(reqs) if digest else []
    total = [0] * max(threads, 1)
    read = tree.read
    if threads <= 1:
        t0 = time.perf_counter()
        n = 0
        for i, (ino, off, size) in enumerate(reqs):
            data = read(ino, off, size)
            n += len(data)
            if digest:
                results[i] = data
        dt = time.perf_counter() - t0
        total[0] = n
    else:
        lock = threading.Lock()
        nxt = [0]
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            n = 0
            try:
                while True:
                    with lock:
                        i = nxt[0]
                        nxt[0] = i + 1
                    if i >= len(reqs):
                        break
                    ino, off, size = reqs[i]
                    data = read(ino, off, size)
                    n += len(data)
                    if digest:
                        results[i] = data
            except BaseException as e:   # noqa: BLE001 - reported below
                errors.append(e)
            total[k] = n

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
    h = ""
    if digest:
        hh = hashlib.sha256()
        for r in results:
            hh.update(r)
        h = hh.hexdigest()
    return dt, sum(total), h


def fuse_runs(store: Store, name: str, workdir: Path, runs: int) -> None:
    """End to end through ``layerfs mount --read-only``: the commands of scripts/bench.py, cold;
    also through fuse-overlayfs when scripts/bench.py left its extracted layers in WORKDIR/full/lowers."""
    mnt = workdir / "read" / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    lowers = [workdir / "full" / "lowers" / f"L{i}" for i in range(1, 7)]
    tools = {"layerfs": (bl.layerfs_cmd("--root", str(store.root), "mount", "--read-only", name, str(mnt)),
                         bl.layerfs_cmd("--root", str(store.root), "umount", str(mnt)))}
    if shutil.which("fuse-overlayfs") and all(p.is_dir() for p in lowers):
        lower = ":".join(str(p) for p in reversed(lowers))
        tools["fuse-overlayfs"] = (["fuse-overlayfs", "-o", f"lowerdir={lower}", str(mnt)],
                                   ["fusermount3", "-u", str(mnt)])
    cmds = {"tar": f"tar cf - -C {mnt} usr | wc -c", "cat": f"cat {mnt}/{rootfs.BIG} >/dev/null"}
    res: dict[tuple[str, str], list[float]] = {}
    for r in range(runs):
        for tool, (mount, umount) in tools.items():
            for w, cmd in cmds.items():
                bl.drop_caches()
                bl.run(mount, env=bl.layerfs_env(), cwd=bl.REPO_ROOT, timeout=120, what=f"{tool} mount")
                try:
                    t0 = time.perf_counter()
                    subprocess.run(["sh", "-c", cmd], check=True, stdout=subprocess.DEVNULL)
                    res.setdefault((w, tool), []).append(time.perf_counter() - t0)
                finally:
                    bl.run(umount, env=bl.layerfs_env(), cwd=bl.REPO_ROOT, timeout=60, what=f"{tool} umount")
                bl.log(f"fuse run {r + 1}/{runs} {tool} {w}: {res[w, tool][-1]:.3f} s")
    print(f"\n## end to end, cold, medians of {runs}\n")
    print(bl.markdown_table(["command", "tool", "median", "samples"],
                            [[cmds[w].replace(str(mnt), "MNT"), tool, f"{bl.median(xs):.3f} s",
                              " ".join(f"{x:.3f}" for x in xs)] for (w, tool), xs in sorted(res.items())]))


def close_tree(tree) -> None:
    for r in tree.readers:
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--workload", default="tar,cat")
    ap.add_argument("--chunk", type=int, default=MiB, help="request size of the tar workload")
    ap.add_argument("--ahead", default=None,
                    help="decode-ahead worker counts to compare, e.g. 0,2 (0: off; default: the reader's own)")
    ap.add_argument("--warm", action="store_true", help="do not drop caches (blob files in the page cache)")
    ap.add_argument("--no-check", action="store_true", help="skip the content hash check")
    ap.add_argument("--fuse", action="store_true",
                    help="instead: time `tar cf - usr` and `cat` of the big file through `layerfs mount`, cold")
    ap.add_argument("--profile", type=Path, help="cProfile one more 1-thread sample of each workload")
    args = ap.parse_args()
    if not args.warm and not bl.can_drop_caches():
        print("bench_read: needs root for drop_caches (or --warm)", file=sys.stderr)
        return 2
    store, manifest = prepare(args.workdir.resolve())
    if args.fuse:
        fuse_runs(store, store.images()[0].name, args.workdir.resolve(), args.runs)
        return 0
    workloads = [w for w in args.workload.split(",") if w]
    threads = [int(t) for t in args.threads.split(",") if t]

    tree = open_tree(store, manifest)
    plans = {w: requests_for(tree, w, args.chunk) for w in workloads}
    ref: dict[str, tuple[int, str]] = {}
    for w in workloads:
        if not args.no_check:
            _, n, h = run_requests(tree, plans[w], 1, digest=True)
            ref[w] = (n, h)
        nfiles = len({r[0] for r in plans[w]})
        bl.log(f"{w}: {nfiles} files, {len(plans[w])} requests")
    close_tree(tree)

    aheads = [None] if args.ahead is None else [int(a) for a in args.ahead.split(",")]
    samples: dict[tuple[str, int, int | None], list[float]] = {}
    nbytes: dict[str, int] = {}
    cpu: dict[tuple[str, int, int | None], list[float]] = {}
    for r in range(args.runs):
        for w, t, a in [(w, t, a) for w in workloads for t in threads for a in aheads]:
            if a is not None and hasattr(spancache, "DECODE_AHEAD"):
                spancache.DECODE_AHEAD.workers = a
            if not args.warm:
                bl.drop_caches()
            tree = open_tree(store, manifest)
            check = not args.no_check and r == 0
            c0 = os.times()
            dt, n, h = run_requests(tree, plans[w], t, digest=check)
            c1 = os.times()
            close_tree(tree)
            cpu.setdefault((w, t, a), []).append(c1.user + c1.system - c0.user - c0.system)
            if w in ref and (n != ref[w][0] or (check and h != ref[w][1])):
                print(f"bench_read: {w} with {t} threads read wrong bytes ({n} vs {ref[w][0]})",
                      file=sys.stderr)
                return 1
            nbytes[w] = n
            samples.setdefault((w, t, a), []).append(dt)
            bl.log(f"run {r + 1}/{args.runs} {w} threads={t} ahead={a}: {dt:.3f} s "
                   f"(cpu {cpu[w, t, a][-1]:.3f} s)")

    mode = "warm" if args.warm else "cold"
    print(f"\n## MergedTree.read, {mode}, medians of {args.runs}\n")
    rows = []
    for (w, t, a), xs in samples.items():
        med = bl.median(xs)
        rows.append([w, str(t), "-" if a is None else str(a), f"{med:.3f} s", f"{nbytes[w] / med / 1e6:.0f} MB/s",
                     f"{bl.median(cpu[w, t, a]):.3f} s",
                     " ".join(f"{x:.3f}" for x in xs)])
    print(bl.markdown_table(["workload", "threads", "ahead", "median", "throughput", "CPU (median)", "samples"], rows))

    if args.profile:
        prof = cProfile.Profile()
        for w in workloads:
            if not args.warm:
                bl.drop_caches()
            tree = open_tree(store, manifest)
            prof.enable()
            run_requests(tree, plans[w], 1)
            prof.disable()
            close_tree(tree)
        prof.dump_stats(str(args.profile))
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
