"""The write workloads of scripts/bench.py on a writable mount: untar, copy-up + append, dd, rm -rf;
their checks, their sessions (under py-spy when asked) and their table."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchimage as bi  # noqa: E402
import benchlib as bl  # noqa: E402
from benchmeasure import Mounted, Results, fmt_rss, q, sh  # noqa: E402
from benchtools import LayerfsVolatile, Tool  # noqa: E402

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
