"""eStargz conversion (layerfs.transfer.estargz) and lazy remote mounts (layerfs.lazy) against a real registry.

The source image has files of many sizes (one larger than several chunks),
symlinks, hard links, devices, a fifo, xattrs and whiteouts/opaque
directories across layers. It is converted with a small chunk size, pushed,
and mounted lazily into fresh stores through a FaultProxy whose request log
shows which blob bytes were fetched. Every mount is torn down in teardown.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from treecompare import tree_snapshot as snapshot
from mounthelpers import force_unmount, mount_lazy_read_only, require_fuse, track
from prereqs import require_binary
from layerfs.cli.main import main
from layerfs.transfer import (FOOTER_SIZE, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
    EStargzError, footer_bytes, parse_footer, parse_toc_member)
from imagebuild import LayerBuilder, build_image
from layerfs.lazy import lazy_cache_dir, open_lazy_tree
from layerfs.mount import MountOptions, mount_image
from layerfs.mount import mounts as layerfs_mounts
from layerfs.image import Digest
from layerfs.transfer import PullOptions, Puller
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryOptions
from layerfs.store import Store
from layerfs.fs import open_image_tree

CHUNK = 64 << 10
BIG = 5 * CHUNK + 1234          # six chunks, the last one short
SRC = "localhost/lazy/src:1"
DST = "localhost/lazy/src:estargz"
pytestmark = pytest.mark.usefixtures("client_env")
WATCHDOG = 40.0


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def source_layers() -> list[bytes]:
    a = LayerBuilder()
    a.add_dir("etc").add_file("etc/motd", b"hello\n").add_file("etc/empty", b"")
    a.add_dir("data")
    for i, n in enumerate((1, 511, 512, 513, 4096, 70_000, CHUNK, CHUNK + 1)):
        a.add_file(f"data/f{i}", _rand(n, i), mode=0o640, uid=i, gid=2 * i)
    a.add_file("data/big", _rand(BIG, 99), mode=0o755)
    a.add_hardlink("data/big-link", "data/big")
    a.add_symlink("data/to-motd", "../etc/motd")
    a.add_dir("dev").add_device("dev/null", "c", 1, 3).add_fifo("dev/fifo")
    a.add_file("data/x", b"attrs", xattrs={"user.bin": bytes(range(256)), "user.text": b"hi"})
    a.add_dir("old").add_file("old/a", b"a").add_file("old/b", b"b")
    a.add_dir("gone").add_file("gone/file", b"gone")
    b = LayerBuilder(mtime=1_710_000_000)
    b.add_whiteout("gone").add_opaque("old").add_file("old/c", b"new c")
    b.add_file("etc/motd", b"hello again\n").add_hardlink("etc/motd2", "etc/motd")
    b.add_file("data/f1", _rand(300, 1234))
    return [a.build(), b.build()]


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):
    """(store with source and converted image, pushed repository name, converted manifest)."""
    root = tmp_path_factory.mktemp("lazy-src") / "store"
    st = Store(root).init()
    img = build_image(source_layers())
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(str(Reference.parse(SRC)), img.manifest_descriptor)
    code = main(["--root", str(root), "convert", "--estargz", "--chunk-size", str(CHUNK), SRC, DST])
    assert code == 0
    _, m = st.resolve(DST)
    repo = "test/lazy-estargz"
    Pusher(st, PushOptions(registry=RegistryOptions())).push(DST, f"{registry.host}/{repo}:v1")
    return st, repo, m


def _blob_bytes(proxy, manifest) -> tuple[int, list]:
    digests = {str(d.digest) for d in manifest.layers}
    reqs = [r for r in proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in digests]
    return sum(r.bytes_sent for r in reqs), reqs


# --- conversion ------------------------------------------------------------------------------

def test_footer_roundtrip_and_refusals():
    f = footer_bytes(0x1234_5678_9A)
    assert len(f) == FOOTER_SIZE and parse_footer(f) == 0x1234_5678_9A
    assert gzip.decompress(f) == b""                          # an empty gzip member to any tool
    assert b"%016xSTARGZ" % 0x123456789A in f
    for bad in (f[:-1], b"\0" * FOOTER_SIZE, f.replace(b"STARGZ", b"STARGY")):
        with pytest.raises(EStargzError):
            parse_footer(bad)


def test_converted_image_is_plain_gzip_with_the_same_tree(image, tmp_path):
    st, _, m = image
    _, src = st.resolve(SRC)
    a, b = snapshot(open_image_tree(st, src)), snapshot(open_image_tree(st, m))
    assert TOC_TAR_NAME in b
    b.pop(TOC_TAR_NAME)
    strip = lambda s: {k: v[1:] for k, v in s.items()}                       # noqa: E731  (inode numbers shift)
    assert strip(a) == strip(b)
    cfg = st.config(m)
    for desc, diff_id in zip(m.layers, cfg.diff_ids):
        blob = st.read_blob(desc.digest)
        raw = gzip.decompress(blob)
        assert Digest.of(raw) == diff_id
        assert desc.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(raw))
        names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
        assert names[-1] == TOC_TAR_NAME
        off = parse_footer(blob[-FOOTER_SIZE:])
        js, toc = parse_toc_member(blob[off:-FOOTER_SIZE])
        assert desc.annotations[TOC_DIGEST_ANNOTATION] == str(Digest.of(js))
        for e in toc["entries"]:
            if e.get("chunkDigest"):            # every chunk starts a gzip member of its own
                data = gzip.GzipFile(fileobj=io.BytesIO(blob[e["offset"]:])).read(e.get("chunkSize") or 1)
                assert data
    big = [e for e in json.loads(parse_toc_member(st.read_blob(m.layers[0].digest)[
        parse_footer(st.read_blob(m.layers[0].digest)[-FOOTER_SIZE:]):-FOOTER_SIZE])[0])["entries"]
        if e["name"] == "data/big"]
    assert len(big) == 6 and [e["type"] for e in big] == ["reg"] + ["chunk"] * 5
    assert big[0]["digest"] == "sha256:" + hashlib.sha256(_rand(BIG, 99)).hexdigest()
    assert [e.get("chunkOffset", 0) for e in big] == [i * CHUNK for i in range(6)]
    # other tools read it: umoci unpacks it (and checks the diff_ids)
    umoci = require_binary("umoci")
    proc = subprocess.run([umoci, "raw", "unpack", "--image", f"{st.root}:{DST}", str(tmp_path / "rootfs")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rootfs/data/big").read_bytes() == _rand(BIG, 99)
    assert (tmp_path / "rootfs/old/c").read_bytes() == b"new c" and not (tmp_path / "rootfs/old/a").exists()
    skopeo = require_binary("skopeo")                   # and skopeo copies it (digests and sizes checked)
    proc = subprocess.run([skopeo, "copy", f"oci:{st.root}:{DST}", f"dir:{tmp_path / 'copy'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- lazy trees ----------------------------------------------------------------------------------

def test_lazy_tree_matches_full_pull_and_fetches_little(image, fault_proxy, tmp_path):
    st, repo, m = image
    ref = f"{fault_proxy.host}/{repo}:v1"
    fresh = Store(tmp_path / "fresh").init()
    _, manifest, tree, readers = open_lazy_tree(fresh, ref)
    assert manifest.digest == m.digest
    assert not list((fresh.root / "blobs").rglob("*")) or all(
        p.is_dir() for p in (fresh.root / "blobs").rglob("*"))               # nothing pulled
    total = sum(d.size for d in m.layers)
    toc_bytes, reqs = _blob_bytes(fault_proxy, m)
    assert reqs and all(r.header("Range") for r in reqs) and toc_bytes < total / 4
    # two small files: a few hundred bytes of the blobs
    fault_proxy.reset()
    node = tree.lookup(tree.lookup(1, "etc").ino, "motd")
    assert tree.read(node.ino, 0, 100) == b"hello again\n"
    node = tree.lookup(tree.lookup(1, "data").ino, "f4")
    assert tree.read(node.ino, 0, 8192) == _rand(4096, 4)
    got, reqs = _blob_bytes(fault_proxy, m)
    assert len(reqs) == 2 and all(r.header("Range") and r.status == 206 for r in reqs)
    assert got < 8192 and got < total / 20
    # one byte in the middle of the big file: one chunk
    fault_proxy.reset()
    big = tree.lookup(tree.lookup(1, "data").ino, "big")
    assert tree.read(big.ino, 3 * CHUNK + 5, 1) == _rand(BIG, 99)[3 * CHUNK + 5:3 * CHUNK + 6]
    got, reqs = _blob_bytes(fault_proxy, m)
    assert len(reqs) == 1 and CHUNK // 2 < got < 2 * CHUNK
    # the whole tree equals the full pull's (the TOC file included, as the tar holds it)
    full = Store(tmp_path / "full").init()
    Puller(full, PullOptions(registry=RegistryOptions())).pull(Reference.parse(ref))
    assert snapshot(tree) == snapshot(open_image_tree(full, full.resolve(ref)[1]))
    # everything is cached now: a new tree of the same store fetches no blob bytes, not even the TOC
    fault_proxy.reset()
    _, _, tree2, _ = open_lazy_tree(fresh, ref)
    snap2 = snapshot(tree2)
    assert _blob_bytes(fault_proxy, m) == (0, [])
    assert snap2 == snapshot(tree)


def test_non_estargz_layers_are_pulled_whole(image, registry, tmp_path, caplog):
    st, _, _ = image
    repo = "test/lazy-plain"
    Pusher(st, PushOptions(registry=RegistryOptions())).push(SRC, f"{registry.host}/{repo}:v1")
    fresh = Store(tmp_path / "fresh").init()
    with caplog.at_level("WARNING", logger="layerfs.lazy"):
        _, m, tree, _ = open_lazy_tree(fresh, f"{registry.host}/{repo}:v1")
    assert sum("is not eStargz and its image has no published index" in r.getMessage()
               and "pulling it whole" in r.getMessage() for r in caplog.records) == 2
    assert all(fresh.has_blob(d.digest, d.size) for d in m.layers)
    assert snapshot(tree) == snapshot(open_image_tree(st, st.resolve(SRC)[1]))


# --- lazy FUSE mounts ----------------------------------------------------------------------------

def _walk(root: Path, read: bool) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            s = os.lstat(p)
            what = None
            if stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(s.st_mode) and read:
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            xattrs = {} if stat.S_ISLNK(s.st_mode) else {k: os.getxattr(p, k) for k in os.listxattr(p)}
            out[str(p.relative_to(root))] = (s.st_ino, s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns,
                                             s.st_nlink, s.st_rdev, what, xattrs)
    return out


def test_lazy_mount_matches_full_mount_and_reuses_its_cache(image, fault_proxy, tmp_path, mounts):
    st, repo, m = image
    ref = f"{fault_proxy.host}/{repo}:v1"
    fresh = Store(tmp_path / "fresh").init()
    lazy = mount_lazy_read_only(fresh, ref, tmp_path / "lazy", mounts)
    meta = _walk(lazy, read=False)                     # metadata only: no file bytes fetched
    toc_bytes, _ = _blob_bytes(fault_proxy, m)
    fault_proxy.reset()
    assert (lazy / "etc/motd").read_bytes() == b"hello again\n"
    assert (lazy / "data/f5").read_bytes() == _rand(70_000, 5)
    got, reqs = _blob_bytes(fault_proxy, m)
    total = sum(d.size for d in m.layers)
    assert reqs and all(r.header("Range") for r in reqs) and got + toc_bytes < total / 5
    # the full pull, mounted the ordinary way: entry by entry the same (contents too)
    full = Store(tmp_path / "full").init()
    Puller(full, PullOptions(registry=RegistryOptions())).pull(Reference.parse(ref))
    (tmp_path / "full-mnt").mkdir()
    rec = mount_image(full, ref, tmp_path / "full-mnt", MountOptions(read_only=True))
    track(tmp_path / "full-mnt", rec.pid)
    mounts.append((tmp_path / "full-mnt", rec.pid))
    want = _walk(tmp_path / "full-mnt", read=True)
    assert {k: v[:8] + v[9:] for k, v in meta.items()} == {k: v[:8] + v[9:] for k, v in want.items()}
    assert _walk(lazy, read=True) == want
    # a second lazy mount of the same store: nothing new is fetched for what was read
    force_unmount(lazy, mounts[0][1])
    fault_proxy.reset()
    lazy2 = tmp_path / "lazy2"                          # through the CLI this time
    require_fuse()
    assert main(["--root", str(fresh.root), "mount", "--lazy", "--read-only", ref, str(lazy2)]) == 0
    rec = next(r for r in layerfs_mounts(fresh) if r.mountpoint == str(lazy2.resolve()))
    track(lazy2, rec.pid)
    mounts.append((lazy2, rec.pid))
    assert (lazy2 / "etc/motd").read_bytes() == b"hello again\n"
    assert (lazy2 / "data/big").read_bytes() == _rand(BIG, 99)
    assert _blob_bytes(fault_proxy, m) == (0, [])


def _layer_toc(store: Store, desc) -> list[dict]:
    blob = store.read_blob(desc.digest)
    return parse_toc_member(blob[parse_footer(blob[-FOOTER_SIZE:]):-FOOTER_SIZE])[1]["entries"]


def test_corrupt_chunk_and_registry_down_give_eio_only_for_that_read(image, registry_factory, tmp_path, mounts):
    st, _, m = image
    reg = registry_factory.plain().start()
    proxy = registry_factory.proxy(reg)
    repo = "test/lazy-faults"
    Pusher(st, PushOptions(registry=RegistryOptions())).push(DST, f"{reg.host}/{repo}:v1")
    ref = f"{proxy.host}/{repo}:v1"
    # flip a byte inside the deflate data of data/f6's (only) chunk, in the registry's storage
    desc = m.layers[0]
    ent = next(e for e in _layer_toc(st, desc) if e["name"] == "data/f6")
    data_file = next(reg.storage_dir.rglob(f"blobs/sha256/{desc.digest.hex[:2]}/{desc.digest.hex}/data"))
    good = data_file.read_bytes()
    bad = bytearray(good)
    bad[ent["offset"] + 200] ^= 0xFF
    data_file.write_bytes(bytes(bad))
    fresh = Store(tmp_path / "fresh").init()
    mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", mounts)
    with pytest.raises(OSError) as ei:
        (mnt / "data/f6").read_bytes()
    assert ei.value.errno == errno.EIO
    cache = lazy_cache_dir(fresh, desc.digest)
    have = json.loads((cache / "chunks.json").read_bytes())["chunks"] if (cache / "chunks.json").exists() else []
    assert have == []                                      # nothing cached from the bad fetch
    log_text = Path(layerfs_mounts(fresh)[0].log).read_text()
    assert "data/f6" in log_text and ("chunkDigest" in log_text or "not gzip" in log_text), log_text
    assert (mnt / "etc/motd").read_bytes() == b"hello again\n"     # the mount goes on
    data_file.write_bytes(good)
    assert (mnt / "data/f6").read_bytes() == _rand(CHUNK, 6)       # not cached as bad: fetched again, good
    # the registry goes away: reads of bytes not fetched yet fail, cached ones and metadata still work
    reg.stop()
    with pytest.raises(OSError) as ei:
        (mnt / "data/f7").read_bytes()
    assert ei.value.errno == errno.EIO
    assert "data/f7: fetching bytes" in Path(layerfs_mounts(fresh)[0].log).read_text()
    assert (mnt / "data/f6").read_bytes() == _rand(CHUNK, 6)
    assert sorted(os.listdir(mnt / "data"))[:2] == ["big", "big-link"]
    reg.start()                                            # back (on a new port, behind the same proxy)
    proxy.target_host = reg.host
    assert (mnt / "data/f7").read_bytes() == _rand(CHUNK + 1, 7)


class _BytesClient:
    """A stand-in RegistryClient serving ranges of one blob from memory."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, repository, desc, start, end, *, retries=None) -> bytes:
        self.ranges.append((start, end))
        return self.blob[start:end]


