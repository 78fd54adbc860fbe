"""Faults a lazy mount must ride through against a real registry on 127.0.0.1: bearer tokens that
expire while the mount serves, blob redirects to signed URLs that expire, and registries that refuse
HEAD requests. Each read must come back with the right bytes, the mount must go on, and the mount's
log must say at most one plain line per fault. Also the LAYERFS_LAZY default of ``layerfs mount``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lazyimages import DST, FILES, SRC
from mounthelpers import mount_lazy_read_only, require_fuse, track
from faultproxy import FaultProxy
from signedurl import SignedURLServer
from layerfs.registry import Credentials
from layerfs.cli.main import main
from layerfs.lazy import lazy_status
from layerfs.mount import mounts as layerfs_mounts
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import Reference
from layerfs.registry import RegistryClient, RegistryOptions
from layerfs.store import Store

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("client_env")]

WATCHDOG = 40.0


@pytest.fixture
def token_registry(registry_token):
    """The token-auth registry with anonymous pull of test/*; pushes need alice's credentials."""
    registry_token.token_server.public_repos = ["test/*"]
    return registry_token


def _push(st: Store, host: str, repo: str, creds=None) -> str:
    ref = f"{host}/{repo}:v1"
    Pusher(st, PushOptions(registry=RegistryOptions(credentials=creds))).push(DST, ref)
    return ref


def _alice(reg) -> Credentials:
    return Credentials(username=reg.auth[0], password=reg.auth[1])


def _log(store: Store) -> str:
    return Path(layerfs_mounts(store)[0].log).read_text()


def _quiet(log_text: str) -> None:
    """Nothing in the mount's log beyond plain info lines: no traceback, no warning or error."""
    assert "Traceback" not in log_text, log_text
    assert not any(w in log_text for w in ("WARNING", "ERROR", "EIO")), log_text


def _blob_gets(proxy: FaultProxy) -> list:
    return [r for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path]


# --- expired bearer tokens -------------------------------------------------------------------------

def test_expired_token_is_renewed_during_lazy_reads(estargz_store, token_registry, fault_proxy_factory,
                                                    tmp_path, mounts):
    reg, ts = token_registry, token_registry.token_server
    proxy = fault_proxy_factory(reg)
    ref = _push(estargz_store, proxy.host, "test/lazy-token", _alice(reg))
    fresh = Store(tmp_path / "fresh").init()
    mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", mounts)
    assert (mnt / "etc/motd").read_bytes() == b"hello again\n"
    for round_ in range(2):                        # the renewed token expires in its turn
        assert proxy.revoke_tokens() >= 1
        ts.clear_requests()
        proxy.reset()
        name = ("data/f3", "data/f5")[round_]
        assert (mnt / name).read_bytes() == FILES[name]
        reqs = _blob_gets(proxy)
        refused = [r for r in reqs if r.fault == "revoked"]
        served = [r for r in reqs if r.status == 206]
        assert refused and all(r.status == 401 for r in refused)
        assert served and all(r.header("Authorization") not in {x.header("Authorization") for x in refused}
                              for r in served)
        assert len(ts.requests) >= 1                # a fresh token was asked for
    assert (mnt / "data/f0").read_bytes() == FILES["data/f0"]
    _quiet(_log(fresh))


# --- redirects to signed URLs that expire ----------------------------------------------------------

@pytest.fixture
def signed(token_registry, fault_proxy_factory, estargz_store):
    """(proxy in front of the token registry that redirects blob GETs to a SignedURLServer, the server, ref)."""
    proxy = fault_proxy_factory(token_registry)
    with SignedURLServer(token_registry.host) as server:
        ref = _push(estargz_store, proxy.host, "test/lazy-signed", _alice(token_registry))
        proxy.redirect_blobs = server
        yield proxy, server, ref


def _redirects(proxy: FaultProxy) -> list:
    return [r for r in _blob_gets(proxy) if r.status == 307]


def _auth_sent(server: SignedURLServer) -> list:
    return [h for _, headers, _ in server.requests for k, h in headers.items() if k.lower() == "authorization"]


def test_read_range_reuses_a_signed_url_and_renews_it_when_it_expires(signed, estargz_store):
    proxy, server, ref = signed
    r = Reference.parse(ref)
    desc = estargz_store.resolve(DST)[1].layers[0]
    blob = estargz_store.read_blob(desc.digest)
    client = RegistryClient(r.registry, RegistryOptions.from_env())
    spans = [(0, 100), (100, 5000), (desc.size - 51, desc.size), (7, 70_000)]
    # the first signed URL is already expired when it arrives: the registry is asked again, once
    server.dead_on_arrival = 1
    assert client.read_range(r.repository, desc, *spans[0]) == blob[slice(*spans[0])]
    assert len(_redirects(proxy)) == 2 and server.issued == 2
    # later ranges go straight to the remembered URL: no registry round trip
    proxy.reset()
    for a, b in spans[1:]:
        assert client.read_range(r.repository, desc, a, b) == blob[a:b]
    assert _blob_gets(proxy) == [] and server.issued == 2
    # it expires: one 403, one new redirect, and the range is served
    server.expire_all()
    assert client.read_range(r.repository, desc, 10, 20) == blob[10:20]
    assert len(_redirects(proxy)) == 1 and server.issued == 3
    assert [s for _, _, s in server.requests].count(403) == 2
    assert _auth_sent(server) == []               # the registry's token never goes to the storage host
    # signed URLs that expire after each use: every range still comes back right
    server.max_uses = 1
    for a, b in spans:
        assert client.read_range(r.repository, desc, a, b) == blob[a:b]


def test_lazy_mount_rides_through_expiring_signed_urls(signed, tmp_path, mounts):
    proxy, server, ref = signed
    server.max_uses = 1                          # every signed URL expires after its first use
    server.dead_on_arrival = 1
    fresh = Store(tmp_path / "fresh").init()
    mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", mounts)
    for name, data in FILES.items():
        assert (mnt / name).read_bytes() == data
    server.max_uses = None
    server.expire_all()
    assert (mnt / "etc/motd").read_bytes() == b"hello again\n"
    statuses = [s for _, _, s in server.requests]
    assert statuses.count(403) >= 3 and statuses.count(206) >= len(FILES)
    assert _auth_sent(server) == []
    log_text = _log(fresh)
    _quiet(log_text)
    renewals = [ln for ln in log_text.splitlines() if "redirect URL" in ln]
    assert renewals and len(renewals) <= statuses.count(403), log_text
    assert all("HTTP 403" in ln and "asking the registry" in ln for ln in renewals), log_text


# --- registries that refuse HEAD (and would refuse multi-range requests) --------------------------

def test_lazy_mount_never_needs_head_or_multirange(estargz_store, registry, fault_proxy_factory, tmp_path,
                                                  mounts):
    proxy = fault_proxy_factory(registry)
    ref = _push(estargz_store, proxy.host, "test/lazy-nohead")
    proxy.reset()
    proxy.fail(r"^/v2/", 405, method="HEAD", times=None)
    fresh = Store(tmp_path / "fresh").init()
    mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", mounts)
    for name, data in FILES.items():
        assert (mnt / name).read_bytes() == data
    assert (mnt / "etc/motd").read_bytes() == b"hello again\n"
    reqs = proxy.requests
    assert reqs and all(r.method == "GET" for r in reqs)
    ranges = [r.header("Range") for r in _blob_gets(proxy)]
    assert ranges.count(None) == 1                     # the image config, fetched whole
    assert all(rg.startswith("bytes=") and "," not in rg for rg in ranges if rg is not None)   # one range each
    _quiet(_log(fresh))


# --- LAYERFS_LAZY: the default of 'layerfs mount' ------------------------------------------------

def _cli_mount(store: Store, args: list[str], mnt: Path, started) -> object:
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    assert main(["--root", str(store.root), "mount", "--read-only", *args, str(mnt)]) == 0
    rec = next(r for r in layerfs_mounts(store) if r.mountpoint == str(mnt.resolve()))
    track(mnt, rec.pid)
    started.append((mnt, rec.pid))
    return rec


def test_layerfs_lazy_env_mounts_remote_images_lazily_and_no_lazy_pulls(estargz_store, registry,
                                                                       fault_proxy_factory, tmp_path,
                                                                       monkeypatch, mounts):
    proxy = fault_proxy_factory(registry)
    ref = _push(estargz_store, proxy.host, "test/lazy-default")
    layers = estargz_store.resolve(DST)[1].layers
    monkeypatch.setenv("LAYERFS_LAZY", "1")
    # not local: mounted lazily, nothing pulled, and file data is fetched on read
    lazy = Store(tmp_path / "lazy").init()
    rec = _cli_mount(lazy, [ref], tmp_path / "m1", mounts)
    assert lazy_status(lazy, rec) is not None
    assert not any(lazy.has_blob(d.digest, d.size) for d in layers)
    assert (tmp_path / "m1/data/f3").read_bytes() == FILES["data/f3"]
    # --no-lazy: pulled whole, then mounted
    full = Store(tmp_path / "full").init()
    rec = _cli_mount(full, ["--no-lazy", ref], tmp_path / "m2", mounts)
    assert lazy_status(full, rec) is None and all(full.has_blob(d.digest, d.size) for d in layers)
    assert (tmp_path / "m2/data/f3").read_bytes() == FILES["data/f3"]
    # a local image is mounted from the store: the registry is not asked at all
    proxy.reset()
    rec = _cli_mount(full, [ref], tmp_path / "m3", mounts)
    assert lazy_status(full, rec) is None and proxy.requests == []
    assert (tmp_path / "m3/data/f5").read_bytes() == FILES["data/f5"]
    # --lazy still mounts a local image from its registry
    monkeypatch.setenv("LAYERFS_LAZY", "0")
    rec = _cli_mount(full, ["--lazy", ref], tmp_path / "m4", mounts)
    assert lazy_status(full, rec) is not None and proxy.requests


def test_layerfs_lazy_env_refusals_are_one_line(estargz_store, tmp_path, monkeypatch, capsys):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    root = str(estargz_store.root)
    monkeypatch.setenv("LAYERFS_LAZY", "maybe\nnot")
    assert main(["--root", root, "mount", SRC, str(mnt)]) == 2
    err = capsys.readouterr().err
    assert "LAYERFS_LAZY='maybe\\nnot' is neither 1 nor 0" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("LAYERFS_LAZY", "1")
    assert main(["--root", root, "mount", "--prefetch", "all", SRC, str(mnt)]) == 2
    err = capsys.readouterr().err
    assert "is a local image, there is nothing to fetch" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("LAYERFS_LAZY", "0")
    assert main(["--root", root, "mount", "--prefetch", "all", SRC, str(mnt)]) == 2
    assert "--prefetch needs --lazy" in capsys.readouterr().err
    assert list(mnt.iterdir()) == []
