"""One tree of errors for all of layerfs.

Every error carries an ``errno`` (used by the FUSE adapter), an optional
``hint`` (shown by the CLI) and an optional ``where`` (the registry, file or
reference involved).  The CLI maps them to exit codes in one place
(:func:`layerfs.cli.main`); library code raises, it never prints.
"""
from __future__ import annotations

import errno as _errno


class LayerfsError(Exception):
    """Base of every error layerfs raises on purpose."""

    errno: int = _errno.EIO
    exit_code: int = 1
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.where = where

    def one_line(self) -> str:
        """The single line the CLI prints: what, where, and a hint."""
        text = self.message
        if self.where:
            text = f"{self.where}: {text}"
        if self.hint:
            text = f"{text} (hint: {self.hint})"
        return " ".join(text.split("\n"))

    def __str__(self) -> str:
        return self.one_line()


class UsageError(LayerfsError):
    """Bad command-line use."""

    errno = _errno.EINVAL
    exit_code = 2


class InvalidReference(UsageError):
    """An image reference that breaks the reference grammar."""

    default_hint = "use NAME[:TAG][@sha256:DIGEST], e.g. alpine:3.20 or ghcr.io/owner/repo:tag"


class InvalidPlatform(UsageError):
    default_hint = "use OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8"


# --- content / format errors -------------------------------------------------

class ContentError(LayerfsError):
    """Content from outside (manifest, config, blob, tar) is malformed."""

    errno = _errno.EIO
    default_hint = "the image is malformed or was served wrongly; ask its publisher or registry to fix it"


class DigestMismatch(ContentError):
    default_hint = "the registry or the network corrupted the data; try again"


class SizeMismatch(DigestMismatch):
    pass


class ManifestError(ContentError):
    pass


class UnsupportedMediaType(ManifestError):
    errno = _errno.EOPNOTSUPP


class PlatformNotFound(ManifestError):
    errno = _errno.ENOENT


class TarError(ContentError):
    """A layer tar stream that is malformed or tries to escape its root."""

    default_hint = "the layer is malformed or hostile and was not stored; rebuild the image with a standard tool"


class DecompressionLimit(ContentError):
    """Compressed data that inflates beyond the configured limit (a decompression bomb, or a huge layer)."""

    errno = _errno.EFBIG


# --- registry errors ---------------------------------------------------------

class RegistryError(LayerfsError):
    """An error answer or failure talking to a registry.

    Keeps the distribution-spec error codes (``codes``) and the HTTP status;
    :attr:`temporary` says whether a retry may help.
    """

    TEMPORARY_CODES = frozenset({"TOOMANYREQUESTS", "UNAVAILABLE"})
    default_hint = "the registry misbehaves; try again later, or tell its operator"

    def __init__(self, message: str, *, registry: str | None = None, status: int | None = None,
                 codes: tuple[str, ...] = (), hint: str | None = None, where: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, hint=hint, where=where or registry)
        self.registry = registry
        self.status = status
        self.codes = tuple(codes)
        self.retry_after = retry_after

    @property
    def temporary(self) -> bool:
        if self.status is not None and (self.status == 429 or 500 <= self.status < 600):
            return True
        return any(c in self.TEMPORARY_CODES for c in self.codes)


class RegistryUnreachable(RegistryError):
    """Connection refused, reset, DNS failure, timeout."""

    errno = _errno.EHOSTUNREACH
    default_hint = "check the registry address and your network; for a plain-HTTP registry use --insecure-registry"

    @property
    def temporary(self) -> bool:  # connection problems are always worth a retry
        return True


class RangeNotHonoured(RegistryError):
    """A Range request answered with the whole blob (a pull-through cache on a miss), where only the range
    was wanted: the caller goes elsewhere for it."""

    default_hint = "the registry (a mirror?) does not serve byte ranges of this blob yet"


class AuthenticationError(RegistryError):
    errno = _errno.EACCES
    default_hint = "check your credentials with 'layerfs login REGISTRY'"


class AccessDenied(RegistryError):
    errno = _errno.EACCES
    default_hint = "the repository may not exist, or you may need 'layerfs login'"


class NotFoundError(RegistryError):
    errno = _errno.ENOENT
    default_hint = "check the image name and tag"


class ForeignLayerError(RegistryError):
    errno = _errno.EOPNOTSUPP
    default_hint = "the layer is non-distributable; it must be fetched from its own URL by the image's owner terms"


# --- local store -------------------------------------------------------------

class StoreError(LayerfsError):
    pass


class ImageNotFound(StoreError):
    errno = _errno.ENOENT
    default_hint = "run 'layerfs images' to list local images, or 'layerfs pull' it first"


class ImageInUse(StoreError):
    errno = _errno.EBUSY


class DiskFull(StoreError):
    errno = _errno.ENOSPC
    default_hint = "free disk space or point --root / LAYERFS_ROOT somewhere larger"


class CredentialsError(LayerfsError):
    errno = _errno.EACCES
