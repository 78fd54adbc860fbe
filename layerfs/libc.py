"""What the os module lacks: C library functions (looked up once through ctypes), whether a process runs."""
from __future__ import annotations

from typing import Any

_FUNCS: dict[str, Any] = {}


def function(name: str, argtypes: tuple) -> Any:
    """The C library's function *name* with its argument types (errno kept; the GIL is released
    during calls), or None where the C library lacks it."""
    f = _FUNCS.get(name)
    if f is None:
        # ctypes (~8 ms) only on the first look-up: the mount CLI imports this module for pid_alive alone
        import ctypes
        try:
            f = getattr(ctypes.CDLL(None, use_errno=True), name)
        except (OSError, AttributeError):
            return None
        f.argtypes = argtypes
        _FUNCS[name] = f
    return f


def pid_alive(pid: int) -> bool:
    """True while *pid* runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    state = st[st.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"x")


def limit_malloc_arenas(count: int) -> bool:
    """Let glibc's malloc serve all threads from at most *count* arenas (``M_ARENA_MAX``): by default
    each thread that allocates gets an arena of its own, which keeps the memory freed in it (a mount's
    many reader threads then hold MBs each). False where the C library has no ``mallopt``."""
    import ctypes
    mallopt = function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    return bool(mallopt(-8, count))     # M_ARENA_MAX


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (``malloc_trim(0)``: every arena, also free
    chunks inside it, not only its top). False where the C library has no ``malloc_trim``."""
    import ctypes
    trim = function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True
