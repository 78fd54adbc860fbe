"""layerfs.fs.union (the OCI layer rules), a differential test against plain extraction, the tree cache."""
from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import os
import random
import shutil
import stat
import struct
import tarfile
from pathlib import Path

import pytest
import xxhash

from layerfs.errors import UsageError
from layerfs.index import DIR, HARDLINK, LayerIndex, LayerIndexer
from layerfs.image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, parse_manifest
from layerfs.store import Store
from layerfs.fs import ROOT_INO, MergedTree
from layerfs.fs import build_tree, load_tree, open_image_tree, save_tree, tree_cache_path

IS_ROOT = os.geteuid() == 0


# --- building layers ----------------------------------------------------------------

def F(name, data=b"", mode=0o644, **kw):
    return ("f", name, data, mode, kw)


def D(name, mode=0o755, **kw):
    return ("d", name, None, mode, kw)


def L(name, target, **kw):
    return ("l", name, target, 0o777, kw)


def H(name, target, **kw):
    return ("h", name, target, 0o644, kw)


def WH(path):
    d, _, base = path.rpartition("/")
    return F(f"{d}/.wh.{base}" if d else f".wh.{base}")


def OPQ(d):
    return F(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq")


def FIFO(name, mode=0o600, **kw):
    return ("p", name, None, mode, kw)


def CHR(name, major, minor, mode=0o666, **kw):
    return ("c", name, (major, minor), mode, kw)


_TYPES = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "h": tarfile.LNKTYPE,
          "p": tarfile.FIFOTYPE, "c": tarfile.CHRTYPE}


def make_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, data, mode, kw in members:
            ti = tarfile.TarInfo(name)
            ti.type = _TYPES[kind]
            ti.mode = mode
            ti.mtime = kw.get("mtime", 1_000_000)
            ti.uid = kw.get("uid", 0)
            ti.gid = kw.get("gid", 0)
            if "xattrs" in kw:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                  for k, v in kw["xattrs"].items()}
            if kind in ("l", "h"):
                ti.linkname = data
                tf.addfile(ti)
            elif kind == "c":
                ti.devmajor, ti.devminor = data
                tf.addfile(ti)
            elif kind == "f":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


class BytesReader:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


def index_of(tar: bytes) -> LayerIndex:
    ix = LayerIndexer(None, where="test")
    ix.feed(tar)
    return ix.finish()


def merge(*layers) -> MergedTree:
    tars = [make_tar(m) for m in layers]
    return build_tree([index_of(t) for t in tars], [BytesReader(t) for t in tars])


def view(tree: MergedTree) -> dict[str, tuple]:
    """path -> (kind, perm, content-or-target)."""
    out = {}
    for path, n in tree.walk():
        if stat.S_ISDIR(n.mode):
            out[path] = ("d", stat.S_IMODE(n.mode), None)
        elif stat.S_ISLNK(n.mode):
            out[path] = ("l", stat.S_IMODE(n.mode), n.target)
        elif stat.S_ISREG(n.mode):
            out[path] = ("f", stat.S_IMODE(n.mode), tree.read(n.ino, 0, n.size + 10))
        else:
            out[path] = (stat.filemode(n.mode)[0], stat.S_IMODE(n.mode), n.rdev)
    return out


def node(tree: MergedTree, path: str):
    ino = ROOT_INO
    for p in path.split("/"):
        n = tree.lookup(ino, p)
        if n is None:
            return None
        ino = n.ino
    return tree.get(ino)


def paths(tree: MergedTree) -> set[str]:
    return {p for p, _ in tree.walk()}


# --- whiteouts ------------------------------------------------------------------------

def test_whiteout_hides_lower_file_and_directory_subtree():
    t = merge([F("a", b"1"), D("d"), F("d/x", b"x"), D("d/sub"), F("d/sub/y"), F("keep")],
              [WH("a"), WH("d")])
    assert paths(t) == {"keep"}


def test_whiteout_does_not_hide_its_own_layer_before_or_after():
    t = merge([F("a", b"lower"), F("b", b"lower")],
              [F("a", b"upper-before"), WH("a"), WH("b"), F("b", b"upper-after")])
    v = view(t)
    assert v["a"][2] == b"upper-before" and v["b"][2] == b"upper-after"
    assert set(v) == {"a", "b"}


def test_whiteout_and_new_directory_do_not_merge_lower_children():
    t = merge([D("d"), F("d/old")], [WH("d"), D("d", mode=0o700), F("d/new")])
    assert paths(t) == {"d", "d/new"}
    assert stat.S_IMODE(node(t, "d").mode) == 0o700


def test_whiteout_files_are_never_shown():
    t = merge([F("a")], [WH("a"), WH("never"), OPQ("dir"), D("dir"), F(".wh..wh.plnk"), D(".wh..wh.aufs"),
                         F(".wh..wh.aufs/inner")])
    assert paths(t) == {"dir"}
    assert not any(".wh." in p for p in paths(t))


