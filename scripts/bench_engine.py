#!/usr/bin/env python3
"""Engine benchmark: `podman run IMAGE cat /etc/os-release`, plain podman vs podman with the layerfs store.

    python scripts/bench_engine.py [--workdir DIR] [--runs 3] [--mbit 100] [--quick]

The image is bench_lazy.py's (about 450 MB uncompressed in 4 gzip layers; --quick:
~20 MB) with one more layer below them that makes it runnable: the host's
/usr/bin/cat, its C library and dynamic loader. The script starts its own
docker-registry on 127.0.0.1, pushes the image, its eStargz conversion (`layerfs
convert --estargz`) and the plain image's layer indexes (`layerfs index push`),
all as bench_lazy.py does. podman and layerfs reach the registry only through
bench_lazy.py's throttling proxy (--mbit, shared by all connections), which
counts the bytes.

Variants, each run with a fresh podman storage root (and a fresh layerfs store),
page cache dropped when root; the timer starts at `podman run` and stops when its
output (the image's os-release) has arrived:

    (a) plain podman: podman pulls the image, then runs it
    (b) podman + layerfs store, eStargz image: `layerfs store serve` runs (started
        before the timer, as on a node), storage.conf lists it as an additional
        layer store
    (c) podman + layerfs store, the plain gzip image with its pushed index

Prints a Markdown table of medians: time to output, plain / this, bytes through the
proxy, % of plain. Target: the store >= 10x sooner, < 10% of the bytes.
Needs root, podman, runc, /dev/fuse. Exit status: 0 ok; 1 a step failed; 3 with
--fail-on-target when the target is missed.
"""
from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import bench_lazy as bz  # noqa: E402
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchregistry as br  # noqa: E402
from podman import Podman  # noqa: E402

