"""Reading an upper directory back: diff, commit, export.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__, not importlib.import_module: the import statement's path, which -X importtime reports
    value = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from layerfs.changes.compare import diff  # noqa: F401
    from layerfs.changes.export import export_tree, output_file  # noqa: F401
    from layerfs.changes.merged import overlay_tree  # noqa: F401
    from layerfs.changes.newimage import CommitOptions, commit, parse_new_reference  # noqa: F401
    from layerfs.changes.scan import scan_upper  # noqa: F401
    from layerfs.changes.target import Target  # noqa: F401
