"""OCI / Docker image value types: digests, descriptors, platforms, manifests.

Manifests keep their raw bytes; their digest is always computed from those
bytes, never from a re-serialisation.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Mapping

from layerfs.errors import DigestMismatch, InvalidPlatform, ManifestError, SizeMismatch, UnsupportedMediaType

# --- media types -------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

#: layer media type -> compression ("gzip", "zstd" or None)
LAYER_COMPRESSION: dict[str, str | None] = {
    OCI_LAYER: None, OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: None, OCI_LAYER_ND_GZIP: "gzip", OCI_LAYER_ND_ZSTD: "zstd",
    DOCKER_LAYER: None, DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN: "gzip",
}
FOREIGN_LAYER_TYPES = frozenset({OCI_LAYER_ND, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD, DOCKER_FOREIGN})

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# Layer tar conventions (image-spec layer.md): a whiteout entry is WHITEOUT_PREFIX + name,
# an opaque directory holds OPAQUE_WHITEOUT; extended attributes ride in PAX records
# named XATTR_PREFIX + attribute.
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."

# --- digests -----------------------------------------------------------------

_HASHES = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        m = _DIGEST_RE.match(text or "")
        if not m:
            raise ManifestError(f"invalid digest {text!r}", hint="digests look like sha256:<64 hex digits>")
        algo, hexpart = m.group(1), m.group(2)
        want = _HASHES.get(algo)
        if want is None:
            raise ManifestError(f"unsupported digest algorithm {algo!r} in {text!r}",
                                hint="layerfs supports sha256 and sha512")
        if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise ManifestError(f"invalid {algo} digest {text!r}",
                                hint=f"{algo} digests are {want} lowercase hex digits")
        return cls(algo, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self):
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        """First 12 hex digits, as docker shows image and layer ids."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


# --- platforms ---------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = (text or "").strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidPlatform(f"invalid platform {text!r}")
        osname, arch = parts[0], _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else None
        return cls(osname, arch, variant).normalized()

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> "Platform | None":
        if not isinstance(d, Mapping):
            return None
        osname, arch = d.get("os"), d.get("architecture")
        if not isinstance(osname, str) or not isinstance(arch, str):
            return None
        variant = d.get("variant") if isinstance(d.get("variant"), str) else None
        osv = d.get("os.version") if isinstance(d.get("os.version"), str) else None
        return cls(osname, arch, variant or None, osv)

    @classmethod
    def host(cls) -> "Platform":
        machine = os.uname().machine.lower()
        arch = _ARCH_ALIASES.get(machine, machine)
        variant = None
        if machine.startswith("armv"):
            arch, variant = "arm", "v" + machine[4]
        elif arch == "arm64":
            variant = "v8"
        return cls("linux", arch, variant).normalized()

    def normalized(self) -> "Platform":
        arch, variant = _ARCH_ALIASES.get(self.architecture, self.architecture), self.variant
        if arch == "arm64" and variant in (None, "8", "v8"):
            variant = "v8"
        elif arch == "arm" and variant in (None, "7"):
            variant = "v7" if variant in (None, "7") else variant
        elif arch == "arm" and variant and not variant.startswith("v"):
            variant = "v" + variant
        return Platform(self.os, arch, variant, self.os_version)

    def matches(self, other: "Platform") -> bool:
        """True when *other* (an image's platform) satisfies this wanted platform."""
        a, b = self.normalized(), other.normalized()
        if a.os != b.os or a.architecture != b.architecture:
            return False
        if a.variant and b.variant and a.variant != b.variant:
            return False
        return True

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# --- descriptors -------------------------------------------------------------

def _require(d: Mapping[str, Any], key: str, typ, what: str):
    v = d.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
        raise ManifestError(f"{what}: field {key!r} is missing or not a {typ.__name__}")
    return v


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] | None = field(default=None, compare=False)
    platform: Platform | None = field(default=None, compare=False)
    urls: tuple[str, ...] = field(default=(), compare=False)
    artifact_type: str | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, d: Any, what: str = "descriptor") -> "Descriptor":
        if not isinstance(d, Mapping):
            raise ManifestError(f"{what} is not a JSON object")
        mt = _require(d, "mediaType", str, what)
        digest = Digest.parse(_require(d, "digest", str, what))
        size = _require(d, "size", int, what)
        if size < 0:
            raise ManifestError(f"{what}: negative size {size}")
        ann = d.get("annotations")
        ann = {str(k): str(v) for k, v in ann.items()} if isinstance(ann, Mapping) else None
        urls = d.get("urls")
        urls = tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else ()
        at = d.get("artifactType") if isinstance(d.get("artifactType"), str) else None
        return cls(mt, digest, size, ann, Platform.from_json(d.get("platform")), urls, at)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            p = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            if self.platform.os_version:
                p["os.version"] = self.platform.os_version
            out["platform"] = p
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


# --- manifests ---------------------------------------------------------------

