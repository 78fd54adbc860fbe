"""Images from local files, named with skopeo's transports, imported into the store.

    load(store, "oci:/srv/layout:1.0")              # an OCI image layout (skopeo, buildah, umoci)
    load(store, "oci-archive:/tmp/img.tar")         # an OCI image layout in a tar
    load(store, "docker-archive:/tmp/app.tar.xz")   # `docker save` output, maybe gzip/xz/zstd-compressed
    load(store, "/tmp/app.tar")                     # no transport: the content decides

**Grammar** (containers/image's, on Linux; the path may not contain ``:``):

* ``oci:PATH[:REF]`` and ``oci-archive:PATH[:REF]`` -- *REF* is an image's
  ``org.opencontainers.image.ref.name`` in the layout's ``index.json``
  (letters and digits joined by ``-._:@+`` or ``--``, ``/`` between
  components), or ``@N``, the N-th (zero-based) entry of ``index.json``.
  Without one, the layout must list exactly one image.
* ``docker-archive:PATH[:REFERENCE|:@N]`` -- *REFERENCE* is a docker
  reference (``alpine:3.20``; no digest), matched against the ``RepoTags``
  of the archive's ``manifest.json``; ``@N`` is its N-th item.

**Reading.** A layout directory is read file by file. An archive is read
without extracting it: a first pass lists its members (and keeps the small
ones: ``index.json``, ``manifest.json``, manifests, configs); layers are then
streamed straight from the archive into the store. Plain tars and
``.tar.xz`` files (through python-xz, which seeks inside multi-block xz
without decompressing from the start) are read at random; ``.tar.gz`` and
``.tar.zst`` cannot seek, so they are read twice, sequentially: once for the
member list, once for the layers, in archive order.

**Trust.** Everything is untrusted input. Every blob is checked against its
digest and size (manifests and configs before anything is written; layers in
the same streaming pass that writes them and builds their layer index,
:class:`layerfs.transfer.pull.LayerWriter`, exactly as ``pull`` does), every layer's
uncompressed digest against the config's ``diff_ids``. Archive members with
absolute names or ``..`` escapes, symlinks pointing outside the archive,
duplicate names, missing files, truncated data and malformed JSON are each
one :class:`~layerfs.errors.LayerfsError` naming the file. Nothing is tagged
unless everything checked out, and blobs written by a failed import are
removed again (those another image uses stay).

**Names.** ``oci:``/``oci-archive:``: the image's ref name when it is a full
reference (has a ``/`` or ``:``, e.g. ``docker.io/library/alpine:3.20`` as
skopeo and nerdctl write it; containerd's ``io.containerd.image.name`` wins),
else ``localhost/<dirname or archive stem>:<ref name or latest>``.
``docker-archive:``: every ``RepoTags`` entry, else
``localhost/<archive stem>:latest``.

**docker-archive layers** become OCI layer blobs: an uncompressed
``layer.tar`` is stored as an OCI ``tar`` layer (digest = sha256 of the tar
= its diff_id), a compressed one as it is (``tar+gzip``/``tar+zstd``). The
config is the archive's config JSON, the manifest an OCI manifest built here.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import gzip
import hashlib
import json
import logging
import lzma
import os
import posixpath
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from layerfs.errors import (
    ContentError,
    DecompressionLimit,
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    LayerfsError,
    ManifestError,
    PlatformNotFound,
    SizeMismatch,
    TarError,
    UnsupportedMediaType,
    UsageError,
)
from layerfs.image import (FOREIGN_LAYER_TYPES, OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST,
    REF_NAME_ANNOTATION, Descriptor, Digest, ImageConfig, Index, Manifest, Platform, docker_to_oci,
    iter_layer_compression, json_bytes, parse_manifest)
from layerfs.image import LOCAL_TRANSPORTS, Reference, is_local_source
from layerfs.index import layer_too_large, sniff_compression
from layerfs.index import max_layer_size as layer_size_limit
from layerfs.store import Store
from layerfs.transfer.pull import (
    REPO_DIGEST_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    ProgressSink,
    check_diff_id,
    ingest_layer,
    layer_facts_from_blob,
    no_progress,
)

log = logging.getLogger(__name__)

__all__ = ["TRANSPORTS", "Source", "LoadOptions", "LoadedImage", "LoadResult", "SourceError", "SourceNotFound",
           "is_source", "load"]

TRANSPORTS = LOCAL_TRANSPORTS
#: largest JSON document read whole (index.json, manifest.json, manifests, configs)
JSON_LIMIT = 8 << 20
#: containerd's annotation for the full image name in an OCI layout
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

_CHUNK = 1 << 20
_KEEP_LIMIT = 1 << 20      # archive members up to this size are kept in memory by the first pass ...
_KEEP_TOTAL = 64 << 20     # ... up to this much in all
_MAX_LINKS = 40
_DAMAGED = "the file is damaged, truncated or was tampered with; nothing was imported"
_HOSTILE = "the archive is damaged or malicious; nothing was imported"
_OCI_REF = re.compile(r"^[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_HEX64_JSON = re.compile(r"^([0-9a-f]{64})\.json$")
_GRAMMAR = {
    "oci": "use oci:DIR[:REF] or oci:DIR:@N (the path may not contain ':')",
    "oci-archive": "use oci-archive:FILE[:REF] or oci-archive:FILE:@N (the path may not contain ':')",
    "docker-archive": "use docker-archive:FILE[:NAME:TAG] or docker-archive:FILE:@N (the path may not contain ':')",
}


class SourceError(ContentError):
    """A local image source (layout directory, archive) that is unreadable, incomplete or malformed."""

    default_hint = _DAMAGED


class SourceNotFound(SourceError):
    errno = _errno.ENOENT
    default_hint = "check the path"


# --- transport strings -------------------------------------------------------------------

is_source = is_local_source


@dataclass(frozen=True)
class Source:
    """A parsed transport string. ``transport`` is ``""`` for a bare path (decided by its content)."""

    transport: str
    path: str
    ref: str | None = None      # oci: a ref name; docker-archive: a canonical tagged reference
    index: int | None = None    # @N

    @classmethod
    def parse(cls, text: str) -> "Source":
        """Parse ``TRANSPORT:PATH[:REF|:@N]`` as skopeo does (the path ends at the first ':')."""
        transport, sep, rest = text.partition(":")
        if not sep or transport not in TRANSPORTS:
            raise InvalidReference(f"{text!r} does not start with an image transport",
                                   hint="use oci:DIR[:REF], oci-archive:FILE[:REF] or docker-archive:FILE[:TAG]")
        path, _, sel = rest.partition(":")
        if not path:
            raise UsageError(f"{transport}: reference {text!r} names no path", hint=_GRAMMAR[transport])
        ref = index = None
        if sel.startswith("@"):
            digits = sel[1:]
            if not (digits.isascii() and digits.isdigit()):
                raise UsageError(f"invalid source index {sel!r} in {text!r}",
                                 hint="@N is the zero-based position of the image, e.g. @0")
            index = int(digits)
        elif sel and transport == "docker-archive":
            try:
                r = Reference.parse(sel)
            except InvalidReference as e:
                raise InvalidReference(f"docker-archive: invalid reference {sel!r} in {text!r}: {e.message}",
                                       hint=_GRAMMAR[transport]) from None
            if r.digest is not None:
                raise UsageError(f"docker-archive does not support digest references: {sel!r}",
                                 hint="name the image by NAME:TAG or @N")
            ref = str(r)
        elif sel:
            if not _OCI_REF.match(sel):
                raise UsageError(f"invalid image name {sel!r} in {text!r}",
                                 hint="OCI ref names are letters and digits joined by - . _ : @ + or --, "
                                      "with / between components")
            ref = sel
        return cls(transport, path, ref, index)

    def __str__(self) -> str:
        s = f"{self.transport}:{self.path}" if self.transport else self.path
        if self.ref is not None:
            s += ":" + self.ref
        elif self.index is not None:
            s += f":@{self.index}"
        return s


# --- results -----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    platform: Platform | None = None    # for an image index (default: this host's platform)
    single: bool = False                # exactly one image: a source holding several needs :REF or :@N
    stem: str | None = None             # for localhost/<stem>:TAG names (default: from the path)
    max_layer_size: int | None = None   # most a layer may inflate to (None: see layerfs.index.limits.max_layer_size)


@dataclass
class LoadedImage:
    names: list[str]            # canonical references tagged in the store (the one asked for first)
    manifest: Manifest          # as stored (OCI)
    config: ImageConfig
    repo_digest: Digest | None  # the digest the source knows the image by (oci: index or manifest)
    loaded_layers: int = 0      # layers written (the others were in the store already)

    @property
    def familiar_names(self) -> list[str]:
        return [Reference.parse(n, default_tag=False).familiar() for n in self.names]


@dataclass
class LoadResult:
    source: Source              # with the transport found for a bare path
    images: list[LoadedImage]

    @property
    def names(self) -> list[str]:
        return [n for img in self.images for n in img.names]


# --- reading files: a layout directory or an archive -------------------------------------

@dataclass
class _Member:
    name: str                   # normalised, archive- or directory-relative
    kind: str                   # "file", "symlink", "hardlink", "other"
    size: int
    offset: int = 0             # of the data in the (uncompressed) tar stream
    target: str | None = None   # links: the normalised name they point at


def _open_regular(path: Path, what: str) -> BinaryIO:
    """Open a regular file for reading (never blocking on a FIFO, never a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceNotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"{what} {path} is a directory") from None
    except OSError as e:
        raise SourceError(f"cannot open {what} {path}: {e.strerror}", hint="check the path and its permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SourceError(f"{what} {path} is {kind}", hint="save the image to a file first")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class _Dir:
    """The files of an OCI layout directory (names built here from validated digests, never from input)."""

    seekable = True

    def __init__(self, root: Path):
        self.root = root
        self.where = str(root)

    def close(self) -> None:
        pass

    def find(self, name: str) -> _Member | None:
        try:
            st = os.stat(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SourceError(f"cannot read {name}: {e.strerror}", where=self.where, hint=None) from None
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{name} is not a regular file", where=self.where)
        return _Member(name, "file", st.st_size)

    def _chunks(self, m: _Member) -> Iterator[bytes]:
        with _open_regular(self.root / m.name, "file") as f:
            while True:
                try:
                    b = f.read(_CHUNK)
                except OSError as e:
                    raise SourceError(f"cannot read {m.name}: {e.strerror}", where=self.where, hint=None) from None
                if not b:
                    return
                yield b

    def read(self, m: _Member, limit: int) -> bytes:
        if m.size > limit:
            raise SourceError(f"{m.name} is {m.size} bytes, more than the {limit} a JSON document may have",
                              where=self.where)
        out = bytearray()
        for b in self._chunks(m):
            out += b
            if len(out) > limit:
                raise SourceError(f"{m.name} grew beyond {limit} bytes while being read", where=self.where)
        return bytes(out)

    def stream(self, members: list[_Member]) -> Iterator[tuple[_Member, Iterator[bytes]]]:
        for m in members:
            yield m, self._chunks(m)


class _Archive:
    """A tar archive (plain, gzip, xz or zstd), read in place: see the module doc.

    A compressed archive may inflate to no more than a layer may
    (:func:`~layerfs.index.limits.max_layer_size` of the archive's size): xz
    says its size up front, gzip and zstd are counted while they are read."""

    def __init__(self, path: Path, max_layer_size: int | None = None):
        self.path = path
        self.where = str(path)
        self.members: dict[str, _Member] = {}
        self._kept: dict[str, bytes] = {}
        self._kept_total = 0
        self._heads: dict[str, bytes] = {}
        self._digests: dict[str, Digest] = {}
        self._raw: BinaryIO | None = None
        with _open_regular(path, "archive") as f:
            head = f.read(6)
        self.compression = sniff_compression(head)
        if self.compression == "bzip2":
            raise UnsupportedMediaType("bzip2-compressed archives are not supported", where=self.where,
                                       hint="decompress it first (bunzip2), or use gzip, xz or zstd")
        self.seekable = self.compression in (None, "xz")
        self.limit = layer_size_limit(os.stat(path).st_size, max_layer_size)
        self._scan()

    # -- plumbing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn the many ways a damaged archive fails into one SourceError."""
        try:
            yield
        except LayerfsError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise SourceError(f"{what}: {_describe(e)}", where=self.where) from None
        except OSError as e:
            if e.errno is None:   # decompressors report damage as bare OSErrors
                raise SourceError(f"{what}: {_describe(e)}", where=self.where) from None
            raise SourceError(f"{what}: {e.strerror or e}", where=self.where, hint="check the file") from None
        except ImportError as e:
            raise UnsupportedMediaType(f"reading {self.compression}-compressed archives needs the "
                                       f"{'python-xz' if self.compression == 'xz' else e.name} package",
                                       where=self.where, hint="pip install python-xz, or decompress the archive "
                                                              "first") from None
        except Exception as e:   # python-xz's XZError, zstandard's ZstdError, ...
            if type(e).__module__.split(".")[0] in ("xz", "zstandard", "zstd"):
                raise SourceError(f"{what}: damaged or truncated {self.compression} data ({e})",
                                  where=self.where) from None
            raise

    def _open_stream(self) -> BinaryIO:
        """The uncompressed tar stream, from the start."""
        if self.compression is None:
            return _open_regular(self.path, "archive")
        if self.compression == "gzip":
            return _Bounded(gzip.GzipFile(fileobj=_open_regular(self.path, "archive"), mode="rb"), self)
        if self.compression == "xz":
            import xz  # python-xz: random access into multi-block xz
            return xz.open(_open_regular(self.path, "archive"))
        import zstandard
        return _Bounded(zstandard.ZstdDecompressor().stream_reader(_open_regular(self.path, "archive"),
                                                                    read_across_frames=True, closefd=True), self)

    def too_big(self) -> DecompressionLimit:
        return layer_too_large(None, self.limit, subject=f"the {self.compression} archive", where=self.where)

    @staticmethod
    def _close(f: Any) -> None:
        if isinstance(f, _Bounded):
            f = f.raw
        inner = getattr(f, "fileobj", None)
        with contextlib.suppress(Exception):
            f.close()
        if inner is not None and hasattr(inner, "close"):   # GzipFile / XZFile over our file: close it too
            with contextlib.suppress(Exception):
                inner.close()

    def close(self) -> None:
        if self._raw is not None:
            self._close(self._raw)
            self._raw = None

    def _norm(self, name: str, what: str) -> str:
        """Normalise an archive-relative name; an absolute name or a ``..`` escape is hostile."""
        if "\0" in name:
            raise TarError(f"{what} {name!r} contains a NUL byte", where=self.where, hint=_HOSTILE)
        if name.startswith("/"):
            raise TarError(f"{what} {name!r} is an absolute path", where=self.where, hint=_HOSTILE)
        parts: list[str] = []
        for p in name.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    raise TarError(f"{what} {name!r} points outside the archive", where=self.where, hint=_HOSTILE)
                parts.pop()
            else:
                parts.append(p)
        return "/".join(parts)

    # -- pass 1: the member list -----------------------------------------------------------
    def _scan(self) -> None:
        with self._guard("cannot read the archive"):
            raw = self._open_stream()
            try:
                if self.seekable:
                    self._raw = raw
                    end = raw.seek(0, os.SEEK_END)
                    if self.compression is not None and end > self.limit:
                        raise self.too_big()
                    raw.seek(0)
                    tf = tarfile.open(fileobj=raw, mode="r:")
                    for ti in tf:
                        m = self._add(ti)
                        if m is None or m.kind != "file":
                            continue
                        if m.offset + m.size > end:
                            raise SourceError(f"the archive is truncated: member {m.name} needs "
                                              f"{m.offset + m.size - end} more bytes", where=self.where)
                        raw.seek(m.offset)
                        if m.size <= _KEEP_LIMIT and self._kept_total + m.size <= _KEEP_TOTAL:
                            data = raw.read(m.size)
                            self._keep(m, data)
                            self._heads[m.name] = data[:8]
                        else:
                            self._heads[m.name] = raw.read(8)
                    self._check_end(raw, tf.offset, end)
                else:
                    tf = tarfile.open(fileobj=raw, mode="r|")
                    for ti in tf:
                        m = self._add(ti)
                        if m is None or m.kind != "file":
                            continue
                        f = tf.extractfile(ti)
                        h = hashlib.sha256()
                        keep = m.size <= _KEEP_LIMIT and self._kept_total + m.size <= _KEEP_TOTAL
                        parts: list[bytes] = []
                        head = b""
                        while True:
                            b = f.read(_CHUNK)
                            if not b:
                                break
                            if len(head) < 8:
                                head += b[:8 - len(head)]
                            h.update(b)
                            if keep:
                                parts.append(b)
                        self._heads[m.name] = head
                        self._digests[m.name] = Digest("sha256", h.hexdigest())
                        if keep:
                            self._keep(m, b"".join(parts))
                    while raw.read(_CHUNK):   # the rest: the decompressor checks its trailer (CRC, size)
                        pass
                    self._close(raw)
            except BaseException:
                self._close(raw)
                self._raw = None
                raise

    def _check_end(self, raw: BinaryIO, offset: int, end: int) -> None:
        """tarfile stops quietly at a damaged or cut header: only zero blocks (or nothing) may follow."""
        if offset >= end:
            return
        raw.seek(offset)
        tail = raw.read(1024)
        if len(tail) < 512 or tail.strip(b"\0"):
            last = max(self.members.values(), key=lambda m: m.offset).name if self.members else None
            raise SourceError("the archive is truncated or damaged" + (f" after member {last}" if last else ""),
                              where=self.where)

    def _keep(self, m: _Member, data: bytes) -> None:
        if len(data) != m.size:
            raise SourceError(f"the archive is truncated in member {m.name}", where=self.where)
        self._kept[m.name] = data
        self._kept_total += len(data)

    def _add(self, ti: tarfile.TarInfo) -> _Member | None:
        name = self._norm(ti.name, "archive member")
        if not name or ti.isdir():
            return None
        target = None
        if ti.issym():
            if ti.linkname.startswith("/"):
                raise TarError(f"archive member {ti.name!r} is a symlink to the absolute path {ti.linkname!r}",
                               where=self.where, hint=_HOSTILE)
            target = self._link_target(posixpath.join(posixpath.dirname(name), ti.linkname), ti, "symlink")
            kind = "symlink"
        elif ti.islnk():
            target = self._link_target(ti.linkname, ti, "hard link")
            kind = "hardlink"
        elif ti.isreg() and not ti.issparse():
            kind = "file"
        else:
            kind = "other"
        if name in self.members:
            raise TarError(f"the archive has two members named {name!r}", where=self.where, hint=_HOSTILE)
        m = _Member(name, kind, ti.size if kind == "file" else 0, ti.offset_data, target)
        self.members[name] = m
        return m

    def _link_target(self, path: str, ti: tarfile.TarInfo, what: str) -> str:
        try:
            return self._norm(path, what)
        except TarError:
            raise TarError(f"archive member {ti.name!r} is a {what} to {ti.linkname!r}, outside the archive",
                           where=self.where, hint=_HOSTILE) from None

    # -- lookups -------------------------------------------------------------------------
    def find(self, name: str, what: str = "file") -> _Member | None:
        """The regular file *name* (links followed inside the archive), or None when absent."""
        n = self._norm(name, what)
        for _ in range(_MAX_LINKS):
            m = self.members.get(n)
            if m is None:
                return None
            if m.kind in ("symlink", "hardlink"):
                n = m.target
                continue
            if m.kind != "file":
                raise SourceError(f"{what} {name!r} is not a regular file in the archive", where=self.where)
            return m
        raise SourceError(f"{what} {name!r}: too many levels of links in the archive", where=self.where,
                          hint=_HOSTILE)

    def resolve(self, name: str, what: str) -> _Member:
        m = self.find(name, what)
        if m is None:
            raise SourceError(f"{what} {name!r} is missing from the archive", where=self.where)
        return m

    def head(self, m: _Member) -> bytes:
        return self._heads.get(m.name, b"")

    def digest(self, m: _Member) -> Digest:
        """sha256 of a member's data (sequential archives: from the first pass)."""
        if m.name in self._digests:
            return self._digests[m.name]
        h = hashlib.sha256()
        for b in self._chunks(m):
            h.update(b)
        d = self._digests[m.name] = Digest("sha256", h.hexdigest())
        return d

    # -- data ----------------------------------------------------------------------------
    def _chunks(self, m: _Member) -> Iterator[bytes]:
        if m.name in self._kept:
            yield self._kept[m.name]
            return
        assert self._raw is not None
        with self._guard(f"cannot read {m.name}"):
            self._raw.seek(m.offset)
            left = m.size
            while left:
                b = self._raw.read(min(_CHUNK, left))
                if not b:
                    raise SourceError(f"the archive is truncated in member {m.name}", where=self.where)
                left -= len(b)
                yield b

    def read(self, m: _Member, limit: int) -> bytes:
        if m.size > limit:
            raise SourceError(f"{m.name} is {m.size} bytes, more than the {limit} a JSON document may have",
                              where=self.where)
        if m.name in self._kept:
            return self._kept[m.name]
        if self.seekable:
            return b"".join(self._chunks(m))
        with contextlib.closing(self.stream([m])) as it:   # an extra pass (the first one kept enough already)
            for _, chunks in it:
                return b"".join(chunks)
        raise AssertionError("unreachable")

    def stream(self, members: list[_Member]) -> Iterator[tuple[_Member, Iterator[bytes]]]:
        """(member, its data in chunks) for each of *members*; consume each before the next.

        Seekable archives: in archive order, at random. Sequential ones: kept
        members first, then one more pass over the archive."""
        if self.seekable:
            for m in sorted(members, key=lambda m: m.offset):
                yield m, self._chunks(m)
            return
        want: dict[str, _Member] = {}
        for m in members:
            if m.name in self._kept:
                yield m, iter((self._kept[m.name],))
            else:
                want[m.name] = m
        if not want:
            return
        raw = None
        try:
            with self._guard("cannot read the archive"):
                raw = self._open_stream()
                tf = tarfile.open(fileobj=raw, mode="r|")
                it = iter(tf)
            while want:
                with self._guard("cannot read the archive"):
                    ti = next(it, None)
                if ti is None:
                    break
                name = self._norm(ti.name, "archive member")
                if name in want and ti.isreg():
                    m = want.pop(name)
                    if ti.size != m.size:
                        raise SourceError(f"member {name} changed while being read", where=self.where, hint=None)
                    yield m, self._member_chunks(tf.extractfile(ti), m)
        finally:
            if raw is not None:
                self._close(raw)
        if want:
            raise SourceError(f"member {next(iter(want))} disappeared while the archive was read", where=self.where,
                              hint=None)

    def _member_chunks(self, f: BinaryIO, m: _Member) -> Iterator[bytes]:
        while True:
            with self._guard(f"cannot read {m.name}"):
                b = f.read(_CHUNK)
            if not b:
                return
            yield b


class _Bounded:
    """A sequential decompressed stream that raises the archive's DecompressionLimit past its limit."""

    def __init__(self, raw: BinaryIO, archive: _Archive):
        self.raw = raw
        self.archive = archive
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        b = self.raw.read(n)
        self.count += len(b)
        if self.count > self.archive.limit:
            raise self.archive.too_big()
        return b

    def close(self) -> None:
        self.raw.close()


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "end-of-stream" in text or "unexpected end" in text:
        return f"the data ends too early ({text})"
    return text


Files = _Dir | _Archive


# --- reading JSON and small blobs ----------------------------------------------------------

def _json(raw: bytes, what: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"malformed JSON in {what}: {e}", where=where, hint=_DAMAGED) from None


def _blob_name(d: Digest) -> str:
    return f"blobs/{d.algorithm}/{d.hex}"


def _named_digest(name: str) -> Digest | None:
    """The digest a content-addressed member name claims: ``blobs/<algo>/<hex>``."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[-3] == "blobs":
        with contextlib.suppress(LayerfsError):
            return Digest.parse(f"{parts[-2]}:{parts[-1]}")
    return None


def _blob_member(files: Files, desc: Descriptor, what: str) -> _Member:
    m = files.find(_blob_name(desc.digest))
    if m is None:
        raise SourceError(f"{what} {desc.digest} is missing: no {_blob_name(desc.digest)}", where=files.where,
                          hint="the layout is incomplete; copy it again (e.g. with skopeo copy)")
    if m.size != desc.size:
        raise SizeMismatch(f"{what} {desc.digest.short} is {m.size} bytes, its descriptor says {desc.size}",
                           where=files.where, hint=_DAMAGED)
    return m


def _read_blob(files: Files, desc: Descriptor, what: str) -> bytes:
    """A small blob, verified against its descriptor's digest and size."""
    m = _blob_member(files, desc, what)
    raw = files.read(m, JSON_LIMIT)
    got = Digest.of(raw, desc.digest.algorithm)
    if got != desc.digest or len(raw) != desc.size:
        raise DigestMismatch(f"{what} {_blob_name(desc.digest)} does not match its digest (content is {got})",
                             where=files.where, hint=_DAMAGED)
    return raw


def _parse(raw: bytes, what: str, where: str, expected: Digest | None = None) -> Manifest | Index:
    _json(raw, what, where)
    try:
        return parse_manifest(raw, expected=expected, where=where)
    except LayerfsError as e:
        e.message = f"{what}: {e.message}"
        e.where = e.where or where
        if e.hint in (None, e.default_hint) or isinstance(e, DigestMismatch):
            e.hint = _DAMAGED
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
class _Plan:
    names: list[str]
    manifest: Manifest                  # as it will be stored (OCI)
    config: ImageConfig
    layers: list[_Member]               # the file of each layer, in manifest order
    diff_ids: list[Digest]
    blobs: list[tuple[bytes, Digest]]   # small blobs to store: config, manifests, index
    annotations: dict[str, str]
    repo_digest: Digest | None


def _kind(src: Source) -> str:
    return "archive" if src.transport.endswith("archive") else "layout"


def _plan_oci(files: Files, src: Source, opts: LoadOptions) -> list[_Plan]:
    where = files.where
    layout = files.find("oci-layout")
    if layout is not None:
        doc = _json(files.read(layout, JSON_LIMIT), "oci-layout", where)
        if not isinstance(doc, dict) or not isinstance(doc.get("imageLayoutVersion"), str):
            raise ManifestError("oci-layout has no imageLayoutVersion", where=where, hint=_DAMAGED)
    idx = files.find("index.json")
    if idx is None:
        hint = ("is it a docker-archive (docker save)? use docker-archive:FILE" if isinstance(files, _Archive)
                and files.find("manifest.json") else "an OCI image layout has index.json, oci-layout and blobs/")
        raise SourceError(f"index.json is missing: not an OCI image {_kind(src)}", where=where, hint=hint)
    top = _parse(files.read(idx, JSON_LIMIT), "index.json", where)
    if not isinstance(top, Index):
        raise ManifestError("index.json is not an image index", where=where, hint=_DAMAGED)
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
    plans: dict[Digest, _Plan] = {}
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
                                where=where, hint=_DAMAGED)
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
        plans[e.digest] = _Plan([name], stored, config, layers, diff_ids, blobs, ann,
                                index.digest if index is not None else m.digest)
    return list(plans.values())


def _config(raw: bytes, where: str) -> ImageConfig:
    try:
        return ImageConfig.parse(raw, where=where)
    except LayerfsError as e:
        if e.hint in (None, e.default_hint):
            e.hint = _DAMAGED
        raise


def _plan_docker(files: _Archive, src: Source, opts: LoadOptions) -> list[_Plan]:
    where = files.where
    mm = files.find("manifest.json")
    if mm is None:
        hint = ("is it an OCI archive? use oci-archive:FILE" if files.find("index.json")
                else "docker save writes one; archives from Docker before 1.10 are not supported")
        raise SourceError("manifest.json is missing: not a docker-archive", where=where, hint=hint)
    doc = _json(files.read(mm, JSON_LIMIT), "manifest.json", where)
    if not isinstance(doc, list):
        raise ManifestError("manifest.json is not a list of images", where=where, hint=_DAMAGED)
    items: list[tuple[int, str, list[str], list[str]]] = []
    for i, it in enumerate(doc):
        bad = f"manifest.json item @{i}"
        if not isinstance(it, dict) or not isinstance(it.get("Config"), str) or not isinstance(it.get("Layers"), list) \
                or not all(isinstance(x, str) for x in it["Layers"]):
            raise ManifestError(f"{bad} needs a Config path and a list of Layers paths", where=where, hint=_DAMAGED)
        tags_doc = it.get("RepoTags") or []
        if not isinstance(tags_doc, list) or not all(isinstance(t, str) for t in tags_doc):
            raise ManifestError(f"{bad}: RepoTags is not a list of names", where=where, hint=_DAMAGED)
        tags = []
        for t in tags_doc:
            try:
                r = Reference.parse(t)
            except InvalidReference as e:
                raise ManifestError(f"{bad}: invalid RepoTag {t!r}: {e.message}", where=where, hint=_DAMAGED) from None
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
                                 f"{config_digest})", where=where, hint=_DAMAGED)
        config = _config(config_raw, where)
        diff_ids = config.diff_ids
        if len(diff_ids) != len(layer_paths):
            raise ManifestError(f"config {cfg_path} lists {len(diff_ids)} diff_ids for the {len(layer_paths)} "
                                f"layers of manifest.json item @{i}", where=where, hint=_DAMAGED)
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
                                         where=where, hint=_DAMAGED)
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
        plans.append(_Plan(names, manifest, config, members, diff_ids,
                           [(config_raw, config_digest), (mraw, manifest.digest)], {}, None))
    return plans


