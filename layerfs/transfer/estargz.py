"""eStargz: write layers as seekable gzip (``layerfs convert --estargz``), read their TOC and footer.

The format is the one of stargz-snapshotter's ``docs/estargz.md``:

* the layer blob is a sequence of gzip members whose concatenation is an
  ordinary gzip stream of a valid tar; each tar header starts a new member,
  and every chunk of a regular file's data (``chunk_size`` bytes, 4 MiB by
  default) starts a new member, so a chunk can be fetched with one HTTP Range
  request and inflated alone;
* then one member holding a tar with the single file ``stargz.index.json``
  (the TOC, JSON: ``{"version": 1, "entries": [...]}``) and the tar's end;
* then the 51-byte footer: an empty gzip member whose FEXTRA field is the
  subfield ``SG`` with the text ``%016xSTARGZ`` (the TOC member's offset).

TOC entries carry name, type (dir, reg, symlink, hardlink, char, block, fifo,
chunk), size, modtime (RFC 3339; with a fraction when the mtime has one),
mode, uid, gid, linkName, devMajor/devMinor, xattrs (base64 in JSON),
digest (of a whole regular file), offset (of the member holding the chunk's
data, in the blob), chunkOffset, chunkSize (set unless the chunk runs to the
end of the file) and chunkDigest. The writer sets no ``innerOffset``: every
chunk starts its member (the lazy reader honours ``innerOffset`` of other
writers, which pack small files into one member).

The layer descriptor gets the annotations ``containerd.io/snapshot/stargz/toc.digest``
(sha256 of the TOC JSON) and ``io.containers.estargz.uncompressed-size``.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import struct
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable

from layerfs.errors import ContentError, StoreError
from layerfs.fs import read_sparse
from layerfs.image import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Manifest,
    Reference,
    json_bytes,
    parse_manifest,
)
from layerfs.index import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, load_or_build, open_layer_reader
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = ["TOC_TAR_NAME", "FOOTER_SIZE", "TOC_DIGEST_ANNOTATION", "UNCOMPRESSED_SIZE_ANNOTATION",
           "DEFAULT_CHUNK_SIZE", "EStargzError", "footer_bytes", "parse_footer", "parse_toc_member",
           "EStargzWriter", "convert_layer", "convert_image", "is_estargz"]

TOC_TAR_NAME = "stargz.index.json"
FOOTER_SIZE = 51
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
DEFAULT_CHUNK_SIZE = 4 << 20
_LEVEL = 6
_BLOCK = tarfile.BLOCKSIZE
_XATTR_PREFIX = "SCHILY.xattr."
_TYPES = {FILE: "reg", DIR: "dir", SYMLINK: "symlink", HARDLINK: "hardlink", CHAR: "char", BLOCK: "block",
          FIFO: "fifo"}
_TAR_TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, HARDLINK: tarfile.LNKTYPE,
              CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE, FIFO: tarfile.FIFOTYPE}


class EStargzError(ContentError):
    """A malformed eStargz footer or TOC."""


def is_estargz(desc: Descriptor) -> bool:
    return bool(desc.annotations and desc.annotations.get(TOC_DIGEST_ANNOTATION))


# --- footer ---------------------------------------------------------------------------------

def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member (stored block) with the TOC offset in FEXTRA."""
    sub = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(sub)) + sub
    head = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    out = head + b"\x01\x00\x00\xff\xff" + struct.pack("<II", 0, 0)
    assert len(out) == FOOTER_SIZE
    return out


def parse_footer(data: bytes) -> int:
    """The TOC offset from the blob's last 51 bytes (raises :class:`EStargzError`)."""
    if len(data) != FOOTER_SIZE or data[:4] != b"\x1f\x8b\x08\x04":
        raise EStargzError("not an eStargz footer (no gzip header with an extra field)")
    (xlen,) = struct.unpack_from("<H", data, 10)
    extra = data[12:12 + xlen]
    if len(extra) != xlen or xlen < 4:
        raise EStargzError("eStargz footer: truncated extra field")
    i = 0
    while i + 4 <= len(extra):
        sid = extra[i:i + 2]
        (n,) = struct.unpack_from("<H", extra, i + 2)
        sub = extra[i + 4:i + 4 + n]
        if sid == b"SG" and len(sub) == 22 and sub.endswith(b"STARGZ"):
            try:
                return int(sub[:16], 16)
            except ValueError:
                break
        i += 4 + n
    raise EStargzError("eStargz footer: no SG subfield with a TOC offset")


