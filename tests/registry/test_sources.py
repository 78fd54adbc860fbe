"""Local sources (layerfs.transfer.sources): oci:, oci-archive:, docker-archive:, `layerfs load`, pull and mount of them.

Images are produced by independent tools where one exists (skopeo copies an
imagebuild image, or a registry-pushed one, into every transport; gzip and
xz compress the docker archives; umoci builds a layout) and compared with the
original: config digest, diff_ids, the layer index built during the import,
and every file of the merged tree (layerfs.fs.open_image_tree). Hostile
archives are made by hand: each must fail with one clear error and leave the
store as it was (nothing tagged, no blob, no partial file).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from imagebuild import LayerBuilder, build_image, build_index, write_oci_layout
from prereqs import require_binary
from producers import UMOCI_EXPECTED
from registryclient import push_image

from layerfs.cli.main import main
from layerfs.errors import LayerfsError, UsageError
from layerfs.fs import open_image_tree
from layerfs.image import OCI_LAYER, OCI_LAYER_GZIP, OCI_MANIFEST, Digest, Platform, Reference, is_local_source
from layerfs.index import LayerIndex, LayerIndexer, index_path
from layerfs.store import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, Store
from layerfs.transfer import (
    LoadOptions,
    Puller,
    Source,
    archive,
    load,
)

REPO = Path(__file__).resolve().parents[2]


# --- the image and its copies ------------------------------------------------------------

def _layers() -> list[bytes]:
    big = random.Random(7).randbytes(1_500_000)     # bigger than what an archive scan keeps in memory
    l1 = (LayerBuilder().add_dir("etc").add_file("etc/hello", b"hello\n").add_symlink("etc/link", "hello")
          .add_hardlink("etc/hard", "etc/hello").add_file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
          .add_file("opt/big.bin", big).add_file("data/old", b"old\n")
          .add_file("etc/attr", b"x", xattrs={"user.comment": b"\x00\xffbinary"}).build())
    l2 = (LayerBuilder().add_whiteout("etc/link").add_file("etc/new", b"new in 2\n").add_opaque("data")
          .add_file("data/fresh", b"fresh\n").build())
    l3 = LayerBuilder().add_file("etc/hello", b"hello from 3\n", mode=0o600, uid=7, gid=8).build()
    return [l1, l2, l3]


EXPECTED_FILES = {"etc/hello": b"hello from 3\n", "etc/hard": b"hello\n", "etc/new": b"new in 2\n",
                  "bin/tool": b"#!/bin/sh\necho tool\n", "data/fresh": b"fresh\n"}


@pytest.fixture(scope="module")
def image():
    return build_image(_layers(), compression=["gzip", None, "gzip"], config={"Env": ["A=1"], "Cmd": ["/bin/sh"]})


def _skopeo(*args: str) -> None:
    skopeo = require_binary("skopeo")
    p = subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", *args], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr


def _xz(src: Path, dest: Path, *extra: str) -> Path:
    xz = require_binary("xz")
    with open(dest, "wb") as out:
        subprocess.run([xz, "-c", "-3", *extra, str(src)], stdout=out, check=True, timeout=120)
    return dest


@pytest.fixture(scope="module")
def produced(image, tmp_path_factory):
    """Every transport, written by skopeo from an OCI layout of *image*; archives compressed by gzip and xz."""
    d = tmp_path_factory.mktemp("produced")
    write_oci_layout(d / "orig", image, ref_name="v1")
    src = f"oci:{d / 'orig'}:v1"
    _skopeo(src, f"oci:{d / 'layout'}:demo-ref")
    _skopeo(src, f"oci:{d / 'full'}:example.com/team/demo:2.0")
    _skopeo(src, f"oci-archive:{d / 'demo.tar'}:v1")
    _skopeo("--additional-tag", "other/name:7", src, f"docker-archive:{d / 'saved.tar'}:example.com/team/demo:3.0")
    _skopeo(src, f"docker-archive:{d / 'untagged.tar'}")
    with open(d / "saved.tar", "rb") as f, gzip.open(d / "saved.tar.gz", "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g)
    with open(d / "demo.tar", "rb") as f, gzip.open(d / "demo.tgz", "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g)
    _xz(d / "saved.tar", d / "multi.tar.xz", "-T2", "--block-size=64KiB")
    _xz(d / "saved.tar", d / "single.tar.xz")
    import xz as pyxz
    with pyxz.open(d / "multi.tar.xz") as f:
        assert len(f.block_boundaries) > 10        # really multi-block
    with pyxz.open(d / "single.tar.xz") as f:
        assert len(f.block_boundaries) == 1
    import zstandard
    (d / "saved.tar.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress((d / "saved.tar").read_bytes()))
    return d


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


# --- comparing an import with the original -------------------------------------------------

def snapshot(tree) -> dict:
    out = {}
    for path, n in tree.walk():
        data = hashlib.sha256(tree.read(n.ino, 0, n.size)).hexdigest() if stat.S_ISREG(n.mode) else None
        out[path] = (oct(n.mode), n.uid, n.gid, n.size if stat.S_ISREG(n.mode) else None, n.target, data,
                     n.nlink if not stat.S_ISDIR(n.mode) else None, dict(n.xattrs or {}), n.mtime_ns)
    return out


@pytest.fixture(scope="module")
def reference(image, tmp_path_factory):
    """The original image's merged tree and per-layer index entries (stored directly, no import)."""
    st = Store(tmp_path_factory.mktemp("ref") / "store").init()
    for digest, data in image.blobs.items():
        st.put_blob(data, digest)
    m = st.manifest(image.manifest_digest)
    entries = []
    for tar in image.uncompressed_layers:
        ix = LayerIndexer(None, where="reference")
        ix.feed(tar)
        entries.append(ix.finish().entries)
    return snapshot(open_image_tree(st, m)), entries


