"""diff, commit and export: hand-made upper directories over real images, checked against
umoci (an independent unpacker) and against the union view of the original plus the changes."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from clirun import run_cli as run
from layerfs.changes import CommitOptions, commit, diff, export_tree, overlay_tree, scan_upper
from layerfs.changes.dockerfile import ChangeSyntaxError, apply_changes
from layerfs.changes.scan import UpperDirError
from layerfs.changes.tarwriter import EMPTY_TAR_DIGEST, write_layer_tar
from imagebuild import LayerBuilder, build_image, compress
from layerfs.index import index_path
from layerfs.mount import resolve_target
from layerfs.image import OCI_LAYER_GZIP, OCI_MANIFEST, Digest
from layerfs.transfer import PullOptions, Puller
from layerfs.image import Reference
from layerfs.registry import RegistryOptions
from layerfs.store import Store
from layerfs.fs import OVERRIDE_XATTR, MergedTree
from layerfs.fs import open_image_tree
from prereqs import require_binary
from registryclient import push_image

IS_ROOT = os.geteuid() == 0
BIN = b"\xff\x00\x01binary"
BASE = "localhost/test/base:1"


# --- images and uppers ----------------------------------------------------------------------------

def base_layers() -> list[bytes]:
    a = LayerBuilder()
    a.add_dir("etc").add_file("etc/motd", b"hello\n").add_file("etc/passwd", b"root:x:0:0\n")
    a.add_file("etc/keep", b"keep\n")
    a.add_dir("opt").add_dir("opt/sub").add_file("opt/sub/x", b"x").add_file("opt/y", b"y")
    a.add_dir("usr").add_dir("usr/bin").add_file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755)
    a.add_hardlink("usr/bin/tool2", "usr/bin/tool").add_file("usr/bin/su", b"su", mode=0o4755)
    a.add_dir("var").add_dir("var/log").add_file("var/log/old.log", b"old").add_file("var/log/keep.log", b"k")
    a.add_symlink("link", "etc/motd").add_dir("dev").add_device("dev/null", "c", 1, 3)
    a.add_dir("run").add_fifo("run/fifo")
    a.add_dir("data").add_file("data/bin", b"data", xattrs={"user.bin": BIN, "user.text": b"hi"})
    a.add_dir("home")
    b = LayerBuilder(mtime=1_710_000_000)
    b.add_whiteout("var/log/old.log").add_file("etc/motd", b"hello again\n")
    b.add_dir("home/u", uid=1000, gid=1000).add_file("home/u/file", b"mine", uid=1000, gid=1000)
    return [a.build(), b.build()]


def base_image(docker: bool = False):
    return build_image(base_layers(), docker=docker, config={"Cmd": ["/bin/sh", "-l"], "Env": ["PATH=/usr/bin"]},
                       history=[{"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs /"},
                                {"created": "2024-03-09T00:00:00Z", "created_by": "RUN change things"}])


def put_image(store: Store, name: str, img) -> None:
    store.init()
    for d, data in img.blobs.items():
        store.put_blob(data, d)
    store.tag(name, img.manifest_descriptor)


def make_upper(root: Path) -> Path:
    """Changes as the overlay writes them (OCI whiteouts, opaque markers, override_stat)."""
    up = root / "upper"
    up.mkdir()
    (up / "etc").mkdir()
    (up / "etc/.wh.passwd").write_bytes(b"")
    (up / "etc/.wh.ghost").write_bytes(b"")                  # a whiteout of nothing: no change
    (up / "etc/motd").write_bytes(b"changed\n")
    (up / "etc/new.conf").write_bytes(b"new\n")
    os.setxattr(up / "etc/new.conf", OVERRIDE_XATTR, b"1000:1000:4750")   # rootless chown + chmod u+s
    (up / "opt").mkdir()
    (up / "opt/.wh..wh..opq").write_bytes(b"")               # rm -rf /opt; mkdir /opt
    (up / "opt/z").write_bytes(b"z")
    (up / "opt/sub").mkdir()
    (up / "opt/sub/w").write_bytes(b"w")
    (up / "newdir").mkdir()
    (up / "newdir/a").write_bytes(b"linked")
    os.link(up / "newdir/a", up / "newdir/b")
    (up / "newdir/c").write_bytes(b"c")
    os.setxattr(up / "newdir/c", "user.bin", BIN)
    os.symlink("../etc/keep", up / "newdir/sym")
    (up / "usr").mkdir()
    (up / "usr/bin").mkdir()
    (up / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho changed\n")
    os.chmod(up / "usr/bin/tool", 0o755)
    (up / "dev0").write_bytes(b"")
    os.setxattr(up / "dev0", OVERRIDE_XATTR, b"0:5:0620:c:4:1")     # a device rootless could not mknod
    (up / "pipe").write_bytes(b"")
    os.setxattr(up / "pipe", OVERRIDE_XATTR, b"0:0:0600:p:0:0")
    (up / "home").mkdir()
    (up / "home/u").mkdir()
    os.chmod(up / "home/u", 0o700)
    os.setxattr(up / "home/u", OVERRIDE_XATTR, b"1000:1000:0700")
    (up / "data").mkdir()                                     # copied up, nothing changed
    (up / "run").write_bytes(b"a file where a directory was")
    os.symlink("etc/passwd", up / "link")
    (up / "var").mkdir()
    (up / "var/.wh.log").write_bytes(b"")                     # rm -rf /var/log; mkdir /var/log (whiteout form)
    (up / "var/log").mkdir()
    (up / "var/log/new.log").write_bytes(b"new")
    for p in [*up.rglob("*"), up]:                            # one second for every mtime of the upper
        os.utime(p, ns=(1_720_000_000_500_000_000,) * 2, follow_symlinks=False)
    return up


EXPECTED_DIFF = """\
A /dev0
C /etc
C /etc/motd
A /etc/new.conf
D /etc/passwd
C /home
C /home/u
C /link
A /newdir
A /newdir/a
A /newdir/b
A /newdir/c
A /newdir/sym
C /opt
C /opt/sub
A /opt/sub/w
D /opt/sub/x
D /opt/y
A /opt/z
A /pipe
C /run
C /usr
C /usr/bin
C /usr/bin/tool
C /var
C /var/log
D /var/log/keep.log
A /var/log/new.log
"""


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    root = tmp_path / "store"
    monkeypatch.setenv("LAYERFS_ROOT", str(root))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    st = Store(root).init()
    put_image(st, BASE, base_image())
    return st


@pytest.fixture
def upper(tmp_path) -> Path:
    return make_upper(tmp_path)


# --- snapshots: one comparable form for trees, directories and tars ---------------------------------

def tree_snapshot(tree: MergedTree) -> dict:
    """path -> (type, perm, uid, gid, mtime s, content/target/rdev, xattrs, link group)."""
    out, groups = {}, {}
    for path, n in tree.walk():
        fmt = stat.S_IFMT(n.mode)
        if fmt == stat.S_IFREG:
            what = hashlib.sha256(tree.read(n.ino, 0, n.size) if n.size else b"").hexdigest()[:16]
        elif fmt == stat.S_IFLNK:
            what = n.target
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            what = (os.major(n.rdev), os.minor(n.rdev))
        else:
            what = None
        if fmt != stat.S_IFDIR:
            groups.setdefault(n.ino, []).append(path)
        out[path] = [stat.filemode(n.mode), n.uid, n.gid, n.mtime_ns // 10**9, what, dict(n.xattrs or {}), None]
    return _with_groups(out, groups)


def dir_snapshot(root: Path) -> dict:
    out, groups = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFREG:
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
            elif fmt == stat.S_IFLNK:
                what = os.readlink(p)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            try:
                xa = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
            except OSError:
                xa = {}
            if fmt != stat.S_IFDIR:
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, what, xa, None]
    return _with_groups(out, groups)


def tar_snapshot(data: bytes) -> dict:
    out, groups = {}, {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for ti in tf:
            name = ti.name.rstrip("/")
            if ti.islnk():
                out[name] = list(out[ti.linkname])
                groups[ti.linkname].append(name)
                continue
            mode = {tarfile.REGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                    tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                    tarfile.FIFOTYPE: stat.S_IFIFO}[ti.type] | ti.mode
            if ti.isreg():
                what = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()[:16]
            elif ti.issym():
                what = ti.linkname
            elif ti.isdev() and not ti.isfifo():
                what = (ti.devmajor, ti.devminor)
            else:
                what = None
            xa = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                  for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if not ti.isdir():
                groups[name] = [name]
            out[name] = [stat.filemode(mode), ti.uid, ti.gid, int(ti.mtime), what, xa, None]
    return _with_groups(out, {k: v for k, v in groups.items()})


def _with_groups(out: dict, groups: dict) -> dict:
    for members in groups.values():
        if len(members) > 1:
            for p in members:
                out[p][6] = tuple(sorted(members))
    return {k: tuple(v) for k, v in out.items()}


def without_dir_mtimes(snap: dict) -> dict:
    """umoci restores directory mtimes only for directories its layers name."""
    return {k: v[:3] + ((None,) if v[0].startswith("d") else v[3:4]) + v[4:] for k, v in snap.items()}


def umoci_unpack(store_root: Path, name: str, dest: Path) -> Path:
    umoci = require_binary("umoci")
    proc = subprocess.run([umoci, "raw", "unpack", *([] if IS_ROOT else ["--rootless"]),
                           "--image", f"{store_root}:{name}", str(dest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dest


# --- the upper directory ------------------------------------------------------------------------------

def test_scan_reads_the_upper_format(upper):
    scan = scan_upper(upper)
    kinds = {(e.kind, e.path) for e in scan.entries}
    assert ("whiteout", "etc/passwd") in kinds and ("opaque", "opt") in kinds and ("whiteout", "var/log") in kinds
    by_path = {e.path: e for e in scan.entries if e.kind not in ("whiteout", "opaque")}
    assert (by_path["etc/new.conf"].uid, by_path["etc/new.conf"].gid, by_path["etc/new.conf"].mode) == \
        (1000, 1000, 0o4750)
    dev = by_path["dev0"]
    assert (dev.kind, dev.devmajor, dev.devminor, dev.gid, dev.mode) == ("char", 4, 1, 5, 0o620)
    assert by_path["pipe"].kind == "fifo"
    assert by_path["newdir/a"].inode == by_path["newdir/b"].inode is not None
    assert by_path["newdir/c"].xattrs == {"user.bin": BIN}
    assert OVERRIDE_XATTR not in (by_path["etc/new.conf"].xattrs or {})
    # layer order: depth first, a directory's contents right after it; opaque marker and whiteouts first
    order = [(e.kind, e.path) for e in scan.entries]
    assert order.index(("dir", "opt")) < order.index(("opaque", "opt")) < order.index(("file", "opt/z"))
    assert order.index(("whiteout", "var/log")) < order.index(("dir", "var/log")) < \
        order.index(("file", "var/log/new.log"))
    names = [p for _, p in order]
    assert names.index("newdir/sym") < names.index("opt")


def test_scan_ignores_malformed_overrides_and_refuses_missing_dirs(tmp_path, caplog):
    """The upper format's one rule (layerfs.fs.upper.parse_override): a malformed override value is ignored
    as a whole with a warning, the entry keeps its real owner, mode and type (as the mount shows it)."""
    up = tmp_path / "u"
    up.mkdir()
    (up / "f").write_bytes(b"")
    os.chmod(up / "f", 0o640)
    real = os.stat(up / "f")
    for bad in (b"0:0", b"x:0:644", b"0:0:9999", b"0:0:644:z:1:1", b"0:0:644:c:1"):
        os.setxattr(up / "f", OVERRIDE_XATTR, bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            [e] = scan_upper(up).entries
        assert (e.kind, e.uid, e.gid, e.mode) == ("file", real.st_uid, real.st_gid, 0o640), bad
        assert any(OVERRIDE_XATTR in r.getMessage() and str(up / "f") in r.getMessage() for r in caplog.records)
    with pytest.raises(UpperDirError, match="does not exist"):
        scan_upper(tmp_path / "nope")


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a 0:0 whiteout needs root")
def test_kernel_overlay_form_is_read_too(store, tmp_path):
    up = tmp_path / "k"
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc/passwd", stat.S_IFCHR | 0o600, 0)      # kernel overlayfs whiteout
    (up / "opt").mkdir()
    os.setxattr(up / "opt", "trusted.overlay.opaque", b"y")
    t = resolve_target(store, str(up), image=BASE)
    assert [str(c) for c in diff(t.lower_tree(store), t.scan())] == \
        ["C /etc", "D /etc/passwd", "C /opt", "D /opt/sub", "D /opt/y"]


# --- diff ------------------------------------------------------------------------------------------

def test_diff_follows_docker(store, upper, capsys):
    t = resolve_target(store, str(upper), image=BASE)
    assert "".join(f"{c}\n" for c in diff(t.lower_tree(store), t.scan())) == EXPECTED_DIFF
    code, out, err = run(["diff", "--image", BASE, upper], capsys)
    assert (code, out, err) == (0, EXPECTED_DIFF, "")


def test_diff_small_cases(store, tmp_path):
    lower = open_image_tree(store, store.resolve(BASE)[1])

    def d(build) -> list[str]:
        up = tmp_path / f"u{len(list(tmp_path.iterdir()))}"
        up.mkdir()
        build(up)
        return [str(c) for c in diff(lower, scan_upper(up))]

    assert d(lambda u: None) == []
    # deep addition: every existing directory above it is C, new ones A
    assert d(lambda u: (u / "var/log/a/b").mkdir(parents=True)) == ["C /var", "C /var/log", "A /var/log/a",
                                                                    "A /var/log/a/b"]
    # a copied-up directory with nothing changed is no change; a chmod is
    assert d(lambda u: (u / "data").mkdir()) == []
    assert d(lambda u: (u / "data").mkdir(mode=0o700)) == ["C /data"]
    # a deleted directory: only its top is D
    assert d(lambda u: (u / ".wh.opt").write_bytes(b"")) == ["D /opt"]
    # the whole root opaque: everything of the image is gone, what the upper has is C or A
    assert d(lambda u: ((u / ".wh..wh..opq").write_bytes(b""), (u / "etc").mkdir(),
                        (u / "fresh").write_bytes(b""))) == \
        ["D /data", "D /dev", "C /etc", "D /etc/keep", "D /etc/motd", "D /etc/passwd", "A /fresh", "D /home",
         "D /link", "D /opt", "D /run", "D /usr", "D /var"]
    # a directory over a file is C, and everything in it A
    assert d(lambda u: ((u / "link").mkdir(), (u / "link/x").write_bytes(b""))) == ["C /link", "A /link/x"]


def test_upper_kept_by_the_store_after_its_mount(store, capsys):
    """``ROOT/uppers/<id>/upper`` with ``info.json`` (written by mount) is found by path or id, no --image."""
    base = store.root / "uppers" / "0123456789ab"
    (base / "upper/etc").mkdir(parents=True)
    (base / "upper/etc/.wh.motd").write_bytes(b"")
    (base / "info.json").write_text(json.dumps({"id": "0123456789ab", "image": BASE,
                                                "manifest_digest": str(store.resolve(BASE)[1].digest)}))
    for target in ("0123456789ab", base / "upper"):
        code, out, err = run(["diff", target], capsys)
        assert (code, out) == (0, "C /etc\nD /etc/motd\n"), err


def test_diff_and_commit_of_a_read_only_mount_or_bad_targets(store, tmp_path, capsys):
    code, out, err = run(["diff", tmp_path / "nowhere"], capsys)
    assert code == 1 and err.startswith("layerfs: error: unknown mount point") and err.count("\n") == 1
    code, out, err = run(["diff", tmp_path], capsys)
    assert code == 1 and "is not a layerfs mount point" in err and "--image" in err
    code, out, err = run(["diff", "--image", "localhost/nope:1", tmp_path], capsys)
    assert code == 1 and "no such image" in err
    code, out, err = run(["commit", tmp_path / "nowhere", "x/y:1"], capsys)
    assert code == 1 and "unknown mount point" in err


# --- commit ---------------------------------------------------------------------------------------

def _members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        return list(tf)


def test_commit_layer_config_manifest(store, upper, capsys):
    code, out, err = run(["commit", "--image", BASE, "-m", "patched motd", "--author", "Jane <j@example.com>",
                          "-c", 'CMD ["nginx", "-g", "daemon off;"]', "-c", "ENV MODE=prod PATH=$PATH:/opt/bin",
                          upper, "localhost/test/new:2"], capsys)
    assert code == 0, err
    st = store
    rec, m = st.resolve("localhost/test/new:2")
    cfg = st.config(m)
    assert out == f"{m.config.digest}\n"                      # docker commit prints the image id
    base = st.resolve(BASE)[1]
    assert m.media_type == OCI_MANIFEST and rec.descriptor.media_type == OCI_MANIFEST
    assert list(m.layers[:2]) == list(base.layers) and m.layers[2].media_type == OCI_LAYER_GZIP
    assert json.loads(m.raw)["annotations"]["org.opencontainers.image.base.digest"] == str(base.digest)
    blob = st.read_blob(m.layers[2].digest)
    # fixed gzip header: magic, deflate, no flags (no name), mtime 0, OS 3; the same bytes as imagebuild.compress
    assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    tar = gzip.decompress(blob)
    assert compress(tar, "gzip") == blob
    assert cfg.diff_ids[:2] == st.config(base).diff_ids and cfg.diff_ids[2] == Digest.of(tar)
    assert st.layer_info(m.layers[2].digest) == {"diff_id": str(Digest.of(tar)), "size": len(tar),
                                                 "media_type": OCI_LAYER_GZIP}
    assert index_path(st, m.layers[2].digest).exists()        # indexed: mounts at once
    doc = cfg.doc
    assert doc["author"] == "Jane <j@example.com>"
    assert doc["config"]["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert doc["config"]["Env"] == ["PATH=/usr/bin:/opt/bin", "MODE=prod"]
    h = doc["history"][-1]
    assert h["created_by"] == "/bin/sh -l" and h["comment"] == "patched motd" and h["author"] == doc["author"]
    assert h["created"] == doc["created"] and "empty_layer" not in h and len(doc["history"]) == 3
    # the tar: PAX, depth first, names by bytes, whiteouts before entries, hard links, overrides, xattrs
    ms = _members(blob)
    names = [ti.name for ti in ms]
    assert names[:5] == ["data", "dev0", "etc", "etc/.wh.ghost", "etc/.wh.passwd"]
    assert names.index("var/.wh.log") < names.index("var/log") < names.index("var/log/new.log")
    assert names.index("opt") + 1 == names.index("opt/.wh..wh..opq")
    by = {ti.name: ti for ti in ms}
    assert by["newdir/b"].islnk() and by["newdir/b"].linkname == "newdir/a" and by["newdir/a"].isreg()
    assert (by["etc/new.conf"].uid, by["etc/new.conf"].gid, by["etc/new.conf"].mode) == (1000, 1000, 0o4750)
    assert by["dev0"].ischr() and (by["dev0"].devmajor, by["dev0"].devminor, by["dev0"].mode) == (4, 1, 0o620)
    assert by["pipe"].isfifo() and by["run"].isreg()
    assert by["newdir/c"].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == BIN
    assert not any("override" in k for ti in ms for k in ti.pax_headers)
    assert all(ti.uname == "" and ti.gname == "" and ti.mtime == 1_720_000_000 for ti in ms if ti.name != "etc/.wh.ghost")
    assert all(not ti.name.startswith(".") and "/./" not in ti.name for ti in ms)
    assert len(tar) % 512 == 0 and tar.endswith(b"\0" * 1024)
    # history shows the new row
    code, out, err = run(["history", "--no-trunc", "localhost/test/new:2"], capsys)
    assert code == 0 and out.splitlines()[1].split()[0] == str(m.config.digest) and "patched motd" in out


def test_commit_equals_image_plus_changes_and_umoci(store, upper, tmp_path):
    t = resolve_target(store, str(upper), image=BASE)
    expected = tree_snapshot(overlay_tree(t.lower_tree(store), t.scan()))
    r = commit(store, t, "localhost/test/new:3", CommitOptions(message="m"))
    got = tree_snapshot(open_image_tree(store, r.manifest))
    assert got == expected
    assert expected["usr/bin/tool2"][6] is None and expected["newdir/a"][6] == ("newdir/a", "newdir/b")
    assert expected["opt/sub/w"] and "opt/sub/x" not in expected and "etc/passwd" not in expected
    rootfs = umoci_unpack(store.root, "localhost/test/new:3", tmp_path / "rootfs")
    assert without_dir_mtimes(dir_snapshot(rootfs)) == without_dir_mtimes(got)


def test_commit_is_deterministic(store, upper):
    t = resolve_target(store, str(upper), image=BASE)
    opts = CommitOptions(created="2024-06-01T00:00:00Z")
    a = commit(store, t, "localhost/test/det:a", opts)
    b = commit(store, t, "localhost/test/det:b", opts)
    assert a.layer.descriptor == b.layer.descriptor and a.image_id == b.image_id
    assert a.manifest.digest == b.manifest.digest
    buf = bytearray()
    write_layer_tar(t.scan(), buf.extend)
    assert Digest.of(bytes(buf)) == a.layer.diff_id


def test_commit_without_changes_adds_an_empty_history_row(store, tmp_path, capsys):
    up = tmp_path / "empty"
    up.mkdir()
    code, out, err = run(["commit", "--image", BASE, "-c", "EXPOSE 8080", "-c", "USER nobody", up,
                          "localhost/test/cfg"], capsys)
    assert code == 0, err
    rec, m = store.resolve("localhost/test/cfg:latest")
    base = store.resolve(BASE)[1]
    assert list(m.layers) == list(base.layers)
    doc = store.config(m).doc
    assert doc["history"][-1]["empty_layer"] is True and len(doc["rootfs"]["diff_ids"]) == 2
    assert doc["config"]["ExposedPorts"] == {"8080/tcp": {}} and doc["config"]["User"] == "nobody"
    assert Digest.of(b"\0" * 1024) == EMPTY_TAR_DIGEST


def test_commit_errors_are_one_line(store, upper, capsys):
    for args, code_want, text in [
        (["-c", "RUN rm -rf /"], 2, "RUN is not a valid change command"),
        (["-c", "FOO bar"], 2, "unknown instruction: FOO"),
        (["-c", "EXPOSE 80/xyz"], 2, "invalid proto: xyz"),
        (["-c", "ENV"], 2, "ENV requires at least one argument"),
    ]:
        code, out, err = run(["commit", "--image", BASE, *args, upper, "localhost/test/x:1"], capsys)
        assert (code, out) == (code_want, ""), err
        assert text in err and err.count("\n") == 1 and err.startswith("layerfs: error: ")
    code, out, err = run(["commit", "--image", BASE, upper, "Bad/Name"], capsys)
    assert code == 2 and "invalid reference" in err
    code, out, err = run(["commit", "--image", BASE, upper, f"localhost/x@sha256:{'a' * 64}"], capsys)
    assert code == 2 and "digest" in err
    assert store.find(Reference.parse("localhost/test/x:1")) is None
    assert not list((store.root / "ingest").glob(".commit-*"))


def test_commit_a_pulled_docker_image_with_umoci_check(registry, unique_repo, store, upper, tmp_path):
    img = base_image(docker=True)
    push_image(registry.host, unique_repo, "v1", img)
    ref = Reference.parse(f"{registry.host}/{unique_repo}:v1")
    Puller(store, PullOptions(registry=RegistryOptions())).pull(ref)
    t = resolve_target(store, str(upper), image=str(ref))
    r = commit(store, t, f"{registry.host}/{unique_repo}:patched")
    got = tree_snapshot(open_image_tree(store, r.manifest))
    assert got == tree_snapshot(overlay_tree(t.lower_tree(store), t.scan()))
    rootfs = umoci_unpack(store.root, r.name, tmp_path / "rootfs")
    assert without_dir_mtimes(dir_snapshot(rootfs)) == without_dir_mtimes(got)
    # the docker-pulled base keeps its layer blobs; the new manifest lists them with OCI media types
    assert [l.digest for l in r.manifest.layers[:2]] == [d.digest for d in img.layer_descriptors]


# --- docker commit --change ------------------------------------------------------------------------

@pytest.mark.parametrize("changes, want", [
    (['CMD ["a", "b"]'], {"Cmd": ["a", "b"]}),
    (["CMD echo hi there"], {"Cmd": ["/bin/sh", "-c", "echo hi there"]}),
    (["cmd [not json"], {"Cmd": ["/bin/sh", "-c", "[not json"]}),
    (['ENTRYPOINT ["/e"]'], {"Entrypoint": ["/e"], "Cmd": None}),                 # ENTRYPOINT resets CMD
    (['CMD ["c"]', 'ENTRYPOINT ["/e"]'], {"Entrypoint": ["/e"], "Cmd": ["c"]}),   # unless CMD came first
    (["ENV A=1 B='two words' C=\"$HOME/x\""], {"Env": ["HOME=/root", "A=1", "B=two words", "C=/root/x"]}),
    (["ENV HOME /home/me"], {"Env": ["HOME=/home/me"]}),                          # legacy form
    (["ENV A=${HOME:-no} B=${NOPE:-dflt} C=${HOME:+set} D=\\$HOME"],
     {"Env": ["HOME=/root", "A=/root", "B=dflt", "C=set", "D=$HOME"]}),
    (['LABEL "com.example.v"="1 2" b=c', "LABEL b=d"], {"Labels": {"com.example.v": "1 2", "b": "d", "old": "x"}}),
    (["EXPOSE 80 53/udp 8000-8002/tcp"], {"ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8000/tcp": {},
                                                          "8001/tcp": {}, "8002/tcp": {}}}),
    (["USER app:app"], {"User": "app:app"}),
    (["WORKDIR /srv", "WORKDIR app/../data"], {"WorkingDir": "/srv/data"}),
    (['VOLUME ["/data", "/logs"]', "VOLUME /cache"], {"Volumes": {"/data": {}, "/logs": {}, "/cache": {}}}),
    (["STOPSIGNAL SIGQUIT"], {"StopSignal": "SIGQUIT"}),
    (["ONBUILD RUN make"], {"OnBuild": ["RUN make"]}),
    (["# a comment\nENV X=1 \\\n  Y=2"], {"Env": ["HOME=/root", "X=1", "Y=2"]}),
])
def test_apply_changes(changes, want):
    base = {"Cmd": ["/bin/sh"], "Env": ["HOME=/root"], "Labels": {"old": "x"}}
    got = apply_changes(base, changes)
    for k, v in want.items():
        assert got.get(k) == v, (k, got)
    assert base == {"Cmd": ["/bin/sh"], "Env": ["HOME=/root"], "Labels": {"old": "x"}}   # not modified


@pytest.mark.parametrize("change, text", [
    ("RUN x", "not a valid change command"), ("COPY a b", "not a valid change command"),
    ("NOPE x", "unknown instruction"), ("CMD", "requires at least one argument"),
    ("EXPOSE 99999", "invalid containerPort"), ("EXPOSE abc", "invalid containerPort"),
    ("USER a b", "exactly one argument"), ("ENV A", "must have two arguments"), ("ENV A=1 B", "can't find ="),
    ('VOLUME [""]', "empty string"),
    ("STOPSIGNAL SIGNOPE", "invalid signal"), ("ONBUILD FROM x", "isn't allowed"),
    ("ENV A='x", "matching single-quote"), ("ENV A=${B:?unset}", "B: unset"),
])
def test_apply_changes_errors(change, text):
    with pytest.raises(ChangeSyntaxError, match=text):
        apply_changes({}, [change])


# --- export ---------------------------------------------------------------------------------------

def test_export_equals_umoci_unpack(store, tmp_path, capsys):
    out = tmp_path / "image.tar"
    code, o, err = run(["export", BASE, "-o", out], capsys)
    assert code == 0 and o == "" and err == ""
    data = out.read_bytes()
    rootfs = umoci_unpack(store.root, BASE, tmp_path / "rootfs")
    snap = tar_snapshot(data)
    assert without_dir_mtimes(snap) == without_dir_mtimes(dir_snapshot(rootfs))
    assert snap == tree_snapshot(open_image_tree(store, store.resolve(BASE)[1]))
    assert "var/log/old.log" not in snap and snap["data/bin"][5] == {"user.bin": BIN, "user.text": b"hi"}
    assert snap["usr/bin/tool2"][6] == ("usr/bin/tool", "usr/bin/tool2")
    # deterministic: the same bytes again, also on stdout
    buf = io.BytesIO()
    export_tree(open_image_tree(store, store.resolve(BASE)[1]), buf)
    assert buf.getvalue() == data
    assert not list(tmp_path.glob(".image.tar.*"))


def test_export_of_upper_over_image_equals_export_of_commit(store, upper, tmp_path, capsys):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    code, _, err = run(["export", "--upper", upper, BASE, "-o", a], capsys)
    assert code == 0, err
    code, _, err = run(["commit", "--image", BASE, upper, "localhost/test/c:1"], capsys)
    assert code == 0, err
    code, _, err = run(["export", "localhost/test/c:1", "-o", b], capsys)
    assert code == 0, err
    sa, sb = tar_snapshot(a.read_bytes()), tar_snapshot(b.read_bytes())
    assert sa == sb
    assert sa["dev0"][4] == (4, 1) and sa["etc/new.conf"][:3] == ("-rwsr-x---", 1000, 1000)
    # the same order of names in both
    names = lambda p: [ti.name for ti in tarfile.open(p)]
    assert names(a) == names(b)


def test_export_to_stdout_and_errors(store, tmp_path, capsys, monkeypatch):
    proc = subprocess.run([os.sys.executable, "-m", "layerfs", "export", BASE], capture_output=True, timeout=60,
                          env={**os.environ, "LAYERFS_ROOT": str(store.root)})
    assert proc.returncode == 0 and tar_snapshot(proc.stdout)["etc/motd"]
    code, out, err = run(["export", "localhost/test/none:1", "-o", tmp_path / "x.tar"], capsys)
    assert code == 1 and "no such image" in err and not (tmp_path / "x.tar").exists()
    code, out, err = run(["export", tmp_path, "-o", tmp_path / "x.tar"], capsys)
    assert code == 1 and "neither a local image nor a layerfs mount point" in err


# --- through real mounts -----------------------------------------------------------------------------

def _mount(store: Store, mnt: Path, **options):
    from mounthelpers import require_fuse, track
    from layerfs.mount import MountOptions, mount_image
    require_fuse()
    opts = MountOptions(**options)      # writable mounts exist now: no skip, a failure is a failure
    mnt.mkdir(exist_ok=True)
    rec = mount_image(store, BASE, mnt, opts)
    track(mnt, rec.pid)
    return rec


def test_read_only_mount_has_no_changes(store, tmp_path, capsys):
    from mounthelpers import watchdog
    mnt = tmp_path / "mnt"
    with watchdog(60):
        _mount(store, mnt, read_only=True)
        code, out, err = run(["diff", mnt], capsys)
        assert (code, out) == (0, ""), err
        code, out, err = run(["export", mnt, "-o", tmp_path / "m.tar"], capsys)
        assert code == 0, err
        code, out, err = run(["commit", "-c", "LABEL from=mount", mnt, "localhost/test/ro:1"], capsys)
        assert code == 0, err
    rec, m = store.resolve("localhost/test/ro:1")
    base = store.resolve(BASE)[1]
    assert list(m.layers) == list(base.layers) and store.config(m).doc["history"][-1]["empty_layer"] is True
    assert json.loads(m.raw)["annotations"]["org.opencontainers.image.base.name"] == "localhost/test/base:1"
    assert tar_snapshot((tmp_path / "m.tar").read_bytes()) == tree_snapshot(open_image_tree(store, base))


def test_stored_upper_of_a_layer_mount_keeps_its_layer(store, tmp_path, capsys):
    """The store's upper of a ``--layer 1`` mount records that layer (info.json): after the mount ends, ``diff``
    by its id or path compares it with the same lower layers as the mount did."""
    from mounthelpers import watchdog
    from layerfs.mount import stored_upper_id, umount
    mnt = tmp_path / "mnt"
    with watchdog(60):
        rec = _mount(store, mnt, read_only=False, layer=1)
        (mnt / "home/u").mkdir()          # only the second layer has /home/u: new here
        code, out, err = run(["diff", mnt], capsys)
        assert (code, out) == (0, "C /home\nA /home/u\n"), err
        umount(store, mnt)
    mid = stored_upper_id(store, rec.upper)
    assert mid is not None and json.loads((Path(rec.upper).parent / "info.json").read_bytes())["layer"] == 1
    for target in (mid, rec.upper):
        code, out2, err = run(["diff", target], capsys)
        assert (code, out2) == (0, out), err


def test_writable_mount_diff_commit_export(store, tmp_path, capsys):
    """Changes made through a real writable mount: diff, commit (checked with umoci and the mount itself), export."""
    import shutil
    from mounthelpers import watchdog
    mnt, up = tmp_path / "mnt", tmp_path / "upper"
    with watchdog(60):
        rec = _mount(store, mnt, read_only=False, upper=str(up))
        assert rec.upper and Path(rec.upper) == up
        os.unlink(mnt / "etc/passwd")
        (mnt / "etc/new.conf").write_bytes(b"new\n")
        with open(mnt / "etc/motd", "ab") as f:
            f.write(b"appended\n")
        shutil.rmtree(mnt / "opt")
        (mnt / "opt").mkdir()
        (mnt / "opt/z").write_bytes(b"z")
        (mnt / "newdir").mkdir()
        (mnt / "newdir/a").write_bytes(b"linked")
        os.link(mnt / "newdir/a", mnt / "newdir/b")
        os.setxattr(mnt / "newdir/a", "user.bin", BIN)
        os.chmod(mnt / "usr/bin/su", 0o755)
        os.symlink("etc/keep", mnt / "newlink")
        code, out, err = run(["diff", mnt], capsys)
        assert code == 0, err
        assert out == ("C /etc\nC /etc/motd\nA /etc/new.conf\nD /etc/passwd\nA /newdir\nA /newdir/a\nA /newdir/b\n"
                       "A /newlink\nC /opt\nD /opt/sub\nD /opt/y\nA /opt/z\nC /usr\nC /usr/bin\nC /usr/bin/su\n")
        code, out, err = run(["diff", up], capsys)             # the upper directory names the same mount
        assert code == 0 and out.count("\n") == 15
        code, out, err = run(["commit", "-m", "through the mount", mnt, "localhost/test/rw:1"], capsys)
        assert code == 0, err
        seen = without_dir_mtimes(dir_snapshot(mnt))
        code, out, err = run(["export", mnt, "-o", tmp_path / "mnt.tar"], capsys)
        assert code == 0, err
        # the new image mounts at once and shows what the writable mount showed
        from layerfs.mount import MountOptions, mount_image
        from mounthelpers import track
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        track(mnt2, mount_image(store, "localhost/test/rw:1", mnt2, MountOptions(read_only=True)).pid)
        assert without_dir_mtimes(dir_snapshot(mnt2)) == seen
    rec, m = store.resolve("localhost/test/rw:1")
    committed = tree_snapshot(open_image_tree(store, m))
    assert without_dir_mtimes(committed) == seen
    rootfs = umoci_unpack(store.root, "localhost/test/rw:1", tmp_path / "rootfs")
    assert without_dir_mtimes(dir_snapshot(rootfs)) == seen
    assert without_dir_mtimes(tar_snapshot((tmp_path / "mnt.tar").read_bytes())) == seen


# --- long names and long paths in the upper ------------------------------------------------------------

LONG_IMAGE = "localhost/test/long:1"
LA, LB, LC, LD = ("a".ljust(255, "a"), "b".ljust(255, "b"), "c".ljust(255, "c"), "d".ljust(200, "d"))


def _long_upper(tmp_path: Path) -> Path:
    """An upper with a whiteout of a 255-byte name in every form the overlay reads, and a file deeper
    than PATH_MAX (built through directory fds: no path names it whole)."""
    up = tmp_path / "long-upper"
    (up / "l").mkdir(parents=True)
    (up / "l" / f".wh.{LD}").write_bytes(b"")                      # OCI form (the name leaves room)
    os.setxattr(up / "l", "user.layerfs.whiteouts", LB.encode())  # the record (no CAP_MKNOD)
    if IS_ROOT:
        os.mknod(up / "l" / LA, stat.S_IFCHR, 0)                   # kernel overlayfs' form
    (up / "l" / LC).write_bytes(b"changed")
    fd = os.open(up, os.O_PATH | os.O_DIRECTORY)
    try:
        for i in range(18):                                        # 18 * 256 bytes > PATH_MAX
            name = f"{i:02d}".ljust(255, "p")
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("deep", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(wfd, b"deep data")
        os.close(wfd)
    finally:
        os.close(fd)
    return up


def test_long_name_whiteouts_and_long_paths_diff_commit_and_mount(store, tmp_path, capsys):
    lay = LayerBuilder()
    lay.add_dir("l")
    for name in (LA, LB, LC, LD):
        lay.add_file(f"l/{name}", name[:1].encode())
    lay.add_file("l/kept", b"k")
    put_image(store, LONG_IMAGE, build_image([lay.build()]))
    up = _long_upper(tmp_path)
    gone = [LA, LB, LD] if IS_ROOT else [LB, LD]
    code, out, err = run(["diff", "--image", LONG_IMAGE, up], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert {f"D /l/{n}" for n in gone} <= set(lines) and f"C /l/{LC}" in lines
    deep = "/".join(f"{i:02d}".ljust(255, "p") for i in range(18)) + "/deep"
    assert f"A /{deep}" in lines
    code, out, err = run(["commit", "--image", LONG_IMAGE, up, "localhost/test/long:2"], capsys)
    assert code == 0, err
    _, m = store.resolve("localhost/test/long:2")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(store.read_blob(m.layers[-1].digest)))) as tf:
        members = {ti.name: ti for ti in tf}
        assert tf.extractfile(members[deep]).read() == b"deep data"
    for n in gone:                                 # always the OCI entry; a PAX header carries the long ones
        ti = members[f"l/.wh.{n}"]
        assert ti.isreg() and ti.size == 0
        assert len(n) + 4 <= 100 or ti.pax_headers["path"] == f"l/.wh.{n}"
    assert members[f"l/{LC}"].isreg()
    tree = open_image_tree(store, m)
    lnode = tree.get(tree.get(1).children["l"])
    assert sorted(lnode.children) == sorted({LA, LB, LC, LD, "kept"} - set(gone))
    # the committed image mounts and hides the names
    mnt = tmp_path / "mnt"
    from layerfs.mount import MountOptions, mount_image
    from mounthelpers import require_fuse, track, watchdog
    require_fuse()
    mnt.mkdir()
    with watchdog(60):
        track(mnt, mount_image(store, "localhost/test/long:2", mnt, MountOptions(read_only=True)).pid)
        assert sorted(os.listdir(mnt / "l")) == sorted({LA, LB, LC, LD, "kept"} - set(gone))
        assert (mnt / "l" / LC).read_bytes() == b"changed"
    code, out, err = run(["export", "--upper", up, LONG_IMAGE, "-o", tmp_path / "e.tar"], capsys)
    assert code == 0, err
    with tarfile.open(tmp_path / "e.tar") as tf:
        names = {ti.name for ti in tf}
    assert deep in names and not any(f"l/{n}" in names for n in gone) and f"l/{LC}" in names


def test_index_on_mount_commit_keeps_hard_links(store, tmp_path, capsys):
    """-o index=on: a write through one name of a lower hard-linked file shows through the other; diff
    names both; the committed layer holds them as one file and a hard link, and so shows the new image."""
    from mounthelpers import watchdog
    mnt, up = tmp_path / "mnt", tmp_path / "upper"
    with watchdog(60):
        _mount(store, mnt, read_only=False, upper=str(up), fuse_options=["index=on"])
        with open(mnt / "usr/bin/tool", "ab") as f:
            f.write(b"echo more\n")
        a, b = os.stat(mnt / "usr/bin/tool"), os.stat(mnt / "usr/bin/tool2")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert (mnt / "usr/bin/tool2").read_bytes() == b"#!/bin/sh\necho more\n"
        code, out, err = run(["diff", mnt], capsys)
        assert (code, out) == (0, "C /usr\nC /usr/bin\nC /usr/bin/tool\nC /usr/bin/tool2\n"), err
        code, out, err = run(["commit", mnt, "localhost/test/idx:1"], capsys)
        assert code == 0, err
    _, m = store.resolve("localhost/test/idx:1")
    members = {ti.name: ti for ti in _members(store.read_blob(m.layers[-1].digest))}
    assert members["usr/bin/tool"].isreg() and members["usr/bin/tool"].size == len(b"#!/bin/sh\necho more\n")
    assert members["usr/bin/tool2"].islnk() and members["usr/bin/tool2"].linkname == "usr/bin/tool"
    tree = open_image_tree(store, m)
    bin_ = tree.get(tree.lookup(tree.lookup(1, "usr").ino, "bin").ino)
    assert bin_.children["tool"] == bin_.children["tool2"] and tree.get(bin_.children["tool"]).nlink == 2


def test_malformed_override_values_mount_diff_and_commit_alike(store, tmp_path, capsys):
    """An upper carrying malformed override values (layerfs.fs.upper: ignored as a whole, with a warning)
    mounts, diffs and commits with one meaning: what the mount shows is what the commit holds."""
    from mounthelpers import watchdog
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    (up / "etc/bad-mode").write_bytes(b"m")
    os.chmod(up / "etc/bad-mode", 0o640)
    os.setxattr(up / "etc/bad-mode", OVERRIDE_XATTR, b"0:0:17777")          # mode out of range
    (up / "etc/bad-dev").write_bytes(b"")
    os.setxattr(up / "etc/bad-dev", OVERRIDE_XATTR, b"0:0:0600:c:1")        # a device value cut short
    (up / "etc/good").write_bytes(b"g")
    os.setxattr(up / "etc/good", OVERRIDE_XATTR, b"1000:1000:4750")
    (up / "home/u").mkdir(parents=True)
    os.chmod(up / "home/u", 0o751)
    os.setxattr(up / "home/u", OVERRIDE_XATTR, b"0:0:0600:c:1:3")          # a device type on a directory
    (up / "etc/passwd").write_bytes(b"root:x:0:0:changed\n")
    os.setxattr(up / "etc/passwd", OVERRIDE_XATTR, b"0:x:0644")
    me = os.stat(up)
    mnt = tmp_path / "mnt"
    with watchdog(60):
        _mount(store, mnt, read_only=False, upper=str(up))
        for name in ("etc/bad-mode", "etc/bad-dev", "home/u", "etc/passwd"):
            st, host = os.lstat(mnt / name), os.lstat(up / name)
            assert (st.st_mode, st.st_uid, st.st_gid) == (host.st_mode, me.st_uid, me.st_gid), name
        st = os.lstat(mnt / "etc/good")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1000, 1000)
        seen = without_dir_mtimes(dir_snapshot(mnt))
        code, out, err = run(["diff", mnt], capsys)
        assert code == 0, err
        assert out == ("C /etc\nA /etc/bad-dev\nA /etc/bad-mode\nA /etc/good\nC /etc/passwd\nC /home\n"
                       "C /home/u\n")
        code, out, err = run(["commit", mnt, "localhost/test/malformed:1"], capsys)
        assert code == 0, err
    _, m = store.resolve("localhost/test/malformed:1")
    assert without_dir_mtimes(tree_snapshot(open_image_tree(store, m))) == seen
