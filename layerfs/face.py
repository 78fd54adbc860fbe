"""Package faces: a package's ``__init__`` names its public names and the modules that define them,
and each is imported on first use (PEP 562), so importing a package costs nothing."""
from __future__ import annotations

from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of *package*: a name of *exports* (public name -> module of the package)
    is imported from its module and kept in *namespace* (the package's globals), so the next look-up is
    a plain attribute."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # __import__, not importlib.import_module: the import statement's path, which -X importtime reports
        value = getattr(__import__(f"{package}.{module}", fromlist=[name]), name)
        namespace[name] = value
        return value

    return __getattr__
