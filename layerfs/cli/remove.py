"""Images out of the store: ``rmi`` (untag, then delete what no image uses) and ``prune``."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from layerfs.cli.display import human_size
from layerfs.errors import ImageInUse, ImageNotFound, LayerfsError
from layerfs.image import Manifest, Reference
from layerfs.lazy import prune_lazy, served_blobs

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "rmi":
        s.add_argument("refs", nargs="+", metavar="REF")
        s.add_argument("-f", "--force", action="store_true")
        s.add_argument("--no-prune", action="store_true", help="only untag")
        s.set_defaults(func=cmd_rmi)
    elif command == "prune":
        s.set_defaults(func=cmd_prune)


def cmd_rmi(ctx: Context) -> int:
    a = ctx.args
    store = ctx.store
    store.init()
    status = 0
    for text in a.refs:
        try:
            _rmi_one(store, text, a.force, a.no_prune)
        except LayerfsError as e:
            print(f"Error response from layerfs: {e.one_line()}", file=sys.stderr)
            status = 1
    return status


def _rmi_one(store, text: str, force: bool, no_prune: bool) -> None:
    try:
        ref = Reference.parse(text)
    except LayerfsError:
        ref = None
    rec = store.find(ref) if ref else None
    targets = [rec] if rec else []
    if not targets:
        matches = store.find_by_id(text)
        if not matches:
            raise ImageNotFound(f"no such image: {text}")
        digests = {r.descriptor.digest for r in matches}
        if len(digests) > 1:
            raise ImageNotFound(f"image id {text!r} is ambiguous", hint="give more digits")
        targets = matches
        if len(targets) > 1 and not force:
            raise ImageInUse(f"unable to delete {text} (must be forced) - image is referenced in multiple repositories",
                             hint="remove the tags one by one, or use --force")
    deleted_manifest = targets[0].descriptor.digest
    for t in targets:
        store.untag(t.name)
        r = t.reference
        print(f"Untagged: {r.familiar() if r else t.name}")
    if any(r.descriptor.digest == deleted_manifest for r in store.images()):
        return
    try:
        m = store.manifest(deleted_manifest)
    except LayerfsError:
        m = None
    if not no_prune and isinstance(m, Manifest):
        store.gc(candidates={deleted_manifest, m.config.digest, *(l.digest for l in m.layers)},
                 keep=served_blobs(store))
        print(f"Deleted: {m.config.digest}")


def cmd_prune(ctx: Context) -> int:
    store = ctx.store
    store.init()
    removed, freed = store.gc(keep=served_blobs(store))
    lazy_removed, lazy_freed = prune_lazy(store)
    print(f"Deleted blobs: {removed}")
    if lazy_removed:
        print(f"Deleted lazy caches: {lazy_removed}")
    print(f"Total reclaimed space: {human_size(freed + lazy_freed)}")
    return 0
