"""The upper directory format: what a writable mount leaves on the host, read by the mount and by ``diff``/``commit``.

This module is the one definition of the format (its names, xattrs, whiteout forms, the override
value and the work directory); the overlay (:mod:`layerfs.fs.overlay`) writes and reads it, the
change scan of ``diff``, ``commit`` and ``export`` reads it. Do not change it: uppers outlive
mounts and versions.

* a real directory tree mirroring paths: new and changed entries live there
  as ordinary files, directories, symlinks, fifos, sockets (devices too where
  the process may create them);
* a deleted lower entry NAME is an empty regular file ``.wh.NAME`` in its
  parent (the OCI whiteout form, :data:`~layerfs.image.oci.WHITEOUT_PREFIX`:
  ``commit`` tars the upper as is, no root needed to write or read it). A name
  longer than 251 bytes has no room for the prefix (:func:`whiteout_file_fits`):
  its whiteout is a character device 0/0 named NAME (kernel overlayfs' form,
  :func:`is_device_whiteout`) where the process may create devices, else NAME
  is listed in the xattr :data:`WHITEOUTS_XATTR` of the parent (names separated
  by ``/``, :func:`parse_whiteout_record`; on ext4 all xattrs of a directory
  share ~4 KiB, so about 15 such names per directory). All three forms are read
  whatever wrote them; a commit writes every whiteout as the OCI ``.wh.NAME``
  tar entry (a PAX header carries a long one);
* a lower directory removed and re-created (or a directory moved onto a place
  where a lower entry of the same name exists) is opaque: it holds the empty
  file :data:`OPAQUE_MARKER` (``.wh..wh..opq``). A directory of a kernel
  overlayfs upper marked by the xattr ``trusted.overlay.opaque`` or
  ``user.overlay.opaque`` = ``y`` (:func:`is_opaque_xattr`) is opaque for ``diff``
  and ``commit`` too;
* every name beginning with ``.wh.`` belongs to the format (:func:`is_reserved_name`):
  it never shows through the mount and cannot be created there (EINVAL). Of
  those, :func:`whiteout_target` tells what it whites out: only a regular
  file counts, ``.wh..wh.*`` other than the opaque marker is AUFS metadata and
  ``.wh.``, ``.wh..``, ``.wh...`` name nothing — those are ignored;
* as in an OCI layer, ``.wh.NAME`` (or a recorded name) hides NAME of the
  *lower* layers only: an upper ``NAME`` beside ``.wh.NAME`` is shown (and, if a
  directory, is not merged with the lower one). The overlay uses this for crash
  safety: it may write the whiteout before it removes the entry;
* ownership and permission bits the process cannot give a file on the host
  (rootless mounts: chown to another uid, or a mode that would lock the
  daemon out) are kept in the xattr :data:`OVERRIDE_XATTR`
  (``user.layerfs.override_stat``) = ``"UID:GID:MODE"`` (decimal ids below
  2**32, MODE octal up to 7777 incl. setuid/setgid/sticky, e.g. ``"0:0:4755"``)
  and shown through the mount instead of the real values;
* a file type the process cannot create (character/block devices without
  CAP_MKNOD) is an empty regular file with ``user.layerfs.override_stat`` =
  ``"UID:GID:MODE:TYPE:MAJOR:MINOR"``, TYPE one of ``c`` ``b`` (``p`` ``s`` are
  accepted when read); a TYPE on anything but a regular file is malformed;
* **a malformed override value is ignored as a whole**, with one logged warning
  naming the file, by the mount and by ``diff``/``commit`` alike
  (:func:`parse_override`): the entry shows, diffs and commits with its real
  owner, mode and type on the host. An upper a mount serves is thus always one
  that ``diff`` and ``commit`` accept, and no entry's data is dropped for it;
* xattrs under :data:`RESERVED_XATTR_PREFIX` (``user.layerfs.``) are the
  format's own: never content, never listed or settable through the mount;
  :data:`META_XATTR_PREFIXES` are every xattr that describes an upper rather
  than a file (ours and kernel overlayfs'), which a commit leaves out;
* the work directory :func:`work_dir_for` (``<upper parent>/.<upper name>.work``,
  same file system: renames out of it are atomic) holds copy-ups in progress
  and entries being deleted; a mount takes an exclusive lock on it (one mount
  per upper) and removes its leftovers; its temporaries have short generated
  names. While a mount that does not sync (``-o volatile``) runs it holds the
  directory :data:`NOSYNC_MARKER`; an upper whose work dir still holds it after
  the mount ended was left dirty by a crash and is refused.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Iterable

from layerfs.image import OPAQUE_WHITEOUT, WHITEOUT_PREFIX

log = logging.getLogger(__name__)

__all__ = [
    "WH_PREFIX", "OPAQUE_MARKER", "OVERRIDE_XATTR", "WHITEOUTS_XATTR", "RESERVED_XATTR_PREFIX",
    "OVERLAY_OPAQUE_XATTR", "OVERLAY_OPAQUE_XATTRS", "META_XATTR_PREFIXES", "AUFS_META_PREFIX", "NAME_MAX",
    "NOSYNC_MARKER",
    "WH_FILE", "WH_DEVICE", "WH_RECORD", "Override", "parse_override", "work_dir_for",
    "is_reserved_name", "is_opaque_marker", "whiteout_target", "is_device_whiteout", "whiteout_file_fits",
    "whiteout_file_name", "make_device_whiteout", "DEVICE_WHITEOUT_RDEV",
    "parse_whiteout_record", "format_whiteout_record", "is_opaque_xattr",
]

#: the whiteout file of NAME is WH_PREFIX + NAME (the OCI layer spelling)
WH_PREFIX = WHITEOUT_PREFIX
#: an empty file of this name makes its directory opaque (the OCI layer spelling)
OPAQUE_MARKER = OPAQUE_WHITEOUT
#: AUFS keeps its own metadata under this prefix; such names are not whiteouts
AUFS_META_PREFIX = WH_PREFIX + WH_PREFIX
#: every xattr of the format begins so (reserved: never content, not settable through the mount)
RESERVED_XATTR_PREFIX = "user.layerfs."
#: owner/mode (and file type) an entry shows instead of its real ones: see :class:`Override`
OVERRIDE_XATTR = RESERVED_XATTR_PREFIX + "override_stat"
#: on an upper directory: whiteouts of names too long for ``.wh.NAME`` ("/"-separated names)
WHITEOUTS_XATTR = RESERVED_XATTR_PREFIX + "whiteouts"
#: kernel overlayfs marks an opaque directory so (value ``y``; the second form in a user-namespace mount)
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_OPAQUE_XATTRS = (OVERLAY_OPAQUE_XATTR, "user.overlay.opaque")
#: xattrs that describe an upper directory, never content (ours, kernel overlayfs')
META_XATTR_PREFIXES = (RESERVED_XATTR_PREFIX, "trusted.overlay.", "user.overlay.")
NAME_MAX = 255
#: in the work dir while a mount that does not sync runs (kernel overlayfs: work/incompat/volatile)
NOSYNC_MARKER = "volatile"

#: the forms a whiteout of the upper takes: the file ``.wh.NAME``, a 0/0 device, a name in WHITEOUTS_XATTR
WH_FILE, WH_DEVICE, WH_RECORD = "file", "device", "record"

#: the device number of a whiteout in kernel overlayfs' form (a character device)
DEVICE_WHITEOUT_RDEV = 0

_TYPE_OF_CHAR = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}
_CHAR_OF_TYPE = {v: k for k, v in _TYPE_OF_CHAR.items()}
_U32 = 1 << 32


def work_dir_for(upper: str | os.PathLike[str]) -> str:
    """The work directory of *upper*: ``<upper parent>/.<upper name>.work``."""
    upper = os.path.abspath(os.fspath(upper))
    parent, name = os.path.split(upper.rstrip("/"))
    return os.path.join(parent, f".{name}.work")


# -- the override xattr -----------------------------------------------------------------------------

class Override:
    """A ``user.layerfs.override_stat`` value: owner, permission bits and, for a placeholder, the
    file type (``stat.S_IF*``) and device number it stands for (*ftype* None: the real type)."""

    __slots__ = ("uid", "gid", "mode", "ftype", "rdev")

    def __init__(self, uid: int, gid: int, mode: int, ftype: int | None = None, rdev: int = 0):
        self.uid, self.gid, self.mode, self.ftype, self.rdev = uid, gid, mode, ftype, rdev

    @property
    def type_char(self) -> str | None:
        """TYPE of the value (``c``, ``b``, ``p``, ``s``), None without one."""
        return None if self.ftype is None else _CHAR_OF_TYPE[self.ftype]

    def encode(self) -> bytes:
        """The xattr value (:func:`parse_override` reads it back)."""
        text = f"{self.uid}:{self.gid}:{self.mode:04o}"
        if self.ftype is not None:
            text += f":{_CHAR_OF_TYPE[self.ftype]}:{os.major(self.rdev)}:{os.minor(self.rdev)}"
        return text.encode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Override) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return f"Override({self.encode().decode()!r})"


def _parse(raw: bytes) -> Override | None:
    try:
        parts = raw.decode("ascii").strip().split(":")
    except UnicodeDecodeError:
        return None
    if len(parts) not in (3, 6) or not all(p.isdigit() for p in parts[:3] + parts[4:]):
        return None             # isdigit: no sign, no blanks, no "0x" — one spelling per value
    if not set(parts[2]) <= set("01234567"):
        return None
    uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
    if uid >= _U32 or gid >= _U32 or mode > 0o7777:
        return None
    if len(parts) == 3:
        return Override(uid, gid, mode)
    ftype = _TYPE_OF_CHAR.get(parts[3])
    major, minor = int(parts[4]), int(parts[5])
    if ftype is None or major >= _U32 or minor >= _U32:
        return None
    return Override(uid, gid, mode, ftype, os.makedev(major, minor))


def parse_override(raw: bytes, *, file_mode: int | None = None, where: str = "") -> Override | None:
    """The :class:`Override` of the xattr value *raw*, or None (with a logged warning naming *where*)
    when it is malformed: the one rule of the format is that a malformed value is ignored as a whole.
    *file_mode*: the ``st_mode`` of the file carrying it (a file type value fits a regular file only)."""
    ov = _parse(raw)
    if ov is not None and ov.ftype is not None and file_mode is not None and not stat.S_ISREG(file_mode):
        ov = None
    if ov is None:
        log.warning("%s: ignoring malformed %s value %r (expected UID:GID:MODE, MODE in octal, or "
                    "UID:GID:MODE:c|b|p|s:MAJOR:MINOR on a regular file)", where or "upper",
                    OVERRIDE_XATTR, raw[:80])
    return ov


# -- whiteouts and opaque directories -------------------------------------------------------------

def is_reserved_name(name: str) -> bool:
    """Whether *name* belongs to the format (``.wh.*``): never shown, never created through a mount."""
    return name.startswith(WH_PREFIX)


def is_opaque_marker(name: str, file_mode: int | None = None) -> bool:
    """Whether the entry *name* (of type *file_mode*, if known) makes its directory opaque."""
    return name == OPAQUE_MARKER and (file_mode is None or stat.S_ISREG(file_mode))


def whiteout_target(name: str, file_mode: int | None = None) -> str | None:
    """The name the entry *name* (of type *file_mode*, if known: only a regular file counts) whites out
    as ``.wh.NAME``; None for any other entry, the opaque marker, AUFS metadata (``.wh..wh.*``) and a
    whiteout naming nothing (``.wh.``, ``.wh..``, ``.wh...``)."""
    if not name.startswith(WH_PREFIX) or name.startswith(AUFS_META_PREFIX):
        return None
    if file_mode is not None and not stat.S_ISREG(file_mode):
        return None
    victim = name[len(WH_PREFIX):]
    return victim if victim not in ("", ".", "..") else None


def is_device_whiteout(file_mode: int, rdev: int) -> bool:
    """Whether an entry of *file_mode* and *rdev* is a whiteout in kernel overlayfs' form (char device 0/0)."""
    return stat.S_ISCHR(file_mode) and rdev == DEVICE_WHITEOUT_RDEV


