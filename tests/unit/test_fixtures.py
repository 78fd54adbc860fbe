"""The test infrastructure itself: registries, token server, basic auth, fault proxy, umoci/skopeo."""
from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import tarfile
import threading
import time

import pytest
import requests

from layerfs.image import oci
from imagebuild import BuiltImage, LayerBuilder, build_image, build_index, write_oci_layout
from localnet import new_session
from prereqs import missing_prerequisite, require_binary
from producers import UMOCI_EXPECTED, skopeo_push
from registryclient import RegistryAuth, get_blob, get_manifest, parse_challenge, push_image, push_index
from registryproc import write_tls_cert
from tokenserver import decode_jwt


def small_image(tag: str = "x", **kwargs) -> BuiltImage:
    layers = [
        LayerBuilder().add_dir("etc").add_file("etc/id", tag.encode(), xattrs={"user.k": b"\xff"}).build(),
        LayerBuilder().add_file("data/big", bytes(range(256)) * 64).add_whiteout("etc/id").build(),
    ]
    return build_image(layers, **kwargs)


def layer_names(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        return {m.name.removeprefix("./"): m for m in tf.getmembers()}


# --- plain registry ----------------------------------------------------------

@pytest.mark.parametrize("docker", [False, True])
def test_push_then_read_back(registry, unique_repo, docker):
    img = small_image(docker=docker)
    digest = push_image(registry.host, unique_repo, "v1", img)
    assert digest == img.manifest_digest

    s = new_session()
    for ref in ("v1", str(img.manifest_digest)):
        r = get_manifest(registry.host, unique_repo, ref, session=s)
        assert r.status_code == 200
        assert r.headers["Docker-Content-Digest"] == str(img.manifest_digest)
        assert r.headers["Content-Type"] == img.manifest_media_type
        assert r.content == img.manifest
    for desc, blob in [(img.config_descriptor, img.config), *zip(img.layer_descriptors, img.layers)]:
        r = get_blob(registry.host, unique_repo, desc.digest, session=s)
        assert r.status_code == 200 and r.content == blob
        assert r.headers["Docker-Content-Digest"] == str(desc.digest)
        head = get_blob(registry.host, unique_repo, desc.digest, session=s, method="HEAD")
        assert int(head.headers["Content-Length"]) == desc.size
    # ranges are served (the pull code may rely on them)
    d = img.layer_descriptors[1].digest
    r = get_blob(registry.host, unique_repo, d, session=s, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == img.layers[1][10:20]
    tags = s.get(f"{registry.url}/v2/{unique_repo}/tags/list").json()
    assert tags == {"name": unique_repo, "tags": ["v1"]}


def test_push_by_digest_chunked_and_delete(registry, unique_repo):
    img = small_image("chunked", compression=["zstd", None])
    push_image(registry.host, unique_repo, None, img, chunk_size=700)
    r = get_manifest(registry.host, unique_repo, str(img.manifest_digest))
    assert r.status_code == 200 and r.content == img.manifest
    assert get_blob(registry.host, unique_repo, img.layer_descriptors[0].digest).content == img.layers[0]
    r = new_session().delete(f"{registry.url}/v2/{unique_repo}/manifests/{img.manifest_digest}")
    assert r.status_code == 202  # storage.delete.enabled
    assert get_manifest(registry.host, unique_repo, str(img.manifest_digest)).status_code == 404


@pytest.mark.parametrize("docker", [False, True])
def test_push_multi_platform_index(registry, unique_repo, docker):
    amd = small_image("amd", docker=docker)
    arm = small_image("arm", docker=docker, platform=oci.Platform("linux", "arm64", "v8"))
    idx = build_index([(amd, amd.platform), (arm, arm.platform)], docker=docker)
    assert push_index(registry.host, unique_repo, "multi", idx, [amd, arm]) == idx.digest
    r = get_manifest(registry.host, unique_repo, "multi")
    assert r.status_code == 200 and r.content == idx.raw
    assert r.headers["Content-Type"] == idx.media_type
    assert r.headers["Docker-Content-Digest"] == str(idx.digest)
    parsed = oci.parse_manifest(r.content, r.headers["Content-Type"], expected=idx.digest)
    want = parsed.select(oci.Platform("linux", "arm64"))
    r = get_manifest(registry.host, unique_repo, str(want.digest))
    assert r.content == arm.manifest


def test_fresh_registry_from_factory_stops(registry_factory):
    reg = registry_factory.plain()
    assert new_session().get(reg.url + "/v2/").status_code == 200
    assert "listening on 127.0.0.1" in reg.log_text()
    reg.stop()
    assert not reg.running
    with pytest.raises(requests.ConnectionError):
        new_session().get(reg.url + "/v2/", timeout=2)


def test_tls_registry(registry_factory, tmp_path, unique_repo):
    cert, key = write_tls_cert(tmp_path)
    reg = registry_factory.plain(config_overrides={"http": {"tls": {"certificate": str(cert), "key": str(key)}}})
    assert reg.url.startswith("https://")
    s = new_session()
    s.verify = str(cert)
    img = small_image("tls")
    push_image(reg.host, unique_repo, "v1", img, session=s, scheme="https")
    r = get_manifest(reg.host, unique_repo, "v1", session=s, scheme="https")
    assert r.status_code == 200 and r.content == img.manifest
    with pytest.raises(requests.exceptions.SSLError):
        new_session().get(reg.url + "/v2/", timeout=5)


# --- basic auth --------------------------------------------------------------

def test_basic_auth_registry(registry_basic, unique_repo):
    s = new_session()
    r = s.get(registry_basic.url + "/v2/")
    assert r.status_code == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "basic" and params["realm"] == registry_basic.realm
    assert s.get(registry_basic.url + "/v2/", auth=(registry_basic.username, "wrong")).status_code == 401
    assert s.get(registry_basic.url + "/v2/", auth=("nobody", registry_basic.password)).status_code == 401
    assert s.get(registry_basic.url + "/v2/", auth=registry_basic.auth).status_code == 200

    img = small_image("basic")
    with pytest.raises(Exception, match="401"):
        push_image(registry_basic.host, unique_repo, "v1", img)
    push_image(registry_basic.host, unique_repo, "v1", img, auth=registry_basic.auth)
    assert get_manifest(registry_basic.host, unique_repo, "v1").status_code == 401
    r = get_manifest(registry_basic.host, unique_repo, "v1", auth=registry_basic.auth)
    assert r.status_code == 200 and r.content == img.manifest


# --- token auth --------------------------------------------------------------

def test_token_flow_end_to_end(registry_token, unique_repo):
    reg, ts = registry_token, registry_token.token_server
    img = small_image("token")
    push_image(reg.host, unique_repo, "v1", img, auth=reg.auth)
    ts.clear_requests()
    s = new_session()

    # 1. anonymous request: 401 with a Bearer challenge naming realm, service and scope
    url = f"{reg.url}/v2/{unique_repo}/manifests/v1"
    accept = {"Accept": img.manifest_media_type}
    r = s.get(url, headers=accept)
    assert r.status_code == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params == {"realm": ts.realm, "service": ts.service, "scope": f"repository:{unique_repo}:pull"}

    # 2. token from the realm, with Basic credentials
    tr = s.get(params["realm"], params={"service": params["service"], "scope": params["scope"]}, auth=reg.auth)
    assert tr.status_code == 200
    doc = tr.json()
    assert doc["expires_in"] == 300 and "issued_at" in doc and "access_token" not in doc
    header, claims = decode_jwt(doc["token"])
    assert header["alg"] == "ES256" and len(header["x5c"]) == 1
    assert claims["iss"] == ts.issuer and claims["aud"] == ts.service and claims["sub"] == reg.username
    assert claims["access"] == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]
    assert claims["exp"] - claims["iat"] == 300

    # 3. retry with the token: 200
    r = s.get(url, headers={**accept, "Authorization": f"Bearer {doc['token']}"})
    assert r.status_code == 200 and r.content == img.manifest

    (rec,) = ts.requests
    assert rec.username == reg.username and rec.authenticated
    assert rec.scopes == [f"repository:{unique_repo}:pull"] and rec.service == ts.service
    assert rec.authorization.startswith("Basic ")


def test_token_wrong_password_and_anonymous_denied(registry_token, unique_repo):
    reg, ts = registry_token, registry_token.token_server
    push_image(reg.host, unique_repo, "v1", small_image("private"), auth=reg.auth)
    s = new_session()
    q = {"service": ts.service, "scope": f"repository:{unique_repo}:pull"}

    r = s.get(ts.realm, params=q, auth=(reg.username, "wrong-password"))
    assert r.status_code == 401 and "token" not in r.json()
    r = s.get(ts.realm, params=q, auth=("mallory", reg.password))
    assert r.status_code == 401

    # anonymous: a token without access; the registry then refuses with insufficient_scope
    r = s.get(ts.realm, params=q)
    assert r.status_code == 200
    token = r.json()["token"]
    assert decode_jwt(token)[1]["access"] == []
    r = s.get(f"{reg.url}/v2/{unique_repo}/manifests/v1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert get_manifest(reg.host, unique_repo, "v1", auth=RegistryAuth()).status_code == 401
    assert ts.requests[-1].authorization is None and ts.requests[-1].access == []

    ts.allow_anonymous = False
    assert s.get(ts.realm, params=q).status_code == 401


def test_token_public_repo_anonymous_pull_only(registry_token, unique_repo):
    reg, ts = registry_token, registry_token.token_server
    img = small_image("public")
    push_image(reg.host, unique_repo, "v1", img, auth=reg.auth)
    ts.public_repos = [unique_repo.split("/")[0] + "/*"]
    ts.clear_requests()

    anon = RegistryAuth()
    r = get_manifest(reg.host, unique_repo, "v1", auth=anon)
    assert r.status_code == 200 and r.content == img.manifest
    (rec,) = ts.requests
    assert rec.authorization is None and rec.username is None
    assert rec.access == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]

    # push needs pull,push: anonymous gets pull only, and the registry refuses the upload
    r = new_session().post(f"{reg.url}/v2/{unique_repo}/blobs/uploads/", auth=anon)
    assert r.status_code == 401
    (scope,) = ts.requests[-1].scopes  # distribution 2.8 asks for "push,pull" (in that order)
    assert scope.rsplit(":", 1)[0] == f"repository:{unique_repo}"
    assert sorted(scope.rsplit(":", 1)[1].split(",")) == ["pull", "push"]
    assert ts.requests[-1].access == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]


