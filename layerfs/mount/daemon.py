"""Mount lifecycle: mount an image (daemonised or in the foreground), list and unmount mounts.

    mount_image(store, "alpine:3.20", "/mnt/x", MountOptions())  # returns once /mnt/x answers
    mounts(store)                                                 # [MountRecord(...)]
    umount(store, "/mnt/x")                                       # unmount, wait for the daemon

Daemon model (libfuse's ``fuse_daemonize``, done before any thread or event
loop exists): the daemon is forked twice (re-parented, never a zombie of a
long-lived caller, in a new session, stdio to ``ROOT/mounts/<id>.log``) and
the caller waits on a pipe. The daemon imports the FUSE adapter (only the
daemon pays for it), mounts, ``stat``\\ s its own mount root through the kernel,
writes its record and only then reports ``ok`` over the pipe; on failure it
sends its one-line error instead. The caller resolves the image (pulling it
if absent) and checks the mount point, so those errors surface directly.

Start-up is the daemon's imports plus the caller's work, so
:func:`mount_image` overlaps them: it forks the daemon first, before even
resolving the image (:class:`_Helper`). The daemon imports while the caller
resolves, checks and makes sure the image's tree cache exists (building it
if missing), then gets the mount (manifest digest and record) over a second
pipe, loads the tree from the cache and serves. Every error of the caller
closes that pipe without a mount, and so does its death: the waiting daemon
then exits quietly, so a failed ``mount`` leaves no process behind. A tree
built by the caller (:func:`mount_tree`, a custom tree factory, an
unwritable store) is shared with a daemon forked once it is built.

Registry of mounts: ``ROOT/mounts/<id>.json`` (``<id>`` hashes the mount
point's real path), written by the daemon once ready and removed when it
exits. While its mount point is a ``fuse.layerfs`` mount in
``/proc/self/mountinfo``, a record is in one of two states
(:func:`mount_states`): ``running`` (its daemon runs) or ``dead`` (its daemon
died without unmounting, e.g. ``kill -9`` or the OOM killer: every access to
the mount point fails with ENOTCONN, "Transport endpoint is not connected",
until :func:`umount` detaches it and drops the record). A record whose mount
point is no longer mounted (unmounted by other means, a reboot) describes
nothing left to serve or clean up: it is removed whenever mounts are listed
or a mount point is (un)mounted.

Mount point rules: it must exist and be a directory, must not already be a
mount point, and must be empty unless ``-o nonempty`` is given (libfuse 3
mounts over non-empty directories silently, hiding their contents; layerfs
refuses by default like libfuse 2 did, and strips ``nonempty`` before
passing the options on).

SIGTERM, SIGINT or SIGHUP to the daemon unmounts cleanly (lazily: open files
keep working until closed) and removes the record.

Writable mounts (``MountOptions(read_only=False)``, the CLI's default) serve a
:class:`layerfs.fs.overlay.Overlay`: the image's layers plus an upper directory
(format in :mod:`layerfs.fs.overlay`). ``upper=DIR`` uses that directory (made
if missing; remounting the same image with it shows the earlier changes);
without it the upper lives in the store, ``ROOT/uppers/<id>/upper`` with a
new 12-hex ``<id>`` per mount (``info.json`` beside it names the image), kept
after unmounting until ``umount(..., remove_upper=True)`` (``layerfs umount
--rm``) or :func:`remove_upper` (``layerfs rm ID``). The overlay's work dir is
the upper's sibling ``.<name>.work``; the daemon holds a lock on it, so one
upper serves one mount at a time. ``read_only=True`` with ``upper=DIR``
shows an upper's changes without allowing new ones. The record's ``upper``
field names the upper directory (None for a plain read-only mount).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from layerfs import libc
from layerfs.errors import ImageNotFound, LayerfsError, UsageError
from layerfs.image import Manifest, Platform
from layerfs.image import is_local_source
from layerfs.store import Store

if TYPE_CHECKING:
    from layerfs.fs import MergedTree
    from layerfs.image import Reference

log = logging.getLogger(__name__)

FSTYPE = "fuse.layerfs"
#: seconds the caller waits for the daemon to answer
READY_TIMEOUT = 60.0
#: seconds umount waits for the daemon to exit after the unmount
EXIT_TIMEOUT = 10.0
#: the states of a mount (see :func:`mount_states`)
RUNNING = "running"
DEAD = "dead"


class MountError(LayerfsError):
    """A mount point that cannot be (un)mounted, or a mount daemon that failed."""


@dataclass(frozen=True, kw_only=True)
class MountOptions:
    read_only: bool = True                 # False: writable overlay (an upper directory, see the module doc)
    upper: str | None = None               # the upper directory (None: a new one in the store when writable)
    layer: int | None = None               # show only the first N layers (the image after layer N)
    platform: Platform | None = None       # used when the image must be pulled
    fuse_options: Sequence[str] = ()       # passed to libfuse (-o), e.g. allow_other; "nonempty", "volatile", "index=" are ours
    foreground: bool = False
    debug: bool = False                    # debug logs (libfuse's request trace: fuse_options=["debug"])
    ready_fd: int | None = None            # foreground: report readiness on this fd (like the daemon pipe)
    ready_timeout: float = READY_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "fuse_options", tuple(o for o in self.fuse_options if o))
        if self.layer is not None and self.layer < 0:
            raise UsageError(f"--layer {self.layer} is negative")
        if self.read_only and "rw" in self.fuse_options:
            raise UsageError("-o rw contradicts a read-only mount", hint="leave out --read-only for a writable mount")
        if not self.read_only and "ro" in self.fuse_options:
            raise UsageError("-o ro: use --read-only for a read-only mount")
        object.__setattr__(self, "fuse_options", tuple(o for o in self.fuse_options if o != "rw"))
        if self.read_only and self.volatile:
            raise UsageError("-o volatile is for writable mounts", hint="leave out --read-only")
        for o in self.fuse_options:
            if o.startswith("index=") and o not in ("index=on", "index=off"):
                raise UsageError(f"-o {o}: expected index=on or index=off")
        if self.upper is not None:
            object.__setattr__(self, "upper", os.path.abspath(os.fspath(self.upper)))

    @property
    def allow_nonempty(self) -> bool:
        return "nonempty" in self.fuse_options

    @property
    def volatile(self) -> bool:
        """As kernel overlayfs's option: copy-ups and fsync(2) are not synced to disk."""
        return "volatile" in self.fuse_options

    @property
    def index(self) -> bool:
        """As kernel overlayfs's option: all names of a copied-up lower hard-linked file stay one inode
        (the last of index=on/index=off given wins; off by default)."""
        return next((o == "index=on" for o in reversed(self.fuse_options) if o.startswith("index=")), False)

    @property
    def libfuse_options(self) -> tuple[str, ...]:
        return tuple(o for o in self.fuse_options if o not in ("nonempty", "volatile") and not o.startswith("index="))


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


