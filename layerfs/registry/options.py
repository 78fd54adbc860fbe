"""How layerfs talks to registries: :class:`RegistryOptions` (timeouts, retry budget, TLS, credentials,
mirrors), from the environment or given."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from layerfs.errors import UsageError
from layerfs.registry.auth import Credentials, CredentialStore
from layerfs.registry.mirrors import load_mirrors


def _env_list(name: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, "").replace(";", ",").split(",") if x.strip()]


@dataclass(frozen=True, kw_only=True)
class RegistryOptions:
    insecure_registries: tuple[str, ...] = ()
    ca_bundle: str | None = None
    timeout: float = 30.0
    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    credentials: Credentials | None = None    # overrides the credential store (login)
    credential_store: CredentialStore | None = None
    mirrors: Any = None                       # a layerfs.registry.mirrors.MirrorConfig (from_env loads the config file)

    @classmethod
    def from_env(cls, **overrides) -> "RegistryOptions":
        insecure = tuple(_env_list("LAYERFS_INSECURE_REGISTRIES")) + tuple(overrides.pop("insecure_registries", ()))
        ca = overrides.pop("ca_bundle", None) or os.environ.get("LAYERFS_CA_BUNDLE") or None
        kw = dict(insecure_registries=insecure, ca_bundle=ca)
        if os.environ.get("LAYERFS_BACKOFF_BASE"):
            kw["backoff_base"] = float(os.environ["LAYERFS_BACKOFF_BASE"])
        if os.environ.get("LAYERFS_TIMEOUT"):
            try:
                kw["timeout"] = float(os.environ["LAYERFS_TIMEOUT"])
            except ValueError:
                kw["timeout"] = 0.0
            if not 0 < kw["timeout"] < 1e6:
                raise UsageError(f"LAYERFS_TIMEOUT={os.environ['LAYERFS_TIMEOUT'][:40]!r} is not a number of "
                                 f"seconds", hint="unset it, or set it to e.g. 30")
        if "mirrors" not in overrides:
            kw["mirrors"] = load_mirrors()
        kw.update(overrides)
        return cls(**kw)
