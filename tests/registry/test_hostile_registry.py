"""Hostile registries and malformed images: type confusion, diff_id lies, index loops and fan-out, huge
manifests, and a registry that lies about sizes, digests, ranges and media types, redirects with
credentials, loops its redirects or sends its bodies endlessly or slowly.

Images come from :mod:`imagebuild`, the registry is the real one of the session (through a
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

import errno
import json
import os
import re
import time
import zlib
from pathlib import Path

import pytest

from hostile import Run, run_limited
from mounthelpers import force_unmount, is_mounted, mount_lazy_read_only, require_fuse, started_mounts
from faultproxy import FaultProxy
from registryclient import push_blob, push_image, push_manifest
from scripted import Scripted, ScriptedServer
from lazyimages import DST, FILES
from imagebuild import LayerBuilder, build_image
from layerfs.mount import mounts as layerfs_mounts
from layerfs.transfer import PushOptions, Pusher
from layerfs.image import (DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP,
    OCI_MANIFEST, Descriptor, Digest, Platform, json_bytes)
from layerfs.registry import MAX_MANIFEST_SIZE, RegistryOptions
from layerfs.store import Store

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
#: wall time any one command may take on hostile input (retries included: backoff and timeout are short)
TIME_LIMIT = 30.0
#: ``ulimit -v`` of each command (address space: threads reserve stacks and malloc arenas)
ADDRESS_SPACE = 3 << 30
#: the peak resident memory any one command may reach
MAX_RSS = 200 << 20
#: the registry timeout the commands run with (``LAYERFS_TIMEOUT``): slow-body cases end after a few of these
TIMEOUT = 2
PLATFORM = Platform.host()
MODES = ("pull", "mount", "lazy")


# --- running the CLI -------------------------------------------------------------------------------

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
        """``layerfs ARGS`` in its own process under an address-space limit, in this jail's environment."""
        return run_limited(args, environ=self.env(**env), address_space=ADDRESS_SPACE, timeout=limit, cwd=self.cwd)

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
        err = [ln for ln in r.stderr.splitlines() if ln.strip() and not (NOTICES[mode] and NOTICES[mode].match(ln))]
        assert r.returncode == 1, f"{mode}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, f"{mode}: {r.stderr}"
        assert len(err) == 1, f"{mode}: not one line:\n{r.stderr}"
        line = err[0]
        assert line.startswith("layerfs: error: "), line
        assert where in line, f"{mode}: {where!r} not named: {line}"
        assert re.search(what, line), f"{mode}: {what!r} not in: {line}"
        assert re.search(r"\(hint: [^)]+\)$", line), f"{mode}: no hint: {line}"
        assert r.seconds < limit and r.peak_rss < MAX_RSS, (mode, r.seconds, r.peak_rss)
        jail.check_store(bad)
        jail.untouched()
        lines[mode] = line
        _record(mode, line, r)
    return lines


def _record(mode: str, line: str, r: Run) -> None:
    """With ``LAYERFS_HOSTILE_REPORT=FILE``, append the observed outcome of each case to FILE."""
    path = os.environ.get("LAYERFS_HOSTILE_REPORT")
    if path:
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{case}\t{mode}\t{r.seconds:.1f}s\t{r.peak_rss >> 20}MiB\t{line}\n")


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


# --- index loops, fan-out, huge manifests ----------------------------------------------------------

