"""Published layer indexes (layerfs.transfer.indexpush) and lazy mounts of plain gzip images (layerfs.lazy).

A plain gzip image (files of many sizes, a text file larger than several
spans, links, devices, xattrs, whiteouts across layers) is pushed to a real
registry, pulled into one store and its indexes published from there with a
small span (``layerfs index push --span 64k``); it is then mounted lazily from
fresh stores through a FaultProxy whose request log shows which blob bytes
were fetched. Debian's docker-registry has no referrers API, so the tag
fallback is what these registries exercise; the referrers API path runs
against the same registry behind a proxy that answers the referrers API.
"""
from __future__ import annotations

import errno
import json
import os
import random
import stat
import time
from pathlib import Path

import pytest

from treecompare import tree_snapshot
from mounthelpers import force_unmount, mount_lazy_read_only, require_fuse, track
from treecompare import compare
from treecompare import snapshot as dir_snapshot
from layerfs.cli.main import main
from imagebuild import LayerBuilder, build_image
from layerfs.transfer import (ARTIFACT_TYPE, HEAD_DIGEST_ANNOTATION, HEAD_SIZE_ANNOTATION, INDEX_MEDIA_TYPE,
    LAYER_ANNOTATION, IndexArtifactError, build_index_blob, parse_head, referrers_tag)
from layerfs.index import load_or_build
from layerfs.lazy import lazy_cache_dir, open_lazy_tree
from layerfs.mount import MountOptions, mount_image
from layerfs.mount import mounts as layerfs_mounts
from layerfs.image import Digest
from layerfs.transfer import PullOptions, Puller
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryClient, RegistryOptions
from layerfs.store import Store
from layerfs.fs import open_image_tree

SPAN = 64 << 10
pytestmark = pytest.mark.usefixtures("client_env")
WATCHDOG = 60.0
LOCAL = "localhost/lazy/gzip:1"


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"layer", b"index", b"span", b"zran", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def source_layers() -> list[bytes]:
    a = LayerBuilder()
    a.add_dir("etc").add_file("etc/motd", b"hello\n").add_file("etc/empty", b"")
    a.add_dir("data")
    for i, n in enumerate((1, 511, 4096, 70_000, 200_000)):
        a.add_file(f"data/f{i}", _rand(n, i), mode=0o640, uid=i, gid=2 * i)
    a.add_file("data/text", _text(900_000, 7), mode=0o755)          # many spans of compressible data
    a.add_hardlink("data/text-link", "data/text")
    a.add_symlink("data/to-motd", "../etc/motd")
    a.add_dir("dev").add_device("dev/null", "c", 1, 3).add_fifo("dev/fifo")
    a.add_file("data/x", b"attrs", xattrs={"user.bin": bytes(range(256)), "user.text": b"hi"})
    a.add_dir("old").add_file("old/a", b"a").add_file("old/b", b"b")
    a.add_dir("gone").add_file("gone/file", b"gone")
    for i in range(40):
        a.add_file(f"data/many/m{i:02d}", _rand(30_000, 100 + i))
    b = LayerBuilder(mtime=1_710_000_000)
    b.add_whiteout("gone").add_opaque("old").add_file("old/c", b"new c")
    b.add_file("etc/motd", b"hello again\n").add_hardlink("etc/motd2", "etc/motd")
    b.add_file("data/f1", _rand(300, 1234))
    b.add_file("data/late", _rand(150_000, 55))
    return [a.build(), b.build()]


def _publish(tmp, host: str, repo: str, *, span: int = SPAN) -> tuple[Store, str]:
    """Push the source image to host/repo:v1, pull it into a new store and publish its index from there."""
    src = Store(tmp / "src").init()
    img = build_image(source_layers())
    for d, data in img.blobs.items():
        src.put_blob(data, d)
    src.tag(str(Reference.parse(LOCAL)), img.manifest_descriptor)
    ref = f"{host}/{repo}:v1"
    Pusher(src, PushOptions(registry=RegistryOptions())).push(LOCAL, ref)
    st = tmp / "publisher"
    assert main(["--root", str(st), "pull", "-q", ref]) == 0
    assert main(["--root", str(st), "index", "push", "--span", str(span), ref]) == 0
    return Store(st), ref


