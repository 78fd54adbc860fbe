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
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchregistry as br  # noqa: E402
from benchmeasure import (  # noqa: E402
    GATE,
    Mounted,
    Results,
    diff_listing,
    fmt_rss,
    session_cat,
    session_find,
    session_mount_warm,
    session_tar,
)
from benchrootfs import build_layers, image_spec  # noqa: E402
from benchtools import KEYS, TOOLS, Ctx, Tool, prepare_lowers  # noqa: E402
from benchwrites import WRITES, WriteCtx, append_targets, build_write_table, session_write, write_labels, write_spec  # noqa: E402

REPO, TAG = "bench/mount", "v1"


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