def test_inner_offsets_of_packed_members_and_bad_tocs(tmp_path):
    from layerfs.lazy.remote import LazyReadError
    from layerfs.lazy.stargz import LazyLayer, toc_records
    from layerfs.image import OCI_LAYER_GZIP, Descriptor
    inflated = b"\0" * 512 + b"abc" + b"\0" * 509 + b"\0" * 512 + b"wxyz"
    blob = gzip.compress(inflated, mtime=0)
    toc_off = len(blob)
    sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()               # noqa: E731
    toc = {"version": 1, "entries": [
        {"name": "d/", "type": "dir", "mode": 0o755, "modtime": "2024-01-02T03:04:05.5Z"},
        {"name": "d/a", "type": "reg", "size": 3, "offset": 0, "innerOffset": 512, "digest": sha(b"abc"),
         "chunkDigest": sha(b"abc")},
        {"name": "d/b", "type": "reg", "size": 4, "offset": 0, "innerOffset": 1536, "digest": sha(b"wxyz"),
         "chunkDigest": sha(b"wxyz")},
        {"name": "./d/../d/l", "type": "hardlink", "linkName": "d/a"}]}
    js = json.dumps(toc).encode()
    entries, files = toc_records(toc, js, toc_off, "test")
    by = {e.path: e for e in entries}
    assert set(by) == {"d", "d/a", "d/b", "d/l", TOC_TAR_NAME}
    assert by["d"].mtime_ns == 1704164645_500_000_000 and by["d/l"].linkname == "d/a"
    store = Store(tmp_path / "s").init()
    desc = Descriptor(OCI_LAYER_GZIP, Digest.of(blob + js), toc_off + 100)
    client = _BytesClient(blob)
    layer = LazyLayer(store, lambda: client, "repo", desc, files, sha(js))
    assert layer.read(by["d/b"].offset, 10) == b"wxyz" and layer.read(by["d/a"].offset + 1, 2) == b"bc"
    assert layer.read(by[TOC_TAR_NAME].offset, 5) == js[:5]
    assert len(client.ranges) == 2 and layer.read_cached(by["d/a"].offset, 3) == b"abc"
    # readers of one chunk share its fetch
    from concurrent.futures import ThreadPoolExecutor
    client2 = _BytesClient(blob)
    fresh = LazyLayer(Store(tmp_path / "u").init(), lambda: client2, "repo", desc, files, sha(js))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: fresh.read(by["d/b"].offset, 4), range(16)))
    assert got == [b"wxyz"] * 16 and client2.ranges == [(0, toc_off)]
    # a chunk whose bytes do not match its digest: an error, nothing cached
    toc["entries"][2]["chunkDigest"] = sha(b"nope")
    _, files2 = toc_records(toc, js, toc_off, "test")
    bad = LazyLayer(Store(tmp_path / "t").init(), lambda: client, "repo", desc, files2, sha(js))
    with pytest.raises(LazyReadError, match="chunkDigest"):
        bad.read(by["d/b"].offset, 4)
    assert bad.read_cached(by["d/b"].offset, 4) is None
    # prefetch: everything, or (landmark) the files the TOC lists before .prefetch.landmark
    lm = {"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 3, "offset": 0, "innerOffset": 512, "chunkDigest": sha(b"abc")},
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 0, "innerOffset": 0,
         "chunkDigest": sha(b"\0")},
        {"name": "b", "type": "reg", "size": 4, "offset": 0, "innerOffset": 1536, "chunkDigest": sha(b"wxyz")}]}
    _, lfiles = toc_records(lm, json.dumps(lm).encode(), toc_off, "test")
    client3 = _BytesClient(blob)
    pl = LazyLayer(Store(tmp_path / "p").init(), lambda: client3, "repo", desc, lfiles, sha(js))
    assert [f.name for f, _ in pl.prefetch_pieces("landmark")] == ["a"]
    assert [f.name for f, _ in pl.prefetch_pieces("all")] == ["a", ".prefetch.landmark", "b"]
    assert pl.fetched_fraction() == 0.0
    for piece in pl.prefetch_pieces("landmark"):
        pl.prefetch(piece)
    assert pl.fetched_fraction() == 1 / 3 and pl.read_cached(lfiles[0].base, 3) == b"abc"
    assert [f.name for f, _ in pl.prefetch_pieces("all")] == [".prefetch.landmark", "b"]
    for broken in ({"entries": [{"name": "x", "type": "chunk"}]},
                   {"entries": [{"name": "x", "type": "reg", "size": 5, "offset": 0}]},
                   {"entries": [{"name": "../x", "type": "dir"}]}):
        with pytest.raises(Exception):
            toc_records(broken, b"{}", 10, "test")


