"""``search``: Docker Hub's (or another index's) image search."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from layerfs.cli.argtypes import BOOL_WORDS, bool_arg
from layerfs.cli.display import ellipsis, table
from layerfs.errors import UsageError
from layerfs.registry import search

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    s.add_argument("term", metavar="TERM")
    s.add_argument("--limit", type=int, default=25)
    s.add_argument("--no-trunc", action="store_true")
    s.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE")
    s.add_argument("--format", choices=["table", "json"], default=None)
    s.add_argument("--index", default=None, metavar="URL",
                   help="search index URL (default https://index.docker.io; env LAYERFS_SEARCH_INDEX)")
    s.set_defaults(func=cmd_search)


def cmd_search(ctx: Context) -> int:
    a = ctx.args
    if not 1 <= a.limit <= 100:
        raise UsageError(f"--limit {a.limit} is out of range", hint="use a limit between 1 and 100")
    stars_min, official = 0, None
    for f in a.filter or []:
        key, _, val = f.partition("=")
        if key == "stars" and val.isdigit():
            stars_min = int(val)
        elif key == "is-official" and val.strip().lower() in BOOL_WORDS:
            official = bool_arg(val)
        else:
            raise UsageError(f"invalid filter {f!r}", hint="filters: stars=N, is-official=true|false")
    results = search(a.term, limit=a.limit, index_url=a.index, options=ctx.registry_options())
    results = [r for r in results if r.stars >= stars_min and (official is None or r.official == official)]
    if a.format == "json":
        for r in results:
            print(json.dumps({"Name": r.name, "Description": r.description, "StarCount": str(r.stars),
                              "IsOfficial": str(r.official).lower()}, separators=(",", ":")))
        return 0
    rows = [["NAME", "DESCRIPTION", "STARS", "OFFICIAL"]]
    for r in results:
        desc = " ".join(r.description.split("\n"))
        rows.append([r.name, desc if a.no_trunc else ellipsis(desc, 45), str(r.stars), "[OK]" if r.official else ""])
    table(rows, sys.stdout)
    return 0
