"""Registry client edge cases: TLS, insecure registries, redirects, hostile answers."""
from __future__ import annotations

import datetime
import random
import ipaddress
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clirun import run_cli as run
import layerfs.registry.client as registry_mod
from layerfs.registry import Credentials
from layerfs.errors import (AuthenticationError, ManifestError, RegistryError, RegistryUnreachable,
                            SizeMismatch)
from imagebuild import LayerBuilder, build_image
from layerfs.image import Descriptor, Digest, OCI_LAYER
from layerfs.registry import RegistryClient, RegistryOptions
from registryclient import push_image
from registryproc import Registry


@pytest.fixture
def store_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.01")
    return tmp_path / "store"


def one_image():
    b = LayerBuilder()
    b.add_file("hello", b"hello\n")
    return build_image([b.build()])


# --- TLS ----------------------------------------------------------------------------------

def make_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerfs test registry")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TLSRegistry(Registry):
    @property
    def url(self) -> str:
        return f"https://{self.host}"


@pytest.fixture
def tls_registry(tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    reg = TLSRegistry(tmp_path / "tls-registry",
                      config_overrides={"http": {"tls": {"certificate": str(cert), "key": str(key)}}})
    reg.start()
    request_stop = reg.stop
    # pretend 127.0.0.1 is a remote registry, so layerfs uses HTTPS as it would for any other host
    monkeypatch.setattr(registry_mod, "is_local_registry", lambda r: False)
    yield reg, cert
    request_stop()


def test_https_needs_a_trusted_certificate(tls_registry, unique_repo, store_root, capsys, monkeypatch):
    reg, cert = tls_registry
    img = one_image()
    push_image(reg.host, unique_repo, "t", img, scheme="https", session=_verify_session(cert))
    ref = f"{reg.host}/{unique_repo}:t"
    code, out, err = run(["pull", ref], capsys)
    assert code == 1
    assert "TLS error" in err and "certificate verify failed" in err and "LAYERFS_CA_BUNDLE" in err
    assert err.count("\n") == 1

    monkeypatch.setenv("LAYERFS_CA_BUNDLE", str(cert))
    code, out, err = run(["pull", ref], capsys)
    assert code == 0, err


def test_insecure_registry_skips_verification(tls_registry, unique_repo, store_root, capsys):
    reg, cert = tls_registry
    img = one_image()
    push_image(reg.host, unique_repo, "t", img, scheme="https", session=_verify_session(cert))
    code, out, err = run(["--insecure-registry", reg.host, "pull", f"{reg.host}/{unique_repo}:t"], capsys)
    assert code == 0, err


def test_insecure_registry_falls_back_to_http(registry, unique_repo, store_root, capsys, monkeypatch):
    monkeypatch.setattr(registry_mod, "is_local_registry", lambda r: False)
    img = one_image()
    push_image(registry.host, unique_repo, "t", img)
    ref = f"{registry.host}/{unique_repo}:t"
    code, out, err = run(["pull", ref], capsys)
    assert code == 1     # HTTPS to a plain-HTTP registry fails...
    monkeypatch.setenv("LAYERFS_INSECURE_REGISTRIES", registry.host)
    code, out, err = run(["pull", ref], capsys)
    assert code == 0, err   # ...unless it is named insecure


def _verify_session(cert):
    from localnet import new_session
    s = new_session()
    s.verify = str(cert)
    return s


# --- a scriptable fake registry -------------------------------------------------------------

class Fake:
    """A tiny HTTP server whose answers tests script: routes[path] = (status, headers, body)."""

    def __init__(self, host="127.0.0.1"):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.seen: list[tuple[str, dict]] = []
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.seen.append((self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                route = fake.routes.get(path, (404, {}, b'{"errors":[{"code":"NOT_FOUND"}]}'))
                if callable(route):
                    route = route(self)
                status, headers, body = route
                if callable(body):
                    body = body(self)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer((host, 0), H)
        self.host = f"{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = Fake()
    f.routes["/v2/"] = (200, {}, b"{}")
    yield f
    f.close()


def _loopback2_available() -> bool:
    try:
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _loopback2_available(), reason="127.0.0.2 not bindable")
def test_authorization_never_follows_redirect_to_other_host(fake):
    other = Fake("127.0.0.2")
    try:
        data = b"blob bytes"
        d = Digest.of(data)
        other.routes["/storage/blob"] = (200, {}, data)
        def blob(h):
            if not h.headers.get("Authorization"):
                return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
            return 307, {"Location": f"http://{other.host}/storage/blob"}, b""
        fake.routes[f"/v2/repo/blobs/{d}"] = blob
        client = RegistryClient(fake.host, RegistryOptions(credentials=Credentials("u", "p")))
        got = client.get_blob_bytes("repo", Descriptor(OCI_LAYER, d, len(data)))
        assert got == data
        blob_req = [h for p, h in fake.seen if p.startswith("/v2/repo/blobs/")][-1]
        assert blob_req.get("Authorization", "").startswith("Basic ")
        assert all("Authorization" not in h for _, h in other.seen)
    finally:
        other.close()


def test_token_realm_must_be_http(fake):
    fake.routes["/v2/"] = (401, {"WWW-Authenticate": 'Bearer realm="file:///etc/passwd",service="x"'}, b"")
    fake.routes["/v2/r/manifests/t"] = fake.routes["/v2/"]
    client = RegistryClient(fake.host, RegistryOptions())
    with pytest.raises(AuthenticationError) as ei:
        client.get_manifest("r", "t")
    assert "refusing token realm" in str(ei.value)


def test_malformed_manifest_json(fake, store_root, capsys):
    fake.routes["/v2/r/manifests/t"] = (200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                                        b'{"schemaVersion": 2, "config": ')
    code, out, err = run(["pull", f"{fake.host}/r:t"], capsys)
    assert code == 1 and "malformed JSON" in err and err.count("\n") == 1


def test_truncated_manifest_body(fake):
    fake.routes["/v2/r/manifests/t"] = (200, {"Content-Length": "500"}, b'{"schemaVersion": 2}')
    client = RegistryClient(fake.host, RegistryOptions(max_retries=1, backoff_base=0.01, timeout=2))
    with pytest.raises((RegistryError, ManifestError)):
        client.get_manifest("r", "t")


def test_manifest_digest_header_mismatch(fake):
    raw = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": []}).encode()
    fake.routes["/v2/r/manifests/t"] = (200, {"Docker-Content-Digest": str(Digest.of(b"else"))}, raw)
    with pytest.raises(ManifestError) as ei:
        RegistryClient(fake.host).get_manifest("r", "t")
    assert "Docker-Content-Digest" in str(ei.value)


def test_manifest_too_large(fake):
    fake.routes["/v2/r/manifests/t"] = (200, {}, b" " * (5 << 20))
    with pytest.raises(ManifestError) as ei:
        RegistryClient(fake.host).get_manifest("r", "t")
    assert "too large" in str(ei.value)


def test_bad_content_range_on_resume(fake):
    data = bytes(range(256)) * 10
    d = Digest.of(data)
    fake.routes[f"/v2/r/blobs/{d}"] = (206, {"Content-Range": f"bytes 5-{len(data) - 1}/{len(data)}"}, data[5:])
    with pytest.raises(SizeMismatch):
        RegistryClient(fake.host).open_blob("r", Descriptor(OCI_LAYER, d, len(data)), start=100)


def test_wrong_content_length_for_blob(fake):
    data = b"abc"
    d = Digest.of(data)
    fake.routes[f"/v2/r/blobs/{d}"] = (200, {}, data + b"extra")
    with pytest.raises(SizeMismatch):
        RegistryClient(fake.host).open_blob("r", Descriptor(OCI_LAYER, d, len(data)))


def test_retry_after_is_honoured_and_bounded(fake):
    calls = []

    def body(h):
        calls.append(1)
        return b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
    fake.routes["/v2/r/manifests/t"] = (429, {"Retry-After": "0"}, body)
    client = RegistryClient(fake.host, RegistryOptions(max_retries=3, backoff_base=0.01))
    with pytest.raises(RegistryError) as ei:
        client.get_manifest("r", "t")
    assert ei.value.status == 429 and ei.value.temporary and "TOOMANYREQUESTS" in ei.value.codes
    assert len(calls) == 4


def test_retries_do_not_nest(fake):
    """An operation run under client.retrying owns the one retry budget: the requests it makes are not
    retried on their own (max_retries=2: three GETs, not nine); a request on its own has the budget."""
    calls = []

    def body(h):
        calls.append(1)
        return b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}'
    data = b"abc"
    d = Digest.of(data)
    fake.routes[f"/v2/r/blobs/{d}"] = (503, {}, body)
    client = RegistryClient(fake.host, RegistryOptions(max_retries=2, backoff_base=0.01))
    desc = Descriptor(OCI_LAYER, d, len(data))
    with pytest.raises(RegistryError) as ei:
        client.retrying(lambda: client.open_blob("r", desc))
    assert ei.value.status == 503 and ei.value.temporary and len(calls) == 3
    calls.clear()
    with pytest.raises(RegistryError):
        client.open_blob("r", desc)
    assert len(calls) == 3


def test_blob_body_cut_raises_a_layerfs_error(fake):
    """A blob body whose connection breaks off is RegistryUnreachable from chunks(), saying how far it got."""
    d = Digest.of(b"x" * 1000)
    fake.routes[f"/v2/r/blobs/{d}"] = (200, {"Content-Length": "1000"}, b"x" * 10)
    client = RegistryClient(fake.host, RegistryOptions(max_retries=0, timeout=5))
    resp = client.open_blob("r", Descriptor(OCI_LAYER, d, 1000))
    got = []
    try:
        with pytest.raises(RegistryUnreachable, match="connection lost after 10 of 1000 bytes"):
            for chunk in resp.chunks():
                got.append(chunk)
    finally:
        resp.close()
    assert b"".join(got) == b"x" * 10


def test_read_range_asks_again_when_the_body_breaks_off(registry, fault_proxy, unique_repo, monkeypatch):
    """A Range answer cut in the middle of its body is asked for again (with backoff), up to *retries* times;
    beyond that the read fails with one RegistryUnreachable."""
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.01")
    img = build_image([LayerBuilder().add_file("big", random.Random(5).randbytes(1 << 20)).build()])
    push_image(registry.host, unique_repo, "v1", img)
    desc = img.layer_descriptors[0]
    blob = img.blobs[desc.digest]
    client = RegistryClient(fault_proxy.host, RegistryOptions.from_env())
    rule = fault_proxy.cut(rf"/blobs/{desc.digest}", after_bytes=5000, times=1)
    assert client.read_range(unique_repo, desc, 1000, 600_000, retries=1) == blob[1000:600_000]
    assert rule.hits == 1
    gets = [r for r in fault_proxy.requests if f"/blobs/{desc.digest}" in r.path]
    assert len(gets) == 2 and all(r.headers.get("Range") == "bytes=1000-599999" for r in gets)
    fault_proxy.cut(rf"/blobs/{desc.digest}", after_bytes=5000, times=2)
    with pytest.raises(RegistryUnreachable, match="connection failed|ended after"):
        client.read_range(unique_repo, desc, 0, 600_000, retries=1)
