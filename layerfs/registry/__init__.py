"""Everything that speaks HTTP: the transport (session, retries), the distribution API client, auth,
mirrors, search.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "CredentialStore": "auth", "Credentials": "auth", "Token": "auth", "normalise_key": "auth",
    "parse_www_authenticate": "auth",
    "ClientPool": "client", "MAX_MANIFEST_SIZE": "client", "RegistryClient": "client",
    "RegistryOptions": "options",
    "Mirror": "mirrors", "load_mirrors": "mirrors", "parse_mirrors": "mirrors",
    "search": "hub",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.registry.auth import Credentials, CredentialStore, Token, normalise_key, parse_www_authenticate  # noqa: F401
    from layerfs.registry.client import MAX_MANIFEST_SIZE, ClientPool, RegistryClient  # noqa: F401
    from layerfs.registry.hub import search  # noqa: F401
    from layerfs.registry.mirrors import Mirror, load_mirrors, parse_mirrors  # noqa: F401
    from layerfs.registry.options import RegistryOptions  # noqa: F401