# --- importing ---------------------------------------------------------------------------------

def _import(store: Store, files: Files, plans: list[_Plan], progress: ProgressSink,
            max_layer_size: int | None = None) -> list[LoadedImage]:
    """Stream the missing layers in, store the small blobs, tag; on failure remove what was written."""
    store.init()
    written: set[Digest] = set()
    try:
        with store.lock("gc", shared=True):   # as pull: blobs not yet tagged are safe from gc
            todo: dict[Digest, tuple[Descriptor, _Member, Digest | None]] = {}
            by_member: dict[str, Digest] = {}
            for p in plans:
                for j, (l, m) in enumerate(zip(p.manifest.layers, p.layers)):
                    did = p.diff_ids[j] if p.diff_ids else None
                    if l.digest in todo:
                        continue
                    if store.has_blob(l.digest, l.size):
                        progress(l.digest.short, "Already exists")
                        continue
                    if by_member.setdefault(m.name, l.digest) != l.digest:
                        raise DigestMismatch(f"layer file {m.name} is listed with two different digests "
                                             f"({by_member[m.name]} and {l.digest})", where=files.where,
                                             hint=_DAMAGED)
                    todo[l.digest] = (l, m, did)
            loaded: dict[Digest, bool] = {}
            members = {m.name: m for _, m, _ in todo.values()}
            with contextlib.closing(files.stream(list(members.values()))) as stream:
                for m, chunks in stream:
                    l, _, did = todo[by_member[m.name]]
                    short = l.digest.short
                    progress(short, "Loading layer", 0, l.size)
                    try:
                        info = ingest_layer(store, l, chunks, diff_id=did, where=f"{files.where}: {m.name}",
                                            max_size=max_layer_size)
                    except DigestMismatch as e:
                        e.hint = _DAMAGED
                        raise
                    if info is not None:
                        written.add(l.digest)
                        loaded[l.digest] = True
                    progress(short, "Loaded")
            # layers from before: their facts must be known and agree with the config
            for p in plans:
                for j, l in enumerate(p.manifest.layers):
                    info = store.layer_info(l.digest) or layer_facts_from_blob(store, l)
                    if p.diff_ids:
                        check_diff_id(l, info.get("diff_id"), p.diff_ids[j], where=files.where, hint=_DAMAGED)
            for p in plans:
                for raw, d in p.blobs:
                    if not store.has_blob(d, len(raw)):
                        store.put_blob(raw, d)
                        written.add(d)
            out = []
            for p in plans:
                desc = Descriptor(p.manifest.media_type, p.manifest.digest, len(p.manifest.raw), p.annotations or None,
                                  p.config.platform)
                for name in p.names:
                    store.tag(name, desc)
                out.append(LoadedImage(list(p.names), p.manifest, p.config, p.repo_digest,
                                       sum(1 for l in p.manifest.layers if loaded.pop(l.digest, False))))
            return out
    except BaseException:
        if written:
            try:
                store.gc(candidates=written)
            except Exception as e:   # noqa: BLE001 - the first error is the one reported
                log.warning("cannot remove the blobs of the failed import: %s", e)
        raise


