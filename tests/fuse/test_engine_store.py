"""The additional layer store (``layerfs store serve``, layerfs.mount.alstore) for container engines.

Protocol tests drive the FUSE mount with plain file calls, as containers/storage
does (stat of diff/info/blob, creating ``use``, rmdir of the layer directory),
and check the ``diff/`` trees with kernel overlayfs as the oracle. Engine tests
run the real podman 4.3 (runc, a private storage root, a test ``containers.conf``
without default ulimits) against a real registry through a FaultProxy that
logs who fetched which blob. Every podman call has a timeout; teardown removes
containers and images, unmounts the store and kills its daemon.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import require_fuse, track, wait_until
from podman import Podman
from prereqs import require_binary
from layerfs.cli.main import main
from layerfs.transfer import TOC_DIGEST_ANNOTATION
from imagebuild import LayerBuilder, build_image
from layerfs.lazy import served_blobs
from layerfs.mount import mounts as layerfs_mounts
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryOptions
from layerfs.store import Store

WATCHDOG = 100.0
OS_RELEASE = b'PRETTY_NAME="layerfs engine test"\nID=layerfs\n'
PLAIN = "localhost/engine/plain:1"
ESGZ = "localhost/engine/esgz:1"


# --- the test image: a tiny runnable root file system from the host's own binaries ----------------

def _host_file(path: str) -> bytes:
    return Path(os.path.realpath(path)).read_bytes()


def base_layer() -> bytes:
    b = LayerBuilder()
    b.add_dir("usr").add_dir("usr/bin").add_dir("usr/lib").add_dir("usr/lib/x86_64-linux-gnu")
    for src, dst in (("/usr/bin/cat", "usr/bin/cat"), ("/usr/bin/dash", "usr/bin/sh"), ("/usr/bin/rm", "usr/bin/rm"),
                     ("/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
                     ("/lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")):
        b.add_file(dst, _host_file(src), mode=0o755)
    b.add_symlink("bin", "usr/bin").add_symlink("lib", "usr/lib").add_dir("lib64")
    b.add_symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    b.add_dir("etc").add_file("etc/os-release", b"NAME=base\n")
    b.add_dir("old").add_file("old/a", b"a").add_file("gone", b"gone")
    return b.build()


def top_layer() -> bytes:
    b = LayerBuilder(mtime=1_710_000_000)
    b.add_dir("etc").add_file("etc/os-release", OS_RELEASE)
    b.add_whiteout("gone").add_opaque("old").add_file("old/c", b"new c\n")
    return b.build()


def push_test_images(root: Path, host: str, repo: str) -> dict[str, object]:
    """Push the test image as plain gzip and as eStargz to *host*/*repo*; {tag: manifest}."""
    if not Path("/lib64/ld-linux-x86-64.so.2").exists():
        pytest.skip("the test image is made of the host's x86-64 binaries")
    st = Store(root).init()
    img = build_image([base_layer(), top_layer()], config={"Cmd": ["/bin/cat", "/etc/os-release"]})
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(str(Reference.parse(PLAIN)), img.manifest_descriptor)
    assert main(["--root", str(root), "convert", "--estargz", PLAIN, ESGZ]) == 0
    pusher = Pusher(st, PushOptions(registry=RegistryOptions()))
    pusher.push(PLAIN, f"{host}/{repo}:plain")
    pusher.push(ESGZ, f"{host}/{repo}:esgz")
    return {"plain": st.resolve(PLAIN)[1], "esgz": st.resolve(ESGZ)[1]}


@pytest.fixture(scope="module")
def images(tmp_path_factory, registry):
    repo = "test/engine-store"
    return repo, push_test_images(tmp_path_factory.mktemp("engine-src") / "store", registry.host, repo)


@pytest.fixture(autouse=True)
def _env(client_env, monkeypatch):
    monkeypatch.setenv("LAYERFS_INSECURE_REGISTRIES", "127.0.0.1")


def serve_store(root: Path, mnt: Path, started: list, *extra: str) -> int:
    """``layerfs store serve`` (daemonised) at *mnt*; returns the daemon's pid (torn down by *started*)."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    assert main(["--root", str(root), "store", "serve", *extra, str(mnt)]) == 0
    rec = next(r for r in layerfs_mounts(Store(root)) if r.mountpoint == os.path.realpath(mnt))
    track(mnt, rec.pid)
    started.append((mnt, rec.pid))
    return rec.pid


def layer_dir(mnt: Path, ref: str, key: str) -> Path:
    return mnt / base64.b64encode(ref.encode()).decode() / key


def uses(root: Path) -> dict[str, int]:
    try:
        return json.loads((root / "alstore" / "uses.json").read_bytes())
    except FileNotFoundError:
        return {}


def _blob_gets(proxy, manifest, *, by_layerfs: bool) -> list:
    digests = {str(d.digest) for d in manifest.layers}
    return [r for r in proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in digests
            and (r.header("User-Agent") or "").startswith("layerfs/") == by_layerfs]


# --- the protocol -----------------------------------------------------------------------------

def test_layer_directories_follow_the_protocol(images, fault_proxy, tmp_path, mounts, capsys):
    repo, manifests = images
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    serve_store(root, mnt, mounts)
    assert any(r.image == "<layer store>" for r in layerfs_mounts(Store(root)))
    m = manifests["esgz"]
    ref = f"{fault_proxy.host}/{repo}:esgz"
    base, top = (layer_dir(mnt, ref, str(d.digest)) for d in m.layers)
    for d in (base, top):
        assert sorted(os.listdir(d)) == ["blob", "diff", "info"]
    # info: containers/storage's Layer fields
    for d, desc in zip((base, top), m.layers):
        info = json.loads((d / "info").read_bytes())
        assert info["compressed-diff-digest"] == str(desc.digest)
        assert info["compressed-size"] == desc.size and info["compression"] == 2
        assert info["diff-digest"].startswith("sha256:") and info["diff-size"] > 0
        assert info["toc-digest"] == desc.annotations[TOC_DIGEST_ANNOTATION]
    # nothing was downloaded whole: the TOCs by Range only
    gets = _blob_gets(fault_proxy, m, by_layerfs=True)
    assert gets and all(r.header("Range") for r in gets), gets
    # blob: the registry's bytes
    blob = (top / "blob").read_bytes()
    assert len(blob) == m.layers[1].size and "sha256:" + hashlib.sha256(blob).hexdigest() == str(m.layers[1].digest)
    # diff: the layer's own contents as an overlay lower directory
    st = os.lstat(top / "diff" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(top / "diff" / "old", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(top / "diff" / "old")) == ["c"]
    assert (top / "diff" / "etc" / "os-release").read_bytes() == OS_RELEASE
    assert (base / "diff" / "old" / "a").read_bytes() == b"a"
    assert not any(n.startswith(".wh.") for n in os.listdir(top / "diff"))
    # the same layer by its TOC digest (containers/storage >= 1.54)
    by_toc = layer_dir(mnt, ref, m.layers[1].annotations[TOC_DIGEST_ANNOTATION])
    assert (by_toc / "info").read_bytes() == (top / "info").read_bytes()
    assert (by_toc / "diff" / "old" / "c").read_bytes() == b"new c\n"
    # unknown layers and references: ENOENT
    assert not layer_dir(mnt, ref, "sha256:" + "0" * 64).exists()
    assert not layer_dir(mnt, f"{fault_proxy.host}/{repo}:nosuchtag", str(m.layers[0].digest)).exists()
    assert not (mnt / "not base64!").exists() and not layer_dir(mnt, "Not A Reference", str(m.layers[0].digest)).exists()
    assert not (top.parent / "more").exists()
    # use / release: both answer ENOENT and are counted
    digest = str(m.layers[1].digest)
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            open(top / "use", "w")
    assert uses(root)[digest] == 2
    for want in (1, 0):
        with pytest.raises(FileNotFoundError):
            os.rmdir(top)
        assert uses(root).get(digest, 0) == want
    assert (top / "info").is_file()                           # still there for the next engine
    # layerfs mounts: the store, with how much of each layer it holds
    capsys.readouterr()
    assert main(["--root", str(root), "mounts", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out.splitlines()[0])
    assert doc["image"] == "<layer store>" and len(doc["fetched"]) == 2 and 0 < min(doc["fetched"]) < 1


def test_kernel_overlay_of_the_diffs_is_the_image(images, registry, tmp_path, mounts):
    repo, manifests = images
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    serve_store(root, mnt, mounts)
    for tag in ("plain", "esgz"):
        m = manifests[tag]
        ref = f"{registry.host}/{repo}:{tag}"
        lowers = [layer_dir(mnt, ref, str(d.digest)) / "diff" for d in reversed(m.layers)]
        merged = tmp_path / f"merged-{tag}"
        merged.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(str(p).replace(":", "\\:") for p in lowers),
                        str(merged)], check=True, capture_output=True, timeout=30)
        try:
            assert (merged / "etc" / "os-release").read_bytes() == OS_RELEASE
            assert sorted(os.listdir(merged / "old")) == ["c"]
            assert not (merged / "gone").exists()
            assert (merged / "usr" / "bin" / "cat").read_bytes() == _host_file("/usr/bin/cat")
        finally:
            subprocess.run(["umount", str(merged)], capture_output=True, timeout=30)
    # the plain image has no published index: its layers were pulled whole into the store, untagged;
    # prune keeps them while the store serves them
    m = manifests["plain"]
    assert all(Store(root).has_blob(d.digest) for d in m.layers)
    assert {d.digest for d in m.layers} <= served_blobs(Store(root))
    assert main(["--root", str(root), "prune"]) == 0
    assert all(Store(root).has_blob(d.digest) for d in m.layers)
    base = layer_dir(mnt, f"{registry.host}/{repo}:plain", str(m.layers[0].digest))
    assert (base / "diff" / "old" / "a").read_bytes() == b"a"


def test_paths_resolve_again_after_a_restart_and_unused_layers_go(images, registry, tmp_path, mounts):
    repo, manifests = images
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    m = manifests["esgz"]
    ref = f"{registry.host}/{repo}:esgz"
    top = layer_dir(mnt, ref, str(m.layers[1].digest))
    serve_store(root, mnt, mounts, "--grace", "1")
    with pytest.raises(FileNotFoundError):
        open(top / "use", "w")
    info = (top / "info").read_bytes()
    assert main(["--root", str(root), "umount", str(mnt)]) == 0
    serve_store(root, mnt, mounts, "--grace", "1")
    assert (top / "info").read_bytes() == info                 # resolved again
    assert (top / "diff" / "old" / "c").read_bytes() == b"new c\n"
    assert uses(root) == {str(m.layers[1].digest): 1}         # the count survived the restart
    refdir = top.parent
    base = str(m.layers[0].digest)
    assert (refdir / base / "info").is_file()
    # the base layer is used by nobody: dropped after the grace period; the used one stays
    assert wait_until(lambda: base not in os.listdir(refdir), timeout=10, interval=0.5)
    assert str(m.layers[1].digest) in os.listdir(refdir)
    assert (refdir / base / "info").is_file()                  # asked for again: resolved again


# --- podman ----------------------------------------------------------------------------------------

@pytest.fixture
def podman_env(tmp_path):
    made = []

    def make(mnt: Path, host: str) -> Podman:
        require_binary("runc")
        p = Podman(tmp_path / "podman", host, mnt, binary=require_binary("podman"))
        made.append(p)
        return p
    yield make
    for p in made:
        p.cleanup()


@pytest.mark.timeout(240)
def test_podman_runs_a_container_from_the_store(images, fault_proxy, tmp_path, mounts, podman_env):
    repo, manifests = images
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    serve_store(root, mnt, mounts)
    podman = podman_env(mnt, fault_proxy.host)
    for tag in ("esgz", "plain"):
        image = f"{fault_proxy.host}/{repo}:{tag}"
        p = podman("run", "--network", "none", "--name", f"c-{tag}", image, timeout=120)
        assert p.stdout.encode() == OS_RELEASE
        # podman took the layers from the store: it fetched no layer blob itself
        assert _blob_gets(fault_proxy, manifests[tag], by_layerfs=False) == []
        for d in manifests[tag].layers:
            assert uses(root).get(str(d.digest), 0) >= 1
    lazy = _blob_gets(fault_proxy, manifests["esgz"], by_layerfs=True)
    assert lazy and all(r.header("Range") for r in lazy)         # the eStargz image: pieces, never whole
    # a container's changes over the store's layers: diff, commit, rm
    podman("run", "--network", "none", "--name", "writer", f"{fault_proxy.host}/{repo}:esgz",
           "/bin/sh", "-c", "echo hi > /new && rm /old/c && echo more >> /etc/os-release", timeout=120)
    changes = set(podman("diff", "writer").stdout.split("\n"))
    assert {"A /new", "D /old/c", "C /etc/os-release"} <= changes
    podman("commit", "writer", "localhost/committed:1", timeout=120)
    p = podman("run", "--rm", "--network", "none", "localhost/committed:1", "/bin/cat", "/new",
               "/etc/os-release", timeout=120)
    assert p.stdout.encode() == b"hi\n" + OS_RELEASE + b"more\n"
    assert podman("run", "--rm", "--network", "none", "localhost/committed:1", "/bin/cat", "/old/c",
                  check=False, timeout=120).returncode != 0
    podman("rm", "-a", "-f")
    # a restart of the store: podman's links into it resolve again
    assert main(["--root", str(root), "umount", str(mnt)]) == 0
    serve_store(root, mnt, mounts)
    p = podman("run", "--rm", "--network", "none", "localhost/committed:1", "/bin/cat", "/new", timeout=120)
    assert p.stdout == "hi\n"
    # removing the images releases the layers
    podman("rmi", "-a", "-f", timeout=120)
    for tag in ("esgz", "plain"):
        for d in manifests[tag].layers:
            assert uses(root).get(str(d.digest), 0) == 0


@pytest.mark.timeout(240)
def test_a_registry_gone_after_the_first_read_fails_the_read_not_the_engine(registry_factory, tmp_path, mounts,
                                                                               podman_env):
    reg = registry_factory.plain()
    repo = "test/engine-gone"
    manifests = push_test_images(tmp_path / "src", reg.host, repo)
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    serve_store(root, mnt, mounts)
    podman = podman_env(mnt, reg.host)
    image = f"{reg.host}/{repo}:esgz"
    assert podman("run", "--rm", "--network", "none", image, timeout=120).stdout.encode() == OS_RELEASE
    assert uses(root).get(str(manifests["esgz"].layers[0].digest)) == 1
    reg.stop()
    t0 = time.monotonic()
    p = podman("run", "--rm", "--network", "none", image, "/bin/cat", "/old/c", check=False, timeout=120)
    assert p.returncode != 0
    assert "Input/output error" in p.stdout + p.stderr
    assert time.monotonic() - t0 < 60
    # what was read before is still served
    p = podman("run", "--rm", "--network", "none", image, "/bin/cat", "/etc/os-release", timeout=120)
    assert p.stdout.encode() == OS_RELEASE

