"""Registry mirrors (layerfs.registry.mirrors): the registries.conf-style configuration, and pulls, lazy mounts and
the layer store through a real docker-registry in pull-through (``proxy: remoteurl``) mode in front of the
test registry. FaultProxies in front of the mirror and of the upstream show who was asked for what."""
from __future__ import annotations

import base64
import random
import time
from pathlib import Path

import pytest

from mounthelpers import mount_lazy_read_only, started_mounts, track
from localnet import free_port
from layerfs.cli.main import main
from layerfs.errors import UsageError
from imagebuild import LayerBuilder, build_image
from layerfs.registry import Mirror, load_mirrors, parse_mirrors
from layerfs.mount import mounts as layerfs_mounts
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryOptions
from layerfs.store import Store

BIG = random.Random(5).randbytes(300_000)


# --- the configuration ------------------------------------------------------------------------------

def test_config_follows_registries_conf(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('''
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "mirror.example:5000"
[[registry.mirror]]
location = "10.0.0.7:5000/hub"
insecure = true

[[registry]]
prefix = "docker.io/library/special"
location = "docker.io/library/special"
[[registry.mirror]]
location = "other.example/s"

[[registry]]
location = "quay.io"
''')
    conf = load_mirrors({"LAYERFS_CONFIG": str(cfg)})
    assert conf.registries() == {"docker.io"}                  # quay.io has no mirror
    assert conf.mirrors_for("docker.io", "library/nginx") == [
        (Mirror("mirror.example:5000"), "library/nginx"), (Mirror("10.0.0.7:5000/hub", True), "hub/library/nginx")]
    assert conf.mirrors_for("docker.io", "library/special/x") == [(Mirror("other.example/s"), "s/x")]
    assert conf.mirrors_for("docker.io", "library/specialist")[0] == (Mirror("mirror.example:5000"),
                                                                      "library/specialist")   # whole components
    assert conf.mirrors_for("quay.io", "a/b") == [] and conf.mirrors_for("ghcr.io", "a/b") == []
    # the environment: LAYERFS_MIRRORS comes first; LAYERFS_CONFIG="" means no file
    env = {"LAYERFS_CONFIG": str(cfg), "LAYERFS_MIRRORS": "docker.io=fast.example;quay.io=q1,q2"}
    conf = load_mirrors(env)
    assert [m.location for m, _ in conf.mirrors_for("docker.io", "library/nginx")] == ["fast.example"]
    assert [m.location for m, _ in conf.mirrors_for("quay.io", "a/b")] == ["q1", "q2"]
    assert load_mirrors({"LAYERFS_CONFIG": ""}) is None
    (tmp_path / "xdg" / "layerfs").mkdir(parents=True)
    (tmp_path / "xdg" / "layerfs" / "config.toml").write_text(cfg.read_text())
    assert load_mirrors({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}).registries() == {"docker.io"}


@pytest.mark.parametrize("text, words", [
    ("[[registry]\n", "not valid TOML"),
    ("registry = 3\n", "array of tables"),
    ('[[registry]]\nlocation = "https://x"\n', "registry location like host"),
    ('[[registry]]\nlocation = "x"\n[[registry.mirror]]\nlocation = ""\n', "a mirror of x"),
    ('[[registry]]\nlocation = "x"\n[[registry.mirror]]\nlocation = "m"\ninsecure = "yes"\n', "true or false"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, words):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError) as e:
        load_mirrors({"LAYERFS_CONFIG": str(cfg)})
    assert words in e.value.one_line() and str(cfg) in e.value.one_line() and "\n" not in e.value.one_line()
    with pytest.raises(UsageError, match="PREFIX=MIRROR"):
        load_mirrors({"LAYERFS_CONFIG": "", "LAYERFS_MIRRORS": "docker.io"})
    with pytest.raises(UsageError, match="no such file"):
        load_mirrors({"LAYERFS_CONFIG": str(tmp_path / "missing.toml")})
    assert parse_mirrors({}, "x").rules == ()


# --- a pull-through cache in front of the test registry ----------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory, registry):
    """Push a plain gzip image and its eStargz conversion to the test registry; (repo, {tag: manifest})."""
    root = tmp_path_factory.mktemp("mirror-src") / "store"
    st = Store(root).init()
    a = LayerBuilder().add_dir("etc").add_file("etc/hello", b"hello from upstream\n")
    a.add_dir("data").add_file("data/big", BIG)
    for i in range(20):
        a.add_file(f"data/f{i}", random.Random(i).randbytes(3000))
    img = build_image([a.build()])
    for d, data in img.blobs.items():
        st.put_blob(data, d)
    st.tag(str(Reference.parse("localhost/mirror/src:1")), img.manifest_descriptor)
    assert main(["--root", str(root), "convert", "--estargz", "--chunk-size", "65536", "localhost/mirror/src:1",
                 "localhost/mirror/src:esgz"]) == 0
    repo = "test/mirrored"
    pusher = Pusher(st, PushOptions(registry=RegistryOptions()))
    pusher.push("localhost/mirror/src:1", f"{registry.host}/{repo}:plain")
    pusher.push("localhost/mirror/src:esgz", f"{registry.host}/{repo}:esgz")
    return repo, {"plain": st.resolve("localhost/mirror/src:1")[1], "esgz": st.resolve("localhost/mirror/src:esgz")[1]}


@pytest.fixture
def setup(images, registry, registry_factory, fault_proxy_factory, tmp_path, monkeypatch):
    """(repo, manifests, upstream proxy, mirror proxy, write_config(mirror locations...))."""
    repo, manifests = images
    mirror = registry_factory.plain(config_overrides={"proxy": {"remoteurl": registry.url}})
    up = fault_proxy_factory(registry)        # the upstream as layerfs knows it
    via = fault_proxy_factory(mirror)         # the mirror as layerfs knows it
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.02")
    monkeypatch.delenv("LAYERFS_MIRRORS", raising=False)

    def write_config(*locations: str) -> Path:
        cfg = tmp_path / "config.toml"
        text = f'[[registry]]\nlocation = "{up.host}"\n'
        for loc in locations:
            text += f'[[registry.mirror]]\nlocation = "{loc}"\n'
        cfg.write_text(text)
        monkeypatch.setenv("LAYERFS_CONFIG", str(cfg))
        return cfg
    return repo, manifests, up, via, write_config


def _gets(proxy, manifest, *, ranged: bool | None = None) -> list:
    digests = {str(d.digest) for d in manifest.layers}
    return [r for r in proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in digests
            and (ranged is None or bool(r.header("Range")) == ranged)]


def test_pull_goes_through_the_mirror(setup, tmp_path):
    repo, manifests, up, via, write_config = setup
    write_config(via.host)
    assert main(["--root", str(tmp_path / "root"), "pull", f"{up.host}/{repo}:plain"]) == 0
    assert up.requests == []                                       # the upstream was never asked
    assert via.count("/manifests/plain") >= 1 and len(_gets(via, manifests["plain"])) == 1
    _, m = Store(tmp_path / "root").resolve(f"{up.host}/{repo}:plain")
    assert m.digest == manifests["plain"].digest


def test_a_dead_mirror_is_skipped_then_the_upstream_answers(setup, tmp_path):
    repo, manifests, up, via, write_config = setup
    write_config(f"127.0.0.1:{free_port()}", via.host)
    t0 = time.monotonic()
    assert main(["--root", str(tmp_path / "a"), "pull", f"{up.host}/{repo}:plain"]) == 0
    assert up.requests == [] and time.monotonic() - t0 < 20
    # a mirror that fails (here: 503 on everything) hands over to the upstream
    write_config(via.host)
    via.fail(".*", 503, times=None)
    assert main(["--root", str(tmp_path / "b"), "pull", f"{up.host}/{repo}:plain"]) == 0
    assert _gets(up, manifests["plain"])


@pytest.mark.timeout(120)
def test_lazy_reads_leave_a_mirror_that_ignores_range(setup, tmp_path, caplog):
    repo, manifests, up, via, write_config = setup
    write_config(via.host)
    m = manifests["esgz"]
    with started_mounts(60) as started:
        mnt = mount_lazy_read_only(Store(tmp_path / "a").init(), f"{up.host}/{repo}:esgz", tmp_path / "mnt",
                                   started)
        assert (mnt / "etc" / "hello").read_bytes() == b"hello from upstream\n"
        assert (mnt / "data" / "big").read_bytes() == BIG
    # the cache had nothing: it answered the first range with the whole blob; the ranges came from upstream
    first = _gets(via, m, ranged=True)
    assert first and first[0].status == 200
    assert _gets(up, m, ranged=True) and not _gets(up, m, ranged=False)
    assert "does not serve ranges of blob" in caplog.text       # the TOC read, before the daemon forked
    # meanwhile the cache fetched the blob: a later mount reads its ranges from the mirror
    up.reset()
    via.reset()
    time.sleep(1)
    with started_mounts(60) as started:
        mnt = mount_lazy_read_only(Store(tmp_path / "b").init(), f"{up.host}/{repo}:esgz", tmp_path / "mnt2",
                                   started)
        assert (mnt / "data" / "f3").read_bytes() == random.Random(3).randbytes(3000)
    assert up.requests == []
    assert all(r.status == 206 for r in _gets(via, m, ranged=True))


@pytest.mark.timeout(120)
def test_the_layer_store_uses_the_mirrors(setup, tmp_path):
    repo, manifests, up, via, write_config = setup
    write_config(via.host)
    m = manifests["esgz"]
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    with started_mounts(60) as started:
        assert main(["--root", str(root), "store", "serve", str(mnt)]) == 0
        rec = next(r for r in layerfs_mounts(Store(root)) if r.mountpoint == str(mnt))
        track(mnt, rec.pid)
        started.append((mnt, rec.pid))
        ref = base64.b64encode(f"{up.host}/{repo}:esgz".encode()).decode()
        diff = mnt / ref / str(m.layers[0].digest) / "diff"
        assert (diff / "etc" / "hello").read_bytes() == b"hello from upstream\n"
    assert via.count("/manifests/esgz") >= 1
    assert not [r for r in up.requests if "/manifests/" in r.path]
