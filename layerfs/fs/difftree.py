"""One layer's own tree in the form of a kernel overlayfs lower directory: what a container engine's
layer ``diff/`` directory holds (served by :mod:`layerfs.mount.alstore`)."""
from __future__ import annotations

from layerfs.fs.tree import LayerReader, MergedTree
from layerfs.fs.union import R_XATTR, LayerDir, Merged, layer_tree, leaf_maker, to_tree
from layerfs.fs.upper import OVERLAY_OPAQUE_XATTR
from layerfs.index import CHAR, DIR, LayerIndex

__all__ = ["build_diff_tree"]


def build_diff_tree(index: LayerIndex, reader: LayerReader) -> MergedTree:
    """One layer's own contents in the form of a kernel overlayfs lower directory (what a container
    engine's layer ``diff/`` holds): a ``.wh.NAME`` becomes a 0/0 character device NAME, a
    ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory; everything else is the
    layer's entries as they are (hard links resolved within the layer, implicit parents 0755 root)."""
    ltree, links = layer_tree(index, 0)
    leaf = leaf_maker(links, 0)

    def dir_row(t: LayerDir, path: str) -> tuple | None:
        if not t.opaque:
            return t.row
        row = t.row or (path, DIR, 0o755, 0, 0, 0, 0, None, 0, 0, 0, None, None)
        x = dict(row[R_XATTR] or {})
        x[OVERLAY_OPAQUE_XATTR] = b"y"
        return row[:R_XATTR] + (x,) + row[R_XATTR + 1:]

    top = Merged(dir_row(ltree, ""), 0, {})
    stack = [(ltree, top, "")]
    while stack:
        t, m, path = stack.pop()
        for name in t.wh:
            if name not in t.kids:
                wpath = f"{path}/{name}" if path else name
                m.kids[name] = Merged((wpath, CHAR, 0, 0, 0, 0, 0, None, 0, 0, 0, None, None), 0, None)
        for name, k in t.kids.items():
            kpath = f"{path}/{name}" if path else name
            if type(k) is LayerDir:
                cur = m.kids[name] = Merged(dir_row(k, kpath), 0, {})
                stack.append((k, cur, kpath))
            else:
                m.kids[name] = leaf(k)
    return to_tree(top, [reader])
