"""Test helpers: real registries, a token server, a fault-injecting proxy, pushers.

Everything here talks to 127.0.0.1 only.  The pytest fixtures built on these
live in ``conftest.py``; this module is importable on its own
(``from registryfixtures import push_image``) and imports its optional
dependencies (``bcrypt``, ``cryptography``) lazily.

* :class:`Registry` runs ``/usr/bin/docker-registry`` (CNCF distribution 2.8)
  with a generated config on a free port; :class:`BasicAuthRegistry` adds an
  htpasswd file, :class:`TokenAuthRegistry` a :class:`TokenServer`.
* :class:`TokenServer` stands in for a Docker-Hub-style auth service and
  issues JWTs the registry accepts.
* :class:`FaultProxy` sits between a client and a registry and cuts, throttles,
  fails, delays, drops or answers chosen requests itself (a lying registry:
  :class:`Scripted` answers send any status, headers and body, slowly if
  asked); :class:`ScriptedServer` is another host (e.g. 127.0.0.2) that
  answers every request with a script and records what it was sent.
* :func:`push_image` / :func:`push_index` push :mod:`imagebuild`
  images with plain ``requests``; :class:`RegistryAuth` answers Basic and
  Bearer challenges.
* :func:`umoci_image` and :func:`skopeo_push` produce and push images with
  independent tools.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import fnmatch
import hashlib
import http.client
import importlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import pytest
import requests

from imagebuild import BuiltImage, BuiltIndex
from layerfs.image import ACCEPT_MANIFESTS, Digest

REGISTRY_BIN = os.environ.get("LAYERFS_TEST_REGISTRY", "/usr/bin/docker-registry")
LOCALHOST = "127.0.0.1"


# --- prerequisites -----------------------------------------------------------

def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(message: str) -> None:
    """Skip the test, or fail it when running on CI (``CI=true``): CI must not silently skip."""
    if on_ci():
        pytest.fail(f"{message} (CI=true: test prerequisites must be installed, not skipped)", pytrace=False)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """Absolute path of the executable *name* (a name on PATH or a path); skip/fail when absent."""
    path = name if os.path.isabs(name) else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        missing_prerequisite(f"required program {name!r} is not installed")
    return str(path)


def require_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_prerequisite(f"required Python package {name!r} is not installed (pip install {name})")
        raise  # unreachable: missing_prerequisite raises


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def new_session() -> requests.Session:
    """A requests session that ignores proxy settings from the environment."""
    s = requests.Session()
    s.trust_env = False
    return s


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


# --- registry processes ------------------------------------------------------

class RegistryStartError(RuntimeError):
    pass


class Registry:
    """A ``docker-registry serve`` process on 127.0.0.1 with filesystem storage.

    The config is written as JSON (a YAML subset the registry reads fine).
    ``start()`` returns once ``GET /v2/`` answers; logs (stdout+stderr) go to
    ``log_path``.  Use as a context manager or call ``stop()``.
    ``config_overrides`` are merged into the generated config (one level
    deep: ``{"http": {"tls": {...}}}`` keeps ``http.addr``); with ``http.tls``
    the registry speaks HTTPS and ``url`` says so (see :func:`write_tls_cert`).
    """

    auth_config: Mapping[str, Any] | None = None

    def __init__(self, workdir: str | os.PathLike[str], *, binary: str = REGISTRY_BIN,
                 config_overrides: Mapping[str, Any] | None = None, startup_timeout: float = 15.0,
                 log_level: str = "info"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.config_overrides = dict(config_overrides or {})
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses ------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def tls(self) -> bool:
        """True when ``config_overrides`` give the registry an ``http.tls`` section (it then speaks HTTPS)."""
        http_cfg = self.config_overrides.get("http")
        return isinstance(http_cfg, Mapping) and bool(http_cfg.get("tls"))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- config ---------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": self.log_level, "formatter": "text", "fields": {"service": "registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{LOCALHOST}:{self.port}",
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.auth_config is not None:
            cfg["auth"] = self.auth_config
        for key, value in self.config_overrides.items():
            if isinstance(value, Mapping) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    def _before_start(self) -> None:
        """Hook for subclasses (write htpasswd, start a token server...)."""

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Registry":
        if self.running:
            return self
        require_binary(self.binary)
        self._before_start()
        last_error = ""
        for _ in range(5):  # the free port can be stolen between probing and binding
            self.port = free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            self._log_file = open(self.log_path, "ab")
            self._proc = subprocess.Popen([self.binary, "serve", str(self.config_path)],
                                          stdin=subprocess.DEVNULL, stdout=self._log_file,
                                          stderr=subprocess.STDOUT, env=_clean_env(),
                                          start_new_session=True)
            try:
                self._wait_ready()
                return self
            except RegistryStartError as e:
                last_error = str(e)
                self._terminate()
                if "address already in use" not in last_error:
                    break
        raise RegistryStartError(last_error)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        session = new_session()
        session.verify = False  # readiness only; a TLS registry's certificate is the test's business
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise RegistryStartError(f"registry exited with {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = session.get(self.url + "/v2/", timeout=1)
                except requests.RequestException:
                    time.sleep(0.05)
                    continue
                if r.status_code in (200, 401) and "Docker-Distribution-Api-Version" in r.headers:
                    return
                time.sleep(0.05)
        finally:
            session.close()
        raise RegistryStartError(f"registry did not answer on {self.url} within {self.startup_timeout}s:\n"
                                 f"{self.log_tail()}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        self._terminate()

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- introspection --------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def session(self) -> requests.Session:
        return new_session()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} running={self.running}>"


class BasicAuthRegistry(Registry):
    """A registry behind htpasswd (bcrypt) basic auth.

    ``username``/``password`` is the first user; ``users`` has all of them;
    ``auth`` is a ``(username, password)`` tuple for ``requests``.
    """

    realm = "layerfs-test-basic"

    def __init__(self, workdir: str | os.PathLike[str], *,
                 users: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(workdir, **kwargs)
        self.users = dict(users or {"alice": "wonderland"})
        self.username, self.password = next(iter(self.users.items()))
        self.htpasswd_path = self.workdir / "htpasswd"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def auth_config(self) -> Mapping[str, Any]:  # type: ignore[override]
        return {"htpasswd": {"realm": self.realm, "path": str(self.htpasswd_path)}}

    def _before_start(self) -> None:
        write_htpasswd(self.htpasswd_path, self.users)


def write_htpasswd(path: str | os.PathLike[str], users: Mapping[str, str], *, rounds: int = 4) -> Path:
    """An htpasswd file with bcrypt hashes (the only kind distribution accepts)."""
    bcrypt = require_module("bcrypt")
    lines = []
    for user, password in users.items():
        if ":" in user:
            raise ValueError(f"user name {user!r} contains ':'")
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
        lines.append(f"{user}:{hashed}\n")
    p = Path(path)
    p.write_text("".join(lines))
    return p


def write_tls_cert(directory: str | os.PathLike[str], *, hosts: Sequence[str] = (LOCALHOST, "localhost"),
                   common_name: str = "layerfs test registry") -> tuple[Path, Path]:
    """A self-signed server certificate (EC P-256, SANs for *hosts*): returns (cert.pem, key.pem)."""
    require_module("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = d / "registry-cert.pem", d / "registry-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TokenAuthRegistry(Registry):
    """A registry using bearer-token auth, with its own :class:`TokenServer`.

    ``token_server`` is started with the registry and stopped with it;
    ``username``/``password``/``auth`` are its first user's credentials.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, token_server: "TokenServer | None" = None,
                 **kwargs: Any):
        super().__init__(workdir, **kwargs)
        self.token_server = token_server or TokenServer(self.workdir / "token")

    @property
    def username(self) -> str:
        return next(iter(self.token_server.users))

    @property
    def password(self) -> str:
        return self.token_server.users[self.username]

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def auth_config(self) -> Mapping[str, Any]:  # type: ignore[override]
        ts = self.token_server
        return {"token": {"realm": ts.realm, "service": ts.service, "issuer": ts.issuer,
                          "rootcertbundle": str(ts.cert_path)}}

    def _before_start(self) -> None:
        self.token_server.start()

    def stop(self) -> None:
        super().stop()
        self.token_server.stop()


