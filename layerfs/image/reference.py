"""Image references, parsed the way docker parses them.

    alpine                      -> docker.io/library/alpine:latest
    ghcr.io/o/r:t               -> ghcr.io/o/r:t
    localhost:5000/x@sha256:... -> localhost:5000/x@sha256:...
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from layerfs.errors import InvalidReference
from layerfs.image.oci import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(rf"^{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    registry: str          # canonical registry name: "docker.io", "ghcr.io", "localhost:5000"
    repository: str        # "library/alpine"
    tag: str | None = None
    digest: Digest | None = None

    # -- parsing ---------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, default_tag: bool = True) -> "Reference":
        """Parse *text*; without tag or digest, the tag ``latest`` is implied."""
        original = text
        if not isinstance(text, str) or not text:
            raise InvalidReference("empty image reference")
        if text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReference(f"invalid reference {original!r}: whitespace is not allowed")
        digest = None
        if "@" in text:
            text, _, dig = text.partition("@")
            try:
                digest = Digest.parse(dig)
            except Exception:
                raise InvalidReference(f"invalid reference {original!r}: bad digest {dig!r}",
                                       hint="a digest is sha256: followed by 64 lowercase hex digits") from None
        # tag: a ':' after the last '/'
        tag = None
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1:]
            if not _TAG.match(tag):
                raise InvalidReference(f"invalid reference {original!r}: bad tag {tag!r}",
                                       hint="tags are up to 128 letters, digits, '_', '.', '-', not starting with '.' or '-'")
        if not text:
            raise InvalidReference(f"invalid reference {original!r}: no repository name")
        registry, path = _split_domain(text)
        if registry is not None and not _DOMAIN.match(registry):
            raise InvalidReference(f"invalid reference {original!r}: bad registry host {registry!r}")
        if registry is None or registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in path:
                path = "library/" + path
        if path != path.lower():
            raise InvalidReference(f"invalid reference {original!r}: repository name must be lowercase")
        for comp in path.split("/"):
            if not _PATH_COMPONENT.match(comp):
                raise InvalidReference(
                    f"invalid reference {original!r}: bad path component {comp!r}",
                    hint="components are lowercase letters and digits separated by '.', '_', '__' or '-'")
        if len(path) > NAME_TOTAL_LENGTH_MAX or len(registry) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
            raise InvalidReference(f"invalid reference {original!r}: repository name longer than {NAME_TOTAL_LENGTH_MAX} characters")
        if tag is None and digest is None and default_tag:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    # -- views -----------------------------------------------------------------
    @property
    def name(self) -> str:
        """registry/repository, e.g. ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.repository}"

    @property
    def endpoint_host(self) -> str:
        """Host[:port] that serves the registry API."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What to put in /v2/<name>/manifests/<identifier>: digest wins over tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    @property
    def familiar_name(self) -> str:
        """Name as docker shows it: ``alpine``, ``user/app``, ``ghcr.io/o/r``."""
        if self.registry == DOCKER_HUB:
            return self.repository[len("library/"):] if self.repository.startswith("library/") else self.repository
        return self.name

    def familiar(self) -> str:
        s = self.familiar_name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + str(self.digest)
        return s

    def with_tag(self, tag: str | None) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: Digest) -> "Reference":
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + str(self.digest)
        return s


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if not sep:
        return None, name
    if "." in first or ":" in first or first == "localhost" or first != first.lower() or first.startswith("["):
        return first, rest
    return None, name


def host_of(registry: str) -> str:
    """The host part (no port, no brackets) of ``host[:port]``."""
    if registry.startswith("["):
        return registry[1:registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_local_registry(registry: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1 speak plain HTTP by default, as docker does."""
    host = host_of(registry)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: the transport prefixes of local image sources (``oci:DIR``, ``oci-archive:FILE``,
#: ``docker-archive:FILE``), which :mod:`layerfs.transfer.sources` reads
LOCAL_TRANSPORTS = ("oci", "oci-archive", "docker-archive")


def is_local_source(text: str) -> bool:
    """Whether *text* names a local source (``TRANSPORT:...``) rather than a registry reference."""
    return isinstance(text, str) and ":" in text and text.partition(":")[0] in LOCAL_TRANSPORTS
