"""Hostile registries and malformed images: type confusion, diff_id lies, index loops and fan-out, huge
manifests, and a registry that lies about sizes, digests, ranges and media types, redirects with
credentials, loops its redirects or sends its bodies endlessly or slowly.

Images come from :mod:`layerfs.imagebuild`, the registry is the real one of the session (through a
:class:`FaultProxy` that answers what a case needs itself: :meth:`FaultProxy.script`), and another
host is a :class:`ScriptedServer` on 127.0.0.2. Every refusal runs the CLI as a separate process, as
``pull``, as ``mount`` and as ``mount --lazy``, and checks what a user must be able to count on: the
command ends within :data:`TIME_LIMIT`, under ``ulimit -v``, with a peak RSS under :data:`MAX_RSS`;
stderr is exactly one line ``layerfs: error: WHERE: WHAT (hint: ...)``, with no traceback and no
"internal error"; nothing is tagged, every blob in the store matches its digest and none of the bad
blobs is there; nothing is written outside the store (home, working and temporary directories and the
mount point stay empty, nothing is mounted).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mounthelpers import force_unmount, is_mounted, require_fuse
from registryfixtures import (FaultProxy, Scripted, ScriptedServer, push_blob, push_image, push_manifest)
from layerfs.imagebuild import LayerBuilder, build_image, build_index
from layerfs.oci import (DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP,
                         OCI_MANIFEST, Descriptor, Digest, Platform, json_bytes)
from layerfs.registry import MAX_MANIFEST_SIZE
from layerfs.store import Store

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
#: wall time any one command may take on hostile input (retries included: backoff and timeout are short)
TIME_LIMIT = 30.0
#: ``ulimit -v`` of each command (address space: threads reserve stacks and malloc arenas)
ULIMIT_V_KIB = 3 << 20
#: the peak resident memory any one command may reach
MAX_RSS = 300 << 20
#: the registry timeout the commands run with (``LAYERFS_TIMEOUT``): slow-body cases end after a few of these
TIMEOUT = 2
PLATFORM = Platform.host()
MODES = ("pull", "mount", "lazy")


# --- running the CLI -------------------------------------------------------------------------------

@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float
    max_rss: int          # bytes


class Jail:
    """A store and the places a command could write to besides it, all empty to begin with."""

    def __init__(self, base: Path):
        self.base = base
        self.store = base / "store"
        self.home, self.cwd, self.tmp, self.mnt = (base / n for n in ("home", "cwd", "tmp", "mnt"))
        self.docker = base / "docker"          # DOCKER_CONFIG: credentials may be put there
        for d in (self.home, self.cwd, self.tmp, self.mnt, self.docker):
            d.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERFS_", "XDG_"))}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), DOCKER_CONFIG=str(self.docker),
                   LAYERFS_ROOT=str(self.store), LAYERFS_BACKOFF_BASE="0.02", LAYERFS_TIMEOUT=str(TIMEOUT),
                   PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def run(self, *args: str, limit: float = TIME_LIMIT, **env: str) -> Run:
        """``layerfs ARGS`` in its own process under ``ulimit -v``; killed (and the test failed) past *limit*."""
        cmd = f"ulimit -v {ULIMIT_V_KIB} && exec \"$0\" -m layerfs.cli \"$@\""
        out_p, err_p = self.base / "stdout", self.base / "stderr"
        with open(out_p, "wb") as out, open(err_p, "wb") as err:
            t0 = time.monotonic()
            p = subprocess.Popen(["/bin/sh", "-c", cmd, sys.executable, *args], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err, cwd=self.cwd, env=self.env(**env))
            while True:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - t0 > limit:
                    p.kill()
                    os.wait4(p.pid, 0)
                    p.returncode = -9
                    pytest.fail(f"layerfs {' '.join(args)} ran longer than {limit}s: "
                                f"{err_p.read_text(errors='replace')[-2000:]}")
                time.sleep(0.02)
            seconds = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        return Run(p.returncode, out_p.read_text(errors="replace"), err_p.read_text(errors="replace"), seconds,
                   usage.ru_maxrss * 1024)

    def untouched(self) -> None:
        """Nothing written outside the store: the other places are empty and nothing is mounted."""
        assert not is_mounted(self.mnt), "the mount point is mounted"
        for d in (self.home, self.cwd, self.tmp, self.mnt):
            assert list(d.iterdir()) == [], f"{d.name} was written to: {list(d.iterdir())}"

    def check_store(self, bad: tuple[Digest, ...] = ()) -> None:
        """Nothing published: no image tagged, every blob matches its name, no bad blob is there."""
        if not self.store.exists():
            return
        st = Store(self.store)
        assert st.images() == [], [r.name for r in st.images()]
        blobs = self.store / "blobs" / "sha256"
        for p in blobs.iterdir() if blobs.exists() else ():
            assert p.name.startswith(".") or Digest.of(p.read_bytes()).hex == p.name, f"unverified blob {p.name}"
        for d in bad:
            assert not st.has_blob(d), f"bad blob {d.short} was stored"


@pytest.fixture
def jail(tmp_path) -> Jail:
    j = Jail(tmp_path / "jail")
    yield j
    if is_mounted(j.mnt):
        force_unmount(j.mnt)


#: what a mode says on stderr before it fails, by design: ``mount`` of an image that is not local says so
#: first (as ``docker run`` does), a lazy mount that it pulls an ordinary (not eStargz, no published
#: index) layer whole
NOTICES = {"pull": None,
           "mount": re.compile(r"^Unable to find image '[^']+' locally$|^\S+: Pulling from \S+$|^[0-9a-f]{12}: "
                               r"(Pulling fs layer|Waiting|Downloading|Verifying Checksum|Download complete|"
                               r"Pull complete|Already exists)"),
           "lazy": re.compile(r"^layerfs: WARNING: layer [0-9a-f]{12} is not eStargz and its image has no "
                              r"published index \('layerfs index push'\): pulling it whole$|"
                              r"^layerfs: WARNING: layer [0-9a-f]{12} is neither eStargz nor gzip: pulling it whole$")}


def mode_args(mode: str, ref: str, jail: Jail) -> list[str]:
    if mode == "pull":
        return ["pull", ref]
    require_fuse()
    return ["mount", *(["--lazy"] if mode == "lazy" else []), ref, str(jail.mnt)]


def refused(jail: Jail, ref: str, what: str, *, where: str, bad: tuple[Digest, ...] = (),
            modes: tuple[str, ...] = MODES, limit: float = TIME_LIMIT, **env: str) -> dict[str, str]:
    """Run every mode on *ref*; each must fail as the module docstring says, with an error line that
    names *where* and matches the regex *what*. Returns mode -> error line (the observed outcome)."""
    lines = {}
    for mode in modes:
        r = jail.run(*mode_args(mode, ref, jail), limit=limit, **env)
        err = [ln for ln in r.err.splitlines() if ln.strip() and not (NOTICES[mode] and NOTICES[mode].match(ln))]
        assert r.code == 1, f"{mode}: exit {r.code}\n{r.out}\n{r.err}"
        assert "Traceback" not in r.err and "internal error" not in r.err, f"{mode}: {r.err}"
        assert len(err) == 1, f"{mode}: not one line:\n{r.err}"
        line = err[0]
        assert line.startswith("layerfs: error: "), line
        assert where in line, f"{mode}: {where!r} not named: {line}"
        assert re.search(what, line), f"{mode}: {what!r} not in: {line}"
        assert re.search(r"\(hint: [^)]+\)$", line), f"{mode}: no hint: {line}"
        assert r.seconds < limit and r.max_rss < MAX_RSS, (mode, r.seconds, r.max_rss)
        jail.check_store(bad)
        jail.untouched()
        lines[mode] = line
    return lines


# --- images --------------------------------------------------------------------------------------

def small_layer(tag: str, size: int = 3000) -> bytes:
    return (LayerBuilder().add_dir("etc").add_file(f"etc/{tag}", os.urandom(size))
            .add_file("etc/motd", f"{tag}\n".encode()).build())


def image(tag: str = "a", **kw):
    return build_image([small_layer(tag)], platform=PLATFORM, **kw)


def manifest_doc(config: Descriptor, layers: list[Descriptor], *, media_type: str | None = OCI_MANIFEST) -> bytes:
    doc = {"schemaVersion": 2, "config": config.to_json(), "layers": [d.to_json() for d in layers]}
    if media_type is not None:
        doc["mediaType"] = media_type
    return json_bytes(doc)


def index_doc(entries: list[dict], *, media_type: str | None = OCI_INDEX) -> bytes:
    doc = {"schemaVersion": 2, "manifests": entries}
    if media_type is not None:
        doc["mediaType"] = media_type
    return json_bytes(doc)


def entry(media_type: str, raw: bytes, *, platform: Platform | None = PLATFORM, size: int | None = None) -> dict:
    return Descriptor(media_type, Digest.of(raw), len(raw) if size is None else size, platform=platform).to_json()


@pytest.fixture
def pushed(registry, unique_repo):
    """(registry host, repository, a pushed image tagged ``good``)."""
    img = image()
    push_image(registry.host, unique_repo, "good", img)
    return registry.host, unique_repo, img


def serve_manifest(proxy: FaultProxy, repo: str, reference: str, raw: bytes, content_type: str | None, *,
                   headers: dict | None = None, exact: bool = True) -> None:
    """The lying proxy answers ``GET /v2/REPO/manifests/REFERENCE`` with *raw* itself."""
    proxy.script(rf"^/v2/{re.escape(repo)}/manifests/{re.escape(reference)}$",
                 Scripted.content(raw, content_type, headers=headers))


# --- type confusion --------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_type, what", [(OCI_LAYER_GZIP, r"gzip|tar"), (OCI_LAYER, r"tar")])
def test_config_blob_given_as_a_layer(pushed, jail, layer_type, what):
    host, repo, img = pushed
    cfg = img.config_descriptor
    raw = manifest_doc(cfg, [Descriptor(layer_type, cfg.digest, cfg.size)])
    push_manifest(host, repo, "confused", raw, OCI_MANIFEST)
    refused(jail, f"{host}/{repo}:confused", what, where=host)


def test_layer_given_as_the_manifest(pushed, fault_proxy, jail):
    host, repo, img = pushed
    layer = img.layer_descriptors[0]
    blob = img.layers[0]
    serve_manifest(fault_proxy, repo, "t", blob, OCI_MANIFEST)
    serve_manifest(fault_proxy, repo, str(layer.digest), blob, OCI_MANIFEST)
    refused(jail, f"{fault_proxy.host}/{repo}:t", r"malformed JSON in manifest", where=fault_proxy.host)
    refused(jail, f"{fault_proxy.host}/{repo}@{layer.digest}", r"malformed JSON in manifest", where=fault_proxy.host)


def test_manifest_given_as_the_config(pushed, jail):
    host, repo, img = pushed
    other = image("b")
    push_image(host, repo, "other", other)
    # the config descriptor names another image's manifest: first with its true media type, then as a config
    mdesc = other.manifest_descriptor
    push_blob(host, repo, other.manifest)
    for i, mt in enumerate((OCI_MANIFEST, OCI_CONFIG)):
        raw = manifest_doc(Descriptor(mt, mdesc.digest, mdesc.size), list(img.layer_descriptors))
        push_manifest(host, repo, f"cfg{i}", raw, OCI_MANIFEST)
    refused(jail, f"{host}/{repo}:cfg0", r"not an image config", where=host)
    refused(jail, f"{host}/{repo}:cfg1", r"diff_ids", where=host)


@pytest.mark.parametrize("served_as", [OCI_INDEX, DOCKER_LIST, DOCKER_MANIFEST])
def test_content_type_that_disagrees_with_the_document(pushed, fault_proxy, jail, served_as):
    host, repo, img = pushed
    serve_manifest(fault_proxy, repo, "t", img.manifest, served_as)
    refused(jail, f"{fault_proxy.host}/{repo}:t", r"Content-Type", where=fault_proxy.host)


def test_index_served_as_a_manifest_and_a_manifest_without_media_type_served_as_an_index(pushed, fault_proxy,
                                                                                        jail):
    host, repo, img = pushed
    idx = index_doc([entry(OCI_MANIFEST, img.manifest)])
    serve_manifest(fault_proxy, repo, "idx", idx, OCI_MANIFEST)
    bare = manifest_doc(img.config_descriptor, list(img.layer_descriptors), media_type=None)
    serve_manifest(fault_proxy, repo, "bare", bare, OCI_INDEX)
    refused(jail, f"{fault_proxy.host}/{repo}:idx", r"Content-Type", where=fault_proxy.host)
    refused(jail, f"{fault_proxy.host}/{repo}:bare", r"Content-Type|index", where=fault_proxy.host)


def test_index_entry_whose_media_type_lies(pushed, fault_proxy, jail):
    """An index entry that says "manifest" for an index, and one that says "index" for a manifest."""
    host, repo, img = pushed
    inner = index_doc([entry(OCI_MANIFEST, img.manifest)])
    serve_manifest(fault_proxy, repo, str(Digest.of(inner)), inner, OCI_INDEX)
    serve_manifest(fault_proxy, repo, "a", index_doc([entry(OCI_MANIFEST, inner)]), OCI_INDEX)
    serve_manifest(fault_proxy, repo, "b", index_doc([entry(OCI_INDEX, img.manifest)]), OCI_INDEX)
    refused(jail, f"{fault_proxy.host}/{repo}:a", r"is an image index.*says|says.*index", where=fault_proxy.host)
    refused(jail, f"{fault_proxy.host}/{repo}:b", r"is an image manifest.*says|says.*manifest", where=fault_proxy.host)


@pytest.mark.parametrize("kind", ["manifest", "config", "layer", "schema1"])
def test_unknown_and_forbidden_media_types(pushed, fault_proxy, jail, kind):
    host, repo, img = pushed
    if kind == "manifest":
        doc = json.loads(img.manifest)
        doc["mediaType"] = "application/vnd.example.evil+json"
        raw, what = json_bytes(doc), r"unsupported manifest media type"
    elif kind == "config":      # an artifact (a Helm chart's config type), not a container image
        raw = manifest_doc(Descriptor("application/vnd.cncf.helm.config.v1+json", img.config_descriptor.digest,
                                      img.config_descriptor.size), list(img.layer_descriptors))
        what = r"not an image config"
    elif kind == "layer":
        lay = img.layer_descriptors[0]
        raw = manifest_doc(img.config_descriptor,
                           [Descriptor("application/vnd.oci.image.layer.v1.tar+encrypted", lay.digest, lay.size)])
        what = r"unsupported layer media type"
    else:
        raw, what = json_bytes({"schemaVersion": 1, "name": repo, "tag": "t", "fsLayers": []}), r"schema 1"
    serve_manifest(fault_proxy, repo, "t", raw, None if kind == "schema1" else OCI_MANIFEST)
    refused(jail, f"{fault_proxy.host}/{repo}:t", what, where=fault_proxy.host, bad=(img.layer_descriptors[0].digest,))


# --- diff_ids --------------------------------------------------------------------------------------

@pytest.mark.parametrize("diff_ids", [[], ["sha256:" + "1" * 64] * 2, None])
def test_diff_id_count_mismatch(registry, unique_repo, jail, diff_ids):
    extra = {"rootfs": {"type": "layers", "diff_ids": diff_ids}} if diff_ids is not None else {"rootfs": None}
    img = image(extra_config=extra)
    push_image(registry.host, unique_repo, "t", img)
    refused(jail, f"{registry.host}/{unique_repo}:t", r"diff_ids? for 1 layers?|diff_ids", where=registry.host)


def test_diff_ids_that_do_not_match_the_layers(registry, unique_repo, jail):
    layers = [small_layer("x"), small_layer("y")]
    real = build_image(layers, platform=PLATFORM)
    swapped = [str(d) for d in reversed(real.diff_ids)]
    img = build_image(layers, platform=PLATFORM, extra_config={"rootfs": {"type": "layers", "diff_ids": swapped}})
    push_image(registry.host, unique_repo, "t", img)
    refused(jail, f"{registry.host}/{unique_repo}:t", r"image config says", where=registry.host)
