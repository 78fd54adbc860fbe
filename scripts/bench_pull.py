#!/usr/bin/env python3
"""Pull benchmark: `layerfs pull` against `skopeo copy` from a local registry.

    python scripts/bench_pull.py [--workdir DIR] [--runs 5] [--quick] [--profile]

Generates (once, cached in --workdir) an image of about 250 MB compressed: 6 gzip
layers, mostly incompressible random data plus some compressible text. Starts its
own docker-registry on 127.0.0.1 (random port, temp storage), pushes the image,
then pulls it --runs times with each tool, interleaved (the order alternates per
run), each run into a fresh directory:

    layerfs --root FRESH pull 127.0.0.1:PORT/bench/pull:v1
    skopeo copy --src-tls-verify=false docker://127.0.0.1:PORT/bench/pull:v1 oci:FRESH:v1

Dirty pages are written back (sync) before each timed pull so one tool's
write-back does not land in the other's time, and each pull waits (up to 30 s)
for an idle machine, since the box may be shared. Prints a Markdown table (median,
min, max seconds, MB/s, ratio to skopeo). Target: layerfs <= 1.5x skopeo.

--quick: a ~10 MB image and 2 runs (a smoke test for CI, a few seconds).
--profile: one more layerfs pull under py-spy; prints the hottest functions.
Exit status: 0 ok; 1 a step failed; 3 with --fail-on-target when layerfs misses the target.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
import benchregistry as br  # noqa: E402

TARGET = 1.5   # issue 3: pull with indexing <= 1.5x skopeo copy
REPO, TAG = "bench/pull", "v1"


def image_spec(quick: bool) -> dict:
    scale = 1 / 25 if quick else 1.0
    M = 1 << 20
    return {
        "version": 1,
        # (comment, [(kind, count, bytes each)]) ; kind: text | random
        "layers": [
            ("text base: many small and medium text files", [("text", 4000, int(12 * 1024 * scale) or 1024)]),
            ("four large random files", [("random", 4, int(20 * M * scale))]),
            ("30 medium random files", [("random", 30, int(2 * M * scale))]),
            ("one big random file + text", [("random", 1, int(45 * M * scale)), ("text", 200, int(100 * 1024 * scale))]),
            ("300 small random files", [("random", 300, int(100 * 1024 * scale))]),
            ("config files", [("text", 100, int(8 * 1024 * scale) or 512)]),
        ],
    }


def build_layers(spec: dict):
    def build(blobdir: Path):
        text = bi.TextSource(pool=(1 << 20) if spec["layers"][1][1][0][2] < (8 << 20) else (4 << 20))
        layers = []
        seed = 1000
        for li, (comment, parts) in enumerate(spec["layers"]):
            with bi.LayerWriter(blobdir, level=6, comment=comment) as w:
                top = f"layer{li + 1}"
                w.dir(top)
                for pi, (kind, count, size) in enumerate(parts):
                    d = f"{top}/{kind}{pi}"
                    w.dir(d)
                    for i in range(count):
                        if count > 100 and i % 100 == 0:
                            w.dir(f"{d}/g{i // 100:03d}")
                        path = f"{d}/g{i // 100:03d}/f{i:05d}" if count > 100 else f"{d}/f{i:05d}"
                        seed += 1
                        chunks = bi.random_chunks(size, seed) if kind == "random" else text.chunks(size)
                        w.stream_file(path + (".bin" if kind == "random" else ".txt"), size, chunks)
            layers.append(w.blob)
        return layers, {}
    return build


def fresh_dir(base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    return d


def check_oci_dir(root: Path, img: bi.Image, tool: str) -> None:
    if not (root / "index.json").exists():
        raise bl.BenchError(f"{tool}: no index.json in {root}")
    for l in img.layers:
        p = root / "blobs" / "sha256" / l.digest.split(":")[1]
        if not p.exists() or p.stat().st_size != l.size:
            raise bl.BenchError(f"{tool}: layer {l.digest[:19]} missing or wrong size in {root}")


def pull_layerfs(ref: str, dest: Path, timeout: float) -> float:
    r = bl.run(bl.layerfs_cmd("--root", str(dest), "pull", ref), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
               timeout=timeout, what="layerfs pull")
    return r.seconds


def pull_skopeo(ref: str, dest: Path, timeout: float) -> float:
    r = bl.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:{TAG}"],
               timeout=timeout, what="skopeo copy")
    return r.seconds


TOOLS = {"layerfs": pull_layerfs, "skopeo": pull_skopeo}


def profile_layerfs(ref: str, runs_dir: Path, out_dir: Path, timeout: float) -> str:
    """One layerfs pull under py-spy (all threads, idle included); returns a text summary."""
    spy = shutil.which("py-spy")
    if not spy:
        return "py-spy not installed (pip install py-spy)"
    dest = fresh_dir(runs_dir, "profile")
    raw = out_dir / "pull-profile.txt"
    svg = out_dir / "pull-profile.svg"
    base = [spy, "record", "--rate", "250", "--threads", "--idle"]
    try:
        bl.run(base + ["--format", "raw", "-o", str(raw), "--"] +
               bl.layerfs_cmd("--root", str(dest), "pull", ref), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
               timeout=timeout, what="py-spy record (raw)")
        shutil.rmtree(dest, ignore_errors=True)
        bl.run(base + ["--format", "flamegraph", "-o", str(svg), "--"] +
               bl.layerfs_cmd("--root", str(dest), "pull", ref), env=bl.layerfs_env(), cwd=bl.REPO_ROOT,
               timeout=timeout, what="py-spy record (flamegraph)")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return summarize_collapsed(raw) + f"\n\nflamegraph: {svg}\ncollapsed stacks: {raw}"


def summarize_collapsed(path: Path, top: int = 15) -> str:
    """Sample shares from py-spy's collapsed stacks (--threads --idle): per thread, per function
    (self and inclusive) and per source line (self). Idle samples are kept: a pull is I/O-bound."""
    self_f: collections.Counter = collections.Counter()
    self_l: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0

    def short(frame: str, with_line: bool) -> str:
        if " (" not in frame:
            return frame
        fn, loc = frame.split(" (", 1)
        loc = loc.rstrip(")")
        file, _, line = loc.rpartition(":")
        file = "/".join(file.split("/")[-2:]) if file.startswith("layerfs/") else file.rsplit("/", 1)[-1]
        return f"{fn} ({file}:{line})" if with_line else f"{fn} ({file})"

    for row in path.read_text(errors="replace").splitlines():
        stack, _, n = row.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        thread = "?"
        while frames and (frames[0].startswith("process ") or frames[0].startswith("thread (")):
            if frames[0].startswith("thread ("):
                thread = frames[0].split(": ", 1)[-1] if ": " in frames[0] else "MainThread"
            frames = frames[1:]
        threads[thread.rstrip("0123456789_-") or thread] += n
        if not frames:
            continue
        self_f[short(frames[-1], False)] += n
        self_l[short(frames[-1], True)] += n
        for f in {short(x, False) for x in frames}:
            incl[f] += n
    if not total:
        return "py-spy recorded no samples"
    pct = lambda c: [f"  {v / total:6.1%}  {k}" for k, v in c.most_common(top)]  # noqa: E731
    return "\n".join([f"py-spy: {total} samples over all threads, idle included (so waiting shows)", "",
                      "samples per thread (pool threads summed):", *pct(threads), "",
                      "self, by source line:", *pct(self_l), "",
                      "self, by function:", *pct(self_f), "",
                      "inclusive, by function:", *pct(incl)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench"),
                    help="image cache and scratch space (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=None, help="pulls per tool (default 5, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="small image, 2 runs: a smoke test")
    ap.add_argument("--profile", action="store_true", help="also profile one layerfs pull with py-spy")
    ap.add_argument("--fail-on-target", action="store_true", help=f"exit 3 if layerfs > {TARGET}x skopeo")
    ap.add_argument("--timeout", type=float, default=600, help="per pull (s)")
    ap.add_argument("--no-pyc", action="store_true",
                    help="run layerfs with the environment's byte-code settings (default: byte code cached in "
                         "WORKDIR/pycache, as for an installed package)")
    ap.add_argument("--json", type=Path, help="also write the raw timings here")
    ap.add_argument("--no-wait-quiet", action="store_true",
                    help="do not wait for an idle machine before each pull (default: wait up to 30 s)")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    bl.install_signal_handlers()
    if not shutil.which("skopeo"):
        print("bench_pull: skopeo not found", file=sys.stderr)
        return 1
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pyc_note = bl.use_pycache(None if args.no_pyc else workdir / "pycache")
    runs_dir = Path(tempfile.mkdtemp(prefix="pull-runs-", dir=workdir))
    times: dict[str, list[float]] = {t: [] for t in TOOLS}
    failures: list[str] = []
    profile_text = None
    gate = bl.QuietGate(enabled=not (args.no_wait_quiet or args.quick))
    load0 = os.getloadavg()
    try:
        spec = image_spec(args.quick)
        img = bi.cached_image(workdir, "pull-quick" if args.quick else "pull", spec, build_layers(spec))
        with br.Registry(base=workdir) as reg:
            ref = f"{reg.host}/{REPO}:{TAG}"
            t0 = time.perf_counter()
            br.push_image(reg.host, REPO, TAG, img)
            bl.log(f"pushed {ref} ({bl.mb(img.compressed_size)} compressed) in {time.perf_counter() - t0:.1f} s")
            for r, tool in bl.interleaved(runs, TOOLS):
                dest = fresh_dir(runs_dir, f"{tool}-{r}")
                os.sync()
                gate.wait()
                try:
                    with bl.failure_noted(failures, r, runs, tool):
                        dt = TOOLS[tool](ref, dest, args.timeout)
                        check_oci_dir(dest, img, tool)
                        times[tool].append(dt)
                        bl.log(f"run {r + 1}/{runs} {tool:8s} {dt:7.2f} s")
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
            if args.profile:
                try:
                    profile_text = profile_layerfs(ref, runs_dir, workdir, args.timeout * 2)
                except bl.BenchError as e:
                    failures.append(f"profile: {e}")
    except KeyboardInterrupt:
        print("bench_pull: interrupted", file=sys.stderr)
        return 130
    except bl.BenchError as e:
        print(f"bench_pull: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    size = img.compressed_size
    print(f"\n## Pull benchmark: {len(img.layers)} gzip layers, {bl.mb(size)} compressed, "
          f"{bl.mb(img.uncompressed_size)} uncompressed, {img.entries} entries; {runs} runs per tool, interleaved\n")
    sk = bl.median(times["skopeo"]) if times["skopeo"] else None
    rows = []
    for tool, ts in times.items():
        if not ts:
            rows.append([tool, "n/a", "n/a", "n/a", "n/a", "n/a", "0"])
            continue
        med = bl.median(ts)
        rows.append([tool, f"{med:.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}", f"{size / med / 1e6:.0f}",
                     f"{med / sk:.2f}x" if sk else "n/a", str(len(ts))])
    print(bl.markdown_table(["tool", "median s", "min s", "max s", "MB/s (compressed)", "ratio to skopeo", "runs"],
                            rows))
    print(f"\n{os.cpu_count()} CPUs; load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}; "
          f"{gate.summary()}; {pyc_note}")
    verdict = None
    if times["layerfs"] and sk:
        ratio = bl.median(times["layerfs"]) / sk
        verdict = ratio <= TARGET
        print(f"\ntarget layerfs <= {TARGET}x skopeo: {ratio:.2f}x -> {'met' if verdict else 'NOT met'}")
    if profile_text:
        print("\n```\n" + profile_text + "\n```")
    if args.json:
        args.json.write_text(json.dumps({"image": img.to_json(), "times": times, "failures": failures}, indent=1))
    return bl.exit_status(failures, verdict, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
