"""Per-layer index (TOC): one record per tar member, built in one streaming pass.

While a layer blob streams in (from the network, or from the store when an
index has to be rebuilt), :class:`LayerIndexer`:

* decompresses it with :mod:`layerfs.index.gzindex`, which also records the
  random-access checkpoints a :class:`~layerfs.fs.tree.LayerReader` needs later;
* hashes the uncompressed tar (the layer's diff_id) and counts its size;
* parses the tar headers with the standard library's :mod:`tarfile`
  (:meth:`tarfile.TarInfo.fromtarfile`, the same code ``TarFile.next`` runs),
  recording for every member its path, type, mode, ids, size, mtime (ns),
  link target, device numbers, xattrs, the offset of its data in the
  uncompressed stream and its sparse map.

The tar parser is incremental and push-driven: member data is never copied,
only skipped, and a header that is not complete yet is simply parsed again
once more bytes arrive (``fromtarfile`` reads through a forward-only window
that raises an internal "need more" signal at its end), so it needs no
thread of its own to block in. By default the hashing and parsing still run
in one helper thread per indexer, behind a bounded queue, so they overlap
with inflating the next chunk (C code without the GIL). Plain ustar/GNU
headers take a faster path through :class:`_TarInfo` that yields exactly
what tarfile's own ``frombuf`` would.

:class:`LayerIndex` is saved beside the store (``ROOT/indexes/<algo>-<hex>.idx``)
in a versioned, xxhash-checked binary format (see :meth:`LayerIndex.save`);
:func:`load_or_build` rebuilds a missing, corrupt or outdated index from the
stored blob with one read of it.
"""
from __future__ import annotations

import array
import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import struct
import sys
import tarfile
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Iterable, NamedTuple
from urllib.parse import unquote_to_bytes

import xxhash
import zstandard

from layerfs.errors import ContentError, DecompressionLimit, LayerfsError, StoreError, TarError, UsageError
from layerfs.image import LAYER_COMPRESSION, Descriptor, Digest
from layerfs.index import gzindex
from layerfs.store import Store, atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "FILE", "DIR", "SYMLINK", "HARDLINK", "CHAR", "BLOCK", "FIFO", "TYPES",
    "Entry", "LayerIndex", "LayerIndexer", "IndexFormatError",
    "normalize_path", "index_path", "load_or_build", "build_from_blob", "open_layer_reader",
    "FORMAT_VERSION", "SYMLINK_MODE", "MAX_LAYER_SIZE_ENV", "max_layer_size", "layer_too_large", "parse_size",
    "format_size",
]

# --- records -----------------------------------------------------------------

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
CHAR = "char"
BLOCK = "block"
FIFO = "fifo"
#: entry types; the position is the type's code in the index file
TYPES = (FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO)
_TYPE_CODE = {t: i for i, t in enumerate(TYPES)}
#: the permission bits of every symlink: Linux has no others (lchmod does not exist), so the mode a tar
#: header or a TOC gives a symlink (0644 is common, e.g. with a PAX long target) is never shown or written
SYMLINK_MODE = 0o777


class Entry(NamedTuple):
    """One tar member.

    ``path`` is normalised (no leading ``./`` or ``/``, no ``.``/empty
    components, ``""`` for the root directory), a str with undecodable bytes
    surrogate-escaped. ``mode`` holds the permission bits incl.
    setuid/setgid/sticky (no type bits); always :data:`SYMLINK_MODE` for a
    symlink, whatever its source said. ``size`` is the file's size (the
    real size for a sparse file, 0 for non-files). ``linkname`` is the
    symlink target as written, or the normalised path of a hard link's
    target, and None for other types. ``offset`` is where the member's data
    starts in the uncompressed stream (TarInfo.offset_data). ``sparse`` is
    None or a tuple of (file_offset, length, stream_offset) data extents.
    ``xattrs`` is None or {name: raw bytes}.
    """

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str | None
    devmajor: int
    devminor: int
    offset: int
    xattrs: dict[str, bytes] | None
    sparse: tuple[tuple[int, int, int], ...] | None


_new_entry = functools.partial(tuple.__new__, Entry)   # Entry from a tuple, without Python-level __new__


def _shown(name: str, limit: int = 120) -> str:
    """*name* quoted for an error message, cut short (a PAX path may be megabytes long)."""
    r = repr(name)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(name)} characters)"


def normalize_path(name: str, *, where: str | None = None, what: str = "path") -> str:
    """Normalise a member name: strip ``/`` and ``./`` prefixes, drop ``.`` and
    empty components, resolve ``..`` lexically; a name that climbs above the
    root raises :class:`TarError` (as docker's ``filepath.Clean`` + breakout check)."""
    if "\0" in name:
        raise TarError(f"tar {what} {_shown(name)} contains a NUL byte", where=where)
    parts = []
    for p in name.split("/"):
        if p == "" or p == ".":
            continue
        if p == "..":
            if not parts:
                raise TarError(f"tar {what} {_shown(name)} escapes the layer root", where=where)
            parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


# --- the streaming tar scanner -------------------------------------------------

class _NeedMore(Exception):
    """Internal: the header being parsed continues beyond the bytes received so far."""


class _Window:
    """The file object ``tarfile`` reads from: a forward-only view of the
    uncompressed stream. ``data[0]`` is stream offset ``base``."""

    __slots__ = ("data", "base", "pos", "eof", "want")

    def __init__(self) -> None:
        self.data = b""
        self.base = 0
        self.pos = 0
        self.eof = False
        self.want = 0

    def read(self, n: int = -1) -> bytes:
        i = self.pos - self.base
        if n is None or n < 0:
            if not self.eof:
                raise _NeedMore
            j = len(self.data)
        else:
            j = i + n
            if j > len(self.data):
                if not self.eof:
                    self.want = self.base + j
                    raise _NeedMore
                j = len(self.data)
        if i >= j:
            return b""
        self.pos = self.base + j
        return self.data[i:j]

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.base:
            raise OSError("layer stream is not seekable backwards")
        self.pos = pos
        return pos


class _TarState:
    """What :meth:`tarfile.TarInfo.fromtarfile` needs of a TarFile."""

    __slots__ = ("fileobj", "encoding", "errors", "pax_headers", "offset")

    def __init__(self, fileobj: _Window):
        self.fileobj = fileobj
        self.encoding = "utf-8"
        self.errors = "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0


class _Slow(Exception):
    """Internal: leave this header to tarfile's own TarInfo.frombuf."""


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