def check_imported(store: Store, name: str, image, reference) -> None:
    tree_ref, entries_ref = reference
    rec, m = store.resolve(name)
    assert m.media_type == OCI_MANIFEST
    assert m.config.digest == image.config_descriptor.digest          # the config is the original's, byte for byte
    for i, l in enumerate(m.layers):
        info = store.layer_info(l.digest)
        assert info["diff_id"] == str(image.diff_ids[i]) and info["size"] == len(image.uncompressed_layers[i])
        idx = LayerIndex.load(index_path(store, l.digest))                # built while importing, not on demand
        assert idx.diff_id == image.diff_ids[i] and idx.digest == l.digest
        assert idx.entries == entries_ref[i]
        assert Digest.of(store.blob_path(l.digest).read_bytes()) == l.digest
    tree = open_image_tree(store, m)
    assert snapshot(tree) == tree_ref
    for path, data in EXPECTED_FILES.items():
        node = _lookup(tree, path)
        assert tree.read(node.ino, 0, node.size) == data, path
    assert _lookup(tree, "etc/link") is None and _lookup(tree, "data/old") is None
    assert _lookup(tree, "etc/attr").xattrs == {"user.comment": b"\x00\xffbinary"}
    assert store.config(m).doc["config"]["Env"] == ["A=1"]


def _lookup(tree, path):
    node = tree.get(1)
    for part in path.split("/"):
        node = tree.lookup(node.ino, part)
        if node is None:
            return None
    return node


def assert_untouched(store: Store) -> None:
    """Nothing tagged, no blob, no layer facts or index, no partial file."""
    root = store.root
    if not root.exists():
        return
    assert store.images() == []
    for sub in ("blobs/sha256", "ingest", "layers", "indexes", "trees"):
        left = [p.name for p in (root / sub).glob("*")] if (root / sub).exists() else []
        assert left == [], f"{sub}: {left}"


# --- transport strings ------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("oci:/srv/lay", Source("oci", "/srv/lay")),
    ("oci:lay:v1", Source("oci", "lay", "v1")),
    ("oci:lay:", Source("oci", "lay")),
    ("oci:/a/b:docker.io/library/x:1.0", Source("oci", "/a/b", "docker.io/library/x:1.0")),
    ("oci:lay:@3", Source("oci", "lay", None, 3)),
    ("oci-archive:/t/x.tar:@0", Source("oci-archive", "/t/x.tar", None, 0)),
    ("oci-archive:x.tar:a+b--c@d", Source("oci-archive", "x.tar", "a+b--c@d")),
    ("docker-archive:x.tar", Source("docker-archive", "x.tar")),
    ("docker-archive:x.tar:foo:bar", Source("docker-archive", "x.tar", "docker.io/library/foo:bar")),
    ("docker-archive:x.tar:ghcr.io/o/r", Source("docker-archive", "x.tar", "ghcr.io/o/r:latest")),
    ("docker-archive:x.tar:@1", Source("docker-archive", "x.tar", None, 1)),
])
def test_parse_transport(text, want):
    assert is_local_source(text)
    assert Source.parse(text) == want
    assert Source.parse(str(want)) == want


@pytest.mark.parametrize("text", ["oci:", "oci::v1", "oci:lay:@x", "oci:lay:@-1", "oci:lay:bad name",
                                  "oci:lay:-lead", "oci:lay:a//b", "oci-archive:x.tar:@", "docker-archive:x.tar:UP",
                                  "docker-archive:x.tar:foo@sha256:" + "a" * 64, "docker-archive:x.tar:@1x"])
def test_parse_transport_errors(text):
    with pytest.raises(UsageError) as e:
        Source.parse(text)
    assert text.split(":")[0] in str(e.value) or "invalid" in str(e.value)