def parse_toc_member(data: bytes, *, max_json: int = 256 << 20) -> tuple[bytes, dict]:
    """(TOC JSON bytes, parsed TOC) from the compressed bytes between the TOC offset and the footer."""
    try:
        d = zlib.decompressobj(31)
        raw = d.decompress(data, max_json + 4 * _BLOCK)
    except zlib.error as e:
        raise EStargzError(f"eStargz TOC member is not gzip: {e}") from None
    if len(raw) < _BLOCK:
        raise EStargzError("eStargz TOC member is truncated")
    try:
        ti = tarfile.TarInfo.frombuf(raw[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise EStargzError(f"eStargz TOC tar header: {e}") from None
    if ti.name != TOC_TAR_NAME or ti.size > max_json or len(raw) < _BLOCK + ti.size:
        raise EStargzError(f"eStargz TOC member holds {ti.name!r} ({ti.size} bytes), not {TOC_TAR_NAME}")
    js = raw[_BLOCK:_BLOCK + ti.size]
    try:
        toc = json.loads(js)
    except ValueError as e:
        raise EStargzError(f"eStargz TOC is not JSON: {e}") from None
    if not isinstance(toc, dict) or not isinstance(toc.get("entries"), list):
        raise EStargzError("eStargz TOC has no entries list")
    return js, toc


# --- writer ---------------------------------------------------------------------------------

def _rfc3339(mtime_ns: int) -> str:
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    t = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(seconds=sec)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    if ns:
        base += "." + f"{ns:09d}".rstrip("0")
    return base + "Z"


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (UTC 'Z' or an offset; fraction optional)."""
    s = text.strip()
    frac_ns = 0
    if "." in s:
        head, _, rest = s.partition(".")
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        tz = rest[len(digits):]
        frac_ns = int((digits + "000000000")[:9]) if digits else 0
        s = head + tz
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    t = _dt.datetime.fromisoformat(s)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + frac_ns


class EStargzWriter:
    """Streams one eStargz layer to *sink*; tracks the compressed offset, diff_id and TOC."""

    def __init__(self, sink: Callable[[bytes], object], *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size < _BLOCK:
            raise ValueError("chunk size too small")
        self._sink = sink
        self.chunk_size = chunk_size
        self.n = 0                      # compressed bytes written
        self.usize = 0                  # uncompressed bytes
        self.diff = hashlib.sha256()
        self.entries: list[dict] = []
        self._gz = None

    def _out(self, b: bytes) -> None:
        if b:
            self._sink(b)
            self.n += len(b)

    def _open(self) -> None:
        if self._gz is None:
            self._gz = zlib.compressobj(_LEVEL, zlib.DEFLATED, 31)

    def _close(self) -> None:
        if self._gz is not None:
            self._out(self._gz.flush())
            self._gz = None

    def _write(self, b: bytes) -> None:
        self._open()
        self.diff.update(b)
        self.usize += len(b)
        self._out(self._gz.compress(b))

    def add(self, *, name: str, type_: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
            linkname: str = "", devmajor: int = 0, devminor: int = 0, xattrs: dict[str, bytes] | None = None,
            read: Callable[[int, int], bytes] | None = None) -> None:
        """One member; *read(offset, n)* gives a regular file's bytes."""
        ti = tarfile.TarInfo(name)
        ti.type = _TAR_TYPES[type_]
        ti.mode = mode & 0o7777
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        sec, ns = divmod(mtime_ns, 1_000_000_000)
        ti.mtime = sec
        ti.size = size if type_ == FILE else 0
        ti.linkname = linkname
        ti.devmajor, ti.devminor = devmajor, devminor
        pax: dict[str, str] = {}
        if ns:
            pax["mtime"] = f"{sec}.{ns:09d}".rstrip("0")
        for k in sorted(xattrs or ()):
            pax[_XATTR_PREFIX + k] = bytes(xattrs[k]).decode("utf-8", "surrogateescape")
        ti.pax_headers = pax
        ent: dict = {"name": name, "type": _TYPES[type_]}
        if ti.size:
            ent["size"] = ti.size
        ent["modtime"] = _rfc3339(mtime_ns)
        if linkname:
            ent["linkName"] = linkname
        if ti.mode:
            ent["mode"] = ti.mode
        if uid:
            ent["uid"] = uid
        if gid:
            ent["gid"] = gid
        if devmajor:
            ent["devMajor"] = devmajor
        if devminor:
            ent["devMinor"] = devminor
        if xattrs:
            ent["xattrs"] = {k: base64.b64encode(bytes(v)).decode() for k, v in sorted(xattrs.items())}
        self._close()                    # every header starts a member
        self._write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if type_ != FILE or not ti.size:
            self.entries.append(ent)
            return
        assert read is not None
        whole = hashlib.sha256()
        chunk_entries = []
        written = 0
        while written < ti.size:
            self._close()                # every chunk starts a member
            n = min(self.chunk_size, ti.size - written)
            e = ent if written == 0 else {"name": name, "type": "chunk"}
            e["offset"] = self.n
            if written:
                e["chunkOffset"] = written
            if n == self.chunk_size:            # as estargz: a short last chunk runs to the end of the file
                e["chunkSize"] = n
            cd = hashlib.sha256()
            done = 0
            while done < n:
                b = read(written + done, min(1 << 20, n - done))
                if not b:
                    raise StoreError(f"{name}: layer data ends early")
                cd.update(b)
                whole.update(b)
                self._write(b)
                done += len(b)
            e["chunkDigest"] = "sha256:" + cd.hexdigest()
            chunk_entries.append(e)
            written += n
        if ti.size % _BLOCK:
            self._write(b"\0" * (_BLOCK - ti.size % _BLOCK))
        ent["digest"] = "sha256:" + whole.hexdigest()
        self.entries.extend(chunk_entries)

    def finish(self) -> tuple[Digest, Digest, int]:
        """Write the TOC member and the footer: (TOC digest, diff_id, uncompressed size)."""
        self._close()
        toc_off = self.n
        js = json.dumps({"version": 1, "entries": self.entries}, indent="\t").encode()
        ti = tarfile.TarInfo(TOC_TAR_NAME)
        ti.size = len(js)
        ti.mode = 0o644
        ti.uname = ti.gname = ""
        tar = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + js
        if len(js) % _BLOCK:
            tar += b"\0" * (_BLOCK - len(js) % _BLOCK)
        tar += b"\0" * (2 * _BLOCK)
        self._write(tar)
        self._close()
        self._out(footer_bytes(toc_off))          # an empty member: adds nothing to the tar
        return Digest("sha256", hashlib.sha256(js).hexdigest()), Digest("sha256", self.diff.hexdigest()), self.usize


# --- converting a stored image ---------------------------------------------------------------

@dataclass(frozen=True)
class ConvertedLayer:
    descriptor: Descriptor
    diff_id: Digest
    size: int


def convert_layer(store: Store, desc: Descriptor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ConvertedLayer:
    """Write an eStargz version of stored layer *desc* into *store* (same entries, new digest)."""
    index = load_or_build(store, desc)
    reader = open_layer_reader(store, desc, index)
    store.init()
    tmp = store.root / "ingest" / f".estargz-{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def sink(b: bytes) -> None:
                h.update(b)
                f.write(b)
            w = EStargzWriter(sink, chunk_size=chunk_size)
            for e in index.entries:
                name = e.path
                if e.type == DIR:
                    name = (name + "/") if name else "./"
                if e.type == FILE and e.size:
                    if e.sparse is not None:
                        sp = list(e.sparse)
                        read = (lambda off, n, sp=sp: read_sparse(reader, sp, off, n))
                    else:
                        read = (lambda off, n, base=e.offset: reader.read(base + off, n))
                else:
                    read = None
                w.add(name=name, type_=e.type, mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns,
                      size=e.size if e.type == FILE else 0, linkname=e.linkname or "",
                      devmajor=e.devmajor, devminor=e.devminor, xattrs=e.xattrs, read=read)
            toc_digest, diff_id, usize = w.finish()
            f.flush()
            os.fsync(f.fileno())
        digest = Digest("sha256", h.hexdigest())
        size = tmp.stat().st_size
        with store.ingest(digest, size) as ing:
            if not store.has_blob(digest, size):
                os.replace(tmp, ing.path)
                v = hashlib.sha256()
                with open(ing.path, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        v.update(b)
                ing.commit(v.hexdigest())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    ann = {TOC_DIGEST_ANNOTATION: str(toc_digest), UNCOMPRESSED_SIZE_ANNOTATION: str(usize)}
    out = Descriptor(OCI_LAYER_GZIP, digest, size, ann)
    idx = load_or_build(store, out)          # indexes it, and checks it reads back as the tar written
    if idx.diff_id != diff_id:
        raise StoreError(f"eStargz layer {digest.short} reads back as {idx.diff_id}, written as {diff_id}")
    store.set_layer_info(digest, {"diff_id": str(diff_id), "size": usize, "media_type": OCI_LAYER_GZIP})
    return ConvertedLayer(out, diff_id, usize)


def convert_image(store: Store, src: str, ref: Reference, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
    """Convert local image *src* to eStargz layers and tag the result *ref* (a name to tag, checked by the
    caller: no digest); returns its manifest."""
    store.init()
    _, manifest = store.resolve(src)
    cfg = store.config(manifest)
    with store.lock("gc", shared=True):
        layers = [convert_layer(store, d, chunk_size=chunk_size) for d in manifest.layers]
        doc = json.loads(cfg.raw)
        rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
        doc["rootfs"] = dict(rootfs, type="layers", diff_ids=[str(x.diff_id) for x in layers])
        config_raw = json_bytes(doc)
        config_digest = store.put_blob(config_raw)
        mdoc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": Descriptor(OCI_CONFIG, config_digest, len(config_raw)).to_json(),
                "layers": [x.descriptor.to_json() for x in layers]}
        raw = json_bytes(mdoc)
        m = parse_manifest(raw)
        assert isinstance(m, Manifest)
        store.put_blob(raw, m.digest)
        store.tag(str(ref), Descriptor(OCI_MANIFEST, m.digest, len(raw), None, ImageConfig.parse(config_raw).platform))
    return m
