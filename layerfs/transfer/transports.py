"""The local transports: ``oci:``, ``oci-archive:`` and ``docker-archive:`` strings (:class:`Source`,
skopeo's grammar, see :mod:`layerfs.transfer.sources`), the errors of a local source, and the options
and results of a load."""
from __future__ import annotations

import errno as _errno
import re
from dataclasses import dataclass

from layerfs.errors import ContentError, InvalidReference, UsageError
from layerfs.image import LOCAL_TRANSPORTS, Digest, ImageConfig, Manifest, Platform, Reference

DAMAGED_HINT = "the file is damaged, truncated or was tampered with; nothing was imported"
_OCI_REF = re.compile(r"^[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*$")
_GRAMMAR = {
    "oci": "use oci:DIR[:REF] or oci:DIR:@N (the path may not contain ':')",
    "oci-archive": "use oci-archive:FILE[:REF] or oci-archive:FILE:@N (the path may not contain ':')",
    "docker-archive": "use docker-archive:FILE[:NAME:TAG] or docker-archive:FILE:@N (the path may not contain ':')",
}


class SourceError(ContentError):
    """A local image source (layout directory, archive) that is unreadable, incomplete or malformed."""

    default_hint = DAMAGED_HINT


class SourceNotFound(SourceError):
    errno = _errno.ENOENT
    default_hint = "check the path"


# --- transport strings -------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A parsed transport string. ``transport`` is ``""`` for a bare path (decided by its content)."""

    transport: str
    path: str
    ref: str | None = None      # oci: a ref name; docker-archive: a canonical tagged reference
    index: int | None = None    # @N

    @classmethod
    def parse(cls, text: str) -> "Source":
        """Parse ``TRANSPORT:PATH[:REF|:@N]`` as skopeo does (the path ends at the first ':')."""
        transport, sep, rest = text.partition(":")
        if not sep or transport not in LOCAL_TRANSPORTS:
            raise InvalidReference(f"{text!r} does not start with an image transport",
                                   hint="use oci:DIR[:REF], oci-archive:FILE[:REF] or docker-archive:FILE[:TAG]")
        path, _, sel = rest.partition(":")
        if not path:
            raise UsageError(f"{transport}: reference {text!r} names no path", hint=_GRAMMAR[transport])
        ref = index = None
        if sel.startswith("@"):
            digits = sel[1:]
            if not (digits.isascii() and digits.isdigit()):
                raise UsageError(f"invalid source index {sel!r} in {text!r}",
                                 hint="@N is the zero-based position of the image, e.g. @0")
            index = int(digits)
        elif sel and transport == "docker-archive":
            try:
                r = Reference.parse(sel)
            except InvalidReference as e:
                raise InvalidReference(f"docker-archive: invalid reference {sel!r} in {text!r}: {e.message}",
                                       hint=_GRAMMAR[transport]) from None
            if r.digest is not None:
                raise UsageError(f"docker-archive does not support digest references: {sel!r}",
                                 hint="name the image by NAME:TAG or @N")
            ref = str(r)
        elif sel:
            if not _OCI_REF.match(sel):
                raise UsageError(f"invalid image name {sel!r} in {text!r}",
                                 hint="OCI ref names are letters and digits joined by - . _ : @ + or --, "
                                      "with / between components")
            ref = sel
        return cls(transport, path, ref, index)

    def __str__(self) -> str:
        s = f"{self.transport}:{self.path}" if self.transport else self.path
        if self.ref is not None:
            s += ":" + self.ref
        elif self.index is not None:
            s += f":@{self.index}"
        return s


# --- results -----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    platform: Platform | None = None    # for an image index (default: this host's platform)
    single: bool = False                # exactly one image: a source holding several needs :REF or :@N
    stem: str | None = None             # for localhost/<stem>:TAG names (default: from the path)
    max_layer_size: int | None = None   # most a layer may inflate to (None: see layerfs.index.max_layer_size)


@dataclass
class LoadedImage:
    names: list[str]            # canonical references tagged in the store (the one asked for first)
    manifest: Manifest          # as stored (OCI)
    config: ImageConfig
    repo_digest: Digest | None  # the digest the source knows the image by (oci: index or manifest)
    loaded_layers: int = 0      # layers written (the others were in the store already)

    @property
    def familiar_names(self) -> list[str]:
        return [Reference.parse(n, default_tag=False).familiar() for n in self.names]


@dataclass
class LoadResult:
    source: Source              # with the transport found for a bare path
    images: list[LoadedImage]

    @property
    def names(self) -> list[str]:
        return [n for img in self.images for n in img.names]
