"""Deterministic builders for layer tars, image manifests and indexes.

Used by the test-suite to produce images with exactly known content, and by
``layerfs commit`` to write new layers.  Everything here is pure: the same
inputs give the same bytes (for a given Python / zlib / zstandard version),
nothing touches the network or the clock.

Layer tars are written in PAX format, entries in insertion order.  Extended
attributes are stored as ``SCHILY.xattr.<name>`` PAX records, the convention
GNU tar, Go's ``archive/tar``, containerd and Docker use.  Values are bytes and
may be arbitrary binary: values that are not valid UTF-8 make the entry's PAX
header carry ``hdrcharset=BINARY`` (this is what :mod:`tarfile` does) and the
record then holds the raw bytes.  Reading back with :mod:`tarfile` gives the
value as a ``str`` decoded with ``surrogateescape``;
``value.encode("utf-8", "surrogateescape")`` restores the exact bytes
(:func:`xattr_bytes` does that).  Xattr *names* must be text without ``=``
(a PAX keyword cannot contain it).  Non-UTF-8 *file names* can be given as
``str`` decoded with ``surrogateescape``.
"""
from __future__ import annotations

import copy
import gzip
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence, Union

from layerfs.image import (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_ZSTD, DOCKER_LIST,
    DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST,
    REF_NAME_ANNOTATION, Descriptor, Digest, Platform, json_bytes)

__all__ = [
    "DEFAULT_CREATED", "DEFAULT_MTIME", "XATTR_PREFIX", "WHITEOUT_PREFIX", "OPAQUE_WHITEOUT",
    "Compression", "LayerBuilder", "PrebuiltLayer", "BuiltImage", "BuiltIndex",
    "compress", "decompress", "layer_media_type", "build_image", "build_index",
    "write_oci_layout", "xattr_bytes",
]

#: 2024-01-01T00:00:00Z, the default mtime of every entry and the default ``created``.
DEFAULT_MTIME = 1704067200
DEFAULT_CREATED = "2024-01-01T00:00:00Z"

from layerfs.image import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, XATTR_PREFIX  # noqa: E402,F401  (re-exported)

Compression = Literal["gzip", "zstd"] | None

_BLOCK = tarfile.BLOCKSIZE
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


# --- layer tars --------------------------------------------------------------