def test_whiteout_in_the_top_layer_only_affects_lower_layers():
    t = merge([F("x", b"1")], [F("x", b"2")], [WH("x")])
    assert paths(t) == set()
    t = merge([F("x", b"1")], [WH("x")], [F("x", b"3")])
    assert view(t)["x"][2] == b"3"


# --- opaque directories --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_opaque_hides_lower_children_wherever_it_appears(where):
    lower = [D("d", mode=0o711), F("d/old1"), D("d/olddir"), F("d/olddir/x"), F("other")]
    upper = [D("d", mode=0o750), F("d/new1", b"n1"), F("d/new2", b"n2")]
    pos = {"first": 0, "middle": 2, "last": len(upper)}[where]
    upper.insert(pos, OPQ("d"))
    t = merge(lower, upper)
    assert paths(t) == {"d", "d/new1", "d/new2", "other"}
    assert stat.S_IMODE(node(t, "d").mode) == 0o750


def test_opaque_without_the_directory_entry_keeps_lower_attributes():
    t = merge([D("d", mode=0o711, mtime=42), F("d/x")], [OPQ("d"), F("d/y")])
    assert paths(t) == {"d", "d/y"}
    d = node(t, "d")
    assert stat.S_IMODE(d.mode) == 0o711 and d.mtime_ns == 42 * 10**9


def test_opaque_of_a_directory_that_never_existed_is_ignored():
    t = merge([F("a")], [OPQ("ghost")])
    assert paths(t) == {"a"}


def test_root_opaque():
    t = merge([F("a"), D("d"), F("d/b")], [OPQ(""), F("c")])
    assert paths(t) == {"c"}


# --- replacing -----------------------------------------------------------------------------

def test_file_over_directory_hides_the_subtree():
    t = merge([D("d"), F("d/x"), D("d/y"), F("d/y/z")], [F("d", b"now a file")])
    assert view(t) == {"d": ("f", 0o644, b"now a file")}


def test_directory_over_file_replaces_it():
    t = merge([F("d", b"file")], [D("d", mode=0o700), F("d/x", b"x")])
    assert view(t) == {"d": ("d", 0o700, None), "d/x": ("f", 0o644, b"x")}


def test_directory_over_directory_merges_with_upper_attributes():
    t = merge([D("d", mode=0o700, uid=1, gid=2, mtime=10), F("d/a", b"a")],
              [D("d", mode=0o755, uid=3, gid=4, mtime=20, xattrs={"user.k": b"v"}), F("d/b", b"b")])
    assert paths(t) == {"d", "d/a", "d/b"}
    d = node(t, "d")
    assert (stat.S_IMODE(d.mode), d.uid, d.gid, d.mtime_ns, d.xattrs) == (0o755, 3, 4, 20 * 10**9, {"user.k": b"v"})


def test_upper_file_replaces_lower_file_content_and_attributes():
    t = merge([F("f", b"old", mode=0o600, uid=5)], [F("f", b"new!", mode=0o4755, uid=6)])
    n = node(t, "f")
    assert (t.read(n.ino, 0, 100), stat.S_IMODE(n.mode), n.uid, n.size) == (b"new!", 0o4755, 6, 4)
    assert n.layer == 1


def test_symlink_over_directory_hides_everything_below_and_is_never_followed():
    t = merge([D("a"), D("a/b"), F("a/b/c"), D("etc"), F("etc/passwd")],
              [L("a/b", "/etc")])
    assert paths(t) == {"a", "a/b", "etc", "etc/passwd"}
    assert node(t, "a/b").target == "/etc"
    # a later layer writing below the symlink's path gets a fresh directory; the old children stay hidden
    t = merge([D("a"), D("a/b"), F("a/b/c")], [L("a/b", "/etc")], [F("a/b/d", b"d")])
    assert paths(t) == {"a", "a/b", "a/b/d"}
    b = node(t, "a/b")
    assert stat.S_ISDIR(b.mode) and stat.S_IMODE(b.mode) == 0o755 and b.mtime_ns == 0


def test_entries_below_a_non_directory_of_the_same_layer_are_ignored():
    t = merge([D("a"), F("a/x")],
              [L("a", "/tmp"), F("a/inside"), WH("a/x"), F("f"), F("f/child")])
    assert paths(t) == {"a", "f"}
    assert stat.S_ISLNK(node(t, "a").mode)
    # the order inside the layer does not matter
    t = merge([D("a"), F("a/x")], [F("a/inside"), WH("a/x"), L("a", "/tmp")])
    assert paths(t) == {"a"}


# --- implicit parents ------------------------------------------------------------------------

def test_implicit_parents_keep_lower_attributes():
    t = merge([D("usr", mode=0o711, uid=7, mtime=99), D("usr/lib", mode=0o700)],
              [F("usr/lib/new.so", b"so")])
    assert stat.S_IMODE(node(t, "usr").mode) == 0o711 and node(t, "usr").uid == 7
    assert stat.S_IMODE(node(t, "usr/lib").mode) == 0o700


