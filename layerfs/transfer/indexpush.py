"""Published layer indexes: ``layerfs index push REF`` and their discovery by lazy mounts.

A plain gzip layer cannot be entered in the middle without its zran
checkpoints, and a lazy client cannot check a Range-fetched piece of a blob
against the blob's digest. ``layerfs index push`` therefore publishes, for
every gzip layer of an image, what a lazy mount needs: the layer's records
(one per tar member, as built at pull) and checkpoints into its compressed
stream, each with the sha256 of its 32 KiB inflate window and of the
compressed *span* up to the next checkpoint, computed from the verified
local blob.

The artifact (OCI image spec 1.1) is an image manifest with
``artifactType: application/vnd.layerfs.index.v1``, the empty config
(``{}``), ``subject`` = the image manifest as the registry has it, and one
blob per gzip layer (:data:`INDEX_MEDIA_TYPE`, annotated with the layer
digest and with the size and sha256 of its *head*). Such a blob is the head
(a layerfs index file, see :func:`layerfs.index.columns.pack_file`: JSON meta,
the zstd-compressed records, the checkpoint table) followed by the windows.
A lazy mount fetches the head with one Range request and checks it against
the manifest's annotation; a window and a span are fetched by Range when a
read first needs them, and each is checked against its sha256 in the head.

Discovery: the referrers API (``GET /v2/<name>/referrers/<digest>``) where
the registry has it, else the tag ``<alg>-<hex>`` of the subject digest (the
referrers tag schema: an image index listing the referrers, updated
read-modify-write keeping the entries of other artifacts).

Everything read from a registry is untrusted: every field of the head is
bounds-checked (:func:`parse_head`) and any fault raises
:class:`IndexArtifactError` with one line saying what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable

import zstandard

from layerfs.errors import ContentError, LayerfsError, ManifestError, NotFoundError, StoreError, TarError, UsageError
from layerfs.image import LAYER_COMPRESSION, OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, Descriptor, Digest, Index, Manifest
from layerfs.index import (FILE, HARDLINK, MAX_COMPRESSED_WINDOW, IndexFormatError, LayerIndex, build_index,
    encode_columns, load_or_build, normalize_path, pack_file, unpack_file)
from layerfs.registry import ClientPool, RegistryClient, RegistryOptions
from layerfs.store import SOURCE_MANIFEST_ANNOTATION
from layerfs.transfer.estargz import is_estargz

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT_TYPE", "INDEX_MEDIA_TYPE", "IndexArtifactError", "PublishedIndex", "IndexPushResult",
           "build_index_blob", "parse_head", "push_index", "find_index", "referrers_tag", "DEFAULT_PUSH_SPAN"]

ARTIFACT_TYPE = "application/vnd.layerfs.index.v1"
INDEX_MEDIA_TYPE = "application/vnd.layerfs.layer.index.v1"
LAYER_ANNOTATION = "io.layerfs.layer.digest"
HEAD_SIZE_ANNOTATION = "io.layerfs.index.head.size"
HEAD_DIGEST_ANNOTATION = "io.layerfs.index.head.digest"
EMPTY_CONFIG = b"{}"
#: checkpoint spacing (uncompressed bytes) of published indexes: a lazy read fetches about this much
DEFAULT_PUSH_SPAN = 1 << 20
FORMAT_VERSION = 1
_MAGIC = b"LFSLPUB\n"
#: per checkpoint: uoffset, coffset, bits, window offset (in the windows area), window length,
#: sha256 of the window, sha256 of the compressed span
_ROW = struct.Struct("<QQB3xQI32s32s")
_NO_HASH = bytes(32)
#: bounds on what a published index may ask a lazy client to hold
MAX_HEAD = 256 << 20
MAX_SPAN_BYTES = 64 << 20
MAX_COUNT = 50_000_000


class IndexArtifactError(ContentError):
    """A published layer index that is malformed, does not fit its layer, or cannot be published."""

    default_hint = "push it again with 'layerfs index push REF' from a store that has the image"


def referrers_tag(digest: Digest) -> str:
    """The referrers tag schema's tag for *digest*: ``<alg>-<hex>`` (at most 128 characters)."""
    return f"{digest.algorithm}-{digest.hex}"[:128]


