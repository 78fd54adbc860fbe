"""Manifest, index and config parsing; platform selection; the verifying reader."""
import io
import json

import pytest

from layerfs.image import oci
from layerfs.errors import (DigestMismatch, InvalidPlatform, ManifestError, SizeMismatch,
                            UnsupportedMediaType)
from layerfs.image import Descriptor, Digest, Index, Manifest, Platform, VerifyingReader, parse_manifest


def desc(mt, data=b"x", **extra):
    d = {"mediaType": mt, "digest": str(Digest.of(data)), "size": len(data)}
    d.update(extra)
    return d


def manifest_doc(mt=oci.OCI_MANIFEST, layers=1):
    return {"schemaVersion": 2, "mediaType": mt, "config": desc(oci.OCI_CONFIG, b"{}"),
            "layers": [desc(oci.OCI_LAYER_GZIP, bytes([i])) for i in range(layers)]}


def test_digest_parse_and_str():
    d = Digest.parse("sha256:" + "0" * 64)
    assert str(d) == "sha256:" + "0" * 64 and d.short == "0" * 12
    for bad in ["sha256:abc", "sha256", "md5:" + "0" * 32, "SHA256:" + "0" * 64, "sha256:" + "g" * 64]:
        with pytest.raises(ManifestError):
            Digest.parse(bad)


def test_manifest_keeps_raw_bytes_and_digest():
    raw = json.dumps(manifest_doc(layers=2), indent=3).encode()
    m = parse_manifest(raw, oci.OCI_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.raw == raw and m.digest == Digest.of(raw)
    assert len(m.layers) == 2 and m.config.media_type == oci.OCI_CONFIG


def test_manifest_digest_verified_when_expected():
    raw = json.dumps(manifest_doc()).encode()
    with pytest.raises(DigestMismatch):
        parse_manifest(raw, expected=Digest.of(b"other"))


def test_manifest_without_media_type_decided_by_shape():
    doc = manifest_doc()
    del doc["mediaType"]
    assert isinstance(parse_manifest(json.dumps(doc).encode()), Manifest)
    idx = {"schemaVersion": 2, "manifests": []}
    assert isinstance(parse_manifest(json.dumps(idx).encode()), Index)


@pytest.mark.parametrize("raw, err", [
    (b"not json", ManifestError),
    (b"[]", ManifestError),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), UnsupportedMediaType),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/x-foo"}).encode(), UnsupportedMediaType),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": {}, "layers": []}).encode(), ManifestError),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": desc(oci.OCI_CONFIG),
                 "layers": "x"}).encode(), ManifestError),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                 "config": desc(oci.OCI_CONFIG, size=-1), "layers": []}).encode(), ManifestError),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                 "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:zz", "size": 1}, "layers": []}).encode(),
     ManifestError),
])
def test_malformed_manifests(raw, err):
    with pytest.raises(err):
        parse_manifest(raw)


def index_of(platforms):
    return parse_manifest(json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_INDEX,
        "manifests": [desc(oci.OCI_MANIFEST, p.encode(), platform=dict(zip(("os", "architecture", "variant"), p.split("/"))))
                      for p in platforms]}).encode())


def test_platform_selection():
    idx = index_of(["linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "windows/amd64"])
    assert idx.select(Platform.parse("linux/amd64")).platform.architecture == "amd64"
    assert idx.select(Platform.parse("linux/arm/v6")).platform.variant == "v6"
    assert idx.select(Platform.parse("linux/arm")).platform.variant == "v7"   # arm means arm/v7
    assert idx.select(Platform.parse("linux/arm64")).platform.architecture == "arm64"
    assert idx.select(Platform.parse("linux/aarch64")).platform.architecture == "arm64"
    assert idx.select(Platform.parse("linux/s390x")) is None
    # arm64 published without a variant still matches linux/arm64/v8
    idx2 = index_of(["linux/arm64"])
    assert idx2.select(Platform.parse("linux/arm64/v8")) is not None


def test_platform_parse_errors():
    for bad in ["linux", "", "linux/", "a/b/c/d"]:
        with pytest.raises(InvalidPlatform):
            Platform.parse(bad)
    assert str(Platform.parse("Linux/x86_64")) == "linux/amd64"


def test_host_platform_is_linux():
    assert Platform.host().os == "linux"


def test_verifying_reader_checks_digest_and_size():
    data = b"hello world" * 1000
    d = Digest.of(data)
    assert VerifyingReader(io.BytesIO(data), d, len(data)).read() == data
    r = VerifyingReader(io.BytesIO(data), d, len(data))
    while r.read(7):
        pass
    with pytest.raises(DigestMismatch):
        VerifyingReader(io.BytesIO(data[:-1] + b"X"), d, len(data)).read()
    with pytest.raises(SizeMismatch):
        VerifyingReader(io.BytesIO(data[:-1]), d, len(data)).read()
    with pytest.raises(SizeMismatch):
        VerifyingReader(io.BytesIO(data + b"x"), d, len(data)).read()


def test_config_history_and_diff_ids():
    cfg = oci.ImageConfig.parse(json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05.123456789Z",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
        "history": [{"created_by": "ADD x", "empty_layer": False}, {"created_by": "CMD", "empty_layer": True},
                    "junk"]}).encode())
    assert [str(d) for d in cfg.diff_ids] == ["sha256:" + "1" * 64]
    assert [h.empty_layer for h in cfg.history] == [False, True]
    assert str(cfg.platform) == "linux/amd64"


def test_descriptor_round_trip():
    d = Descriptor.from_json(desc(oci.OCI_MANIFEST, b"m", annotations={"a": "b"},
                                  platform={"os": "linux", "architecture": "arm", "variant": "v7"}))
    again = Descriptor.from_json(d.to_json())
    assert again == d and again.annotations == {"a": "b"} and again.platform == d.platform
