"""Real registries for tests: ``/usr/bin/docker-registry`` (CNCF distribution 2.8) processes on 127.0.0.1.

* :class:`Registry` runs the registry with a generated config on a free port;
  :class:`BasicAuthRegistry` adds an htpasswd file, :class:`TokenAuthRegistry` a
  :class:`tokenserver.TokenServer`; :func:`write_tls_cert` makes a certificate for an HTTPS one.
* :class:`RegistryFactory` starts registries and fault proxies under one directory and stops them all
  (the pytest fixtures in ``conftest.py`` are built on it); :func:`repo_name_for` names a test's repository.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import requests
from faultproxy import FaultProxy
from localnet import LOCALHOST, free_port, new_session
from prereqs import clean_env, require_binary, require_module
from tokenserver import TokenServer

REGISTRY_BIN = os.environ.get("LAYERFS_TEST_REGISTRY", "/usr/bin/docker-registry")


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
                                          stderr=subprocess.STDOUT, env=clean_env(),
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
