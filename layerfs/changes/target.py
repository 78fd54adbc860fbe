"""What ``diff`` and ``commit`` act on: an upper directory over an image.

:class:`Target` is made by :mod:`layerfs.mount` from a mount point, a stored upper or an
upper directory named with ``--image`` (``resolve_target``): the mount table and the
uppers of the store are its business, not this package's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerfs.changes.scan import UpperScan, scan_upper
from layerfs.fs import MergedTree, open_image_tree
from layerfs.image import Manifest
from layerfs.store import Store

__all__ = ["Target"]


@dataclass(frozen=True)
class Target:
    """An upper directory over an image: from a mount record, or an upper dir with ``--image``."""

    manifest: Manifest
    upto: int | None                 # the mount shows only the first N layers
    image: str                       # the image as the user knows it
    upper: Path | None               # None: a read-only mount (nothing changed)
    mountpoint: str | None = None

    def lower_tree(self, store: Store) -> MergedTree:
        return open_image_tree(store, self.manifest, upto=self.upto)

    def scan(self) -> UpperScan:
        return scan_upper(self.upper) if self.upper is not None else UpperScan.empty()