# --- entry point ---------------------------------------------------------------------------------

def _open(src: Source, max_layer_size: int | None = None) -> tuple[Files, str]:
    """The files of *src* and its transport (decided by the content for a bare path)."""
    path = Path(src.path)
    if src.transport == "oci":
        if not path.is_dir():
            if path.exists():
                raise SourceError(f"{path} is not a directory", where=None,
                                  hint="oci: names an OCI layout directory; for an archive use oci-archive:FILE")
            raise SourceNotFound(f"OCI layout {path} does not exist")
        return _Dir(path), "oci"
    if src.transport == "" and path.is_dir():
        return _Dir(path), "oci"
    if src.transport and path.is_dir():
        raise SourceError(f"{path} is a directory", hint="for an OCI layout directory use oci:DIR")
    archive = _Archive(path, max_layer_size)
    if src.transport:
        return archive, src.transport
    if archive.find("manifest.json") is not None:
        return archive, "docker-archive"
    if archive.find("index.json") is not None:
        return archive, "oci-archive"
    archive.close()
    raise SourceError("neither a docker-archive (no manifest.json) nor an OCI archive (no index.json)",
                      where=str(path), hint="docker save and skopeo copy write archives layerfs can load")


def load(store: Store, source: str | os.PathLike[str] | Source, options: LoadOptions | None = None,
         progress: ProgressSink | None = None) -> LoadResult:
    """Import the image(s) of *source* into *store* and tag them.

    *source* is a transport string (``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:TAG]``), a :class:`Source`, or a bare path whose
    content decides (a directory is an OCI layout; an archive with
    ``manifest.json`` a docker-archive, one with only ``index.json`` an OCI
    archive). Without a REF/@N, every image of a source holding several is
    imported, unless ``options.single``. Raises one :class:`LayerfsError`
    for anything wrong; nothing is tagged then."""
    opts = options or LoadOptions()
    if isinstance(source, Source):
        src = source
    elif is_source(source):
        src = Source.parse(str(source))
    else:
        src = Source("", os.fspath(source))
    files, transport = _open(src, opts.max_layer_size)
    try:
        src = replace(src, transport=transport)
        if transport == "docker-archive":
            plans = _plan_docker(files, src, opts)   # type: ignore[arg-type]
        else:
            plans = _plan_oci(files, src, opts)
        images = _import(store, files, plans, progress or no_progress, opts.max_layer_size)
    finally:
        files.close()
    for img in images:
        log.info("loaded %s from %s", ", ".join(img.names), src)
    return LoadResult(src, images)
