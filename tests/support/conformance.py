"""Conformance harnesses for writable mounts: pjdfstest and the fsx exerciser (tests/support/fsx.c).

Both run the same way against several targets built from one small
multi-layer image (:func:`image`, made with layerfs's own builders):

- ``layerfs``: a writable layerfs mount of the image
  (``-o allow_other,default_permissions``, an upper of its own);
- ``kernel``: kernel overlayfs over the same layers extracted in overlay form
  (tests/support/kerneloverlay.py), the oracle;
- ``fuse-overlayfs`` (optional): fuse-overlayfs over the same extracted layers.

:func:`targets` mounts them and always unmounts and kills what it started.
:func:`run_pjdfstest` runs pjdfstest's suite as upstream documents it
(``cd MOUNT/dir && prove -rv PJDFSTEST/tests``, as root) and parses the TAP
output into per-file failing assertions. :func:`run_fsx` builds fsx.c and
runs it on a new file and on a file copied up from a lower layer.

Used by tests/fuse/test_conformance.py and by the scripts ``scripts/pjdfstest``
and ``scripts/fsx-run`` (``python tests/support/conformance.py pjdfstest|fsx ...``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from imagebuild import LayerBuilder, build_image  # noqa: E402
from kerneloverlay import extract_overlay_layers, kernel_overlay  # noqa: E402
from mounthelpers import force_unmount, put_image, random_bytes, track  # noqa: E402

from layerfs.errors import LayerfsError  # noqa: E402
from layerfs.mount import MountOptions, mount_image, umount  # noqa: E402
from layerfs.store import Store  # noqa: E402

FSX_SOURCE = HERE / "fsx.c"
IMAGE_REF = "docker.io/library/conformance:1"
MTIME = 1704067200
#: a lower-layer file with known content, the start of fsx's copy-up run (rewritten in layer 2)
LOWER_FILE = "data/lower.bin"
LOWER_DATA = random_bytes(200_000, 42)
TARGETS = ("layerfs", "kernel", "fuse-overlayfs")


def image():
    """Three layers: a base tree, a layer that rewrites, deletes and makes a directory opaque, a third."""
    l1 = (LayerBuilder(mtime=MTIME)
          .add_dir("etc").add_file("etc/hostname", b"box\n")
          .add_dir("data").add_file(LOWER_FILE, b"old version\n")
          .add_dir("srv").add_file("srv/gone", b"x").add_dir("srv/opaque").add_file("srv/opaque/old", b"o")
          .add_dir("tmp", mode=0o1777)
          .build())
    l2 = (LayerBuilder(mtime=MTIME + 100)
          .add_dir("data").add_file(LOWER_FILE, LOWER_DATA)
          .add_dir("srv").add_whiteout("srv/gone").add_dir("srv/opaque").add_opaque("srv/opaque")
          .add_file("srv/opaque/new", b"n")
          .build())
    l3 = (LayerBuilder(mtime=MTIME + 200)
          .add_dir("work", mode=0o755).add_file("work/README", b"pjdfstest runs below here\n")
          .build())
    return build_image([l1, l2, l3])


class SetupError(Exception):
    """A missing or unusable prerequisite, reported as one line."""


@dataclass
class Target:
    name: str
    mountpoint: Path


@contextlib.contextmanager
def targets(base: Path, names: Sequence[str] = ("layerfs", "kernel")) -> Iterator[dict[str, Target]]:
    """Mount the image as each of *names* below *base*; everything is unmounted (and daemons killed) on exit."""
    unknown = set(names) - set(TARGETS)
    if unknown:
        raise SetupError(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(TARGETS)} (hint: --targets layerfs,kernel)")
    built = image()
    store = Store(base / "store")
    put_image(store, IMAGE_REF, built)
    lowers = extract_overlay_layers(built.uncompressed_layers, base / "layers") if set(names) - {"layerfs"} else []
    out: dict[str, Target] = {}
    with contextlib.ExitStack() as stack:
        if "layerfs" in names:
            mnt = base / "layerfs"
            mnt.mkdir()
            opts = MountOptions(read_only=False, upper=str(base / "layerfs-upper"),
                                fuse_options=["allow_other", "default_permissions"])
            rec = mount_image(store, IMAGE_REF, mnt, opts)
            track(mnt, rec.pid)                  # a test's watchdog kills it if a FUSE call hangs
            stack.callback(_layerfs_down, store, mnt, rec.pid)
            out["layerfs"] = Target("layerfs", mnt)
        if "kernel" in names:
            kbase = base / "kernel"
            root_like = os.stat(out["layerfs"].mountpoint) if "layerfs" in out else None
            kmnt = stack.enter_context(kernel_overlay(lowers, kbase / "kmnt", upper=kbase / "kupper", root_like=root_like))
            out["kernel"] = Target("kernel", kmnt)
        if "fuse-overlayfs" in names:
            if not shutil.which("fuse-overlayfs"):
                raise SetupError("fuse-overlayfs is not installed (hint: apt-get install fuse-overlayfs)")
            fbase = base / "fuse-overlayfs"
            for d in ("upper", "work", "mnt"):
                (fbase / d).mkdir(parents=True)
            mnt = fbase / "mnt"
            subprocess.run(["fuse-overlayfs", "-o",
                            "lowerdir=" + ":".join(str(p) for p in reversed(lowers))
                            + f",upperdir={fbase / 'upper'},workdir={fbase / 'work'},allow_other,default_permissions",
                            str(mnt)], check=True, capture_output=True)
            stack.callback(force_unmount, mnt)
            out["fuse-overlayfs"] = Target("fuse-overlayfs", mnt)
        yield out


def _layerfs_down(store: Store, mnt: Path, pid: int) -> None:
    try:
        umount(store, mnt)
    except LayerfsError:     # busy or dead: forced below, and the daemon killed
        pass
    force_unmount(mnt, pid)


# --- pjdfstest ------------------------------------------------------------------------------------

PJDFSTEST_ENV = "PJDFSTEST_DIR"


def pjdfstest_dir(given: str | None) -> Path:
    """The pjdfstest checkout: *given*, else $PJDFSTEST_DIR; it must hold pjdfstest.c (or the binary) and tests/."""
    raw = given or os.environ.get(PJDFSTEST_ENV)
    if not raw:
        raise SetupError(f"no pjdfstest checkout given (hint: pass --pjdfstest DIR or set {PJDFSTEST_ENV})")
    d = Path(raw).resolve()
    if not (d / "tests" / "misc.sh").is_file() or not ((d / "pjdfstest").is_file() or (d / "pjdfstest.c").is_file()):
        raise SetupError(f"{d} is not a pjdfstest checkout (it needs tests/misc.sh and pjdfstest.c)")
    return d


def build_pjdfstest(d: Path) -> Path:
    """Build the pjdfstest binary if it is missing, as upstream does (autoreconf, configure, make) when
    autotools are there, else with cc from an existing config.h; returns the binary."""
    binary = d / "pjdfstest"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if (d / "configure.ac").is_file() and not (d / "config.h").is_file() and shutil.which("autoreconf"):
        subprocess.run(["autoreconf", "-ifs"], cwd=d, check=True, capture_output=True)
        subprocess.run(["./configure"], cwd=d, check=True, capture_output=True)
    if (d / "Makefile").is_file() and (d / "config.h").is_file() and shutil.which("make"):
        r = subprocess.run(["make", "pjdfstest"], cwd=d, capture_output=True, text=True)
        if r.returncode == 0 and binary.is_file():
            return binary
    if not (d / "config.h").is_file():
        raise SetupError(f"cannot build {binary}: no config.h (run autoreconf -ifs && ./configure in {d})")
    r = subprocess.run(["cc", "-O2", "-o", str(binary), "pjdfstest.c"], cwd=d, capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"cannot build {binary}: " + " ".join(r.stderr.split())[:300])
    return binary


@dataclass
class TapResult:
    """Assertions run and failed per test file (TODO failures count as passed, as TAP says)."""
    planned: dict[str, int] = field(default_factory=dict)
    run: dict[str, int] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)      # file -> the "not ok N ..." lines
    output: str = ""

    @property
    def total_run(self) -> int:
        return sum(self.run.values())

    @property
    def total_failed(self) -> int:
        return sum(len(v) for v in self.failed.values())

    def failed_numbers(self) -> dict[str, set[int]]:
        return {f: {int(line.split()[2]) for line in lines} for f, lines in self.failed.items()}


_FILE = re.compile(r"^(\S+\.t) \.\.")
_PLAN = re.compile(r"^1\.\.(\d+)")
_ASSERT = re.compile(r"^(not )?ok (\d+)(.*)$")


def parse_prove(text: str, root: Path) -> TapResult:
    """Parse ``prove -v`` output: file headers, plans and ok / not ok lines."""
    res = TapResult(output=text)
    cur = None
    prefix = str(root / "tests") + "/"
    for line in text.splitlines():
        m = _FILE.match(line)
        if m:
            cur = m.group(1)
            cur = cur[len(prefix):] if cur.startswith(prefix) else cur
            res.run.setdefault(cur, 0)
            rest = line[m.end():].strip(". ")
            line = rest
        if cur is None:
            continue
        m = _PLAN.match(line)
        if m:
            res.planned[cur] = int(m.group(1))
            continue
        m = _ASSERT.match(line)
        if m:
            res.run[cur] += 1
            if m.group(1) and "# TODO" not in m.group(3):
                res.failed.setdefault(cur, []).append(line.strip())
    return res


def run_pjdfstest(pjd: Path, mountpoint: Path, *, subset: Sequence[str] = (), timeout: float = 3600) -> TapResult:
    """Run pjdfstest in a fresh directory of *mountpoint* as upstream documents it; parse the result."""
    work = Path(tempfile.mkdtemp(prefix="pjdfstest.", dir=mountpoint))
    os.chmod(work, 0o755)
    tests = [str(pjd / "tests" / s) for s in subset] or [str(pjd / "tests")]
    try:
        proc = subprocess.run(["prove", "-rv", *tests], cwd=work, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return parse_prove(proc.stdout, pjd)


_DETAIL = re.compile(r"^not ok (\d+) - tried '(\S+)(.*)', expected (.*), got (.*)$")


def _short_detail(line: str) -> str:
    """``not ok N - tried 'OP ARGS', expected E, got R`` as ``N OP: expected E, got R`` (names are long)."""
    m = _DETAIL.match(line)
    if not m:
        return line[:200]
    return f"{m.group(1)} {m.group(2)}: expected {m.group(4)}, got {m.group(5) or '(nothing)'}"


def run_pjdfstest_all(pjd: Path, mounted: dict[str, Target], *, subset: Sequence[str] = ()) -> dict[str, TapResult]:
    """pjdfstest on every mounted target at once (the suite mostly sleeps); results in *mounted*'s order."""
    results: dict[str, TapResult] = {}

    def one(name: str) -> None:
        results[name] = run_pjdfstest(pjd, mounted[name].mountpoint, subset=subset)
    threads = [threading.Thread(target=one, args=(n,)) for n in mounted]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [n for n in mounted if n not in results]
    if missing:
        raise SetupError(f"pjdfstest did not complete on {', '.join(missing)}")
    return {n: results[n] for n in mounted}


