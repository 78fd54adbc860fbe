"""`layerfs push` against a real registry: cross-repository mounts, existing blobs, monolithic and
chunked uploads, token scopes, retries, and images that come back bit-identical through skopeo."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from clirun import run_cli as run
from layerfs.changes import CommitOptions, commit
from imagebuild import LayerBuilder, build_image
from layerfs.image import Digest
from layerfs.mount import resolve_target
from layerfs.store import REPO_DIGEST_ANNOTATION
from layerfs.transfer import PullOptions, Puller
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryOptions
from layerfs.store import Store
from layerfs.fs import open_image_tree
from prereqs import require_binary
from registryclient import push_image


def layers(n: int = 2, size: int = 3000) -> list[bytes]:
    out = []
    for i in range(n):
        b = LayerBuilder()
        b.add_dir(f"d{i}").add_file(f"d{i}/rand", os.urandom(size)).add_file(f"d{i}/text", b"t" * 500)
        out.append(b.build())
    return out


@pytest.fixture
def store_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("LAYERFS_ROOT", str(root))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.02")
    return root


def skopeo_dir(src: str, dest: Path, creds: tuple[str, str] | None = None) -> dict:
    """``skopeo copy docker://SRC dir:DEST`` (bytes kept as served); returns {"manifest": bytes, digest: bytes}."""
    skopeo = require_binary("skopeo")
    args = [skopeo, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
    args += ["--src-creds", f"{creds[0]}:{creds[1]}"] if creds else ["--src-no-creds"]
    proc = subprocess.run([*args, f"docker://{src}", f"dir:{dest}"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    assert proc.returncode == 0, proc.stderr
    out = {"manifest": (dest / "manifest.json").read_bytes()}
    for p in dest.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", p.name):
            out[Digest("sha256", p.name)] = p.read_bytes()
    return out


def uploads(proxy) -> list:
    return [r for r in proxy.requests if "/blobs/uploads/" in r.path]


def test_push_pulled_docker_image_to_new_repo_mounts_and_keeps_bytes(registry, fault_proxy, unique_repo,
                                                                      store_root, capsys, tmp_path):
    img = build_image(layers(2), docker=True)
    push_image(registry.host, unique_repo, "v1", img)
    src = f"{fault_proxy.host}/{unique_repo}:v1"
    code, out, err = run(["pull", "-q", src], capsys)
    assert code == 0, err
    dest_repo = unique_repo + "-copy"
    fault_proxy.reset()
    code, out, err = run(["push", src, f"{fault_proxy.host}/{dest_repo}:v2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"The push refers to repository [{fault_proxy.host}/{dest_repo}]"
    shorts = [d.digest.short for d in img.layer_descriptors]
    assert lines[1:3] == [f"{s}: Preparing" for s in reversed(shorts)]        # top layer first, as docker
    for s in shorts:
        assert f"{s}: Mounted from {unique_repo}" in lines
    assert lines[-1] == f"v2: digest: {img.manifest_digest} size: {len(img.manifest)}"
    # every blob (layers and config) came by cross-repository mount, none uploaded
    posts = [r for r in uploads(fault_proxy) if r.method == "POST"]
    assert len(posts) == 3 and all(r.status == 201 for r in posts)
    for r in posts:
        q = parse_qs(r.query)
        assert q["from"] == [unique_repo] and Digest.parse(q["mount"][0]) in img.blobs
    assert not [r for r in uploads(fault_proxy) if r.method in ("PUT", "PATCH")]
    put = [r for r in fault_proxy.requests if r.method == "PUT" and "/manifests/" in r.path]
    assert len(put) == 1 and put[0].header("Content-Type") == img.manifest_media_type
    # pulled back by skopeo: the registry's original Docker schema2 bytes, the same digest, the same blobs
    got = skopeo_dir(f"{registry.host}/{dest_repo}:v2", tmp_path / "back")
    assert got["manifest"] == img.manifest
    for d, data in img.blobs.items():
        if d != img.manifest_digest:
            assert got[d] == data
    # the store now knows the pushed name by the registry's digest
    st = Store(store_root)
    rec = st.find(Reference.parse(f"{fault_proxy.host}/{dest_repo}:v2"))
    assert rec.descriptor.annotations[REPO_DIGEST_ANNOTATION] == str(img.manifest_digest)

    # a second push finds everything there: HEAD only, no upload
    fault_proxy.reset()
    code, out, err = run(["push", f"{fault_proxy.host}/{dest_repo}:v2"], capsys)
    assert code == 0, err
    assert all(f"{s}: Layer already exists" in out for s in shorts)
    assert not uploads(fault_proxy)
    assert {r.method for r in fault_proxy.requests if "/blobs/" in r.path} == {"HEAD"}


def test_push_local_image_monolithic_then_quiet(registry, fault_proxy, unique_repo, store_root, capsys, tmp_path):
    img = build_image(layers(2))
    st = Store(store_root).init()
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    name = f"{fault_proxy.host}/{unique_repo}:v1"
    st.tag(name, img.manifest_descriptor)                      # only tagged locally: nothing to mount from
    code, out, err = run(["push", name], capsys)
    assert code == 0, err
    for d in img.layer_descriptors:
        assert f"{d.digest.short}: Pushed" in out
    assert "Pushing" not in out                               # no progress bars off a terminal
    ups = uploads(fault_proxy)
    assert [r.method for r in ups].count("POST") == 3 and [r.method for r in ups].count("PUT") == 3
    assert not [r for r in ups if r.method == "PATCH"]
    for r in ups:
        if r.method == "PUT":
            assert Digest.parse(parse_qs(r.query)["digest"][0]) in img.blobs and r.status == 201
    got = skopeo_dir(f"{registry.host}/{unique_repo}:v1", tmp_path / "back")
    assert got["manifest"] == img.manifest and all(got[d.digest] == img.blobs[d.digest] for d in img.layer_descriptors)
    code, out, err = run(["push", "-q", name, f"{fault_proxy.host}/{unique_repo}:v2"], capsys)
    assert (code, out) == (0, f"{fault_proxy.host}/{unique_repo}:v2\n")


def test_commit_then_chunked_push_pulls_back_identical(registry, fault_proxy, unique_repo, store_root, capsys,
                                                       tmp_path):
    img = build_image(layers(1))
    push_image(registry.host, unique_repo, "base", img)
    base = f"{fault_proxy.host}/{unique_repo}:base"
    assert run(["pull", "-q", base], capsys)[0] == 0
    up = tmp_path / "upper"
    (up / "big").mkdir(parents=True)
    (up / "big/random").write_bytes(os.urandom(300_000))      # does not compress: > 3 chunks
    (up / "d0").mkdir()
    (up / "d0/.wh.text").write_bytes(b"")
    st = Store(store_root)
    new = f"{fault_proxy.host}/{unique_repo}:patched"
    result = commit(st, resolve_target(st, str(up), image=base), new, CommitOptions(message="big file"))
    layer = result.layer.descriptor
    assert layer.size > 300_000
    fault_proxy.reset()
    code, out, err = run(["push", "--chunk-threshold", "64k", "--chunk-size", "100000", new], capsys)
    assert code == 0, err
    assert f"{layer.digest.short}: Pushed" in out
    assert f"{img.layer_descriptors[0].digest.short}: Mounted from {unique_repo}" not in out   # same repo: exists
    assert f"{img.layer_descriptors[0].digest.short}: Layer already exists" in out
    patches = [r for r in uploads(fault_proxy) if r.method == "PATCH"]
    ranges = [r.header("Content-Range") for r in patches]
    want, off = [], 0
    while off < layer.size:
        end = min(off + 100_000, layer.size) - 1
        want.append(f"{off}-{end}")
        off = end + 1
    assert ranges == want and all(r.status == 202 for r in patches)
    final = [r for r in uploads(fault_proxy) if r.method == "PUT"]
    # the layer closes with an empty PUT ?digest=, the (small) config goes up monolithically
    assert len(final) == 2 and all(r.status == 201 for r in final)
    got = skopeo_dir(f"{registry.host}/{unique_repo}:patched", tmp_path / "back")
    m = result.manifest
    assert got["manifest"] == m.raw
    assert got[layer.digest] == st.read_blob(layer.digest) and got[m.config.digest] == st.read_blob(m.config.digest)
    # and layerfs pulls it into a fresh store as the same image with the same tree
    fresh = Store(tmp_path / "fresh")
    res = Puller(fresh, PullOptions(registry=RegistryOptions())).pull(Reference.parse(f"{registry.host}/{unique_repo}:patched"))
    assert res.manifest.digest == m.digest
    a = {p: (n.mode, n.size) for p, n in open_image_tree(fresh, res.manifest).walk()}
    b = {p: (n.mode, n.size) for p, n in open_image_tree(st, m).walk()}
    assert a == b and "big/random" in a and "d0/text" not in a


def test_token_auth_scopes_and_mount(registry_token, unique_repo, store_root, capsys, tmp_path):
    ts = registry_token.token_server
    img = build_image(layers(2))
    push_image(registry_token.host, unique_repo, "v1", img, auth=registry_token.auth)
    src = f"{registry_token.host}/{unique_repo}:v1"
    dest_repo = unique_repo + "-push"
    ts.public_repos = [unique_repo]
    assert run(["pull", "-q", src], capsys)[0] == 0
    # anonymous: no push scope granted, one clear line
    code, out, err = run(["push", src, f"{registry_token.host}/{dest_repo}:v1"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("layerfs: error: ")
    assert "denied" in err or "authentication" in err
    (tmp_path / "docker-config").mkdir(exist_ok=True)
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps({"auths": {registry_token.host: {
        "auth": base64.b64encode(f"{registry_token.username}:{registry_token.password}".encode()).decode()}}}))
    ts.clear_requests()
    code, out, err = run(["push", src, f"{registry_token.host}/{dest_repo}:v1"], capsys)
    assert code == 0, err
    for d in img.layer_descriptors:
        assert f"{d.digest.short}: Mounted from {unique_repo}" in out
    scopes = [set(r.query.get("scope", [])) for r in ts.requests]
    push_scope, src_pull = f"repository:{dest_repo}:push,pull", f"repository:{unique_repo}:pull"
    assert all(push_scope in s for s in scopes), scopes
    assert any(src_pull in s for s in scopes)            # the mount: pull on the source repository too
    assert all(r.authorization and r.authorization.startswith("Basic ") for r in ts.requests)
    got = skopeo_dir(f"{registry_token.host}/{dest_repo}:v1", tmp_path / "back", creds=registry_token.auth)
    assert got["manifest"] == img.manifest


def test_push_retries_temporary_failures(registry, fault_proxy, unique_repo, store_root, capsys, tmp_path):
    img = build_image(layers(1))
    st = Store(store_root).init()
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    name = f"{fault_proxy.host}/{unique_repo}:v1"
    st.tag(name, img.manifest_descriptor)
    fault_proxy.fail(r"/blobs/uploads/.", 503, times=1, method="PUT")     # the first blob upload's close
    fault_proxy.drop(r"/blobs/uploads/$", times=1, method="POST")         # a connection dropped
    fault_proxy.fail(r"/manifests/", 500, times=1, method="PUT")
    code, out, err = run(["push", name], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == f"v1: digest: {img.manifest_digest} size: {len(img.manifest)}"
    assert all(r.hits == 1 for r in fault_proxy.rules)
    got = skopeo_dir(f"{registry.host}/{unique_repo}:v1", tmp_path / "back")
    assert got["manifest"] == img.manifest and got[img.layer_descriptors[0].digest] == img.layers[0]
    # a registry that keeps failing: bounded retries, then one line naming it
    fault_proxy.reset()
    fault_proxy.fail(r"/manifests/", 503, times=None, method="PUT")
    code, out, err = run(["push", name, f"{fault_proxy.host}/{unique_repo}:v2"], capsys)
    assert code == 1 and fault_proxy.host in err and err.count("\n") == 1
    assert 2 <= fault_proxy.count(r"/manifests/", "PUT") <= 6


def test_push_errors(store_root, capsys, registry, unique_repo):
    code, out, err = run(["push", "localhost/nothing:1"], capsys)
    assert code == 1 and "no such image" in err and err.count("\n") == 1
    img = build_image(layers(1))
    st = Store(store_root).init()
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(f"{registry.host}/{unique_repo}:v1", img.manifest_descriptor)
    code, out, err = run(["push", f"{registry.host}/{unique_repo}:v1", "Not/Valid"], capsys)
    assert code == 2 and "invalid reference" in err
    code, out, err = run(["push", img.manifest_descriptor.digest.hex[:12]], capsys)
    assert code == 2 and "say where to push it" in err
    code, out, err = run(["push", f"{registry.host}/{unique_repo}:v1", f"127.0.0.1:9/{unique_repo}:v1"], capsys)
    assert code == 1 and "127.0.0.1:9" in err and "cannot reach" in err and err.count("\n") == 1
    # a blob the store lost: HEAD says the registry lacks it, reading it fails clearly
    os.chmod(st.blob_path(img.layer_descriptors[0].digest), 0o644)
    st.blob_path(img.layer_descriptors[0].digest).write_bytes(b"corrupt")
    code, out, err = run(["push", f"{registry.host}/{unique_repo}:v1"], capsys)
    assert code == 1 and "layerfs: error:" in err and ("digest" in err or "bytes" in err)


def test_push_api_options_and_result(registry, unique_repo, store_root):
    img = build_image(layers(1, size=200_000))
    st = Store(store_root).init()
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(f"{registry.host}/{unique_repo}:v1", img.manifest_descriptor)
    seen = []
    res = Pusher(st, PushOptions(registry=RegistryOptions(), chunk_threshold=0, chunk_size=65536),
                 lambda layer, status, cur=None, total=None: seen.append((layer, status, cur))).push(
        f"{registry.host}/{unique_repo}:v1")
    assert res.digest == img.manifest_digest and res.media_type == img.manifest_media_type
    short = img.layer_descriptors[0].digest.short
    pushing = [c for l, s, c in seen if s == "Pushing" and l == short]
    assert pushing == sorted(pushing) and pushing[-1] == img.layer_descriptors[0].size and len(pushing) >= 3
    assert (short, "Pushed", None) in seen
    with pytest.raises(Exception, match="chunk size"):
        PushOptions(chunk_size=0)