def whiteout_file_name(name: str) -> str:
    """The name of the whiteout file of *name* (``.wh.NAME``; see :func:`whiteout_file_fits`)."""
    return WH_PREFIX + name


def make_device_whiteout(name: str, dir_fd: int) -> None:
    """Create the whiteout *name* in kernel overlayfs' form (a character device 0/0) in *dir_fd*."""
    os.mknod(name, stat.S_IFCHR, DEVICE_WHITEOUT_RDEV, dir_fd=dir_fd)


def whiteout_file_fits(name: str) -> bool:
    """Whether the whiteout of *name* can be the OCI file ``.wh.NAME`` (at most NAME_MAX bytes)."""
    return len(os.fsencode(name)) + len(WH_PREFIX) <= NAME_MAX


def parse_whiteout_record(raw: bytes) -> list[str]:
    """The names of a :data:`WHITEOUTS_XATTR` value (``/``-separated, as no name holds a ``/``)."""
    return [os.fsdecode(n) for n in raw.split(b"/") if n and n not in (b".", b"..")]


def format_whiteout_record(names: Iterable[str]) -> bytes:
    """The :data:`WHITEOUTS_XATTR` value listing *names* (b"" for none: remove the xattr then)."""
    return b"/".join(os.fsencode(n) for n in names)


def is_opaque_xattr(name: str, value: bytes) -> bool:
    """Whether the xattr *name* = *value* on a directory marks it opaque (kernel overlayfs' form)."""
    return name in OVERLAY_OPAQUE_XATTRS and value == b"y"