def pjdfstest_report(results: dict[str, TapResult]) -> str:
    """A table of assertions run / failed per target, then each target's failing files and assertions."""
    lines = ["| target | assertions run | failed | files with failures |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.total_run} | {r.total_failed} | {len(r.failed)} |")
    for name, r in results.items():
        if not r.failed:
            continue
        lines.append(f"\n{name}: failing assertions")
        for f in sorted(r.failed):
            lines.append(f"  {f}: " + ", ".join(str(n) for n in sorted(r.failed_numbers()[f])))
            for detail in r.failed[f]:
                lines.append(f"      {_short_detail(detail)}")
    return "\n".join(lines)


def pjdfstest_main(args: argparse.Namespace) -> int:
    pjd = pjdfstest_dir(args.pjdfstest)
    build_pjdfstest(pjd)
    if os.geteuid() != 0:
        raise SetupError("pjdfstest needs root (it switches users, mounts overlayfs)")
    names = ["layerfs", "kernel"] + (["fuse-overlayfs"] if args.fuse_overlayfs else [])
    base = Path(tempfile.mkdtemp(prefix="layerfs-pjdfstest."))
    try:
        with targets(base, names) as mounted:
            t0 = time.monotonic()
            results = run_pjdfstest_all(pjd, mounted, subset=args.only)
            elapsed = time.monotonic() - t0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(pjdfstest_report(results))
    print(f"\n({elapsed:.0f} s; checkout {pjd})")
    if args.save:
        Path(args.save).write_text(pjdfstest_report(results) + "\n")
    return 1 if results.get("layerfs", TapResult()).total_failed else 0


