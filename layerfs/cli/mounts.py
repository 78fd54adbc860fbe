"""Mounting: ``mount`` and ``umount`` (``unmount``).

A mount of a local image imports neither the registry client (requests & co.) nor the lazy mounts
nor the FUSE adapter (the daemon does): the pull and the lazy mount are imported on the paths that take them.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Sequence

from layerfs.cli.display import PullProgress
from layerfs.errors import ImageNotFound, UsageError
from layerfs.image import Platform, is_local_source
from layerfs.mount import MountOptions, mount_image, stored_upper_id, umount

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "mount":
        s.add_argument("ref", metavar="REF")
        s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
        s.add_argument("--read-only", action="store_true",
                       help="read-only mount (default: writable, changes go to an upper directory)")
        s.add_argument("--upper", metavar="DIR",
                       help="upper directory for the changes (made if missing; remount with it to see them again); "
                            "default: a new one in the store, kept until 'layerfs umount --rm' or 'layerfs rm ID'")
        s.add_argument("--layer", type=int, metavar="N", help="show the image as it was after its first N layers")
        s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pull when the image is not local")
        s.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]",
                       help="FUSE mount options, e.g. allow_other, suid, dev; nonempty allows a non-empty "
                            "MOUNTPOINT; volatile (writable mounts) syncs nothing while mounted, as kernel "
                            "overlayfs's option; index=on keeps the names of a copied-up lower hard-linked file "
                            "one inode (default index=off: they split, as Docker's overlay2)")
        s.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
        s.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
        s.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                       help="mount from the registry without pulling: eStargz layers, and gzip layers whose index "
                            "was published ('layerfs index push'), are fetched as files are read (others are "
                            "pulled whole); env LAYERFS_LAZY=1 does so for images that are not local, --no-lazy "
                            "pulls them")
        s.add_argument("--prefetch", choices=["none", "landmark", "all"], default=None,
                       help="with --lazy: fetch in the background, at low priority, nothing (default), the files "
                            "before an eStargz layer's .prefetch.landmark, or everything")
        s.set_defaults(func=cmd_mount)
    elif command == "umount":
        s.add_argument("mountpoint", metavar="MOUNTPOINT")
        s.add_argument("--rm", action="store_true", help="also delete the mount's upper directory (if the store's)")
        s.set_defaults(func=cmd_umount)


def fuse_options(values: Sequence[str] | None) -> list[str]:
    """The FUSE options of ``-o`` arguments, each of which may list several (``-o a,b -o c``)."""
    return [o.strip() for opt in values or () for o in opt.split(",")]


def log_in_foreground(args: argparse.Namespace) -> None:
    """A mount served in the foreground logs what it does (INFO), unless --debug shows everything."""
    if args.foreground and not args.debug:
        logging.getLogger("layerfs").setLevel(logging.INFO)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _lazy_env() -> bool:
    """LAYERFS_LAZY=1: mount images that are not local lazily (as --lazy) instead of pulling them."""
    raw = os.environ.get("LAYERFS_LAZY", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UsageError(f"LAYERFS_LAZY={raw[:40]!r} is neither 1 nor 0", hint="set LAYERFS_LAZY=1 or unset it")


def _is_local(store, ref_text: str, opts: MountOptions) -> bool:
    """Whether a plain mount of *ref_text* would use a local image (of the wanted platform) or a local
    source (oci:, oci-archive:, docker-archive:) without pulling."""
    if is_local_source(ref_text) or opts.layer is not None:
        return True       # a local source, or --layer (never lazy): the plain mount's business
    try:
        _, manifest = store.resolve(ref_text)
    except ImageNotFound:
        return False
    if opts.platform is not None:
        cfg = store.config(manifest).platform
        return cfg is None or opts.platform.matches(cfg)
    return True


def cmd_mount(ctx: Context) -> int:
    a = ctx.args
    opts = MountOptions(read_only=a.read_only, upper=a.upper, layer=a.layer,
                        platform=Platform.parse(a.platform) if a.platform else None,
                        fuse_options=fuse_options(a.options), foreground=a.foreground, debug=a.debug,
                        ready_fd=a.ready_fd)
    log_in_foreground(a)

    def pull(ref):  # only when the image is not local: docker run's screen, on stderr
        # imported here: the puller loads the registry client, which a mount of a local image never needs
        from layerfs.transfer import Puller, PullOptions
        print(f"Unable to find image '{ref.familiar()}' locally", file=sys.stderr)
        progress = PullProgress(sys.stderr)
        result = Puller(ctx.store, PullOptions(platform=opts.platform, registry=ctx.registry_options()),
                        progress).pull(ref)
        progress.message(f"Digest: {result.repo_digest}")
        progress.message(f"Status: Downloaded newer image for {ref.familiar()}")
        return result

    lazy = a.lazy
    if lazy is None and _lazy_env():
        lazy = not _is_local(ctx.store, a.ref, opts)
        if not lazy and a.prefetch is not None:
            raise UsageError(f"--prefetch: {a.ref} is a local image, there is nothing to fetch",
                             hint="use --lazy to mount it from its registry all the same")
    if a.prefetch is not None and not lazy:
        raise UsageError("--prefetch needs --lazy")
    if lazy:
        # imported here: lazy mounts load the registry client, which a mount of a local image never needs
        from layerfs.mount import mount_lazy
        mount_lazy(ctx.store, a.ref, a.mountpoint, opts, registry_options=ctx.registry_options(),
                   prefetch=a.prefetch or "none")
        return 0
    mount_image(ctx.store, a.ref, a.mountpoint, opts, pull=pull)
    if ctx.program and not a.foreground:
        _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """End the program at once, without the interpreter's teardown (freeing every module and object: 20-35 ms
    of a mount's start-up, with the new daemon busy on the other CPU; more after building a tree). What
    matters of the teardown is done first: the atexit handlers (logging's flush among them) and flushing
    stdout and stderr. Returns (the normal exit follows) while another thread runs, or when a flush fails."""
    if threading.active_count() > 1:
        return
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:
        return
    os._exit(code)


def cmd_umount(ctx: Context) -> int:
    rec = umount(ctx.store, ctx.args.mountpoint, remove_upper=ctx.args.rm)
    if ctx.args.rm and rec is not None and rec.upper and stored_upper_id(ctx.store, rec.upper) is None:
        print(f"layerfs: kept {rec.upper} (given with --upper; only upper directories of the store are removed)",
              file=sys.stderr)
    return 0