def test_status_files_show_what_is_cached_and_go_with_their_process(tmp_path):
    """A status file names what a process serves: lazy_status reads from it how much of each layer is cached
    (as the reader counts it), served_blobs the blobs it reads, prune_lazy keeps its caches; the file of a
    process that is gone counts for nothing and is swept."""
    from collections import namedtuple
    from layerfs.image import OCI_LAYER_GZIP, Descriptor
    from layerfs.lazy import (drop_lazy_status, forget_stale_status, lazy_status, note_lazy_readers, prune_lazy,
        served_blobs)
    from layerfs.lazy.cachedir import status_path
    from layerfs.lazy.stargz import LazyLayer, toc_records
    sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()               # noqa: E731
    first = gzip.compress(b"abc", mtime=0)
    blob = first + gzip.compress(b"wxyz", mtime=0)
    toc = {"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 3, "offset": 0, "chunkDigest": sha(b"abc")},
        {"name": "b", "type": "reg", "size": 4, "offset": len(first), "chunkDigest": sha(b"wxyz")}]}
    js = json.dumps(toc).encode()
    _, files = toc_records(toc, js, len(blob), "test")
    store = Store(tmp_path / "s").init()
    desc = Descriptor(OCI_LAYER_GZIP, Digest.of(blob + js), len(blob) + 100)
    layer = LazyLayer(store, lambda: _BytesClient(blob), "repo", desc, files, sha(js))
    Rec = namedtuple("Rec", "mountpoint pid")
    me, kept = Rec(str(tmp_path / "m"), os.getpid()), Digest.of(b"a blob no image tags")
    note_lazy_readers(store, me.mountpoint, me.pid, [layer, object()], [kept])     # object(): a layer pulled whole
    assert lazy_status(store, me) == [0.0, 1.0]
    assert layer.read(files[1].base, 4) == b"wxyz"
    assert lazy_status(store, me) == [0.5, 1.0] == [layer.fetched_fraction(), 1.0]
    assert lazy_status(store, Rec(str(tmp_path / "other"), os.getpid())) is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    note_lazy_readers(store, str(tmp_path / "g"), gone.pid, [layer], [Digest.of(b"another blob")])
    assert served_blobs(store) == {kept} and not status_path(store, gone.pid).exists()
    note_lazy_readers(store, str(tmp_path / "g"), gone.pid, [layer])
    forget_stale_status(store)
    assert not status_path(store, gone.pid).exists() and status_path(store, me.pid).exists()
    cache = lazy_cache_dir(store, desc.digest)
    assert prune_lazy(store) == (0, 0) and cache.is_dir()          # a running process serves it
    drop_lazy_status(store, me.pid)
    assert lazy_status(store, me) is None and served_blobs(store) == set()
    removed, freed = prune_lazy(store)
    assert removed == 1 and freed > 0 and not cache.exists()

