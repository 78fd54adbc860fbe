"""Mount lifecycle: options, the mount table, uppers, daemons, the engine layer store; what a
``diff``/``commit``/``export`` argument names (a mount, a stored upper, an image).

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "STORE_IMAGE_NAME": "alstore", "serve_store": "alstore",
    "mount_image": "daemon", "mount_service": "daemon", "mount_tree": "daemon", "umount": "daemon",
    "MountOptions": "options",
    "mount_lazy": "lazymount",
    "FSTYPE": "table", "MountError": "table", "MountRecord": "table", "MountTable": "table",
    "check_mountpoint": "table", "kernel_mounts": "table", "mount_states": "table", "mounts": "table",
    "export_source": "targets", "resolve_target": "targets",
    "remove_upper": "uppers", "stored_upper_id": "uppers", "uppers_dir": "uppers",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.mount.alstore import STORE_IMAGE_NAME, serve_store  # noqa: F401
    from layerfs.mount.daemon import mount_image, mount_service, mount_tree, umount  # noqa: F401
    from layerfs.mount.options import MountOptions  # noqa: F401
    from layerfs.mount.table import FSTYPE, MountError, MountRecord, MountTable, check_mountpoint, kernel_mounts, mount_states, mounts  # noqa: F401
    from layerfs.mount.targets import export_source, resolve_target  # noqa: F401
    from layerfs.mount.uppers import remove_upper, stored_upper_id, uppers_dir  # noqa: F401
    from layerfs.mount.lazymount import mount_lazy  # noqa: F401
