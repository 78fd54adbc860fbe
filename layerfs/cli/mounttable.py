"""The mount table and what mounts leave behind: ``mounts`` (each mount, its state, its upper directory and,
for lazy mounts, how much is fetched) and ``rm`` (the upper directories the store keeps)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from layerfs.cli.display import table
from layerfs.lazy import forget_stale_status, lazy_status
from layerfs.mount import mount_states, remove_upper

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "rm":
        s.add_argument("ids", nargs="+", metavar="ID|UPPER", help="the id (ROOT/uppers/ID) or the upper's path")
        s.set_defaults(func=cmd_rm)
    elif command == "mounts":
        s.add_argument("-q", "--quiet", action="store_true", help="only mount points")
        s.add_argument("--format", choices=["table", "json"], default=None)
        s.set_defaults(func=cmd_mounts)


def cmd_rm(ctx: Context) -> int:
    for what in ctx.args.ids:
        remove_upper(ctx.store, what)
        print(what)
    return 0


def cmd_mounts(ctx: Context) -> int:
    a = ctx.args
    listed = mount_states(ctx.store)
    records = [r for r, _ in listed]
    state = {r.mountpoint: s for r, s in listed}
    if a.quiet:
        for r in records:
            print(r.mountpoint)
        return 0
    forget_stale_status(ctx.store)
    fetched = {r.mountpoint: lazy_status(ctx.store, r) for r in records}
    if a.format == "json":
        for r in records:
            doc = dict(asdict(r), state=state[r.mountpoint])
            if fetched[r.mountpoint] is not None:
                doc["fetched"] = [round(f, 4) for f in fetched[r.mountpoint]]
            print(json.dumps(doc, separators=(",", ":")))
        return 0
    lazy = any(v is not None for v in fetched.values())
    rows = [["IMAGE", "MOUNTPOINT", "PID", "STATE", "UPPER"] + (["FETCHED (PER LAYER)"] if lazy else [])]
    for r in records:
        image = r.image if r.layer is None else f"{r.image} (layer {r.layer})"
        row = [image, r.mountpoint, str(r.pid), state[r.mountpoint], r.upper or "<none>"]
        if lazy:
            f = fetched[r.mountpoint]
            row.append(" ".join(f"{int(x * 100)}%" for x in f) if f is not None else "-")
        rows.append(row)
    table(rows, sys.stdout)
    return 0
