"""Symlinks show and are written with mode 0777, whatever mode their tar header or TOC entry says.

Linux has no symlink permissions (there is no lchmod): extraction
(``umoci raw unpack``), kernel overlayfs and container engines all give a
symlink 0777. Images often carry another mode, e.g. 0644 on a symlink whose
long target is written through a PAX header. The images here hold symlinks
with tar modes 0644 and 0600, with short targets and PAX-long ones, and
every view of them is checked: the layer index and merged tree (also from a
store indexed before symlinks were normalised), read-only, writable and
lazy eStargz FUSE mounts (lstat), ``export`` and ``commit`` output, and
``umoci raw unpack`` of the same image as the reference.
"""
from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from mounthelpers import mount_lazy_read_only, put_image, require_fuse, started_mounts, track
from prereqs import require_binary
from layerfs.cli.main import main
from imagebuild import LayerBuilder, build_image, write_oci_layout
from layerfs.index import SYMLINK, LayerIndex, index_path, load_or_build
from layerfs.mount import MountOptions, mount_image, umount
from layerfs.store import Store

WATCHDOG = 60.0
LONG_A = "long/" * 30 + "a"          # > 100 bytes: a PAX linkpath record
LONG_B = "b" * 240
#: path -> (target, mode in the tar header)
LAYER1 = {"d/short-644": ("file", 0o644), "d/short-600": ("../d/file", 0o600),
          "d/long-644": (LONG_A, 0o644), "d/long-600": (LONG_B, 0o600), "top-644": ("d", 0o644)}
LAYER2 = {"e/up-644": ("../d/file", 0o644), "e/up-long-600": ("/" + LONG_A, 0o600)}
SYMLINKS = {**LAYER1, **LAYER2}
REF = "docker.io/library/symlinks:1"


def _layers() -> list[bytes]:
    a = LayerBuilder().add_dir("d").add_file("d/file", b"data\n")
    for path, (target, mode) in LAYER1.items():
        a.add_symlink(path, target, mode=mode)
    b = LayerBuilder().add_dir("e")
    for path, (target, mode) in LAYER2.items():
        b.add_symlink(path, target, mode=mode)
    return [a.build(), b.build()]


def _symlink_members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return {m.name: m for m in tf.getmembers() if m.issym()}


def test_the_layers_carry_the_odd_modes():
    """The input is what the images in the wild hold: 0644/0600 in the header, long targets in PAX records."""
    members = {}
    for layer in _layers():
        members.update(_symlink_members(layer))
    assert {p: (m.linkname, m.mode) for p, m in members.items()} == SYMLINKS
    assert all(("linkpath" in m.pax_headers) == (len(m.linkname) > 100) for m in members.values())
    assert sum("linkpath" in m.pax_headers for m in members.values()) == 3


def _tree_symlinks(tree) -> dict[str, tuple[str, int]]:
    return {p: (n.target, n.mode) for p, n in tree.walk() if stat.S_ISLNK(n.mode)}


WANT = {p: (t, stat.S_IFLNK | 0o777) for p, (t, _) in SYMLINKS.items()}