# --- the format --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """Checkpoint *i* and the compressed bytes [cstart, cend) that decode the uncompressed [ustart, uend)."""

    ustart: int
    uend: int
    coffset: int
    bits: int
    cstart: int
    cend: int
    woff: int
    wlen: int
    wsha: bytes
    ssha: bytes


@dataclass
class PublishedIndex:
    """A parsed and checked head: the layer's records and spans."""

    layer: Digest
    layer_size: int
    diff_id: Digest
    size: int                   # uncompressed
    span: int
    index: LayerIndex           # records (checked), no checkpoints
    spans: list[Span]
    head_size: int


def _span_bounds(cps, i: int, csize: int) -> tuple[int, int]:
    cp = cps[i]
    start = cp.coffset - (1 if cp.bits else 0)
    end = cps[i + 1].coffset if i + 1 < len(cps) else csize
    return start, end


def build_index_blob(store, desc: Descriptor, *, span: int = DEFAULT_PUSH_SPAN) -> tuple[bytes, bytes]:
    """(blob, head) of the published index of the stored gzip layer *desc* (one read of the blob)."""
    idx = load_or_build(store, desc)
    path = store.blob_path(desc.digest)
    seek = build_index(path, "gzip", span)
    if seek.compressed_size != desc.size or seek.uncompressed_size != idx.size:
        raise StoreError(f"layer {desc.digest.short}: the blob does not match its index", where=str(store.root),
                         hint="pull the image again")
    cps = seek.checkpoints
    rows, windows = [], []
    woff = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, cp in enumerate(cps):
            cs, ce = _span_bounds(cps, i, desc.size)
            data = os.pread(fd, ce - cs, cs)
            if len(data) != ce - cs:
                raise StoreError(f"layer {desc.digest.short}: blob is short", where=str(store.root))
            w = cp.window or b""
            rows.append(_ROW.pack(cp.uoffset, cp.coffset, cp.bits, woff, len(w),
                                  hashlib.sha256(w).digest() if w else _NO_HASH, hashlib.sha256(data).digest()))
            windows.append(w)
            woff += len(w)
    finally:
        os.close(fd)
    cols = idx.columns()
    records = zstandard.ZstdCompressor(level=9).compress(encode_columns(cols))
    meta = {"layer": str(desc.digest), "layer_size": desc.size, "diff_id": str(idx.diff_id), "size": idx.size,
            "compression": "gzip", "span": span, "count": len(cols[0]), "checkpoints": len(cps)}
    head = pack_file(FORMAT_VERSION, meta, [records, b"".join(rows)], magic=_MAGIC)
    return head + b"".join(windows), head


