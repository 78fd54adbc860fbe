"""A registry client on plain ``requests``, independent of layerfs' own: :class:`RegistryAuth` answers
Basic and Bearer challenges; :func:`push_image` / :func:`push_index` push :mod:`imagebuild` images
(blobs, then manifests); :func:`get_manifest` / :func:`get_blob` fetch."""
from __future__ import annotations

import base64
import re
import urllib.parse
from typing import Any, Mapping, Sequence

import requests
from imagebuild import BuiltImage, BuiltIndex
from localnet import new_session

from layerfs.image import ACCEPT_MANIFESTS, Digest

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