class _TarInfo(tarfile.TarInfo):
    """TarInfo with a faster :meth:`frombuf` for the common header.

    tarfile's frombuf spends most of its time computing two checksums
    through struct and parsing fields one function call at a time. This one
    unpacks the header at once and checks the unsigned checksum with a
    C-level sum; for anything unusual (zero block, GNU sparse header,
    base-256 numbers, odd padding, a checksum that needs the signed
    variant, ...) it defers to tarfile's own code, so the result is always
    exactly what tarfile would produce (a differential test checks this).
    Everything else (PAX, GNU long names, sparse maps) is tarfile's code.
    """

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            if len(buf) != tarfile.BLOCKSIZE or buf[0] == 0:
                raise _Slow
            (name, mode, uid, gid, size, mtime, chksum, typ, linkname, _magic, uname, gname, devmajor, devminor,
             prefix) = _USTAR.unpack(buf)
            if typ == tarfile.GNUTYPE_SPARSE:
                raise _Slow
            # int() strips ASCII whitespace itself; whenever it accepts a field with the
            # trailing NULs/spaces removed, nti() (cut at the first NUL, strip) gives the same value
            chk = int(chksum.rstrip(b"\0 ") or b"0", 8)
            if chk != sum(buf) - sum(chksum) + 256:
                raise _Slow
            obj = cls()
            obj.name = name.partition(b"\0")[0].decode(encoding, errors)
            obj.mode = int(mode.rstrip(b"\0 ") or b"0", 8)
            obj.uid = int(uid.rstrip(b"\0 ") or b"0", 8)
            obj.gid = int(gid.rstrip(b"\0 ") or b"0", 8)
            obj.size = int(size.rstrip(b"\0 ") or b"0", 8)
            obj.mtime = int(mtime.rstrip(b"\0 ") or b"0", 8)
            obj.chksum = chk
            obj.type = typ
            obj.linkname = linkname.partition(b"\0")[0].decode(encoding, errors)
            obj.uname = uname.partition(b"\0")[0].decode(encoding, errors)
            obj.gname = gname.partition(b"\0")[0].decode(encoding, errors)
            obj.devmajor = int(devmajor.rstrip(b"\0 ") or b"0", 8)
            obj.devminor = int(devminor.rstrip(b"\0 ") or b"0", 8)
            prefix = prefix.partition(b"\0")[0].decode(encoding, errors)
        except (_Slow, ValueError):
            return super().frombuf(buf, encoding, errors)
        if typ == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name
        return obj


#: a single header (PAX/GNU long name chain) may not span more than this: it is held in memory while it
#: is parsed (a few copies, in each layer being pulled). Go's archive/tar, and so docker and containerd,
#: refuses a PAX or GNU long-name record of more than 1 MiB.
MAX_HEADER_BYTES = 8 << 20

_REG_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})
_SIMPLE_TYPES = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.LNKTYPE: HARDLINK,
                 tarfile.CHRTYPE: CHAR, tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ODD_START = frozenset({"", ".", "/"})
_U64_MAX = (1 << 64) - 1


def _pax_mtime_ns(text: str) -> int | None:
    """Exact nanoseconds of a PAX time value such as ``1700000000.123456789`` (tarfile makes it a float)."""
    t = text.strip()
    neg = t.startswith("-")
    if neg or t.startswith("+"):
        t = t[1:]
    whole, _, frac = t.partition(".")
    if not whole.isdigit() and not (whole == "" and frac):
        return None
    if frac and not frac.isdigit():
        return None
    ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _xattrs(pax: dict[str, str]) -> dict[str, bytes] | None:
    out: dict[str, bytes] | None = None
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            name, value = k[13:], v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):   # bsdtar: URL-encoded name, base64 value
            try:
                name = unquote_to_bytes(k[17:]).decode("utf-8", "surrogateescape")
                value = base64.b64decode(v + "=" * (-len(v) % 4))
            except ValueError:
                continue
            if out is not None and name in out:     # SCHILY wins when both are present
                continue
        else:
            continue
        if not name or "\0" in name:
            continue
        if out is None:
            out = {}
        out[name] = value
    return out


class _TarScanner:
    """Incremental tar header parser: :meth:`feed` the uncompressed stream in
    pieces of any size, :meth:`finish` at its end; :attr:`entries` are the
    members in archive order (duplicates included). With a *sink*, each
    member is handed to it instead (and :attr:`entries` stays empty)."""

    def __init__(self, where: str, sink=None):
        self.where = where
        self.win = _Window()
        self.tar = _TarState(self.win)
        self.total = 0            # bytes received
        self.next_header = 0      # stream offset of the next header
        self.pending: list[bytes] = []   # chunks received while a header is incomplete
        self.done = False         # end-of-archive seen
        self.entries: list[Entry] = []
        self.sink = sink if sink is not None else self.entries.append

    def feed(self, data: bytes) -> None:
        if not data:
            return
        start = self.total
        self.total += len(data)
        if self.done:
            return
        win = self.win
        if self.pending:
            self.pending.append(data)
            if self.total < win.want:
                return
            win.data = b"".join(self.pending)
            self.pending = []
        elif win.data:             # (not reached: a partial header always goes to pending)
            win.data = win.data + data
        else:
            if self.next_header >= self.total:
                return             # all member data: skipped without a copy
            win.data = data
            win.base = start
        self._parse()

    def finish(self) -> list[Entry]:
        if not self.done:
            win = self.win
            if self.pending:
                win.data = b"".join(self.pending)
                self.pending = []
            win.eof = True
            self._parse()
        if not self.done:   # pragma: no cover - _parse always ends the archive at eof
            raise TarError("tar stream ended unexpectedly", where=self.where)
        return self.entries

    def _parse(self) -> None:
        win, tar = self.win, self.tar
        fromtarfile = _TarInfo.fromtarfile
        while True:
            h = self.next_header
            end = win.base + len(win.data)
            if h >= end and not win.eof:
                win.data = b""
                win.base = end
                return
            if h > end:
                raise TarError(f"tar stream truncated: member data ends at byte {h}, the stream at byte {end}",
                               where=self.where)
            win.pos = h
            tar.offset = h
            saved_pax = tar.pax_headers.copy() if tar.pax_headers else None
            try:
                ti = fromtarfile(tar)
            except _NeedMore:
                tar.pax_headers = saved_pax or {}
                if win.want - h > MAX_HEADER_BYTES:
                    raise TarError(f"tar header at byte {h} is larger than {format_size(MAX_HEADER_BYTES)}",
                                   where=self.where) from None
                if h - win.base > (1 << 20):
                    win.data = win.data[h - win.base:]
                    win.base = h
                self.pending = [win.data]
                return
            except tarfile.EOFHeaderError:
                self.done = True
                return
            except tarfile.EmptyHeaderError:
                # a clean end at a member boundary without the end-of-archive blocks
                self.done = True
                return
            except tarfile.TruncatedHeaderError:
                raise TarError(f"tar stream truncated inside the header at byte {h}", where=self.where) from None
            except RecursionError:   # tarfile reads each extended header (PAX, GNU long name) recursively
                raise TarError(f"tar header at byte {h}: too many extended headers in a row",
                               where=self.where) from None
            except (tarfile.HeaderError, ValueError, IndexError, OverflowError, UnicodeError) as e:
                raise TarError(f"bad tar header at byte {h}: {e or type(e).__name__}", where=self.where) from None
            if tar.offset < h + tarfile.BLOCKSIZE:  # pragma: no cover - defensive
                raise TarError(f"bad tar header at byte {h}", where=self.where)
            self.next_header = tar.offset
            e = self._entry(ti, tar.offset)
            if e is not None:
                self.sink(e)

    def _entry(self, ti: tarfile.TarInfo, next_header: int) -> Entry | None:
        where = self.where
        name = ti.name
        # the common case needs no normalising: relative, no "."/".." or empty components
        if name[:1] in _ODD_START or "//" in name or "/." in name or name[-1:] == "/" or "\0" in name:
            path = normalize_path(name, where=where)
        else:
            path = name
        t = ti.type
        sparse = linkname = None
        size = major = minor = 0
        mode = ti.mode & 0o7777
        if t in _REG_TYPES or ti.sparse is not None and t not in _SIMPLE_TYPES:
            kind = FILE
            size = ti.size
            if ti.sparse is not None:
                sparse = self._sparse(ti, path, next_header)
        else:
            kind = _SIMPLE_TYPES.get(t)
            if kind is None:
                log.warning("%s: skipping tar member %s of unsupported type %r", where, _shown(name), t)
                return None
            if kind == SYMLINK:
                linkname = ti.linkname
                mode = SYMLINK_MODE
                if "\0" in linkname:
                    raise TarError(f"symlink target of {_shown(name)} contains a NUL byte", where=where)
            elif kind == HARDLINK:
                linkname = normalize_path(ti.linkname, where=where, what="hard link target")
                if not linkname:
                    raise TarError(f"hard link {_shown(name)} points at the layer root", where=where)
            elif kind == CHAR or kind == BLOCK:
                major, minor = ti.devmajor, ti.devminor
        if not path and kind != DIR:
            log.warning("%s: skipping tar member %s: the root can only be a directory", where, _shown(name))
            return None
        pax = ti.pax_headers
        xattrs = mtime_ns = None
        if pax:
            m = pax.get("mtime")
            if m is not None:
                mtime_ns = _pax_mtime_ns(m)
            xattrs = _xattrs(pax)
        if mtime_ns is None:
            mtime_ns = int(ti.mtime) * 1_000_000_000
        if not _INT64_MIN <= mtime_ns <= _INT64_MAX:
            mtime_ns = _INT64_MIN if mtime_ns < 0 else _INT64_MAX
        uid, gid = ti.uid, ti.gid
        if not (0 <= uid <= _U64_MAX and 0 <= gid <= _U64_MAX and 0 <= size <= _U64_MAX
                and 0 <= major <= _U64_MAX and 0 <= minor <= _U64_MAX):
            raise TarError(f"tar member {_shown(name)}: uid, gid, size or device number out of range", where=where)
        return _new_entry((path, kind, mode, uid, gid, size, mtime_ns, linkname, major, minor,
                           ti.offset_data, xattrs, sparse))

    def _sparse(self, ti: tarfile.TarInfo, path: str, next_header: int) -> tuple[tuple[int, int, int], ...]:
        """tarfile's [(file_offset, numbytes)] (data stored back to back from
        offset_data) as (file_offset, length, stream_offset) extents, checked."""
        out = []
        soff = ti.offset_data
        stored = next_header - ti.offset_data
        last_end = 0
        for foff, n in ti.sparse:
            if n == 0:
                continue
            if foff < last_end or n < 0 or foff + n > ti.size:
                raise TarError(f"bad sparse map for {_shown(ti.name)}", where=self.where)
            out.append((foff, n, soff))
            soff += n
            last_end = foff + n
        if soff - ti.offset_data > stored:
            raise TarError(f"sparse map of {_shown(ti.name)} claims more data than the member holds", where=self.where)
        return tuple(out)


