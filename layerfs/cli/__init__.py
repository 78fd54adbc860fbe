"""The command line: parsing, docker-style output, exit codes (the entry point is ``layerfs.cli.main:main``;
each command group is a module of its own, imported only when one of its commands runs).

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    pass