def test_index_that_refers_to_itself_or_to_an_index_that_refers_back(pushed, fault_proxy, jail):
    host, repo, img = pushed
    # an index can name itself only under a digest that is not its own: the registry must serve it for that digest
    claimed = Digest.of(b"the loop's own digest, as its author claims it")
    loop = index_doc([Descriptor(OCI_INDEX, claimed, 300, platform=PLATFORM).to_json()])
    serve_manifest(fault_proxy, repo, "self", loop, OCI_INDEX)
    serve_manifest(fault_proxy, repo, str(claimed), loop, OCI_INDEX)
    # A -> B -> (A's claimed digest): B is honest, so the nested index is met before any loop
    b = index_doc([Descriptor(OCI_INDEX, claimed, 300, platform=PLATFORM).to_json()])
    a = index_doc([entry(OCI_INDEX, b)])
    serve_manifest(fault_proxy, repo, "a", a, OCI_INDEX)
    serve_manifest(fault_proxy, repo, str(Digest.of(b)), b, OCI_INDEX)
    refused(jail, f"{fault_proxy.host}/{repo}:self", r"has \d+ bytes, its descriptor says 300|digest is",
            where=fault_proxy.host)
    refused(jail, f"{fault_proxy.host}/{repo}:a", r"nested image index", where=fault_proxy.host)


def test_an_image_manifest_is_chosen_over_a_nested_index_of_the_same_platform():
    from layerfs.image import parse_manifest
    img = image()
    nested = index_doc([entry(OCI_MANIFEST, img.manifest)])
    idx = parse_manifest(index_doc([entry(OCI_INDEX, nested), entry(OCI_MANIFEST, img.manifest)]))
    assert idx.select(PLATFORM).digest == img.manifest_digest


