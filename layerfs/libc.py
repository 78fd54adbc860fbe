"""C library functions that the os module lacks, looked up once through ctypes."""
from __future__ import annotations

import ctypes
from typing import Any

_FUNCS: dict[str, Any] = {}


def function(name: str, argtypes: tuple) -> Any:
    """The C library's function *name* with its argument types (errno kept; the GIL is released
    during calls), or None where the C library lacks it."""
    f = _FUNCS.get(name)
    if f is None:
        try:
            f = getattr(ctypes.CDLL(None, use_errno=True), name)
        except (OSError, AttributeError):
            return None
        f.argtypes = argtypes
        _FUNCS[name] = f
    return f
