"""Mount lifecycle: options, the mount table, uppers, daemons, the engine layer store.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "STORE_IMAGE_NAME": "alstore", "serve_store": "alstore",
    "FSTYPE": "daemon", "MountError": "daemon", "MountOptions": "daemon", "MountRecord": "daemon",
    "MountRegistry": "daemon", "check_mountpoint": "daemon", "mount_image": "daemon", "mount_service": "daemon",
    "mount_states": "daemon", "mount_table": "daemon", "mount_tree": "daemon", "mounts": "daemon",
    "remove_upper": "daemon", "stored_upper_id": "daemon", "umount": "daemon",
    "uppers_dir": "daemon",
    "mount_lazy": "lazymount",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from layerfs.mount.alstore import STORE_IMAGE_NAME, serve_store  # noqa: F401
    from layerfs.mount.daemon import FSTYPE, MountError, MountOptions, MountRecord, MountRegistry, check_mountpoint, mount_image, mount_service, mount_states, mount_table, mount_tree, mounts, remove_upper, stored_upper_id, umount, uppers_dir  # noqa: F401
    from layerfs.mount.lazymount import mount_lazy  # noqa: F401