def test_missing_parents_are_created_0755_root_mtime_0():
    t = merge([F("x/y/z", b"z", uid=5, mtime=77)])
    for p in ("x", "x/y"):
        n = node(t, p)
        assert (n.mode, n.uid, n.gid, n.mtime_ns) == (stat.S_IFDIR | 0o755, 0, 0, 0)


def test_implicit_parent_over_a_lower_file_replaces_it():
    t = merge([F("x", b"file", mode=0o600)], [F("x/y", b"y")])
    n = node(t, "x")
    assert stat.S_ISDIR(n.mode) and stat.S_IMODE(n.mode) == 0o755
    assert paths(t) == {"x", "x/y"}


def test_root_entry_sets_root_attributes():
    t = merge([D(".", mode=0o700, uid=1, mtime=5), F("a")])
    root = t.get(ROOT_INO)
    assert (root.mode, root.uid, root.mtime_ns) == (stat.S_IFDIR | 0o700, 1, 5 * 10**9)
    t = merge([F("a")])
    assert t.get(ROOT_INO).mode == stat.S_IFDIR | 0o755


# --- bogus whiteouts -------------------------------------------------------------------------

def test_whiteouts_of_paths_that_never_existed_are_ignored():
    base = [D("d", mode=0o700), F("d/f", b"f"), F("top")]
    t = merge(base, [WH("nothing"), WH("d/nothing"), WH("ghost/dir/x"), WH("top/below-a-file")])
    assert paths(t) == {"d", "d/f", "top"}                        # no directories appear for them
    assert stat.S_IMODE(node(t, "d").mode) == 0o700


def test_whiteout_below_a_lower_symlink_is_ignored():
    t = merge([D("real"), F("real/x"), L("s", "real")], [WH("s/x")])
    assert paths(t) == {"real", "real/x", "s"}
    assert stat.S_ISLNK(node(t, "s").mode)


def test_whiteout_below_a_path_the_same_layer_made_a_file_is_ignored():
    t = merge([D("d"), F("d/x"), F("y")], [F("d", b"file"), WH("d/x"), WH("y")])
    assert view(t) == {"d": ("f", 0o644, b"file")}


# --- hard links --------------------------------------------------------------------------

def test_hardlink_group_shares_an_inode_and_counts_names():
    t = merge([F("a", b"data", mode=0o640), H("b", "./a"), H("dir/c", "a"), H("d", "/a")])
    ns = [node(t, p) for p in ("a", "b", "dir/c", "d")]
    assert len({n.ino for n in ns}) == 1
    assert ns[0].nlink == 4 and t.read(ns[0].ino, 0, 10) == b"data"
    assert stat.S_IMODE(ns[0].mode) == 0o640


def test_hardlink_to_a_link_and_to_a_symlink_and_fifo():
    t = merge([F("a", b"x"), H("b", "a"), H("c", "b"), L("s", "target"), H("s2", "s"), FIFO("p"), H("p2", "p")])
    assert node(t, "a").ino == node(t, "c").ino and node(t, "a").nlink == 3
    assert node(t, "s2").ino == node(t, "s").ino and node(t, "s2").target == "target"
    assert node(t, "p2").ino == node(t, "p").ino and stat.S_ISFIFO(node(t, "p2").mode)


def test_hardlink_before_its_target_in_the_archive():
    t = merge([H("b", "a"), F("a", b"x")])
    assert node(t, "a").ino == node(t, "b").ino and node(t, "b").nlink == 2


def test_whiteout_of_one_name_keeps_the_others():
    t = merge([F("a", b"x"), H("b", "a"), H("c", "a")], [WH("a")])
    assert paths(t) == {"b", "c"}
    assert node(t, "b").nlink == 2 and node(t, "b").ino == node(t, "c").ino
    t = merge([F("a", b"x"), H("b", "a")], [F("a", b"replaced")])
    assert node(t, "a").ino != node(t, "b").ino
    assert node(t, "a").nlink == 1 and node(t, "b").nlink == 1 and t.read(node(t, "b").ino, 0, 9) == b"x"


def test_hardlinks_resolve_within_their_layer_only(caplog):
    with caplog.at_level(logging.WARNING, logger="layerfs.fs.union"):
        t = merge([F("lower", b"x"), D("dir")],
                  [H("up", "lower"), H("missing", "nope"), H("todir", "dir"), H("wh", ".wh.x"),
                   H("sub/link", "lower"), F("kept", b"k")])
    assert paths(t) == {"lower", "dir", "kept"}                  # skipped links leave no parents behind
    assert "up" in caplog.text and "missing" in caplog.text and "todir" in caplog.text
    assert node(t, "lower").nlink == 1


def test_hardlink_whose_target_is_below_a_same_layer_file_is_skipped():
    t = merge([F("d", b"file"), F("d/x", b"shadowed"), H("l", "d/x")])
    assert paths(t) == {"d"}


# --- node attributes, inodes, nlink --------------------------------------------------------