def test_toc_is_checked_against_its_annotation_and_cached(image, tmp_path):
    from layerfs.errors import DigestMismatch
    from layerfs.lazy.stargz import fetch_toc
    from layerfs.image import Descriptor
    st, _, m = image
    desc = m.layers[1]
    blob = st.read_blob(desc.digest)
    client = _BytesClient(blob)
    lying = Descriptor(desc.media_type, desc.digest, desc.size,
                       {**desc.annotations, TOC_DIGEST_ANNOTATION: "sha256:" + "0" * 64})
    fresh = Store(tmp_path / "s").init()
    with pytest.raises(DigestMismatch, match="TOC digest"):
        fetch_toc(fresh, client, "repo", lying)
    assert not (lazy_cache_dir(fresh, desc.digest) / "toc.json").exists()
    assert len(client.ranges) == 2 and client.ranges[0] == (desc.size - FOOTER_SIZE, desc.size)
    js, toc, off = fetch_toc(fresh, client, "repo", desc)
    assert str(Digest.of(js)) == desc.annotations[TOC_DIGEST_ANNOTATION] and off == parse_footer(blob[-FOOTER_SIZE:])
    client.ranges.clear()
    assert fetch_toc(fresh, client, "repo", desc)[0] == js and client.ranges == []     # from the cache
    (lazy_cache_dir(fresh, desc.digest) / "toc.json").write_bytes(b"%d\n" % off + js.replace(b"reg", b"REG", 1))
    assert fetch_toc(fresh, client, "repo", desc)[0] == js and len(client.ranges) == 2  # a bad cache is refetched
