"""Mount lifecycle: mount an image or a tree (daemonised or in the foreground), unmount it.

    mount_image(store, "alpine:3.20", "/mnt/x", MountOptions())  # returns once /mnt/x answers
    mounts(store)                                                 # [MountRecord(...)]
    umount(store, "/mnt/x")                                       # unmount, wait for the daemon

Daemon model (libfuse's ``fuse_daemonize``, done before any thread or event
loop exists): the daemon is forked twice (re-parented, never a zombie of a
long-lived caller, in a new session, stdio to ``ROOT/mounts/<id>.log``) and
the caller waits on a pipe. The daemon imports the FUSE adapter (only the
daemon pays for it), mounts, ``stat``\\ s its own mount root through the kernel,
writes its record (:mod:`layerfs.mount.table`) and only then reports ``ok``
over the pipe; on failure it sends its one-line error instead. The caller
resolves the image (pulling it if absent) and checks the mount point, so those
errors surface directly.

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

What a mount serves is a *server*, ``serve(record, options, on_ready)``: an
image view (a tree, read-only or under a writable overlay) or another file
system (:func:`mount_service`, the engines' layer store). Everything else (the
mount point's lock and checks, the upper, the record, daemonising, readiness)
is the same for both.

SIGTERM, SIGINT or SIGHUP to the daemon unmounts cleanly (lazily: open files
keep working until closed) and removes the record.

Writable mounts (``MountOptions(read_only=False)``, the CLI's default) serve a
:class:`layerfs.fs.Overlay`: the image's layers plus an upper directory
(format in :mod:`layerfs.fs.overlay`; where uppers live: :mod:`layerfs.mount.uppers`).
``read_only=True`` with ``upper=DIR`` shows an upper's changes without allowing
new ones. The record's ``upper`` field names the upper directory (None for a
plain read-only mount).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from layerfs import libc
from layerfs.errors import ImageNotFound, LayerfsError
from layerfs.image import Digest, Manifest, Reference, is_local_source
from layerfs.libc import pid_alive
from layerfs.mount.options import MountOptions
from layerfs.mount.table import (FSTYPE, MountError, MountRecord, MountTable, check_mountpoint, kernel_mounts,
    resolved_path, utc_now)
from layerfs.mount.uppers import discard_stored_upper, prepare_upper
from layerfs.store import Store

if TYPE_CHECKING:
    from layerfs.fs import MergedTree

log = logging.getLogger(__name__)

__all__ = ["EXIT_TIMEOUT", "mount_image", "mount_tree", "mount_service", "resolve_image", "umount"]

#: seconds umount waits for the daemon to exit after the unmount
EXIT_TIMEOUT = 10.0


# --- mounting ----------------------------------------------------------------------------

TreeFactory = Callable[..., "MergedTree"]


def _default_tree_factory(store: Store, manifest: Manifest, *, upto: int | None) -> "MergedTree":
    from layerfs.fs import open_image_tree  # the union code: only where a tree is made (umount does without)
    return open_image_tree(store, manifest, upto=upto)


def _default_pull(store: Store, options: MountOptions) -> Callable[[Reference], Any]:
    def pull(ref: Reference):
        from layerfs.transfer import Puller, PullOptions
        return Puller(store, PullOptions(platform=options.platform)).pull(ref)
    return pull


def resolve_image(store: Store, ref_text: str, options: MountOptions,
                  pull: Callable[[Reference], Any] | None = None) -> tuple[str, Manifest]:
    """(name to show, manifest) of a local image, pulling it first when absent (or of another platform).

    A local source (``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:TAG]``) is imported first, then its tagged name is used."""
    if is_local_source(ref_text):   # importing .sources costs requests & co.: only for a source
        from layerfs.transfer import LoadOptions, load
        ref_text = load(store, ref_text, LoadOptions(platform=options.platform, single=True)).images[0].names[0]
    try:
        rec, manifest = store.resolve(ref_text)
        if options.platform is not None:
            cfg = store.config(manifest).platform
            if cfg is not None and not options.platform.matches(cfg):
                raise ImageNotFound(f"local {ref_text} is for {cfg}, not {options.platform}")
    except ImageNotFound:
        ref = Reference.parse(ref_text)
        log.info("image %s is not local: pulling it", ref.familiar())
        (pull or _default_pull(store, options))(ref)
        rec, manifest = store.resolve(ref)
    ref = rec.reference
    return (ref.familiar() if ref else rec.name), manifest


def mount_image(store: Store, ref_text: str, mountpoint: str | os.PathLike[str], options: MountOptions, *,
                tree_factory: TreeFactory | None = None,
                pull: Callable[[Reference], Any] | None = None) -> MountRecord:
    """Mount image *ref_text* (pulled if absent) at *mountpoint*.

    Returns once the mount answers (daemon mode), or after it was unmounted
    (``options.foreground``). *tree_factory(store, manifest, upto=N)* builds
    the merged tree (default: :func:`layerfs.fs.open_image_tree`); *pull*
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
    # the union code: both processes need it, so it is imported once, before forking
    from layerfs.fs import open_image_tree  # noqa: F401
    helper = _Helper(store.root, options)
    try:
        check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)   # fail before pulling
        image, manifest = resolve_image(store, ref_text, options, pull)
        tree = _cached_tree(store, manifest, options.layer)
        if tree is None:    # the tree cache is there: the daemon loads it
            start = functools.partial(helper.run, manifest)
        else:               # an unwritable store (no cache): fork the daemon now, sharing this tree
            helper.close()
            start = functools.partial(_daemonize, _tree_server(lambda: tree))
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