def test_index_and_tree_give_0777_also_for_a_store_indexed_before(tmp_path, monkeypatch):
    from layerfs.fs import imagetree, treecache, union
    store = Store(tmp_path / "store")
    put_image(store, REF, build_image(_layers()))
    _, m = store.resolve(REF)
    for d in m.layers:
        assert {e.mode for e in load_or_build(store, d).entries if e.type == SYMLINK} == {0o777}
    assert _tree_symlinks(imagetree.open_image_tree(store, m)) == WANT
    # a store written before symlinks were normalised: layer indexes and tree cache hold the tar header's mode
    old = []
    for d in m.layers:
        modes = {p: mode for p, (_, mode) in SYMLINKS.items()}
        idx = load_or_build(store, d)
        entries = [e._replace(mode=modes[e.path]) if e.type == SYMLINK else e for e in idx.entries]
        old.append(LayerIndex(entries, diff_id=idx.diff_id, size=idx.size, compression=idx.compression,
                              checkpoints=idx.checkpoints, digest=idx.digest, compressed_size=idx.compressed_size))
        old[-1].save(index_path(store, d.digest))
    readers = [_NoReads()] * len(old)
    stale_tree = union.build_tree(old, readers)
    assert {mode for _, mode in _tree_symlinks(stale_tree).values()} == {stat.S_IFLNK | 0o644, stat.S_IFLNK | 0o600}
    path = treecache.tree_cache_path(store, m, len(m.layers))
    with monkeypatch.context() as mp:
        mp.setattr(treecache, "TREE_FORMAT_VERSION", 2)
        treecache.save_tree(stale_tree, path, {"manifest": str(m.digest), "layers": [str(d.digest) for d in m.layers]})
    # the saved records read back normalised (no rebuild: the files are used as they are) ...
    for d in m.layers:
        raw = index_path(store, d.digest).read_bytes()
        idx = LayerIndex.load(index_path(store, d.digest))
        assert {e.mode for e in idx.entries if e.type == SYMLINK} == {0o777}
        assert load_or_build(store, d) is not None and index_path(store, d.digest).read_bytes() == raw
    # ... and the outdated tree cache is rebuilt from them
    assert _tree_symlinks(imagetree.open_image_tree(store, m)) == WANT
    assert _tree_symlinks(treecache.load_tree(path, readers)) == WANT


class _NoReads:
    def read(self, offset: int, size: int) -> bytes:   # pragma: no cover - metadata only
        raise AssertionError("no file data is read here")