def parse_head(data: bytes, layer: Descriptor, *, diff_id: Digest | None, windows_size: int,
               where: str) -> PublishedIndex:
    """Check a head fetched from a registry against its layer; raise :class:`IndexArtifactError`."""
    def bad(msg: str) -> IndexArtifactError:
        return IndexArtifactError(f"published index of layer {layer.digest.short}: {msg}", where=where)

    try:
        meta, (records, table) = unpack_file(bytes(data), FORMAT_VERSION, 2, magic=_MAGIC,
                                             what="published layer index")
    except IndexFormatError as e:
        raise bad(e.message) from None
    try:
        if meta.get("layer") != str(layer.digest) or meta.get("layer_size") != layer.size:
            raise bad(f"it describes layer {str(meta.get('layer'))[:80]!r}, not this one")
        mdiff = Digest.parse(meta["diff_id"])
        size, count, span = meta["size"], meta["count"], meta["span"]
        if meta.get("compression") != "gzip":
            raise bad("not a gzip index")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, count, span)) \
                or not (0 <= size < 1 << 62 and 0 <= count <= MAX_COUNT and 1 <= span <= MAX_SPAN_BYTES):
            raise bad("sizes out of range")
    except (KeyError, TypeError, LayerfsError) as e:
        if isinstance(e, IndexArtifactError):
            raise
        raise bad("metadata is malformed") from None
    if diff_id is not None and mdiff != diff_id:
        raise bad(f"its diff_id {mdiff.short} is not the image config's {diff_id.short}")
    # checkpoints
    if len(table) % _ROW.size or not table:
        raise bad("checkpoint table is malformed")
    spans: list[Span] = []
    rows = [_ROW.unpack_from(table, k) for k in range(0, len(table), _ROW.size)]
    prev_u = prev_bit = -1
    for i, (u, c, bits, woff, wlen, wsha, ssha) in enumerate(rows):
        if i == 0 and (u, c, bits, wlen) != (0, 0, 0, 0):
            raise bad("the first checkpoint is not the start of the blob")
        if bits > 7 or (bits and not wlen) or (bits and c < 1):
            raise bad(f"checkpoint {i}: bad bit offset")
        if wlen > MAX_COMPRESSED_WINDOW or woff + wlen > windows_size:
            raise bad(f"checkpoint {i}: window out of range")
        if not c < layer.size or not u <= size or u <= prev_u or c * 8 - bits <= prev_bit:
            raise bad(f"checkpoint {i}: offsets out of range or out of order")
        prev_u, prev_bit = u, c * 8 - bits
        spans.append(Span(u, 0, c, bits, c - (1 if bits else 0), 0, woff, wlen, wsha, ssha))
    for i, s in enumerate(spans):
        uend = spans[i + 1].ustart if i + 1 < len(spans) else size
        cend = spans[i + 1].coffset if i + 1 < len(spans) else layer.size
        if uend - s.ustart > MAX_SPAN_BYTES or not 0 < cend - s.cstart <= MAX_SPAN_BYTES:
            raise bad(f"checkpoint {i}: span too large")
        spans[i] = Span(s.ustart, uend, s.coffset, s.bits, s.cstart, cend, s.woff, s.wlen, s.wsha, s.ssha)
    # records
    idx = LayerIndex(None, diff_id=mdiff, size=size, compression="gzip", checkpoints=b"", digest=layer.digest,
                     compressed_size=layer.size, _raw_entries=bytes(records), _count=count)
    try:
        entries = idx.entries
    except IndexFormatError as e:
        raise bad(e.message) from None
    seen: set[str] = set()
    for e in entries:
        try:
            if e.path and normalize_path(e.path) != e.path:
                raise bad(f"path {e.path[:200]!r} is not normalised")
            if e.type == HARDLINK and (not e.linkname or normalize_path(e.linkname) != e.linkname):
                raise bad(f"hard link {e.path[:200]!r} has a bad target")
        except TarError:
            raise bad(f"path {e.path[:200]!r} is not allowed") from None
        if e.path in seen:
            raise bad(f"path {e.path[:200]!r} is listed twice")
        seen.add(e.path)
        if e.mode & ~0o7777:
            raise bad(f"{e.path[:200]!r}: bad mode")
        if e.type == FILE:
            if e.sparse is None:
                if e.offset + e.size > size:
                    raise bad(f"{e.path[:200]!r}: data beyond the end of the layer")
            else:
                for foff, ln, soff in e.sparse:
                    if foff + ln > e.size or soff + ln > size:
                        raise bad(f"{e.path[:200]!r}: sparse extent out of range")
    return PublishedIndex(layer.digest, layer.size, mdiff, size, span, idx, spans, 0)


# --- publishing ------------------------------------------------------------------------------

