"""Shared helpers for the layerfs benchmarks (scripts/bench*.py): processes, timing, the system, output.

Nothing here imports layerfs: the benchmarks drive layerfs through its command
line, exactly as a user would, and build/push their images themselves so they
work whatever state the rest of the tree is in (images: benchimage.py; the
registry they push to: benchregistry.py).

- running and timing commands, the layerfs command line and its environment;
- a quiet-machine gate, cache dropping, /proc helpers, mount cleanup;
- interleaved rounds of the variants a benchmark compares, a failed run noted and the rounds going on;
- medians, Markdown tables, py-spy summaries, the exit status.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent



class BenchError(Exception):
    """A benchmark step failed; the message says which."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every ``finally`` (unmount, stop registry) runs."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)


# --- processes, timing, system -----------------------------------------------------------

def layerfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerfs", *args]


_PYCACHE: Path | None = None


def use_pycache(directory: Path | None) -> str:
    """Let layerfs runs write and reuse byte code under *directory* (PYTHONPYCACHEPREFIX), as an
    installed package would (pip compiles .pyc at install time), even where the environment says
    PYTHONDONTWRITEBYTECODE; then compile layerfs and its FUSE stack once, untimed.
    ``None`` leaves the environment as it is. Returns a line for the report."""
    global _PYCACHE
    _PYCACHE = directory
    if directory is None:
        how = "as the environment has it"
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            how += " (PYTHONDONTWRITEBYTECODE is set: every layerfs start compiles its modules)"
        return f"layerfs byte code: {how}"
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import importlib, pkgutil, layerfs\n"
                    "for m in pkgutil.iter_modules(layerfs.__path__):\n"
                    "    try: importlib.import_module('layerfs.' + m.name)\n"
                    "    except Exception: pass"],
                   env=layerfs_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    return f"layerfs byte code: cached in {directory} (PYTHONPYCACHEPREFIX), like an installed package"


def layerfs_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if _PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(_PYCACHE)
    return env


@dataclass
class Run:
    seconds: float
    stdout: str
    stderr: str