def test_index_fan_out_within_the_cap_is_pulled_and_beyond_it_refused(pushed, fault_proxy, jail):
    host, repo, img = pushed
    others = [entry(OCI_MANIFEST, f"other {i}".encode(), platform=Platform("linux", f"arch{i}"))
              for i in range(MAX_MANIFEST_SIZE // 250)]
    wide = index_doc(others + [entry(OCI_MANIFEST, img.manifest)])
    assert MAX_MANIFEST_SIZE // 2 < len(wide) <= MAX_MANIFEST_SIZE
    serve_manifest(fault_proxy, repo, "wide", wide, OCI_INDEX)
    r = jail.run("pull", f"{fault_proxy.host}/{repo}:wide")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.seconds < 10 and r.peak_rss < MAX_RSS, (r.seconds, r.peak_rss)
    assert [x.name for x in Store(jail.store).images()] == [f"{fault_proxy.host}/{repo}:wide"]
    jail.untouched()
    too_wide = index_doc(others * 2 + [entry(OCI_MANIFEST, img.manifest)])
    serve_manifest(fault_proxy, repo, "too-wide", too_wide, OCI_INDEX)
    jail2 = Jail(jail.base.parent / "jail2")
    refused(jail2, f"{fault_proxy.host}/{repo}:too-wide", r"too large", where=fault_proxy.host)


def test_huge_manifests_are_refused_without_being_read(pushed, fault_proxy, jail):
    host, repo, img = pushed
    huge = 50 << 20
    filler = b" " * (1 << 20)
    # 50 MB announced: refused on the header; 50 MB without a length (chunked): refused after 4 MiB
    fault_proxy.script(r"/manifests/announced$", Scripted(200, {"Content-Type": OCI_MANIFEST,
                                                                 "Content-Length": str(huge)}, [filler] * 50))
    fault_proxy.script(r"/manifests/chunked$", Scripted(200, {"Content-Type": OCI_MANIFEST}, [filler] * 50,
                                                          chunked=True))
    # an index entry that declares a 50 MB manifest: refused before it is asked for
    big = Descriptor(OCI_MANIFEST, Digest.of(b"big"), huge, platform=PLATFORM).to_json()
    serve_manifest(fault_proxy, repo, "entry", index_doc([big]), OCI_INDEX)
    # JSON nested a million deep; 256 MiB sent as 256 kB of gzip (Content-Encoding)
    serve_manifest(fault_proxy, repo, "deep", b"[" * 1_000_000 + b"]" * 1_000_000, OCI_MANIFEST)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(z.compress(filler) for _ in range(256)) + z.flush()
    fault_proxy.script(r"/manifests/bomb$", Scripted.content(bomb, OCI_MANIFEST, headers={"Content-Encoding": "gzip"}))
    where = fault_proxy.host
    refused(jail, f"{where}/{repo}:announced", rf"too large \({huge} bytes", where=where)
    refused(jail, f"{where}/{repo}:chunked", r"too large \(over", where=where)
    sent = [r.bytes_sent for r in fault_proxy.requests if r.path.endswith("/chunked")]
    assert sent and max(sent) < 16 << 20, sent           # the client stopped reading soon after the cap
    refused(jail, f"{where}/{repo}:entry", rf"too large \({huge} bytes", where=where)
    assert fault_proxy.count(f"/manifests/{big['digest']}") == 0
    refused(jail, f"{where}/{repo}:deep", r"malformed JSON in manifest: nested too deeply", where=where)
    refused(jail, f"{where}/{repo}:bomb", r"too large \(over", where=where)


def test_manifest_with_tens_of_thousands_of_layers_is_bounded(pushed, fault_proxy, jail):
    host, repo, img = pushed
    lay = img.layer_descriptors[0]
    n = MAX_MANIFEST_SIZE // len(json.dumps(lay.to_json())) - 10
    cfg = image(extra_config={"rootfs": {"type": "layers", "diff_ids": [str(img.diff_ids[0])] * n}})
    push_blob(host, repo, cfg.config)
    raw = manifest_doc(cfg.config_descriptor, [lay] * n)
    assert len(raw) <= MAX_MANIFEST_SIZE
    serve_manifest(fault_proxy, repo, "many", raw, OCI_MANIFEST)
    refused(jail, f"{fault_proxy.host}/{repo}:many", rf"has {n} layers, more than layerfs takes \(1000\)",
            where=fault_proxy.host)


# --- a registry that lies about sizes, digests and ranges ------------------------------------------

@pytest.fixture
def big(registry, unique_repo):
    """(host, repository, an image with one incompressible 200 kB layer, its layer descriptor, its blob)."""
    img = build_image([small_layer("big", 200_000)], platform=PLATFORM)
    push_image(registry.host, unique_repo, "t", img)
    return registry.host, unique_repo, img, img.layer_descriptors[0], img.layers[0]


def blob_path(repo: str, digest: Digest) -> str:
    return rf"^/v2/{re.escape(repo)}/blobs/{digest}$"


@pytest.mark.parametrize("lie", ["length-longer-than-body", "length-shorter-than-blob", "body-longer-than-blob",
                                 "descriptor-smaller", "descriptor-larger", "descriptor-enormous"])
def test_size_lies(big, fault_proxy, jail, lie):
    host, repo, img, lay, blob = big
    where, ref = fault_proxy.host, f"{fault_proxy.host}/{repo}:t"
    path = blob_path(repo, lay.digest)
    if lie == "length-longer-than-body":        # the connection ends early, every time: retried, then given up
        fault_proxy.script(path, Scripted(200, {"Content-Length": str(lay.size)}, blob[: lay.size // 2]))
        what = rf"connection lost after \d+ of {lay.size} bytes"
    elif lie == "length-shorter-than-blob":
        fault_proxy.script(path, Scripted(200, {"Content-Length": str(lay.size - 1)}, blob[:-1]))
        what = rf"registry sends {lay.size - 1} bytes, manifest says {lay.size}"
    elif lie == "body-longer-than-blob":        # no length announced (chunked): the extra bytes are the lie
        fault_proxy.script(path, Scripted(200, {}, [blob, b"\0" * 4096], chunked=True))
        what = rf"larger than its declared {lay.size} bytes"
    else:
        size = {"descriptor-smaller": lay.size - 100, "descriptor-larger": lay.size + 100,
                "descriptor-enormous": 1 << 62}[lie]
        raw = manifest_doc(img.config_descriptor, [Descriptor(lay.media_type, lay.digest, size)])
        serve_manifest(fault_proxy, repo, "t", raw, OCI_MANIFEST)
        what = rf"registry sends {lay.size} bytes, manifest says {size}"
    refused(jail, ref, what, where=where, bad=(lay.digest,))


@pytest.mark.parametrize("lie", ["blob-bytes", "manifest-by-digest", "docker-content-digest"])
def test_digest_lies(big, fault_proxy, jail, lie):
    host, repo, img, lay, blob = big
    where = fault_proxy.host
    ref = f"{where}/{repo}:t"
    if lie == "blob-bytes":                      # same length, one byte changed
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0x55
        fault_proxy.script(blob_path(repo, lay.digest), Scripted.content(bytes(bad)))
        what = rf"blob digest is sha256:[0-9a-f]{{64}}, expected {lay.digest}"
    elif lie == "manifest-by-digest":
        other = image("other").manifest
        serve_manifest(fault_proxy, repo, str(img.manifest_digest), other, OCI_MANIFEST)
        ref = f"{where}/{repo}@{img.manifest_digest}"
        what = rf"manifest digest is {Digest.of(other)}, expected {img.manifest_digest}"
    else:
        serve_manifest(fault_proxy, repo, "t", img.manifest, OCI_MANIFEST,
                       headers={"Docker-Content-Digest": "sha256:" + "0" * 64})
        what = r"Docker-Content-Digest sha256:0{64} does not match the content"
    refused(jail, ref, what, where=where, bad=(lay.digest,))


def test_a_lying_docker_content_digest_on_a_blob_is_ignored(big, fault_proxy, jail):
    """Blobs are judged by their bytes: a header that lies about them changes nothing."""
    host, repo, img, lay, blob = big
    fault_proxy.script(blob_path(repo, lay.digest),
                       Scripted.content(blob, headers={"Docker-Content-Digest": "sha256:" + "0" * 64}))
    r = jail.run("pull", f"{fault_proxy.host}/{repo}:t")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert Store(jail.store).read_blob(lay.digest, lay.size) == blob


@pytest.mark.parametrize("lie", ["wrong-start", "wrong-total", "no-content-range", "multipart"])
def test_content_range_lies_on_resume(big, fault_proxy, jail, lie):
    """The first answer breaks off after 64 kB; the answers to the resuming Range requests lie."""
    host, repo, img, lay, blob = big
    path = blob_path(repo, lay.digest)
    fault_proxy.cut(path, after_bytes=65536, times=1)

    def answer(rec) -> Scripted:
        start = int(re.fullmatch(r"bytes=(\d+)-", rec.header("Range")).group(1))
        part = blob[start:]
        headers = {"Content-Length": str(len(part))}
        if lie == "wrong-start":
            headers["Content-Range"] = f"bytes 0-{len(part) - 1}/{lay.size}"
        elif lie == "wrong-total":
            headers["Content-Range"] = f"bytes {start}-{lay.size - 1}/{lay.size + 1000}"
        elif lie == "multipart":
            headers["Content-Type"] = "multipart/byteranges; boundary=x"
        return Scripted(206, headers, part)

    fault_proxy.script(path, answer, when=lambda rec: rec.header("Range"))
    what = {"wrong-start": r"Content-Range 'bytes 0-\d+/\d+' does not match the request \(from 65536",
            "wrong-total": rf"Content-Range 'bytes 65536-\d+/{lay.size + 1000}' does not match",
            "no-content-range": r"bad Content-Range ''", "multipart": r"bad Content-Range ''"}[lie]
    refused(jail, f"{fault_proxy.host}/{repo}:t", what, where=fault_proxy.host, bad=(lay.digest,))
    assert [r.header("Range") for r in fault_proxy.requests if re.search(path, r.path)][:2] == [None, "bytes=65536-"]


# --- redirects: credentials never go to another host; loops end ------------------------------------

def _login(jail: Jail, host: str, user: str, password: str) -> None:
    import base64
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (jail.docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def _authorization(reqs) -> list[str]:
    return [r.header("Authorization") for r in reqs if r.header("Authorization")]


def _mount_and_unmount(jail: Jail, ref: str) -> None:
    r = jail.run(*mode_args("lazy", ref, jail))
    try:
        assert r.returncode == 0, r.stderr
        assert (jail.mnt / "etc" / "motd").read_bytes() == b"a\n"
    finally:
        jail.run("umount", str(jail.mnt))
        if is_mounted(jail.mnt):
            force_unmount(jail.mnt)


@pytest.mark.parametrize("auth", ["basic", "token"])
@pytest.mark.parametrize("other", ["127.0.0.2", "127.0.0.1", "bounce"])
def test_blob_redirects_to_another_host_never_carry_credentials(request, fault_proxy_factory, unique_repo, jail,
                                                                auth, other):
    reg = request.getfixturevalue("registry_basic" if auth == "basic" else "registry_token")
    user, password = reg.auth
    img = image()
    push_image(reg.host, unique_repo, "t", img, auth=reg.auth)
    proxy = fault_proxy_factory(reg)
    _login(jail, proxy.host, user, password)
    blobs = {str(d): data for d, data in img.blobs.items()}

    def storage(rec) -> Scripted:    # the other host: serves the blob or manifest, or sends the client back
        kind, name = rec.path.split("/")[-2:]
        if other == "bounce":
            return Scripted(307, {"Location": f"{proxy.url}/v2/{unique_repo}/{kind}/{name}?bounced=1",
                                  "Content-Length": "0"})
        if kind == "manifests":
            return Scripted.content(img.manifest, OCI_MANIFEST)
        return Scripted.content(blobs[name], "application/octet-stream")

    with ScriptedServer(storage, bind="127.0.0.1" if other == "127.0.0.1" else "127.0.0.2") as server:
        # blobs and the manifest (by tag) are redirected to the other host
        proxy.script(rf"^/v2/{re.escape(unique_repo)}/(blobs/sha256:|manifests/t$)", lambda rec: Scripted(
            307, {"Location": f"{server.url}/storage/{rec.path.split('/')[-2]}/{rec.path.rsplit('/', 1)[-1]}",
                  "Content-Length": "0"}),
            when=lambda rec: "bounced" not in rec.query)
        ref = f"{proxy.host}/{unique_repo}:t"
        r = jail.run("pull", ref)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        _mount_and_unmount(jail, ref)
        assert len(server.requests) >= 5       # manifest, config and layer by pull, manifest and config by the lazy mount
        assert any(r.path.startswith("/storage/manifests/") for r in server.requests)
        assert _authorization(server.requests) == [], "credentials went to another host"
        assert not any(r.header("Cookie") for r in server.requests)
        assert _authorization(proxy.requests), "the registry itself was never sent the credentials"
        secret = password if auth == "basic" else None
        assert secret is None or all(secret not in json.dumps(r.headers) + r.query for r in server.requests)


def test_redirect_loops_and_bad_redirects_end_with_one_line(registry_basic, fault_proxy_factory, unique_repo, jail):
    reg = registry_basic
    img = image()
    push_image(reg.host, unique_repo, "t", img, auth=reg.auth)
    proxy = fault_proxy_factory(reg)
    _login(jail, proxy.host, *reg.auth)
    lay = img.layer_descriptors[0]
    cfg = img.config_descriptor
    with ScriptedServer(lambda rec: Scripted(302, {"Location": f"{proxy.url}{rec.path}", "Content-Length": "0"})) \
            as other:
        # the layer redirects to itself; the config bounces between the registry and another host
        proxy.script(blob_path(unique_repo, lay.digest),
                     Scripted(302, {"Location": f"/v2/{unique_repo}/blobs/{lay.digest}", "Content-Length": "0"}))
        proxy.script(blob_path(unique_repo, cfg.digest),
                     Scripted(302, {"Location": f"{other.url}/v2/{unique_repo}/blobs/{cfg.digest}",
                                    "Content-Length": "0"}))
        refused(jail, f"{proxy.host}/{unique_repo}:t", r"too many redirects", where=proxy.host)
        assert _authorization(other.requests) == [] and len(other.requests) <= 3 * 3
        assert proxy.count(f"/blobs/{cfg.digest}") <= 3 * 6
    proxy.clear_rules()
    proxy.script(blob_path(unique_repo, cfg.digest), Scripted(302, {"Location": "file:///etc/passwd",
                                                                     "Content-Length": "0"}))
    refused(jail, f"{proxy.host}/{unique_repo}:t", r"refusing redirect to 'file:///etc/passwd'", where=proxy.host)


# --- endless and slow bodies -------------------------------------------------------------------------

def _endless(piece: bytes = b"\0" * 65536):
    while True:
        yield piece


def _trickle(data: bytes, pause: float = 0.2):
    for i in range(len(data)):
        yield data[i:i + 1]
        yield pause


def test_endless_bodies_are_cut_at_their_declared_size(big, fault_proxy, jail):
    host, repo, img, lay, blob = big
    where, ref = fault_proxy.host, f"{fault_proxy.host}/{repo}:t"
    fault_proxy.script(blob_path(repo, lay.digest), Scripted(200, {}, _endless(), chunked=True))
    refused(jail, ref, rf"larger than its declared {lay.size} bytes", where=where, bad=(lay.digest,))
    fault_proxy.clear_rules()
    cfg = img.config_descriptor
    fault_proxy.script(blob_path(repo, cfg.digest), Scripted(200, {}, _endless(), chunked=True))
    refused(jail, ref, rf"blob {cfg.digest.short} has over {cfg.size + 1} bytes, expected {cfg.size}", where=where,
            bad=(cfg.digest,))


def test_slow_bodies_end_in_bounded_time(big, fault_proxy, jail):
    """Bodies that trickle (every read comes within the timeout) and answers that never come."""
    host, repo, img, lay, blob = big
    where, ref = fault_proxy.host, f"{fault_proxy.host}/{repo}:t"
    man = blob_path(repo, "x").replace("blobs/x", "manifests/t")
    fault_proxy.script(man, Scripted(200, {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(img.manifest))},
                                     _trickle(img.manifest)))
    lines = refused(jail, ref, r"manifest .*:t: the registry sends under 1024 bytes/s", where=where)
    fault_proxy.clear_rules()
    cfg = img.config_descriptor
    fault_proxy.script(blob_path(repo, cfg.digest), Scripted(200, {"Content-Length": str(cfg.size)},
                                                            _trickle(img.config)))
    refused(jail, ref, rf"blob {cfg.digest.short}: the registry sends under 1024 bytes/s", where=where,
            modes=("pull", "lazy"))
    fault_proxy.clear_rules()
    fault_proxy.script(blob_path(repo, lay.digest), Scripted(200, {"Content-Length": str(lay.size)}, _trickle(blob)))
    # retried (resumed) 4 times, each attempt given up after one window: a window of 1 s keeps it short
    t0 = time.monotonic()
    refused(jail, ref, rf"blob {lay.digest.short}: the registry sends under 1024 bytes/s", where=where,
            bad=(lay.digest,), modes=("pull",), LAYERFS_TIMEOUT="1")
    assert time.monotonic() - t0 < 5 * (1 + 1) + 5
    fault_proxy.clear_rules()
    fault_proxy.delay(man, 3600)
    refused(jail, ref, r"cannot reach .*timed out", where=where, modes=("pull",), LAYERFS_TIMEOUT="1")
    assert lines


def test_endless_error_and_token_answers_are_bounded(registry_basic, fault_proxy_factory, unique_repo, jail):
    """An error answer (HTTP 500) and a token service answer that never end: read no further than a
    small bound, then the usual error. The token service a registry names gets the user's credentials,
    as docker sends them; it must not get the memory."""
    reg = registry_basic
    img = image()
    push_image(reg.host, unique_repo, "t", img, auth=reg.auth)
    proxy = fault_proxy_factory(reg)
    _login(jail, proxy.host, *reg.auth)
    man = rf"^/v2/{re.escape(unique_repo)}/manifests/t$"
    proxy.script(man, Scripted(500, {"Content-Type": "application/json"}, _endless(b'{"errors": [' * 4096),
                               chunked=True))
    refused(jail, f"{proxy.host}/{unique_repo}:t", r"HTTP 500", where=proxy.host, modes=("pull", "lazy"))
    proxy.clear_rules()
    with ScriptedServer(Scripted(200, {"Content-Type": "application/json"}, _endless(b'{"token": "' + b"x" * 65536),
                                 chunked=True)) as realm:
        proxy.script(man, Scripted(401, {"WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="x"',
                                         "Content-Length": "0"}))
        refused(jail, f"{proxy.host}/{unique_repo}:t", rf"token service {re.escape(realm.host)}", where=proxy.host,
                modes=("pull", "lazy"))
        assert realm.requests and max(r.bytes_sent for r in realm.requests) < 64 << 20


# --- lazy reads from a registry that turns hostile while it serves a mount --------------------------

def test_lazy_reads_that_trickle_or_lie_fail_alone_and_the_mount_goes_on(estargz_store, registry,
                                                                       fault_proxy_factory, tmp_path, monkeypatch):
    """A lazy (eStargz) mount whose registry then trickles its Range answers, or answers another range:
    that read fails with EIO in bounded time, nothing unverified is cached, and later reads work."""
    monkeypatch.setenv("LAYERFS_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("LAYERFS_BACKOFF_BASE", "0.02")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    proxy = fault_proxy_factory(registry)
    repo = "test/lazy-hostile"
    ref = f"{proxy.host}/{repo}:v1"
    Pusher(estargz_store, PushOptions(registry=RegistryOptions.from_env())).push(DST, ref)
    lay = estargz_store.resolve(DST)[1].layers[0]
    blob = estargz_store.read_blob(lay.digest)
    fresh = Store(tmp_path / "fresh").init()

    def ranged(lie: str):
        def answer(rec) -> Scripted:
            a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", rec.header("Range")).groups())
            part = blob[a:b + 1]
            first = a + 1 if lie == "wrong-start" else a
            hdrs = {"Content-Range": f"bytes {first}-{first + len(part) - 1}/{lay.size}",
                    "Content-Length": str(len(part))}
            return Scripted(206, hdrs, _trickle(part, 0.3) if lie == "trickle" else part)
        return answer

    with started_mounts(90) as started:
        mnt = mount_lazy_read_only(fresh, ref, tmp_path / "mnt", started)
        assert (mnt / "data/f0").read_bytes() == FILES["data/f0"]
        for lie, name in (("trickle", "data/f3"), ("wrong-start", "data/f5")):
            proxy.clear_rules()
            proxy.script(blob_path(repo, lay.digest), ranged(lie), when=lambda rec: rec.header("Range"))
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                (mnt / name).read_bytes()
            assert e.value.errno == errno.EIO
            assert time.monotonic() - t0 < 4 * (TIMEOUT + 1), lie
        proxy.clear_rules()
        for name in ("data/f3", "data/f5", "data/f1"):
            assert (mnt / name).read_bytes() == FILES[name]
        log_text = Path(layerfs_mounts(fresh)[0].log).read_text()
        assert "Traceback" not in log_text and "internal error" not in log_text, log_text
        assert "sends under 1024 bytes/s" in log_text and "does not answer" in log_text, log_text


def test_a_bad_layerfs_timeout_is_a_usage_error(pushed, jail):
    host, repo, img = pushed
    r = jail.run("pull", f"{host}/{repo}:good", LAYERFS_TIMEOUT="soon")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "layerfs: error: LAYERFS_TIMEOUT='soon' is not a number of seconds (hint: unset it, or set it to e.g. 30)"]
    jail.check_store()
    jail.untouched()
