"""Images out to registries: ``push``, and ``index push`` (the seek indexes that lazy mounts of gzip layers
read)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from layerfs.cli.argtypes import size_arg
from layerfs.cli.display import PullProgress, human_size, progress_bar
from layerfs.transfer import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_THRESHOLD, Pusher, PushOptions, push_index, push_target

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "push":
        s.add_argument("ref", metavar="REF", help="a local image")
        s.add_argument("newref", nargs="?", metavar="NEWREF", help="push under this name instead (NAME[:TAG])")
        s.add_argument("-q", "--quiet", action="store_true", help="print only the pushed reference")
        s.add_argument("--max-concurrent-uploads", type=int, default=3, metavar="N")
        s.add_argument("--chunk-threshold", type=size_arg, default=None, metavar="SIZE",
                       help="upload blobs larger than this in chunks (default 64M)")
        s.add_argument("--chunk-size", type=size_arg, default=None, metavar="SIZE", help="chunk size (default 16M)")
        s.set_defaults(func=cmd_push)
    elif command == "index":
        isub = s.add_subparsers(dest="index_command", metavar="COMMAND")
        i = isub.add_parser("push", help="publish the layer indexes of a local image to its registry, attached to "
                                         "the image (referrers API, else the sha256-<hex> tag)")
        i.add_argument("ref", metavar="REF", help="a local image, by the name it was pushed or pulled as")
        i.add_argument("--span", type=size_arg, default=1 << 20, metavar="SIZE",
                       help="uncompressed bytes between checkpoints: about what a lazy read fetches (default 1M)")
        i.add_argument("-q", "--quiet", action="store_true", help="print only the digest of the index artifact")
        i.set_defaults(func=cmd_index_push)


class _PushProgress:
    """Docker's push screen: per-layer lines; ``Pushing`` bars only on a terminal."""

    def __init__(self, out):
        self.lines = PullProgress(out)

    def message(self, text: str) -> None:
        self.lines.message(text)

    def __call__(self, layer: str, status: str, current: int | None = None, total: int | None = None) -> None:
        if status == "Pushing":
            if not self.lines.tty or not total:
                return
            status = f"Pushing {progress_bar(current or 0, total)} {human_size(current or 0)}/{human_size(total)}"
        elif status == "Waiting" and not self.lines.tty:
            return
        self.lines(layer, status)


def cmd_push(ctx: Context) -> int:
    a = ctx.args
    _, _, ref = push_target(ctx.store, a.ref, a.newref)    # errors before any output
    opts = PushOptions(registry=ctx.registry_options(),
                       chunk_threshold=DEFAULT_CHUNK_THRESHOLD if a.chunk_threshold is None else a.chunk_threshold,
                       chunk_size=DEFAULT_CHUNK_SIZE if a.chunk_size is None else a.chunk_size,
                       max_concurrent_uploads=a.max_concurrent_uploads)
    progress = None if a.quiet else _PushProgress(sys.stdout)
    if progress:
        progress.message(f"The push refers to repository [{ref.name}]")
    result = Pusher(ctx.store, opts, progress).push(a.ref, a.newref)
    if progress:
        progress.message(f"{ref.tag or ref.identifier}: digest: {result.digest} size: {result.size}")
    else:
        print(str(result.reference))
    return 0


def cmd_index_push(ctx: Context) -> int:
    a = ctx.args
    say = None if a.quiet else (lambda line: print(line, flush=True))
    result = push_index(ctx.store, a.ref, span=a.span, registry_options=ctx.registry_options(), progress=say)
    if a.quiet:
        print(result.digest)
    else:
        print(f"Published the layer index of {a.ref} ({len(result.layers)} layer(s)): {result.digest}, "
              f"attached to {result.subject} through the {result.via}")
    return 0
