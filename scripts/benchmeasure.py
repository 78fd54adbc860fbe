"""Measuring one tool's mount for scripts/bench.py: timed sessions (cold find, cat, tar, warm remount),
the results table's store, mount bookkeeping and the tree listings the checks compare."""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from benchrootfs import BIG  # noqa: E402
from benchtools import Tool  # noqa: E402

FIND_FMT = "%p %s %m %u\\n"
# waits for an idle machine before each mount (a session's steps then run back to back); main() enables it
GATE = bl.QuietGate(enabled=False)


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


def fmt_rss(kb: int | None) -> str:
    return "n/a" if not kb else f"{kb / 1024:.0f} MB"
