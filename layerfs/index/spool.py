"""The records of a layer being indexed: spooled to a temporary file, deduplicated, encoded."""
from __future__ import annotations

import array
import os
import tempfile

import zstandard

from layerfs.errors import StoreError
from layerfs.index.columns import U32, U64, col_code, encode_columns, pack_ints, side_tables, unpack_ints
from layerfs.index.records import DIR, HARDLINK, LINK_TYPES, TYPE_CODE, TYPES, Entry, new_entry

__all__ = ["RecordSpool", "dedupe"]

_SPOOL_ROWS = 8192      # records gathered in memory before they go to the spool file
_SEEN_BITS = 1 << 24    # a bitmap of path hashes (2 MiB): paths maybe seen before, without a set of them all
_SPOOL_PARTS = 13       # per batch: 9 integer columns, the type codes, the paths, the link targets, path hashes


class RecordSpool:
    """The records of a layer being indexed, kept in a temporary file rather than in Python objects.

    Records arrive in archive order (:meth:`add`); every ``_SPOOL_ROWS`` of
    them go to an anonymous temporary file (in *directory*) as one batch:
    each integer column as a fixed-width array, the type codes, the paths
    and the link targets, and a hash of each path (to find duplicates: a
    bitmap of the hashes seen names the few that may repeat). What stays in
    memory per record is its xattrs and sparse map, when it has any.
    :meth:`finish` deduplicates (see :func:`dedupe`) and streams the
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
        parts.append(bytes(TYPE_CODE[t] for t in types))
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
        return unpack_ints("q" if k == 4 else "Q", self._part(batch, k))

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
                out.append(new_entry((paths[i], t, modes[i], uids[i], gids[i], sizes[i],
                                       secs[i] * 1_000_000_000 + nsecs[i], links[i] if t in LINK_TYPES else None,
                                       majors[i], minors[i], offsets[i], xattrs.get(base + i),
                                       sparse.get(base + i))))
        return out

    def finish(self) -> tuple[bytes, int]:
        """(the records section: one zstd frame of the columnar encoding, the number of records)."""
        if not self._batches:                   # a layer of fewer than _SPOOL_ROWS records: no spool file
            kept = dedupe(self._rows)
            cols = tuple(map(list, zip(*kept))) if kept else tuple([] for _ in Entry._fields)
            return zstandard.ZstdCompressor(level=3).compress(encode_columns(cols)), len(kept)
        self._spill()
        if self._file is not None:
            self._file.flush()
        if self._again and self._repeats():      # maybe a path twice: deduplicate in memory
            entries = self.entries()
            kept = dedupe(entries)
            if kept is not entries:
                cols = tuple(map(list, zip(*kept))) if kept else tuple([] for _ in Entry._fields)
                return zstandard.ZstdCompressor(level=3).compress(encode_columns(cols)), len(kept)
            del entries, kept
        self._seen = bytearray()
        n = self.count
        codes = [col_code(self._lo[k], self._hi[k], k == 4) for k in range(9)]
        tail = side_tables(self._xattrs, self._sparse)
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
            hashes = unpack_ints("q", self._part(b, 12))
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



def dedupe(entries: list[Entry]) -> list[Entry]:
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
