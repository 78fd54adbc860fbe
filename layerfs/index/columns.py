"""The column encoding of TOC records, and the container of layerfs index files.

Integer columns are stored in the narrowest array type that holds them
(:func:`int_col`: a type code byte, then little-endian data), strings as one
NUL-joined table (:func:`string_table`); :func:`encode_columns` /
:func:`decode_columns` turn TOC records into that form and back.  The same
encoding serves the merged-tree cache of :mod:`layerfs.fs` and the published
TOC artifacts of :mod:`layerfs.transfer`.  :func:`pack_file` /
:func:`unpack_file` are the container all those files share: a head (magic,
version, flags, xxh3_64 of the body), JSON metadata and sections.
"""
from __future__ import annotations

import array
import json
import struct
import sys
from typing import Iterable

import xxhash

from layerfs.errors import ContentError
from layerfs.index.records import LINK_TYPES, SYMLINK, SYMLINK_MODE, TYPE_CODE, TYPES

__all__ = ["IndexFormatError", "U32", "U64", "pack_ints", "unpack_ints", "Cursor", "string_table", "col_code",
           "int_col", "encode_columns", "side_tables", "decode_columns", "pack_file", "unpack_file"]

_MAGIC = b"LFSLIDX\n"                  # the default magic of pack_file: the layer TOC's
_HEAD = struct.Struct("<8sIIQ")         # magic, version, flags, xxh3_64 of everything after the head
_BIG = sys.byteorder == "big"
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class IndexFormatError(ContentError):
    """A saved index (layer index or tree cache) that is corrupt, truncated or of another version."""

    default_hint = "the index is rebuilt from the layer blob automatically"


def pack_ints(code: str, values: Iterable[int]) -> bytes:
    """*values* as a little-endian array of type *code*."""
    a = array.array(code, values)
    if _BIG:
        a.byteswap()
    return a.tobytes()


def unpack_ints(code: str, data: bytes) -> array.array:
    """The array of type *code* that :func:`pack_ints` wrote as *data*."""
    a = array.array(code)
    a.frombytes(data)
    if _BIG:
        a.byteswap()
    return a


class Cursor:
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
        a = unpack_ints(code, self.take(n * array.array(code).itemsize))
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


def string_table(items: list[str]) -> bytes:
    """A string column: u64 length, then the strings joined by NULs (UTF-8, surrogates escaped)."""
    blob = "\0".join(items).encode("utf-8", "surrogateescape")
    return U64.pack(len(blob)) + blob


def col_code(lo: int, hi: int, signed: bool) -> str:
    """The narrowest array type code that holds the integers from *lo* to *hi*."""
    for code in ("bhiq" if signed else "BHIQ"):
        bits = array.array(code).itemsize * 8
        if (-(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1))) if signed else hi < (1 << bits):
            return code
    raise ValueError("integer column out of range")  # pragma: no cover - values are checked on parse


def int_col(values: list[int], signed: bool = False) -> bytes:
    """An integer column in the narrowest array type that holds it: type code byte + little-endian data."""
    code = col_code(min(values, default=0), max(values, default=0), signed)
    return code.encode() + pack_ints(code, values)


def encode_columns(cols: tuple[list, ...]) -> bytes:
    """The columnar encoding of TOC records given as one list per :class:`Entry` field."""
    n = len(cols[0])
    (paths, types, modes, uids, gids, sizes, mtimes, links, majors, minors, offsets, xattrs, sparses) = cols
    secs = [m // 1_000_000_000 for m in mtimes]
    nsecs = [m % 1_000_000_000 for m in mtimes]
    parts = [U32.pack(n),
             bytes(TYPE_CODE[t] for t in types),
             int_col(modes), int_col(uids), int_col(gids), int_col(sizes), int_col(secs, True), int_col(nsecs),
             int_col(majors), int_col(minors), int_col(offsets),
             string_table(list(paths)), string_table([l or "" for l in links]),
             side_tables([(i, x) for i, x in enumerate(xattrs) if x],
                          [(i, s) for i, s in enumerate(sparses) if s is not None])]
    return b"".join(parts)


def side_tables(xattrs: list[tuple[int, dict[str, bytes]]], sparses: list[tuple[int, tuple]]) -> bytes:
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
             string_table(x_names), pack_ints("I", map(len, x_vals)), b"".join(x_vals)]
    s_idx, s_cnt, s_flat = [], [], []
    for i, s in sparses:
        s_idx.append(i)
        s_cnt.append(len(s))
        for ext in s:
            s_flat.extend(ext)
    parts += [U32.pack(len(s_idx)), pack_ints("I", s_idx), pack_ints("I", s_cnt), U64.pack(len(s_flat)),
              pack_ints("Q", s_flat)]
    return b"".join(parts)


def decode_columns(raw: bytes) -> tuple[list, ...]:
    """The columns of the records (one list per Entry field)."""
    c = Cursor(raw, "layer index records")
    (n,) = c.unpack(U32)
    if n > len(raw):
        raise IndexFormatError("layer index records: bad count")
    tcodes = c.take(n)
    try:
        types = list(map(TYPES.__getitem__, tcodes))
    except IndexError:
        raise IndexFormatError("layer index records: unknown entry type") from None
    modes, uids, gids, sizes = c.col(n), c.col(n), c.col(n), c.col(n)
    sym = TYPE_CODE[SYMLINK]
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
    links = [l if t in LINK_TYPES else None for l, t in zip(links, types)]
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