# --- fsx ------------------------------------------------------------------------------------------

def build_fsx(dest: Path) -> Path:
    """Compile tests/support/fsx.c into *dest*; returns the binary."""
    binary = dest / "fsx"
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(FSX_SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError("cannot build fsx: " + " ".join(r.stderr.split())[:300])
    return binary


@dataclass
class FsxRun:
    target: str
    kind: str          # "new file" or "copy-up"
    returncode: int
    output: str

    @property
    def summary(self) -> str:
        for line in reversed(self.output.splitlines()):
            if line.startswith("fsx: ") and (" ops in " in line or "FAILED" in line):
                return line
        return self.output.strip().splitlines()[-1] if self.output.strip() else f"exit {self.returncode}"


def run_fsx(fsx: Path, mountpoint: Path, target: str, *, seconds: int, seed: int, ref_dir: Path,
            timeout: float | None = None, extra: Sequence[str] = ()) -> list[FsxRun]:
    """fsx for *seconds* on a new file, then for *seconds* on the lower-layer file (copy-up), in *mountpoint*."""
    ref = ref_dir / "lower.ref"
    ref.write_bytes(LOWER_DATA)
    runs = []
    for kind, path, start in (("new file", mountpoint / f"fsx-new.{seed}", []),
                              ("copy-up", mountpoint / LOWER_FILE, ["-I", str(ref)])):
        cmd = [str(fsx), "-d", str(seconds), "-S", str(seed), *extra, *start, str(path)]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout or seconds * 3 + 60)
        runs.append(FsxRun(target, kind, proc.returncode, proc.stdout))
    return runs