def test_node_attributes():
    cap = b"\x01\x00\x00\x02\xff\xfe"
    t = merge([F("f", b"hello", mode=0o2755, uid=1000, gid=1001, mtime=1234, xattrs={"security.capability": cap}),
               L("s", "../some/where"), FIFO("p"), F("empty", b""),
               *([CHR("null", 1, 3)] if True else [])])
    f = node(t, "f")
    assert (f.mode, f.uid, f.gid, f.size, f.mtime_ns, f.xattrs) == \
        (stat.S_IFREG | 0o2755, 1000, 1001, 5, 1234 * 10**9, {"security.capability": cap})
    s = node(t, "s")
    assert stat.S_ISLNK(s.mode) and s.size == len("../some/where") and s.target == "../some/where"
    assert stat.S_ISFIFO(node(t, "p").mode)
    e = node(t, "empty")
    assert e.size == 0 and e.layer == -1 and t.read(e.ino, 0, 10) == b""
    c = node(t, "null")
    assert stat.S_ISCHR(c.mode) and (os.major(c.rdev), os.minor(c.rdev)) == (1, 3)


def test_directory_nlink_and_parents():
    t = merge([D("a"), D("a/b"), D("a/c"), F("a/f"), D("a/b/x")])
    assert t.get(ROOT_INO).nlink == 3
    assert node(t, "a").nlink == 4 and node(t, "a/b").nlink == 3 and node(t, "a/b/x").nlink == 2
    assert node(t, "a/b").parent == node(t, "a").ino
    assert t.lookup(node(t, "a/b").ino, "..").ino == node(t, "a").ino


def test_inode_numbers_are_stable():
    layers = ([D("z"), F("z/1"), F("a"), D("m"), F("m/q")], [F("b"), WH("a"), H("c", "b")])
    t1, t2 = merge(*layers), merge(*layers)
    assert [(p, n.ino) for p, n in t1.walk()] == [(p, n.ino) for p, n in t2.walk()]
    assert sorted({n.ino for _, n in t1.walk()}) == list(range(2, len(t1.nodes)))


# --- differential test against plain extraction -----------------------------------------

NAMES = ["a", "b", "c", "d"]


def _rand_path(rng: random.Random, depth: int = 3) -> str:
    return "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, depth)))


def random_layer(rng: random.Random, files: list[str]) -> list:
    out = []
    for _ in range(rng.randint(0, 10)):
        r = rng.random()
        p = _rand_path(rng)
        kw = {"mtime": rng.randint(0, 2_000_000_000), "uid": rng.choice([0, 1, 1000]),
              "gid": rng.choice([0, 2, 1000])}
        if r < 0.30:
            out.append(F(p, rng.randbytes(rng.randint(0, 40)), rng.choice([0o644, 0o600, 0o4755, 0o1777]), **kw))
            files.append(p)
        elif r < 0.50:
            out.append(D(p, rng.choice([0o755, 0o700, 0o1777, 0o2750]), **kw))
        elif r < 0.58:
            out.append(L(p, rng.choice(["a", "../b", "/c", "a/b"]), **kw))
        elif r < 0.68:
            target = rng.choice(files) if files and rng.random() < 0.8 else _rand_path(rng)
            out.append(H(p, rng.choice(["", "./", "/"]) + target, **kw))
        elif r < 0.85:
            out.append(WH(p))
        elif r < 0.92:
            out.append(OPQ("" if rng.random() < 0.1 else _rand_path(rng, 2)))
        else:
            out.append(FIFO(p, rng.choice([0o600, 0o644]), **kw))
    rng.shuffle(out)
    return out


