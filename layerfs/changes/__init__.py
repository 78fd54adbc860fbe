"""Reading an upper directory back: diff, commit, export.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
    "ChangeSyntaxError": "core", "CommitOptions": "core", "EMPTY_TAR_DIGEST": "core",
    "OVERRIDE_XATTR": "core", "UpperDirError": "core", "apply_changes": "core", "commit": "core",
    "diff": "core", "export_source": "core", "export_tree": "core", "output_file": "core",
    "overlay_tree": "core", "parse_new_reference": "core", "resolve_target": "core", "scan_upper": "core",
    "write_layer_tar": "core",
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
    from layerfs.changes.core import ChangeSyntaxError, CommitOptions, EMPTY_TAR_DIGEST, OVERRIDE_XATTR, UpperDirError, apply_changes, commit, diff, export_source, export_tree, output_file, overlay_tree, parse_new_reference, resolve_target, scan_upper, write_layer_tar  # noqa: F401
