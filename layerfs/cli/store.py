"""``store serve``: the layers of the store, served to container engines (an additional layer store)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING

from layerfs.cli.mounts import fuse_options, log_in_foreground
from layerfs.errors import UsageError
from layerfs.mount import STORE_IMAGE_NAME, MountOptions, mount_service, serve_store

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    ssub = s.add_subparsers(dest="store_command", metavar="COMMAND")
    v = ssub.add_parser("serve", help="mount an additional layer store for podman/CRI-O at MOUNTPOINT "
                                      "(storage.conf: additionallayerstores = [\"MOUNTPOINT:ref\"])")
    v.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    v.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    v.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other; nonempty allows a non-empty MOUNTPOINT")
    v.add_argument("--grace", type=float, default=600.0, metavar="SECONDS",
                   help="forget a layer no engine uses after this long (default 600)")
    v.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_store_serve)

    def no_command(ctx: Context) -> int:
        s.print_help(sys.stderr)
        return 2
    s.set_defaults(func=no_command)


def cmd_store_serve(ctx: Context) -> int:
    a = ctx.args
    if a.grace < 0:
        raise UsageError(f"--grace {a.grace:g} is negative")
    options = fuse_options(a.options)
    if not any(o.startswith("fsname=") for o in options):
        options.append("fsname=layerfs-store")
    opts = MountOptions(read_only=True, fuse_options=options, foreground=a.foreground, debug=a.debug,
                        ready_fd=a.ready_fd)
    log_in_foreground(a)
    serve_fn = functools.partial(serve_store, ctx.store, registry_options=ctx.registry_options(), grace=a.grace)
    mount_service(serve_fn, a.mountpoint, opts, store=ctx.store, image=STORE_IMAGE_NAME)
    return 0