@pytest.mark.parametrize("text", ["alpine", "alpine:3.20", "ocix:y", "docker.io/library/oci", "localhost:5000/oci",
                                  "/path/to/x.tar", "docker://alpine"])
def test_not_a_transport(text):
    assert not is_local_source(text)


# --- every transport, compared with the original ---------------------------------------------

@pytest.mark.parametrize("src, names", [
    ("oci:{d}/layout:demo-ref", ["localhost/layout:demo-ref"]),
    ("oci:{d}/layout", ["localhost/layout:demo-ref"]),
    ("oci:{d}/full:example.com/team/demo:2.0", ["example.com/team/demo:2.0"]),
    ("{d}/full", ["example.com/team/demo:2.0"]),
    ("oci-archive:{d}/demo.tar", ["localhost/demo:v1"]),
    ("oci-archive:{d}/demo.tar:v1", ["localhost/demo:v1"]),
    ("{d}/demo.tgz", ["localhost/demo:v1"]),
    ("docker-archive:{d}/saved.tar", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("docker-archive:{d}/saved.tar:other/name:7", ["docker.io/other/name:7", "example.com/team/demo:3.0"]),
    ("docker-archive:{d}/saved.tar:@0", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("{d}/saved.tar.gz", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("docker-archive:{d}/multi.tar.xz", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("{d}/single.tar.xz", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("{d}/saved.tar.zst", ["example.com/team/demo:3.0", "docker.io/other/name:7"]),
    ("docker-archive:{d}/untagged.tar", ["localhost/untagged:latest"]),
])
def test_load_every_transport(produced, image, reference, store, src, names):
    result = load(store, src.format(d=produced))
    [img] = result.images
    assert img.names == names
    assert sorted(r.name for r in store.images()) == sorted(names)
    for name in names:
        check_imported(store, name, image, reference)
    assert img.loaded_layers == 3
    if result.source.transport == "docker-archive":     # skopeo writes uncompressed layers: stored as OCI tar layers
        assert [l.media_type for l in img.manifest.layers] == [OCI_LAYER] * 3
        assert [l.digest for l in img.manifest.layers] == list(image.diff_ids)
    assert not list((store.root / "ingest").iterdir())


def test_load_again_and_shared_layers(produced, image, reference, store):
    first = load(store, f"docker-archive:{produced}/saved.tar").images[0]
    seen = []
    again = load(store, f"{produced}/multi.tar.xz", progress=lambda *a: seen.append(a[:2])).images[0]
    assert again.manifest.digest == first.manifest.digest and again.loaded_layers == 0
    assert [s for _, s in seen] == ["Already exists"] * 3
    # skopeo's OCI copies keep compressed layers (and compress the plain one): other blobs, same content
    oci = load(store, f"oci-archive:{produced}/demo.tar").images[0]
    assert oci.loaded_layers == 3 and oci.config.digest == first.config.digest
    assert load(store, f"oci:{produced}/layout").images[0].loaded_layers == 0
    check_imported(store, "localhost/demo:v1", image, reference)
    check_imported(store, "localhost/layout:demo-ref", image, reference)


def test_sequential_archive_rereads_what_it_did_not_keep(produced, image, reference, store, monkeypatch):
    """.tar.gz cannot seek: with nothing kept from the first pass, every read is another pass."""
    monkeypatch.setattr(archive, "_KEEP_LIMIT", 0)
    load(store, f"{produced}/saved.tar.gz")
    check_imported(store, "example.com/team/demo:3.0", image, reference)
    load(store, f"oci-archive:{produced}/demo.tgz")
    check_imported(store, "localhost/demo:v1", image, reference)


def test_archive_scan_keeps_only_small_members(produced):
    a = archive.Archive(produced / "multi.tar.xz")
    try:
        big = [m for m in a.members.values() if m.kind == "file" and m.size > archive._KEEP_LIMIT]
        assert big and all(m.name not in a._kept for m in big)
        assert "manifest.json" in a._kept
    finally:
        a.close()


def test_umoci_layout(umoci_layout, store):
    [img] = load(store, f"oci:{umoci_layout}:latest").images
    assert img.names == ["localhost/oci:latest"]
    tree = open_image_tree(store, img.manifest)
    for path, data in UMOCI_EXPECTED["files"].items():
        node = _lookup(tree, path)
        assert tree.read(node.ino, 0, node.size) == data, path
    for path, target in UMOCI_EXPECTED["symlinks"].items():
        assert _lookup(tree, path).target == target
    for path in UMOCI_EXPECTED["absent"]:
        assert _lookup(tree, path) is None
    a, b = UMOCI_EXPECTED["hardlinks"][0]
    assert _lookup(tree, a).ino == _lookup(tree, b).ino
    assert set(UMOCI_EXPECTED["env"]) <= set(img.config.doc["config"]["Env"])
    assert len(img.manifest.layers) == UMOCI_EXPECTED["layers"]
    for l in img.manifest.layers:
        assert index_path(store, l.digest).exists() and store.layer_info(l.digest)


def test_registry_image_via_skopeo_docker_archive_equals_pull(registry, unique_repo, image, tmp_path, monkeypatch):
    """The same registry image, pulled by layerfs and saved by skopeo then loaded: the same image."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    push_image(registry.host, unique_repo, "v1", image)
    ref = f"{registry.host}/{unique_repo}:v1"
    pulled = Store(tmp_path / "pulled")
    Puller(pulled).pull(Reference.parse(ref))
    _skopeo("--src-tls-verify=false", "--src-no-creds", f"docker://{ref}", f"docker-archive:{tmp_path}/r.tar:{ref}")
    loaded = Store(tmp_path / "loaded")
    [img] = load(loaded, f"{tmp_path}/r.tar").images
    assert img.names == [ref]
    _, pm = pulled.resolve(ref)
    _, lm = loaded.resolve(ref)
    assert lm.config.digest == pm.config.digest
    assert [loaded.layer_info(l.digest)["diff_id"] for l in lm.layers] == \
           [pulled.layer_info(l.digest)["diff_id"] for l in pm.layers]
    assert snapshot(open_image_tree(loaded, lm)) == snapshot(open_image_tree(pulled, pm))


# --- layouts: names, several images, platforms, docker media types --------------------------------

def _small(tag: str, arch: str = "amd64", docker: bool = False):
    return build_image([LayerBuilder().add_file("id", tag.encode()).build()], platform=Platform("linux", arch),
                       docker=docker, created=None)


def test_layout_with_several_images(tmp_path, store):
    lay = tmp_path / "multi"
    write_oci_layout(lay, _small("a"), ref_name="a")
    write_oci_layout(lay, _small("b"), ref_name="docker.io/library/bee:2")
    with pytest.raises(LayerfsError) as e:
        load(store, f"oci:{lay}", LoadOptions(single=True))
    assert "holds 2 images" in str(e.value) and f"oci:{lay}:@N" in str(e.value) and "refs: a, docker.io" in str(e.value)
    with pytest.raises(LayerfsError) as e:
        load(store, f"oci:{lay}:c")
    assert "no image named 'c'" in str(e.value) and "names in the layout: a, docker.io/library/bee:2" in str(e.value)
    with pytest.raises(LayerfsError) as e:
        load(store, f"oci:{lay}:@2")
    assert "out of range" in str(e.value)
    assert_untouched(store)
    assert load(store, f"oci:{lay}:@1").names == ["docker.io/library/bee:2"]
    result = load(store, f"oci:{lay}")                                  # load: every image
    assert sorted(result.names) == ["docker.io/library/bee:2", "localhost/multi:a"]


def test_layout_image_index_picks_the_platform(tmp_path, store):
    amd, arm = _small("amd", "amd64"), _small("arm", "arm64")
    idx = build_index([(amd, Platform("linux", "amd64")), (arm, Platform("linux", "arm64", "v8"))])
    write_oci_layout(tmp_path / "mp", (idx, [amd, arm]), ref_name="1.0")
    [img] = load(store, f"oci:{tmp_path}/mp", LoadOptions(platform=Platform.parse("linux/arm64"))).images
    assert img.config.digest == arm.config_descriptor.digest and img.repo_digest == idx.digest
    rec, _ = store.resolve("localhost/mp:1.0")
    assert rec.descriptor.annotations[REPO_DIGEST_ANNOTATION] == str(idx.digest)
    assert store.has_blob(idx.digest)
    [img] = load(store, f"oci:{tmp_path}/mp", LoadOptions(platform=Platform.parse("linux/amd64"))).images
    assert img.config.digest == amd.config_descriptor.digest
    with pytest.raises(LayerfsError) as e:
        load(store, f"oci:{tmp_path}/mp", LoadOptions(platform=Platform.parse("linux/s390x")))
    assert "no image for platform linux/s390x" in str(e.value)
    assert "available platforms: linux/amd64, linux/arm64/v8; use --platform" in str(e.value)


def test_flat_index_json_of_platforms(tmp_path, store):
    amd, arm = _small("amd", "amd64"), _small("arm", "arm64")
    lay = tmp_path / "flat"
    write_oci_layout(lay, amd, ref_name=None)
    write_oci_layout(lay, arm, ref_name=None)
    doc = json.loads((lay / "index.json").read_bytes())
    for entry, arch in zip(doc["manifests"], ("amd64", "arm64")):
        entry["platform"] = {"os": "linux", "architecture": arch}
    (lay / "index.json").write_text(json.dumps(doc))
    [img] = load(store, f"oci:{lay}", LoadOptions(platform=Platform.parse("linux/arm64"), single=True)).images
    assert img.config.digest == arm.config_descriptor.digest and img.names == ["localhost/flat:latest"]


def test_docker_media_types_in_a_layout(tmp_path, store):
    img = _small("dock", docker=True)
    write_oci_layout(tmp_path / "dl", img, ref_name="x")
    [got] = load(store, f"oci:{tmp_path}/dl:x").images
    assert got.manifest.media_type == OCI_MANIFEST and got.manifest.layers[0].media_type == OCI_LAYER_GZIP
    rec, _ = store.resolve("localhost/dl:x")
    assert rec.descriptor.annotations[SOURCE_MANIFEST_ANNOTATION] == str(img.manifest_digest)
    assert store.has_blob(img.manifest_digest) and store.has_blob(got.manifest.digest)


def test_platform_of_a_single_image(produced, store):
    with pytest.raises(LayerfsError) as e:
        load(store, f"{produced}/saved.tar", LoadOptions(platform=Platform.parse("linux/arm64")))
    assert "is for linux/amd64, not linux/arm64" in str(e.value)
    assert_untouched(store)


# --- hand-made docker archives -------------------------------------------------------------------

def _tar(path: Path, members: list, *, compress: str | None = None) -> Path:
    """members: (name, bytes) | (name, ("symlink"|"hardlink", target)) | (name, ("fifo",))"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, body in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if isinstance(body, tuple):
                ti.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[body[0]]
                if len(body) > 1:
                    ti.linkname = body[1]
                t.addfile(ti)
            else:
                ti.size = len(body)
                t.addfile(ti, io.BytesIO(body))
    data = buf.getvalue()
    if compress == "gzip":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _saved(image, tags=("demo/app:1",), *, layer_names=None, layer_data=None, config_name=None, config=None):
    """docker save's legacy layout: <id>/layer.tar (uncompressed unless *layer_data*), <config hex>.json, manifest.json."""
    config = image.config if config is None else config
    cfg = config_name or f"{hashlib.sha256(config).hexdigest()}.json"
    members = [(cfg, config)]
    names = []
    for i, tar in enumerate(image.uncompressed_layers):
        name = (layer_names or [])[i] if layer_names else f"{hashlib.sha256(b'id%d' % i).hexdigest()}/layer.tar"
        names.append(name)
        body = (layer_data or {}).get(i, tar)
        if body is not None:
            members.append((name, body))
    members.append(("manifest.json", json.dumps([{"Config": cfg, "RepoTags": list(tags), "Layers": names}]).encode()))
    return members


@pytest.fixture(scope="module")
def two_layer():
    return build_image([LayerBuilder().add_file("a", b"A" * 3000).build(),
                        LayerBuilder().add_file("b", b"B\n").build()], compression="gzip")


def test_docker_archive_symlinked_layers_and_several_images(tmp_path, store, two_layer):
    other = _small("other")
    lid = "f" * 64
    members = _saved(two_layer, ("one:1", "docker.io/library/one:2"))[:-1]
    members += [(f"{lid}/layer.tar", ("symlink", f"../{hashlib.sha256(b'id0').hexdigest()}/layer.tar")),
                (f"{other.config_descriptor.digest.hex}.json", other.config),
                ("other/layer.tar", other.uncompressed_layers[0])]
    manifest = [{"Config": f"{two_layer.config_descriptor.digest.hex}.json", "RepoTags": ["one:1", "one:2"],
                 "Layers": [f"{lid}/layer.tar", f"{hashlib.sha256(b'id1').hexdigest()}/layer.tar"]},
                {"Config": f"{other.config_descriptor.digest.hex}.json", "RepoTags": None,
                 "Layers": ["other/layer.tar"]}]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    path = _tar(tmp_path / "Two Images.tar", members)
    with pytest.raises(LayerfsError) as e:
        load(store, path, LoadOptions(single=True))
    assert "holds 2 images" in str(e.value)
    result = load(store, path)
    assert [img.names for img in result.images] == [["docker.io/library/one:1", "docker.io/library/one:2"],
                                                    ["localhost/two-images:1"]]
    assert [l.digest for l in result.images[0].manifest.layers] == list(two_layer.diff_ids)
    assert load(store, f"docker-archive:{path}:one:2").images[0].names[0] == "docker.io/library/one:2"


def test_docker_archive_with_compressed_layers(tmp_path, store, two_layer):
    """Newer docker save (blobs/sha256/<digest>, maybe gzip) and a legacy gzip layer.tar: stored as they are."""
    gz0, gz1 = two_layer.layers
    d0, d1 = (l.digest for l in two_layer.layer_descriptors)
    members = _saved(two_layer, layer_names=[f"blobs/sha256/{d0.hex}", "legacy/layer.tar"],
                     layer_data={0: gz0, 1: gz1}, config_name=f"blobs/sha256/{two_layer.config_descriptor.digest.hex}")
    [img] = load(store, _tar(tmp_path / "new.tar", members)).images
    assert [(l.media_type, l.digest) for l in img.manifest.layers] == [(OCI_LAYER_GZIP, d0), (OCI_LAYER_GZIP, d1)]
    assert [store.layer_info(l.digest)["diff_id"] for l in img.manifest.layers] == [str(d) for d in two_layer.diff_ids]
    assert img.manifest.layers[0].size == len(gz0)


# --- hostile and broken inputs ------------------------------------------------------------------

def _expect_error(store, source, *words, options=None):
    with pytest.raises(LayerfsError) as e:
        load(store, source, options)
    text = e.value.one_line()
    for w in words:
        assert w in text, text
    assert "\n" not in text
    assert_untouched(store)
    return e.value


def test_hostile_member_names(tmp_path, store, two_layer):
    base = _saved(two_layer)
    _expect_error(store, _tar(tmp_path / "up.tar", base + [("../evil", b"x")]), "'../evil' points outside the archive")
    _expect_error(store, _tar(tmp_path / "up2.tar", [("a/../../evil", b"x")] + base), "points outside the archive")
    _expect_error(store, _tar(tmp_path / "abs.tar", base + [("/etc/evil", b"x")]), "'/etc/evil' is an absolute path")
    _expect_error(store, _tar(tmp_path / "dup.tar", base + [(base[0][0], b"{}")]), "two members named")


def test_hostile_symlinks(tmp_path, store, two_layer):
    members = _saved(two_layer, layer_names=["l0/layer.tar", "l1/layer.tar"], layer_data={0: None})
    _expect_error(store, _tar(tmp_path / "abs.tar", members + [("l0/layer.tar", ("symlink", "/etc/passwd"))]),
                  "symlink to the absolute path '/etc/passwd'", str(tmp_path / "abs.tar"), "malicious")
    _expect_error(store, _tar(tmp_path / "esc.tar", members + [("l0/layer.tar", ("symlink", "../../etc/passwd"))]),
                  "'l0/layer.tar' is a symlink to '../../etc/passwd', outside the archive")
    _expect_error(store, _tar(tmp_path / "hard.tar", members + [("l0/layer.tar", ("hardlink", "../etc/passwd"))]),
                  "is a hard link to '../etc/passwd', outside the archive")
    _expect_error(store, _tar(tmp_path / "loop.tar", members + [("l0/layer.tar", ("symlink", "layer.tar"))]),
                  "too many levels of links")
    _expect_error(store, _tar(tmp_path / "fifo.tar", members + [("l0/layer.tar", ("fifo",))]),
                  "is not a regular file")


def test_missing_and_bad_parts(tmp_path, store, two_layer):
    base = _saved(two_layer)
    _expect_error(store, _tar(tmp_path / "nolayer.tar", [m for m in base if "layer.tar" not in m[0]]),
                  "is missing from the archive")
    _expect_error(store, _tar(tmp_path / "badjson.tar", base[:-1] + [("manifest.json", b"[{")]),
                  "malformed JSON in manifest.json")
    _expect_error(store, _tar(tmp_path / "shape.tar", base[:-1] + [("manifest.json", b'{"a": 1}')]),
                  "not a list of images")
    _expect_error(store, _tar(tmp_path / "neither.tar", [("hello.txt", b"hi")]),
                  "neither a docker-archive (no manifest.json) nor an OCI archive (no index.json)")
    _expect_error(store, f"oci-archive:{_tar(tmp_path / 'ocimissing.tar', base)}",
                  "index.json is missing", "docker-archive:FILE")
    (tmp_path / "random.bin").write_bytes(os.urandom(5000))
    _expect_error(store, tmp_path / "random.bin", "cannot read the archive")
    _expect_error(store, tmp_path / "nothere.tar", "does not exist")
    _expect_error(store, f"docker-archive:{tmp_path / 'up.tar'}:nope:1", "does not exist")
    _expect_error(store, f"docker-archive:{_tar(tmp_path / 'ok.tar', base)}:nope:1",
                  "no image tagged nope:1 in the archive", "tags in the archive: demo/app:1")
    _expect_error(store, f"docker-archive:{tmp_path / 'ok.tar'}:@1", "out of range")


def test_tampered_docker_layers(tmp_path, store, two_layer):
    evil = LayerBuilder().add_file("b", b"EVIL").build()
    # the second layer does not match its diff_id: the first one was written, and is removed again
    e = _expect_error(store, _tar(tmp_path / "t.tar", _saved(two_layer, layer_data={1: evil})),
                      str(two_layer.diff_ids[1]), "nothing was imported")
    assert "registry" not in e.one_line()
    # a config edited after the fact no longer matches its name
    base = _saved(two_layer)
    cfg = dict(two_layer.config_doc, config={"Env": ["EVIL=1"]})
    _expect_error(store, _tar(tmp_path / "c.tar", [(base[0][0], json.dumps(cfg).encode())] + base[1:]),
                  "does not match the digest in its name")
    # a consistent config that lists one diff_id too few
    cfg = dict(two_layer.config_doc, rootfs={"type": "layers", "diff_ids": [str(two_layer.diff_ids[0])]})
    _expect_error(store, _tar(tmp_path / "d.tar", _saved(two_layer, config=json.dumps(cfg).encode())),
                  "lists 1 diff_ids for the 2 layers")
    # a diff_id that is not the layer's: the blob is named by it, so the streaming pass refuses it
    cfg = dict(two_layer.config_doc, rootfs={"type": "layers", "diff_ids": [str(two_layer.diff_ids[1])] * 2})
    _expect_error(store, _tar(tmp_path / "e.tar", _saved(two_layer, config=json.dumps(cfg).encode())),
                  "nothing was imported")


def test_truncated_archives(tmp_path, store, produced):
    data = (produced / "saved.tar").read_bytes()
    big = max(json.loads(_member(produced / "saved.tar", "manifest.json"))[0]["Layers"],
              key=lambda n: tarfile.open(produced / "saved.tar").getmember(n).size)
    off = tarfile.open(produced / "saved.tar").getmember(big).offset_data
    (tmp_path / "cut.tar").write_bytes(data[: off + 1000])
    _expect_error(store, tmp_path / "cut.tar", "truncated")
    (tmp_path / "cut2.tar").write_bytes(data[: len(data) - 1536 - 700])        # inside the last header or data
    _expect_error(store, tmp_path / "cut2.tar", str(tmp_path / "cut2.tar"))
    for name in ("saved.tar.gz", "multi.tar.xz", "single.tar.xz", "saved.tar.zst"):
        raw = (produced / name).read_bytes()
        (tmp_path / name).write_bytes(raw[: len(raw) * 2 // 3])
        _expect_error(store, tmp_path / name, "nothing was imported")


def _member(tar: Path, name: str) -> bytes:
    with tarfile.open(tar) as t:
        return t.extractfile(name).read()


def _copy_layout(produced, tmp_path) -> Path:
    lay = tmp_path / "lay"
    shutil.copytree(produced / "layout", lay)
    for p in (lay / "blobs" / "sha256").iterdir():
        p.chmod(0o644)
    return lay


def _layout_parts(lay: Path):
    idx = json.loads((lay / "index.json").read_bytes())
    mdig = Digest.parse(idx["manifests"][0]["digest"])
    manifest = json.loads((lay / "blobs/sha256" / mdig.hex).read_bytes())
    return manifest, [Digest.parse(l["digest"]) for l in manifest["layers"]], Digest.parse(manifest["config"]["digest"])


def test_tampered_layout_blobs(produced, tmp_path, store):
    lay = _copy_layout(produced, tmp_path)
    manifest, layers, config = _layout_parts(lay)
    last = lay / "blobs/sha256" / layers[-1].hex
    good = last.read_bytes()
    last.write_bytes(bytes([good[0] ^ 1]) + good[1:])                           # same size, other bytes
    _expect_error(store, f"oci:{lay}", f"expected {layers[-1]}", "nothing was imported")
    last.write_bytes(good + b"x")
    _expect_error(store, f"oci:{lay}", f"layer {layers[-1].short} is {len(good) + 1} bytes, its descriptor says")
    last.unlink()
    _expect_error(store, f"oci:{lay}", f"{layers[-1]} is missing", "copy it again")
    last.write_bytes(good)
    cfg = lay / "blobs/sha256" / config.hex
    good_cfg = cfg.read_bytes()
    cfg.write_bytes(good_cfg.replace(b"A=1", b"A=2"))
    _expect_error(store, f"oci:{lay}", "config", "does not match its digest")
    cfg.write_bytes(good_cfg)
    (lay / "index.json").write_bytes(b"{not json")
    _expect_error(store, f"oci:{lay}", "index.json", "malformed")
    (lay / "index.json").unlink()
    _expect_error(store, f"oci:{lay}", "index.json is missing: not an OCI image layout")
    _expect_error(store, f"oci:{tmp_path}/nowhere", "does not exist")
    _expect_error(store, f"oci:{produced}/saved.tar", "is not a directory", "oci-archive:FILE")


def test_layer_blob_that_is_no_tar(tmp_path, store):
    """A blob that matches its digest but is not a layer: refused, and nothing of the image stays."""
    good = LayerBuilder().add_file("ok", b"ok").build()
    img = build_image([good, b"\x1f\x8b" + os.urandom(3000)], compression=["gzip", None],
                      layer_media_types=[None, OCI_LAYER_GZIP])
    write_oci_layout(tmp_path / "bad", img, ref_name="x")
    _expect_error(store, f"oci:{tmp_path}/bad:x", "layer")


def test_hostile_path_in_oci_archive_and_symlinked_blob(tmp_path, produced, store):
    members = [(n, _member(produced / "demo.tar", n)) for n in tarfile.open(produced / "demo.tar").getnames()
               if tarfile.open(produced / "demo.tar").getmember(n).isfile()]
    _expect_error(store, _tar(tmp_path / "a.tar", members + [("blobs/../../x", b"x")]), "points outside the archive")
    lay = _copy_layout(produced, tmp_path)
    _, layers, _ = _layout_parts(lay)
    blob = lay / "blobs/sha256" / layers[0].hex
    blob.unlink()
    os.mkfifo(blob)                                        # would block a naive reader forever
    _expect_error(store, f"oci:{lay}", "is not a regular file")
    blob.unlink()
    os.symlink("/etc/hostname", blob)                      # followed, like skopeo does, and verified
    _expect_error(store, f"oci:{lay}", str(layers[0].short))


# --- command line ----------------------------------------------------------------------------------

def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_load_and_pull(produced, tmp_path, capsys):
    root = str(tmp_path / "store")
    code, out, err = _run(capsys, "--root", root, "load", str(produced / "saved.tar"))
    assert (code, err) == (0, "")
    assert out.splitlines() == ["Loaded image: example.com/team/demo:3.0", "Loaded image: other/name:7"]
    code, out, err = _run(capsys, "--root", root, "load", "-i", f"oci-archive:{produced}/demo.tar")
    assert out == "Loaded image: localhost/demo:v1\n"
    code, out, err = _run(capsys, "--root", root, "pull", f"oci:{produced}/full:example.com/team/demo:2.0")
    assert code == 0 and out.splitlines()[-2:] == ["Loaded image: example.com/team/demo:2.0",
                                                   "example.com/team/demo:2.0"]
    assert out.count("Already exists") == 3
    code, out, err = _run(capsys, "--root", root, "pull", "-q", f"docker-archive:{produced}/untagged.tar")
    assert out == "localhost/untagged:latest\n"
    code, out, err = _run(capsys, "--root", root, "images")
    assert "example.com/team/demo" in out and "localhost/untagged" in out
    code, out, err = _run(capsys, "--root", root, "load", "-i", "x.tar", "y.tar")
    assert code == 2 and "give the archive once" in err
    code, out, err = _run(capsys, "--root", root, "pull", f"oci:{produced}/layout:nope")
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"layerfs: error: {produced}/layout: no image named 'nope' in the layout")
    code, out, err = _run(capsys, "--root", root, "pull", "oci:")
    assert code == 2 and "names no path" in err


def test_cli_load_from_stdin(produced, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "layerfs", "--root", str(tmp_path / "store"), "load"]
    with open(produced / "saved.tar.gz", "rb") as f:            # a file: read in place
        p = subprocess.run(cmd, stdin=f, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "Loaded image: example.com/team/demo:3.0"
    data = (produced / "untagged.tar").read_bytes()            # a pipe: spooled beside the store
    p = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"Loaded image: localhost/stdin:latest\n"
    assert not list((tmp_path / "store" / "ingest").iterdir())
    p = subprocess.run(cmd, input="", capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "stdin is empty" in p.stderr


def test_cli_mount_of_an_archive(produced, tmp_path):
    from mounthelpers import require_fuse, track, watchdog
    from layerfs.libc import pid_alive
    from layerfs.mount import mounts
    require_fuse()
    store = Store(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli(*args, check=True):
        p = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(store.root), *args], capture_output=True,
                           text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert not check or p.returncode == 0, p.stderr
        return p

    m = tmp_path / "mnt"
    m.mkdir()
    with watchdog(30):
        cli("mount", f"oci-archive:{produced}/demo.tar", str(m))
        [rec] = mounts(store)
        track(m, rec.pid)
        assert rec.image == "localhost/demo:v1"
        assert (m / "etc/hello").read_bytes() == b"hello from 3\n"
        assert (m / "opt/big.bin").read_bytes() == random.Random(7).randbytes(1_500_000)
        assert not (m / "etc/link").exists()
        cli("umount", str(m))
        assert not pid_alive(rec.pid)
        p = cli("mount", f"docker-archive:{produced}/saved.tar:nope:1", str(m), check=False)
        assert p.returncode == 1 and "no image tagged nope:1" in p.stderr and len(p.stderr.splitlines()) == 1
        assert mounts(store) == []