def _load_json(raw: bytes, what: str, *, where: str | None = None) -> Mapping[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"malformed JSON in {what}: {e}", where=where) from None
    except RecursionError:
        raise ManifestError(f"malformed JSON in {what}: nested too deeply", where=where) from None
    if not isinstance(doc, Mapping):
        raise ManifestError(f"{what} is not a JSON object", where=where)
    return doc


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema2)."""

    raw: bytes
    media_type: str
    digest: Digest
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] | None = None
    subject: Descriptor | None = None

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker)."""

    raw: bytes
    media_type: str
    digest: Digest
    manifests: tuple[Descriptor, ...]

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))

    def platforms(self) -> list[Platform]:
        return [m.platform for m in self.manifests if m.platform]

    def select(self, want: Platform) -> Descriptor | None:
        """The best manifest for *want*: exact variant first, then any compatible one."""
        candidates = [m for m in self.manifests
                      if m.media_type in MANIFEST_TYPES | INDEX_TYPES and m.platform and want.matches(m.platform)]
        candidates.sort(key=lambda m: m.media_type in INDEX_TYPES)    # image manifests before nested indexes
        if not candidates:
            return None
        wn = want.normalized()
        for m in candidates:
            if m.platform.normalized().variant == wn.variant:
                return m
        return candidates[0]


def _kind(media_type: str | None) -> str | None:
    return "index" if media_type in INDEX_TYPES else "manifest" if media_type in MANIFEST_TYPES else None


def parse_manifest(raw: bytes, content_type: str | None = None, *, expected: Digest | None = None,
                   where: str | None = None) -> Manifest | Index:
    """Parse and validate manifest bytes; verify against *expected* when given.

    The document's own ``mediaType`` names its type; a ``Content-Type`` of another manifest or
    index type, or a document shaped as the other kind (an index with ``layers``, a manifest
    with ``manifests``), is refused: an ambiguous document could be read as either."""
    try:
        return _parse_manifest(raw, content_type, expected, where)
    except ManifestError as e:
        if e.where is None:
            e.where = where
        raise


def _parse_manifest(raw: bytes, content_type: str | None, expected: Digest | None,
                    where: str | None) -> Manifest | Index:
    algo = expected.algorithm if expected else "sha256"
    digest = Digest.of(raw, algo)
    if expected is not None and digest != expected:
        raise DigestMismatch(f"manifest digest is {digest}, expected {expected}", where=where)
    doc = _load_json(raw, "manifest")
    mt = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else None
    ct = (content_type or "").split(";")[0].strip() or None
    if ct in ("application/json", "text/plain", "application/octet-stream"):
        ct = None
    if mt and ct and mt != ct and _kind(mt) and _kind(ct):
        raise ManifestError(f"the registry sends a document of media type {mt} as Content-Type {ct}", where=where)
    kind = mt or ct
    if kind is None:
        # OCI allows mediaType to be absent: decide by shape
        if "manifests" in doc:
            kind = OCI_INDEX
        elif "config" in doc and "layers" in doc:
            kind = OCI_MANIFEST
    if kind in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or doc.get("schemaVersion") == 1:
        raise UnsupportedMediaType("Docker schema 1 manifests are not supported", where=where,
                                   hint="the image is very old; re-push it with a current tool")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}", where=where)
    if (kind in INDEX_TYPES and ("layers" in doc or "config" in doc)) or (kind in MANIFEST_TYPES and "manifests" in doc):
        other = "an image manifest" if kind in INDEX_TYPES else "an image index"
        raise ManifestError(f"ambiguous document: its type is {kind} but it has the fields of {other}", where=where)
    if kind in INDEX_TYPES:
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise ManifestError("image index has no 'manifests' list", where=where)
        descs = tuple(Descriptor.from_json(m, f"manifests[{i}]") for i, m in enumerate(items))
        return Index(raw, kind, digest, descs)
    if kind in MANIFEST_TYPES:
        config = Descriptor.from_json(doc.get("config"), "config")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise ManifestError("manifest has no 'layers' list", where=where)
        layers = tuple(Descriptor.from_json(l, f"layers[{i}]") for i, l in enumerate(layers_doc))
        ann = doc.get("annotations")
        ann = {str(k): str(v) for k, v in ann.items()} if isinstance(ann, Mapping) else None
        subject = Descriptor.from_json(doc["subject"], "subject") if isinstance(doc.get("subject"), Mapping) else None
        return Manifest(raw, kind, digest, config, layers, ann, subject)
    raise UnsupportedMediaType(f"unsupported manifest media type {kind!r}", where=where,
                               hint="layerfs reads OCI and Docker schema2 images")


def check_named(desc: Descriptor, doc: Manifest | Index, *, where: str | None = None) -> None:
    """*doc*, fetched by the digest of *desc* (e.g. an index entry), is what *desc* says: its size,
    and its kind (image manifest or image index) when *desc* names one."""
    what = f"manifest {desc.digest}"
    if len(doc.raw) != desc.size:
        raise SizeMismatch(f"{what} has {len(doc.raw)} bytes, its descriptor says {desc.size}", where=where)
    got = "index" if isinstance(doc, Index) else "manifest"
    said = _kind(desc.media_type)
    if said is not None and said != got:
        raise ManifestError(f"{what} is an image {got}, but the index entry for it says {desc.media_type}",
                            where=where)