def test_token_response_variants_and_permissions(registry_token, unique_repo):
    reg, ts = registry_token, registry_token.token_server
    img = small_image("variants")
    ts.token_field = "access_token"
    ts.expires_in = None
    push_image(reg.host, unique_repo, "v1", img, auth=reg.auth)
    r = new_session().get(ts.realm, params={"service": ts.service, "scope": f"repository:{unique_repo}:pull"},
                          auth=reg.auth)
    assert set(r.json()) == {"access_token", "issued_at"}

    ts.token_field = "both"
    doc = new_session().get(ts.realm, params={"service": ts.service}, auth=reg.auth).json()
    assert doc["token"] == doc["access_token"] and "expires_in" not in doc

    # per-user permissions: read-only on this repository
    ts.permissions = {reg.username: {unique_repo: ["pull"]}}
    assert get_manifest(reg.host, unique_repo, "v1", auth=reg.auth).status_code == 200
    with pytest.raises(Exception, match="401"):
        push_image(reg.host, unique_repo, "v2", small_image("other"), auth=reg.auth)
    assert ts.requests[-1].access == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]


def test_token_server_oauth_post_refresh_and_failures(registry_token):
    ts = registry_token.token_server
    s = new_session()
    scope = "repository:some/repo:pull"
    r = s.post(ts.realm, data={"grant_type": "password", "username": registry_token.username,
                               "password": registry_token.password, "service": ts.service,
                               "scope": scope, "access_type": "offline", "client_id": "layerfs"})
    assert r.status_code == 200
    doc = r.json()
    assert doc["scope"] == scope and "refresh_token" in doc and "token" not in doc
    r = s.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": doc["refresh_token"],
                               "service": ts.service, "scope": scope})
    assert r.status_code == 200 and decode_jwt(r.json()["access_token"])[1]["sub"] == registry_token.username
    assert s.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": "nope"}).status_code == 401
    assert s.post(ts.realm, data={"grant_type": "password", "username": "x", "password": "y"}).status_code == 401

    ts.fail_next(2, status=503)
    assert [s.get(ts.realm).status_code for _ in range(3)] == [503, 503, 200]
    assert [rec.status for rec in ts.requests[-3:]] == [503, 503, 200]