def run(cmd: Sequence[str] | str, *, timeout: float = 900, env: dict | None = None, cwd: Path | str | None = None,
        what: str | None = None, shell: bool = False, capture: bool = True) -> Run:
    """Run, time (wall clock), raise BenchError with the tail of stderr on failure or timeout."""
    what = what or (cmd if isinstance(cmd, str) else " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, shell=shell, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, errors="replace")
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s") from None
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        raise BenchError(f"{what}: exit {p.returncode}: {' | '.join(tail) or '(no stderr)'}")
    return Run(dt, p.stdout or "", p.stderr or "")


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return sum(v[:8]), idle


def cpu_busy(interval: float = 0.25) -> float:
    """CPU cores busy (all processes) over *interval* seconds."""
    t0, i0 = _cpu_times()
    time.sleep(interval)
    t1, i1 = _cpu_times()
    return 0.0 if t1 == t0 else (1 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


class QuietGate:
    """Before a timed sample, wait (up to *timeout* s) until the machine is nearly idle, so other
    people's builds and tests on a shared box do not land in one tool's time. Counts the samples
    that had to start anyway."""

    def __init__(self, max_cores: float = 0.35, timeout: float = 30, enabled: bool = True):
        self.max_cores, self.timeout, self.enabled = max_cores, timeout, enabled
        self.samples = 0
        self.noisy = 0
        self.waited = 0.0

    def wait(self) -> None:
        if not self.enabled:
            return
        self.samples += 1
        t0 = time.monotonic()
        while True:
            busy = cpu_busy()
            if busy <= self.max_cores:
                break
            if time.monotonic() - t0 > self.timeout:
                self.noisy += 1
                break
        self.waited += time.monotonic() - t0

    def summary(self) -> str:
        if not self.enabled:
            return "quiet-machine gate off"
        return (f"waited {self.waited:.0f} s in all for an idle machine (<= {self.max_cores} cores busy); "
                f"{self.noisy} of {self.samples} samples started on a busy machine anyway")


def interleaved(runs: int, variants: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, variant) for *runs* rounds of every variant, the order reversed every other round, so that
    neither the first nor the last place of a round is always the same variant's."""
    order = list(variants)
    for r in range(runs):
        for v in (order if r % 2 == 0 else order[::-1]):
            yield r, v


@contextlib.contextmanager
def failure_noted(failures: list[str], r: int, runs: int, variant: str,
                  errors: tuple[type[BaseException], ...] = (BenchError,)) -> Iterator[None]:
    """One run of round *r*: an error of *errors* is logged and noted in *failures*, and the rounds go on."""
    try:
        yield
    except errors as e:
        failures.append(f"run {r + 1} {variant}: {e}")
        log(f"run {r + 1}/{runs} {variant} FAILED: {e}")


def drop_caches() -> None:
    """Write back and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop caches ({e}); cold runs need root") from None


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def mountpoints() -> set[str]:
    """Mount points from /proc/self/mountinfo (never stats a possibly hung FUSE mount)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.add(mp.encode().decode("unicode_escape"))
    return out


def is_mounted(path: Path | str) -> bool:
    return os.path.normpath(os.path.abspath(path)) in mountpoints()  # callers pass resolved paths


def wait_mounted(path: Path | str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None and not is_mounted(path):
            raise BenchError(f"mount of {path}: the mounting process exited ({proc.returncode}) without mounting")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not mounted after {timeout:.0f} s")
        time.sleep(0.002)


def force_unmount(path: Path | str) -> None:
    """Best effort: fusermount3 -u, then umount, then umount -l."""
    path = str(path)
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)


def fs_type(path: Path | str) -> str:
    """File-system type of the mount holding *path* (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, typ = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].encode().decode("unicode_escape")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, typ = mp, right.split()[0]
    return typ


def pids_serving(mountpoint: Path | str, exclude: Iterable[int] = ()) -> list[int]:
    """Processes whose command line names *mountpoint* (the FUSE daemon), oldest first."""
    target = os.path.normpath(os.path.abspath(mountpoint)).encode()  # no realpath: never stat a FUSE mount
    skip = {os.getpid(), *exclude}
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in skip:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(os.path.normpath(a) == target for a in args if a.startswith(b"/")):
            try:
                found.append((os.stat(f"/proc/{d}").st_mtime, int(d)))
            except OSError:
                pass
    return [p for _, p in sorted(found)]


def proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_hwm_kb(pid: int) -> int | None:
    """VmHWM of *pid* plus its descendants (a daemon may fork worker processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo, seen = 0, [pid], set()
    got = False
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        v = proc_status_kb(p, "VmHWM")
        if v is not None:
            total += v
            got = True
        todo.extend(children.get(p, []))
    return total if got else None


def wait_gone(pid: int, timeout: float = 10) -> bool:
    """True once *pid* has exited (or is a zombie), False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def kill_pid(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, 5):
            return


# --- statistics and output -----------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x < 0.1:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    return f"{x:.2f} s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# --- write workloads -------------------------------------------------------------------------

def tree_counts(root: Path | str) -> tuple[int, int, int]:
    """(regular files, directories below *root*, bytes in the regular files), no symlinks followed."""
    files = dirs = size = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
    return files, dirs, size


def proc_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds used so far by *pid*, all its threads (/proc/PID/stat utime, stime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return int(v[11]) / hz, int(v[12]) / hz


_OUTER = ("layerfs/cli/", "layerfs/mount/", "serve_overlay (", "serve (layerfs/fuse/readonly.py")


def _module_of(frame: str) -> str:
    """A coarse owner for a py-spy frame ``func (path/file.py)``: a layerfs file, or other."""
    path = frame.rpartition(" (")[2].rstrip(")")
    if "layerfs/" in path:
        return "layerfs/" + path.rpartition("layerfs/")[2]
    return "other (stdlib ...)"


def pyspy_summary(raw: Path, top: int = 12) -> list[str]:
    """Lines summarising a ``py-spy record --format raw --threads`` file (collapsed stacks), as % of all
    samples: the split between the main thread (the one that started as the main
    program) and the others (worker threads); the samples grouped by the module on top of the stack;
    the functions most often on top of the stack (self); layerfs's own functions by inclusive samples,
    the daemon's start-up chain (cli, mount, serve) left out. Line numbers are dropped."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    mods: dict[str, int] = {}
    main_n = total = 0
    with open(raw, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";") if fr]
            while frames and frames[0].startswith(("process ", "thread ")):
                frames = frames[1:]
            if not frames:
                continue
            total += n
            if frames[0].startswith("_run_module_as_main"):
                main_n += n
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
            m = _module_of(frames[-1])
            mods[m] = mods.get(m, 0) + n
            for fr in set(frames):
                if "layerfs/" in fr and not any(o in fr for o in _OUTER):
                    incl[fr] = incl.get(fr, 0) + n
    if not total:
        return ["(no samples)"]
    pc = lambda c: f"{100 * c / total:5.1f}%"  # noqa: E731
    out = [f"{total} samples: {pc(main_n).strip()} in the main thread, "
           f"{pc(total - main_n).strip()} in worker threads", "by module (top of stack):"]
    out += [f"  {pc(c)}  {m}" for m, c in sorted(mods.items(), key=lambda x: -x[1])[:6]]
    out.append("self (top of stack):")
    out += [f"  {pc(c)}  {fr}" for fr, c in sorted(selfc.items(), key=lambda x: -x[1])[:top]]
    out.append("layerfs functions, inclusive:")
    out += [f"  {pc(c)}  {fr}" for fr, c in sorted(incl.items(), key=lambda x: -x[1])[:top]]
    return out


# --- command lines and outcomes shared by the benchmarks ----------------------------------------------

def add_network_args(ap) -> None:
    """The options of the benchmarks that pull through a throttled link (bench_lazy, bench_engine)."""
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench"),
                    help="image cache and scratch space (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=None, help="runs per variant (default 3, --quick 1)")
    ap.add_argument("--mbit", type=float, default=None,
                    help="proxy bandwidth, Mbit/s (default 100, --quick 1000; 0: unlimited)")
    ap.add_argument("--quick", action="store_true", help="small image, 1 run, fast link: a smoke test")
    ap.add_argument("--timeout", type=float, default=900, help="per step (s)")
    ap.add_argument("--fail-on-target", action="store_true", help="exit 3 if the target is missed")


def network_settings(args) -> tuple[int, float]:
    """(runs, Mbit/s) from the options :func:`add_network_args` added."""
    runs = args.runs or (1 if args.quick else 3)
    mbit = args.mbit if args.mbit is not None else (1000.0 if args.quick else 100.0)
    return runs, mbit


def exit_status(failures: Sequence[str], verdict: bool | None, fail_on_target: bool) -> int:
    """A benchmark's exit code: 1 when a run failed (listed), 3 when the target is missed and that
    was asked to fail, else 0."""
    if failures:
        print("\nfailures:\n" + "\n".join("- " + f for f in failures))
        return 1
    if fail_on_target and verdict is False:
        return 3
    return 0
