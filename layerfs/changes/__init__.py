"""Reading an upper directory back: diff, commit, export.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "diff": "compare",
    "export_tree": "export", "output_file": "export",
    "overlay_tree": "merged",
    "CommitOptions": "newimage", "commit": "newimage", "parse_new_reference": "newimage",
    "scan_upper": "scan",
    "Target": "target",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.changes.compare import diff  # noqa: F401
    from layerfs.changes.export import export_tree, output_file  # noqa: F401
    from layerfs.changes.merged import overlay_tree  # noqa: F401
    from layerfs.changes.newimage import CommitOptions, commit, parse_new_reference  # noqa: F401
    from layerfs.changes.scan import scan_upper  # noqa: F401
    from layerfs.changes.target import Target  # noqa: F401
