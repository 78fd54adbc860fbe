"""imagebuild: layer tars, compression, images, indexes, OCI layouts."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from layerfs.image import oci
from imagebuild import (DEFAULT_MTIME, BuiltIndex, LayerBuilder, build_image, build_index, compress,
                                decompress, layer_media_type, write_oci_layout, xattr_bytes)


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return tf.getmembers()


def read_all(tar: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            out[m.name] = (m, f.read() if f else None)
    return out


# --- layers ------------------------------------------------------------------

def test_every_entry_kind_round_trips():
    tar = (LayerBuilder()
           .add_dir("/usr", mode=0o755)
           .add_dir("usr/bin", mode=0o750, uid=1, gid=2)
           .add_file("usr/bin/su", b"#!/bin/true\n", mode=0o4755, uid=0, gid=0)
           .add_file("home/me/notes.txt", b"x" * 1000, mode=0o600, uid=1000, gid=1001,
                     uname="me", gname="staff", mtime=1234567890)
           .add_symlink("usr/bin/sh", "/bin/busybox")
           .add_symlink("rel", "../outside/is/ok/for/targets")
           .add_hardlink("usr/bin/su2", "/usr/bin/su")
           .add_device("dev/null", "c", 1, 3)
           .add_device("dev/sda", "b", 8, 0, mode=0o660)
           .add_fifo("run/fifo", mode=0o620)
           .add_whiteout("etc/removed.conf")
           .add_opaque("/var/cache")
           .add_opaque("/")
           .build())
    got = read_all(tar)
    assert list(got) == ["usr", "usr/bin", "usr/bin/su", "home/me/notes.txt", "usr/bin/sh", "rel", "usr/bin/su2",
                         "dev/null", "dev/sda", "run/fifo", "etc/.wh.removed.conf", "var/cache/.wh..wh..opq",
                         ".wh..wh..opq"]

    m, _ = got["usr"]
    assert m.isdir() and m.mode == 0o755 and m.mtime == DEFAULT_MTIME and (m.uid, m.gid) == (0, 0)
    m, _ = got["usr/bin"]
    assert m.mode == 0o750 and (m.uid, m.gid) == (1, 2)
    m, data = got["usr/bin/su"]
    assert m.isreg() and m.mode == 0o4755 and data == b"#!/bin/true\n"
    m, data = got["home/me/notes.txt"]
    assert (m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) == (0o600, 1000, 1001, "me", "staff", 1234567890)
    assert data == b"x" * 1000
    m, _ = got["usr/bin/sh"]
    assert m.issym() and m.linkname == "/bin/busybox"
    assert got["rel"][0].linkname == "../outside/is/ok/for/targets"
    m, _ = got["usr/bin/su2"]
    assert m.islnk() and m.linkname == "usr/bin/su"
    m, _ = got["dev/null"]
    assert m.ischr() and (m.devmajor, m.devminor) == (1, 3) and m.mode == 0o666
    m, _ = got["dev/sda"]
    assert m.isblk() and (m.devmajor, m.devminor, m.mode) == (8, 0, 0o660)
    m, _ = got["run/fifo"]
    assert m.isfifo() and m.mode == 0o620
    for name in ("etc/.wh.removed.conf", "var/cache/.wh..wh..opq", ".wh..wh..opq"):
        m, data = got[name]
        assert m.isreg() and data == b""


def test_directories_carry_trailing_slash_in_the_raw_header():
    tar = LayerBuilder().add_dir("a/b").build()
    assert tar[:4] == b"a/b/"


def test_xattrs_binary_values_round_trip():
    xattrs = {
        "user.text": "héllo wörld".encode(),
        "user.binary": b"\xff\xfe\x00\x80 not utf-8 \n with newline \x00",
        "security.capability": bytes([1, 0, 0, 2, 0x20, 0, 0, 0]) + bytes(12),
        "trusted.overlay.opaque": b"y",
        "user.one-byte": b"\x00",
    }
    tar = (LayerBuilder()
           .add_file("bin/ping", b"\x7fELF", mode=0o755, xattrs=xattrs)
           .add_dir("d", xattrs={"user.dir": b"\x01\x02"})
           .add_symlink("l", "bin/ping", xattrs={"user.link": b"v"})
           .add_file("plain", b"p")
           .build())
    got = {m.name: m for m in members(tar)}
    assert xattr_bytes(got["bin/ping"]) == xattrs
    assert xattr_bytes(got["d"]) == {"user.dir": b"\x01\x02"}
    assert xattr_bytes(got["l"]) == {"user.link": b"v"}
    assert xattr_bytes(got["plain"]) == {}
    # the non-UTF-8 value forces hdrcharset=BINARY on that entry's PAX header (documented)
    assert got["bin/ping"].pax_headers.get("hdrcharset") == "BINARY"
    assert "hdrcharset" not in got["d"].pax_headers
    assert b"SCHILY.xattr.user.binary=\xff\xfe\x00\x80" in tar


def test_xattrs_readable_by_gnu_tar(tmp_path):
    """An independent reader: GNU tar extracts the SCHILY.xattr records (binary and empty values)."""
    import os
    import shutil
    import subprocess

    from prereqs import require_binary

    tar_bin = require_binary("tar")
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("the temp file system does not support user xattrs")
    values = {"user.bin": b"\xff\x00z\n", "user.empty": b"", "user.text": "é".encode()}
    (tmp_path / "layer.tar").write_bytes(LayerBuilder().add_file("f", b"hi", xattrs=values).build())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([tar_bin, "--xattrs", "--xattrs-include=user.*", "-xf", str(tmp_path / "layer.tar"),
                    "-C", str(out)], check=True, capture_output=True, timeout=30)
    assert (out / "f").read_bytes() == b"hi"
    assert {k: os.getxattr(out / "f", k) for k in os.listxattr(out / "f")} == values
    shutil.rmtree(out)


def test_xattr_validation():
    b = LayerBuilder()
    with pytest.raises(ValueError):
        b.add_file("f", b"", xattrs={"user.a=b": b"x"})
    with pytest.raises(TypeError):
        b.add_file("f", b"", xattrs={"user.a": "text"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        LayerBuilder(format=tarfile.GNU_FORMAT).add_file("f", b"", xattrs={"user.a": b"x"})


def test_paths_are_normalised_and_dotdot_refused():
    b = LayerBuilder().add_file("/abs/path", b"").add_file("a//b/./c", b"").add_file("trail/", b"")
    assert b.names == ["abs/path", "a/b/c", "trail"]
    for bad in ("../escape", "a/../../b", "a/.."):
        with pytest.raises(ValueError):
            LayerBuilder().add_file(bad, b"")
    with pytest.raises(ValueError):
        LayerBuilder().add_hardlink("x", "../../etc/shadow")
    with pytest.raises(ValueError):
        LayerBuilder().add_file("/", b"")
    with pytest.raises(ValueError):
        LayerBuilder().add_device("d", "x", 1, 1)  # type: ignore[arg-type]


def test_non_utf8_file_names_round_trip():
    name = b"caf\xe9-latin1".decode("utf-8", "surrogateescape")
    tar = LayerBuilder().add_file(name, b"data").build()
    (m,) = members(tar)
    assert m.name.encode("utf-8", "surrogateescape") == b"caf\xe9-latin1"


def test_add_tarinfo_escape_hatch_for_odd_entries():
    long_name = "deep/" * 30 + "file.txt"  # > 100 bytes: needs a PAX path record
    ti = tarfile.TarInfo("./dot/prefixed")
    ti.mode = 0o640
    custom = tarfile.TarInfo("with-pax")
    custom.pax_headers = {"comment": "hello", "SCHILY.xattr.user.raw": "v"}
    hostile = tarfile.TarInfo("../../etc/passwd")
    b = (LayerBuilder()
         .add_file(long_name, b"long")
         .add_tarinfo(ti, b"dot")
         .add_tarinfo(custom, b"")
         .add_tarinfo(hostile, b"evil"))
    got = read_all(b.build())
    assert got[long_name][1] == b"long" and got[long_name][0].pax_headers["path"] == long_name
    assert got["./dot/prefixed"][1] == b"dot" and got["./dot/prefixed"][0].mode == 0o640
    assert got["with-pax"][0].pax_headers["comment"] == "hello"
    assert xattr_bytes(got["with-pax"][0]) == {"user.raw": b"v"}
    assert got["../../etc/passwd"][1] == b"evil"
    assert ti.name == "./dot/prefixed" and ti.size == 0, "the caller's TarInfo is not modified"


def test_size_mismatch_and_truncation_hatches():
    short = tarfile.TarInfo("short")
    short.size = 5000
    tar = LayerBuilder().add_tarinfo(short, b"only-a-little", set_size=False).build(end_of_archive=False)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        m = tf.next()
        assert m is not None and m.size == 5000
        with pytest.raises(tarfile.ReadError):
            tf.extractfile(m).read()  # type: ignore[union-attr]


def test_add_raw_and_trailer_options():
    one = LayerBuilder().add_file("a", b"1").build()
    assert len(one) == 512 * 4 and one.endswith(b"\0" * 1024)
    padded = LayerBuilder().add_file("a", b"1").build(pad_to_record=True)
    assert len(padded) == tarfile.RECORDSIZE and padded.startswith(one)
    body = LayerBuilder().add_file("a", b"1").build(end_of_archive=False)
    assert len(body) == 1024
    spliced = LayerBuilder().add_raw(body).add_file("b", b"2").build()
    assert [m.name for m in members(spliced)] == ["a", "b"]


def test_gnu_format_long_names():
    tar = LayerBuilder(format=tarfile.GNU_FORMAT).add_file("x" * 150, b"g").build()
    (m,) = members(tar)
    assert m.name == "x" * 150 and b"././@LongLink" in tar


def test_build_is_deterministic_and_ordered():
    def make() -> bytes:
        b = LayerBuilder()
        for name in ("z", "a", "m"):
            b.add_file(name, name.encode(), xattrs={"user.k": b"\xff" + name.encode()})
        return b.build()

    assert make() == make()
    assert [m.name for m in members(make())] == ["z", "a", "m"]


# --- compression -------------------------------------------------------------

@pytest.mark.parametrize("kind", [None, "gzip", "zstd"])
def test_compress_round_trip_and_deterministic(kind):
    data = LayerBuilder().add_file("f", b"hello " * 1000).build()
    c1, c2 = compress(data, kind), compress(data, kind)
    assert c1 == c2
    assert decompress(c1, kind) == data
    if kind == "gzip":
        assert c1[:2] == b"\x1f\x8b" and c1[4:8] == b"\0\0\0\0"  # mtime 0
        assert gzip.decompress(c1) == data
    if kind == "zstd":
        import zstandard
        assert c1[:4] == b"\x28\xb5\x2f\xfd"
        assert zstandard.get_frame_parameters(c1).content_size == len(data)


def test_compress_rejects_unknown_kind():
    with pytest.raises(ValueError):
        compress(b"", "bzip2")  # type: ignore[arg-type]


# --- images ------------------------------------------------------------------

def two_layers() -> list[bytes]:
    return [
        LayerBuilder().add_dir("etc").add_file("etc/os-release", b"ID=test\n").add_file("bin/sh", b"sh", mode=0o755)
        .build(),
        LayerBuilder().add_whiteout("etc/os-release").add_symlink("bin/bash", "sh").build(),
    ]


def test_build_image_oci_digests_and_structure():
    layers = two_layers()
    img = build_image(layers, config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                      annotations={"org.example": "yes"})
    # diff_ids are the sha256 of the uncompressed tars
    assert [str(d) for d in img.diff_ids] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    assert img.uncompressed_layers == tuple(layers)
    for desc, blob, tar in zip(img.layer_descriptors, img.layers, layers):
        assert desc.media_type == oci.OCI_LAYER_GZIP
        assert desc.digest == oci.Digest.of(blob) and desc.size == len(blob)
        assert gzip.decompress(blob) == tar
    assert img.config_descriptor == oci.Descriptor(oci.OCI_CONFIG, oci.Digest.of(img.config), len(img.config))
    assert img.manifest_digest == oci.Digest.of(img.manifest)
    assert img.manifest_descriptor.size == len(img.manifest)

    m = oci.parse_manifest(img.manifest, img.manifest_media_type, expected=img.manifest_digest)
    assert isinstance(m, oci.Manifest)
    assert m.media_type == oci.OCI_MANIFEST
    assert m.config == img.config_descriptor
    assert m.layers == img.layer_descriptors
    assert m.annotations == {"org.example": "yes"}

    cfg = oci.ImageConfig.parse(img.config)
    assert cfg.diff_ids == list(img.diff_ids)
    assert cfg.platform == oci.Platform("linux", "amd64")
    assert cfg.created == "2024-01-01T00:00:00Z"
    assert [h.created_by for h in cfg.history] == ["layer 0", "layer 1"]
    assert cfg.doc["config"] == {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}
    assert cfg.doc["rootfs"]["type"] == "layers"

    # blobs: config, every layer and the manifest, each under its own digest
    assert set(img.blobs) == {img.config_descriptor.digest, img.manifest_digest,
                              *(d.digest for d in img.layer_descriptors)}
    for d, data in img.blobs.items():
        assert oci.Digest.of(data) == d

    again = build_image(layers, config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                        annotations={"org.example": "yes"})
    assert again.manifest == img.manifest, "builds are deterministic"


def test_build_image_docker_and_per_layer_compression():
    layers = two_layers() + [LayerBuilder().add_file("z", b"z").build()]
    img = build_image(layers, docker=True, compression=["gzip", None, "zstd"],
                      platform=oci.Platform("linux", "arm64", "v8"))
    assert img.manifest_media_type == oci.DOCKER_MANIFEST
    assert img.config_descriptor.media_type == oci.DOCKER_CONFIG
    assert [d.media_type for d in img.layer_descriptors] == [oci.DOCKER_LAYER_GZIP, oci.DOCKER_LAYER,
                                                              oci.DOCKER_LAYER_ZSTD]
    assert img.layers[1] == layers[1]
    assert decompress(img.layers[2], "zstd") == layers[2]
    doc = img.manifest_doc
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == oci.DOCKER_MANIFEST
    cfg = img.config_doc
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm64", "v8")
    assert oci.iter_layer_compression(img.layer_descriptors) == ["gzip", None, "zstd"]

    oci_img = build_image(layers, compression=[None, "gzip", "zstd"])
    assert [d.media_type for d in oci_img.layer_descriptors] == [oci.OCI_LAYER, oci.OCI_LAYER_GZIP,
                                                                  oci.OCI_LAYER_ZSTD]
    assert oci_img.diff_ids == img.diff_ids, "diff_ids do not depend on compression"
    with pytest.raises(ValueError):
        build_image(layers, compression=["gzip"])
    assert layer_media_type("zstd", docker=True) == oci.DOCKER_LAYER_ZSTD


def test_history_with_empty_layers_and_overrides():
    layers = two_layers()
    history = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "ENV A=1", "empty_layer": True},
        {"created_by": "ADD rootfs"},
        {"created_by": "CMD sh", "empty_layer": True},
        {"created_by": "RUN rm"},
    ]
    img = build_image(layers, history=history, created=None,
                      extra_config={"author": "tests", "os.features": ["x"]},
                      layer_media_types=[None, oci.OCI_LAYER_ND_GZIP])
    cfg = oci.ImageConfig.parse(img.config)
    assert [h.empty_layer for h in cfg.history] == [True, False, True, False]
    assert cfg.created is None and cfg.doc["author"] == "tests"
    assert img.layer_descriptors[1].media_type == oci.OCI_LAYER_ND_GZIP
    with pytest.raises(ValueError):
        build_image(layers, history=history[:2])
    raw = build_image(layers, raw_config=b"{not json")
    assert raw.config == b"{not json" and raw.blobs[raw.config_descriptor.digest] == b"{not json"


def test_empty_image():
    img = build_image([])
    assert img.layers == () and oci.ImageConfig.parse(img.config).diff_ids == []


@pytest.mark.parametrize("docker", [False, True])
def test_build_index(docker):
    amd = build_image(two_layers(), docker=docker, platform=oci.Platform("linux", "amd64"))
    arm = build_image(two_layers(), docker=docker, platform=oci.Platform("linux", "arm64", "v8"),
                      config={"Cmd": ["arm"]})
    idx = build_index([(amd, amd.platform), (arm, arm.platform)], docker=docker)
    raw, media_type, digest = idx
    assert isinstance(idx, BuiltIndex)
    assert media_type == (oci.DOCKER_LIST if docker else oci.OCI_INDEX)
    assert digest == oci.Digest.of(raw) and idx.descriptor.size == len(raw)
    parsed = oci.parse_manifest(raw, media_type)
    assert isinstance(parsed, oci.Index)
    assert [m.digest for m in parsed.manifests] == [amd.manifest_digest, arm.manifest_digest]
    assert parsed.select(oci.Platform("linux", "arm64")).digest == arm.manifest_digest
    assert parsed.select(oci.Platform("linux", "amd64")).digest == amd.manifest_digest
    assert parsed.select(oci.Platform("linux", "s390x")) is None


def test_write_oci_layout(tmp_path):
    img = build_image(two_layers())
    other = build_image([LayerBuilder().add_file("o", b"o").build()], compression="zstd")
    root = write_oci_layout(tmp_path / "layout", img, ref_name="v1")
    write_oci_layout(root, other, ref_name="v2")
    write_oci_layout(root, other, ref_name="v1")  # re-tag: replaces v1
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    refs = {m["annotations"][oci.REF_NAME_ANNOTATION]: m["digest"] for m in index["manifests"]}
    assert refs == {"v1": str(other.manifest_digest), "v2": str(other.manifest_digest)}
    for d, data in {**img.blobs, **other.blobs}.items():
        assert (root / "blobs" / d.algorithm / d.hex).read_bytes() == data

    idx = build_index([(img, img.platform), (other, oci.Platform("linux", "arm64"))])
    write_oci_layout(root, (idx, [img, other]), ref_name="multi")
    assert (root / "blobs/sha256" / idx.digest.hex).read_bytes() == idx.raw
