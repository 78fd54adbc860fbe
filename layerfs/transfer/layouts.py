"""What a local source holds: an OCI image layout (``index.json``, manifests, configs) or a
``docker save`` archive (``manifest.json``), read and checked into plans of the images to import,
with their names (see :mod:`layerfs.transfer.sources`, *Names* and *docker-archive layers*)."""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfs.errors import (
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    LayerfsError,
    ManifestError,
    PlatformNotFound,
    SizeMismatch,
    UnsupportedMediaType,
)
from layerfs.image import (
    FOREIGN_LAYER_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    Reference,
    docker_to_oci,
    iter_layer_compression,
    json_bytes,
    parse_manifest,
)
from layerfs.index import sniff_compression
from layerfs.store import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION
from layerfs.transfer.archive import Archive, Files, Member
from layerfs.transfer.transports import DAMAGED_HINT, LoadOptions, Source, SourceError

#: largest JSON document read whole (index.json, manifest.json, manifests, configs)
JSON_LIMIT = 8 << 20
#: containerd's annotation for the full image name in an OCI layout
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_HEX64_JSON = re.compile(r"^([0-9a-f]{64})\.json$")

# --- reading JSON and small blobs ----------------------------------------------------------

def _json(raw: bytes, what: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"malformed JSON in {what}: {e}", where=where, hint=DAMAGED_HINT) from None


def _blob_name(d: Digest) -> str:
    return f"blobs/{d.algorithm}/{d.hex}"


def _named_digest(name: str) -> Digest | None:
    """The digest a content-addressed member name claims: ``blobs/<algo>/<hex>``."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[-3] == "blobs":
        with contextlib.suppress(LayerfsError):
            return Digest.parse(f"{parts[-2]}:{parts[-1]}")
    return None


def _blob_member(files: Files, desc: Descriptor, what: str) -> Member:
    m = files.find(_blob_name(desc.digest))
    if m is None:
        raise SourceError(f"{what} {desc.digest} is missing: no {_blob_name(desc.digest)}", where=files.where,
                          hint="the layout is incomplete; copy it again (e.g. with skopeo copy)")
    if m.size != desc.size:
        raise SizeMismatch(f"{what} {desc.digest.short} is {m.size} bytes, its descriptor says {desc.size}",
                           where=files.where, hint=DAMAGED_HINT)
    return m


def _read_blob(files: Files, desc: Descriptor, what: str) -> bytes:
    """A small blob, verified against its descriptor's digest and size."""
    m = _blob_member(files, desc, what)
    raw = files.read(m, JSON_LIMIT)
    got = Digest.of(raw, desc.digest.algorithm)
    if got != desc.digest or len(raw) != desc.size:
        raise DigestMismatch(f"{what} {_blob_name(desc.digest)} does not match its digest (content is {got})",
                             where=files.where, hint=DAMAGED_HINT)
    return raw


def _parse(raw: bytes, what: str, where: str, expected: Digest | None = None) -> Manifest | Index:
    _json(raw, what, where)
    try:
        return parse_manifest(raw, expected=expected, where=where)
    except LayerfsError as e:
        e.message = f"{what}: {e.message}"
        e.where = e.where or where
        if e.hint in (None, e.default_hint) or isinstance(e, DigestMismatch):
            e.hint = DAMAGED_HINT
        raise


def _platform_error(index: Index, want: Platform, source: Source, where: str) -> PlatformNotFound:
    avail = ", ".join(sorted({str(p) for p in index.platforms()})) or "none"
    return PlatformNotFound(f"no image for platform {want} in {source}", where=where,
                            hint=f"available platforms: {avail}; use --platform")


def _check_platform(config: ImageConfig, want: Platform | None, source: Source, where: str) -> None:
    if want is not None and config.platform is not None and not want.matches(config.platform):
        raise PlatformNotFound(f"{source} is for {config.platform}, not {want}", where=where,
                               hint="drop --platform or pick an image built for it")


# --- names ---------------------------------------------------------------------------------

_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.zst", ".tar.zstd", ".tgz", ".txz", ".tzst", ".tar")


