"""The streaming tar scanner of layer blobs, and its rules for hostile archives.

The tar headers are parsed with the standard library's :mod:`tarfile`
(:meth:`tarfile.TarInfo.fromtarfile`, the same code ``TarFile.next`` runs),
recording for every member its path, type, mode, ids, size, mtime (ns),
link target, device numbers, xattrs, the offset of its data in the
uncompressed stream and its sparse map (an :class:`~layerfs.index.records.Entry`).

The parser is incremental and push-driven: member data is never copied,
only skipped, and a header that is not complete yet is simply parsed again
once more bytes arrive (``fromtarfile`` reads through a forward-only window
that raises an internal "need more" signal at its end), so it needs no
thread of its own to block in.  Plain ustar/GNU headers take a faster path
through :class:`_TarInfo` that yields exactly what tarfile's own ``frombuf``
would.

Hostile input is refused with one :class:`~layerfs.errors.TarError`: paths
that climb above the layer root or hold NUL bytes, headers larger than
:data:`MAX_HEADER_BYTES`, chains of extended headers, truncation, bad sparse
maps, numbers out of range; members of unsupported types are skipped.
"""
from __future__ import annotations

import base64
import logging
import struct
import tarfile
from urllib.parse import unquote_to_bytes

from layerfs.errors import TarError
from layerfs.index.limits import format_size
from layerfs.index.records import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, SYMLINK_MODE, Entry, new_entry

log = logging.getLogger(__name__)

__all__ = ["MAX_HEADER_BYTES", "TarScanner", "normalize_path"]


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


class TarScanner:
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
        return new_entry((path, kind, mode, uid, gid, size, mtime_ns, linkname, major, minor,
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