# --- the layer index -------------------------------------------------------------

FORMAT_VERSION = 2   # 2: hard links keep the file their target named when read (rewritten names)
_MAGIC = b"LFSLIDX\n"
_HEAD = struct.Struct("<8sIIQ")         # magic, version, flags, xxh3_64 of everything after the head
_SECTIONS = struct.Struct("<IQQ")       # meta length, records length, checkpoints length
_BIG = sys.byteorder == "big"
_MAX_RECORDS = 1 << 31      # bound on a decoded records section


class IndexFormatError(ContentError):
    """A saved index (layer index or tree cache) that is corrupt, truncated or of another version."""

    default_hint = "the index is rebuilt from the layer blob automatically"


def pack_ints(code: str, values: Iterable[int]) -> bytes:
    a = array.array(code, values)
    if _BIG:
        a.byteswap()
    return a.tobytes()


class _Cursor:
    """Reads columns back out of a decoded section; any overrun raises IndexFormatError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str):
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise IndexFormatError(f"{self.what} is truncated")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def arr(self, code: str, n: int, *, as_list: bool = True):
        a = array.array(code)
        a.frombytes(self.take(n * a.itemsize))
        if _BIG:
            a.byteswap()
        return a.tolist() if as_list else a

    def col(self, n: int, signed: bool = False, *, as_list: bool = True):
        """An integer column (see :func:`int_col`): a list, or the array itself."""
        code = self.take(1).decode("ascii", "replace")
        if code not in ("bhiq" if signed else "BHIQ"):
            raise IndexFormatError(f"{self.what}: bad column type")
        return self.arr(code, n, as_list=as_list)

    def strings(self, n: int) -> list[str]:
        (length,) = self.unpack(U64)
        blob = self.take(length)
        if n == 0:
            if length:
                raise IndexFormatError(f"{self.what}: bad string table")
            return []
        out = blob.decode("utf-8", "surrogateescape").split("\0")
        if len(out) != n:
            raise IndexFormatError(f"{self.what}: bad string table")
        return out

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise IndexFormatError(f"{self.what} has trailing bytes")


U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


def _strings(items: list[str]) -> bytes:
    blob = "\0".join(items).encode("utf-8", "surrogateescape")
    return U64.pack(len(blob)) + blob


def _col_code(lo: int, hi: int, signed: bool) -> str:
    """The narrowest array type code that holds the integers from *lo* to *hi*."""
    for code in ("bhiq" if signed else "BHIQ"):
        bits = array.array(code).itemsize * 8
        if (-(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1))) if signed else hi < (1 << bits):
            return code
    raise ValueError("integer column out of range")  # pragma: no cover - values are checked on parse


def int_col(values: list[int], signed: bool = False) -> bytes:
    """An integer column in the narrowest array type that holds it: type code byte + little-endian data."""
    code = _col_code(min(values, default=0), max(values, default=0), signed)
    return code.encode() + pack_ints(code, values)


_LINK_TYPES = frozenset({SYMLINK, HARDLINK})


def encode_columns(cols: tuple[list, ...]) -> bytes:
    n = len(cols[0])
    (paths, types, modes, uids, gids, sizes, mtimes, links, majors, minors, offsets, xattrs, sparses) = cols
    secs = [m // 1_000_000_000 for m in mtimes]
    nsecs = [m % 1_000_000_000 for m in mtimes]
    parts = [U32.pack(n),
             bytes(_TYPE_CODE[t] for t in types),
             int_col(modes), int_col(uids), int_col(gids), int_col(sizes), int_col(secs, True), int_col(nsecs),
             int_col(majors), int_col(minors), int_col(offsets),
             _strings(list(paths)), _strings([l or "" for l in links]),
             _side_tables([(i, x) for i, x in enumerate(xattrs) if x],
                          [(i, s) for i, s in enumerate(sparses) if s is not None])]
    return b"".join(parts)


def _side_tables(xattrs: list[tuple[int, dict[str, bytes]]], sparses: list[tuple[int, tuple]]) -> bytes:
    """The end of the columnar encoding: the xattrs and the sparse maps of the records that have them,
    as (record number, value) pairs in record order."""
    # xattrs: (record, count) pairs, then names and values
    x_idx, x_cnt, x_names, x_vals = [], [], [], []
    for i, x in xattrs:
        x_idx.append(i)
        x_cnt.append(len(x))
        x_names.extend(x.keys())
        x_vals.extend(x.values())
    parts = [U32.pack(len(x_idx)), pack_ints("I", x_idx), pack_ints("I", x_cnt), U32.pack(len(x_names)),
             _strings(x_names), pack_ints("I", map(len, x_vals)), b"".join(x_vals)]
    s_idx, s_cnt, s_flat = [], [], []
    for i, s in sparses:
        s_idx.append(i)
        s_cnt.append(len(s))
        for ext in s:
            s_flat.extend(ext)
    parts += [U32.pack(len(s_idx)), pack_ints("I", s_idx), pack_ints("I", s_cnt), U64.pack(len(s_flat)),
              pack_ints("Q", s_flat)]
    return b"".join(parts)


def _decode_columns(raw: bytes) -> tuple[list, ...]:
    """The columns of the records (one list per Entry field)."""
    c = _Cursor(raw, "layer index records")
    (n,) = c.unpack(U32)
    if n > len(raw):
        raise IndexFormatError("layer index records: bad count")
    tcodes = c.take(n)
    try:
        types = list(map(TYPES.__getitem__, tcodes))
    except IndexError:
        raise IndexFormatError("layer index records: unknown entry type") from None
    modes, uids, gids, sizes = c.col(n), c.col(n), c.col(n), c.col(n)
    sym = _TYPE_CODE[SYMLINK]
    if sym in tcodes:       # records written before symlinks were given SYMLINK_MODE (or by another writer)
        modes = [SYMLINK_MODE if tc == sym else m for tc, m in zip(tcodes, modes)]
    secs, nsecs = c.col(n, True), c.col(n)
    if any(nsecs):
        mtimes = [s * 1_000_000_000 + ns for s, ns in zip(secs, nsecs)]
    else:
        mtimes = [s * 1_000_000_000 for s in secs]
    majors, minors, offsets = c.col(n), c.col(n), c.col(n)
    paths = c.strings(n)
    links = c.strings(n)
    links = [l if t in _LINK_TYPES else None for l, t in zip(links, types)]
    xattrs: list[dict[str, bytes] | None] = [None] * n
    (nx,) = c.unpack(U32)
    x_idx, x_cnt = c.arr("I", nx), c.arr("I", nx)
    (nnames,) = c.unpack(U32)
    if nnames != sum(x_cnt) or nnames > len(raw):
        raise IndexFormatError("layer index records: bad xattr table")
    names = c.strings(nnames)
    lens = c.arr("I", nnames)
    blob = c.take(sum(lens))
    pos = k = 0
    for i, cnt in zip(x_idx, x_cnt):
        if i >= n:
            raise IndexFormatError("layer index records: bad xattr table")
        d = {}
        for _ in range(cnt):
            d[names[k]] = blob[pos:pos + lens[k]]
            pos += lens[k]
            k += 1
        xattrs[i] = d
    sparses: list[tuple | None] = [None] * n
    (ns,) = c.unpack(U32)
    s_idx, s_cnt = c.arr("I", ns), c.arr("I", ns)
    (nflat,) = c.unpack(U64)
    if nflat != 3 * sum(s_cnt) or nflat > len(raw):
        raise IndexFormatError("layer index records: bad sparse table")
    flat = c.arr("Q", nflat)
    pos = 0
    for i, cnt in zip(s_idx, s_cnt):
        if i >= n:
            raise IndexFormatError("layer index records: bad sparse table")
        end = pos + 3 * cnt
        sparses[i] = tuple(zip(flat[pos:end:3], flat[pos + 1:end:3], flat[pos + 2:end:3]))
        pos = end
    c.end()
    return (paths, types, modes, uids, gids, sizes, mtimes, links, majors, minors, offsets, xattrs, sparses)


_SPOOL_ROWS = 8192      # records gathered in memory before they go to the spool file
_SEEN_BITS = 1 << 24    # a bitmap of path hashes (2 MiB): paths maybe seen before, without a set of them all
_SPOOL_PARTS = 13       # per batch: 9 integer columns, the type codes, the paths, the link targets, path hashes


class _RecordSpool:
    """The records of a layer being indexed, kept in a temporary file rather than in Python objects.

    Records arrive in archive order (:meth:`add`); every ``_SPOOL_ROWS`` of
    them go to an anonymous temporary file (in *directory*) as one batch:
    each integer column as a fixed-width array, the type codes, the paths
    and the link targets, and a hash of each path (to find duplicates: a
    bitmap of the hashes seen names the few that may repeat). What stays in
    memory per record is its xattrs and sparse map, when it has any.
    :meth:`finish` deduplicates (see :func:`_dedupe`) and streams the
    columnar encoding (:func:`encode_columns`, byte for byte) into one zstd
    frame, reading the spool back one column at a time, so memory does not
    grow with the number of records -- except in a layer that holds the same
    path twice, whose records are then deduplicated in memory.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._dir = directory
        self._file = None
        self._end = 0
        self._rows: list[Entry] = []
        self.count = 0
        self._batches: list[tuple[int, int, list[int]]] = []   # (file offset, records, lengths of its parts)
        self._lo = [0] * 9
        self._hi = [0] * 9
        self._seen = bytearray()             # made at the first spill (a small layer never spills)
        self._again: set[int] = set()        # hashes whose bit was set already: maybe a path twice
        self._xattrs: list[tuple[int, dict[str, bytes]]] = []
        self._sparse: list[tuple[int, tuple]] = []

    def add(self, e: Entry) -> None:
        self._rows.append(e)
        if len(self._rows) >= _SPOOL_ROWS:
            self._spill()

    def _spill(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        base = self.count
        (paths, types, modes, uids, gids, sizes, mtimes, links, majors, minors, offsets, xattrs,
         sparses) = zip(*rows)
        ints = (modes, uids, gids, sizes, [m // 1_000_000_000 for m in mtimes],
                [m % 1_000_000_000 for m in mtimes], majors, minors, offsets)
        parts = []
        first = not self._batches
        for k, v in enumerate(ints):
            lo, hi = min(v), max(v)
            self._lo[k] = lo if first else min(lo, self._lo[k])
            self._hi[k] = hi if first else max(hi, self._hi[k])
            parts.append(pack_ints("q" if k == 4 else "Q", v))
        parts.append(bytes(_TYPE_CODE[t] for t in types))
        parts.append("\0".join(paths).encode("utf-8", "surrogateescape"))
        parts.append("\0".join([l or "" for l in links]).encode("utf-8", "surrogateescape"))
        hashes = list(map(hash, paths))
        parts.append(pack_ints("q", hashes))
        if not self._seen:
            self._seen = bytearray(_SEEN_BITS // 8)
        seen, again = self._seen, self._again
        for h in hashes:
            bit = h & (_SEEN_BITS - 1)
            byte, mask = bit >> 3, 1 << (bit & 7)
            if seen[byte] & mask:
                again.add(h)
            else:
                seen[byte] |= mask
        self._xattrs.extend((base + i, x) for i, x in enumerate(xattrs) if x)
        self._sparse.extend((base + i, sp) for i, sp in enumerate(sparses) if sp is not None)
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(dir=self._dir, prefix="layerindex-", suffix=".spool")
            except OSError as e:
                where = str(self._dir or tempfile.gettempdir())
                raise StoreError(f"cannot create a temporary file for a layer's index records: "
                                 f"{e.strerror or e}", where=where,
                                 hint="make the directory writable (or set TMPDIR when indexing a read-only "
                                      "store)") from None
        data = b"".join(parts)
        self._file.write(data)
        self._batches.append((self._end, len(rows), [len(p) for p in parts]))
        self._end += len(data)
        self.count += len(rows)

    def _part(self, batch: tuple[int, int, list[int]], k: int) -> bytes:
        off, _, lens = batch
        return os.pread(self._file.fileno(), lens[k], off + sum(lens[:k]))

    def _ints(self, batch, k: int) -> array.array:
        a = array.array("q" if k == 4 else "Q")
        a.frombytes(self._part(batch, k))
        if _BIG:
            a.byteswap()
        return a

    def entries(self) -> list[Entry]:
        """All records read back (in memory)."""
        if not self._batches:                   # all still in memory: no spool file
            return list(self._rows)
        self._spill()
        if self._file is not None:
            self._file.flush()
        out: list[Entry] = []
        xattrs, sparse = dict(self._xattrs), dict(self._sparse)
        for b in self._batches:
            base = len(out)
            modes, uids, gids, sizes, secs, nsecs, majors, minors, offsets = (self._ints(b, k) for k in range(9))
            types = [TYPES[c] for c in self._part(b, 9)]
            paths = self._part(b, 10).decode("utf-8", "surrogateescape").split("\0")
            links = self._part(b, 11).decode("utf-8", "surrogateescape").split("\0")
            for i in range(b[1]):
                t = types[i]
                out.append(_new_entry((paths[i], t, modes[i], uids[i], gids[i], sizes[i],
                                       secs[i] * 1_000_000_000 + nsecs[i], links[i] if t in _LINK_TYPES else None,
                                       majors[i], minors[i], offsets[i], xattrs.get(base + i),
                                       sparse.get(base + i))))
        return out

    def finish(self) -> tuple[bytes, int]:
        """(the records section: one zstd frame of the columnar encoding, the number of records)."""
        if not self._batches:                   # a layer of fewer than _SPOOL_ROWS records: no spool file
            kept = _dedupe(self._rows)
            cols = tuple(map(list, zip(*kept))) if kept else tuple([] for _ in Entry._fields)
            return zstandard.ZstdCompressor(level=3).compress(encode_columns(cols)), len(kept)
        self._spill()
        if self._file is not None:
            self._file.flush()
        if self._again and self._repeats():      # maybe a path twice: deduplicate in memory
            entries = self.entries()
            kept = _dedupe(entries)
            if kept is not entries:
                cols = tuple(map(list, zip(*kept))) if kept else tuple([] for _ in Entry._fields)
                return zstandard.ZstdCompressor(level=3).compress(encode_columns(cols)), len(kept)
            del entries, kept
        self._seen = bytearray()
        n = self.count
        codes = [_col_code(self._lo[k], self._hi[k], k == 4) for k in range(9)]
        tail = _side_tables(self._xattrs, self._sparse)
        strings = [sum(b[2][k] for b in self._batches) + max(len(self._batches) - 1, 0) for k in (10, 11)]
        total = (4 + n + sum(1 + n * array.array(c).itemsize for c in codes) + 16 + sum(strings) + len(tail))
        z = zstandard.ZstdCompressor(level=3).compressobj(size=total)
        out = [z.compress(U32.pack(n))]
        out += [z.compress(self._part(b, 9)) for b in self._batches]
        for k, code in enumerate(codes):
            out.append(z.compress(code.encode()))
            for b in self._batches:
                out.append(z.compress(pack_ints(code, self._ints(b, k))))
        for k, length in zip((10, 11), strings):
            out.append(z.compress(U64.pack(length)))
            for j, b in enumerate(self._batches):
                out.append(z.compress(b"\0" + self._part(b, k) if j else self._part(b, k)))
        out.append(z.compress(tail))
        out.append(z.flush())
        return b"".join(out), n

    def _repeats(self) -> bool:
        """Whether a hash of the maybe-repeated ones occurs twice (the same path, or a collision)."""
        again, once = self._again, set()
        for b in self._batches:
            hashes = array.array("q")
            hashes.frombytes(self._part(b, 12))
            if _BIG:
                hashes.byteswap()
            for h in hashes:
                if h in again:
                    if h in once:
                        return True
                    once.add(h)
        return False

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
        self._rows = []


def pack_file(version: int, meta: dict, sections: list[bytes], *, magic: bytes = _MAGIC) -> bytes:
    """The common container of layerfs index files: head (magic, version, xxh3_64) + JSON meta + sections."""
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join([struct.pack(f"<I{len(sections)}Q", len(meta_b), *map(len, sections)), meta_b, *sections])
    return _HEAD.pack(magic, version, 0, xxhash.xxh3_64_intdigest(body)) + body


def unpack_file(data: bytes, version: int, nsections: int, *, magic: bytes = _MAGIC,
                what: str = "layer index") -> tuple[dict, list[memoryview]]:
    """Check and split what :func:`pack_file` wrote; raise IndexFormatError."""
    if len(data) < _HEAD.size:
        raise IndexFormatError(f"{what} is truncated")
    m, ver, flags, checksum = _HEAD.unpack_from(data)
    if m != magic:
        raise IndexFormatError(f"not a layerfs {what} (bad magic)")
    if ver != version:
        raise IndexFormatError(f"{what} has format version {ver}, this layerfs writes {version}")
    if flags:
        raise IndexFormatError(f"{what} has unknown flags {flags:#x}")
    body = memoryview(data)[_HEAD.size:]
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise IndexFormatError(f"{what} checksum mismatch (corrupt or truncated)")
    st = struct.Struct(f"<I{nsections}Q")
    if len(body) < st.size:
        raise IndexFormatError(f"{what} is truncated")
    lens = st.unpack_from(body)
    pos = st.size
    if pos + sum(lens) != len(body):
        raise IndexFormatError(f"{what} section lengths do not match its size")
    meta_b = body[pos:pos + lens[0]]
    pos += lens[0]
    try:
        meta = json.loads(bytes(meta_b))
    except ValueError:
        raise IndexFormatError(f"{what} metadata is corrupt") from None
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{what} metadata is corrupt")
    out = []
    for n in lens[1:]:
        out.append(body[pos:pos + n])
        pos += n
    return meta, out


class LayerIndex:
    """The TOC of one layer blob: entries, diff_id, sizes and the gzindex checkpoints.

    There is one record per path (a later duplicate replaces an earlier one,
    as extraction does), in archive order of the surviving records; a hard
    link keeps the file its target held when the link was read (see
    :func:`_dedupe`).
    :attr:`entries` gives them as :class:`Entry` tuples; :meth:`rows` as
    plain tuples in the same field order (cheaper, for bulk consumers such
    as the union view). After :meth:`load` the records are decoded on first use.
    """

    def __init__(self, entries: list[Entry] | None, *, diff_id: Digest, size: int, compression: str | None,
                 checkpoints: bytes, digest: Digest | None = None, compressed_size: int | None = None,
                 _raw_entries: bytes | None = None, _count: int | None = None):
        self._entries = entries
        self._count = _count
        self._cols: tuple[list, ...] | None = None
        self._raw_entries = _raw_entries
        self.diff_id = diff_id
        self.size = size
        self.compression = compression
        self.checkpoints = checkpoints
        self.digest = digest
        self.compressed_size = compressed_size
        if entries is None and _raw_entries is None:
            self._entries = []

    def columns(self) -> tuple[list, ...]:
        """One list per :class:`Entry` field."""
        if self._cols is None:
            if self._entries is not None:
                self._cols = tuple(map(list, zip(*self._entries))) if self._entries \
                    else tuple([] for _ in Entry._fields)
            else:
                self._cols = self._decode()
                self._raw_entries = None
        return self._cols

    def _decode(self) -> tuple[list, ...]:
        try:
            raw = zstandard.ZstdDecompressor().decompress(self._raw_entries, max_output_size=_MAX_RECORDS)
        except zstandard.ZstdError:
            raise IndexFormatError("layer index records are corrupt") from None
        cols = _decode_columns(raw)
        if self._count is not None and len(cols[0]) != self._count:
            raise IndexFormatError("layer index records do not match its metadata")
        return cols

    def rows(self, *, keep: bool = True) -> Iterable[tuple]:
        """The records as plain tuples in :class:`Entry` field order. With ``keep=False`` the
        records of a loaded index are decoded for this one pass only (the index keeps them
        compressed), for a consumer that keeps what it needs of the rows itself."""
        if self._entries is not None:
            return iter(self._entries)
        if self._cols is None and not keep:
            return zip(*self._decode())
        return zip(*self.columns())

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = list(map(_new_entry, zip(*self.columns())))
        return self._entries

    def __len__(self) -> int:
        if self._entries is not None:
            return len(self._entries)
        if self._cols is None and self._count is not None:
            return self._count
        return len(self.columns()[0])

    def __repr__(self) -> str:
        d = self.digest.short if self.digest else "?"
        return f"LayerIndex({d}, diff_id={self.diff_id.short}, size={self.size}, compression={self.compression})"

    # -- file format --------------------------------------------------------------
    #   head:  magic "LFSLIDX\n", u32 version, u32 flags, u64 xxh3_64(body)
    #   body:  u32 meta length, u64 records length, u64 checkpoints length,
    #          meta (JSON: digest, diff_id, size, compression, compressed_size, count),
    #          records (zstd frame of the columnar encoding, see encode_columns),
    #          checkpoints (gzindex SeekIndex.to_bytes(), as is)
    #   A symlink record reads back with SYMLINK_MODE whatever mode it holds: indexes saved (or
    #   published with 'index push') before symlinks were normalised stay valid, no rebuild needed.
    def to_bytes(self) -> bytes:
        if self._raw_entries is not None:
            records = self._raw_entries
            count = self._count
        else:
            cols = self.columns()
            records = zstandard.ZstdCompressor(level=3).compress(encode_columns(cols))
            count = len(cols[0])
        meta = {"digest": str(self.digest) if self.digest else None, "diff_id": str(self.diff_id),
                "size": self.size, "compression": self.compression, "compressed_size": self.compressed_size,
                "count": count}
        return pack_file(FORMAT_VERSION, meta, [records, bytes(self.checkpoints)])

    @classmethod
    def from_bytes(cls, data: bytes) -> "LayerIndex":
        meta, (records, checkpoints) = unpack_file(data, FORMAT_VERSION, 2)
        try:
            digest = Digest.parse(meta["digest"]) if meta.get("digest") else None
            diff_id = Digest.parse(meta["diff_id"])
            size = meta["size"]
            comp = meta["compression"]
            csize = meta.get("compressed_size")
            count = meta.get("count")
            if not isinstance(size, int) or comp not in ("gzip", "zstd", None) \
                    or not (csize is None or isinstance(csize, int)) or not isinstance(count, int):
                raise ValueError
        except (KeyError, ValueError, TypeError, LayerfsError):
            raise IndexFormatError("layer index metadata is corrupt") from None
        return cls(None, diff_id=diff_id, size=size, compression=comp, checkpoints=bytes(checkpoints),
                   digest=digest, compressed_size=csize, _raw_entries=bytes(records), _count=count)

    def save(self, path: Path | str) -> None:
        """Write atomically (temp file + fsync + rename)."""
        atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path | str) -> "LayerIndex":
        """Read and check an index file. Raises FileNotFoundError when absent and
        :class:`IndexFormatError` when corrupt, truncated or of another version."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(data)


# --- the limit on a layer's uncompressed size -----------------------------------

#: environment variable: the most one layer may inflate to (a byte count such as 68719476736 or 64G)
MAX_LAYER_SIZE_ENV = "LAYERFS_MAX_LAYER_SIZE"
_DEFAULT_MAX_LAYER_SIZE = 64 << 30
_MAX_LAYER_RATIO = 200
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count: ``1048576``, ``512k``, ``16M``, ``64G``, ``1T`` (powers of 1024; ``64GiB`` too)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    num = t[:len(t) - len(unit)].strip()
    if not num.isdigit() or not num.isascii():
        raise ValueError(f"invalid size {text!r} (e.g. 1048576, 512k, 16M, 64G)")
    return int(num) * _SIZE_UNITS[unit]


def format_size(n: int) -> str:
    """*n* bytes the way :func:`parse_size` reads it back, in the largest unit that divides it."""
    for unit in ("T", "G", "M", "k"):
        if n and n % _SIZE_UNITS[unit.lower()] == 0:
            return f"{n // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(n)


def max_layer_size(compressed_size: int, configured: int | None = None) -> int:
    """The most a layer blob of *compressed_size* bytes may inflate to when it is pulled or loaded:
    *configured* (``PullOptions``/``LoadOptions.max_layer_size``), else ``LAYERFS_MAX_LAYER_SIZE``,
    else 64 GiB or 200 times the compressed size, whichever is more."""
    if configured is not None:
        return configured
    raw = os.environ.get(MAX_LAYER_SIZE_ENV, "").strip()
    if raw:
        try:
            return parse_size(raw)
        except ValueError as e:
            raise UsageError(f"{MAX_LAYER_SIZE_ENV}={raw[:40]!r}: {e}",
                             hint=f"set {MAX_LAYER_SIZE_ENV} to a size such as 128G, or unset it") from None
    return max(_DEFAULT_MAX_LAYER_SIZE, _MAX_LAYER_RATIO * max(0, compressed_size))


def layer_too_large(digest: Digest | None, limit: int, *, subject: str | None = None,
                    where: str | None = None) -> DecompressionLimit:
    """The error for a layer (or *subject*, e.g. an archive holding one) that holds more than *limit*
    bytes uncompressed."""
    blob = f"; blob {digest} was not stored" if digest is not None else ""
    return DecompressionLimit(
        f"{subject + ' ' if subject else ''}inflates to more than {format_size(limit)}, the limit on one "
        f"layer's uncompressed size{blob}", where=where,
        hint=f"if the {'archive' if subject else 'layer'} is genuine, raise the limit: "
             f"{MAX_LAYER_SIZE_ENV}={format_size(2 * limit)}")


# --- the streaming indexer -----------------------------------------------------

_OUT_PIECE = 4 << 20    # bound on decompressed bytes handled at once
_QUEUE_PIECES = 4       # decompressed pieces in flight to the worker thread (<= 16 MiB)
_BATCH = 256 << 10      # smaller pieces are gathered up to this size before the hand-off


class _Consumer:
    """The uncompressed side: diff_id hash, size, tar scanner."""

    def __init__(self, where: str, spool: _RecordSpool):
        self.hash = hashlib.sha256()
        self.size = 0
        self.scan = _TarScanner(where, spool.add)

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self.scan.feed(data)


class _Worker:
    """Runs a :class:`_Consumer` in a helper thread behind a bounded queue, so
    that inflating (C, without the GIL) and tar parsing overlap.

    The thread never blocks anything but its own ``get``: after an error it
    keeps draining the queue (``put`` cannot deadlock) and it stops at the
    sentinel, which :meth:`close` sends — or a finalizer, when the owning
    indexer is dropped without finishing (no thread is left behind).
    The consumer is only touched by the thread until :meth:`close` returns."""

    _STOP = object()

    def __init__(self, consumer: _Consumer, owner: object):
        self.consumer = consumer
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(_QUEUE_PIECES)
        self.thread = threading.Thread(target=self._run, name="layerindex", daemon=True)
        self.thread.start()
        self._finalizer = weakref.finalize(owner, _Worker._stop, self.q)

    @staticmethod
    def _stop(q: queue.Queue) -> None:
        q.put(_Worker._STOP)

    def _run(self) -> None:
        q, consume = self.q, self.consumer
        while True:
            item = q.get()
            if item is _Worker._STOP:
                return
            if self.error is None:
                try:
                    consume(item)
                except BaseException as e:   # noqa: BLE001 - handed to the feeding thread
                    self.error = e

    def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        """Stop the thread and wait for it; raise the consumer's error, if any."""
        if self._finalizer.detach() is not None:
            self.q.put(_Worker._STOP)
        self.thread.join()
        if self.error is not None:
            raise self.error


class LayerIndexer:
    """Index a layer blob in one streaming pass: ``feed`` it compressed chunks
    as they arrive, then ``finish()`` for the :class:`LayerIndex`.

    *compression* is what the media type says; as docker and containerd do,
    the blob's magic number decides (a mismatch is logged). Errors (bad
    compressed data, bad tar headers, path escapes) are raised from ``feed``
    or ``finish`` and stick: every later call raises the same error.

    With *threaded* (the default) the decompressed data is hashed and parsed
    in a helper thread while the caller's thread inflates the next chunk; a
    tar error then surfaces from a later ``feed`` or from ``finish``. Call
    :meth:`close` (or ``finish``) when abandoning an indexer early; dropping
    it also stops the thread. One indexer is fed by one thread at a time.

    *digest* names the blob, and says its bytes are verified against it by
    the caller (the pull's hash, a verifying read of a stored blob): gzip's
    own CRC-32 is then not computed again. Without it the CRC is checked.

    *max_size* bounds the uncompressed size (see :func:`max_layer_size`):
    the output beyond it raises :class:`~layerfs.errors.DecompressionLimit`.
    Whatever the ratio, memory stays bounded: the blob is inflated in pieces
    of at most 4 MiB, each handed on before the next is made.

    The caller saves the result: ``indexer.finish().save(index_path(store, digest))``.
    """

    def __init__(self, compression: str | None, *, where: str, digest: Digest | None = None,
                 span: int = gzindex.DEFAULT_SPAN, threaded: bool = True, max_size: int | None = None,
                 spool_dir: str | os.PathLike | None = None):
        self.declared = gzindex.normalize_compression(compression)
        self.where = where
        self.digest = digest
        self.max_size = max_size
        self._made = 0            # uncompressed bytes made so far
        self.span = span
        self.threaded = threaded
        self._ix = None
        self._head = b""
        self.compressed_size = 0
        self._spool = _RecordSpool(spool_dir)
        self._consumer = _Consumer(where, self._spool)
        self._worker: _Worker | None = None
        self._batch: list[bytes] = []
        self._batched = 0
        self._error: BaseException | None = None
        self._result: LayerIndex | None = None

    @property
    def compression(self) -> str | None:
        return self._ix.compression if self._ix is not None else self.declared

    @property
    def size(self) -> int:
        """Uncompressed bytes seen so far (final after :meth:`finish`)."""
        return self._consumer.size

    def _start(self, head: bytes) -> None:
        actual = gzindex.detect_compression(head)
        if actual != self.declared:
            log.info("%s: media type says %s but the data is %s", self.where,
                     self.declared or "uncompressed", actual or "uncompressed")
        # a blob named by its digest is verified by whoever reads it (and what comes out by the diff_id):
        # gzip's own CRC-32 would only check the same bytes again
        self._ix = gzindex.make_indexer(actual, self.span, check=self.digest is None)

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            raise RuntimeError("feed() after finish()")
        try:
            self._feed(chunk)
        except BaseException as e:
            self._fail(e)
            raise self._error from None

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.compressed_size += len(chunk)
        if self._ix is None:
            self._head += bytes(chunk)
            if len(self._head) < 4:
                return
            chunk, self._head = self._head, b""
            self._start(chunk)
        ix = self._ix
        if isinstance(ix, gzindex.PlainIndexer):
            self._out(ix.feed(chunk))
        else:
            for out in ix.feed_iter(chunk, _OUT_PIECE):
                self._out(out)

    def _out(self, data: bytes) -> None:
        if not data:
            return
        self._made += len(data)
        if self.max_size is not None and self._made > self.max_size:
            raise layer_too_large(self.digest, self.max_size)
        if not self.threaded:
            self._consumer(data)
            return
        # small pieces (small network chunks) are batched: one hand-off per _BATCH bytes at least
        if self._batch or len(data) < _BATCH:
            self._batch.append(data)
            self._batched += len(data)
            if self._batched < _BATCH:
                return
            data = b"".join(self._batch)
            self._batch, self._batched = [], 0
        self._hand_off(data)

    def _hand_off(self, data: bytes) -> None:
        if self._worker is None:
            self._worker = _Worker(self._consumer, self)
        self._worker.put(data)

    def _flush(self) -> None:
        if self._batch:
            data = b"".join(self._batch)
            self._batch, self._batched = [], 0
            self._hand_off(data)

    def _fail(self, e: BaseException) -> None:
        """Record the first error (with ``where``), stop the worker."""
        if self._error is None:
            if isinstance(e, LayerfsError) and e.where is None:
                e.where = self.where
            self._error = e
        w, self._worker = self._worker, None
        if w is not None:
            try:
                w.close()
            except BaseException:   # noqa: BLE001 - the first error is the one reported
                pass
        self._spool.close()

    def close(self) -> None:
        """Stop the helper thread without finishing (idempotent)."""
        w, self._worker = self._worker, None
        if w is not None:
            try:
                w.close()
            except BaseException as e:   # noqa: BLE001
                if self._error is None:
                    self._error = e
        self._spool.close()

    def finish(self) -> LayerIndex:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            if self._ix is None:
                head, self._head = self._head, b""
                self._start(head)
                if head:
                    self._out(self._ix.feed(head))
            seek = self._ix.finish()
            self._flush()
            w, self._worker = self._worker, None
            if w is not None:
                w.close()
            self._consumer.scan.finish()
            records, count = self._spool.finish()
        except BaseException as e:
            self._fail(e)
            raise self._error from None
        finally:
            self._spool.close()
        c = self._consumer
        self._result = LayerIndex(None, diff_id=Digest("sha256", c.hash.hexdigest()),
                                  size=c.size, compression=self._ix.compression, checkpoints=seek.to_bytes(),
                                  digest=self.digest, compressed_size=self.compressed_size,
                                  _raw_entries=records, _count=count)
        return self._result


def _dedupe(entries: list[Entry]) -> list[Entry]:
    """One entry per path, the last one (tar extraction overwrites).

    A hard link names the file its target path held *when the link was
    read*: extraction links to that inode, and a later member of the target
    path replaces the name only (``a``, ``b`` linked to ``a``, ``a`` again:
    ``b`` keeps the first ``a``). When that first entry is dropped here, the
    first surviving link to it takes its place (a copy of its record under
    the link's path: its data is still in the stream) and the other links to
    it are pointed at that path. A link to a name not read yet is left as it
    is (resolved against the final entries, as before).
    """
    last: dict[str, int] = {}
    for i, e in enumerate(entries):
        last[e.path] = i
    if len(last) == len(entries):
        return entries
    # for every hard link: the entry that made the inode its target named at that moment
    current: dict[str, int] = {}
    root: dict[int, int] = {}
    for i, e in enumerate(entries):
        if e.type == HARDLINK:
            j = current.get(e.linkname)
            if j is not None:
                r = root.get(j) if entries[j].type == HARDLINK else j
                if r is not None and entries[r].type != DIR:
                    root[i] = r
        current[e.path] = i
    keep = sorted(last.values())
    out = [entries[i] for i in keep]
    if not root:
        return out
    surviving = set(keep)
    named: dict[int, str] = {}       # inode's entry -> the surviving path that now carries it
    for k, i in enumerate(keep):
        r = root.get(i)
        if r is None:
            continue
        e = out[k]
        if r in surviving:
            t = last[e.linkname]
            if t != r and root.get(t) != r:          # the target path was written again after the link
                out[k] = e._replace(linkname=entries[r].path)
        elif r in named:
            out[k] = e._replace(linkname=named[r])
        else:                                          # the inode's own entry is gone: this name takes it over
            out[k] = entries[r]._replace(path=e.path)
            named[r] = e.path
    return out


# --- the store side ----------------------------------------------------------------

def index_path(store: Store, digest: Digest) -> Path:
    return store.root / "indexes" / f"{digest.algorithm}-{digest.hex}.idx"


def _fits(index: LayerIndex, desc: Descriptor) -> bool:
    """The index was made from this blob (an index saved without its digest is trusted by name and size)."""
    return (index.digest is None or index.digest == desc.digest) \
        and (index.compressed_size is None or index.compressed_size == desc.size)


def build_from_blob(store: Store, desc: Descriptor, *, chunk_size: int = 1 << 20) -> LayerIndex:
    """Index a stored layer blob (one verified read of it); does not save."""
    comp = LAYER_COMPRESSION.get(desc.media_type)
    ix = LayerIndexer(comp, where=f"layer {desc.digest.short}", digest=desc.digest)
    with store.open_blob(desc.digest, desc.size) as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                break
            ix.feed(b)
    return ix.finish()


def load_or_build(store: Store, desc: Descriptor) -> LayerIndex:
    """The layer's index: loaded from ``indexes/``, or (missing, corrupt, of an
    older format, or for another blob) rebuilt from the stored blob with one
    verified read of it, and saved. A read-only store still works: the index
    is then built in memory each time."""
    path = index_path(store, desc.digest)
    with contextlib.suppress(FileNotFoundError):
        try:
            idx = LayerIndex.load(path)
            if _fits(idx, desc):
                return idx
            log.warning("layer index %s does not match blob %s; rebuilding", path, desc.digest.short)
        except IndexFormatError as e:
            log.warning("layer index %s: %s; rebuilding", path, e.message)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock(f"index-{desc.digest.algorithm}-{desc.digest.hex}"))
        except OSError as e:
            log.info("cannot lock %s (%s); indexing without the lock", path, e.strerror or e)
        else:
            with contextlib.suppress(FileNotFoundError, IndexFormatError):   # built meanwhile by another process?
                idx = LayerIndex.load(path)
                if _fits(idx, desc):
                    return idx
        idx = build_from_blob(store, desc)
        try:
            idx.save(path)
            if store.layer_info(desc.digest) is None:
                store.set_layer_info(desc.digest, {"diff_id": str(idx.diff_id), "size": idx.size,
                                                   "media_type": desc.media_type})
        except (OSError, LayerfsError) as e:
            log.warning("cannot save layer index %s: %s", path, e)
    return idx


def open_layer_reader(store: Store, desc: Descriptor, index: LayerIndex, *,
                      cache_bytes: int = gzindex.DEFAULT_CACHE_BYTES,
                      cache: gzindex.SpanCache | None = None) -> gzindex.BlobReader:
    """Thread-safe random reads of the layer's uncompressed tar stream
    (``read(offset, length)``); *cache_bytes* bounds its cache of decompressed spans,
    or *cache* is one shared with other readers (the layers of an image)."""
    try:
        return gzindex.open_reader(store.blob_path(desc.digest), index.compression, index.checkpoints,
                                   cache_bytes=cache_bytes, cache=cache)
    except FileNotFoundError:
        raise StoreError(f"blob {desc.digest} is missing from the store", where=str(store.root),
                         hint="pull the image again") from None