def _forge(ts, **kwargs) -> str:
    return ts.issue("alice", [{"type": "repository", "name": "forge/test", "actions": ["pull"]}], **kwargs)


@pytest.mark.parametrize("case, ok", [
    ("valid", True),
    ("wrong_issuer", False),
    ("wrong_audience", False),
    ("audience_list", False),       # 2.8 unmarshals "aud" into a string: a JSON list is a malformed token
    ("expired_within_leeway", True),  # 60 s leeway on exp and nbf
    ("expired", False),
    ("not_yet_valid", False),
    ("untrusted_key", False),
    ("no_x5c", False),              # no x5c, jwk or kid: no signing key
    ("bad_signature", False),
    ("star_action", True),          # "*" in the token covers every action
])
def test_what_distribution_verifies_in_tokens(registry_token, case, ok):
    reg, ts = registry_token, registry_token.token_server
    if case == "valid" or case == "bad_signature":
        token = _forge(ts)
        if case == "bad_signature":
            head, claims, sig = token.split(".")
            raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
            raw[0] ^= 0xFF
            token = f"{head}.{claims}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"
    elif case == "wrong_issuer":
        token = _forge(ts, issuer="someone-else")
    elif case == "wrong_audience":
        token = _forge(ts, audience="other-registry")
    elif case == "audience_list":
        token = _forge(ts, audience=[ts.service])  # type: ignore[arg-type]
    elif case == "expired_within_leeway":
        token = _forge(ts, issued_at=time.time() - 100, lifetime=70)
    elif case == "expired":
        token = _forge(ts, issued_at=time.time() - 300, lifetime=60)
    elif case == "not_yet_valid":
        token = _forge(ts, not_before=time.time() + 300)
    elif case == "untrusted_key":
        token = _forge(ts, untrusted=True)
    elif case == "no_x5c":
        token = _forge(ts, include_x5c=False)
    elif case == "star_action":
        token = ts.issue("alice", [{"type": "repository", "name": "forge/test", "actions": ["*"]}])
    r = new_session().get(f"{reg.url}/v2/forge/test/tags/list", headers={"Authorization": f"Bearer {token}"})
    if ok:
        assert r.status_code == 404, r.text  # authorized; the repository just does not exist
    else:
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_credentials_only_go_to_the_token_server(registry_token, fault_proxy_factory, unique_repo):
    reg, ts = registry_token, registry_token.token_server
    proxy = fault_proxy_factory(reg)
    auth = RegistryAuth(*reg.auth)
    img = small_image("leak")
    push_image(proxy.host, unique_repo, "v1", img, auth=auth)
    assert get_manifest(proxy.host, unique_repo, "v1", auth=auth).content == img.manifest
    seen = [r.header("Authorization") for r in proxy.requests]
    assert seen[0] is None and all(h is None or h.startswith("Bearer ") for h in seen)
    assert reg.password not in json.dumps([r.headers for r in proxy.requests])
    assert ts.requests and all(r.authorization and r.authorization.startswith("Basic ") for r in ts.requests)
    assert auth.token_requests == len(ts.requests)