#: what a mount serves, in the process that serves it: ``serve(record, options, on_ready)`` mounts at
#: ``record.mountpoint``, calls ``on_ready()`` once the mount answers and returns when it was unmounted
Server = Callable[[MountRecord, MountOptions, Callable[[], None]], None]


def _tree_server(load_tree: Callable[[], "MergedTree"]) -> Server:
    """Serve the tree *load_tree()* returns: read-only, or under an overlay of the record's upper."""
    def serve_tree(record: MountRecord, options: MountOptions, on_ready: Callable[[], None]) -> None:
        # the FUSE adapters, here only: the process that serves imports them, a mount's caller never does
        from layerfs.fuse import mount_options, serve
        tree = load_tree()
        libc.trim_heap()    # the free heap of loading (decompression) and of the process it was forked from
        fuse_opts = mount_options(record.image, options.libfuse_options, read_only=options.read_only)
        if record.upper is None:
            serve(tree, record.mountpoint, fuse_opts, on_ready=on_ready)
            return
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
        try:
            serve_overlay(overlay, record.mountpoint, fuse_opts, on_ready=on_ready)
        finally:
            overlay.close()
    return serve_tree


def mount_tree(tree: "MergedTree", mountpoint: str | os.PathLike[str], options: MountOptions, *, store: Store,
               image: str, manifest_digest: str = "") -> MountRecord:
    """Mount an already built *tree* at *mountpoint* (see :func:`mount_image`)."""
    return _mount_server(_tree_server(lambda: tree), mountpoint, options, store=store, image=image,
                         manifest_digest=manifest_digest)


def mount_service(serve_fn: Callable[..., None], mountpoint: str | os.PathLike[str], options: MountOptions, *,
                  store: Store, image: str) -> MountRecord:
    """Mount a file system of another kind than an image view (the layer store, :mod:`layerfs.mount.alstore`):
    ``serve_fn(mountpoint, fuse_options, on_ready=callback)`` mounts it (not ``ro``: its handlers decide what
    a write does) and serves it until unmounted. It is daemonised (unless ``options.foreground``), recorded,
    listed by ``layerfs mounts`` and unmounted by ``layerfs umount`` like an image mount."""
    def serve_service(record: MountRecord, opts: MountOptions, on_ready: Callable[[], None]) -> None:
        from layerfs.fuse import mount_options   # (as in _tree_server)
        serve_fn(record.mountpoint, mount_options(record.image, opts.libfuse_options, read_only=False),
                 on_ready=on_ready)
    return _mount_server(serve_service, mountpoint, options, store=store, image=image, manifest_digest="")


