"""What a ``diff``, ``commit`` or ``export`` argument names: a mount, a stored upper, an image.

:func:`resolve_target` turns a MOUNTPOINT|UPPER argument into a
:class:`~layerfs.changes.target.Target` (the image and the upper directory over it),
:func:`export_source` an ``export`` argument into the merged tree to write. They read
the mount table and the store's uppers, so they live here, above :mod:`layerfs.changes`,
which works on the image and the upper it is given.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from layerfs.changes import Target, overlay_tree, scan_upper
from layerfs.errors import ImageNotFound, LayerfsError, StoreError, UsageError
from layerfs.fs import MergedTree, open_image_tree
from layerfs.image import Digest, Manifest
from layerfs.mount.table import MountRecord, mount_states, resolved_path
from layerfs.mount.uppers import find_stored_upper
from layerfs.store import Store

__all__ = ["UnknownTarget", "resolve_target", "export_source"]


class UnknownTarget(LayerfsError):
    """A MOUNTPOINT|UPPER argument that is neither."""

    errno = errno.ENOENT


def _image_name(rec) -> str:
    r = rec.reference
    return r.familiar() if r is not None else rec.name


def _mount_records(store: Store) -> list[MountRecord]:
    """The records of the store's mounts, a dead mount (its daemon gone) too: its upper is intact
    (copy-ups are renamed into place)."""
    return [r for r, _ in mount_states(store)] if (store.root / "mounts").is_dir() else []


def resolve_target(store: Store, text: str, *, image: str | None = None) -> Target:
    """What ``diff``/``commit`` act on: a mount point (or the upper dir of a mount), an upper
    directory the store kept after its mount ended (by path or id), or, with *image*, any
    upper directory over that local image."""
    real = resolved_path(text)
    for rec in _mount_records(store):
        by_mount = rec.mountpoint == real
        by_upper = rec.upper is not None and resolved_path(rec.upper) == real
        if not (by_mount or by_upper):
            continue
        if image is not None:
            raise UsageError(f"{text} is a layerfs mount of {rec.image}; --image applies to an upper directory only")
        try:
            m = store.manifest(Digest.parse(rec.manifest_digest))
        except StoreError:
            raise ImageNotFound(f"the image of mount {rec.mountpoint} ({rec.image}) is gone from the store") from None
        if not isinstance(m, Manifest):
            raise StoreError(f"mount {rec.mountpoint}: {rec.manifest_digest} is not an image manifest")
        return Target(m, rec.layer, rec.image, Path(rec.upper) if rec.upper else None, rec.mountpoint)
    if image is None:
        stored = _stored_target(store, text)
        if stored is not None:
            return stored
        if os.path.isdir(real):
            raise UnknownTarget(f"{text} is not a layerfs mount point",
                                hint="list mounts with 'layerfs mounts'; for an upper directory name its image "
                                     "with --image REF")
        raise UnknownTarget(f"unknown mount point {text}", hint="list mounts with 'layerfs mounts'")
    if not os.path.isdir(real):
        raise UnknownTarget(f"upper directory {text} does not exist or is not a directory")
    rec, m = store.resolve(image)
    return Target(m, None, _image_name(rec), Path(real))


def _stored_target(store: Store, text: str) -> Target | None:
    """An upper directory the store keeps after its mount ended, named by path or by id."""
    stored = find_stored_upper(store, text)
    if stored is None:
        return None
    try:
        m = store.manifest(stored.manifest_digest)
    except StoreError:
        raise ImageNotFound(f"the image of upper directory {stored.path} ({stored.image}) is gone from the store") \
            from None
    if not isinstance(m, Manifest):
        return None
    return Target(m, stored.layer, stored.image, stored.path)


def export_source(store: Store, text: str, *, upper: str | os.PathLike[str] | None = None) -> MergedTree:
    """The merged tree ``export`` writes: a mount point (its image plus its upper directory), or a
    local image (plus *upper*, an upper directory over it, when given)."""
    real = resolved_path(text)
    for rec in _mount_records(store):
        if rec.mountpoint == real:
            if upper is not None:
                raise UsageError(f"{text} is a layerfs mount; --upper applies to an image only")
            t = resolve_target(store, text)
            lower = t.lower_tree(store)
            return overlay_tree(lower, t.scan()) if t.upper is not None else lower
    try:
        rec, m = store.resolve(text)
    except ImageNotFound:
        if os.path.isdir(real):
            raise UnknownTarget(f"{text} is neither a local image nor a layerfs mount point",
                                hint="list them with 'layerfs images' and 'layerfs mounts'") from None
        raise
    lower = open_image_tree(store, m)
    if upper is None:
        return lower
    return overlay_tree(lower, scan_upper(upper))