# --- image config ------------------------------------------------------------

@dataclass(frozen=True)
class HistoryEntry:
    created: str | None
    created_by: str
    comment: str
    empty_layer: bool
    author: str


@dataclass(frozen=True)
class ImageConfig:
    raw: bytes
    digest: Digest
    doc: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: bytes, *, where: str | None = None) -> "ImageConfig":
        doc = _load_json(raw, "image config", where=where)
        rootfs = doc.get("rootfs")
        if rootfs is not None and not isinstance(rootfs, Mapping):
            raise ManifestError("image config: 'rootfs' is not an object", where=where)
        ids = (rootfs or {}).get("diff_ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(d, str) for d in ids)):
            raise ManifestError("image config: 'rootfs.diff_ids' is not a list of digests", where=where)
        try:
            for d in ids or ():
                Digest.parse(d)
        except ManifestError as e:
            raise ManifestError(f"image config: rootfs.diff_ids: {e.message}", where=where) from None
        return cls(raw, Digest.of(raw), doc)

    @property
    def created(self) -> str | None:
        c = self.doc.get("created")
        return c if isinstance(c, str) else None

    @property
    def diff_ids(self) -> list[Digest]:
        ids = (self.doc.get("rootfs") or {}).get("diff_ids") or []
        return [Digest.parse(d) for d in ids if isinstance(d, str)]

    @property
    def history(self) -> list[HistoryEntry]:
        out = []
        for h in self.doc.get("history") or []:
            if not isinstance(h, Mapping):
                continue
            out.append(HistoryEntry(
                created=h.get("created") if isinstance(h.get("created"), str) else None,
                created_by=str(h.get("created_by") or ""),
                comment=str(h.get("comment") or ""),
                empty_layer=bool(h.get("empty_layer")),
                author=str(h.get("author") or ""),
            ))
        return out

    @property
    def platform(self) -> Platform | None:
        return Platform.from_json(self.doc)


# --- verifying reader --------------------------------------------------------

class VerifyingReader:
    """Wraps a stream; fails at EOF when the bytes read do not match digest and size.

    Every blob read passes through one of these.
    """

    def __init__(self, stream: BinaryIO, digest: Digest, size: int | None, *, where: str | None = None):
        self._stream = stream
        self._digest = digest
        self._size = size
        self._hasher = digest.hasher()
        self._count = 0
        self._where = where
        self._done = False

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._count += len(data)
            if self._size is not None and self._count > self._size:
                raise SizeMismatch(f"blob {self._digest.short} is larger than its declared {self._size} bytes",
                                   where=self._where)
            self._hasher.update(data)
        if not data or (n is not None and n < 0):
            self._finish()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._size is not None and self._count != self._size:
            raise SizeMismatch(f"blob {self._digest.short} has {self._count} bytes, expected {self._size}",
                               where=self._where)
        got = self._hasher.hexdigest()
        if got != self._digest.hex:
            raise DigestMismatch(f"blob digest is {self._digest.algorithm}:{got}, expected {self._digest}",
                                 where=self._where)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def json_bytes(doc: Any) -> bytes:
    """Canonical-ish JSON for documents layerfs writes itself (sorted keys, compact)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def iter_layer_compression(layers: Iterable[Descriptor], *, where: str | None = None) -> list[str | None]:
    out = []
    for l in layers:
        if l.media_type not in LAYER_COMPRESSION:
            raise UnsupportedMediaType(f"unsupported layer media type {l.media_type!r} for {l.digest.short}",
                                       where=where)
        out.append(LAYER_COMPRESSION[l.media_type])
    return out


#: Docker schema2 media type -> OCI media type, as skopeo converts them when writing an OCI layout
DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
    DOCKER_FOREIGN: OCI_LAYER_ND_GZIP,
}


def docker_to_oci(manifest: Manifest) -> Manifest:
    """The OCI form of a Docker schema2 manifest: same config and layer blobs, OCI media types.

    OCI image layouts are read by tools (skopeo, umoci) that accept only OCI
    manifests, so the store keeps this form in ``index.json`` and the
    registry's original bytes beside it (for ``Digest:`` and ``push``).
    """
    if manifest.media_type != DOCKER_MANIFEST:
        return manifest

    def conv(d: Descriptor) -> dict[str, Any]:
        j = d.to_json()
        j["mediaType"] = DOCKER_TO_OCI.get(d.media_type, d.media_type)
        return j

    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": conv(manifest.config),
                           "layers": [conv(l) for l in manifest.layers]}
    if manifest.annotations:
        doc["annotations"] = dict(manifest.annotations)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    out = parse_manifest(raw)
    assert isinstance(out, Manifest)
    return out
