#!/usr/bin/env python3
"""FUSE adapter benchmark: cold `find` and `cat` through fresh mounts of hand-built trees, layerfs against
fuse-overlayfs, and the time `layerfs mount` takes for an image already in the store.

    python scripts/bench_fuse.py [--workdir DIR] [--runs 5] [--entries 25000] [--big-mb 200] [--quick]

Needs root, /dev/fuse, fuse-overlayfs. No registry and no pull: layerfs mounts a MergedTree built in
memory (tests/support/mounthelpers.mounted), so only the daemon and its FUSE adapter are timed.

  * find: a synthetic tree shaped like a distro image (--entries entries, ~10% directories, depth <= 6,
    files and symlinks); fuse-overlayfs gets the same content as real directories, once as one
    lowerdir and once split over six (like a six-layer image);
  * cat: one incompressible file of --big-mb MB (host page cache warm for fuse-overlayfs's lower file);
  * `layerfs mount` of the tree as a stored one-layer image, then a find through that mount.

Trees and the image are generated once in --workdir. Tools are interleaved per round; prints a Markdown
table of medians and minima. --quick: 2000 entries, a 16 MB file, 1 round (a smoke test).
Exit status: 0 ok; 1 a step failed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
import benchlib as bl  # noqa: E402
from imagebuild import LayerBuilder, build_image  # noqa: E402
from mounthelpers import MTIME_NS, BytesReader, fix_dir_nlinks, mounted, put_image, random_bytes  # noqa: E402

from layerfs.fs import ROOT_INO, MergedTree  # noqa: E402
from layerfs.store import Store  # noqa: E402

IMAGE = "docker.io/library/bench-fuse:1"
FIND = "find {} -printf '%p %s %m %u\\n' >/dev/null"


class FileReader:
    """A LayerReader over an uncompressed stream in a file (pread: thread-safe, no shared offset)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)


def synthetic_tree(n_entries: int = 25_000, *, seed: int = 7, file_size: int = 300) -> MergedTree:
    """A tree shaped like a distro image: ~10% directories, depth <= 6, files and symlinks.

    File bytes come from one in-memory stream (file i at offset i*file_size).
    """
    rnd = random.Random(seed)
    data = random_bytes(file_size * n_entries, seed)
    t = MergedTree([BytesReader(data)])
    t.nodes[ROOT_INO].mtime_ns = MTIME_NS
    dirs = [(ROOT_INO, 0)]
    for i in range(n_entries):
        parent, depth = dirs[rnd.randrange(len(dirs))] if len(dirs) > 1 and rnd.random() < 0.9 else dirs[0]
        kind = rnd.random()
        name = f"{'d' if kind < 0.1 else 'f'}{i}-" + "n" * rnd.randrange(12)
        kw = dict(mtime_ns=MTIME_NS + i, uid=rnd.choice((0, 0, 0, 1000)), gid=rnd.choice((0, 0, 1000)))
        if kind < 0.1 and depth < 6:
            d = t.add(parent, name, stat.S_IFDIR | 0o755, **kw)
            dirs.append((d.ino, depth + 1))
        elif kind < 0.15:
            t.add(parent, name, stat.S_IFLNK | 0o777, target=f"../target/{i}", **kw)
        else:
            size = rnd.randrange(file_size)
            t.add(parent, name, stat.S_IFREG | rnd.choice((0o644, 0o755, 0o600)), size=size, layer=0,
                  offset=i * file_size, **kw)
    fix_dir_nlinks(t)
    return t


def materialize(tree: MergedTree, dest: Path) -> None:
    """Write *tree* as a real directory tree (fuse-overlayfs's lowerdir)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path, node in tree.walk():
        p = dest / path
        if stat.S_ISDIR(node.mode):
            p.mkdir()
        elif stat.S_ISLNK(node.mode):
            os.symlink(node.target, p)
        elif stat.S_ISREG(node.mode):
            p.write_bytes(tree.read(node.ino, 0, node.size))
        if not stat.S_ISLNK(node.mode):
            os.chmod(p, stat.S_IMODE(node.mode))
        os.lchown(p, node.uid, node.gid)
        os.utime(p, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def split_six(tree: MergedTree, lowers: list[Path]) -> None:
    """The tree's files spread over six lowerdirs (round robin), its directories in all of them."""
    walk = list(tree.walk())
    for i, (path, node) in enumerate(walk):
        if node.children is None:
            dest = lowers[i % len(lowers)] / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(node.mode):
                os.symlink(node.target, dest)
            else:
                dest.write_bytes(tree.read(node.ino, 0, node.size))
    for path, node in walk:
        if node.children is not None:
            for d in lowers:
                (d / path).mkdir(parents=True, exist_ok=True)


