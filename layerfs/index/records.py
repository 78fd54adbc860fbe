"""The records of a layer's TOC: one :class:`Entry` per tar member, and the entry types."""
from __future__ import annotations

import functools
from typing import NamedTuple

__all__ = ["FILE", "DIR", "SYMLINK", "HARDLINK", "CHAR", "BLOCK", "FIFO", "TYPES", "TYPE_CODE", "LINK_TYPES",
           "SYMLINK_MODE", "Entry", "new_entry"]

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
CHAR = "char"
BLOCK = "block"
FIFO = "fifo"
#: entry types; the position is the type's code in the index file
TYPES = (FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO)
TYPE_CODE = {t: i for i, t in enumerate(TYPES)}
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


#: an Entry from a tuple, without the Python-level __new__ of a NamedTuple
new_entry = functools.partial(tuple.__new__, Entry)
#: the types whose records carry a link target
LINK_TYPES = frozenset({SYMLINK, HARDLINK})