@dataclass
class IndexPushResult:
    digest: Digest                      # of the artifact manifest
    subject: Digest
    via: str                            # "referrers API" or "tag <alg>-<hex>"
    layers: list[tuple[Descriptor, Descriptor]]   # (image layer, index blob)
    skipped: list[tuple[Descriptor, str]]


def _subject_manifest(store, rec, m: Manifest) -> Manifest:
    """The image manifest as the registry has it (the original bytes of a Docker schema2 image)."""
    src = (rec.descriptor.annotations or {}).get(SOURCE_MANIFEST_ANNOTATION)
    if src:
        try:
            orig = store.manifest(Digest.parse(src))
        except (LayerfsError, OSError):
            orig = None
        if isinstance(orig, Manifest) and [l.digest for l in orig.layers] == [l.digest for l in m.layers]:
            return orig
    return m


def _upload(client: RegistryClient, repo: str, data: bytes) -> Digest:
    d = Digest.of(data)
    if not client.blob_exists(repo, d, size=len(data)):
        client.finish_upload(repo, client.start_upload(repo), d, data)
    return d


def push_index(store, ref_text: str, *, span: int = DEFAULT_PUSH_SPAN, registry_options: RegistryOptions | None = None,
               progress: Callable[[str], None] | None = None) -> IndexPushResult:
    """Publish the layer indexes of the local image *ref_text* to its registry (see the module docs)."""
    say = progress or (lambda _m: None)
    if not 4096 <= span <= MAX_SPAN_BYTES:
        raise UsageError(f"index span {span} out of range", hint="use 4k to 64M")
    rec, stored = store.resolve(ref_text)
    ref = rec.reference
    if ref is None:
        raise UsageError(f"{ref_text} names an image by id; name it by the reference it was pushed as",
                         hint="layerfs index push REGISTRY/NAME:TAG")
    m = _subject_manifest(store, rec, stored)
    client = ClientPool(registry_options)(ref.registry)
    repo = ref.repository
    where = f"{ref.registry}/{repo}"
    try:
        client.get_manifest(repo, str(m.digest))
    except NotFoundError:
        raise UsageError(f"{where} does not have the image {m.digest.short}", where=ref.registry,
                         hint=f"push it first: layerfs push {ref_text}") from None
    pushed: list[tuple[Descriptor, Descriptor]] = []
    skipped: list[tuple[Descriptor, str]] = []
    for desc in m.layers:
        if LAYER_COMPRESSION.get(desc.media_type) != "gzip":
            skipped.append((desc, "not gzip"))
            continue
        if is_estargz(desc):
            skipped.append((desc, "eStargz (has its own TOC)"))
            continue
        if not store.has_blob(desc.digest, desc.size):
            raise StoreError(f"layer {desc.digest.short} is not in the store", where=str(store.root),
                             hint=f"pull the image first: layerfs pull {ref_text}")
        blob, head = build_index_blob(store, desc, span=span)
        d = _upload(client, repo, blob)
        ann = {LAYER_ANNOTATION: str(desc.digest), HEAD_SIZE_ANNOTATION: str(len(head)),
               HEAD_DIGEST_ANNOTATION: str(Digest.of(head))}
        pushed.append((desc, Descriptor(INDEX_MEDIA_TYPE, d, len(blob), ann)))
        say(f"{desc.digest.short}: index pushed ({len(blob)} bytes)")
    for desc, why in skipped:
        say(f"{desc.digest.short}: skipped ({why})")
    if not pushed:
        raise UsageError(f"{ref_text} has no plain gzip layer to index", where=where)
    _upload(client, repo, EMPTY_CONFIG)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": {"mediaType": OCI_EMPTY, "digest": str(Digest.of(EMPTY_CONFIG)), "size": len(EMPTY_CONFIG),
                      "data": "e30="},
           "layers": [d.to_json() for _, d in pushed],
           "subject": {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw)}}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    digest, subject_header = client.put_manifest_ex(repo, str(Digest.of(raw)), raw, OCI_MANIFEST)
    if subject_header == str(m.digest):
        via = "referrers API"
    else:
        tag = referrers_tag(m.digest)
        _add_to_tag_index(client, repo, tag, Descriptor(OCI_MANIFEST, digest, len(raw), artifact_type=ARTIFACT_TYPE))
        via = f"tag {tag}"
    return IndexPushResult(digest, m.digest, via, pushed, skipped)