SPEEDUP_TARGET = 10.0
BYTES_TARGET = 0.10
VARIANTS = ("plain podman (pull + run)", "podman + layerfs store, eStargz", "podman + layerfs store, gzip + index")
RUNTIME_FILES = (("/usr/bin/cat", "usr/bin/cat"),
                 ("/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
                 ("/lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))


def build_layers(spec: dict):
    """bench_lazy.py's layers, with a runtime layer (cat, libc, loader) below them."""
    inner = bz.build_layers(spec)

    def build(blobdir: Path):
        with bi.LayerWriter(blobdir, level=6, comment="runtime: cat, libc, loader") as w:
            for d in ("usr", "usr/bin", "usr/lib", "usr/lib/x86_64-linux-gnu", "lib64"):
                w.dir(d)
            for src, dst in RUNTIME_FILES:
                w.file(dst, Path(os.path.realpath(src)).read_bytes(), mode=0o755)
            w.symlink("bin", "usr/bin")
            w.symlink("lib", "usr/lib")
            w.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        layers, meta = inner(blobdir)
        return [w.blob] + layers, meta
    return build


def run_container(podman: Podman, ref: str, timeout: float) -> float:
    """Seconds from `podman run` to its output (the whole os-release)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(podman.cmd("run", "--rm", "--network", "none", ref, "cat", "/etc/os-release"),
                         env=podman.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = b""
    t_out = None
    try:
        deadline = t0 + timeout
        while len(got) < len(bz.OS_RELEASE):
            if time.perf_counter() > deadline:
                raise bl.BenchError(f"podman run {ref}: no output within {timeout:g} s")
            b = p.stdout.read1(65536)
            if not b:
                break
            got += b
        t_out = time.perf_counter() - t0
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if got != bz.OS_RELEASE or p.returncode != 0:
        raise bl.BenchError(f"podman run {ref}: exit {p.returncode}, output {got[:80]!r}, "
                            f"{err.decode(errors='replace')[-300:]}")
    return t_out


def one_run(variant: str, ref: str, base: Path, proxy: bz.ThrottleProxy, timeout: float, drop: bool) -> dict:
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    store_root, mnt = base / "layerfs", base / "mnt"
    use_store = variant != VARIANTS[0]
    podman = None
    res: dict = {}
    try:
        if use_store:
            mnt.mkdir()
            bz.lfs(store_root, "store", "serve", str(mnt), timeout=timeout, what="layerfs store serve")
            bl.wait_mounted(mnt.resolve(), timeout=30)
        podman = Podman(base / "podman", proxy.host, mnt if use_store else None)
        if drop:
            bl.drop_caches()
        else:
            os.sync()
        proxy.reset()
        res["output_s"] = run_container(podman, ref, timeout)
        res["bytes"] = proxy.down
        if use_store:
            enc = base64.b64encode(ref.encode()).decode()
            res["store_used"] = (mnt / enc).is_dir() and bool(os.listdir(mnt / enc))
            if not res["store_used"]:
                raise bl.BenchError(f"{variant}: podman did not use the layer store")
    finally:
        if podman is not None:
            podman.cleanup(timeout=300)
        if use_store:
            bz.teardown(mnt.resolve())
        shutil.rmtree(base, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_network_args(ap)
    args = ap.parse_args(argv)
    for prog in ("podman", "runc"):
        if not shutil.which(prog):
            print(f"bench_engine: {prog} is not installed (apt-get install podman runc)", file=sys.stderr)
            return 1
    runs, mbit = bl.network_settings(args)
    bl.install_signal_handlers()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bl.use_pycache(workdir / "pycache")
    drop = bl.can_drop_caches()
    runs_dir = Path(tempfile.mkdtemp(prefix="engine-runs-", dir=workdir))
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    failures: list[str] = []
    spec = {**bz.image_spec(args.quick), "runtime": [dst for _, dst in RUNTIME_FILES]}
    name = "engine-quick" if args.quick else "engine"
    proxy = None
    try:
        img = bi.cached_image(workdir, name, spec, build_layers(spec))
        with br.Registry(base=workdir) as reg:
            bz.prepare(workdir, img, reg, name, args.timeout, 1 << 20)
            proxy = bz.ThrottleProxy(reg.host, mbit or None)
            plain = f"{proxy.host}/{bz.REPO}:{bz.TAG}"
            refs = {VARIANTS[0]: plain, VARIANTS[1]: f"{proxy.host}/{bz.REPO}:{bz.ESTARGZ_TAG}", VARIANTS[2]: plain}
            for r, v in bl.interleaved(runs, VARIANTS):
                with bl.failure_noted(failures, r, runs, v, (bl.BenchError, subprocess.TimeoutExpired)):
                    res = one_run(v, refs[v], runs_dir / "run", proxy, args.timeout, drop)
                    results[v].append(res)
                    bl.log(f"run {r + 1}/{runs} {v:38s} output after {res['output_s']:7.2f} s, "
                           f"{bl.mb(res['bytes'])} via proxy")
    except KeyboardInterrupt:
        print("bench_engine: interrupted", file=sys.stderr)
        return 130
    except bl.BenchError as e:
        print(f"bench_engine: {e}", file=sys.stderr)
        return 1
    finally:
        if proxy is not None:
            proxy.close()
        shutil.rmtree(runs_dir, ignore_errors=True)

    link = f"{mbit:g} Mbit/s" if mbit else "unthrottled"
    print(f"\n## Engine benchmark: `podman run IMAGE cat /etc/os-release`; {len(img.layers)} layers, "
          f"{bl.mb(img.uncompressed_size)} uncompressed, {bl.mb(img.compressed_size)} gzip; registry behind a "
          f"proxy at {link}; {runs} run(s) per variant, medians\n")
    med = lambda rs, k: bl.median([x[k] for x in rs]) if rs else None  # noqa: E731
    base_t, base_b = med(results[VARIANTS[0]], "output_s"), med(results[VARIANTS[0]], "bytes")
    rows = []
    verdict = None
    for v in VARIANTS:
        rs = results[v]
        if not rs:
            rows.append([v, "failed", "n/a", "n/a", "n/a", "0"])
            continue
        t, b = med(rs, "output_s"), med(rs, "bytes")
        rows.append([v, bl.fmt_s(t), f"{base_t / t:.1f}x" if base_t else "n/a", bl.mb(b),
                     f"{b / base_b:.1%}" if base_b else "n/a", str(len(rs))])
        if v != VARIANTS[0] and base_t and base_b:
            ok = base_t / t >= SPEEDUP_TARGET and b / base_b < BYTES_TARGET
            verdict = ok if verdict is None else verdict and ok
    print(bl.markdown_table(["variant", "podman run to output", "plain / this", "bytes transferred",
                             "% of plain", "runs"], rows))
    print("\nbytes: registry -> client through the proxy during the run (podman's manifest and config "
          "requests included); the layer store was mounted before the timer started.")
    if verdict is not None:
        print(f"\ntarget >= {SPEEDUP_TARGET:g}x sooner with < {BYTES_TARGET:.0%} of the bytes: "
              f"{'met' if verdict else 'NOT met'}")
    return bl.exit_status(failures, verdict, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
