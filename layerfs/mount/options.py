"""Mount options: what ``layerfs mount`` (and ``store serve``) was asked for, checked once.

:class:`MountOptions` is a typed, keyword-only value: read-only or writable (an upper
directory), the layer to stop at, the platform to pull, the options passed to libfuse and
the ones layerfs takes itself (``nonempty``, ``volatile``, ``index=on|off``), foreground
serving and its readiness fd.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from layerfs.errors import UsageError
from layerfs.image import Platform

__all__ = ["MountOptions", "READY_TIMEOUT"]

#: seconds the caller waits for the daemon to answer
READY_TIMEOUT = 60.0


@dataclass(frozen=True, kw_only=True)
class MountOptions:
    read_only: bool = True                 # False: writable overlay (an upper directory, see layerfs.mount.uppers)
    upper: str | None = None               # the upper directory (None: a new one in the store when writable)
    layer: int | None = None               # show only the first N layers (the image after layer N)
    platform: Platform | None = None       # used when the image must be pulled
    fuse_options: Sequence[str] = ()       # passed to libfuse (-o), e.g. allow_other; "nonempty", "volatile", "index=" are ours
    foreground: bool = False
    debug: bool = False                    # debug logs (libfuse's request trace: fuse_options=["debug"])
    ready_fd: int | None = None            # foreground: report readiness on this fd (like the daemon pipe)
    ready_timeout: float = READY_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "fuse_options", tuple(o for o in self.fuse_options if o))
        if self.layer is not None and self.layer < 0:
            raise UsageError(f"--layer {self.layer} is negative")
        if self.read_only and "rw" in self.fuse_options:
            raise UsageError("-o rw contradicts a read-only mount", hint="leave out --read-only for a writable mount")
        if not self.read_only and "ro" in self.fuse_options:
            raise UsageError("-o ro: use --read-only for a read-only mount")
        object.__setattr__(self, "fuse_options", tuple(o for o in self.fuse_options if o != "rw"))
        if self.read_only and self.volatile:
            raise UsageError("-o volatile is for writable mounts", hint="leave out --read-only")
        for o in self.fuse_options:
            if o.startswith("index=") and o not in ("index=on", "index=off"):
                raise UsageError(f"-o {o}: expected index=on or index=off")
        if self.upper is not None:
            object.__setattr__(self, "upper", os.path.abspath(os.fspath(self.upper)))

    @property
    def allow_nonempty(self) -> bool:
        return "nonempty" in self.fuse_options

    @property
    def volatile(self) -> bool:
        """As kernel overlayfs's option: copy-ups and fsync(2) are not synced to disk."""
        return "volatile" in self.fuse_options

    @property
    def index(self) -> bool:
        """As kernel overlayfs's option: all names of a copied-up lower hard-linked file stay one inode
        (the last of index=on/index=off given wins; off by default)."""
        return next((o == "index=on" for o in reversed(self.fuse_options) if o.startswith("index=")), False)

    @property
    def libfuse_options(self) -> tuple[str, ...]:
        return tuple(o for o in self.fuse_options if o not in ("nonempty", "volatile") and not o.startswith("index="))

