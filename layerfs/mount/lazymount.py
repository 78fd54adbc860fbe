"""Lazy mounts: a remote image mounted from its registry (``layerfs mount --lazy REF MNT``).

The image is opened lazily (:func:`layerfs.lazy.open_lazy_tree`: layers served by Range reads
where they allow it) and its tree mounted as a local image's (:func:`layerfs.mount.daemon.mount_tree`);
the mount keeps a status file naming what it serves (:func:`layerfs.lazy.note_lazy_readers`) and,
with *prefetch*, fetches the rest in the background (:class:`layerfs.lazy.Prefetcher`)."""
from __future__ import annotations

import os

from layerfs.errors import UsageError
from layerfs.lazy import PREFETCH_MODES, Prefetcher, drop_lazy_status, note_lazy_readers, open_lazy_tree
from layerfs.mount.daemon import mount_tree
from layerfs.mount.options import MountOptions
from layerfs.mount.table import MountRecord, check_mountpoint
from layerfs.store import Store

__all__ = ["mount_lazy"]


def mount_lazy(store: Store, ref_text: str, mountpoint: str | os.PathLike[str], options: MountOptions, *,
               registry_options=None, prefetch: str = "none") -> MountRecord:
    """Mount *ref_text* from its registry lazily; returns the MountRecord. *prefetch*
    (:data:`layerfs.lazy.PREFETCH_MODES`) fetches pieces in the background while the mount serves."""
    if prefetch not in PREFETCH_MODES:
        raise UsageError(f"unknown prefetch mode {prefetch!r}", hint="use " + ", ".join(PREFETCH_MODES))
    real = check_mountpoint(mountpoint, allow_nonempty=options.allow_nonempty)
    if options.layer is not None:
        raise UsageError("--layer is not supported with --lazy")
    here = os.getpid()
    store.init()
    # prune keeps the caches of running lazy mounts (their status files); until this one has its status
    # (written with this process's pid, replaced by the daemon's below), the gc lock keeps prune away
    with store.lock("gc", shared=True):
        image, manifest, tree, readers = open_lazy_tree(store, ref_text, platform=options.platform,
                                                        registry_options=registry_options)
        note_lazy_readers(store, real, here, readers, prefetch=prefetch)
    pf = Prefetcher(readers, prefetch) if prefetch != "none" else None
    if options.foreground:      # serves here until unmounted: the status written above is the mount's
        if pf is not None:
            pf.start(delay=0.5)
        return mount_tree(tree, mountpoint, options, store=store, image=image, manifest_digest=str(manifest.digest))
    if pf is not None:
        pf.arm()
    try:
        record = mount_tree(tree, mountpoint, options, store=store, image=image,
                            manifest_digest=str(manifest.digest))
        note_lazy_readers(store, record.mountpoint, record.pid, readers, prefetch=prefetch)
    finally:
        if pf is not None:
            pf.disarm()
        drop_lazy_status(store, here)
    return record