class Reference:
    """Extract layers into a real directory, one after the other, the straightforward way:
    whiteouts of a layer delete from what the lower layers left, then its entries are
    extracted (parents made as needed), hard links last. No symlink is ever followed."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.dirattr: dict[str, tuple] = {"": (0o755, 0, 0, 0)}   # path -> (perm, uid, gid, mtime_ns)
        self.lnkmode: dict[int, int] = {}                           # symlink inode -> tar mode

    def p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else str(self.root)

    def is_real_dir(self, path: str) -> bool:
        parts = path.split("/") if path else []
        for i in range(len(parts) + 1):
            try:
                st = os.lstat(self.p("/".join(parts[:i])))
            except FileNotFoundError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def remove(self, path: str) -> None:
        full = self.p(path)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)
        for k in [k for k in self.dirattr if k == path or k.startswith(path + "/")]:
            del self.dirattr[k]

    def clear(self, path: str) -> None:
        for name in os.listdir(self.p(path)):
            self.remove(f"{path}/{name}" if path else name)

    def mkdirs(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            full = self.p(sub)
            if os.path.lexists(full) and not stat.S_ISDIR(os.lstat(full).st_mode):
                self.remove(sub)
            if not os.path.lexists(full):
                os.mkdir(full)
                self.dirattr[sub] = (0o755, 0, 0, 0)

    def apply(self, index: LayerIndex, tar: bytes) -> None:
        entries = index.entries
        by_path = {e.path: e for e in entries}

        def is_wh(path):
            return path.rpartition("/")[2].startswith(".wh.")

        nondir = {e.path for e in entries if e.type != DIR and not is_wh(e.path)}

        def ignored(path):
            parts = path.split("/")
            return any("/".join(parts[:i]) in nondir or parts[i - 1].startswith(".wh.")
                       for i in range(1, len(parts)))

        live = [e for e in entries if not ignored(e.path)]
        for e in live:                                   # 1. whiteouts, against the lower layers
            d, _, base = e.path.rpartition("/")
            if not base.startswith(".wh."):
                continue
            if base == ".wh..wh..opq":
                if self.is_real_dir(d):
                    self.clear(d)
            elif not base.startswith(".wh..wh."):
                name = base[4:]
                if self.is_real_dir(d) and os.path.lexists(self.p(f"{d}/{name}" if d else name)):
                    self.remove(f"{d}/{name}" if d else name)
        links = []
        for e in live:                                   # 2. entries
            if is_wh(e.path):
                continue
            if e.type == HARDLINK:
                links.append(e)
                continue
            if e.path == "":
                self.dirattr[""] = (e.mode, e.uid, e.gid, e.mtime_ns)
                continue
            self.mkdirs(e.path)
            full = self.p(e.path)
            if e.type == DIR:
                if not self.is_real_dir(e.path):
                    self.remove(e.path)
                    os.mkdir(full)
                self.dirattr[e.path] = (e.mode, e.uid, e.gid, e.mtime_ns)
                continue
            self.remove(e.path)
            if e.type == "file":
                with open(full, "wb") as f:
                    f.write(tar[e.offset:e.offset + e.size])
            elif e.type == "symlink":
                os.symlink(e.linkname, full)
                self.lnkmode[os.lstat(full).st_ino] = e.mode
            elif e.type == "fifo":
                os.mkfifo(full)
            elif e.type == "char":
                os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(e.devmajor, e.devminor))
            if IS_ROOT:
                os.lchown(full, e.uid, e.gid)
            if e.type != "symlink":
                os.chmod(full, e.mode)
            os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        for e in links:                                  # 3. hard links, within the layer
            target, seen = by_path.get(e.linkname), 0
            while target is not None and target.type == HARDLINK and seen < 64 and not ignored(target.path):
                target, seen = by_path.get(target.linkname), seen + 1
            if target is None or target.type in (DIR, HARDLINK) or is_wh(target.path) or ignored(target.path):
                continue
            self.mkdirs(e.path)
            self.remove(e.path)
            os.link(self.p(target.path), self.p(e.path), follow_symlinks=False)

    def snapshot(self) -> dict[str, tuple]:
        out = {}
        groups: dict[int, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode):
                    perm, uid, gid, mtime = self.dirattr[rel]
                    nsub = sum(1 for x in os.scandir(full) if x.is_dir(follow_symlinks=False))
                    out[rel] = ("d", perm, uid, gid, mtime, 2 + nsub, None)
                    continue
                groups.setdefault(st.st_ino, []).append(rel)
                if stat.S_ISLNK(st.st_mode):
                    perm, extra = self.lnkmode[st.st_ino], os.readlink(full)
                elif stat.S_ISREG(st.st_mode):
                    perm, extra = stat.S_IMODE(st.st_mode), Path(full).read_bytes()
                else:
                    perm, extra = stat.S_IMODE(st.st_mode), st.st_rdev
                out[rel] = (stat.filemode(st.st_mode)[0], perm, st.st_uid if IS_ROOT else None,
                            st.st_gid if IS_ROOT else None, st.st_mtime_ns, st.st_nlink, extra)
        return out, sorted(sorted(g) for g in groups.values())


def tree_snapshot(tree: MergedTree) -> tuple[dict, list]:
    out = {}
    groups: dict[int, list[str]] = {}
    for path, n in tree.walk():
        kind = stat.filemode(n.mode)[0]
        if kind == "d":
            out[path] = ("d", stat.S_IMODE(n.mode), n.uid, n.gid, n.mtime_ns, n.nlink, None)
            continue
        groups.setdefault(n.ino, []).append(path)
        extra = n.target if kind == "l" else tree.read(n.ino, 0, n.size) if kind == "-" else n.rdev
        out[path] = (kind, stat.S_IMODE(n.mode), n.uid if IS_ROOT else None, n.gid if IS_ROOT else None,
                     n.mtime_ns, n.nlink, extra)
    return out, sorted(sorted(g) for g in groups.values())


def test_differential_against_plain_extraction(tmp_path):
    for seed in range(400):
        rng = random.Random(seed)
        files: list[str] = []
        layers = [random_layer(rng, files) for _ in range(rng.randint(1, 4))]
        tars = [make_tar(m) for m in layers]
        indexes = [index_of(t) for t in tars]
        tree = build_tree(indexes, [BytesReader(t) for t in tars])
        ref = Reference(tmp_path / f"ref{seed}")
        for ix, tar in zip(indexes, tars):
            ref.apply(ix, tar)
        want, want_groups = ref.snapshot()
        got, got_groups = tree_snapshot(tree)
        assert got == want, f"seed {seed}: layers {layers}"
        assert got_groups == want_groups, f"seed {seed}"
        root = tree.get(ROOT_INO)
        assert (stat.S_IMODE(root.mode), root.uid, root.gid, root.mtime_ns) == ref.dirattr[""], f"seed {seed}"
        shutil.rmtree(ref.root)


# --- the tree cache ---------------------------------------------------------------------

def _nodes_equal(a: MergedTree, b: MergedTree) -> None:
    assert len(a.nodes) == len(b.nodes)
    for x, y in zip(a.nodes[1:], b.nodes[1:]):
        for slot in ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "target", "xattrs",
                     "layer", "offset", "sparse", "inline", "parent"):
            assert getattr(x, slot) == getattr(y, slot), (x, slot)
        assert x.children == y.children
        if x.children is not None:
            assert list(x.children) == list(y.children)


def _image(store: Store, layers: list[list]) -> tuple:
    descs = []
    for members in layers:
        blob = gzip.compress(make_tar(members))
        d = store.put_blob(blob)
        descs.append({"mediaType": OCI_LAYER_GZIP, "digest": str(d), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cd = store.put_blob(config)
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": {"mediaType": OCI_CONFIG, "digest": str(cd), "size": len(config)},
                      "layers": descs}).encode()
    md = store.put_blob(raw)
    return parse_manifest(raw, expected=md)


LAYERS = [
    [D("etc", mode=0o755), F("etc/passwd", b"root:x:0:0\n"), F("etc/motd", b"hi\n"), D("usr"), D("usr/bin"),
     F("usr/bin/sh", b"#!sh", mode=0o755, xattrs={"security.capability": b"\x01\x00\xff"}),
     L("bin", "usr/bin"), FIFO("run.fifo"), H("usr/bin/ash", "usr/bin/sh")],
    [WH("etc/motd"), F("etc/new", b"new", mode=0o600, uid=1000), OPQ("usr"), D("usr", mode=0o700),
     F("usr/x", b"x" * 1000)],
]


def test_open_image_tree_cache_round_trip(tmp_path):
    store = Store(tmp_path / "store").init()
    m = _image(store, LAYERS)
    t1 = open_image_tree(store, m)
    cache = tree_cache_path(store, m, 2)
    assert cache.exists()
    t2 = open_image_tree(store, m)                     # from the cache
    _nodes_equal(t1, t2)
    assert view(t1) == view(t2)
    assert view(t2)["etc/new"] == ("f", 0o600, b"new") and "etc/motd" not in view(t2)
    assert node(t2, "usr/bin/sh") is None and view(t2)["usr/x"][2] == b"x" * 1000
    # the first layer only
    t0 = open_image_tree(store, m, upto=1)
    assert tree_cache_path(store, m, 1).exists()
    assert view(t0)["etc/motd"] == ("f", 0o644, b"hi\n")
    assert node(t0, "usr/bin/ash").ino == node(t0, "usr/bin/sh").ino
    assert node(t0, "usr/bin/sh").xattrs == {"security.capability": b"\x01\x00\xff"}
    _nodes_equal(t0, open_image_tree(store, m, upto=1))
    assert paths(open_image_tree(store, m, upto=0)) == set()
    with pytest.raises(UsageError):
        open_image_tree(store, m, upto=3)


def _rewrite_head(data: bytes, *, version=None) -> bytes:
    magic, v, flags, _ = struct.unpack_from("<8sIIQ", data)
    body = data[24:]
    return struct.pack("<8sIIQ", magic, v if version is None else version, flags,
                       xxhash.xxh3_64_intdigest(body)) + body


def test_corrupt_or_old_tree_cache_is_rebuilt(tmp_path, caplog):
    store = Store(tmp_path / "store").init()
    m = _image(store, LAYERS)
    good_tree = open_image_tree(store, m)
    cache = tree_cache_path(store, m, 2)
    good = cache.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    for data in (b"", good[:30], good[:-1], bytes(bad), _rewrite_head(good, version=99)):
        cache.write_bytes(data)
        with caplog.at_level(logging.WARNING, logger="layerfs.fs.imagetree"):
            t = open_image_tree(store, m)
        _nodes_equal(t, good_tree)
        assert cache.read_bytes() == good                  # rewritten
    # a cache that belongs to other layers is not used
    other = _image(store, [[F("only", b"1")]])
    open_image_tree(store, other)
    shutil.copy(tree_cache_path(store, other, 1), cache)
    _nodes_equal(open_image_tree(store, m), good_tree)


def test_tree_built_into_columns_equals_the_built_nodes():
    """open_image_tree builds the cache's columns straight from the merge; they give the same tree as
    build_tree's Node objects (random layers: links, whiteouts, opaque directories, symlinks, fifos)."""
    from layerfs.fs.treecache import merged_body, tree_of
    from layerfs.fs.union import merge_layers
    rng = random.Random(5)
    cases = [LAYERS]
    for _ in range(40):
        files: list[str] = []
        cases.append([random_layer(rng, files) for _ in range(rng.randint(1, 4))])
    for layers in cases:
        tars = [make_tar(m) for m in layers]
        readers = [BytesReader(t) for t in tars]
        built = build_tree([index_of(t) for t in tars], readers)
        direct = tree_of(*merged_body(merge_layers([index_of(t) for t in tars])), readers)
        _nodes_equal(built, direct)
        assert direct.get(ROOT_INO).mode == built.get(ROOT_INO).mode and direct.statfs() == built.statfs()