def test_rsa_signed_tokens_work_too(registry_factory, unique_repo):
    reg = registry_factory.token(key_kind="rsa", token_field="access_token", users={"bob": "pw"})
    img = small_image("rsa")
    push_image(reg.host, unique_repo, "v1", img, auth=("bob", "pw"))
    r = get_manifest(reg.host, unique_repo, "v1", auth=("bob", "pw"))
    assert r.status_code == 200 and r.content == img.manifest
    assert decode_jwt(reg.token_server.requests[-1].token)[0]["alg"] == "RS256"


# --- fault proxy -------------------------------------------------------------

@pytest.fixture
def pushed(registry, unique_repo):
    img = small_image("proxy", compression=None)
    push_image(registry.host, unique_repo, "v1", img)
    return unique_repo, img


def test_proxy_forwards_transparently_and_records(fault_proxy, pushed):
    repo, img = pushed
    s = new_session()
    r = get_manifest(fault_proxy.host, repo, "v1", session=s)
    assert r.status_code == 200 and r.content == img.manifest
    d = img.layer_descriptors[1].digest
    r = get_blob(fault_proxy.host, repo, d, session=s, headers={"Range": "bytes=100-199", "X-Probe": "1"})
    assert r.status_code == 206 and r.content == img.layers[1][100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(img.layers[1])}"
    rec = fault_proxy.requests[-1]
    assert rec.header("range") == "bytes=100-199" and rec.header("X-Probe") == "1"
    assert rec.status == 206 and rec.bytes_sent == 100 and rec.fault is None
    assert fault_proxy.count(r"/blobs/") == 1 and fault_proxy.count(method="GET") == 2
    assert fault_proxy.counts[f"/v2/{repo}/manifests/v1"] == 1
    # pushing through the proxy: the registry's upload Location points back at the proxy
    other = small_image("via-proxy")
    push_image(fault_proxy.host, repo, "v2", other, session=s)
    assert fault_proxy.count(r"/blobs/uploads/", method="PUT") == 3


