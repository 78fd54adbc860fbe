"""Reading a local source's files: a layout directory file by file, or a tar archive (plain, xz, gzip,
zstd) member by member without extracting it (see :mod:`layerfs.transfer.sources`, *Reading* and
*Trust*): member names normalised, links resolved inside the archive, small members kept from the
first pass, sizes bounded."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import zstandard

from layerfs.errors import DecompressionLimit, LayerfsError, TarError, UnsupportedMediaType
from layerfs.image import Digest
from layerfs.index import layer_too_large, sniff_compression
from layerfs.index import max_layer_size as layer_size_limit
from layerfs.transfer.transports import SourceError, SourceNotFound

_CHUNK = 1 << 20
_KEEP_LIMIT = 1 << 20      # archive members up to this size are kept in memory by the first pass ...
_KEEP_TOTAL = 64 << 20     # ... up to this much in all
_MAX_LINKS = 40
_HOSTILE = "the archive is damaged or malicious; nothing was imported"

# --- reading files: a layout directory or an archive -------------------------------------

@dataclass
class Member:
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


class LayoutDir:
    """The files of an OCI layout directory (names built here from validated digests, never from input)."""

    seekable = True

    def __init__(self, root: Path):
        self.root = root
        self.where = str(root)

    def close(self) -> None:
        pass

    def find(self, name: str) -> Member | None:
        try:
            st = os.stat(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SourceError(f"cannot read {name}: {e.strerror}", where=self.where, hint=None) from None
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{name} is not a regular file", where=self.where)
        return Member(name, "file", st.st_size)

    def _chunks(self, m: Member) -> Iterator[bytes]:
        with _open_regular(self.root / m.name, "file") as f:
            while True:
                try:
                    b = f.read(_CHUNK)
                except OSError as e:
                    raise SourceError(f"cannot read {m.name}: {e.strerror}", where=self.where, hint=None) from None
                if not b:
                    return
                yield b

    def read(self, m: Member, limit: int) -> bytes:
        if m.size > limit:
            raise SourceError(f"{m.name} is {m.size} bytes, more than the {limit} a JSON document may have",
                              where=self.where)
        out = bytearray()
        for b in self._chunks(m):
            out += b
            if len(out) > limit:
                raise SourceError(f"{m.name} grew beyond {limit} bytes while being read", where=self.where)
        return bytes(out)

    def stream(self, members: list[Member]) -> Iterator[tuple[Member, Iterator[bytes]]]:
        for m in members:
            yield m, self._chunks(m)


class Archive:
    """A tar archive (plain, gzip, xz or zstd), read in place: see the module doc.

    A compressed archive may inflate to no more than a layer may
    (:func:`~layerfs.index.max_layer_size` of the archive's size): xz
    says its size up front, gzip and zstd are counted while they are read."""

    def __init__(self, path: Path, max_layer_size: int | None = None):
        self.path = path
        self.where = str(path)
        self.members: dict[str, Member] = {}
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
            import xz  # python-xz (random access into multi-block xz) costs some 45 ms to import: only for xz
            return xz.open(_open_regular(self.path, "archive"))
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

    def _keep(self, m: Member, data: bytes) -> None:
        if len(data) != m.size:
            raise SourceError(f"the archive is truncated in member {m.name}", where=self.where)
        self._kept[m.name] = data
        self._kept_total += len(data)

    def _add(self, ti: tarfile.TarInfo) -> Member | None:
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
        m = Member(name, kind, ti.size if kind == "file" else 0, ti.offset_data, target)
        self.members[name] = m
        return m

    def _link_target(self, path: str, ti: tarfile.TarInfo, what: str) -> str:
        try:
            return self._norm(path, what)
        except TarError:
            raise TarError(f"archive member {ti.name!r} is a {what} to {ti.linkname!r}, outside the archive",
                           where=self.where, hint=_HOSTILE) from None

    # -- lookups -------------------------------------------------------------------------
    def find(self, name: str, what: str = "file") -> Member | None:
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

    def resolve(self, name: str, what: str) -> Member:
        m = self.find(name, what)
        if m is None:
            raise SourceError(f"{what} {name!r} is missing from the archive", where=self.where)
        return m

    def head(self, m: Member) -> bytes:
        return self._heads.get(m.name, b"")

    def digest(self, m: Member) -> Digest:
        """sha256 of a member's data (sequential archives: from the first pass)."""
        if m.name in self._digests:
            return self._digests[m.name]
        h = hashlib.sha256()
        for b in self._chunks(m):
            h.update(b)
        d = self._digests[m.name] = Digest("sha256", h.hexdigest())
        return d

    # -- data ----------------------------------------------------------------------------
    def _chunks(self, m: Member) -> Iterator[bytes]:
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

    def read(self, m: Member, limit: int) -> bytes:
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

    def stream(self, members: list[Member]) -> Iterator[tuple[Member, Iterator[bytes]]]:
        """(member, its data in chunks) for each of *members*; consume each before the next.

        Seekable archives: in archive order, at random. Sequential ones: kept
        members first, then one more pass over the archive."""
        if self.seekable:
            for m in sorted(members, key=lambda m: m.offset):
                yield m, self._chunks(m)
            return
        want: dict[str, Member] = {}
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

    def _member_chunks(self, f: BinaryIO, m: Member) -> Iterator[bytes]:
        while True:
            with self._guard(f"cannot read {m.name}"):
                b = f.read(_CHUNK)
            if not b:
                return
            yield b


class _Bounded:
    """A sequential decompressed stream that raises the archive's DecompressionLimit past its limit."""

    def __init__(self, raw: BinaryIO, archive: Archive):
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


Files = LayoutDir | Archive