def _lstat_symlinks(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = (os.readlink(p), st.st_mode)
    return out


def _umoci_symlinks(image, tmp_path: Path) -> dict[str, tuple[str, int]]:
    umoci = require_binary("umoci")
    layout = write_oci_layout(tmp_path / "layout", image, ref_name="latest")
    dest = tmp_path / "umoci"
    cmd = [umoci, "raw", "unpack", "--image", f"{layout}:latest", str(dest)]
    if os.geteuid() != 0:
        cmd.insert(3, "--rootless")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return _lstat_symlinks(dest)


@pytest.mark.timeout(90)
def test_read_only_mount_matches_umoci_raw_unpack(tmp_path):
    require_fuse()
    image = build_image(_layers())
    store = Store(tmp_path / "store")
    put_image(store, REF, image)
    ref = _umoci_symlinks(image, tmp_path)
    assert ref == WANT                          # the reference: 0777 whatever the headers say
    m = tmp_path / "m"
    m.mkdir()
    with started_mounts(WATCHDOG) as started:
        rec = mount_image(store, "symlinks:1", m, MountOptions(read_only=True))
        track(m, rec.pid)
        started.append((m, rec.pid))
        assert _lstat_symlinks(m) == ref
        assert (m / "d/short-644").read_bytes() == b"data\n"
        umount(store, m)


def _tar_symlinks(tar: bytes) -> dict[str, tuple[str, int]]:
    return {p: (m.linkname, m.mode) for p, m in _symlink_members(tar).items()}


@pytest.mark.timeout(120)
def test_writable_mount_export_and_commit(tmp_path, capsys):
    require_fuse()
    store = Store(tmp_path / "store")
    put_image(store, REF, build_image(_layers()))
    root = ["--root", str(store.root)]
    m = tmp_path / "m"
    m.mkdir()
    with started_mounts(WATCHDOG) as started:
        rec = mount_image(store, "symlinks:1", m, MountOptions(read_only=False))
        track(m, rec.pid)
        started.append((m, rec.pid))
        assert _lstat_symlinks(m) == WANT
        # the parent is copied up (a new file in it): its lower symlinks still show 0777
        (m / "d/new").write_bytes(b"n")
        assert (Path(rec.upper) / "d").is_dir()
        assert _lstat_symlinks(m) == WANT
        # the links themselves copied up: renamed, and moved to another directory
        os.rename(m / "d/short-644", m / "d/renamed")
        os.rename(m / "d/long-600", m / "e/moved-long")
        want = dict(WANT)
        want["d/renamed"] = want.pop("d/short-644")
        want["e/moved-long"] = want.pop("d/long-600")
        assert _lstat_symlinks(m) == want
        assert os.path.islink(Path(rec.upper) / "d/renamed")
        # export of the mount and of the image: every symlink member 0777
        capsys.readouterr()
        assert main(root + ["export", "-o", str(tmp_path / "mnt.tar"), str(m)]) == 0
        assert _tar_symlinks((tmp_path / "mnt.tar").read_bytes()) == {p: (t, 0o777) for p, (t, _) in want.items()}
        assert main(root + ["export", "-o", str(tmp_path / "img.tar"), "symlinks:1"]) == 0
        assert _tar_symlinks((tmp_path / "img.tar").read_bytes()) == {p: (t, 0o777) for p, (t, _) in WANT.items()}
        # commit: the new layer holds the moved links with 0777; the new image shows 0777 throughout
        assert main(root + ["commit", str(m), "symlinks:committed"]) == 0
        umount(store, m)
    _, cm = store.resolve("symlinks:committed")
    layer = gzip.decompress(store.read_blob(cm.layers[-1].digest))
    assert _tar_symlinks(layer) == {"d/renamed": ("file", 0o777), "e/moved-long": (LONG_B, 0o777)}
    from layerfs.fs import open_image_tree
    assert _tree_symlinks(open_image_tree(store, cm)) == want


def _estargz_image(store: Store, name: str) -> None:
    """An eStargz image whose TOC (and tar headers) give the symlinks the modes of SYMLINKS."""
    from layerfs.transfer import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, EStargzWriter
    from layerfs.index import DIR, FILE
    from layerfs.image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, json_bytes
    out = bytearray()
    w = EStargzWriter(out.extend)
    t = 1_700_000_000 * 10**9
    w.add(name="d/", type_=DIR, mode=0o755, uid=0, gid=0, mtime_ns=t)
    w.add(name="e/", type_=DIR, mode=0o755, uid=0, gid=0, mtime_ns=t)
    w.add(name="d/file", type_=FILE, mode=0o644, uid=0, gid=0, mtime_ns=t, size=5,
          read=lambda off, n: b"data\n"[off:off + n])
    for path, (target, mode) in SYMLINKS.items():
        w.add(name=path, type_=SYMLINK, mode=mode, uid=0, gid=0, mtime_ns=t, linkname=target)
    toc_digest, diff_id, usize = w.finish()
    assert {e["name"]: e["mode"] for e in w.entries if e["type"] == "symlink"} == \
        {p: mode for p, (_, mode) in SYMLINKS.items()}
    blob = bytes(out)
    store.init()
    layer = Descriptor(OCI_LAYER_GZIP, store.put_blob(blob), len(blob),
                       {TOC_DIGEST_ANNOTATION: str(toc_digest), UNCOMPRESSED_SIZE_ANNOTATION: str(usize)})
    config = json_bytes({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [str(diff_id)]}})
    cd = store.put_blob(config)
    manifest = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": Descriptor(OCI_CONFIG, cd, len(config)).to_json(), "layers": [layer.to_json()]})
    md = store.put_blob(manifest)
    store.tag(name, Descriptor(OCI_MANIFEST, md, len(manifest)))


@pytest.mark.timeout(90)
def test_lazy_estargz_mount(tmp_path, registry, monkeypatch):
    from layerfs.transfer import PushOptions, Pusher
    from layerfs.registry import RegistryOptions
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    src = Store(tmp_path / "src")
    _estargz_image(src, "localhost/symlinks/estargz:1")
    ref = f"{registry.host}/symlinks/estargz:1"
    Pusher(src, PushOptions(registry=RegistryOptions())).push("localhost/symlinks/estargz:1", ref)
    fresh = Store(tmp_path / "fresh").init()
    with started_mounts(WATCHDOG) as started:
        mnt = mount_lazy_read_only(fresh, ref, tmp_path / "lazy", started)
        assert _lstat_symlinks(mnt) == WANT
        assert (mnt / "e/up-644").read_bytes() == b"data\n"
        blobs = fresh.root / "blobs"
        assert not blobs.exists() or all(p.is_dir() for p in blobs.rglob("*"))     # served lazily, not pulled