def test_tree_cache_of_the_previous_format_is_rebuilt_with_one_warning(tmp_path, caplog):
    from layerfs.fs import TREE_FORMAT_VERSION
    store = Store(tmp_path / "store").init()
    m = _image(store, LAYERS)
    good_tree = open_image_tree(store, m)
    cache = tree_cache_path(store, m, 2)
    good = cache.read_bytes()
    from layerfs.fs import tree_cache_current
    assert tree_cache_current(cache) and not tree_cache_current(tmp_path / "missing")
    cache.write_bytes(_rewrite_head(good, version=TREE_FORMAT_VERSION - 1))
    assert not tree_cache_current(cache)        # 'mount' rebuilds it before starting the daemon
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="layerfs"):
        t = open_image_tree(store, m)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"format version {TREE_FORMAT_VERSION - 1}" in warnings[0] \
        and "rebuilding" in warnings[0], warnings
    _nodes_equal(t, good_tree)
    assert cache.read_bytes() == good
    from layerfs.fs import LazyNodes
    assert isinstance(t.nodes, LazyNodes)       # served from the cache it just wrote, not the built objects


def test_loaded_tree_keeps_a_bounded_number_of_nodes(tmp_path):
    """Past ``retain`` made Nodes, a loaded table drops them and makes equal ones again on their next use."""
    from layerfs.fs import LazyNodes
    members = [D("d"), D("d/sub")] + [F(f"d/f{i}", b"x" * i, mode=0o600 + i % 8) for i in range(40)] \
        + [F(f"d/sub/g{i}", b"y") for i in range(30)] + [L("d/link", "f1"), H("d/hard", "d/f2")]
    tars = [make_tar(LAYERS[0]), make_tar(members)]
    readers = [BytesReader(t) for t in tars]
    built = build_tree([index_of(t) for t in tars], readers)
    save_tree(built, tmp_path / "t.tree")
    lazy = load_tree(tmp_path / "t.tree", readers)
    assert isinstance(lazy.nodes, LazyNodes)
    lazy.nodes.retain = 7
    for _ in range(3):                           # every node, more than once, through every way in
        _nodes_equal(built, lazy)
        assert view(lazy) == view(built)
        assert len(lazy.nodes._made) <= 7
        assert sum(x is not None for x in list.__iter__(lazy.nodes)) <= 7
    assert lazy.statfs() == built.statfs()
    assert [x.ino if x else None for x in lazy.nodes] == [x.ino if x else None for x in built.nodes]


