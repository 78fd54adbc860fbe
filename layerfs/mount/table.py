"""The mount table: which mounts a store has, in what state, and the mount point rules.

The table: ``ROOT/mounts/<id>.json`` (``<id>`` hashes the mount point's real
path), written by the daemon once ready and removed when it exits; beside it
``<id>.log`` (the daemon's log) and ``<id>.lock`` (held while the mount point is
checked and mounted). While its mount point is a ``fuse.layerfs`` mount in
``/proc/self/mountinfo`` (:func:`kernel_mounts`), a record is in one of two states
(:func:`mount_states`): ``running`` (its daemon runs) or ``dead`` (its daemon
died without unmounting, e.g. ``kill -9`` or the OOM killer: every access to
the mount point fails with ENOTCONN, "Transport endpoint is not connected",
until ``umount`` detaches it and drops the record). A record whose mount
point is no longer mounted (unmounted by other means, a reboot) describes
nothing left to serve or clean up: it is removed whenever mounts are listed
or a mount point is (un)mounted.

Mount point rules (:func:`check_mountpoint`): it must exist and be a directory
(a missing last component is created), must not already be a mount point, and
must be empty unless ``-o nonempty`` is given (libfuse 3 mounts over non-empty
directories silently, hiding their contents; layerfs refuses by default like
libfuse 2 did, and strips ``nonempty`` before passing the options on).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from layerfs.libc import pid_alive
from layerfs.errors import LayerfsError
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = ["FSTYPE", "RUNNING", "DEAD", "MountError", "MountRecord", "MountTable", "kernel_mounts",
           "resolved_path", "check_mountpoint", "mounts", "mount_states", "utc_now"]

FSTYPE = "fuse.layerfs"
#: the states of a mount (see :func:`mount_states`)
RUNNING = "running"
DEAD = "dead"


class MountError(LayerfsError):
    """A mount point that cannot be (un)mounted, or a mount daemon that failed."""


def utc_now() -> str:
    """Now, RFC 3339 in UTC to the second (``started`` of a record, ``created`` of a stored upper)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class MountRecord:
    image: str                 # the image as the user knows it (familiar reference)
    manifest_digest: str
    mountpoint: str            # real path
    pid: int                   # the daemon serving the mount
    upper: str | None          # writable upper dir (None: read-only)
    started: str               # RFC 3339, UTC
    layer: int | None = None
    log: str | None = None     # the daemon's log file

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "MountRecord":
        d = json.loads(raw)
        return cls(image=str(d["image"]), manifest_digest=str(d["manifest_digest"]),
                   mountpoint=str(d["mountpoint"]), pid=int(d["pid"]), upper=d.get("upper"),
                   started=str(d["started"]), layer=d.get("layer"), log=d.get("log"))


# --- the kernel's view -----------------------------------------------------------------

def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c == 0x5C and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(c)
            i += 1
    return os.fsdecode(bytes(out))


def kernel_mounts() -> dict[str, tuple[str, str]]:
    """Mount point → (fstype, source) from /proc/self/mountinfo (the top mount wins)."""
    table: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            table[_unescape(fields[4])] = (fields[sep + 1].decode(errors="replace"),
                                           _unescape(fields[sep + 2]))
        except (ValueError, IndexError):
            continue
    return table


def resolved_path(path: str | os.PathLike[str]) -> str:
    """The real path of *path* (a mount point, an upper directory) with its last name not resolved: a mount
    point is named without touching the mount itself (it may be a dead FUSE mount)."""
    p = os.path.abspath(os.fspath(path))
    if p == "/":
        return p
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


#: what calls on a FUSE mount whose daemon is gone fail with (ECONNABORTED: requests in flight when it died)
_DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def _dead_mount(shown: str) -> MountError:
    return MountError(f"{shown} is a dead FUSE mount (its daemon is gone)",
                      hint=f"clean it up with 'layerfs umount {shown}'")