def _stem(path: str) -> str:
    """A repository path component from a file or directory name: ``My_App.v2.tar.gz`` -> ``my-app-v2``."""
    name = Path(os.path.abspath(path)).name
    low = name.lower()
    for suf in _SUFFIXES:
        if low.endswith(suf) and len(low) > len(suf):
            name = name[: -len(suf)]
            break
    return "-".join(re.findall(r"[a-z0-9]+", name.lower())) or "image"


def _full_name(text: str | None) -> str | None:
    """*text* as a canonical reference when it is a full one (has a '/' or ':'), else None."""
    if not text or ("/" not in text and ":" not in text):
        return None
    try:
        r = Reference.parse(text)
    except LayerfsError:
        return None
    return str(r) if r.digest is None else None


def _oci_name(desc: Descriptor, stem: str, fallback_tag: str) -> str:
    ann = desc.annotations or {}
    for cand in (ann.get(CONTAINERD_NAME_ANNOTATION), ann.get(REF_NAME_ANNOTATION)):
        full = _full_name(cand)
        if full:
            return full
    ref = ann.get(REF_NAME_ANNOTATION)
    tag = ref if ref and _TAG.match(ref) else fallback_tag
    return f"localhost/{stem}:{tag}"


# --- planning: what to import ----------------------------------------------------------------

@dataclass
class Plan:
    names: list[str]
    manifest: Manifest                  # as it will be stored (OCI)
    config: ImageConfig
    layers: list[Member]               # the file of each layer, in manifest order
    diff_ids: list[Digest]
    blobs: list[tuple[bytes, Digest]]   # small blobs to store: config, manifests, index
    annotations: dict[str, str]
    repo_digest: Digest | None


def _kind(src: Source) -> str:
    return "archive" if src.transport.endswith("archive") else "layout"


def plan_oci(files: Files, src: Source, opts: LoadOptions) -> list[Plan]:
    where = files.where
    layout = files.find("oci-layout")
    if layout is not None:
        doc = _json(files.read(layout, JSON_LIMIT), "oci-layout", where)
        if not isinstance(doc, dict) or not isinstance(doc.get("imageLayoutVersion"), str):
            raise ManifestError("oci-layout has no imageLayoutVersion", where=where, hint=DAMAGED_HINT)
    idx = files.find("index.json")
    if idx is None:
        hint = ("is it a docker-archive (docker save)? use docker-archive:FILE" if isinstance(files, Archive)
                and files.find("manifest.json") else "an OCI image layout has index.json, oci-layout and blobs/")
        raise SourceError(f"index.json is missing: not an OCI image {_kind(src)}", where=where, hint=hint)
    top = _parse(files.read(idx, JSON_LIMIT), "index.json", where)
    if not isinstance(top, Index):
        raise ManifestError("index.json is not an image index", where=where, hint=DAMAGED_HINT)
    entries = list(top.manifests)
    refs = [(e.annotations or {}).get(REF_NAME_ANNOTATION) for e in entries]
    named = sorted({r for r in refs if r})
    choose = (f"choose one: {src.transport}:{src.path}:REF" + (f" (refs: {', '.join(named)})" if named else "")
              + f" or {src.transport}:{src.path}:@N")
    flat_index = False
    if src.ref is not None:
        hits = [i for i, r in enumerate(refs) if r == src.ref][:1]
        if not hits:
            raise ImageNotFound(f"no image named {src.ref!r} in the {_kind(src)}", where=where,
                                hint=f"names in the {_kind(src)}: {', '.join(named)}" if named
                                else f"its images have no names; use {src.transport}:{src.path}:@N")
    elif src.index is not None:
        if src.index >= len(entries):
            raise ImageNotFound(f"index @{src.index} is out of range: the {_kind(src)} lists "
                                f"{len(entries)} image(s)", where=where, hint="@N counts from 0")
        hits = [src.index]
    elif len(entries) == 1:
        hits = [0]
    elif not entries:
        raise ImageNotFound(f"the {_kind(src)} lists no images", where=where, hint="index.json has no manifests")
    elif not named and all(e.platform for e in entries):
        flat_index = True   # index.json lists one image's platforms: pick one
        want = opts.platform or Platform.host()
        d = top.select(want)
        if d is None:
            raise _platform_error(top, want, src, where)
        hits = [entries.index(d)]
    elif opts.single:
        raise ImageNotFound(f"the {_kind(src)} holds {len(entries)} images", where=where, hint=choose)
    else:
        hits = list(range(len(entries)))

    stem = opts.stem or _stem(src.path)
    plans: dict[Digest, Plan] = {}
    for i in hits:
        e = entries[i]
        fallback = "latest" if len(hits) == 1 else str(i)
        name = _oci_name(e, stem, fallback)
        if e.digest in plans:
            if name not in plans[e.digest].names:
                plans[e.digest].names.append(name)
            continue
        what = f"index.json entry @{i}"
        m = _parse(_read_blob(files, e, "manifest"), f"manifest {e.digest.short}", where, e.digest)
        index = None
        if isinstance(m, Index):
            index = m
            want = opts.platform or Platform.host()
            d = m.select(want)
            if d is None:
                raise _platform_error(m, want, src, where)
            m = _parse(_read_blob(files, d, "manifest"), f"manifest {d.digest.short}", where, d.digest)
            if isinstance(m, Index):
                raise ManifestError(f"{what}: nested image index for {want} is not supported", where=where)
        config_raw = _read_blob(files, m.config, "config")
        config = _config(config_raw, where)
        diff_ids = config.diff_ids
        if diff_ids and len(diff_ids) != len(m.layers):
            raise ManifestError(f"image config lists {len(diff_ids)} diff_ids for {len(m.layers)} layers",
                                where=where, hint=DAMAGED_HINT)
        if index is None and not flat_index:
            _check_platform(config, opts.platform, src, where)
        try:
            iter_layer_compression(m.layers)
        except LayerfsError as e:
            e.where = where
            raise
        layers = []
        for l in m.layers:
            if l.media_type in FOREIGN_LAYER_TYPES and files.find(_blob_name(l.digest)) is None:
                raise SourceError(f"layer {l.digest.short} is non-distributable ({l.media_type}) and not in the "
                                  f"{_kind(src)}", where=where, hint="copy the image with its foreign layers")
            layers.append(_blob_member(files, l, "layer"))
        stored = docker_to_oci(m)
        blobs = [(config_raw, m.config.digest), (m.raw, m.digest)]
        ann = {REPO_DIGEST_ANNOTATION: str(index.digest if index is not None else m.digest)}
        if stored is not m:
            blobs.append((stored.raw, stored.digest))
            ann[SOURCE_MANIFEST_ANNOTATION] = str(m.digest)
        if index is not None:
            blobs.append((index.raw, index.digest))
        plans[e.digest] = Plan([name], stored, config, layers, diff_ids, blobs, ann,
                                index.digest if index is not None else m.digest)
    return list(plans.values())