def test_loaded_tree_nodes_share_equal_ints(tmp_path, monkeypatch):
    """Nodes made from a loaded table share one int object per distinct mode, mtime and parent, up to
    SHARED_INTS distinct values; past that the values stay right, only unshared."""
    import layerfs.fs.treecache as treecache
    members = [D("d", mtime=1_700_000_000)] + [F(f"d/f{i}", b"x", mtime=1_700_000_000 + i % 3) for i in range(30)] \
        + [F(f"g{i}", b"y", mode=0o600, mtime=1_800_000_000 + i) for i in range(30)]
    tars = [make_tar(members)]
    readers = [BytesReader(t) for t in tars]
    built = build_tree([index_of(t) for t in tars], readers)
    save_tree(built, tmp_path / "t.tree")
    lazy = load_tree(tmp_path / "t.tree", readers)
    files = [node(lazy, f"d/f{i}") for i in range(30)]
    assert all(x.mode is files[0].mode and x.parent is files[0].parent for x in files)
    assert all(x.mtime_ns is files[i % 3].mtime_ns for i, x in enumerate(files))
    _nodes_equal(built, lazy)
    monkeypatch.setattr(treecache, "SHARED_INTS", 4)
    small = load_tree(tmp_path / "t.tree", readers)
    _nodes_equal(built, small)
    assert len(small.nodes.cols._shared) <= 4 + 2     # one node adds at most three values once below the bound


def test_tree_cache_directory_listed_by_another_directory_is_left_out(tmp_path, caplog):
    """A cache whose directory lists a directory that is not its child (a loop, or a second parent) serves
    the tree without that name: every walk ends."""
    tars = [make_tar([D("a"), D("a/b"), F("a/b/f", b"1"), D("c")])]
    readers = [BytesReader(t) for t in tars]
    built = build_tree([index_of(t) for t in tars], readers)
    a, c = node(built, "a"), node(built, "c")
    built.nodes[node(built, "a/b").ino].children["loop"] = a.ino        # a/b/loop -> a: a cycle
    c.children["b2"] = node(built, "a/b").ino                            # a second parent
    save_tree(built, tmp_path / "t.tree")
    lazy = load_tree(tmp_path / "t.tree", readers)
    with caplog.at_level(logging.WARNING, logger="layerfs.fs.treecache"):
        names = sorted(p for p, _ in lazy.walk())
    assert names == ["a", "a/b", "a/b/f", "c"]
    assert sum("not its own" in r.getMessage() for r in caplog.records) == 2