# --- token server ------------------------------------------------------------

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
        import datetime

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


class _ServedInThread:
    """A ThreadingHTTPServer on 127.0.0.1 (or *bind*) served from a daemon thread: ``start()`` (the
    subclass's, calling :meth:`_serve`), ``stop()``, and ``with`` for both."""

    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def _serve(self, handler: type, name: str, bind: str = LOCALHOST) -> None:
        server = ThreadingHTTPServer((bind, 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "_ServedInThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TokenServer(_ServedInThread):
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
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
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
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

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
        if self._server is not None:
            return self
        self.cert_path.write_bytes(self.key.cert_pem)
        self._serve(_make_token_handler(self), "token-server")
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


# --- fault-injecting proxy ---------------------------------------------------

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})

_ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE", 401: "UNAUTHORIZED", 404: "NOT_FOUND"}


@dataclass
class FaultRule:
    """One fault.  ``times`` = how often it fires (None: always); ``hits`` = how often it did."""

    kind: Literal["cut", "status", "delay", "drop", "script"]
    pattern: re.Pattern[str]
    method: str | None = None
    times: int | None = 1
    after_bytes: int = 0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    #: "script" rules: the answer, or a function of the request that makes it
    answer: "Scripted | Callable[[ProxiedRequest], Scripted] | None" = None
    #: only requests for which this returns true match (e.g. those with a ``Range`` header)
    when: "Callable[[ProxiedRequest], Any] | None" = None
    hits: int = 0

    def matches(self, method: str, path: str, rec: "ProxiedRequest | None" = None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.when is not None and (rec is None or not self.when(rec)):
            return False
        return self.pattern.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


@dataclass
class ProxiedRequest:
    """What the proxy saw and did for one request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None = None       # status sent to the client (None: dropped before answering)
    fault: str | None = None        # "cut", "status", "drop", "delay" or None
    bytes_sent: int = 0             # body bytes sent to the client
    response_headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], proxy: "FaultProxy"):
        self.proxy = proxy
        self._conns: set[socket.socket] = set()
        self._conn_threads: list[threading.Thread] = []
        self._conn_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._conn_threads = [t for t in self._conn_threads if t.is_alive()]
            if len(self._conns) >= self.proxy.max_connections:
                self.shutdown_request(request)
                return
            self._conns.add(request)
            t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                 name="fault-proxy-conn", daemon=True)
            self._conn_threads.append(t)
        t.start()

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all(self, timeout: float = 5.0) -> None:
        with self._conn_lock:
            conns, threads = list(self._conns), list(self._conn_threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class FaultProxy:
    """A threaded HTTP/1.1 proxy in front of *target_host* ("127.0.0.1:PORT") that injects faults.

    Requests are forwarded with their ``Host`` header unchanged, so the
    registry's ``Location`` headers point back at the proxy and uploads go
    through it too.  ``Range`` and all other end-to-end headers are forwarded;
    the upstream body is read whole (at most ``max_body`` bytes) and re-sent
    with a ``Content-Length``.

    Faults (each returns its :class:`FaultRule`; *path* is a regex searched
    in the URL path; ``times`` = first K matching requests, None = all):

    * ``cut(path, after_bytes, times=1)`` — send the headers and the first
      *after_bytes* body bytes, then close the connection.
    * ``fail(path, status=503, times=1, retry_after=None)`` / ``throttle(path,
      retry_after=1)`` (429) — answer with a distribution-style error body
      without contacting the registry.
    * ``delay(path, seconds, times=None)`` — wait before forwarding.
    * ``drop(path, times=1)`` — close the connection without any answer.

    ``requests`` records every request (headers included), ``count()`` and
    ``counts`` count them.  ``stop()`` closes open connections and joins
    the worker threads.

    ``emulate_referrers = True`` gives the registry behind the proxy the
    referrers API of distribution spec 1.1: a manifest PUT with a ``subject``
    that the registry stores is answered with ``OCI-Subject``, and
    ``GET /v2/<name>/referrers/<digest>`` lists those manifests (an OCI image
    index; ``?artifactType=`` filters, with ``OCI-Filters-Applied``).
    """

    def __init__(self, target_host: str, *, max_body: int = 256 << 20, upstream_timeout: float = 30.0,
                 max_connections: int = 64, idle_timeout: float = 30.0):
        self.target_host = target_host
        self.max_body = max_body
        self.upstream_timeout = upstream_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._rules: list[FaultRule] = []
        self._log: list[ProxiedRequest] = []
        self.emulate_referrers = False
        self._referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        #: when set, blob GETs the registry answers are redirected (307) to a signed URL of this server
        self.redirect_blobs: "SignedURLServer | None" = None
        self._revoked: set[str] = set()
        self._last_challenge: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "FaultProxy":
        if self._server is None:
            self._stopping.clear()
            self._server = _ProxyServer((LOCALHOST, 0), _make_proxy_handler(self), self)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="fault-proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- rules ----------------------------------------------------------------
    def _add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    @staticmethod
    def _pattern(path: str | re.Pattern[str]) -> re.Pattern[str]:
        return path if isinstance(path, re.Pattern) else re.compile(path)

    def cut(self, path: str | re.Pattern[str], after_bytes: int, *, times: int | None = 1,
            method: str | None = "GET") -> FaultRule:
        return self._add(FaultRule("cut", self._pattern(path), method, times, after_bytes=after_bytes))

    def fail(self, path: str | re.Pattern[str], status: int = 503, *, times: int | None = 1,
             retry_after: float | str | None = None, method: str | None = None,
             body: bytes | None = None, headers: Mapping[str, str] | None = None) -> FaultRule:
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = str(retry_after)
        if body is None:
            code = _ERROR_CODES.get(status, "UNKNOWN")
            body = json.dumps({"errors": [{"code": code, "message": f"injected {status}"}]}).encode()
            hdrs.setdefault("Content-Type", "application/json; charset=utf-8")
        return self._add(FaultRule("status", self._pattern(path), method, times, status=status,
                                   headers=hdrs, body=body))

    def throttle(self, path: str | re.Pattern[str], *, retry_after: float | str | None = 1,
                 times: int | None = 1, method: str | None = None) -> FaultRule:
        return self.fail(path, 429, times=times, retry_after=retry_after, method=method)

    def delay(self, path: str | re.Pattern[str], seconds: float, *, times: int | None = None,
              method: str | None = None) -> FaultRule:
        return self._add(FaultRule("delay", self._pattern(path), method, times, seconds=seconds))

    def drop(self, path: str | re.Pattern[str], *, times: int | None = 1, method: str | None = None) -> FaultRule:
        return self._add(FaultRule("drop", self._pattern(path), method, times))

    def script(self, path: str | re.Pattern[str], answer: "Scripted | Callable[[ProxiedRequest], Scripted]", *,
               times: int | None = None, method: str | None = "GET",
               when: "Callable[[ProxiedRequest], Any] | None" = None) -> FaultRule:
        """Answer matching requests with *answer* (a :class:`Scripted`, or a function of the
        :class:`ProxiedRequest` returning one) instead of the registry: a registry that lies."""
        return self._add(FaultRule("script", self._pattern(path), method, times, answer=answer, when=when))

    def revoke_tokens(self) -> int:
        """Expire every bearer token seen so far: later requests carrying one get the 401 with a
        ``WWW-Authenticate`` challenge that a registry sends for an expired token.  Returns how many."""
        with self._lock:
            seen = {v for r in self._log for k, v in r.headers.items()
                    if k.lower() == "authorization" and v.lower().startswith("bearer ")}
            self._revoked |= seen
            return len(seen)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Forget rules and recorded requests."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    # -- records --------------------------------------------------------------
    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._log)

    def count(self, path: str | re.Pattern[str] | None = None, method: str | None = None) -> int:
        pat = None if path is None else self._pattern(path)
        return sum(1 for r in self.requests
                   if (method is None or r.method == method) and (pat is None or pat.search(r.path)))

    @property
    def counts(self) -> collections.Counter[str]:
        """Requests per URL path."""
        return collections.Counter(r.path for r in self.requests)

    # -- internals ------------------------------------------------------------
    def _plan(self, method: str, path: str, rec: ProxiedRequest | None = None) -> tuple[float, FaultRule | None]:
        """Total delay, and the first matching non-delay rule; counts the hits."""
        delay = 0.0
        chosen: FaultRule | None = None
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, path, rec):
                    continue
                if rule.kind == "delay":
                    rule.hits += 1
                    delay += rule.seconds
                elif chosen is None:
                    rule.hits += 1
                    chosen = rule
        return delay, chosen

    def _record(self, rec: ProxiedRequest) -> None:
        with self._lock:
            self._log.append(rec)


def _read_chunked(rfile: Any, limit: int) -> bytes:
    out = bytearray()
    while True:
        line = rfile.readline(1024)
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        if len(out) + size > limit:
            raise ValueError("request body too large")
        out += rfile.read(size)
        rfile.readline(1024)


def _make_proxy_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = proxy.idle_timeout

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _close_hard(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _proxy(self) -> None:
            method = self.command
            split = urllib.parse.urlsplit(self.path)
            rec = ProxiedRequest(method, split.path, split.query, dict(self.headers.items()))
            proxy._record(rec)
            try:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = _read_chunked(self.rfile, proxy.max_body)
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > proxy.max_body:
                        raise ValueError("request body too large")
                    body = self.rfile.read(length) if length else b""
            except ValueError:
                rec.status = 413
                self.send_error(413)
                self.close_connection = True
                return

            ref_m = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})", split.path)
            if proxy.emulate_referrers and ref_m and method == "GET":
                want = urllib.parse.parse_qs(split.query).get("artifactType", [None])[0]
                with proxy._lock:
                    found = list(proxy._referrers.get((ref_m.group(1), ref_m.group(2)), []))
                if want:
                    found = [d for d in found if d.get("artifactType") == want]
                out = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                  "manifests": found}).encode()
                rec.status = 200
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                if want:
                    self.send_header("OCI-Filters-Applied", "artifactType")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                rec.bytes_sent = len(out)
                return

            with proxy._lock:
                revoked = self.headers.get("Authorization") in proxy._revoked
                challenge = proxy._last_challenge
            if revoked and challenge:
                name_m = re.fullmatch(r"/v2/(.+)/(?:blobs|manifests|tags|referrers)/.*", split.path)
                _, params = parse_challenge(challenge)
                header = f'Bearer realm="{params.get("realm", "")}",service="{params.get("service", "")}"'
                if name_m:
                    header += f',scope="repository:{name_m.group(1)}:pull",error="invalid_token"'
                out = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "token expired"}]}).encode()
                rec.fault, rec.status = "revoked", 401
                self.send_response(401)
                self.send_header("WWW-Authenticate", header)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(out)
                return

            delay, rule = proxy._plan(method, split.path, rec)
            if delay:
                rec.fault = "delay"
                if proxy._stopping.wait(delay):
                    self._close_hard()
                    return
            if rule is not None and rule.kind == "drop":
                rec.fault = "drop"
                self._close_hard()
                return
            if rule is not None and rule.kind == "script":
                rec.fault = "script"
                answer = rule.answer(rec) if callable(rule.answer) else rule.answer
                _send_scripted(self, answer, rec, proxy._stopping)
                return
            if rule is not None and rule.kind == "status":
                rec.fault, rec.status = "status", rule.status
                self.send_response(rule.status)
                for k, v in rule.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(rule.body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(rule.body)
                    rec.bytes_sent = len(rule.body)
                return

            headers: dict[str, str] = {}
            for k, v in self.headers.items():     # a repeated header (podman sends several Accept) is joined
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-length", "expect"):
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
            if body or method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.target_host, timeout=proxy.upstream_timeout)
            try:
                conn.request(method, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = b"" if method == "HEAD" else resp.read(proxy.max_body + 1)
                resp_headers = resp.getheaders()
            except (OSError, http.client.HTTPException) as e:
                rec.status = 502
                msg = json.dumps({"errors": [{"code": "UNKNOWN", "message": f"proxy: upstream failed: {e}"}]})
                self.send_response(502)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg.encode())
                return
            finally:
                conn.close()
            if len(data) > proxy.max_body:
                rec.status = 502
                self.send_error(502, "upstream body too large")
                self.close_connection = True
                return

            rec.status = resp.status
            upstream_challenge = resp.getheader("WWW-Authenticate")
            if upstream_challenge and upstream_challenge.lower().startswith("bearer "):
                with proxy._lock:
                    proxy._last_challenge = upstream_challenge
            blob_m = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", split.path)
            if proxy.redirect_blobs is not None and blob_m and method == "GET" and resp.status in (200, 206):
                loc = proxy.redirect_blobs.sign(blob_m.group(1), blob_m.group(2), self.headers.get("Authorization"))
                rec.status = 307
                rec.response_headers["Location"] = loc
                self.send_response(307)
                self.send_header("Location", loc)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            man_m = re.fullmatch(r"/v2/(.+)/manifests/[^/]+", split.path)
            subject_header = None
            if proxy.emulate_referrers and man_m and method == "PUT" and 200 <= resp.status < 300:
                with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
                    doc = json.loads(body)
                    subj = doc.get("subject")
                    if isinstance(subj, dict) and isinstance(subj.get("digest"), str):
                        desc = {"mediaType": doc.get("mediaType") or "application/vnd.oci.image.manifest.v1+json",
                                "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
                                "artifactType": doc.get("artifactType") or doc["config"]["mediaType"]}
                        if doc.get("annotations"):
                            desc["annotations"] = doc["annotations"]
                        key = (man_m.group(1), subj["digest"])
                        with proxy._lock:
                            lst = proxy._referrers.setdefault(key, [])
                            if desc["digest"] not in [d["digest"] for d in lst]:
                                lst.append(desc)
                        subject_header = subj["digest"]
            self.send_response_only(resp.status, resp.reason)
            if subject_header:
                self.send_header("OCI-Subject", subject_header)
            for k, v in resp_headers:
                lk = k.lower()
                if lk in _HOP_BY_HOP or (lk == "content-length" and method != "HEAD"):
                    continue
                rec.response_headers[k] = v
                self.send_header(k, v)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method == "HEAD":
                return
            if rule is not None and rule.kind == "cut":
                rec.fault = "cut"
                part = data[: rule.after_bytes]
                with contextlib.suppress(OSError):
                    self.wfile.write(part)
                rec.bytes_sent = len(part)
                self._close_hard()
                return
            self.wfile.write(data)
            rec.bytes_sent = len(data)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _proxy

    return Handler


@dataclass
class Scripted:
    """An answer sent exactly as given, as a lying registry would: *status*, then *headers*
    verbatim (nothing is added but ``Connection: close``: set a ``Content-Length``, or a lying
    one, yourself), then *body*: bytes, or an iterable of bytes and numbers (a number pauses
    that many seconds: a slow or endless body). ``chunked=True`` sends the body with
    ``Transfer-Encoding: chunked``. The connection is closed after the body, so a body shorter
    than its ``Content-Length`` ends there."""

    status: int = 200
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    body: bytes | Iterable[bytes | float] = b""
    chunked: bool = False

    @classmethod
    def content(cls, body: bytes, content_type: str | None = None, *, status: int = 200,
                headers: Mapping[str, str] | None = None) -> "Scripted":
        """*body* with its true ``Content-Length`` (and ``Content-Type``, when given) plus *headers*."""
        hdrs = {"Content-Length": str(len(body))}
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        return cls(status, hdrs, body)


def _send_scripted(handler: BaseHTTPRequestHandler, answer: Scripted, rec: ProxiedRequest,
                   stopping: threading.Event) -> None:
    rec.status = answer.status
    handler.close_connection = True
    try:
        handler.send_response_only(answer.status)
        items = answer.headers.items() if isinstance(answer.headers, Mapping) else answer.headers
        for k, v in items:
            rec.response_headers[k] = v
            handler.send_header(k, v)
        if answer.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        if handler.command == "HEAD":
            return
        body = [answer.body] if isinstance(answer.body, (bytes, bytearray)) else answer.body
        for piece in body:
            if isinstance(piece, (int, float)):
                if stopping.wait(piece):
                    return
                continue
            if not piece:
                continue
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if answer.chunked else piece)
            rec.bytes_sent += len(piece)
        if answer.chunked:
            handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass                              # the client went away (e.g. it gave up an endless body)
    finally:
        with contextlib.suppress(OSError):
            handler.wfile.flush()
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)


class ScriptedServer(_ServedInThread):
    """Another host: an HTTP server on *bind* (default 127.0.0.2, so that a client sees another
    host than the registry's 127.0.0.1) that answers every request with *answer* (a
    :class:`Scripted`, or a function of the :class:`ProxiedRequest` returning one) and records
    every request, headers included, in ``requests``."""

    def __init__(self, answer: "Scripted | Callable[[ProxiedRequest], Scripted]", *, bind: str = "127.0.0.2"):
        self.answer = answer
        self.bind = bind
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> "ScriptedServer":
        self._stopping.clear()
        self._serve(_make_scripted_handler(self), "scripted-server", self.bind)
        return self

    def stop(self) -> None:
        self._stopping.set()
        super().stop()

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("scripted server is not running")
        return f"{self.bind}:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def _make_scripted_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            rec = ProxiedRequest(self.command, split.path, split.query, dict(self.headers.items()))
            with server._lock:
                server.requests.append(rec)
            answer = server.answer(rec) if callable(server.answer) else server.answer
            _send_scripted(self, answer, rec, server._stopping)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    return Handler


class SignedURLServer(_ServedInThread):
    """Blob storage behind a registry's redirects (as S3/GCS-backed registries do): ``sign()`` makes a
    URL of this server (another port: another host to the client) for one blob of the registry at
    *target_host*, and the server answers GETs of it, ``Range`` included, from the registry with the
    credential the signed request was made with.  Signed URLs expire: after ``max_uses`` uses (None:
    never), all at once with ``expire_all()``, or at once when issued while ``dead_on_arrival`` > 0;
    an expired one answers 403 with an S3-style XML error.  ``requests`` records (path, headers, status).
    """

    def __init__(self, target_host: str, *, max_uses: int | None = None):
        self.target_host = target_host
        self.max_uses = max_uses
        self.dead_on_arrival = 0
        self._lock = threading.Lock()
        self._urls: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, dict[str, str], int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SignedURLServer":
        self._serve(_make_signed_handler(self), "signed-url-server")
        return self

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("signed URL server is not running")
        return f"{LOCALHOST}:{self._server.server_address[1]}"

    def sign(self, repository: str, digest: str, authorization: str | None) -> str:
        sig = secrets.token_hex(12)
        with self._lock:
            dead = self.dead_on_arrival > 0
            self.dead_on_arrival -= dead
            self._urls[sig] = {"repo": repository, "digest": digest, "auth": authorization, "uses": 0,
                               "expired": dead}
        query = urllib.parse.urlencode({"X-Signature": sig, "X-Expires": "900"})
        return f"http://{self.host}/storage/{digest.replace(':', '/')}?{query}"

    def expire_all(self) -> None:
        with self._lock:
            for u in self._urls.values():
                u["expired"] = True

    @property
    def issued(self) -> int:
        with self._lock:
            return len(self._urls)

    def _take(self, sig: str) -> dict[str, Any] | None:
        with self._lock:
            u = self._urls.get(sig)
            if u is None or u["expired"] or (self.max_uses is not None and u["uses"] >= self.max_uses):
                return None
            u["uses"] += 1
            return dict(u)


def _make_signed_handler(server: SignedURLServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
            with server._lock:
                server.requests.append((self.path, dict(self.headers.items()), status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            sig = urllib.parse.parse_qs(split.query).get("X-Signature", [""])[0]
            u = server._take(sig)
            if u is None:
                self._answer(403, {"Content-Type": "application/xml"},
                             b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>"
                             b"<Message>Request has expired</Message></Error>")
                return
            headers = {"Accept-Encoding": "identity"}
            if self.headers.get("Range"):
                headers["Range"] = self.headers["Range"]
            if u["auth"]:
                headers["Authorization"] = u["auth"]
            conn = http.client.HTTPConnection(server.target_host, timeout=30)
            try:
                conn.request("GET", f"/v2/{u['repo']}/blobs/{u['digest']}", headers=headers)
                resp = conn.getresponse()
                # the registry itself may redirect (it does not here); only the body of a 2xx is relayed
                data = resp.read()
                out = {k: v for k, v in resp.getheaders() if k.lower() in ("content-range", "content-type")}
                self._answer(resp.status, out, data if 200 <= resp.status < 300 else b"")
            except (OSError, http.client.HTTPException):
                self._answer(502, {}, b"")
            finally:
                conn.close()

        do_HEAD = do_GET

    return Handler


# --- registry client helpers (plain requests) --------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


class RegistryAuth(requests.auth.AuthBase):
    """Answers a registry's 401 challenge once per request: Basic, or the Bearer token dance.

    The last token obtained is sent proactively on later requests; a 401
    (e.g. ``insufficient_scope`` for another repository) fetches a new one.
    ``token_requests`` counts the token fetches.
    """

    def __init__(self, username: str | None = None, password: str | None = None):
        self.username = username
        self.password = password
        self.token: str | None = None
        self.basic = False
        self.token_requests = 0
        self._session = new_session()

    def _basic_header(self) -> str:
        cred = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(cred).decode()

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.token is not None:
            r.headers["Authorization"] = f"Bearer {self.token}"
        elif self.basic and self.username is not None:
            r.headers["Authorization"] = self._basic_header()
        r.register_hook("response", self._on_response)
        return r

    def fetch_token(self, params: Mapping[str, str]) -> str:
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for scope in (params.get("scope") or "").split(" "):
            if scope:
                query.append(("scope", scope))
        auth = (self.username, self.password or "") if self.username is not None else None
        self.token_requests += 1
        resp = self._session.get(params["realm"], params=query, auth=auth, timeout=10)
        resp.raise_for_status()
        doc = resp.json()
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise RuntimeError(f"token server answered without a token: {doc}")
        return str(token)

    def _on_response(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401 or getattr(resp.request, "_layerfs_auth_retry", False):
            return resp
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.username is not None:
            self.basic = True
            header = self._basic_header()
        elif scheme == "bearer" and params.get("realm"):
            self.token = self.fetch_token(params)
            header = f"Bearer {self.token}"
        else:
            return resp
        resp.content  # drain so the connection can be reused
        resp.close()
        prep = resp.request.copy()
        prep.headers["Authorization"] = header
        prep._layerfs_auth_retry = True  # type: ignore[attr-defined]
        new = resp.connection.send(prep, **kwargs)
        new.history.append(resp)
        new.request = prep
        return new


AuthArg = tuple[str, str] | requests.auth.AuthBase | None


def _auth(auth: AuthArg) -> requests.auth.AuthBase | None:
    if auth is None or isinstance(auth, requests.auth.AuthBase):
        return auth
    return RegistryAuth(*auth)


class PushError(RuntimeError):
    pass


def _check(resp: requests.Response, *ok: int) -> requests.Response:
    if resp.status_code not in ok:
        raise PushError(f"{resp.request.method} {resp.url} -> {resp.status_code}: {resp.text[:500]}")
    return resp


def _base(host: str, scheme: str) -> str:
    return f"{scheme}://{host}"


def push_blob(host: str, repo: str, data: bytes, *, auth: AuthArg = None,
              session: requests.Session | None = None, scheme: str = "http",
              chunk_size: int | None = None, skip_existing: bool = True) -> Digest:
    """Upload one blob: ``POST /blobs/uploads/`` then ``PUT ?digest=`` (or PATCH chunks first)."""
    s = session or new_session()
    a = _auth(auth)
    digest = Digest.of(data)
    base = _base(host, scheme)
    if skip_existing:
        r = s.head(f"{base}/v2/{repo}/blobs/{digest}", auth=a, timeout=30)
        if r.status_code == 200:
            return digest
    r = _check(s.post(f"{base}/v2/{repo}/blobs/uploads/", auth=a, timeout=30), 202)
    location = urllib.parse.urljoin(base + "/", r.headers["Location"])
    if chunk_size:
        offset = 0
        while offset < len(data):
            piece = data[offset: offset + chunk_size]
            r = _check(s.patch(location, data=piece, auth=a, timeout=60, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(piece) - 1}"}), 202)
            location = urllib.parse.urljoin(base + "/", r.headers["Location"])
            offset += len(piece)
        body = b""
    else:
        body = data
    sep = "&" if "?" in location else "?"
    _check(s.put(f"{location}{sep}digest={digest}", data=body, auth=a, timeout=60,
                 headers={"Content-Type": "application/octet-stream"}), 201)
    return digest


def push_manifest(host: str, repo: str, reference: str, raw: bytes, media_type: str, *,
                  auth: AuthArg = None, session: requests.Session | None = None,
                  scheme: str = "http") -> Digest:
    """PUT a manifest (or index) under *reference* (tag or digest); returns its digest."""
    s = session or new_session()
    r = _check(s.put(f"{_base(host, scheme)}/v2/{repo}/manifests/{reference}", data=raw,
                     headers={"Content-Type": media_type}, auth=_auth(auth), timeout=30), 201)
    digest = Digest.of(raw)
    got = r.headers.get("Docker-Content-Digest")
    if got is not None and got != str(digest):
        raise PushError(f"registry stored manifest as {got}, expected {digest}")
    return digest


def push_image(host: str, repo: str, tag: str | None, built: BuiltImage, *, auth: AuthArg = None,
               session: requests.Session | None = None, scheme: str = "http",
               chunk_size: int | None = None) -> Digest:
    """Push layers, config and manifest of *built*; tag it when *tag* is given (else by digest)."""
    s = session or new_session()
    a = _auth(auth)
    for blob in built.layers:
        push_blob(host, repo, blob, auth=a, session=s, scheme=scheme, chunk_size=chunk_size)
    push_blob(host, repo, built.config, auth=a, session=s, scheme=scheme)
    return push_manifest(host, repo, tag or str(built.manifest_digest), built.manifest,
                         built.manifest_media_type, auth=a, session=s, scheme=scheme)


def push_index(host: str, repo: str, tag: str | None, index: BuiltIndex, images: Sequence[BuiltImage], *,
               auth: AuthArg = None, session: requests.Session | None = None, scheme: str = "http") -> Digest:
    """Push every image of a multi-platform image by digest, then the index (tagged if *tag*)."""
    s = session or new_session()
    a = _auth(auth)
    for img in images:
        push_image(host, repo, None, img, auth=a, session=s, scheme=scheme)
    return push_manifest(host, repo, tag or str(index.digest), index.raw, index.media_type,
                         auth=a, session=s, scheme=scheme)


def get_manifest(host: str, repo: str, reference: str, *, accept: str = ACCEPT_MANIFESTS,
                 auth: AuthArg = None, session: requests.Session | None = None, scheme: str = "http",
                 method: str = "GET") -> requests.Response:
    s = session or new_session()
    return s.request(method, f"{_base(host, scheme)}/v2/{repo}/manifests/{reference}",
                     headers={"Accept": accept}, auth=_auth(auth), timeout=30)


def get_blob(host: str, repo: str, digest: Digest | str, *, auth: AuthArg = None,
             session: requests.Session | None = None, scheme: str = "http",
             headers: Mapping[str, str] | None = None, method: str = "GET") -> requests.Response:
    s = session or new_session()
    return s.request(method, f"{_base(host, scheme)}/v2/{repo}/blobs/{digest}", headers=dict(headers or {}),
                     auth=_auth(auth), timeout=30)


# --- independent producers: umoci and skopeo ---------------------------------

UMOCI_TAG = "latest"

#: What the umoci image's final root filesystem holds (after both layers).
UMOCI_EXPECTED: dict[str, Any] = {
    "files": {
        "etc/hello.txt": b"hello from layer 2\n",
        "bin/tool": b"#!/bin/sh\necho tool\n",
        "data/keep.txt": b"kept\n",
        "data/new.txt": b"new in layer 2\n",
        "data/new-hard": b"new in layer 2\n",
    },
    "modes": {"bin/tool": 0o755, "etc/hello.txt": 0o644},
    "symlinks": {"etc/link": "hello.txt", "usr/bin/abs": "/bin/tool"},
    "dirs": ["var/empty"],
    "absent": ["data/old.txt"],
    "hardlinks": [("data/new.txt", "data/new-hard")],
    "env": ["FOO=bar"],
    "cmd": ["/bin/sh"],
    "layers": 2,
}


def _run(args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(list(args), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, env=_clean_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                           f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def umoci_image(workdir: str | os.PathLike[str], *, tag: str = UMOCI_TAG) -> Path:
    """Build a two-layer image with umoci; returns the OCI layout directory (image tag *tag*).

    Layer 1: ``etc/hello.txt``, symlink ``etc/link -> hello.txt``, ``bin/tool``
    (0755), ``data/old.txt``, ``data/keep.txt``, empty dir ``var/empty``.
    Layer 2: deletes ``data/old.txt`` (a whiteout), rewrites ``etc/hello.txt``,
    adds ``data/new.txt`` hard-linked as ``data/new-hard`` and an absolute
    symlink ``usr/bin/abs -> /bin/tool``.  Config: Env FOO=bar, Cmd /bin/sh.
    :data:`UMOCI_EXPECTED` describes the result.
    """
    umoci = require_binary("umoci")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    layout, bundle = work / "oci", work / "bundle"
    ref = f"{layout}:{tag}"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    _run([umoci, "init", "--layout", str(layout)])
    _run([umoci, "new", "--image", ref])
    _run([umoci, "unpack", *rootless, "--image", ref, str(bundle)])
    root = bundle / "rootfs"
    for d in ("etc", "bin", "data", "var/empty", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hello.txt").write_bytes(b"hello from umoci\n")
    os.symlink("hello.txt", root / "etc/link")
    (root / "bin/tool").write_bytes(UMOCI_EXPECTED["files"]["bin/tool"])
    os.chmod(root / "bin/tool", 0o755)
    (root / "data/old.txt").write_bytes(b"this file is deleted in layer 2\n")
    (root / "data/keep.txt").write_bytes(UMOCI_EXPECTED["files"]["data/keep.txt"])
    _run([umoci, "repack", "--refresh-bundle", "--image", ref, str(bundle)])

    (root / "data/old.txt").unlink()
    (root / "etc/hello.txt").write_bytes(UMOCI_EXPECTED["files"]["etc/hello.txt"])
    (root / "data/new.txt").write_bytes(UMOCI_EXPECTED["files"]["data/new.txt"])
    os.link(root / "data/new.txt", root / "data/new-hard")
    os.symlink("/bin/tool", root / "usr/bin/abs")
    _run([umoci, "repack", "--refresh-bundle", "--image", ref, str(bundle)])
    _run([umoci, "config", "--image", ref, "--config.env", "FOO=bar", "--config.cmd", "/bin/sh"])
    shutil.rmtree(bundle, ignore_errors=True)
    return layout


def skopeo_push(oci_ref: str | os.PathLike[str], host: str, repo_tag: str, *,
                format: Literal["v2s2", "oci"] | None = None, auth: tuple[str, str] | None = None,
                tag: str = UMOCI_TAG, timeout: float = 120) -> Digest:
    """``skopeo copy oci:... docker://HOST/REPO:TAG`` over plain HTTP; returns the pushed manifest digest.

    *oci_ref* is ``"oci:PATH:TAG"`` or a layout directory (then *tag* is used).
    """
    skopeo = require_binary("skopeo")
    src = str(oci_ref)
    if not src.startswith("oci:"):
        src = f"oci:{src}:{tag}"
    with _tempdir() as tmp:
        digestfile = Path(tmp) / "digest"
        args = [skopeo, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                "--digestfile", str(digestfile)]
        if format is not None:
            args += ["--format", format]
        if auth is not None:
            args += ["--dest-creds", f"{auth[0]}:{auth[1]}"]
        else:
            args += ["--dest-no-creds"]
        args += [src, f"docker://{host}/{repo_tag}"]
        _run(args, timeout=timeout)
        return Digest.parse(digestfile.read_text().strip())


@contextlib.contextmanager
def _tempdir() -> Any:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="layerfs-skopeo-") as d:
        yield d


# --- factory -----------------------------------------------------------------

class RegistryFactory:
    """Starts registries under *base_dir* and stops all of them on ``close()``."""

    def __init__(self, base_dir: str | os.PathLike[str]):
        self.base_dir = Path(base_dir)
        self._started: list[Registry] = []
        self._proxies: list[FaultProxy] = []
        self._n = 0

    def _dir(self, kind: str) -> Path:
        self._n += 1
        return self.base_dir / f"{kind}-{self._n}"

    def _track(self, reg: Registry) -> Registry:
        self._started.append(reg)
        try:
            return reg.start()
        except BaseException:
            reg.stop()
            raise

    def plain(self, **kwargs: Any) -> Registry:
        return self._track(Registry(self._dir("plain"), **kwargs))

    def basic(self, users: Mapping[str, str] | None = None, **kwargs: Any) -> BasicAuthRegistry:
        return self._track(BasicAuthRegistry(self._dir("basic"), users=users, **kwargs))  # type: ignore[return-value]

    def token(self, registry_kwargs: Mapping[str, Any] | None = None, **token_kwargs: Any) -> TokenAuthRegistry:
        d = self._dir("token")
        ts = TokenServer(d / "token", **token_kwargs)
        return self._track(TokenAuthRegistry(d, token_server=ts, **dict(registry_kwargs or {})))  # type: ignore[return-value]

    def proxy(self, target: Registry | str, **kwargs: Any) -> FaultProxy:
        p = FaultProxy(target.host if isinstance(target, Registry) else target, **kwargs).start()
        self._proxies.append(p)
        return p

    def close(self) -> None:
        for p in self._proxies:
            p.stop()
        for r in self._started:
            with contextlib.suppress(Exception):
                r.stop()
        self._proxies.clear()
        self._started.clear()


_REPO_BAD = re.compile(r"[^a-z0-9]+")


def repo_name_for(test_name: str, prefix: str = "test") -> str:
    """A valid, unique repository name derived from a test's name."""
    slug = _REPO_BAD.sub("-", test_name.lower()).strip("-")[:60].strip("-") or "repo"
    return f"{prefix}/{slug}-{uuid.uuid4().hex[:8]}"