def fsx_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SetupError("fsx-run needs root (it mounts kernel overlayfs)")
    base = Path(tempfile.mkdtemp(prefix="layerfs-fsx."))
    seconds = int(args.minutes * 60) if args.seconds is None else args.seconds
    ok = True
    try:
        fsx = build_fsx(base)
        names = args.targets.split(",")
        with targets(base, names) as mounted:
            for name in names:
                secs = seconds if name == "layerfs" else (args.peer_seconds or seconds)
                extra = [*(["-l", str(args.max_len)] if args.max_len else []),
                         *(["-o", str(args.max_op)] if args.max_op else [])]
                for run in run_fsx(fsx, mounted[name].mountpoint, name, seconds=secs, seed=args.seed,
                                   ref_dir=base, extra=extra):
                    print(f"{name:15} {run.kind:9} {run.summary}", flush=True)
                    if run.returncode != 0:
                        ok = False
                        print(run.output, flush=True)
                    else:
                        for line in run.output.splitlines():
                            if line != run.summary:
                                print(f"{'':25} {line}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conformance", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pj = sub.add_parser("pjdfstest", help="pjdfstest on layerfs and kernel overlayfs (and fuse-overlayfs)")
    pj.add_argument("--pjdfstest", metavar="DIR", help=f"a pjdfstest checkout (default: ${PJDFSTEST_ENV})")
    pj.add_argument("--fuse-overlayfs", action="store_true", help="also run it on fuse-overlayfs")
    pj.add_argument("--only", nargs="*", default=[], metavar="SUBDIR", help="only these tests/ subdirectories")
    pj.add_argument("--save", metavar="FILE", help="also write the report to FILE")
    fx = sub.add_parser("fsx", help="the fsx exerciser on a new and a copied-up file")
    fx.add_argument("--minutes", type=float, default=10.0, help="per file on layerfs (default 10)")
    fx.add_argument("--seconds", type=int, help="instead of --minutes")
    fx.add_argument("--peer-seconds", type=int, help="per file on the other targets (default: the same)")
    fx.add_argument("--seed", type=int, default=1)
    fx.add_argument("--max-len", type=int, help="largest file size fsx makes (default 256 KiB)")
    fx.add_argument("--max-op", type=int, help="largest single read/write/copy (default 64 KiB)")
    fx.add_argument("--targets", default="layerfs,kernel", help="comma-separated: layerfs,kernel,fuse-overlayfs")
    args = p.parse_args(argv)
    try:
        return pjdfstest_main(args) if args.cmd == "pjdfstest" else fsx_main(args)
    except (SetupError, LayerfsError, subprocess.CalledProcessError) as e:
        name = "pjdfstest" if args.cmd == "pjdfstest" else "fsx-run"
        if isinstance(e, subprocess.CalledProcessError):
            e = SetupError(f"{' '.join(map(str, e.cmd[:3]))} failed: {' '.join((e.stderr or b'').decode().split())}")
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