def layer_of(tree: MergedTree) -> bytes:
    """The tree as one uncompressed layer tar."""
    lb = LayerBuilder()
    for path, n in tree.walk():
        kw = dict(uid=n.uid, gid=n.gid, mtime=n.mtime_ns // 10**9)
        if n.children is not None:
            lb.add_dir(path, mode=stat.S_IMODE(n.mode), **kw)
        elif stat.S_ISLNK(n.mode):
            lb.add_symlink(path, n.target, **kw)
        else:
            lb.add_file(path, tree.read(n.ino, 0, n.size), mode=stat.S_IMODE(n.mode), **kw)
    return lb.build()


@contextlib.contextmanager
def fuse_overlayfs(lowerdirs: list[Path], mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    bl.run(["fuse-overlayfs", "-o", "lowerdir=" + ":".join(map(str, reversed(lowerdirs))), str(mnt)],
           what="fuse-overlayfs")
    try:
        yield mnt
    finally:
        bl.force_unmount(mnt)


def prepare(work: Path, entries: int, big: int) -> tuple[MergedTree, MergedTree, Store]:
    tree = synthetic_tree(entries)
    lower1, lowers6, bigdir = work / "lower1", [work / f"lower6-{i}" for i in range(6)], work / "bigdir"
    if not lower1.exists():
        bl.log(f"writing the {entries}-entry tree as directories")
        materialize(tree, lower1)
        split_six(tree, lowers6)
    if not (bigdir / "big").exists() or (bigdir / "big").stat().st_size != big:
        bl.log(f"writing a {bl.mb(big)} file")
        bigdir.mkdir(exist_ok=True)
        with open(bigdir / "big", "wb") as f:
            for i in range(0, big, 1 << 20):
                f.write(random_bytes(min(1 << 20, big - i), i))
    bigtree = MergedTree([FileReader(bigdir / "big")])
    bigtree.add(ROOT_INO, "big", stat.S_IFREG | 0o644, size=big, layer=0)
    store = Store(work / "store")
    put_image(store, IMAGE, build_image([layer_of(tree)]))
    return tree, bigtree, store


def one_round(work: Path, tree: MergedTree, bigtree: MergedTree, store: Store, res: dict[str, list[float]]) -> None:
    def timed(name: str, cmd: str) -> None:
        res.setdefault(name, []).append(bl.run(cmd, shell=True, what=name).seconds)

    lowers6 = [work / f"lower6-{i}" for i in range(6)]
    with fuse_overlayfs([work / "lower1"], work / "ovl1") as m:
        timed("find  fuse-overlayfs, 1 lowerdir", FIND.format(m))
    with fuse_overlayfs(lowers6, work / "ovl6") as m:
        timed("find  fuse-overlayfs, 6 lowerdirs", FIND.format(m))
    with mounted(tree, work / "lfs", store):
        timed("find  layerfs", FIND.format(work / "lfs"))
    bl.run(["cat", str(work / "bigdir" / "big")], capture=False)          # host page cache warm
    with fuse_overlayfs([work / "bigdir"], work / "ovlcat") as m:
        timed("cat   fuse-overlayfs", f"cat {m}/big >/dev/null")
    with mounted(bigtree, work / "lfscat", store):
        timed("cat   layerfs", f"cat {work / 'lfscat'}/big >/dev/null")
    m = work / "lfsimg"
    m.mkdir(exist_ok=True)
    res.setdefault("layerfs mount (image in store)", []).append(
        bl.run(bl.layerfs_cmd("--root", str(store.root), "mount", IMAGE, str(m)), env=bl.layerfs_env(),
               what="layerfs mount").seconds)
    try:
        timed("find  layerfs, image mount", FIND.format(m))
    finally:
        bl.run(bl.layerfs_cmd("--root", str(store.root), "umount", str(m)), env=bl.layerfs_env(),
               what="layerfs umount")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench/fuse"),
                    help="trees, image and mount points (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=None, help="rounds (default 5, --quick 1)")
    ap.add_argument("--entries", type=int, default=None, help="entries of the tree (default 25000)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the cat file, MB (default 200)")
    ap.add_argument("--quick", action="store_true", help="a small tree and file, 1 round: a smoke test")
    args = ap.parse_args(argv)
    runs = args.runs or (1 if args.quick else 5)
    entries = args.entries or (2000 if args.quick else 25_000)
    big = (args.big_mb or (16 if args.quick else 200)) * 1_000_000
    if not os.path.exists("/dev/fuse"):
        print("bench_fuse: FUSE is not usable here: /dev/fuse is missing", file=sys.stderr)
        return 1
    if not shutil.which("fuse-overlayfs"):
        print("bench_fuse: fuse-overlayfs is not installed (apt-get install fuse-overlayfs)", file=sys.stderr)
        return 1
    bl.install_signal_handlers()
    work = args.workdir / f"e{entries}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, list[float]] = {}
    try:
        tree, bigtree, store = prepare(work, entries, big)
        for r in range(runs):
            one_round(work, tree, bigtree, store, res)
            bl.log(f"round {r + 1}/{runs} done")
    except KeyboardInterrupt:
        print("bench_fuse: interrupted", file=sys.stderr)
        return 130
    except bl.BenchError as e:
        print(f"bench_fuse: {e}", file=sys.stderr)
        return 1
    print(f"\n## FUSE adapter benchmark: {entries} entries, a {bl.mb(big)} file; {runs} round(s)\n")
    print(bl.markdown_table(["what", "median", "min"],
                            [[name, bl.fmt_s(bl.median(v)), bl.fmt_s(min(v))] for name, v in res.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
