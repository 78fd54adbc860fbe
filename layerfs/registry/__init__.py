"""Everything that speaks HTTP: the transport (session, retries), the distribution API client, auth,
mirrors, search.

The names below are this package's public face; each is imported from its module on
first use (PEP 562), so importing the package costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__, not importlib.import_module: the import statement's path, which -X importtime reports
    value = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from layerfs.registry.auth import Credentials, CredentialStore, Token, normalise_key, parse_www_authenticate  # noqa: F401
    from layerfs.registry.client import MAX_MANIFEST_SIZE, ClientPool, RegistryClient  # noqa: F401
    from layerfs.registry.hub import search  # noqa: F401
    from layerfs.registry.mirrors import Mirror, load_mirrors, parse_mirrors  # noqa: F401
    from layerfs.registry.options import RegistryOptions  # noqa: F401
