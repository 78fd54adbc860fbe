#!/usr/bin/env python3
"""Lazy-mount benchmark: time to first read and bytes moved, full pull vs lazy eStargz vs lazy gzip.

    python scripts/bench_lazy.py [--workdir DIR] [--runs 3] [--mbit 100] [--quick]

Generates (once, cached in --workdir) an image of about 450 MB uncompressed: 4 gzip
layers, mostly incompressible random data in big files plus a few thousand small
text files (etc/os-release among them). Starts its own docker-registry on
127.0.0.1, pushes the image, converts it with `layerfs convert --estargz` (in a
preparation store, cached in --workdir too) and pushes the result as a second tag,
and publishes the plain image's layer indexes with `layerfs index push` from the
preparation store.

layerfs never talks to the registry directly: a throttling TCP proxy in this script
(threads; one token bucket at --mbit Mbit/s shared by all connections, registry ->
layerfs direction; it counts the bytes each way) sits in front of it, and the
references name the proxy's 127.0.0.1 port. For each variant and run (fresh store,
page cache dropped when root), the timer starts and then:

    (a) full pull:    layerfs pull REF; layerfs mount --read-only REF MNT
    (b) lazy eStargz: layerfs mount --lazy --read-only REF-ESTARGZ MNT
    (c) lazy gzip with a pushed index: layerfs mount --lazy --read-only REF MNT (the plain gzip image)

then `cat MNT/etc/os-release` (time to first read), then one `cat` of the startup
read set (a few dozen files: configs, "libraries" of 1-2 MB), then the
bytes that went through the proxy are noted; the mount is always torn down.
Prints a Markdown table of medians with ratios (full / lazy) and bytes as % of the
full pull's. Target: lazy >= 10x faster to first read than the full pull, with
under 10% of its bytes.

--quick: a ~20 MB image, 1 run, 1000 Mbit/s (a smoke test).
Exit status: 0 ok; 1 a step failed; 3 with --fail-on-target when the target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchregistry as br  # noqa: E402

SPEEDUP_TARGET = 10.0
BYTES_TARGET = 0.10
REPO, TAG, ESTARGZ_TAG = "bench/lazy", "v1", "v1-estargz"
OS_RELEASE = (b'PRETTY_NAME="Bench GNU/Linux 12 (lazy)"\nNAME="Bench GNU/Linux"\nVERSION_ID="12"\n'
              b'VERSION="12 (lazy)"\nID=bench\nHOME_URL="https://example.invalid/"\n')
VARIANTS = ("full pull + mount", "lazy eStargz", "lazy gzip + pushed index")


# --- the image ------------------------------------------------------------------------------

def image_spec(quick: bool) -> dict:
    s = 1 / 20 if quick else 1.0
    M = 1 << 20
    return {
        "version": 1,
        # layer: (comment, [(dir, kind, count, bytes each)]); kind: text | random
        "layers": [
            ("base system: configs, many small text files, some libraries",
             [("etc", "text", 150, 2048), ("usr/share/doc", "text", 3000, int(8 * 1024 * s) or 1024),
              ("usr/lib", "random", 24, int(1 * M * s))]),
            ("runtime: four big random files", [("usr/share/runtime", "random", 4, int(40 * M * s))]),
            ("application: one big random file and 60 medium ones",
             [("opt/app", "random", 1, int(100 * M * s)), ("opt/app/lib", "random", 60, int(2 * M * s))]),
            ("app config and small files", [("opt/app/conf", "text", 200, int(4 * 1024 * s) or 512)]),
        ],
    }


def build_layers(spec: dict):
    def build(blobdir: Path):
        text = bi.TextSource(pool=1 << 20)
        layers, seed = [], 5000
        for li, (comment, parts) in enumerate(spec["layers"]):
            with bi.LayerWriter(blobdir, level=6, comment=comment) as w:
                made: set[str] = set()

                def mkdirs(path: str) -> None:
                    parts_ = path.split("/")
                    for i in range(1, len(parts_) + 1):
                        d = "/".join(parts_[:i])
                        if d not in made:
                            made.add(d)
                            w.dir(d)
                if li == 0:
                    mkdirs("etc")
                    w.file("etc/os-release", OS_RELEASE)
                for d, kind, count, size in parts:
                    mkdirs(d)
                    for i in range(count):
                        sub = f"{d}/g{i // 200:02d}" if count > 200 else d
                        mkdirs(sub)
                        seed += 1
                        ext = ".so" if kind == "random" else ".conf" if d.endswith(("etc", "conf")) else ".txt"
                        chunks = bi.random_chunks(size, seed) if kind == "random" else text.chunks(size)
                        w.stream_file(f"{sub}/f{i:04d}{ext}", size, chunks)
            layers.append(w.blob)
        return layers, {}
    return build


def startup_set(spec: dict) -> list[str]:
    """A few dozen files a container would touch on start: configs, some libraries, app config."""
    def names(d, kind, count, pick):
        ext = ".so" if kind == "random" else ".conf" if d.endswith(("etc", "conf")) else ".txt"
        out = []
        for i in pick:
            if i < count:
                sub = f"{d}/g{i // 200:02d}" if count > 200 else d
                out.append(f"{sub}/f{i:04d}{ext}")
        return out
    L = spec["layers"]
    files = ["etc/os-release"]
    files += names(*L[0][1][0][:3], range(0, 150, 10))          # 15 configs
    files += names(*L[0][1][2][:3], range(0, 24, 4))            # 6 libraries (1 MB each)
    files += names(*L[0][1][1][:3], range(0, 3000, 600))        # 5 docs
    files += names(*L[2][1][1][:3], range(0, 60, 20))           # 3 app libraries (2 MB each)
    files += names(*L[3][1][0][:3], range(0, 200, 25))          # 8 app configs
    return files


# --- the throttling proxy -----------------------------------------------------------------------

class TokenBucket:
    """Shared rate limit: consume(n) sleeps until n bytes fit at *rate* bytes/s (burst *burst*)."""

    def __init__(self, rate: float | None, burst: int = 64 << 10):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def consume(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class ThrottleProxy:
    """TCP proxy 127.0.0.1:port -> upstream; registry->client bytes go through a token bucket.
    Counts the bytes sent to the client (down) and from it (up)."""

    def __init__(self, upstream: str, mbit: float | None):
        h, p = upstream.rsplit(":", 1)
        self.upstream = (h, int(p))
        self.bucket = TokenBucket(mbit * 1e6 / 8 if mbit else None)
        self.down = self.up = 0
        self.connections = 0
        self.count_lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closing = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.count_lock:
            self.down = self.up = 0
            self.connections = 0

    def _accept(self) -> None:
        while not self.closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.count_lock:
                self.connections += 1
                self.conns += [c, u]
            threading.Thread(target=self._pump, args=(u, c, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(c, u, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if down:
                    self.bucket.consume(len(data))
                dst.sendall(data)
                with self.count_lock:
                    if down:
                        self.down += len(data)
                    else:
                        self.up += len(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self.count_lock:
            for s in self.conns:
                try:
                    s.close()
                except OSError:
                    pass


# --- one run ----------------------------------------------------------------------------------

def lfs(store: Path, *args: str, timeout: float, what: str) -> bl.Run:
    return bl.run(bl.layerfs_cmd("--root", str(store), *args), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
                  timeout=timeout, what=what)


def teardown(mnt: Path) -> None:
    try:
        bl.force_unmount(mnt)
    finally:
        for pid in bl.pids_serving(mnt):
            bl.kill_pid(pid)


def one_run(variant: str, ref: str, base: Path, files: list[str], proxy: ThrottleProxy, timeout: float,
            drop: bool) -> dict:
    store = base / "store"
    mnt = base / "mnt"
    for p in (store, mnt):
        if p.exists():
            shutil.rmtree(p)
    mnt.mkdir(parents=True)
    if drop:
        bl.drop_caches()
    else:
        os.sync()
    proxy.reset()
    res: dict = {}
    try:
        t0 = time.perf_counter()
        if variant == VARIANTS[0]:
            lfs(store, "pull", "-q", ref, timeout=timeout, what="layerfs pull")
            res["pull_s"] = time.perf_counter() - t0
            res["pull_bytes"] = proxy.down
            lfs(store, "mount", "--read-only", ref, str(mnt), timeout=timeout, what="layerfs mount")
        else:
            lfs(store, "mount", "--lazy", "--read-only", ref, str(mnt), timeout=timeout, what="layerfs mount --lazy")
        res["mount_s"] = time.perf_counter() - t0
        bl.wait_mounted(mnt.resolve(), timeout=30)
        out = bl.run(["cat", str(mnt / "etc/os-release")], timeout=timeout, what="cat etc/os-release")
        res["first_read_s"] = time.perf_counter() - t0
        res["first_read_bytes"] = proxy.down
        if out.stdout.encode() != OS_RELEASE:
            raise bl.BenchError(f"{variant}: etc/os-release has unexpected content {out.stdout[:80]!r}")
        t1 = time.perf_counter()
        p = subprocess.run(["cat", *[str(mnt / f) for f in files]], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        res["startup_s"] = time.perf_counter() - t0
        res["startup_only_s"] = time.perf_counter() - t1
        if p.returncode != 0:
            raise bl.BenchError(f"{variant}: reading the startup set failed: {p.stderr.decode(errors='replace')[-300:]}")
        res["startup_read"] = len(p.stdout)
        res["bytes"] = proxy.down
        res["up_bytes"] = proxy.up
        res["connections"] = proxy.connections
    finally:
        teardown(mnt.resolve())
        shutil.rmtree(store, ignore_errors=True)
    return res


# --- preparation: pushed source + converted eStargz -----------------------------------------------

def prepare(workdir: Path, img: bi.Image, reg: br.Registry, name: str, timeout: float, span: int) -> str:
    """Push the image and its eStargz conversion (converted once, cached in a preparation store), and publish
    the plain image's layer indexes. Returns the eStargz reference (direct to the registry)."""
    dst = f"{reg.host}/{REPO}:{ESTARGZ_TAG}"
    br.push_image(reg.host, REPO, TAG, img)
    prep = workdir / f"prep-{name}-{img.manifest_digest.split(':')[1][:12]}"
    done = prep / "bench-estargz.json"
    local_dst = f"localhost/{REPO}:{ESTARGZ_TAG}"
    if not done.exists():
        if prep.exists():
            shutil.rmtree(prep)
        t0 = time.perf_counter()
        r = lfs(prep, "pull", "-q", f"oci:{img.layout}:bench", timeout=timeout, what="layerfs pull oci:")
        loaded = r.stdout.strip().splitlines()[-1].strip() if r.stdout.strip() else ""
        if not loaded:
            raise bl.BenchError("layerfs pull oci: printed no reference")
        bl.log(f"loaded the image as {loaded} into {prep} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        lfs(prep, "convert", "--estargz", loaded, local_dst, timeout=timeout * 3, what="layerfs convert --estargz")
        bl.log(f"converted to eStargz in {time.perf_counter() - t0:.1f} s")
        done.write_text(json.dumps({"src": loaded, "dst": local_dst}))
    t0 = time.perf_counter()
    lfs(prep, "push", "-q", local_dst, dst, timeout=timeout, what="layerfs push (eStargz)")
    bl.log(f"pushed {dst} in {time.perf_counter() - t0:.1f} s")
    plain = f"{reg.host}/{REPO}:{TAG}"
    t0 = time.perf_counter()
    lfs(prep, "pull", "-q", plain, timeout=timeout, what="layerfs pull (the pushed plain image)")
    lfs(prep, "index", "push", "-q", "--span", str(span), plain, timeout=timeout, what="layerfs index push")
    bl.log(f"published the layer indexes of {plain} (span {span}) in {time.perf_counter() - t0:.1f} s")
    return dst


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_network_args(ap)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--span", type=int, default=1 << 20,
                    help="checkpoint span of the published gzip index, bytes (default: %(default)s)")
    ap.add_argument("--no-wait-quiet", action="store_true",
                    help="do not wait for an idle machine before each run (default: wait up to 30 s)")
    args = ap.parse_args(argv)
    runs, mbit = bl.network_settings(args)
    bl.install_signal_handlers()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pyc_note = bl.use_pycache(workdir / "pycache")
    drop = bl.can_drop_caches()
    runs_dir = Path(tempfile.mkdtemp(prefix="lazy-runs-", dir=workdir))
    gate = bl.QuietGate(enabled=not (args.no_wait_quiet or args.quick))
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    failures: list[str] = []
    load0 = os.getloadavg()
    spec = image_spec(args.quick)
    files = startup_set(spec)
    name = "lazy-quick" if args.quick else "lazy"
    proxy = None
    try:
        img = bi.cached_image(workdir, name, spec, build_layers(spec))
        with br.Registry(base=workdir) as reg:
            t0 = time.perf_counter()
            prepare(workdir, img, reg, name, args.timeout, args.span)
            bl.log(f"registry ready ({time.perf_counter() - t0:.1f} s)")
            est_size = _blob_total(reg.host, ESTARGZ_TAG)
            proxy = ThrottleProxy(reg.host, mbit or None)
            refs = {VARIANTS[0]: f"{proxy.host}/{REPO}:{TAG}", VARIANTS[1]: f"{proxy.host}/{REPO}:{ESTARGZ_TAG}",
                    VARIANTS[2]: f"{proxy.host}/{REPO}:{TAG}"}
            for r, v in bl.interleaved(runs, VARIANTS):
                gate.wait()
                with bl.failure_noted(failures, r, runs, v):
                    res = one_run(v, refs[v], runs_dir, files, proxy, args.timeout, drop)
                    results[v].append(res)
                    bl.log(f"run {r + 1}/{runs} {v:24s} first read {res['first_read_s']:7.2f} s, "
                           f"startup set {res['startup_s']:7.2f} s, {bl.mb(res['bytes'])} via proxy")
    except KeyboardInterrupt:
        print("bench_lazy: interrupted", file=sys.stderr)
        return 130
    except bl.BenchError as e:
        print(f"bench_lazy: {e}", file=sys.stderr)
        return 1
    finally:
        if proxy is not None:
            proxy.close()
        shutil.rmtree(runs_dir, ignore_errors=True)

    read_sizes = [x["startup_read"] for rs in results.values() for x in rs]
    startup_bytes = max(read_sizes) if read_sizes else 0
    link = f"{mbit:g} Mbit/s" if mbit else "unthrottled"
    print(f"\n## Lazy mount benchmark: {len(img.layers)} layers, {bl.mb(img.uncompressed_size)} uncompressed, "
          f"{bl.mb(img.compressed_size)} gzip ({bl.mb(est_size)} as eStargz), {img.entries} entries; "
          f"proxy at {link}; startup set {len(files)} files, {bl.mb(startup_bytes)}; "
          f"{runs} run(s) per variant, medians\n")
    full = results[VARIANTS[0]]
    med = lambda rs, k: bl.median([x[k] for x in rs]) if rs else None  # noqa: E731
    f_first, f_start, f_bytes = med(full, "first_read_s"), med(full, "startup_s"), med(full, "bytes")
    rows = []
    for v in VARIANTS:
        rs = results[v]
        if not rs:
            rows.append([v, "failed"] + ["n/a"] * 6)
            continue
        first, start, nbytes = med(rs, "first_read_s"), med(rs, "startup_s"), med(rs, "bytes")
        ratio = lambda a, b: f"{a / b:.1f}x" if a and b else "n/a"  # noqa: E731
        rows.append([v, bl.fmt_s(first), ratio(f_first, first), bl.fmt_s(start), ratio(f_start, start),
                     bl.mb(nbytes), f"{nbytes / f_bytes:.1%}" if f_bytes else "n/a", str(len(rs))])
    print(bl.markdown_table(["variant", "time to first read", "full / this", "startup set read", "full / this",
                             "bytes transferred", "% of full pull", "runs"], rows))
    if full:
        print(f"\nfull pull alone: {bl.fmt_s(med(full, 'pull_s'))}; time to first read counts from the start of "
              "`pull` (a) or `mount --lazy` (b, c) to the end of `cat MNT/etc/os-release`; startup set counts from "
              "the same start to the end of one `cat` of all its files; bytes are registry -> layerfs through the "
              "proxy at the end of the startup set.")
    print(f"\n{os.cpu_count()} CPUs; load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}; "
          f"page cache {'dropped before each run' if drop else 'NOT dropped (not root)'}; {gate.summary()}; {pyc_note}")
    verdict = None
    for v in VARIANTS[1:]:
        lazy = results[v]
        if not (full and lazy):
            continue
        speed = f_first / med(lazy, "first_read_s")
        share = med(lazy, "bytes") / f_bytes if f_bytes else float("inf")
        ok = speed >= SPEEDUP_TARGET and share < BYTES_TARGET
        verdict = ok if verdict is None else verdict and ok
        print(f"\ntarget {v} >= {SPEEDUP_TARGET:g}x faster to first read with < {BYTES_TARGET:.0%} of the "
              f"bytes: {speed:.1f}x, {share:.1%} -> {'met' if ok else 'NOT met'}"
              f" (speed {'met' if speed >= SPEEDUP_TARGET else 'NOT met'}, "
              f"bytes {'met' if share < BYTES_TARGET else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({"image": img.to_json(), "mbit": mbit, "files": files,
                                         "results": results, "failures": failures}, indent=1))
    return bl.exit_status(failures, verdict, args.fail_on_target)


def _blob_total(host: str, tag: str) -> int:
    st, _, body = br.http_request(host, "GET", f"/v2/{REPO}/manifests/{tag}",
                           headers={"Accept": f"{bi.OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"})
    if st != 200:
        return 0
    return sum(l["size"] for l in json.loads(body).get("layers", []))


if __name__ == "__main__":
    sys.exit(main())
