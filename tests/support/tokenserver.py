"""A Docker-Hub-style token service for a registry with bearer-token auth: it issues JWTs the registry
accepts (signed with a fresh key whose certificate is the registry's ``rootcertbundle``), records every
request, and can be told to fail or to forge tokens the registry must refuse.  ``cryptography`` is
imported when the first key is made."""
from __future__ import annotations

import base64
import datetime
import fnmatch
import json
import os
import secrets
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from localnet import ServedInThread
from prereqs import require_module


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without verifying it."""
    head, claims, _sig = token.split(".")
    return json.loads(_b64url_decode(head)), json.loads(_b64url_decode(claims))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:name:pull,push`` -> (type, name, actions); None when malformed."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    actions = [a for a in parts[-1].split(",") if a]
    return parts[0], ":".join(parts[1:-1]), actions


@dataclass
class TokenRequest:
    """One request the token server saw (and what it answered)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    form: dict[str, list[str]]
    username: str | None = None
    authenticated: bool = False
    scopes: list[str] = field(default_factory=list)
    status: int = 0
    access: list[dict[str, Any]] = field(default_factory=list)
    token: str | None = None

    @property
    def authorization(self) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == "authorization":
                return v
        return None

    @property
    def service(self) -> str | None:
        vals = self.query.get("service") or self.form.get("service")
        return vals[0] if vals else None


class _SigningKey:
    """A private key plus a self-signed certificate, for signing JWTs (ES256 or RS256)."""

    def __init__(self, kind: Literal["ec", "rsa"], common_name: str):

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID

        self.kind = kind
        if kind == "ec":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
        elif kind == "rsa":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
        else:
            raise ValueError(f"unknown key kind {kind!r}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder()
                     .subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_der = self.cert.public_bytes(serialization.Encoding.DER)
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        if self.kind == "ec":
            der = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r||s
        return self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())