def test_proxy_cuts_blob_responses_k_times(fault_proxy, pushed):
    repo, img = pushed
    blob, d = img.layers[1], img.layer_descriptors[1].digest
    rule = fault_proxy.cut(rf"/blobs/{d}", after_bytes=1000, times=2)
    s = new_session()
    for _ in range(2):
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            get_blob(fault_proxy.host, repo, d, session=s)
    # streamed: exactly 1000 bytes arrive, then the connection closes
    fault_proxy.clear_rules()
    fault_proxy.cut(rf"/blobs/{d}", after_bytes=1000, times=1)
    with socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=10) as sock:
        sock.sendall(f"GET /v2/{repo}/blobs/{d} HTTP/1.1\r\nHost: {fault_proxy.host}\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(blob)}".encode() in head
    assert body == blob[:1000]
    assert rule.hits == 2 and rule.exhausted
    r = get_blob(fault_proxy.host, repo, d, session=s)
    assert r.status_code == 200 and r.content == blob
    assert [x.fault for x in fault_proxy.requests] == ["cut", "cut", "cut", None]


def test_proxy_throttles_and_fails_k_times(fault_proxy, pushed):
    repo, img = pushed
    s = new_session()
    fault_proxy.throttle(r"/manifests/", retry_after=2, times=1)
    fault_proxy.fail(r"/manifests/", 503, times=2)
    fault_proxy.fail(r"/blobs/", 500, times=1, method="HEAD")
    r = get_manifest(fault_proxy.host, repo, "v1", session=s)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    statuses = [get_manifest(fault_proxy.host, repo, "v1", session=s).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    d = img.config_descriptor.digest
    assert get_blob(fault_proxy.host, repo, d, session=s, method="HEAD").status_code == 500
    assert get_blob(fault_proxy.host, repo, d, session=s, method="HEAD").status_code == 200
    assert get_blob(fault_proxy.host, repo, d, session=s).status_code == 200
    assert fault_proxy.count(r"/manifests/") == 4
    assert [r.status for r in fault_proxy.requests] == [429, 503, 503, 200, 500, 200, 200]


def test_proxy_delay_and_drop(fault_proxy, pushed):
    repo, _ = pushed
    s = new_session()
    fault_proxy.delay(r"/manifests/", 0.3, times=1)
    t0 = time.monotonic()
    assert get_manifest(fault_proxy.host, repo, "v1", session=s).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    assert get_manifest(fault_proxy.host, repo, "v1", session=s).status_code == 200
    assert time.monotonic() - t0 < 0.3
    fault_proxy.drop(r"/manifests/", times=1)
    with pytest.raises(requests.ConnectionError):
        get_manifest(fault_proxy.host, repo, "v1", session=s)
    assert get_manifest(fault_proxy.host, repo, "v1", session=s).status_code == 200


def test_proxy_stops_cleanly_with_open_connections(fault_proxy_factory, registry, pushed):
    repo, _ = pushed
    proxy = fault_proxy_factory(registry)
    proxy.delay(r"/manifests/", 30)
    # an idle keep-alive connection and a request stuck in a long delay
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    errors: list[BaseException] = []

    def stuck() -> None:
        try:
            get_manifest(proxy.host, repo, "v1")
        except BaseException as e:  # the connection is closed by stop()
            errors.append(e)

    port = proxy.port
    t = threading.Thread(target=stuck)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    proxy.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert errors and isinstance(errors[0], requests.ConnectionError)
    assert not [th for th in threading.enumerate() if th.name.startswith("fault-proxy")]
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- independent producers ---------------------------------------------------

def test_umoci_image_pushed_by_skopeo(umoci_layout, registry, unique_repo):
    digest = skopeo_push(umoci_layout, registry.host, f"{unique_repo}:latest")
    s = new_session()
    r = get_manifest(registry.host, unique_repo, "latest", session=s)
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == str(digest)
    m = oci.parse_manifest(r.content, r.headers["Content-Type"], expected=digest)
    assert m.media_type == oci.OCI_MANIFEST and len(m.layers) == UMOCI_EXPECTED["layers"]

    cfg = oci.ImageConfig.parse(get_blob(registry.host, unique_repo, m.config.digest, session=s).content)
    assert cfg.doc["config"]["Env"] == UMOCI_EXPECTED["env"] and cfg.doc["config"]["Cmd"] == UMOCI_EXPECTED["cmd"]
    tars = []
    for desc, diff_id in zip(m.layers, cfg.diff_ids):
        blob = get_blob(registry.host, unique_repo, desc.digest, session=s).content
        assert oci.Digest.of(blob) == desc.digest
        tar = gzip.decompress(blob)
        assert oci.Digest.of(tar) == diff_id
        tars.append(layer_names(tar))
    first, second = tars
    assert first["etc/link"].issym() and first["etc/link"].linkname == "hello.txt"
    assert first["bin/tool"].mode & 0o777 == 0o755
    assert first["var/empty"].isdir()
    assert "data/old.txt" in first and "data/.wh.old.txt" in second
    assert second["usr/bin/abs"].linkname == "/bin/tool"
    links = [(n, t.linkname.removeprefix("./")) for n, t in second.items() if t.islnk()]
    assert len(links) == 1 and set(links[0]) == set(UMOCI_EXPECTED["hardlinks"][0])


def test_umoci_image_as_docker_v2s2(umoci_layout, registry, unique_repo):
    digest = skopeo_push(umoci_layout, registry.host, f"{unique_repo}:v2s2", format="v2s2")
    r = get_manifest(registry.host, unique_repo, "v2s2")
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == str(digest)
    m = oci.parse_manifest(r.content, r.headers["Content-Type"])
    assert m.media_type == oci.DOCKER_MANIFEST
    assert m.config.media_type == oci.DOCKER_CONFIG
    assert {d.media_type for d in m.layers} == {oci.DOCKER_LAYER_GZIP}


def test_skopeo_accepts_built_images_unchanged(tmp_path, registry, unique_repo):
    img = small_image("skopeo", compression=["gzip", "zstd"])
    layout = write_oci_layout(tmp_path / "layout", img, ref_name="built")
    digest = skopeo_push(f"oci:{layout}:built", registry.host, f"{unique_repo}:built")
    assert digest == img.manifest_digest
    assert get_manifest(registry.host, unique_repo, "built").content == img.manifest


# --- prerequisites -----------------------------------------------------------

def test_missing_prerequisite_skips_locally_and_fails_on_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_binary("layerfs-no-such-program")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("layerfs-no-such-program")
    with pytest.raises(pytest.fail.Exception):
        missing_prerequisite("anything")
    assert require_binary("sh").endswith("/sh")