def _config(raw: bytes, where: str) -> ImageConfig:
    try:
        return ImageConfig.parse(raw, where=where)
    except LayerfsError as e:
        if e.hint in (None, e.default_hint):
            e.hint = DAMAGED_HINT
        raise


def plan_docker(files: Archive, src: Source, opts: LoadOptions) -> list[Plan]:
    where = files.where
    mm = files.find("manifest.json")
    if mm is None:
        hint = ("is it an OCI archive? use oci-archive:FILE" if files.find("index.json")
                else "docker save writes one; archives from Docker before 1.10 are not supported")
        raise SourceError("manifest.json is missing: not a docker-archive", where=where, hint=hint)
    doc = _json(files.read(mm, JSON_LIMIT), "manifest.json", where)
    if not isinstance(doc, list):
        raise ManifestError("manifest.json is not a list of images", where=where, hint=DAMAGED_HINT)
    items: list[tuple[int, str, list[str], list[str]]] = []
    for i, it in enumerate(doc):
        bad = f"manifest.json item @{i}"
        if not isinstance(it, dict) or not isinstance(it.get("Config"), str) or not isinstance(it.get("Layers"), list) \
                or not all(isinstance(x, str) for x in it["Layers"]):
            raise ManifestError(f"{bad} needs a Config path and a list of Layers paths", where=where, hint=DAMAGED_HINT)
        tags_doc = it.get("RepoTags") or []
        if not isinstance(tags_doc, list) or not all(isinstance(t, str) for t in tags_doc):
            raise ManifestError(f"{bad}: RepoTags is not a list of names", where=where, hint=DAMAGED_HINT)
        tags = []
        for t in tags_doc:
            try:
                r = Reference.parse(t)
            except InvalidReference as e:
                raise ManifestError(f"{bad}: invalid RepoTag {t!r}: {e.message}", where=where, hint=DAMAGED_HINT) from None
            if str(r) not in tags:
                tags.append(str(r))
        items.append((i, it["Config"], it["Layers"], tags))

    all_tags = [t for _, _, _, ts in items for t in ts]
    if src.ref is not None:
        chosen = [it for it in items if src.ref in it[3]][:1]
        if not chosen:
            shown = Reference.parse(src.ref).familiar()
            raise ImageNotFound(f"no image tagged {shown} in the archive", where=where,
                                hint=("tags in the archive: " + ", ".join(Reference.parse(t).familiar()
                                                                          for t in all_tags)) if all_tags
                                else f"its images have no tags; use {src.transport}:{src.path}:@N")
        i, cfg, layers, tags = chosen[0]
        chosen = [(i, cfg, layers, [src.ref] + [t for t in tags if t != src.ref])]
    elif src.index is not None:
        if src.index >= len(items):
            raise ImageNotFound(f"index @{src.index} is out of range: the archive lists {len(items)} image(s)",
                                where=where, hint="@N counts from 0")
        chosen = [items[src.index]]
    elif len(items) == 1:
        chosen = items
    elif not items:
        raise ImageNotFound("the archive lists no images", where=where, hint="manifest.json is empty")
    elif opts.single:
        raise ImageNotFound(f"the archive holds {len(items)} images", where=where,
                            hint=f"choose one: {src.transport}:{src.path}:NAME:TAG or {src.transport}:{src.path}:@N")
    else:
        chosen = items

    stem = opts.stem or _stem(src.path)
    plans = []
    for i, cfg_path, layer_paths, tags in chosen:
        cm = files.resolve(cfg_path, "config")
        config_raw = files.read(cm, JSON_LIMIT)
        named = _named_digest(cm.name) or _named_digest(cfg_path)
        legacy = _HEX64_JSON.match(posixpath.basename(cm.name))
        if named is None and legacy:
            named = Digest("sha256", legacy.group(1))
        config_digest = Digest.of(config_raw, named.algorithm if named else "sha256")
        if named is not None and config_digest != named:
            raise DigestMismatch(f"config {cfg_path} does not match the digest in its name (content is "
                                 f"{config_digest})", where=where, hint=DAMAGED_HINT)
        config = _config(config_raw, where)
        diff_ids = config.diff_ids
        if len(diff_ids) != len(layer_paths):
            raise ManifestError(f"config {cfg_path} lists {len(diff_ids)} diff_ids for the {len(layer_paths)} "
                                f"layers of manifest.json item @{i}", where=where, hint=DAMAGED_HINT)
        _check_platform(config, opts.platform, src, where)
        members, descs = [], []
        for j, lp in enumerate(layer_paths):
            m = files.resolve(lp, "layer")
            comp = sniff_compression(files.head(m))
            if comp in ("xz", "bzip2"):
                raise UnsupportedMediaType(f"layer {lp} is {comp}-compressed", where=where,
                                           hint="layerfs stores gzip, zstd or uncompressed layers; "
                                                "re-save the image with docker save or skopeo")
            named = _named_digest(m.name) or _named_digest(lp)
            if comp is None:
                digest = diff_ids[j]
                if named is not None and named != digest:
                    raise DigestMismatch(f"layer {lp}: its name says {named}, the config's diff_id says {digest}",
                                         where=where, hint=DAMAGED_HINT)
                media = OCI_LAYER
            else:
                digest = named or files.digest(m)
                media = OCI_LAYER_GZIP if comp == "gzip" else OCI_LAYER_ZSTD
            members.append(m)
            descs.append(Descriptor(media, digest, m.size))
        config_desc = Descriptor(OCI_CONFIG, config_digest, len(config_raw))
        mraw = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json(),
                           "layers": [d.to_json() for d in descs]})
        manifest = parse_manifest(mraw)
        assert isinstance(manifest, Manifest)
        names = tags or [f"localhost/{stem}:{'latest' if len(chosen) == 1 else i}"]
        plans.append(Plan(names, manifest, config, members, diff_ids,
                           [(config_raw, config_digest), (mraw, manifest.digest)], {}, None))
    return plans
