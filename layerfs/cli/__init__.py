"""The command line: parsing, docker-style output, exit codes (the entry point is ``layerfs.cli.main:main``;
each command group is a module of its own, imported only when one of its commands runs).

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> the module of this package that defines it
_EXPORTS = {
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
    pass