@pytest.fixture(scope="module")
def published(tmp_path_factory, registry):
    """(publisher store, repository) of the source image with its index published (tag fallback)."""
    tmp = tmp_path_factory.mktemp("lazy-gzip")
    repo = "test/lazy-gzip"
    st, _ = _publish(tmp, registry.host, repo)
    return st, repo


def _manifest(store: Store, ref: str):
    return store.resolve(ref)[1]


def _layer_bytes(proxy, manifest) -> tuple[int, list]:
    digests = {str(d.digest) for d in manifest.layers}
    reqs = [r for r in proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in digests]
    return sum(r.bytes_sent for r in reqs), reqs


def _all_blob_bytes(proxy) -> int:
    return sum(r.bytes_sent for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path)


def _lookup(tree, path: str):
    ino = 1
    for part in path.split("/"):
        ino = tree.lookup(ino, part).ino
    return tree.get(ino)


# --- publishing ----------------------------------------------------------------------------------

def test_index_push_attaches_an_artifact_through_the_tag_fallback(published, registry, tmp_path, capsys):
    st, repo = published
    ref = f"{registry.host}/{repo}:v1"
    m = _manifest(st, ref)
    client = RegistryClient(registry.host, RegistryOptions())
    assert client.get_referrers(repo, m.digest) is None            # distribution 2.8: no referrers API
    listing = client.get_manifest(repo, referrers_tag(m.digest))
    [entry] = [d for d in listing.manifests if d.artifact_type == ARTIFACT_TYPE]
    art = client.get_manifest(repo, str(entry.digest))
    doc = json.loads(art.raw)
    assert doc["artifactType"] == ARTIFACT_TYPE and doc["config"]["size"] == 2
    assert art.subject.digest == m.digest and art.subject.size == len(m.raw)
    assert [l.annotations[LAYER_ANNOTATION] for l in art.layers] == [str(l.digest) for l in m.layers]
    for idx_desc, layer in zip(art.layers, m.layers):
        assert idx_desc.media_type == INDEX_MEDIA_TYPE
        blob, head = build_index_blob(st, layer, span=SPAN)                  # deterministic
        assert Digest.of(blob) == idx_desc.digest
        assert idx_desc.annotations[HEAD_SIZE_ANNOTATION] == str(len(head))
        assert idx_desc.annotations[HEAD_DIGEST_ANNOTATION] == str(Digest.of(head))
    # another artifact in the fallback index is kept when the index is pushed again (same digest: idempotent)
    other = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": str(m.digest),
             "size": len(m.raw), "artifactType": "application/example.sbom"}
    entries = json.loads(listing.raw)["manifests"] + [other]
    raw = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": entries}).encode()
    client.put_manifest(repo, referrers_tag(m.digest), raw, "application/vnd.oci.image.index.v1+json")
    capsys.readouterr()
    assert main(["--root", str(st.root), "index", "push", "--span", str(SPAN), ref]) == 0
    out = capsys.readouterr().out
    assert str(entry.digest) in out and f"tag {referrers_tag(m.digest)}" in out
    after = client.get_manifest(repo, referrers_tag(m.digest))
    types = [d.artifact_type for d in after.manifests]
    assert types.count(ARTIFACT_TYPE) == 1 and "application/example.sbom" in types
    assert [d.digest for d in after.manifests if d.artifact_type == ARTIFACT_TYPE] == [entry.digest]


