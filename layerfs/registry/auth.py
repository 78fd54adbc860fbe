"""Registry credentials and the Bearer token flow.

Credentials come from docker's ``config.json`` (``$DOCKER_CONFIG`` or
``~/.docker``): ``auths`` entries (base64 ``auth`` or username/password,
``identitytoken``) and ``credHelpers`` / ``credsStore`` through
``docker-credential-*`` programs. ``layerfs login`` writes there too, as
``docker login`` does, so both tools share logins.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from layerfs.errors import CredentialsError
from layerfs.image import DOCKER_HUB
from layerfs.store import atomic_write

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None   # an OAuth2 refresh token ("<token>" username in helpers)

    @property
    def basic(self) -> tuple[str, str] | None:
        if self.username is not None and self.password is not None:
            return self.username, self.password
        return None


def docker_config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path(os.path.expanduser("~")) / ".docker"


def _auth_keys(registry: str) -> list[str]:
    """Keys under which config.json may hold credentials for *registry*."""
    if registry == DOCKER_HUB:
        return [DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", "registry-1.docker.io",
                "https://index.docker.io/v1", "https://registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
            f"https://{registry}/v2/"]


def normalise_key(key: str) -> str:
    k = key
    if "://" in k:
        k = urlsplit(k).netloc or k
    k = k.split("/")[0]
    if k in ("index.docker.io", "registry-1.docker.io", "docker.io"):
        return DOCKER_HUB
    return k


class CredentialStore:
    """Reads and writes docker-style credentials."""

    def __init__(self, config_dir: Path | None = None):
        self.config_dir = config_dir or docker_config_dir()
        self.path = self.config_dir / "config.json"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as e:
            raise CredentialsError(f"cannot read {self.path}: {e}", hint="fix or remove the file") from None
        return doc if isinstance(doc, dict) else {}

    def _helper_for(self, doc: dict, registry: str) -> str | None:
        helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
        for key, name in helpers.items():
            if normalise_key(key) == registry and isinstance(name, str):
                return name
        store = doc.get("credsStore")
        return store if isinstance(store, str) and store else None

    def get(self, registry: str) -> Credentials | None:
        doc = self._load()
        helper = self._helper_for(doc, registry)
        if helper:
            creds = self._helper_get(helper, registry)
            if creds:
                return creds
        auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
        entry = None
        for key in _auth_keys(registry):
            if isinstance(auths.get(key), dict):
                entry = auths[key]
                break
        if entry is None:
            for key, val in auths.items():
                if normalise_key(key) == registry and isinstance(val, dict):
                    entry = val
                    break
        if not entry:
            return None
        user, pw = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except Exception:
                raise CredentialsError(f"bad base64 'auth' for {registry} in {self.path}",
                                       hint=f"run 'layerfs login {registry}' again") from None
        ident = entry.get("identitytoken") if isinstance(entry.get("identitytoken"), str) else None
        if not user and not ident:
            return None
        return Credentials(user or None, pw if isinstance(pw, str) else None, ident or None)

    def _helper_program(self, helper: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
            raise CredentialsError(f"invalid credential helper name {helper!r} in {self.path}")
        prog = shutil.which(f"docker-credential-{helper}")
        if not prog:
            raise CredentialsError(f"credential helper docker-credential-{helper} not found",
                                   where=str(self.path), hint="install it or remove it from config.json")
        return prog

    def _server_url(self, registry: str) -> str:
        return DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry

    def _helper_get(self, helper: str, registry: str) -> Credentials | None:
        prog = self._helper_program(helper)
        try:
            p = subprocess.run([prog, "get"], input=self._server_url(registry).encode(),
                               capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CredentialsError(f"credential helper {helper} failed: {e}") from None
        if p.returncode != 0:
            out = (p.stdout + p.stderr).decode(errors="replace").strip()
            if "credentials not found" in out.lower():
                return None
            raise CredentialsError(f"credential helper {helper} failed: {out[:200]}")
        try:
            doc = json.loads(p.stdout)
            user, secret = doc.get("Username"), doc.get("Secret")
        except Exception:
            raise CredentialsError(f"credential helper {helper} printed malformed JSON") from None
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(user, secret)

    def store(self, registry: str, creds: Credentials) -> str:
        """Save credentials; returns where they went."""
        doc = self._load()
        helper = self._helper_for(doc, registry)
        if helper:
            prog = self._helper_program(helper)
            payload = json.dumps({"ServerURL": self._server_url(registry), "Username": creds.username,
                                  "Secret": creds.password}).encode()
            p = subprocess.run([prog, "store"], input=payload, capture_output=True, timeout=30)
            if p.returncode != 0:
                raise CredentialsError(f"credential helper {helper} could not store credentials: "
                                       f"{(p.stdout + p.stderr).decode(errors='replace').strip()[:200]}")
            return f"credential helper {helper}"
        auths = doc.setdefault("auths", {}) if isinstance(doc.get("auths"), dict) else doc.setdefault("auths", {})
        key = self._server_url(registry)
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        auths[key] = {"auth": token}
        self._save(doc)
        return str(self.path)

    def erase(self, registry: str) -> bool:
        doc = self._load()
        helper = self._helper_for(doc, registry)
        removed = False
        if helper:
            prog = self._helper_program(helper)
            p = subprocess.run([prog, "erase"], input=self._server_url(registry).encode(),
                               capture_output=True, timeout=30)
            removed = p.returncode == 0
        auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
        for key in list(auths):
            if normalise_key(key) == registry:
                del auths[key]
                removed = True
        if removed and not helper:
            self._save(doc)
        elif removed:
            self._save(doc)
        return removed

    def _save(self, doc: dict) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, json.dumps(doc, indent="\t").encode() + b"\n", mode=0o600)


# --- WWW-Authenticate ----------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_www_authenticate(header: str | None) -> list[Challenge]:
    """Parse a WWW-Authenticate header into challenges (RFC 7235, lenient)."""
    out: list[Challenge] = []
    if not header:
        return out
    text = header.strip()
    while text:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", text)
        if not m:
            break
        scheme = m.group(1).lower()
        text = text[m.end():]
        params: dict[str, str] = {}
        while True:
            pm = _PARAM_RE.match(text)
            if not pm:
                break
            # stop if this "key=value" is really the next scheme's token
            key = pm.group(1).lower()
            val = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[key] = re.sub(r"\\(.)", r"\1", val) if pm.group(2) is not None else val
            text = text[pm.end():]
            if not text or not _PARAM_RE.match(text):
                break
        out.append(Challenge(scheme, params))
        text = text.lstrip(", ")
    return out


@dataclass
class Token:
    value: str
    expires_at: float
    margin: float = 5.0     # renewed this long before it expires (a request takes time to arrive)

    @classmethod
    def lasting(cls, value: str, seconds: float, now: float | None = None) -> "Token":
        """A token valid for *seconds* from now, renewed 5 s early (a tenth of its life when shorter)."""
        return cls(value, (now or time.monotonic()) + seconds, min(5.0, seconds / 10))

    def valid(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) < self.expires_at - self.margin
