"""``diff``: the changes an upper directory makes to the image below it.

:func:`diff` compares an upper (an :class:`~layerfs.changes.scan.UpperScan`) with the
image below, as ``docker diff`` does on the containerd image store
(``archive.ChangesDirs``: the merged lower tree against the merged result): ``A``
for a path the image does not have, ``C`` for one it has (a directory only when
its mode or owner changed or something below it did, so every directory above a
change is ``C``), ``D`` for a path that is gone (only the top of a deleted
subtree; for an opaque directory every lower entry not created again). Lines are
sorted by path.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

from layerfs.changes.scan import UpperEntry, UpperScan, join_path
from layerfs.fs import ROOT_INO, MergedTree, Node
from layerfs.index import DIR

__all__ = ["Change", "diff"]


@dataclass(frozen=True, order=True)
class Change:
    """One ``docker diff`` line: ``kind`` is ``A``, ``C`` or ``D``; ``path`` is absolute (``/etc/motd``)."""

    path: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _dir_attrs_differ(e: UpperEntry, n: Node) -> bool:
    return e.mode != stat.S_IMODE(n.mode) or e.uid != n.uid or e.gid != n.gid


def diff(lower: MergedTree, scan: UpperScan) -> list[Change]:
    """The changes *scan* makes to the image *lower*, sorted by path (see the module docs)."""
    out: list[Change] = []

    def added(rel: str) -> None:              # everything below a new directory is new
        todo = [rel]
        while todo:
            for e in scan.dirs[todo.pop()].kids.values():
                out.append(Change("/" + e.path, "A"))
                if e.kind == DIR:
                    todo.append(e.path)

    def visit(rel: str, lower_ino: int | None, opaque: bool) -> bool:
        d = scan.dirs[rel]
        ln = lower.get(lower_ino) if lower_ino is not None else None
        lkids = ln.children if ln is not None and ln.children is not None else {}
        n0 = len(out)
        for name, e in d.kids.items():
            path = "/" + e.path
            lk = lkids.get(name)
            node = lower.get(lk) if lk is not None else None
            if node is None:
                out.append(Change(path, "A"))
                if e.kind == DIR:
                    added(e.path)
            elif e.kind == DIR and node.is_dir:
                # below an opaque directory, or a directory beside its own whiteout, nothing lower shows
                sub_opaque = opaque or scan.dirs[e.path].opaque is not None or name in d.whiteouts
                if visit(e.path, lk, sub_opaque) or _dir_attrs_differ(e, node):
                    out.append(Change(path, "C"))
            else:
                out.append(Change(path, "C"))
                if e.kind == DIR:
                    added(e.path)
        for name in d.whiteouts:
            if name in lkids and name not in d.kids:
                out.append(Change("/" + join_path(rel, name), "D"))
        if opaque:
            for name in lkids:
                if name not in d.kids and name not in d.whiteouts:
                    out.append(Change("/" + join_path(rel, name), "D"))
        return len(out) > n0

    visit("", ROOT_INO, scan.dirs[""].opaque is not None)
    out.sort(key=lambda c: c.path)
    return out
