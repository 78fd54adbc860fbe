"""The changes of a mount (or of an upper directory over an image): ``diff``, ``commit`` and ``export``."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from layerfs.changes import CommitOptions, commit, diff, export_tree, output_file, parse_new_reference
from layerfs.errors import UsageError
from layerfs.mount import export_source, resolve_target

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "diff":
        s.add_argument("target", metavar="MOUNTPOINT|UPPER", help="a layerfs mount, or an upper directory with --image")
        s.add_argument("--image", metavar="REF", help="the image an upper directory (not a mount) sits on")
        s.set_defaults(func=cmd_diff)
    elif command == "commit":
        s.add_argument("target", metavar="MOUNTPOINT|UPPER", help="a layerfs mount, or an upper directory with --image")
        s.add_argument("newref", metavar="NEWREF", help="name of the new image, NAME[:TAG]")
        s.add_argument("-m", "--message", help="commit message (the history comment)")
        s.add_argument("-a", "--author", help="author, e.g. 'Jane Doe <jane@example.com>'")
        s.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                       help="apply a Dockerfile instruction to the config: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, "
                            "ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR (repeatable)")
        s.add_argument("--image", metavar="REF", help="the image an upper directory (not a mount) sits on")
        s.set_defaults(func=cmd_commit)
    elif command == "export":
        s.add_argument("target", metavar="REF|MOUNTPOINT")
        s.add_argument("-o", "--output", metavar="FILE", help="write to FILE ('-' or absent: standard output)")
        s.add_argument("--upper", metavar="DIR", help="an upper directory to apply over the image REF")
        s.set_defaults(func=cmd_export)


def cmd_diff(ctx: Context) -> int:
    a = ctx.args
    target = resolve_target(ctx.store, a.target, image=a.image)
    for change in diff(target.lower_tree(ctx.store), target.scan()):
        print(change)
    return 0


def cmd_commit(ctx: Context) -> int:
    a = ctx.args
    ref = parse_new_reference(a.newref)       # a bad NEWREF fails before anything is read
    target = resolve_target(ctx.store, a.target, image=a.image)
    result = commit(ctx.store, target, ref, CommitOptions(message=a.message or "", author=a.author or "",
                                                         changes=tuple(a.change or ())))
    print(result.image_id)
    return 0


def cmd_export(ctx: Context) -> int:
    a = ctx.args
    out = a.output or "-"
    if out == "-" and sys.stdout.isatty():
        raise UsageError("cowardly refusing to write a tar to a terminal", hint="use -o FILE or redirect stdout")
    tree = export_source(ctx.store, a.target, upper=a.upper)
    if out == "-":
        sys.stdout.flush()
        export_tree(tree, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        with output_file(out) as f:
            export_tree(tree, f)
    return 0
