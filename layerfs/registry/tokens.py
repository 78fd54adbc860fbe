"""The auth of one registry's client: its credentials (given, or from the credential store), the
challenge it learnt from a 401 (``WWW-Authenticate``), and the ``Authorization`` header a request
needs: HTTP Basic, or a Bearer token fetched from the token service (anonymous or with the
credentials, scoped, cached by scope, renewed on expiry or when a 401 asks for it)."""
from __future__ import annotations

import base64
import threading
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlencode, urlsplit

from layerfs.errors import AccessDenied, AuthenticationError, RegistryError
from layerfs.registry.auth import Challenge, Credentials, CredentialStore, Token, parse_www_authenticate
from layerfs.registry.options import RegistryOptions
from layerfs.registry.transport import MAX_ANSWER, Transport, read_answer

if TYPE_CHECKING:
    import requests


class Authenticator:
    """Credentials, challenge and tokens of one registry (shared by the threads of its client)."""

    def __init__(self, registry: str, options: RegistryOptions, transport: Transport):
        self.registry = registry
        self.options = options
        self.transport = transport
        self._creds_loaded = False
        self._creds: Credentials | None = options.credentials
        self._tokens: dict[str, Token] = {}
        #: the registry's challenge (realm and service; a request's scope is not kept), once a 401 named it
        self.challenge: Challenge | None = None
        self._lock = threading.Lock()
        self._creds_lock = threading.Lock()

    def credentials(self) -> Credentials | None:
        """The credentials for this registry (given in the options, else from the credential store), or None."""
        if not self._creds_loaded:
            with self._creds_lock:   # threads share the client: none may see "loaded" before the creds are
                if not self._creds_loaded:
                    if self._creds is None:
                        store = self.options.credential_store or CredentialStore()
                        self._creds = store.get(self.registry)
                    self._creds_loaded = True
        return self._creds

    def fetch_token(self, challenge: Challenge, scope: str | None) -> Token:
        """A new token from the token service of a bearer *challenge*, for *scope* (scopes separated by spaces)."""
        realm = challenge.realm
        if not realm:
            raise AuthenticationError("bearer challenge without a realm", registry=self.registry)
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthenticationError(f"refusing token realm {realm!r}: not an http(s) URL", registry=self.registry,
                                      hint="the registry's WWW-Authenticate header is bogus")
        params = {}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        # a scope argument may name several scopes separated by spaces (push + pull of another repo)
        scopes = (scope or "").split()
        creds = self.credentials()
        auth = creds.basic if creds else None
        if creds and creds.identity_token:
            data = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "layerfs", "service": params.get("service", "")}
            if scopes:
                data["scope"] = " ".join(dict.fromkeys(scopes))
            r = self._token_request("POST", realm, data=data)
        else:
            query = list(params.items()) + [("scope", s) for s in dict.fromkeys(scopes)]
            url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
            r = self._token_request("GET", url, auth=auth)
        if r.status_code in (401, 403):
            if auth:
                raise AuthenticationError(f"token service {parts.netloc} rejected the credentials for "
                                          f"{auth[0]!r} (HTTP {r.status_code})", registry=self.registry,
                                          status=r.status_code)
            raise AccessDenied(f"token service {parts.netloc} denied anonymous access (HTTP {r.status_code})",
                               registry=self.registry, status=r.status_code,
                               hint=f"log in with 'layerfs login {self.registry}'")
        if r.status_code != 200:
            raise RegistryError(f"token service {parts.netloc} answered HTTP {r.status_code}",
                                registry=self.registry, status=r.status_code)
        try:
            doc = r.json()
        except ValueError:
            raise AuthenticationError(f"token service {parts.netloc} sent malformed JSON",
                                      registry=self.registry) from None
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthenticationError(f"token service {parts.netloc} sent no token", registry=self.registry)
        expires_in = doc.get("expires_in")
        if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = 60
        return Token.lasting(value, float(expires_in))

    def _token_request(self, method: str, url: str, *, data: Mapping[str, str] | None = None,
                       auth: tuple[str, str] | None = None) -> requests.Response:
        # never follow redirects with credentials attached (send() follows none)
        host = urlsplit(url).netloc
        r = self.transport.send(method, url, data=data, auth=auth, what=f"cannot reach token service {host}")
        try:
            read_answer(r, MAX_ANSWER, timeout=self.options.timeout, what=f"token service {host}",
                        registry=self.registry)
        finally:
            r.close()
        return r

    def header(self, scope: str | None, *, refresh: bool = False, extra_scope: str | None = None) -> str | None:
        """The Authorization value for a request needing *scope*; with *refresh*, a new token
        that also covers *extra_scope* (the scope of the 401 challenge that asked for it).
        Tokens are cached by the exact set of scopes they were asked for, never mixed with
        another request's challenge, so concurrent requests cannot get a token short of a scope."""
        ch = self.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = self.credentials()
            if creds and creds.basic:
                user, password = creds.basic
                return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin1")).decode()
            return None
        if ch.scheme == "bearer":
            base = " ".join(sorted(set((scope or "").split())))
            wanted = (scope or "").split() + (extra_scope.split() if refresh and extra_scope else [])
            key = " ".join(sorted(set(wanted)))
            with self._lock:
                tok = self._tokens.get(key)
            if tok is None or refresh or not tok.valid():
                tok = self.fetch_token(ch, key)
                with self._lock:
                    self._tokens[key] = tok
                    self._tokens[base] = tok   # covers more than the base scope: later requests reuse it
            return f"Bearer {tok.value}"
        return None

    def learn(self, r: requests.Response) -> Challenge | None:
        """Learn the registry's challenge from a 401 answer *r*; returns the one it named (with its scope)."""
        chs = parse_www_authenticate(r.headers.get("WWW-Authenticate"))
        pick = next((c for c in chs if c.scheme == "bearer"), None) or next((c for c in chs if c.scheme == "basic"), None)
        if pick is not None:
            # realm and service are the registry's; the scope belongs to this one request
            shared = Challenge(pick.scheme, {k: v for k, v in pick.params.items() if k != "scope"})
            with self._lock:
                self.challenge = shared
        return pick
