"""Reference parsing: every form docker accepts, and clear errors for the rest."""
import pytest

from layerfs.errors import InvalidReference
from layerfs.image import Reference, is_local_registry

D64 = "a" * 64


@pytest.mark.parametrize("text, registry, repo, tag, digest, endpoint", [
    ("alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", None, "registry-1.docker.io"),
    ("library/alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
    ("docker.io/library/alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
    ("index.docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None, "registry-1.docker.io"),
    ("user/app", "docker.io", "user/app", "latest", None, "registry-1.docker.io"),
    ("ghcr.io/o/r:t", "ghcr.io", "o/r", "t", None, "ghcr.io"),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None, "localhost:5000"),
    ("localhost/x", "localhost", "x", "latest", None, "localhost"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", None, "127.0.0.1:5000"),
    (f"name@sha256:{D64}", "docker.io", "library/name", None, f"sha256:{D64}", "registry-1.docker.io"),
    (f"name:tag@sha256:{D64}", "docker.io", "library/name", "tag", f"sha256:{D64}", "registry-1.docker.io"),
    ("[::1]:5000/foo:bar", "[::1]:5000", "foo", "bar", None, "[::1]:5000"),
    ("Registry.Example.com/a__b/c-d.e:V_1.2-x", "Registry.Example.com", "a__b/c-d.e", "V_1.2-x", None,
     "Registry.Example.com"),
])
def test_valid(text, registry, repo, tag, digest, endpoint):
    r = Reference.parse(text)
    assert r.registry == registry
    assert r.repository == repo
    assert r.tag == tag
    assert (str(r.digest) if r.digest else None) == digest
    assert r.endpoint_host == endpoint
    # canonical form parses back to the same reference
    assert Reference.parse(str(r)) == r


def test_identifier_prefers_digest():
    r = Reference.parse(f"a:t@sha256:{D64}")
    assert r.identifier == f"sha256:{D64}"
    assert Reference.parse("a:t").identifier == "t"


def test_familiar_forms():
    assert Reference.parse("docker.io/library/alpine:3").familiar() == "alpine:3"
    assert Reference.parse("user/app").familiar() == "user/app:latest"
    assert Reference.parse("ghcr.io/o/r:t").familiar() == "ghcr.io/o/r:t"
    assert str(Reference.parse("alpine")) == "docker.io/library/alpine:latest"


@pytest.mark.parametrize("text, rule", [
    ("", "empty"),
    ("Alpine", "lowercase"),
    ("docker.io/Library/alpine", "lowercase"),
    ("a b", "whitespace"),
    (" alpine", "whitespace"),
    ("alpine:", "bad tag"),
    ("alpine:-x", "bad tag"),
    ("alpine:" + "x" * 129, "bad tag"),
    ("alpine:a/b", "bad registry host"),
    ("/alpine", "bad path component"),
    ("foo//bar", "bad path component"),
    ("foo/bar/", "bad path component"),
    ("-foo", "bad path component"),
    ("foo_", "bad path component"),
    ("a@sha256:123", "bad digest"),
    ("a@md5:" + "0" * 32, "bad digest"),
    ("a@sha256:" + "A" * 64, "bad digest"),
    ("exa_mple.com:5000/x", "bad registry host"),
    ("x" * 256, "longer than 255"),
])
def test_invalid(text, rule):
    with pytest.raises(InvalidReference) as ei:
        Reference.parse(text)
    assert rule in str(ei.value)
    assert ei.value.exit_code == 2
    assert "\n" not in ei.value.one_line()


@pytest.mark.parametrize("registry, local", [
    ("localhost:5000", True), ("localhost", True), ("127.0.0.1:5000", True), ("127.1.2.3", True),
    ("[::1]:5000", True), ("ghcr.io", False), ("10.0.0.1:5000", False), ("docker.io", False),
])
def test_local_registries_use_plain_http(registry, local):
    assert is_local_registry(registry) is local
