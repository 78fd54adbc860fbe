"""Compressions: their names, their magic numbers, their errors, and inflating gzip from a checkpoint.

The one place that names the compressions layerfs knows: :func:`normalize_compression` (the accepted
spellings of the layer compressions ``"gzip"``, ``"zstd"`` and ``None``), :func:`sniff_compression`
(the magic numbers of every compression an archive or a blob may use: gzip, zstd, xz, bzip2) and
:func:`detect_compression` (the layer compression a blob's first bytes show). The seek index's
compression codes are here too (:data:`COMPRESSION_CODES`).

The native gzip code (``layerfs._zran``, native/zran/) is used from this package only:
:func:`inflate_at` inflates a stretch of a deflate stream from a checkpoint, and
:func:`wrap_zran_error` turns the extension's errors into :class:`CompressedDataError` /
:class:`TruncatedStream`.
"""
from __future__ import annotations

from layerfs.errors import ContentError

try:
    from layerfs import _zran
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "layerfs._zran (native/zran/) is not built; run 'pip install -e .' "
        "(needs gcc, zlib and ISA-L headers: apt-get install zlib1g-dev libisal-dev)"
    ) from exc

__all__ = [
    "CompressedDataError", "TruncatedStream", "COMPRESSION_CODES", "CODE_COMPRESSION", "LAYER_COMPRESSIONS",
    "normalize_compression", "sniff_compression", "detect_compression", "zstd_module", "wrap_zran_error",
    "inflate_at",
]


# --- errors ------------------------------------------------------------------

class CompressedDataError(ContentError):
    """A compressed blob is corrupt (bad header, bad data, CRC mismatch...)."""

    default_hint = "the blob is damaged; delete it from the store and pull again"


class TruncatedStream(CompressedDataError):
    """A compressed blob ends before its compressed stream does."""


def wrap_zran_error(exc: Exception) -> ContentError:
    """The :class:`CompressedDataError` (or :class:`TruncatedStream`) for an error of ``layerfs._zran``."""
    if isinstance(exc, _zran.Truncated):
        return TruncatedStream(str(exc))
    return CompressedDataError(str(exc))


def zstd_module():
    """The standard library's ``compression.zstd`` (Python 3.14), else its backport ``backports.zstd``."""
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    return zstd


# --- compression names -------------------------------------------------------

#: the compressions a layer blob may have (None: uncompressed)
LAYER_COMPRESSIONS = ("gzip", "zstd", None)
#: compression -> its code in a serialised seek index
COMPRESSION_CODES = {None: 0, "gzip": 1, "zstd": 2}
CODE_COMPRESSION = {v: k for k, v in COMPRESSION_CODES.items()}
_ALIASES = {None: None, "": None, "none": None, "identity": None, "uncompressed": None,
            "gzip": "gzip", "gz": "gzip", "zstd": "zstd", "zst": "zstd"}
#: (magic number, compression), checked in this order
_MAGIC_NUMBERS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"))
#: bytes of a blob's start that :func:`sniff_compression` needs
MAGIC_BYTES = max(len(m) for m, _ in _MAGIC_NUMBERS)


def normalize_compression(compression: str | None) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` for the accepted spellings."""
    key = compression.lower() if isinstance(compression, str) else compression
    try:
        return _ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compression {compression!r} (use 'gzip', 'zstd' or None)") from None


def sniff_compression(head: bytes) -> str | None:
    """The compression the first bytes of a file show by their magic number: ``"gzip"``, ``"zstd"``,
    ``"xz"``, ``"bzip2"``, or None (none of these: uncompressed, or something else)."""
    for magic, name in _MAGIC_NUMBERS:
        if head[:len(magic)] == magic:
            return name
    return None


def detect_compression(head: bytes) -> str | None:
    """The layer compression of a blob from its first bytes: ``"gzip"``, ``"zstd"``, or None (read as
    uncompressed: a layer in any other compression is then not a tar and fails as such)."""
    found = sniff_compression(head)
    return found if found in LAYER_COMPRESSIONS else None


# --- inflating gzip from a checkpoint -----------------------------------------

def inflate_at(fd: int, coffset: int, bits: int, window: bytes | None, length: int, skip: int = 0) -> bytes:
    """*length* bytes of output (fewer only where the stream ends), after skipping *skip*, of the deflate
    stream in *fd* that resumes at byte *coffset* (*bits* of the byte before it, 0-7, still to be used)
    with *window* (the zlib-compressed 32 KiB before it, None at the start of a gzip member).
    Inflated in C without the GIL. Raises :class:`CompressedDataError` / :class:`TruncatedStream`."""
    try:
        return _zran.read_at(fd, coffset, bits, window, skip, length)
    except _zran.Error as exc:
        raise wrap_zran_error(exc) from None