def mount_table() -> dict[str, tuple[str, str]]:
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


def pid_alive(pid: int) -> bool:
    """True while *pid* runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    state = st[st.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"x")


def _abs_mountpoint(path: str | os.PathLike[str]) -> str:
    """The real path of a mount point without touching the mount itself (it may be dead)."""
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
    table = mount_table()
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


# --- the registry ----------------------------------------------------------------------

class MountRegistry:
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
        import fcntl
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
        table = mount_table() if table is None else table
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


# --- mounting ----------------------------------------------------------------------------

TreeFactory = Callable[..., "MergedTree"]



def _default_tree_factory(store: Store, manifest: Manifest, *, upto: int | None) -> "MergedTree":
    from layerfs.fs import open_image_tree
    return open_image_tree(store, manifest, upto=upto)


def _default_pull(store: Store, options: MountOptions) -> Callable[["Reference"], Any]:
    def pull(ref: "Reference"):
        from layerfs.transfer import Puller, PullOptions
        return Puller(store, PullOptions(platform=options.platform)).pull(ref)
    return pull


def resolve_image(store: Store, ref_text: str, options: MountOptions,
                  pull: Callable[["Reference"], Any] | None = None) -> tuple[str, Manifest]:
    """(name to show, manifest) of a local image, pulling it first when absent (or of another platform).

    A local source (``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:TAG]``) is imported first, then its tagged name is used."""
    if is_local_source(ref_text):   # importing .sources costs requests & co.: only for a source
        from layerfs.transfer import LoadOptions, is_source, load
        if is_source(ref_text):
            ref_text = load(store, ref_text, LoadOptions(platform=options.platform, single=True)).images[0].names[0]
    try:
        rec, manifest = store.resolve(ref_text)
        if options.platform is not None:
            cfg = store.config(manifest).platform
            if cfg is not None and not options.platform.matches(cfg):
                raise ImageNotFound(f"local {ref_text} is for {cfg}, not {options.platform}")
    except ImageNotFound:
        from layerfs.image import Reference
        ref = Reference.parse(ref_text)
        log.info("image %s is not local: pulling it", ref.familiar())
        (pull or _default_pull(store, options))(ref)
        rec, manifest = store.resolve(ref)
    ref = rec.reference
    return (ref.familiar() if ref else rec.name), manifest


def mount_image(store: Store, ref_text: str, mountpoint: str | os.PathLike[str], options: MountOptions, *,
                tree_factory: TreeFactory | None = None,
                pull: Callable[["Reference"], Any] | None = None) -> MountRecord:
    """Mount image *ref_text* (pulled if absent) at *mountpoint*.

    Returns once the mount answers (daemon mode), or after it was unmounted
    (``options.foreground``). *tree_factory(store, manifest, upto=N)* builds
    the merged tree (default: :func:`layerfs.fs.union.open_image_tree`); *pull*
    pulls a :class:`Reference` into *store* (default: a :class:`Puller`).

    Daemon mode with the default tree forks the mount daemon first (see
    :class:`_Helper`): it imports the FUSE adapter while this process resolves
    the image and checks the mount point, then loads the tree from the
    store's tree cache itself (built here first when missing; rebuilt by
    the daemon when corrupt or outdated).
    """
    if options.foreground or tree_factory is not None:
        check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)   # fail before pulling
        image, manifest = resolve_image(store, ref_text, options, pull)
        tree = (tree_factory or _default_tree_factory)(store, manifest, upto=options.layer)
        return mount_tree(tree, mountpoint, options, store=store, image=image, manifest_digest=str(manifest.digest))
    from layerfs.fs import union  # noqa: F401  (both processes need it: imported once, before forking)
    helper = _Helper(store.root, options)
    try:
        check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)   # fail before pulling
        image, manifest = resolve_image(store, ref_text, options, pull)
        tree = _cached_tree(store, manifest, options.layer)
        if tree is None:    # the tree cache is there: the daemon loads it
            start = functools.partial(helper.run, manifest)
        else:               # an unwritable store (no cache): fork the daemon now, sharing this tree
            helper.close()
            start = functools.partial(_daemonize, tree)
        return _mount(start, mountpoint, options, store=store, image=image, manifest_digest=str(manifest.digest))
    finally:
        helper.close()


def _cached_tree(store: Store, manifest: Manifest, upto: int | None) -> "MergedTree | None":
    """None when the tree cache (of this format) and the layer indexes of the image's first *upto* layers
    exist; else the tree, built now (which saves the cache: then None too). Raises what
    :func:`open_image_tree` raises."""
    from layerfs.fs import open_image_tree, tree_cache_current, tree_cache_path
    from layerfs.index import index_path
    n = len(manifest.layers) if upto is None else upto

    def cached() -> bool:   # (an outdated cache is rebuilt here too: not in the daemon, which would keep its heap)
        return (0 <= n <= len(manifest.layers) and tree_cache_current(tree_cache_path(store, manifest, n))
                and all(index_path(store, d.digest).is_file() for d in manifest.layers[:n]))

    if cached():
        return None
    tree = open_image_tree(store, manifest, upto=upto)
    return None if cached() else tree


def mount_tree(tree: "MergedTree", mountpoint: str | os.PathLike[str], options: MountOptions, *, store: Store,
               image: str, manifest_digest: str = "") -> MountRecord:
    """Mount an already built *tree* at *mountpoint* (see :func:`mount_image`)."""
    if options.foreground:   # the reporter releases the lock once the mount answers (or failed)
        def start(record: MountRecord, opts: MountOptions, registry: MountRegistry, lock: int) -> MountRecord:
            return _serve_here(tree, record, opts, registry, _Reporter(opts.ready_fd, lock))
    else:
        start = functools.partial(_daemonize, tree)
    return _mount(start, mountpoint, options, store=store, image=image, manifest_digest=manifest_digest)


def mount_service(serve_fn: Callable[..., None], mountpoint: str | os.PathLike[str], options: MountOptions, *,
                  store: Store, image: str) -> MountRecord:
    """Mount a file system of another kind than an image view (the layer store, :mod:`layerfs.mount.alstore`):
    ``serve_fn(mountpoint, fuse_options, on_ready=callback)`` mounts it (not ``ro``: its handlers decide what
    a write does) and serves it until unmounted. It is daemonised (unless ``options.foreground``), recorded,
    listed by ``layerfs mounts`` and unmounted by ``layerfs umount`` like an image mount."""
    if options.foreground:
        def start(record: MountRecord, opts: MountOptions, registry: MountRegistry, lock: int) -> MountRecord:
            return _serve_here(None, record, opts, registry, _Reporter(opts.ready_fd, lock), serve_fn=serve_fn)
    else:
        start = functools.partial(_daemonize, None, serve_fn=serve_fn)
    return _mount(start, mountpoint, options, store=store, image=image, manifest_digest="")


def _mount(start: Callable[[MountRecord, MountOptions, MountRegistry, int], MountRecord],
           mountpoint: str | os.PathLike[str], options: MountOptions, *, store: Store, image: str,
           manifest_digest: str) -> MountRecord:
    """Check the mount point and prepare the upper under the mount point's lock, then
    ``start(record, options, registry, lock)`` (which serves or hands over the mount)."""
    registry = MountRegistry(store)
    active = registry.active()  # clean stale records
    registry.dir.mkdir(parents=True, exist_ok=True)
    # One mount at a time per mount point: checked and mounted under a lock held until the mount answers.
    lock = registry.lock(_abs_mountpoint(mountpoint))
    _CALLER_FDS.add(lock)
    created: Path | None = None
    try:
        real = check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)
        upper, created = _prepare_upper(store, options, active, image=image, manifest_digest=manifest_digest)
    except BaseException:
        _close(lock)
        raise
    record = MountRecord(image=image, manifest_digest=manifest_digest, mountpoint=real, pid=0, upper=upper,
                         started="", layer=options.layer, log=str(registry.log_path(real)))
    try:
        try:
            return start(record, options, registry, lock)
        finally:
            if not options.foreground:
                _close(lock)
    except BaseException:
        if created is not None:     # a new upper of the store that never served: not worth keeping
            shutil.rmtree(created, ignore_errors=True)
        raise


# --- upper directories ---------------------------------------------------------------------

def uppers_dir(store: Store) -> Path:
    """Where the store keeps the upper directories of writable mounts: ``ROOT/uppers/<id>/upper``."""
    return store.root / "uppers"


def stored_upper_id(store: Store, upper: str | os.PathLike[str] | None) -> str | None:
    """The ``<id>`` of *upper* when it is one the store manages, else None."""
    if not upper:
        return None
    p = Path(os.path.abspath(os.fspath(upper)))
    base = Path(os.path.abspath(uppers_dir(store)))
    if p.name == "upper" and p.parent.parent == base:
        return p.parent.name
    return None


def _prepare_upper(store: Store, options: MountOptions, active: list[MountRecord], *, image: str,
                   manifest_digest: str) -> tuple[str | None, Path | None]:
    """(upper directory or None, the store directory made for it or None); checked before forking."""
    if options.read_only and options.upper is None:
        return None, None
    created = None
    if options.upper is None:
        import secrets
        while True:
            mid = secrets.token_hex(6)
            base = uppers_dir(store) / mid
            if not base.exists():
                break
        (base / "upper").mkdir(parents=True)
        created = base
        info = {"id": mid, "image": image, "manifest_digest": manifest_digest, "created": _now()}
        (base / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        upper = str(base / "upper")
    else:
        upper = options.upper
        if os.path.exists(upper) and not os.path.isdir(upper):
            raise MountError(f"upper directory {upper} is not a directory")
        if options.read_only and not os.path.isdir(upper):
            raise MountError(f"upper directory {upper} does not exist", hint="a read-only mount only shows an upper")
        if not options.read_only:
            from layerfs.fs import work_dir_for
            try:
                os.makedirs(upper, exist_ok=True)
                os.makedirs(work_dir_for(upper), mode=0o700, exist_ok=True)
            except OSError as e:
                raise MountError(f"cannot create upper directory {upper}: {e.strerror}") from None
    for rec in active:
        if rec.upper and os.path.abspath(rec.upper) == upper and not options.read_only:
            raise MountError(f"upper directory {upper} is in use by the mount at {rec.mountpoint}",
                             hint="unmount it first, or use another --upper")
    return upper, created


def remove_upper(store: Store, what: str) -> Path:
    """Delete a stored upper directory by its id (or its path); refused while a mount uses it."""
    base = uppers_dir(store)
    mid = what if (what and "/" not in what and (base / what).is_dir()) else stored_upper_id(store, what)
    if not mid or not (base / mid).is_dir():
        raise MountError(f"no stored upper directory {what}",
                         hint="'layerfs mounts' shows the upper of each mount; ids are the directory names in "
                              f"{base}")
    path = base / mid
    for rec in mounts(store):
        if rec.upper and stored_upper_id(store, rec.upper) == mid:
            raise MountError(f"upper {mid} is in use by the mount at {rec.mountpoint}",
                             hint=f"unmount it first ('layerfs umount --rm {rec.mountpoint}')")
    shutil.rmtree(path)
    return path


#: fds of this process's mounts in flight (locks, the caller's ends of daemon pipes): every process forked for
#: a mount closes them, so that none outlives its use in another mount's daemon (a helper would wait forever on
#: a pipe a sibling holds open)
_CALLER_FDS: set[int] = set()


def _close(fd: int | None) -> None:
    if fd is not None:
        _CALLER_FDS.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_caller_fds() -> None:
    """In a forked child: close the fds of the caller's mounts in flight."""
    for fd in list(_CALLER_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _CALLER_FDS.clear()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Reporter:
    """Reports readiness (``ok``) or the one-line error once on a pipe, then closes it (and the lock)."""

    def __init__(self, fd: int | None, lock: int | None = None):
        self.fd = fd
        self.lock = lock      # the mount point's lock: released together with the report

    def _final(self, line: str) -> None:
        lock, self.lock = self.lock, None
        _close(lock)
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _send(fd, line)
            _close(fd)

    def ok(self) -> None:
        self._final("ok")

    def error(self, message: str) -> None:
        self._final(f"error {message}")


def _send(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (" ".join(line.split("\n")) + "\n").encode("utf-8", "replace"))


def _serve_here(tree: "MergedTree | None", record: MountRecord, options: MountOptions, registry: MountRegistry,
                reporter: _Reporter, *, serve_fn: Callable[..., None] | None = None) -> MountRecord:
    """Mount and serve in this process until unmounted; write *record* once ready, remove it at the end."""
    from dataclasses import replace

    from layerfs.fuse import readonly as fusefs
    record = replace(record, pid=os.getpid())
    fuse_opts = fusefs.mount_options(record.image, options.libfuse_options, read_only=options.read_only)
    overlay = None

    def ready() -> None:
        nonlocal record
        record = replace(record, started=_now())
        registry.write(record)
        log.info("mounted %s at %s (pid %d)", record.image, record.mountpoint, record.pid)
        reporter.ok()

    try:
        if serve_fn is not None:
            serve_fn(record.mountpoint, fusefs.mount_options(record.image, options.libfuse_options, read_only=False),
                     on_ready=ready)
        elif record.upper is None:
            fusefs.serve(tree, record.mountpoint, fuse_opts, on_ready=ready)
        else:
            from layerfs.fs import Overlay, UpperDirty, UpperInUse
            from layerfs.fuse import serve_overlay
            try:
                overlay = Overlay(tree, record.upper, read_only=options.read_only, volatile=options.volatile,
                                  index=options.index)
            except UpperInUse as e:
                raise MountError(str(e.strerror), hint="unmount the other mount first, or use another --upper") from None
            except UpperDirty as e:
                raise MountError(str(e.strerror), hint=f"its changes may be incomplete; delete {e.filename} "
                                                       "to use it anyway, or start from a fresh upper") from None
            except OSError as e:
                raise MountError(f"cannot use upper directory {record.upper}: {e.strerror}") from None
            serve_overlay(overlay, record.mountpoint, fuse_opts, on_ready=ready)
    except LayerfsError as e:
        reporter.error(e.one_line())
        raise
    except BaseException as e:
        reporter.error(f"mount failed: {type(e).__name__}: {e}")
        raise
    finally:
        reporter.error(f"the mount at {record.mountpoint} ended before it answered")   # no-op once reported
        registry.remove(record.mountpoint, pid=record.pid)
        if overlay is not None:
            overlay.close()
    log.info("unmounted %s", record.mountpoint)
    return record


def _fork_daemon(main: Callable[[], int], w: int) -> int:
    """Fork twice, libfuse's ``fuse_daemonize``: *main* runs in a grandchild in a new session (re-parented, never
    a zombie of a long-lived caller) and its result is that process's exit code. Returns the pid of the
    intermediate child, which exits at once (reap it). Failures in the children are reported on *w*."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # intermediate child: new session, fork the daemon, leave
        code = 1
        try:
            _close_caller_fds()
            os.setsid()
            if os.fork() == 0:
                _send(w, f"pid {os.getpid()}")   # to stop it if it does not answer in time
                code = main()
            else:
                code = 0
        except BaseException as e:  # never return into the caller's code
            _send(w, f"error cannot start the mount daemon: {e}")
        finally:
            os._exit(code)
    return pid


def _daemonize(tree: "MergedTree | None", record: MountRecord, options: MountOptions,
               registry: MountRegistry, lock: int, *, serve_fn: Callable[..., None] | None = None) -> MountRecord:
    """Fork the daemon serving *tree* (shared copy-on-write) and wait until it answers."""
    import threading
    if threading.active_count() > 1:
        log.debug("forking the mount daemon with %d threads running", threading.active_count())
    r, w = os.pipe()
    _CALLER_FDS.add(r)   # the lock is there already: the daemon keeps neither
    try:
        try:
            pid = _fork_daemon(lambda: _daemon_main(lambda: tree, record, options, registry, w, serve_fn=serve_fn), w)
        finally:
            os.close(w)
        os.waitpid(pid, 0)
        return _wait_ready(r, record, options, registry)
    finally:
        _close(r)


class _Helper:
    """The mount daemon to be, forked by :func:`mount_image` before the image is even resolved.

    It detaches (new session, stdio to /dev/null) and imports what serving
    needs (the FUSE adapter and the union code) while the
    caller resolves the image, checks the mount point and prepares the
    upper; then it waits on a pipe. :meth:`run` sends it the mount (the
    manifest digest and the record) and waits for its readiness like
    :func:`_daemonize`; the helper loads the tree from the store's tree
    cache and serves. Without a mount (:meth:`close`, any error of the
    caller, the caller's death) the pipe closes and the helper exits
    quietly: it never outlives a failed ``mount``.
    """

    def __init__(self, root: Path, options: MountOptions):
        self._ctl: int | None = None
        self._status: int | None = None
        self._pid: int | None = None
        ctl_r, self._ctl = os.pipe()
        _CALLER_FDS.add(self._ctl)
        try:
            self._status, status_w = os.pipe()
            _CALLER_FDS.add(self._status)
            try:
                self._pid = _fork_daemon(functools.partial(_helper_main, root, options, ctl_r, status_w), status_w)
            finally:
                os.close(status_w)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ctl_r)

    def run(self, manifest: Manifest, record: MountRecord, options: MountOptions, registry: MountRegistry,
            lock: int) -> MountRecord:
        """Hand the mount of *record* (the tree of *manifest*) to the helper; return once it answers."""
        ctl, self._ctl = self._ctl, None
        try:
            _write_all(ctl, f"{manifest.digest}\n".encode() + record.to_json())
        except OSError:   # it is gone: its status pipe says why
            pass
        finally:
            _close(ctl)   # end of the message
        return _wait_ready(self._status, record, options, registry)

    def close(self) -> None:
        """Dismiss the helper (a no-op once it has its mount) and reap the intermediate child."""
        for name in ("_ctl", "_status"):
            fd = getattr(self, name)
            setattr(self, name, None)
            _close(fd)
        pid, self._pid = self._pid, None
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _helper_main(root: Path, options: MountOptions, ctl: int, w: int) -> int:
    """The pre-forked daemon (see :class:`_Helper`): import, wait for the mount, serve it. Returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _redirect_stdio(os.devnull)   # the caller's stdio may be pipes that its own caller reads to the end
    # Failures are left for later: the same import fails again while mounting, and is reported then.
    with contextlib.suppress(Exception):
        import tempfile  # noqa: F401  (fusefs captures libfuse's stderr in a temporary file)
    with contextlib.suppress(Exception):
        from layerfs.fuse import readonly as fusefs  # noqa: F401
    if not options.read_only or options.upper is not None:
        with contextlib.suppress(Exception):
            from layerfs.fuse import writable as fuse_overlay  # noqa: F401
    chunks = []
    while chunk := os.read(ctl, 65536):
        chunks.append(chunk)
    os.close(ctl)
    if not chunks:
        return 0   # no mount for us: the caller failed, or is gone
    digest, _, raw = b"".join(chunks).partition(b"\n")
    record = MountRecord.from_json(raw)
    store = Store(root)

    def load_tree() -> "MergedTree":
        from layerfs.image import Digest
        manifest = store.manifest(Digest.parse(digest.decode()))
        assert isinstance(manifest, Manifest)
        return _default_tree_factory(store, manifest, upto=options.layer)

    return _daemon_main(load_tree, record, options, MountRegistry(store), w)


def _redirect_stdio(out: str) -> None:
    """stdin from /dev/null, stdout and stderr to *out* (truncated)."""
    outfd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    nullfd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nullfd, 0)
    os.dup2(outfd, 1)
    os.dup2(outfd, 2)
    os.close(outfd)
    os.close(nullfd)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


def _daemon_main(load_tree: Callable[[], "MergedTree | None"], record: MountRecord, options: MountOptions,
                 registry: MountRegistry, w: int, *, serve_fn: Callable[..., None] | None = None) -> int:
    """The daemon: stdio to the log, get the tree, serve, report readiness or the error on *w*.
    Returns the exit code."""
    reporter = _Reporter(w)
    try:
        os.chdir("/")
        _redirect_stdio(record.log or os.devnull)
        # default handling until the server takes them over; SIGPIPE stays ignored (Python's default), so a
        # caller that went away before "ok" costs an EPIPE, not the daemon
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _daemon_logging(options.debug)
        libc.limit_malloc_arenas(2)     # reader threads' freed reply buffers would stay in one arena each
        _serve_here(load_tree(), record, options, registry, reporter, serve_fn=serve_fn)
        return 0
    except LayerfsError as e:
        log.error("%s", e.one_line())
        reporter.error(e.one_line())   # a no-op if already reported
        return 1
    except BaseException as e:
        log.exception("mount daemon failed")
        reporter.error(f"mount daemon failed: {type(e).__name__}: {e}")
        return 1


def _daemon_logging(debug: bool) -> None:
    """The daemon logs (with times) to its log file, which is now its stderr; inherited handlers go."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s layerfs[%(process)d]: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("layerfs").setLevel(logging.DEBUG if debug else logging.INFO)


def _wait_ready(r: int, record: MountRecord, options: MountOptions, registry: MountRegistry) -> MountRecord:
    deadline = time.monotonic() + options.ready_timeout
    buf = b""
    daemon_pid = None
    while True:
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            kind, _, rest = line.partition(" ")
            if kind == "pid" and rest.isdigit():
                daemon_pid = int(rest)
            elif kind == "ok":
                rec = registry.get(record.mountpoint)
                return rec if rec is not None else record
            elif kind == "error":
                raise MountError(rest)
        left = deadline - time.monotonic()
        if left <= 0:
            if daemon_pid:
                with contextlib.suppress(OSError):
                    os.kill(daemon_pid, signal.SIGTERM)
            raise MountError(f"the mount at {record.mountpoint} did not answer within {options.ready_timeout:g}s",
                             hint=f"see the daemon's log {record.log}")
        import select
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        chunk = os.read(r, 4096)
        if not chunk:
            raise MountError(f"the mount daemon for {record.mountpoint} exited before the mount was ready",
                             hint=f"see its log {record.log}")
        buf += chunk


# --- listing and unmounting ------------------------------------------------------------

def mounts(store: Store) -> list[MountRecord]:
    """Running layerfs mounts of *store* (stale records are cleaned on the way)."""
    return MountRegistry(store).active()


def mount_states(store: Store) -> list[tuple[MountRecord, str]]:
    """Every mount of *store* with its state: :data:`RUNNING`, or :data:`DEAD` (the daemon is
    gone, the mount point still mounted; :func:`umount` cleans it up). Stale records are cleaned."""
    return MountRegistry(store).states()


def _unmount_cmd(mountpoint: str) -> list[str]:
    import shutil
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount:
        return [fusermount, "-u", "--", mountpoint]
    if os.geteuid() == 0 and shutil.which("umount"):
        return ["umount", "--", mountpoint]
    raise MountError("cannot unmount: neither fusermount3 nor umount is installed",
                     hint="install fuse3 (Debian: apt-get install fuse3)")


def umount(store: Store, mountpoint: str | os.PathLike[str], *, timeout: float = EXIT_TIMEOUT,
           remove_upper: bool = False) -> MountRecord | None:
    """Unmount the layerfs mount at *mountpoint*, wait for its daemon to exit, drop its record.

    Returns the mount's record (None when the mount had none, e.g. another
    store's). Raises :class:`MountError` if *mountpoint* is not a layerfs
    mount or the unmount fails (busy). *remove_upper* deletes the mount's
    upper directory afterwards when the store manages it (never one given
    with ``--upper``).
    """
    shown = os.fspath(mountpoint)
    real = _abs_mountpoint(shown)
    registry = MountRegistry(store)
    table = mount_table()
    rec = registry.get(real)
    fstype = table.get(real, ("",))[0]
    if fstype != FSTYPE:
        registry.active(table)
        what = f"it is a {fstype} mount" if fstype else "nothing is mounted there"
        raise MountError(f"{shown} is not a layerfs mount ({what})", hint="'layerfs mounts' lists the active mounts")
    import subprocess
    proc = subprocess.run(_unmount_cmd(real), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        hint = None
        if "busy" in msg.lower():
            hint = "close the files and shells using it (see 'fuser -vm MOUNTPOINT'), then try again"
        raise MountError(f"cannot unmount {shown}: {msg}", hint=hint)
    if rec is not None:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while pid_alive(rec.pid):
            if time.monotonic() > deadline:
                registry.remove(real, pid=rec.pid)
                raise MountError(f"unmounted {shown}, but its daemon (pid {rec.pid}) did not exit within {timeout:g}s",
                                 hint=f"see its log {rec.log}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        registry.remove(real, pid=rec.pid)
        mid = stored_upper_id(store, rec.upper)
        if remove_upper and mid is not None:
            shutil.rmtree(uppers_dir(store) / mid, ignore_errors=True)
    return rec