def _add_to_tag_index(client: RegistryClient, repo: str, tag: str, new: Descriptor) -> None:
    """Referrers tag schema: list *new* in the index at *tag*, keeping the entries of other artifacts
    (an older layerfs index of the same image is replaced)."""
    try:
        cur = client.get_manifest(repo, tag)
    except NotFoundError:
        cur = None
    entries: list = []
    if cur is not None:
        if not isinstance(cur, Index) or cur.media_type != OCI_INDEX:
            raise ManifestError(f"tag {tag} of {repo} exists and is not an OCI image index; not overwriting it",
                                where=client.registry, hint="delete that tag if it is not needed")
        entries = [e for e in json.loads(cur.raw)["manifests"]
                   if isinstance(e, dict) and e.get("artifactType") != ARTIFACT_TYPE]
    entries.append(new.to_json())
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                     separators=(",", ":")).encode()
    if cur is not None and cur.raw == raw:
        return
    client.put_manifest(repo, tag, raw, OCI_INDEX)


# --- discovery ---------------------------------------------------------------------------------

def find_index(client: RegistryClient, repo: str, manifest: Manifest) -> tuple[Manifest, str] | None:
    """(artifact manifest, how it was found) of the newest layerfs index attached to *manifest*, or None."""
    where = f"{client.registry}/{repo}"
    listing = client.get_referrers(repo, manifest.digest, artifact_type=ARTIFACT_TYPE)
    via = "referrers API"
    if listing is None:
        tag = referrers_tag(manifest.digest)
        via = f"tag {tag}"
        try:
            listing = client.get_manifest(repo, tag)
        except NotFoundError:
            return None
        if not isinstance(listing, Index):
            log.warning("%s: tag %s is not an image index; no published layer index", where, tag)
            return None
    cands = [d for d in listing.manifests if d.artifact_type == ARTIFACT_TYPE and d.media_type == OCI_MANIFEST]
    if not cands:
        return None
    art = client.get_manifest(repo, str(cands[-1].digest))     # verified against its digest
    if not isinstance(art, Manifest):
        raise IndexArtifactError(f"referrer {cands[-1].digest.short} is not an image manifest", where=where)
    try:
        at = json.loads(art.raw).get("artifactType")
    except ValueError:
        at = None
    if at != ARTIFACT_TYPE or art.subject is None or art.subject.digest != manifest.digest:
        raise IndexArtifactError(f"referrer {art.digest.short} is not a layerfs index of {manifest.digest.short}",
                                 where=where)
    return art, via


def index_blobs(art: Manifest) -> dict[Digest, Descriptor]:
    """Image layer digest -> its index blob's descriptor (annotations checked for shape)."""
    out: dict[Digest, Descriptor] = {}
    for d in art.layers:
        ann = d.annotations or {}
        if d.media_type != INDEX_MEDIA_TYPE:
            continue
        try:
            layer = Digest.parse(ann[LAYER_ANNOTATION])
            hs = ann[HEAD_SIZE_ANNOTATION]
            Digest.parse(ann[HEAD_DIGEST_ANNOTATION])
            if not hs.isdigit() or not 0 < int(hs) <= min(d.size, MAX_HEAD):
                raise ValueError
        except (KeyError, ValueError, LayerfsError):
            raise IndexArtifactError(f"index blob {d.digest.short} has bad annotations",
                                     where=f"artifact {art.digest.short}") from None
        out[layer] = d
    return out