def test_save_and_load_tree_directly(tmp_path):
    tars = [make_tar(m) for m in LAYERS]
    tree = build_tree([index_of(t) for t in tars], [BytesReader(t) for t in tars])
    save_tree(tree, tmp_path / "t.tree", {"k": 1})
    back = load_tree(tmp_path / "t.tree", [BytesReader(t) for t in tars], {"k": 1})
    _nodes_equal(tree, back)
    assert view(back) == view(tree)
    from layerfs.index import IndexFormatError
    with pytest.raises(IndexFormatError):
        load_tree(tmp_path / "t.tree", [BytesReader(t) for t in tars], {"k": 2})
    with pytest.raises(IndexFormatError):                   # the tree refers to two layers
        load_tree(tmp_path / "t.tree", [BytesReader(tars[0])], {"k": 1})


def test_lazy_inode_table_behaves_like_a_list(tmp_path):
    tars = [make_tar(m) for m in LAYERS]
    readers = [BytesReader(t) for t in tars]
    built = build_tree([index_of(t) for t in tars], readers)
    save_tree(built, tmp_path / "t.tree")
    lazy = load_tree(tmp_path / "t.tree", readers)
    n = len(built.nodes)
    assert len(lazy.nodes) == n and lazy.nodes[0] is None
    last = lazy.nodes[-1]
    assert last is lazy.nodes[n - 1] and last.ino == n - 1          # made once, then kept
    assert [x.ino for x in lazy.nodes[2:5]] == [2, 3, 4]
    assert lazy.get(ROOT_INO).children == built.get(ROOT_INO).children
    assert lazy.nodes[3] in lazy.nodes and lazy.nodes.index(lazy.nodes[3]) == 3
    assert [x.ino if x else None for x in lazy.nodes] == [x.ino if x else None for x in built.nodes]
    assert lazy.statfs() == built.statfs()
    # the table still grows like a list (hand-built additions), and inline data is cached too
    new = lazy.add(ROOT_INO, "added", stat.S_IFREG | 0o644, size=3, inline=b"abc")
    assert new.ino == n and lazy.read(new.ino, 0, 10) == b"abc"
    save_tree(lazy, tmp_path / "t2.tree")
    again = load_tree(tmp_path / "t2.tree", readers)
    _nodes_equal(lazy, again)
    assert again.read(n, 0, 10) == b"abc"


def test_lazy_inode_table_is_thread_safe(tmp_path):
    import threading
    tars = [make_tar([F(f"f{i}", b"x") for i in range(300)])]
    readers = [BytesReader(t) for t in tars]
    save_tree(build_tree([index_of(t) for t in tars], readers), tmp_path / "t.tree")
    lazy = load_tree(tmp_path / "t.tree", readers)
    seen: list[list] = [[] for _ in range(4)]

    def grab(k):
        for i in range(1, len(lazy.nodes)):
            seen[k].append(lazy.nodes[i])

    ts = [threading.Thread(target=grab, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(1, 4):
        assert all(a is b for a, b in zip(seen[0], seen[k]))


def test_damaged_tree_cache_behind_a_valid_checksum_fails_cleanly(tmp_path):
    """Damage the checksum cannot see (a bug, or a hostile file): IndexFormatError or a usable tree, never a crash."""
    import zstandard
    from layerfs.index import IndexFormatError, pack_file, unpack_file
    from layerfs.fs import TREE_FORMAT_VERSION
    tars = [make_tar(m) for m in LAYERS]
    readers = [BytesReader(t) for t in tars]
    save_tree(build_tree([index_of(t) for t in tars], readers), tmp_path / "t.tree")
    meta, (body,) = unpack_file((tmp_path / "t.tree").read_bytes(), TREE_FORMAT_VERSION, 1, magic=b"LFSTREE\n")
    raw = zstandard.ZstdDecompressor().decompress(bytes(body))
    rng = random.Random(11)
    outcomes = collections.Counter()
    for _ in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0xFF, rng.randrange(256)])
        if rng.random() < 0.2:
            b = b[:rng.randrange(len(b))]
        data = pack_file(TREE_FORMAT_VERSION, meta, [zstandard.ZstdCompressor().compress(bytes(b))], magic=b"LFSTREE\n")
        (tmp_path / "bad.tree").write_bytes(data)
        try:
            t = load_tree(tmp_path / "bad.tree", readers)
        except IndexFormatError:
            outcomes["rejected"] += 1
            continue
        for _ in t.walk():          # every node can be made and walked
            pass
        outcomes["loaded"] += 1
    assert outcomes["rejected"] > 50
