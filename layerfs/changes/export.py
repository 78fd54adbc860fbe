"""``export``: a merged tree as one deterministic tar, written to a stream or a file.

:func:`export_tree` writes any merged tree (an image, or an image plus an upper directory
as :func:`~layerfs.changes.merged.overlay_tree` makes it) with the layer tar writer;
:func:`output_file` is the file it goes to, renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from layerfs.changes.tarwriter import TarWriter, tree_chunks, tree_members
from layerfs.errors import StoreError
from layerfs.fs import MergedTree

__all__ = ["export_tree", "output_file"]


def export_tree(tree: MergedTree, out: BinaryIO) -> int:
    """Write *tree* to *out* as one tar (whiteouts already applied by the tree): depth first,
    names sorted by their bytes, hard links as links, xattrs, devices, nanosecond mtimes
    as PAX records. Returns the number of bytes written."""
    written = 0

    def sink(b: bytes) -> None:
        nonlocal written
        out.write(b)
        written += len(b)

    w = TarWriter(sink)
    for ti, node in tree_members(tree):
        w.add(ti, tree_chunks(tree, node) if node is not None and node.size else ())
    w.close()
    return written


@contextlib.contextmanager
def output_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file written under a temporary name beside *path* and renamed over it only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
