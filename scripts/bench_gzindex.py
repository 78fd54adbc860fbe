#!/usr/bin/env python3
"""Benchmark layerfs.gzindex against plain zlib, indexed_gzip and rapidgzip.

    python scripts/bench_gzindex.py [--size-mb 200] [--file /tmp/bench.tar.gz]

Generates (once, cached at --file) a tar of about --size-mb MB that mixes
incompressible random files with compressible text, gzips it with `gzip -6`
(like most image builders), then measures:

  * streaming throughput (MB/s of uncompressed output) of
      a) zlib.decompressobj in Python, fed 1 MiB chunks
      b) layerfs GzipIndexer (building checkpoints), fed 1 MiB chunks
      b2) two GzipIndexers in two threads (aggregate), GIL released
      c) indexed_gzip building its index (build_full_index, from the file)
      d) rapidgzip reading the file through (builds its index; parallel)
  * latency of a 4 KiB read at a random offset: layerfs GzipReader (no
    cache, so every read decompresses from its checkpoint) vs indexed_gzip,
    at the same checkpoint spacing.

Only (a) and (b) accept data chunk by chunk as it arrives; (c) and (d) need
the whole file on disk (they seek).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerfs import gzindex  # noqa: E402

MiB = 1 << 20
CHUNK = 1 * MiB


def generate(path: Path, size_mb: int, seed: int = 42) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(5000)]
    tar_path = path.with_suffix("")  # .tar
    target = size_mb * MiB
    written = 0
    n = 0
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        while written < target:
            if rng.random() < 0.5:
                size = rng.randint(1, 4 * MiB)
                data = rng.randbytes(size)
            else:
                lines = []
                total = 0
                want = rng.randint(1, 4 * MiB)
                while total < want:
                    line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + "\n"
                    lines.append(line)
                    total += len(line)
                data = "".join(lines).encode()
            info = tarfile.TarInfo(f"dir{n % 50}/file{n}")
            info.size = len(data)
            info.mtime = 1700000000
            import io
            tf.addfile(info, io.BytesIO(data))
            written += len(data)
            n += 1
    with open(path, "wb") as out:
        subprocess.run(["gzip", "-6", "-n", "-c", str(tar_path)], stdout=out, check=True)
    tar_path.unlink()


def bench_zlib(blob: bytes) -> tuple[float, int]:
    t = time.perf_counter()
    d = zlib.decompressobj(31)
    total = 0
    for i in range(0, len(blob), CHUNK):
        total += len(d.decompress(blob[i:i + CHUNK]))
    total += len(d.flush())
    return time.perf_counter() - t, total


def bench_indexer(blob: bytes, span: int) -> tuple[float, int, gzindex.SeekIndex]:
    t = time.perf_counter()
    ix = gzindex.GzipIndexer(span)
    total = 0
    for i in range(0, len(blob), CHUNK):
        total += len(ix.feed(blob[i:i + CHUNK]))
    idx = ix.finish()
    return time.perf_counter() - t, total, idx


def bench_threads(blob: bytes, span: int, nthreads: int, kind: str) -> float:
    def work():
        if kind == "layerfs":
            bench_indexer(blob, span)
        else:
            bench_zlib(blob)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def bench_indexed_gzip(path: Path, spacing: int):
    import indexed_gzip
    t = time.perf_counter()
    f = indexed_gzip.IndexedGzipFile(str(path), spacing=spacing, buffer_size=4096)
    f.build_full_index()
    return time.perf_counter() - t, f


def bench_rapidgzip(path: Path, parallelization: int):
    import rapidgzip
    t = time.perf_counter()
    f = rapidgzip.open(str(path), parallelization=parallelization)
    total = 0
    while True:
        b = f.read(4 * MiB)
        if not b:
            break
        total += len(b)
    el = time.perf_counter() - t
    f.close()
    return el, total


def latency(fn, offsets) -> tuple[float, float]:
    times = []
    for off in offsets:
        t = time.perf_counter()
        fn(off)
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.mean(times) * 1e3, times[int(len(times) * 0.95)] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--file", default="/tmp/layerfs-bench.tar.gz")
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2, help="best of N for throughput")
    args = ap.parse_args()

    path = Path(args.file)
    if not path.exists():
        print(f"generating {path} ({args.size_mb} MB tar, gzip -6)...", flush=True)
        generate(path, args.size_mb)
    blob = path.read_bytes()
    print(f"blob: {len(blob) / MiB:.1f} MiB compressed", flush=True)

    rows: list[tuple[str, str, str]] = []

    def best(fn):
        return min((fn() for _ in range(args.repeat)), key=lambda r: r[0])

    el, usize = best(lambda: bench_zlib(blob))
    print(f"uncompressed: {usize / MiB:.1f} MiB (ratio {usize / len(blob):.2f})", flush=True)
    rows.append(("a) zlib.decompressobj (Python, 1 MiB chunks)", f"{usize / MiB / el:.0f}", "streaming, no index"))

    for span in (4 * MiB, 1 * MiB):
        el, _, idx = best(lambda: bench_indexer(blob, span))
        rows.append((f"b) layerfs GzipIndexer span={span // MiB} MiB", f"{usize / MiB / el:.0f}",
                     f"streaming; {len(idx.checkpoints)} checkpoints, index {len(idx.to_bytes()) / 1024:.0f} KiB"))
    idx4 = bench_indexer(blob, 4 * MiB)[2]
    idx1 = bench_indexer(blob, 1 * MiB)[2]

    el = bench_threads(blob, 4 * MiB, 2, "layerfs")
    rows.append(("b2) 2 x GzipIndexer in 2 threads (aggregate)", f"{2 * usize / MiB / el:.0f}", "GIL released"))
    el = bench_threads(blob, 4 * MiB, 2, "zlib")
    rows.append(("a2) 2 x zlib.decompressobj in 2 threads", f"{2 * usize / MiB / el:.0f}", ""))

    igz = {}
    try:
        import indexed_gzip  # noqa: F401
        for spacing in (4 * MiB, 1 * MiB):
            el, f = min((bench_indexed_gzip(path, spacing) for _ in range(args.repeat)), key=lambda r: r[0])
            igz[spacing] = f
            rows.append((f"c) indexed_gzip build_full_index spacing={spacing // MiB} MiB",
                         f"{usize / MiB / el:.0f}", "needs the whole file (seeks); no output"))
    except ImportError:
        rows.append(("c) indexed_gzip", "n/a", "not installed"))

    try:
        import rapidgzip  # noqa: F401
        for par in (1, 2):
            el, total = best(lambda: bench_rapidgzip(path, par))
            assert total == usize
            rows.append((f"d) rapidgzip read-through parallelization={par}", f"{usize / MiB / el:.0f}",
                         "needs the whole file (seeks)"))
    except ImportError:
        rows.append(("d) rapidgzip", "n/a", "not installed"))

    print()
    w = max(len(r[0]) for r in rows)
    print(f"{'throughput (uncompressed MB/s)':<{w}}  {'MB/s':>6}  notes")
    for name, v, note in rows:
        print(f"{name:<{w}}  {v:>6}  {note}")

    rng = random.Random(7)
    offsets = [rng.randrange(usize - 4096) for _ in range(args.reads)]
    lat = []
    for span, idx in ((4 * MiB, idx4), (1 * MiB, idx1)):
        r0 = gzindex.GzipReader(str(path), idx, cache_bytes=0)
        r1 = gzindex.GzipReader(str(path), idx)
        f = igz.get(span)

        def igz_read(o, f=f):
            f.seek(o)
            return f.read(4096)

        methods = [(f"layerfs GzipReader span={span // MiB} MiB, no cache", lambda o: r0.read(o, 4096)),
                   (f"layerfs GzipReader span={span // MiB} MiB, 32 MiB cache", lambda o: r1.read(o, 4096))]
        if f is not None:
            methods.append((f"indexed_gzip spacing={span // MiB} MiB", igz_read))
        # interleaved, so that load from other processes hits all alike
        times = {name: [] for name, _ in methods}
        for o in offsets:
            for name, fn in methods:
                t = time.perf_counter()
                fn(o)
                times[name].append(time.perf_counter() - t)
        for name, _ in methods:
            ts = sorted(times[name])
            lat.append((name, statistics.mean(ts) * 1e3, ts[int(len(ts) * 0.95)] * 1e3))
        # many small reads in one span: the case the cache is for
        base = offsets[0]
        lat.append((f"layerfs GzipReader span={span // MiB} MiB, cache, 4 KiB reads within one span",
                    *latency(lambda o: r1.read(base + (o % (span // 2)), 4096), offsets)))
        r0.close()
        r1.close()
    # check correctness of both on a few offsets
    r = gzindex.GzipReader(str(path), idx4)
    ref = zlib.decompressobj(31).decompress(blob)
    for o in offsets[:20]:
        assert r.read(o, 4096) == ref[o:o + 4096]
        if 4 * MiB in igz:
            igz[4 * MiB].seek(o)
            assert igz[4 * MiB].read(4096) == ref[o:o + 4096]
    t = time.perf_counter()
    pos = 0
    while pos < usize:
        pos += len(r.read(pos, 128 * 1024))
    seq = usize / MiB / (time.perf_counter() - t)
    r.close()
    del ref

    print()
    w = max(len(x[0]) for x in lat)
    print(f"{'random 4 KiB read latency':<{w}}  {'mean ms':>8}  {'p95 ms':>8}")
    for name, mean, p95 in lat:
        print(f"{name:<{w}}  {mean:>8.2f}  {p95:>8.2f}")
    print(f"\nlayerfs GzipReader sequential 128 KiB reads through the cache: {seq:.0f} MB/s")
    print(f"zlib {_zlib_version()}, cpus {os.cpu_count()}")


def _zlib_version() -> str:
    return zlib.ZLIB_RUNTIME_VERSION


if __name__ == "__main__":
    if not shutil.which("gzip"):
        sys.exit("needs gzip(1)")
    main()