def _mount_server(server: Server, mountpoint: str | os.PathLike[str], options: MountOptions, *, store: Store,
                  image: str, manifest_digest: str) -> MountRecord:
    """Mount what *server* serves: here (``options.foreground``) or in a daemon forked now."""
    if options.foreground:   # the reporter releases the lock once the mount answers (or failed)
        def start(record: MountRecord, opts: MountOptions, table: MountTable, lock: int) -> MountRecord:
            return _serve_here(server, record, opts, table, _Reporter(opts.ready_fd, lock))
    else:
        start = functools.partial(_daemonize, server)
    return _mount(start, mountpoint, options, store=store, image=image, manifest_digest=manifest_digest)


def _mount(start: Callable[[MountRecord, MountOptions, MountTable, int], MountRecord],
           mountpoint: str | os.PathLike[str], options: MountOptions, *, store: Store, image: str,
           manifest_digest: str) -> MountRecord:
    """Check the mount point and prepare the upper under the mount point's lock, then
    ``start(record, options, table, lock)`` (which serves or hands over the mount)."""
    table = MountTable(store)
    active = table.active()  # clean stale records
    table.dir.mkdir(parents=True, exist_ok=True)
    # One mount at a time per mount point: checked and mounted under a lock held until the mount answers.
    lock = table.lock(resolved_path(mountpoint))
    _CALLER_FDS.add(lock)
    created: Path | None = None
    try:
        real = check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)
        upper, created = prepare_upper(store, options, active, image=image, manifest_digest=manifest_digest)
    except BaseException:
        _close(lock)
        raise
    record = MountRecord(image=image, manifest_digest=manifest_digest, mountpoint=real, pid=0, upper=upper,
                         started="", layer=options.layer, log=str(table.log_path(real)))
    try:
        try:
            return start(record, options, table, lock)
        finally:
            if not options.foreground:
                _close(lock)
    except BaseException:
        if created is not None:     # a new upper of the store that never served: not worth keeping
            shutil.rmtree(created, ignore_errors=True)
        raise


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


def _serve_here(server: Server, record: MountRecord, options: MountOptions, table: MountTable,
                reporter: _Reporter) -> MountRecord:
    """Mount and serve in this process until unmounted; write *record* once ready, remove it at the end."""
    record = replace(record, pid=os.getpid())

    def ready() -> None:
        nonlocal record
        record = replace(record, started=utc_now())
        table.write(record)
        log.info("mounted %s at %s (pid %d)", record.image, record.mountpoint, record.pid)
        reporter.ok()

    try:
        server(record, options, ready)
    except LayerfsError as e:
        reporter.error(e.one_line())
        raise
    except BaseException as e:
        reporter.error(f"mount failed: {type(e).__name__}: {e}")
        raise
    finally:
        reporter.error(f"the mount at {record.mountpoint} ended before it answered")   # no-op once reported
        table.remove(record.mountpoint, pid=record.pid)
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