def _norm_path(path: str, what: str = "path") -> str:
    """A layer-relative path: no leading '/', no '.' or '..' components."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must be a non-empty string")
    p = posixpath.normpath("/" + path).lstrip("/")
    if not p:
        raise ValueError(f"{what} {path!r} names the root; use add_tarinfo for such entries")
    if ".." in path.split("/"):
        raise ValueError(f"{what} {path!r} contains '..'; use add_tarinfo for hostile entries")
    return p


def xattr_bytes(tarinfo: tarfile.TarInfo) -> dict[str, bytes]:
    """The extended attributes of an entry read back with :mod:`tarfile`, as exact bytes."""
    out: dict[str, bytes] = {}
    for k, v in tarinfo.pax_headers.items():
        if k.startswith(XATTR_PREFIX):
            out[k[len(XATTR_PREFIX):]] = v.encode(_ENCODING, _ERRORS)
    return out


@dataclass
class _Member:
    info: tarfile.TarInfo
    data: bytes | None


@dataclass
class _Raw:
    data: bytes


class LayerBuilder:
    """Builds one uncompressed layer tar, entry by entry, deterministically.

    Every ``add_*`` method returns the builder so calls can be chained.  Paths
    are made layer-relative (a leading ``/`` is dropped); ``..`` is refused —
    use :meth:`add_tarinfo` (or :meth:`add_raw`) for deliberately odd entries.
    """

    def __init__(self, *, mtime: int = DEFAULT_MTIME, format: int = tarfile.PAX_FORMAT,
                 uid: int = 0, gid: int = 0, uname: str = "", gname: str = ""):
        if format not in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
            raise ValueError(f"unknown tar format {format!r}")
        self.mtime = mtime
        self.format = format
        self.uid, self.gid, self.uname, self.gname = uid, gid, uname, gname
        self._entries: list[_Member | _Raw] = []

    # -- metadata -------------------------------------------------------------
    def _info(self, path: str, type_: bytes, *, mode: int, uid: int | None, gid: int | None,
              mtime: int | float | None, xattrs: Mapping[str, bytes] | None,
              uname: str | None, gname: str | None, pax_headers: Mapping[str, str] | None) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = type_
        info.mode = mode & 0o7777
        info.uid = self.uid if uid is None else uid
        info.gid = self.gid if gid is None else gid
        info.uname = self.uname if uname is None else uname
        info.gname = self.gname if gname is None else gname
        info.mtime = self.mtime if mtime is None else mtime
        headers: dict[str, str] = dict(pax_headers or {})
        for name, value in (xattrs or {}).items():
            if not isinstance(name, str) or not name or "=" in name:
                raise ValueError(f"invalid xattr name {name!r}: must be non-empty text without '='")
            if not isinstance(value, (bytes, bytearray)):
                raise TypeError(f"xattr {name!r}: value must be bytes, not {type(value).__name__}")
            headers[XATTR_PREFIX + name] = bytes(value).decode(_ENCODING, _ERRORS)
        if headers and self.format != tarfile.PAX_FORMAT:
            raise ValueError("xattrs and PAX records need format=tarfile.PAX_FORMAT")
        info.pax_headers = headers
        return info

    def _append(self, info: tarfile.TarInfo, data: bytes | None = None) -> "LayerBuilder":
        self._entries.append(_Member(info, data))
        return self

    # -- entries --------------------------------------------------------------
    def add_file(self, path: str, data: bytes = b"", *, mode: int = 0o644, uid: int | None = None,
                 gid: int | None = None, mtime: int | float | None = None,
                 xattrs: Mapping[str, bytes] | None = None, uname: str | None = None,
                 gname: str | None = None, pax_headers: Mapping[str, str] | None = None) -> "LayerBuilder":
        info = self._info(_norm_path(path), tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                          xattrs=xattrs, uname=uname, gname=gname, pax_headers=pax_headers)
        info.size = len(data)
        return self._append(info, bytes(data))

    def add_dir(self, path: str, *, mode: int = 0o755, uid: int | None = None, gid: int | None = None,
                mtime: int | float | None = None, xattrs: Mapping[str, bytes] | None = None,
                uname: str | None = None, gname: str | None = None,
                pax_headers: Mapping[str, str] | None = None) -> "LayerBuilder":
        # tarfile appends the trailing '/' itself
        info = self._info(_norm_path(path), tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                          xattrs=xattrs, uname=uname, gname=gname, pax_headers=pax_headers)
        return self._append(info)

    def add_symlink(self, path: str, target: str, *, mode: int = 0o777, uid: int | None = None,
                    gid: int | None = None, mtime: int | float | None = None,
                    xattrs: Mapping[str, bytes] | None = None, uname: str | None = None,
                    gname: str | None = None) -> "LayerBuilder":
        """A symlink; *target* is stored verbatim (absolute, relative, dangling, '..' all allowed)."""
        if not target:
            raise ValueError("symlink target must not be empty")
        info = self._info(_norm_path(path), tarfile.SYMTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                          xattrs=xattrs, uname=uname, gname=gname, pax_headers=None)
        info.linkname = target
        return self._append(info)

    def add_hardlink(self, path: str, target: str, *, mode: int = 0o644, uid: int | None = None,
                     gid: int | None = None, mtime: int | float | None = None,
                     uname: str | None = None, gname: str | None = None) -> "LayerBuilder":
        """A hard link to *target*, a path in the image (stored layer-relative)."""
        info = self._info(_norm_path(path), tarfile.LNKTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                          xattrs=None, uname=uname, gname=gname, pax_headers=None)
        info.linkname = _norm_path(target, "hardlink target")
        return self._append(info)

    def add_whiteout(self, path: str, *, mode: int = 0o644,
                     mtime: int | float | None = None) -> "LayerBuilder":
        """Delete *path* from lower layers: writes ``DIR/.wh.NAME``."""
        p = _norm_path(path)
        parent, name = posixpath.split(p)
        if name.startswith(WHITEOUT_PREFIX):
            raise ValueError(f"cannot white out {path!r}: the name itself starts with {WHITEOUT_PREFIX!r}")
        return self.add_file(posixpath.join(parent, WHITEOUT_PREFIX + name), b"", mode=mode, mtime=mtime)

    def add_opaque(self, directory: str, *, mode: int = 0o644,
                   mtime: int | float | None = None) -> "LayerBuilder":
        """Hide everything lower layers have in *directory*: writes ``DIR/.wh..wh..opq``.

        ``"/"`` (or ``""``) makes the whole root opaque.
        """
        d = directory.strip("/")
        name = posixpath.join(_norm_path(d), OPAQUE_WHITEOUT) if d else OPAQUE_WHITEOUT
        info = self._info(name, tarfile.REGTYPE, mode=mode, uid=None, gid=None, mtime=mtime,
                          xattrs=None, uname=None, gname=None, pax_headers=None)
        return self._append(info, b"")

    def add_device(self, path: str, kind: Literal["c", "b"], major: int, minor: int, *,
                   mode: int = 0o666, uid: int | None = None, gid: int | None = None,
                   mtime: int | float | None = None, uname: str | None = None,
                   gname: str | None = None) -> "LayerBuilder":
        if kind not in ("c", "b"):
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        info = self._info(_norm_path(path), tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE,
                          mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=None, uname=uname,
                          gname=gname, pax_headers=None)
        info.devmajor, info.devminor = major, minor
        return self._append(info)

    def add_fifo(self, path: str, *, mode: int = 0o644, uid: int | None = None, gid: int | None = None,
                 mtime: int | float | None = None, uname: str | None = None,
                 gname: str | None = None) -> "LayerBuilder":
        info = self._info(_norm_path(path), tarfile.FIFOTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                          xattrs=None, uname=uname, gname=gname, pax_headers=None)
        return self._append(info)

    def add_tarinfo(self, info: tarfile.TarInfo, data: bytes | None = None, *,
                    set_size: bool = True) -> "LayerBuilder":
        """Escape hatch: append a copy of *info* as is (name, type, pax_headers untouched).

        When *data* is given and *set_size* is true, ``info.size`` is set to
        ``len(data)``.  With ``set_size=False`` the header keeps its own size
        and *data* is written verbatim (padded to a block), which lets tests
        write entries whose header and payload disagree.
        """
        info = copy.copy(info)
        info.pax_headers = dict(info.pax_headers)
        if data is not None and set_size:
            info.size = len(data)
        return self._append(info, None if data is None else bytes(data))

    def add_raw(self, data: bytes) -> "LayerBuilder":
        """Escape hatch: append *data* verbatim (e.g. hand-made GNU sparse headers).

        The caller is responsible for block alignment; nothing is padded.
        """
        self._entries.append(_Raw(bytes(data)))
        return self

    # -- output ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        """Names of the tar entries added so far (raw chunks excluded)."""
        return [e.info.name for e in self._entries if isinstance(e, _Member)]

    def build(self, *, end_of_archive: bool = True, pad_to_record: bool = False) -> bytes:
        """The uncompressed tar.

        ``end_of_archive`` writes the two zero blocks that end a tar (leave
        it out to produce a truncated stream); ``pad_to_record`` pads the
        output to tar's 10240-byte record size as GNU tar and :mod:`tarfile`
        do (Go's ``archive/tar``, and so Docker, does not).
        """
        out = io.BytesIO()
        for e in self._entries:
            if isinstance(e, _Raw):
                out.write(e.data)
                continue
            out.write(e.info.tobuf(self.format, _ENCODING, _ERRORS))  # type: ignore[arg-type]
            if e.data:
                out.write(e.data)
                rem = len(e.data) % _BLOCK
                if rem:
                    out.write(b"\0" * (_BLOCK - rem))
        if end_of_archive:
            out.write(b"\0" * (2 * _BLOCK))
            if pad_to_record:
                rem = out.tell() % tarfile.RECORDSIZE
                if rem:
                    out.write(b"\0" * (tarfile.RECORDSIZE - rem))
        return out.getvalue()


# --- compression -------------------------------------------------------------

def compress(data: bytes, kind: Compression, level: int | None = None) -> bytes:
    """Compress *data* deterministically (gzip with mtime 0 and no name; zstd with content size)."""
    if kind is None:
        return bytes(data)
    if kind == "gzip":
        return gzip.compress(data, compresslevel=6 if level is None else level, mtime=0)
    if kind == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3 if level is None else level,
                                        write_content_size=True, write_checksum=True).compress(data)
    raise ValueError(f"unknown compression {kind!r}")


def decompress(data: bytes, kind: Compression) -> bytes:
    if kind is None:
        return bytes(data)
    if kind == "gzip":
        return gzip.decompress(data)
    if kind == "zstd":
        import zstandard
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            return r.read()
    raise ValueError(f"unknown compression {kind!r}")


def layer_media_type(kind: Compression, *, docker: bool = False) -> str:
    if kind not in (None, "gzip", "zstd"):
        raise ValueError(f"unknown compression {kind!r}")
    if docker:
        return {None: DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP, "zstd": DOCKER_LAYER_ZSTD}[kind]
    return {None: OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[kind]


# --- images ------------------------------------------------------------------

class PrebuiltLayer(NamedTuple):
    """A layer blob made elsewhere (already compressed, e.g. a hand-made stream too big to hold
    uncompressed), for :func:`build_image`: stored as is, with the diff_id given."""

    blob: bytes
    compression: Compression
    diff_id: Digest


@dataclass(frozen=True)
class BuiltImage:
    """A complete single-platform image, every byte known.

    ``layers`` are the blobs as stored (compressed), ``uncompressed_layers``
    the tars they came from.  ``blobs`` maps digest -> bytes for everything
    content-addressed: config, layers *and* the manifest (as in an OCI layout);
    push config and layers from their descriptors, the manifest to
    ``/manifests/``.
    """

    config: bytes
    config_descriptor: Descriptor
    layers: tuple[bytes, ...]
    layer_descriptors: tuple[Descriptor, ...]
    uncompressed_layers: tuple[bytes, ...]
    diff_ids: tuple[Digest, ...]
    manifest: bytes
    manifest_media_type: str
    manifest_digest: Digest
    platform: Platform
    blobs: dict[Digest, bytes] = field(compare=False)

    @property
    def manifest_descriptor(self) -> Descriptor:
        return Descriptor(self.manifest_media_type, self.manifest_digest, len(self.manifest))

    @property
    def config_doc(self) -> dict[str, Any]:
        return json.loads(self.config)

    @property
    def manifest_doc(self) -> dict[str, Any]:
        return json.loads(self.manifest)


def _platform_json(p: Platform) -> dict[str, str]:
    out = {"architecture": p.architecture, "os": p.os}
    if p.variant:
        out["variant"] = p.variant
    if p.os_version:
        out["os.version"] = p.os_version
    return out


def build_image(layers: Sequence[bytes | PrebuiltLayer], *,
                compression: Compression | Sequence[Compression] = "gzip",
                compression_level: int | None = None,
                docker: bool = False,
                platform: Platform = Platform("linux", "amd64"),
                created: str | None = DEFAULT_CREATED,
                history: Sequence[Mapping[str, Any]] | None = None,
                config: Mapping[str, Any] | None = None,
                annotations: Mapping[str, str] | None = None,
                layer_media_types: Sequence[str | None] | None = None,
                extra_config: Mapping[str, Any] | None = None,
                raw_config: bytes | None = None) -> BuiltImage:
    """Build an image from uncompressed layer tars (lowest first).

    ``compression`` is one kind for all layers or one per layer.  ``docker``
    selects Docker schema2 media types instead of OCI ones.  ``history``
    defaults to one entry per layer (``created_by: "layer N"``); a given
    history may contain extra ``empty_layer`` entries but must have exactly one
    non-empty entry per layer.  ``config`` is the image config's ``config``
    object (Env, Cmd, ...).  Test escape hatches: ``layer_media_types``
    overrides individual layer media types (None keeps the default),
    ``extra_config`` is merged into the top level of the config document, and
    ``raw_config`` replaces the config blob entirely.  A :class:`PrebuiltLayer`
    is stored as it is (``compression`` does not apply to it; its
    ``uncompressed_layers`` item is empty).
    """
    n = len(layers)
    if compression is None or isinstance(compression, str):
        kinds: list[Compression] = [compression] * n
    else:
        kinds = list(compression)
        if len(kinds) != n:
            raise ValueError(f"{len(kinds)} compression kinds for {n} layers")
    if layer_media_types is not None and len(layer_media_types) != n:
        raise ValueError(f"{len(layer_media_types)} layer media types for {n} layers")

    blobs: dict[Digest, bytes] = {}
    diff_ids: list[Digest] = []
    stored: list[bytes] = []
    descs: list[Descriptor] = []
    for i, (tar, kind) in enumerate(zip(layers, kinds)):
        if isinstance(tar, PrebuiltLayer):
            diff_ids.append(tar.diff_id)
            blob, kind = tar.blob, tar.compression
        else:
            tar = bytes(tar)
            diff_ids.append(Digest.of(tar))
            blob = compress(tar, kind, compression_level)
        override = layer_media_types[i] if layer_media_types is not None else None
        mt = override if override is not None else layer_media_type(kind, docker=docker)
        d = Digest.of(blob)
        blobs[d] = blob
        stored.append(blob)
        descs.append(Descriptor(mt, d, len(blob)))

    if history is None:
        hist: list[dict[str, Any]] = []
        for i in range(n):
            h: dict[str, Any] = {"created_by": f"layer {i}"}
            if created is not None:
                h["created"] = created
            hist.append(h)
    else:
        hist = [dict(h) for h in history]
        nonempty = sum(1 for h in hist if not h.get("empty_layer"))
        if nonempty != n:
            raise ValueError(f"history has {nonempty} non-empty entries for {n} layers")

    if raw_config is None:
        doc: dict[str, Any] = dict(_platform_json(platform))
        if created is not None:
            doc["created"] = created
        doc["config"] = dict(config or {})
        doc["rootfs"] = {"type": "layers", "diff_ids": [str(d) for d in diff_ids]}
        doc["history"] = hist
        doc.update(extra_config or {})
        config_raw = json_bytes(doc)
    else:
        config_raw = bytes(raw_config)
    config_desc = Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, Digest.of(config_raw), len(config_raw))
    blobs[config_desc.digest] = config_raw

    manifest_mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    mdoc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_mt,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    if annotations:
        mdoc["annotations"] = dict(annotations)
    manifest_raw = json_bytes(mdoc)
    manifest_digest = Digest.of(manifest_raw)
    blobs[manifest_digest] = manifest_raw
    return BuiltImage(
        config=config_raw, config_descriptor=config_desc, layers=tuple(stored),
        layer_descriptors=tuple(descs),
        uncompressed_layers=tuple(b"" if isinstance(l, PrebuiltLayer) else bytes(l) for l in layers),
        diff_ids=tuple(diff_ids), manifest=manifest_raw, manifest_media_type=manifest_mt,
        manifest_digest=manifest_digest, platform=platform, blobs=blobs,
    )


class BuiltIndex(NamedTuple):
    """An image index / manifest list: ``raw, media_type, digest = build_index(...)``."""

    raw: bytes
    media_type: str
    digest: Digest

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))


def build_index(entries: Sequence[tuple[BuiltImage, Platform]], *, docker: bool = False,
                annotations: Mapping[str, str] | None = None) -> BuiltIndex:
    """A multi-platform index (OCI) or manifest list (``docker=True``) over *entries*."""
    mt = DOCKER_LIST if docker else OCI_INDEX
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": [Descriptor(img.manifest_media_type, img.manifest_digest, len(img.manifest),
                                 platform=plat).to_json() for img, plat in entries],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    raw = json_bytes(doc)
    return BuiltIndex(raw, mt, Digest.of(raw))


# --- OCI layout --------------------------------------------------------------

ImageOrIndex = Union[BuiltImage, tuple[BuiltIndex, Sequence[BuiltImage]]]


def write_oci_layout(directory: str | os.PathLike[str], image: ImageOrIndex, *,
                     ref_name: str | None = "latest") -> Path:
    """Write *image* into an OCI image layout at *directory* (created or extended).

    *image* is a :class:`BuiltImage`, or ``(index, images)`` for a
    multi-platform image.  The top-level ``index.json`` gets a descriptor
    annotated with ``org.opencontainers.image.ref.name`` = *ref_name*
    (replacing an older entry with that name).
    """
    root = Path(directory)
    blobdir = root / "blobs" / "sha256"
    blobdir.mkdir(parents=True, exist_ok=True)

    def put(d: Digest, data: bytes) -> None:
        p = root / "blobs" / d.algorithm / d.hex
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(p)

    if isinstance(image, BuiltImage):
        for d, data in image.blobs.items():
            put(d, data)
        top = image.manifest_descriptor
    else:
        index, images = image
        for img in images:
            for d, data in img.blobs.items():
                put(d, data)
        put(index.digest, index.raw)
        top = index.descriptor

    (root / "oci-layout").write_bytes(json_bytes({"imageLayoutVersion": "1.0.0"}))
    index_path = root / "index.json"
    if index_path.exists():
        doc = json.loads(index_path.read_bytes())
    else:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    entry = top.to_json()
    if ref_name is not None:
        entry["annotations"] = {REF_NAME_ANNOTATION: ref_name}
        doc["manifests"] = [m for m in doc.get("manifests", [])
                            if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != ref_name]
    doc.setdefault("manifests", []).append(entry)
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_bytes(json_bytes(doc))
    tmp.replace(index_path)
    return root
