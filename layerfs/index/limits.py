"""The limit on a layer's uncompressed size (a decompression bomb stops there), and byte counts as text."""
from __future__ import annotations

import os

from layerfs.errors import DecompressionLimit, UsageError
from layerfs.image import Digest

__all__ = ["MAX_LAYER_SIZE_ENV", "parse_size", "format_size", "max_layer_size", "layer_too_large"]

#: environment variable: the most one layer may inflate to (a byte count such as 68719476736 or 64G)
MAX_LAYER_SIZE_ENV = "LAYERFS_MAX_LAYER_SIZE"
_DEFAULT_MAX_LAYER_SIZE = 64 << 30
_MAX_LAYER_RATIO = 200
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count: ``1048576``, ``512k``, ``16M``, ``64G``, ``1T`` (powers of 1024; ``64GiB`` too)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    num = t[:len(t) - len(unit)].strip()
    if not num.isdigit() or not num.isascii():
        raise ValueError(f"invalid size {text!r} (e.g. 1048576, 512k, 16M, 64G)")
    return int(num) * _SIZE_UNITS[unit]


def format_size(n: int) -> str:
    """*n* bytes the way :func:`parse_size` reads it back, in the largest unit that divides it."""
    for unit in ("T", "G", "M", "k"):
        if n and n % _SIZE_UNITS[unit.lower()] == 0:
            return f"{n // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(n)


def max_layer_size(compressed_size: int, configured: int | None = None) -> int:
    """The most a layer blob of *compressed_size* bytes may inflate to when it is pulled or loaded:
    *configured* (``PullOptions``/``LoadOptions.max_layer_size``), else ``LAYERFS_MAX_LAYER_SIZE``,
    else 64 GiB or 200 times the compressed size, whichever is more."""
    if configured is not None:
        return configured
    raw = os.environ.get(MAX_LAYER_SIZE_ENV, "").strip()
    if raw:
        try:
            return parse_size(raw)
        except ValueError as e:
            raise UsageError(f"{MAX_LAYER_SIZE_ENV}={raw[:40]!r}: {e}",
                             hint=f"set {MAX_LAYER_SIZE_ENV} to a size such as 128G, or unset it") from None
    return max(_DEFAULT_MAX_LAYER_SIZE, _MAX_LAYER_RATIO * max(0, compressed_size))


def layer_too_large(digest: Digest | None, limit: int, *, subject: str | None = None,
                    where: str | None = None) -> DecompressionLimit:
    """The error for a layer (or *subject*, e.g. an archive holding one) that holds more than *limit*
    bytes uncompressed."""
    blob = f"; blob {digest} was not stored" if digest is not None else ""
    return DecompressionLimit(
        f"{subject + ' ' if subject else ''}inflates to more than {format_size(limit)}, the limit on one "
        f"layer's uncompressed size{blob}", where=where,
        hint=f"if the {'archive' if subject else 'layer'} is genuine, raise the limit: "
             f"{MAX_LAYER_SIZE_ENV}={format_size(2 * limit)}")