def _daemonize(server: Server, record: MountRecord, options: MountOptions, table: MountTable,
               lock: int) -> MountRecord:
    """Fork the daemon running *server* (what it serves is shared copy-on-write) and wait until it answers."""
    if threading.active_count() > 1:
        log.debug("forking the mount daemon with %d threads running", threading.active_count())
    r, w = os.pipe()
    _CALLER_FDS.add(r)   # the lock is there already: the daemon keeps neither
    try:
        try:
            pid = _fork_daemon(lambda: _daemon_main(server, record, options, table, w), w)
        finally:
            os.close(w)
        os.waitpid(pid, 0)
        return _wait_ready(r, record, options, table)
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

    def run(self, manifest: Manifest, record: MountRecord, options: MountOptions, table: MountTable,
            lock: int) -> MountRecord:
        """Hand the mount of *record* (the tree of *manifest*) to the helper; return once it answers."""
        ctl, self._ctl = self._ctl, None
        try:
            _write_all(ctl, f"{manifest.digest}\n".encode() + record.to_json())
        except OSError:   # it is gone: its status pipe says why
            pass
        finally:
            _close(ctl)   # end of the message
        return _wait_ready(self._status, record, options, table)

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
        from layerfs.fuse import serve  # noqa: F401  (the read-only adapter and the FUSE binding)
    if not options.read_only or options.upper is not None:
        with contextlib.suppress(Exception):
            from layerfs.fuse import serve_overlay  # noqa: F401  (the writable adapter)
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
        manifest = store.manifest(Digest.parse(digest.decode()))
        assert isinstance(manifest, Manifest)
        return _default_tree_factory(store, manifest, upto=options.layer)

    return _daemon_main(_tree_server(load_tree), record, options, MountTable(store), w)


def _redirect_stdio(out: str) -> None:
    """stdin from /dev/null, stdout and stderr to *out* (truncated). /dev/null is never created: where it is
    missing, a file made in its place would take every later process's output."""
    create = 0 if out == os.devnull else os.O_CREAT
    outfd = os.open(out, os.O_WRONLY | create | os.O_TRUNC, 0o644)
    nullfd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nullfd, 0)
    os.dup2(outfd, 1)
    os.dup2(outfd, 2)
    os.close(outfd)
    os.close(nullfd)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


def _daemon_main(server: Server, record: MountRecord, options: MountOptions, table: MountTable, w: int) -> int:
    """The daemon: stdio to the log, serve, report readiness or the error on *w*. Returns the exit code."""
    reporter = _Reporter(w)
    try:
        os.chdir("/")
        _redirect_stdio(record.log or os.devnull)
        # default handling until the server takes them over; SIGPIPE stays ignored (Python's default), so a
        # caller that went away before "ok" costs an EPIPE, not the daemon
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _daemon_logging(options.debug)
        # one malloc arena: a read reply (up to 1 MiB) freed by one thread is reused by the next, whichever
        # thread it is (with an arena per thread each kept its own; the allocations of the threads are few
        # and large, Python's small objects are made under the GIL)
        libc.limit_malloc_arenas(1)
        _serve_here(server, record, options, table, reporter)
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


def _wait_ready(r: int, record: MountRecord, options: MountOptions, table: MountTable) -> MountRecord:
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
                rec = table.get(record.mountpoint)
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
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        chunk = os.read(r, 4096)
        if not chunk:
            raise MountError(f"the mount daemon for {record.mountpoint} exited before the mount was ready",
                             hint=f"see its log {record.log}")
        buf += chunk


# --- unmounting ------------------------------------------------------------------------

def _unmount_cmd(mountpoint: str) -> list[str]:
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
    real = resolved_path(shown)
    table = MountTable(store)
    kernel = kernel_mounts()
    rec = table.get(real)
    fstype = kernel.get(real, ("",))[0]
    if fstype != FSTYPE:
        table.active(kernel)
        what = f"it is a {fstype} mount" if fstype else "nothing is mounted there"
        raise MountError(f"{shown} is not a layerfs mount ({what})", hint="'layerfs mounts' lists the active mounts")
    import subprocess  # here only: ~5 ms that a mount's start-up does without
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
                table.remove(real, pid=rec.pid)
                raise MountError(f"unmounted {shown}, but its daemon (pid {rec.pid}) did not exit within {timeout:g}s",
                                 hint=f"see its log {rec.log}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        table.remove(real, pid=rec.pid)
        if remove_upper:
            discard_stored_upper(store, rec.upper)
    return rec
