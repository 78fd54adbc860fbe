"""Argument types of the command line (argparse ``type=``): booleans and byte counts."""
from __future__ import annotations

import argparse

_TRUE, _FALSE = ("1", "true", "yes", "on", "t"), ("0", "false", "no", "off", "f")
#: the words :func:`bool_arg` takes (lower case)
BOOL_WORDS = frozenset(_TRUE + _FALSE)


def bool_arg(text: str) -> bool:
    """A boolean as docker's flags take it: 1/0, true/false, yes/no, on/off, t/f."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def size_arg(text: str) -> int:
    """A byte count: 1048576, 64k, 16M, 1G (powers of 1024)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in ("k", "m", "g") else t
    if not num.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 1048576, 512k, 16M)")
    return int(num) * mult