class TokenServer(ServedInThread):
    """A Docker-Hub-like token service (``GET /token?service=&scope=``, ``POST /token``).

    Issues JWTs signed with a fresh key whose self-signed certificate
    (``cert_path``) is the registry's ``rootcertbundle``; the certificate
    travels in the ``x5c`` header, which distribution 2.8 verifies against
    that bundle.  Policy:

    * Basic credentials are checked against ``users``; wrong ones -> 401.
    * Authenticated users get every requested action (or, when
      ``permissions`` is set, ``permissions[user][repo-glob]`` actions) and
      ``registry:catalog:*``.
    * Anonymous requests get ``pull`` on repositories matching
      ``public_repos`` (fnmatch globs) and nothing else — an empty ``access``
      list, which the registry then refuses, as Docker Hub does — or a 401
      when ``allow_anonymous`` is false.

    The answer carries ``token`` and/or ``access_token`` (``token_field``),
    ``expires_in`` (omitted when None) and ``issued_at``.  Every request is
    recorded in ``requests``.  Settings are plain attributes; ``reset()``
    restores the constructor's values and clears the records.
    """

    what = "token server"

    def __init__(self, workdir: str | os.PathLike[str], *,
                 service: str = "layerfs-test-registry", issuer: str = "layerfs-test-token-issuer",
                 users: Mapping[str, str] | None = None, public_repos: Iterable[str] = (),
                 permissions: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
                 allow_anonymous: bool = True,
                 token_field: Literal["token", "access_token", "both"] = "token",
                 expires_in: int | None = 300, key_kind: Literal["ec", "rsa"] = "ec"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.service = service
        self.issuer = issuer
        self._defaults: dict[str, Any] = dict(users=dict(users or {"alice": "s3cret-pass"}), public_repos=list(public_repos),
                              permissions=permissions, allow_anonymous=allow_anonymous,
                              token_field=token_field, expires_in=expires_in)
        self.key_kind = key_kind
        self._key: _SigningKey | None = None
        self._untrusted_key: _SigningKey | None = None
        self.cert_path = self.workdir / "token-root.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._failures: list[tuple[int, bytes]] = []
        self._refresh_tokens: dict[str, str] = {}
        self.reset()

    # -- settings -------------------------------------------------------------
    def reset(self) -> None:
        """Restore the constructor's settings; forget requests and pending failures."""
        d = self._defaults
        self.users: dict[str, str] = dict(d["users"])
        self.public_repos: list[str] = list(d["public_repos"])
        self.permissions: Mapping[str, Mapping[str, Iterable[str]]] | None = d["permissions"]
        self.allow_anonymous: bool = d["allow_anonymous"]
        self.token_field: str = d["token_field"]
        self.expires_in: int | None = d["expires_in"]
        with self._lock:
            self._requests.clear()
            self._failures.clear()

    def fail_next(self, count: int = 1, status: int = 500, body: bytes = b'{"details":"injected failure"}') -> None:
        """Answer the next *count* token requests with *status*."""
        with self._lock:
            self._failures.extend([(status, body)] * count)

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- addresses ------------------------------------------------------------
    @property
    def realm(self) -> str:
        return self.url + "/token"

    # -- tokens ---------------------------------------------------------------
    @property
    def key(self) -> _SigningKey:
        if self._key is None:
            require_module("cryptography")
            self._key = _SigningKey(self.key_kind, self.issuer)
        return self._key

    def issue(self, subject: str, access: Sequence[Mapping[str, Any]], *, lifetime: int | None = None,
              not_before: float | None = None, issued_at: float | None = None, issuer: str | None = None,
              audience: str | None = None, untrusted: bool = False, include_x5c: bool = True) -> str:
        """A signed JWT.  Keyword arguments let tests forge tokens the registry must refuse."""
        now = time.time()
        key = self.key
        if untrusted:
            if self._untrusted_key is None:
                self._untrusted_key = _SigningKey(self.key_kind, self.issuer)
            key = self._untrusted_key
        header: dict[str, Any] = {"typ": "JWT", "alg": key.alg}
        if include_x5c:
            header["x5c"] = [base64.b64encode(key.cert_der).decode()]
        life = lifetime if lifetime is not None else (self.expires_in or 60)
        iat = int(now if issued_at is None else issued_at)
        claims = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": subject,
            "aud": self.service if audience is None else audience,  # a string: 2.8 does not take a list
            "exp": iat + life,
            "nbf": int(now - 1 if not_before is None else not_before),
            "iat": iat,
            "jti": uuid.uuid4().hex,
            "access": [dict(a) for a in access],
        }
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        return signing_input + "." + _b64url(key.sign(signing_input.encode()))

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The ``access`` claim for *user* (None = anonymous) asking for *scopes*."""
        merged: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            typ, name, wanted = parsed
            allowed = self._allowed(user, typ, name, wanted)
            acts = merged.setdefault((typ, name), [])
            acts.extend(a for a in allowed if a not in acts)
        return [{"type": t, "name": n, "actions": a} for (t, n), a in merged.items() if a]

    def _allowed(self, user: str | None, typ: str, name: str, wanted: list[str]) -> list[str]:
        if typ == "registry":
            return ["*"] if user is not None and name == "catalog" and "*" in wanted else []
        if not typ.startswith("repository"):
            return []
        if user is None:
            public = any(fnmatch.fnmatchcase(name, pat) for pat in self.public_repos)
            return ["pull"] if public and "pull" in wanted else []
        if self.permissions is None:
            return list(wanted)
        granted: set[str] = set()
        for pattern, actions in (self.permissions.get(user) or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                granted.update(actions)
        return [a for a in wanted if a in granted or "*" in granted]

    # -- HTTP -----------------------------------------------------------------
    def start(self) -> "TokenServer":
        if self.serving:
            return self
        self.cert_path.write_bytes(self.key.cert_pem)
        self.serve(_make_token_handler(self), "token-server")
        return self

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        split = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True) if method == "POST" else {}
        rec = TokenRequest(method, split.path, query, headers, form)
        try:
            status, out_headers, out = self._answer(rec)
        except Exception as e:  # a bug here must show up as an answer, not a hang
            status, out_headers, out = 500, {}, json.dumps({"details": f"token server error: {e!r}"}).encode()
        rec.status = status
        with self._lock:
            self._requests.append(rec)
        return status, out_headers, out

    def _answer(self, rec: TokenRequest) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure[0], {"Content-Type": "application/json"}, failure[1]
        if rec.path != "/token" or rec.method not in ("GET", "POST"):
            return 404, {}, b'{"details":"not found"}'
        unauthorized = (401, {"Content-Type": "application/json",
                              "WWW-Authenticate": f'Basic realm="{self.issuer}"'},
                        b'{"details":"incorrect username or password"}')
        src = rec.query if rec.method == "GET" else rec.form
        scopes = [s for v in src.get("scope", []) for s in v.split(" ") if s]
        rec.scopes = scopes
        user: str | None = None
        if rec.method == "POST":
            grant_type = (rec.form.get("grant_type") or [""])[0]
            if grant_type == "password":
                u, p = (rec.form.get("username") or [""])[0], (rec.form.get("password") or [""])[0]
                if self.users.get(u) != p:
                    return unauthorized
                user = u
            elif grant_type == "refresh_token":
                with self._lock:
                    user = self._refresh_tokens.get((rec.form.get("refresh_token") or [""])[0])
                if user is None:
                    return unauthorized
            else:
                return 400, {"Content-Type": "application/json"}, b'{"details":"unsupported grant_type"}'
        else:
            auth = rec.authorization
            if auth is not None:
                scheme, _, cred = auth.partition(" ")
                if scheme.lower() != "basic":
                    return unauthorized
                try:
                    u, _, p = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return unauthorized
                if self.users.get(u) != p:
                    return unauthorized
                user = u
            elif not self.allow_anonymous:
                return unauthorized
        rec.username = user
        rec.authenticated = user is not None
        rec.access = self.grant(user, scopes)
        token = self.issue(user or "", rec.access)
        rec.token = token
        doc: dict[str, Any] = {}
        if rec.method == "POST" or self.token_field in ("access_token", "both"):
            doc["access_token"] = token
        if rec.method == "GET" and self.token_field in ("token", "both"):
            doc["token"] = token
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        doc["issued_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if rec.method == "POST":
            doc["scope"] = " ".join(scopes)
            if (rec.form.get("access_type") or [""])[0] == "offline" and user is not None:
                refresh = secrets.token_urlsafe(24)
                with self._lock:
                    self._refresh_tokens[refresh] = user
                doc["refresh_token"] = refresh
        return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()


def _make_token_handler(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 1 << 20)) if length else b""
            status, headers, out = ts._handle(self.command, self.path, dict(self.headers.items()), body)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