def check_mountpoint(path: str | os.PathLike[str], *, allow_nonempty: bool = False) -> str:
    """Validate a mount point; return its real path or raise one clear :class:`MountError`."""
    shown = os.fspath(path)
    try:
        try:
            st = os.stat(shown)
        except FileNotFoundError:
            # like docker's bind mounts: a missing last component is created (its parent must exist)
            try:
                os.mkdir(shown, 0o755)
            except FileNotFoundError:
                raise MountError(f"mount point {shown} does not exist, nor does its parent directory",
                                 hint=f"create it first: mkdir -p {shown}") from None
            except FileExistsError:
                pass
            st = os.stat(shown)
    except MountError:
        raise
    except OSError as e:
        if e.errno in _DEAD_ERRNOS:
            raise _dead_mount(shown) from None
        raise MountError(f"cannot use mount point {shown}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {shown} is not a directory")
    real = os.path.realpath(shown)
    table = kernel_mounts()
    if real in table:
        fstype = table[real][0]
        if fstype.startswith("fuse"):
            # the root's attributes may still be cached: statfs always asks the daemon
            try:
                os.statvfs(real)
            except OSError as e:
                if e.errno in _DEAD_ERRNOS:
                    raise _dead_mount(shown) from None
        what = "a layerfs mount" if fstype == FSTYPE else f"a {fstype} mount"
        raise MountError(f"{shown} is already mounted ({what})",
                         hint=f"unmount it first ('layerfs umount {shown}') or pick another directory")
    try:
        with os.scandir(real) as it:
            nonempty = next(it, None) is not None
    except OSError as e:
        raise MountError(f"cannot read mount point {shown}: {e.strerror}") from None
    if nonempty and not allow_nonempty:
        raise MountError(f"mount point {shown} is not empty",
                         hint="use an empty directory, or '-o nonempty' to hide its contents under the mount")
    return real


# --- the table -------------------------------------------------------------------------

class MountTable:
    """``ROOT/mounts/<id>.json`` per active mount (and ``<id>.log``, the daemon's log)."""

    def __init__(self, store: Store):
        self.dir = store.root / "mounts"

    def _stem(self, mountpoint: str) -> Path:
        key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:20]
        return self.dir / key

    def record_path(self, mountpoint: str) -> Path:
        return self._stem(mountpoint).with_suffix(".json")

    def log_path(self, mountpoint: str) -> Path:
        return self._stem(mountpoint).with_suffix(".log")

    def lock(self, mountpoint: str) -> int:
        """An fd holding the exclusive lock of *mountpoint* (close it to release)."""
        fd = os.open(self._stem(mountpoint).with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, record: MountRecord) -> None:
        # temp + rename, without fsync: the record describes a live process, a crash ends both
        path = self.record_path(record.mountpoint)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(record.to_json())
        os.replace(tmp, path)

    def remove(self, mountpoint: str, pid: int | None = None) -> None:
        """Remove the record of *mountpoint* (only if it names *pid*, when given)."""
        path = self.record_path(mountpoint)
        if pid is not None:
            rec = self._load(path)
            if rec is None or rec.pid != pid:
                return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    @staticmethod
    def _load(path: Path) -> MountRecord | None:
        try:
            return MountRecord.from_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring corrupt mount record %s: %s", path, e)
            return None

    def get(self, mountpoint: str) -> MountRecord | None:
        return self._load(self.record_path(mountpoint))

    def records(self) -> list[tuple[Path, MountRecord | None]]:
        try:
            paths = sorted(self.dir.glob("*.json"))
        except OSError:
            return []
        return [(p, self._load(p)) for p in paths]

    def states(self, table: dict[str, tuple[str, str]] | None = None) -> list[tuple[MountRecord, str]]:
        """(record, RUNNING or DEAD) of every record whose mount point is mounted, oldest first;
        the others (not mounted any more, or corrupt) are removed."""
        table = kernel_mounts() if table is None else table
        out = []
        for path, rec in self.records():
            if rec is not None and table.get(rec.mountpoint, ("",))[0] == FSTYPE:
                out.append((rec, RUNNING if pid_alive(rec.pid) else DEAD))
                continue
            log.info("removing stale mount record %s (%s)", path.name, rec.mountpoint if rec else "corrupt")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        out.sort(key=lambda x: x[0].started)
        return out

    def active(self, table: dict[str, tuple[str, str]] | None = None) -> list[MountRecord]:
        """The running mounts' records (see :meth:`states`)."""
        return [rec for rec, state in self.states(table) if state == RUNNING]


def mounts(store: Store) -> list[MountRecord]:
    """Running layerfs mounts of *store* (stale records are cleaned on the way)."""
    return MountTable(store).active()


def mount_states(store: Store) -> list[tuple[MountRecord, str]]:
    """Every mount of *store* with its state: :data:`RUNNING`, or :data:`DEAD` (the daemon is
    gone, the mount point still mounted; ``umount`` cleans it up). Stale records are cleaned."""
    return MountTable(store).states()
