"""The upper directories of writable mounts: where they live, what they were made on.

A writable mount given ``upper=DIR`` uses that directory (made if missing; remounting
the same image with it shows the earlier changes). Without it the upper lives in the
store: ``ROOT/uppers/<id>/upper`` with a new 12-hex ``<id>`` per mount, and beside it
``ROOT/uppers/<id>/info.json``::

    {"id": "<id>", "image": "alpine:3.20", "manifest_digest": "sha256:...",
     "created": "2024-05-01T12:00:00Z", "layer": null}

(``layer``: the mount showed only the first N layers). A stored upper is kept after
its mount ends until ``umount(..., remove_upper=True)`` (``layerfs umount --rm``) or
:func:`remove_upper` (``layerfs rm ID``); ``diff`` and ``commit`` find it by its id or
path (:func:`find_stored_upper`). This module is the one owner of that layout.

The overlay's work dir is the upper's sibling (:func:`layerfs.fs.work_dir_for`); the
daemon holds a lock on it, so one upper serves one mount at a time.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.image import Digest
from layerfs.mount.options import MountOptions
from layerfs.mount.table import MountError, MountRecord, mounts, resolved_path, utc_now
from layerfs.store import Store

__all__ = ["StoredUpper", "uppers_dir", "stored_upper_id", "find_stored_upper", "prepare_upper", "remove_upper",
           "discard_stored_upper"]

_UPPER = "upper"
_INFO = "info.json"


@dataclass(frozen=True)
class StoredUpper:
    """A stored upper directory, as its ``info.json`` describes it."""

    id: str
    path: Path                       # the upper directory itself (``ROOT/uppers/<id>/upper``)
    image: str                       # the image as the user knew it
    manifest_digest: Digest
    layer: int | None                # the mount showed only the first N layers
    created: str                     # RFC 3339, UTC ("" when not recorded)


def uppers_dir(store: Store) -> Path:
    """Where the store keeps the upper directories of writable mounts: ``ROOT/uppers/<id>/upper``."""
    return store.root / "uppers"


def stored_upper_id(store: Store, upper: str | os.PathLike[str] | None) -> str | None:
    """The ``<id>`` of the upper directory at the path *upper* when the store manages it, else None."""
    if not upper:
        return None
    p = Path(resolved_path(upper))
    if p.name == _UPPER and p.parent.parent == Path(resolved_path(uppers_dir(store))):
        return p.parent.name
    return None


def find_stored_upper(store: Store, what: str) -> StoredUpper | None:
    """The stored upper named by *what* (its id, or the path of its upper directory); None when *what*
    names none, or its ``info.json`` cannot be read."""
    base = uppers_dir(store)
    if what and "/" not in what and (base / what / _UPPER).is_dir():
        mid: str | None = what
    else:
        mid = stored_upper_id(store, what)
        if mid is None or not (base / mid / _UPPER).is_dir():
            return None
    try:
        info = json.loads((base / mid / _INFO).read_bytes())
        digest = Digest.parse(info["manifest_digest"])
        image = str(info.get("image") or digest)
        created = str(info.get("created") or "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LayerfsError):
        return None
    layer = info.get("layer")
    return StoredUpper(mid, base / mid / _UPPER, image, digest,
                       layer if isinstance(layer, int) and not isinstance(layer, bool) else None, created)


def _new_stored_upper(store: Store, *, image: str, manifest_digest: str, layer: int | None) -> Path:
    """Make ``ROOT/uppers/<new id>/`` with an empty upper and its ``info.json``; returns that directory."""
    while True:
        mid = secrets.token_hex(6)
        base = uppers_dir(store) / mid
        if not base.exists():
            break
    (base / _UPPER).mkdir(parents=True)
    info = {"id": mid, "image": image, "manifest_digest": manifest_digest, "created": utc_now(), "layer": layer}
    (base / _INFO).write_text(json.dumps(info, indent=2) + "\n")
    return base


def prepare_upper(store: Store, options: MountOptions, active: list[MountRecord], *, image: str,
                  manifest_digest: str) -> tuple[str | None, Path | None]:
    """(upper directory or None, the store directory made for it or None); checked before forking."""
    if options.read_only and options.upper is None:
        return None, None
    created = None
    if options.upper is None:
        created = _new_stored_upper(store, image=image, manifest_digest=manifest_digest, layer=options.layer)
        upper = str(created / _UPPER)
    else:
        upper = options.upper
        if os.path.exists(upper) and not os.path.isdir(upper):
            raise MountError(f"upper directory {upper} is not a directory")
        if options.read_only and not os.path.isdir(upper):
            raise MountError(f"upper directory {upper} does not exist", hint="a read-only mount only shows an upper")
        if not options.read_only:
            # here only: the overlay module is the daemon's, and a mount's caller need not import it
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


def discard_stored_upper(store: Store, upper: str | None) -> None:
    """Delete the upper directory at the path *upper* (and its ``info.json``) if the store manages it."""
    mid = stored_upper_id(store, upper)
    if mid is not None:
        shutil.rmtree(uppers_dir(store) / mid, ignore_errors=True)