def test_index_push_refusals(published, registry, tmp_path, capsys):
    st, repo = published
    # an image the registry does not have
    assert main(["--root", str(st.root), "index", "push", f"{registry.host}/test/never-pushed:v1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    ref = f"{registry.host}/{repo}:v1"
    assert main(["--root", str(st.root), "index", "push", "--span", "12", ref]) == 2
    err = capsys.readouterr().err
    assert "span" in err and "Traceback" not in err
    # the layer blobs must be in the store
    m = _manifest(st, ref)
    other = Store(tmp_path / "other").init()
    for d in (m.config.digest, m.digest):
        other.put_blob(st.read_blob(d), d)
    other.tag(ref, st.resolve(ref)[0].descriptor)
    assert main(["--root", str(other.root), "index", "push", ref]) == 1
    err = capsys.readouterr().err
    assert "not in the store" in err and "layerfs pull" in err


# --- lazy trees ------------------------------------------------------------------------------------

def test_lazy_gzip_tree_matches_full_pull_fetches_little_and_reuses_its_cache(published, fault_proxy, tmp_path,
                                                                             caplog):
    st, repo = published
    ref = f"{fault_proxy.host}/{repo}:v1"
    m = _manifest(st, f"{fault_proxy.target_host}/{repo}:v1")
    fresh = Store(tmp_path / "fresh").init()
    with caplog.at_level("INFO", logger="layerfs.lazy"):
        _, manifest, tree, readers = open_lazy_tree(fresh, ref)
    assert manifest.digest == m.digest
    assert sum("mounted lazily" in r.getMessage() for r in caplog.records) == 2
    assert not any(p.is_file() for p in (fresh.root / "blobs").rglob("*"))       # nothing pulled
    assert _layer_bytes(fault_proxy, m) == (0, [])                              # no layer byte yet
    total = sum(d.size for d in m.layers)
    meta = _all_blob_bytes(fault_proxy)
    assert meta < total / 4                      # config + index heads
    # small files of both layers: one span (and its window) each
    fault_proxy.reset()
    assert tree.read(_lookup(tree, "etc/motd").ino, 0, 100) == b"hello again\n"
    assert tree.read(_lookup(tree, "data/f2").ino, 0, 8192) == _rand(4096, 2)
    assert tree.read(_lookup(tree, "data/late").ino, 0, 200_000) == _rand(150_000, 55)
    got, reqs = _layer_bytes(fault_proxy, m)
    assert reqs and all(r.header("Range") and r.status == 206 for r in reqs)
    assert got < total / 3
    # one byte deep inside the big text file: one more span, a small part of the layer
    fault_proxy.reset()
    text = _text(900_000, 7)
    assert tree.read(_lookup(tree, "data/text").ino, 700_000, 3) == text[700_000:700_003]
    got, reqs = _layer_bytes(fault_proxy, m)
    assert len(reqs) == 1 and got < m.layers[0].size / 8
    # the whole tree equals the full pull's
    full = Store(tmp_path / "full").init()
    Puller(full, PullOptions(registry=RegistryOptions())).pull(Reference.parse(ref))
    assert tree_snapshot(tree) == tree_snapshot(open_image_tree(full, full.resolve(ref)[1]))
    fetched = sum(r.fetched_bytes for r in readers)
    assert fetched <= sum(d.size for d in m.layers) + sum(len(r.spans) for r in readers) * 33_000
    # everything is cached now: a new tree of the same store fetches no blob bytes at all
    fault_proxy.reset()
    _, _, tree2, _ = open_lazy_tree(fresh, ref)
    assert tree_snapshot(tree2) == tree_snapshot(tree)
    assert _all_blob_bytes(fault_proxy) == m.config.size                  # the config only


def test_without_a_published_index_layers_are_pulled_whole(registry, tmp_path, caplog):
    src = Store(tmp_path / "src").init()
    img = build_image(source_layers())
    for d, data in img.blobs.items():
        src.put_blob(data, d)
    src.tag(str(Reference.parse(LOCAL)), img.manifest_descriptor)
    ref = f"{registry.host}/test/lazy-gzip-none:v1"
    Pusher(src, PushOptions(registry=RegistryOptions())).push(LOCAL, ref)
    fresh = Store(tmp_path / "fresh").init()
    with caplog.at_level("WARNING", logger="layerfs.lazy"):
        _, m, tree, _ = open_lazy_tree(fresh, ref)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("has no published index" in t and "pulling it whole" in t for t in msgs) == 2, msgs
    assert all(fresh.has_blob(d.digest, d.size) for d in m.layers)
    assert tree_snapshot(tree) == tree_snapshot(open_image_tree(src, src.resolve(LOCAL)[1]))


def test_referrers_api_is_used_where_the_registry_has_it(registry_factory, tmp_path, caplog):
    reg = registry_factory.plain().start()
    proxy = registry_factory.proxy(reg)
    proxy.emulate_referrers = True
    st, ref = _publish(tmp_path, proxy.host, "test/lazy-referrers")
    m = _manifest(st, ref)
    client = RegistryClient(proxy.host, RegistryOptions())
    listing = client.get_referrers("test/lazy-referrers", m.digest)
    assert [d.artifact_type for d in listing.manifests] == [ARTIFACT_TYPE]
    with pytest.raises(Exception):                  # no fallback tag was written
        client.get_manifest("test/lazy-referrers", referrers_tag(m.digest))
    proxy.reset()
    fresh = Store(tmp_path / "fresh").init()
    with caplog.at_level("INFO", logger="layerfs.lazy"):
        _, _, tree, _ = open_lazy_tree(fresh, ref)
    assert any("found by referrers API" in r.getMessage() for r in caplog.records)
    assert any("/referrers/" in r.path for r in proxy.requests)
    assert not any(referrers_tag(m.digest) in r.path for r in proxy.requests)
    assert tree.read(_lookup(tree, "data/f3").ino, 0, 70_000) == _rand(70_000, 3)


# --- bad published indexes ------------------------------------------------------------------------

def test_bad_heads_are_refused_with_one_line(published, registry):
    st, repo = published
    m = _manifest(st, f"{registry.host}/{repo}:v1")
    layer = m.layers[0]
    diff_id = st.config(m).diff_ids[0]
    blob, head = build_index_blob(st, layer, span=SPAN)
    wsize = len(blob) - len(head)
    pub = parse_head(head, layer, diff_id=diff_id, windows_size=wsize, where="t")
    assert pub.size == st.layer_info(layer.digest)["size"] and len(pub.spans) > 5

    def refused(data, *, desc=layer, diff=diff_id, windows=wsize, match=""):
        with pytest.raises(IndexArtifactError, match=match) as ei:
            parse_head(data, desc, diff_id=diff, windows_size=windows, where="t")
        line = ei.value.one_line()
        assert "\n" not in line and layer.digest.short in line
        return line

    refused(head[:10], match="truncated")
    refused(b"X" + head[1:], match="magic")
    refused(head[:-1] + bytes([head[-1] ^ 1]), match="checksum")
    refused(head, diff=m.layers[1].digest, match="diff_id")
    refused(head, windows=wsize - 1, match="window out of range")
    from layerfs.image import Descriptor
    refused(head, desc=Descriptor(layer.media_type, layer.digest, layer.size + 1), match="not this one")
    # well-formed files (valid checksum) with bad contents
    from layerfs.transfer import indexpush
    from layerfs.index import encode_columns, pack_file, unpack_file
    import zstandard
    meta, (records, table) = unpack_file(head, indexpush.FORMAT_VERSION, 2, magic=indexpush._MAGIC)

    def rebuilt(meta=meta, records=bytes(records), table=bytes(table)):
        return pack_file(indexpush.FORMAT_VERSION, meta, [records, table], magic=indexpush._MAGIC)

    rows = [list(indexpush._ROW.unpack_from(table, k)) for k in range(0, len(table), indexpush._ROW.size)]
    swapped = rows[:1] + [rows[2], rows[1]] + rows[3:]
    refused(rebuilt(table=b"".join(indexpush._ROW.pack(*r) for r in swapped)), match="out of order")
    far = [r[:] for r in rows]
    far[-1][1] = layer.size + 5
    refused(rebuilt(table=b"".join(indexpush._ROW.pack(*r) for r in far)), match="out of range")
    refused(rebuilt(table=bytes(table)[:-1]), match="malformed")
    refused(rebuilt(meta={**meta, "size": -1}), match="out of range")
    refused(rebuilt(meta={**meta, "count": "many"}), match="out of range")
    refused(rebuilt(meta={k: v for k, v in meta.items() if k != "diff_id"}), match="malformed")
    refused(rebuilt(records=b"not zstd"), match="corrupt")
    cols = [list(c) for c in load_or_build(st, layer).columns()]
    for change, match in ((lambda c: c[0].__setitem__(1, "../escape"), "not allowed"),
                          (lambda c: c[0].__setitem__(2, c[0][1]), "twice"),
                          (lambda c: c[10].__setitem__(c[1].index("file"), 1 << 40), "beyond the end"),
                          (lambda c: c[2].__setitem__(0, 0o170777), "bad mode")):
        bad = [list(x) for x in cols]
        change(bad)
        rec = zstandard.ZstdCompressor().compress(encode_columns(tuple(bad)))
        refused(rebuilt(records=rec), match=match)


def test_unusable_published_index_falls_back_to_a_full_pull(registry, tmp_path, caplog):
    repo = "test/lazy-gzip-bad"
    st, ref = _publish(tmp_path, registry.host, repo)
    m = _manifest(st, ref)
    client = RegistryClient(registry.host, RegistryOptions())
    tag = referrers_tag(m.digest)
    listing = client.get_manifest(repo, tag)
    [entry] = [d for d in listing.manifests if d.artifact_type == ARTIFACT_TYPE]
    doc = json.loads(client.get_manifest(repo, str(entry.digest)).raw)
    # layer 0's index blob replaced by layer 1's: well formed, digests right, but for another layer
    doc["layers"][0] = {**doc["layers"][1], "annotations": {**doc["layers"][1]["annotations"],
                                                            LAYER_ANNOTATION: str(m.layers[0].digest)}}
    raw = json.dumps(doc).encode()
    d = client.put_manifest(repo, str(Digest.of(raw)), raw, "application/vnd.oci.image.manifest.v1+json")
    idoc = json.loads(listing.raw)
    idoc["manifests"] = [{**e, "digest": str(d), "size": len(raw)} for e in idoc["manifests"]]
    client.put_manifest(repo, tag, json.dumps(idoc).encode(), "application/vnd.oci.image.index.v1+json")
    # a damaged cached head (of layer 1) is not used: fetched again
    fresh = Store(tmp_path / "fresh").init()
    hd = Digest.parse(doc["layers"][1]["annotations"][HEAD_DIGEST_ANNOTATION])
    cached = lazy_cache_dir(fresh, m.layers[1].digest) / f"index-{hd.algorithm}-{hd.hex}"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"junk")
    with caplog.at_level("WARNING", logger="layerfs.lazy"):
        _, _, tree, readers = open_lazy_tree(fresh, ref)
    msgs = [r.getMessage() for r in caplog.records]
    [warn] = [t for t in msgs if "unusable" in t]
    assert m.layers[0].digest.short in warn and "not this one" in warn and "pulling it whole" in warn
    assert "\n" not in warn
    assert [type(r).__name__ for r in readers] == ["GzipReader", "LazyGzipLayer"]
    assert fresh.has_blob(m.layers[0].digest, m.layers[0].size) and not fresh.has_blob(m.layers[1].digest)
    assert cached.read_bytes() != b"junk"
    assert tree_snapshot(tree) == tree_snapshot(open_image_tree(st, m))


# --- lazy FUSE mounts ------------------------------------------------------------------------------


def test_lazy_gzip_mount_equals_the_full_mount_and_reuses_its_cache(published, fault_proxy, tmp_path, mounts):
    st, repo = published
    ref = f"{fault_proxy.host}/{repo}:v1"
    m = _manifest(st, f"{fault_proxy.target_host}/{repo}:v1")
    fresh = Store(tmp_path / "fresh").init()
    lazy = mount_lazy_read_only(fresh, ref, tmp_path / "lazy", mounts)
    assert _layer_bytes(fault_proxy, m) == (0, [])
    assert (lazy / "etc/motd").read_bytes() == b"hello again\n"                 # layer 2
    assert (lazy / "data/f3").read_bytes() == _rand(70_000, 3)                  # layer 1
    assert (lazy / "data/many/m17").read_bytes() == _rand(30_000, 117)
    assert (lazy / "data/late").read_bytes() == _rand(150_000, 55)
    got, reqs = _layer_bytes(fault_proxy, m)
    total = sum(d.size for d in m.layers)
    assert reqs and all(r.header("Range") for r in reqs) and got < total / 2
    full = Store(tmp_path / "full").init()
    Puller(full, PullOptions(registry=RegistryOptions())).pull(Reference.parse(ref))
    (tmp_path / "full-mnt").mkdir()
    rec = mount_image(full, ref, tmp_path / "full-mnt", MountOptions(read_only=True))
    track(tmp_path / "full-mnt", rec.pid)
    mounts.append((tmp_path / "full-mnt", rec.pid))
    assert compare(dir_snapshot(lazy), dir_snapshot(tmp_path / "full-mnt")) == []
    # a second lazy mount of the same store (through the CLI): nothing fetched for what was read
    force_unmount(lazy, mounts[0][1])
    fault_proxy.reset()
    lazy2 = tmp_path / "lazy2"
    assert main(["--root", str(fresh.root), "mount", "--lazy", "--read-only", ref, str(lazy2)]) == 0
    rec = next(r for r in layerfs_mounts(fresh) if r.mountpoint == str(lazy2.resolve()))
    track(lazy2, rec.pid)
    mounts.append((lazy2, rec.pid))
    assert (lazy2 / "data/text").read_bytes() == _text(900_000, 7)
    assert (lazy2 / "data/late").read_bytes() == _rand(150_000, 55)
    assert _layer_bytes(fault_proxy, m) == (0, [])


def test_corrupt_span_and_registry_down_give_eio_only_for_that_read(registry_factory, tmp_path, mounts):
    reg = registry_factory.plain().start()
    proxy = registry_factory.proxy(reg)
    repo = "test/lazy-gzip-faults"
    st, _ = _publish(tmp_path, reg.host, repo)
    m = _manifest(st, f"{reg.host}/{repo}:v1")
    ref = f"{proxy.host}/{repo}:v1"
    desc = m.layers[0]
    _, head = build_index_blob(st, desc, span=SPAN)
    pub = parse_head(head, desc, diff_id=None, windows_size=1 << 30, where="t")
    # flip a byte in the span holding data/f3 (in the registry's storage)
    off = next(e.offset for e in load_or_build(st, desc).entries if e.path == "data/f3")
    k = max(i for i, s in enumerate(pub.spans) if s.ustart <= off + 1000)
    sp = pub.spans[k]
    data_file = next(reg.storage_dir.rglob(f"blobs/sha256/{desc.digest.hex[:2]}/{desc.digest.hex}/data"))
    good = data_file.read_bytes()
    bad = bytearray(good)
    bad[(sp.cstart + sp.cend) // 2] ^= 0xFF
    data_file.write_bytes(bytes(bad))
    fresh = Store(tmp_path / "fresh").init()
    mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", mounts)
    with pytest.raises(OSError) as ei:
        (mnt / "data/f3").read_bytes()
    assert ei.value.errno == errno.EIO
    kept = [p.name for p in lazy_cache_dir(fresh, desc.digest).glob("spans-*/*")]
    assert str(k) not in kept                                      # nothing kept from the bad fetch
    log_text = Path(layerfs_mounts(fresh)[0].log).read_text()
    assert f"span {k}" in log_text and "published sha256" in log_text, log_text
    assert (mnt / "etc/motd").read_bytes() == b"hello again\n"     # the mount goes on
    data_file.write_bytes(good)
    assert (mnt / "data/f3").read_bytes() == _rand(70_000, 3)      # fetched again, good
    assert str(k) in [p.name for p in lazy_cache_dir(fresh, desc.digest).glob("spans-*/*")]
    # the registry goes away: reads of spans not fetched yet fail, cached ones and metadata still work
    reg.stop()
    with pytest.raises(OSError) as ei:
        (mnt / "data/late").read_bytes()
    assert ei.value.errno == errno.EIO
    assert "fetching bytes" in Path(layerfs_mounts(fresh)[0].log).read_text()
    assert (mnt / "data/f3").read_bytes() == _rand(70_000, 3)
    assert "many" in os.listdir(mnt / "data")
    reg.start()                                                    # back (new port, same proxy)
    proxy.target_host = reg.host
    assert (mnt / "data/late").read_bytes() == _rand(150_000, 55)


def test_prefetch_all_fetches_the_rest_in_the_background_and_mounts_shows_it(published, fault_proxy, tmp_path,
                                                                            mounts, capsys):
    st, repo = published
    ref = f"{fault_proxy.host}/{repo}:v1"
    fresh = Store(tmp_path / "fresh").init()
    mnt = tmp_path / "mnt"
    require_fuse()
    assert main(["--root", str(fresh.root), "mount", "--prefetch", "all", ref, str(mnt)]) == 2   # needs --lazy
    assert "--prefetch needs --lazy" in capsys.readouterr().err
    assert main(["--root", str(fresh.root), "mount", "--lazy", "--read-only", "--prefetch", "all", ref,
                 str(mnt)]) == 0
    rec = next(r for r in layerfs_mounts(fresh) if r.mountpoint == str(mnt.resolve()))
    track(mnt, rec.pid)
    mounts.append((mnt, rec.pid))
    capsys.readouterr()
    deadline = time.monotonic() + 30
    fetched = None
    while time.monotonic() < deadline:
        assert main(["--root", str(fresh.root), "mounts", "--format", "json"]) == 0
        fetched = json.loads(capsys.readouterr().out.splitlines()[0])["fetched"]
        if fetched == [1.0, 1.0]:
            break
        time.sleep(0.2)
    assert fetched == [1.0, 1.0]
    assert main(["--root", str(fresh.root), "mounts"]) == 0
    out = capsys.readouterr().out
    assert "FETCHED" in out and "100% 100%" in out
    # everything is local now: the registry may go away
    fault_proxy.fail(".*", 503, times=None)
    got = dir_snapshot(mnt)                                       # reads every file
    want = tree_snapshot(open_image_tree(st, _manifest(st, f"{fault_proxy.target_host}/{repo}:v1")))
    assert set(got) - {""} == set(want)
    assert {p: e.sha256 for p, e in got.items() if e.kind == "file"} == \
        {p: v[10] for p, v in want.items() if stat.S_ISREG(v[1])}
    assert (mnt / "data/text").read_bytes() == _text(900_000, 7)
    assert (mnt / "data/many/m39").read_bytes() == _rand(30_000, 139)
    assert not any(r.status == 503 for r in fault_proxy.requests if "/blobs/" in r.path)
    # prune keeps the caches of a running lazy mount, and drops them once it is gone
    caches = sorted(p.name for p in (fresh.root / "lazy").iterdir() if p.name.startswith("sha256-"))
    assert len(caches) == 2
    assert main(["--root", str(fresh.root), "prune"]) == 0
    assert "Deleted lazy caches" not in capsys.readouterr().out
    assert sorted(p.name for p in (fresh.root / "lazy").iterdir() if p.name.startswith("sha256-")) == caches
    assert (mnt / "data/late").read_bytes() == _rand(150_000, 55)
    force_unmount(mnt, rec.pid)
    assert main(["--root", str(fresh.root), "prune"]) == 0
    out = capsys.readouterr().out
    assert "Deleted lazy caches: 2" in out
    assert not [p for p in (fresh.root / "lazy").iterdir() if p.name.startswith("sha256-")]
