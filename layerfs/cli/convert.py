"""``convert``: a converted copy of a local image in the store (eStargz layers, lazily mountable)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from layerfs.changes import parse_new_reference
from layerfs.cli.argtypes import size_arg
from layerfs.errors import UsageError
from layerfs.transfer import convert_image

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    s.add_argument("--estargz", action="store_true", help="convert the layers to eStargz (lazily mountable)")
    s.add_argument("--chunk-size", type=size_arg, default=4 << 20, metavar="SIZE",
                   help="eStargz chunk size of large files (default 4MiB)")
    s.add_argument("src", metavar="SRC")
    s.add_argument("newref", metavar="NEWREF")
    s.set_defaults(func=cmd_convert)


def cmd_convert(ctx: Context) -> int:
    a = ctx.args
    if not a.estargz:
        raise UsageError("convert needs a target format", hint="use --estargz")
    m = convert_image(ctx.store, a.src, parse_new_reference(a.newref), chunk_size=a.chunk_size)
    print(m.digest)
    return 0
