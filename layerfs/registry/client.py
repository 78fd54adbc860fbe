"""Registry client (OCI distribution spec): manifests, blobs and Range reads, uploads, referrers.

- HTTPS with certificate verification by default; plain HTTP for loopback
  registries and for those named insecure.
- Auth: anonymous or credentialed Bearer tokens (scoped, cached, renewed on
  expiry or 401), HTTP Basic; ``Authorization`` never follows a redirect to
  another host.
- Errors keep the distribution-spec codes; only temporary ones (connection
  failures, 429, 5xx) are retried, under the policy of
  :class:`layerfs.registry.transport.Transport`, which also owns the HTTP session.
- Hostile answers are bounded: a manifest or index over 4 MiB
  (:data:`MAX_MANIFEST_SIZE`) is refused, a document (manifest, config) must
  arrive within twice the timeout, and a blob body that brings too few bytes
  a second over a whole timeout is a broken connection (:class:`Pace`).
"""
from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from layerfs.errors import (
    AccessDenied,
    AuthenticationError,
    DigestMismatch,
    ForeignLayerError,
    LayerfsError,
    ManifestError,
    NotFoundError,
    RangeNotHonoured,
    RegistryError,
    RegistryUnreachable,
    SizeMismatch,
)
from layerfs.image import (
    ACCEPT_MANIFESTS,
    DOCKER_HUB,
    FOREIGN_LAYER_TYPES,
    Descriptor,
    Digest,
    Index,
    Manifest,
    is_local_registry,
    parse_manifest,
)
from layerfs.registry.auth import Challenge, Credentials, CredentialStore, Token, parse_www_authenticate
from layerfs.registry.mirrors import MirroredClient
from layerfs.registry.options import RegistryOptions
from layerfs.registry.transport import CHUNK, MAX_ANSWER, BlobResponse, Pace, Transport, read_document, read_some

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MANIFEST_SIZE = 4 << 20
MAX_REDIRECTS = 5


class RegistryClient:
    """Talks to one registry on behalf of one or more repositories."""

    def __init__(self, registry: str, options: RegistryOptions | None = None, *,
                 endpoint: str | None = None):
        self.registry = registry
        self.options = options or RegistryOptions.from_env()
        host = endpoint or ("registry-1.docker.io" if registry == DOCKER_HUB else registry)
        self.host = host
        local = is_local_registry(registry)
        #: insecure registries: HTTPS without verification first, plain HTTP if that fails (as docker does)
        self.insecure = not local and (registry in self.options.insecure_registries
                                       or host in self.options.insecure_registries)
        self.scheme = "http" if local else "https"
        self.base = f"{self.scheme}://{host}"
        self._scheme_checked = not self.insecure
        self.transport = Transport(registry, self.options, local=local, insecure=self.insecure)
        self._creds_loaded = False
        self._creds: Credentials | None = self.options.credentials
        self._tokens: dict[str, Token] = {}
        self._challenge: Challenge | None = None
        self._lock = threading.Lock()
        self._creds_lock = threading.Lock()
        #: (repository, digest) -> the URL on another host that the last Range GET of that blob was
        #: redirected to (a signed storage URL): later ranges go there directly until it stops answering
        self._blob_urls: dict[tuple[str, str], str] = {}

    # -- credentials -------------------------------------------------------------
    def _credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            with self._creds_lock:   # threads share the client: none may see "loaded" before the creds are
                if not self._creds_loaded:
                    if self._creds is None:
                        store = self.options.credential_store or CredentialStore()
                        self._creds = store.get(self.registry)
                    self._creds_loaded = True
        return self._creds

    # -- token flow --------------------------------------------------------------
    def _fetch_token(self, challenge: Challenge, scope: str | None) -> Token:
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
        creds = self._credentials()
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
            self._body(r, MAX_ANSWER, f"token service {host}")
        finally:
            r.close()
        return r

    def _body(self, r: requests.Response, limit: int, what: str, *, cut: bool = False) -> bytes:
        """The body of a streamed answer, read as it comes (at most *limit* bytes, within twice the
        timeout); kept as the answer's content (``r.json()`` works). More than *limit* is an error,
        or with *cut* the first *limit* bytes."""
        if r._content is not False:          # read already
            return r.content
        data = read_document(r, limit, timeout=self.options.timeout, what=what, registry=self.registry)
        if len(data) > limit:
            if not cut:
                raise RegistryError(f"{what}: the answer is too large (over {limit} bytes)", registry=self.registry)
            data = data[:limit]
        r._content, r._content_consumed = data, True
        return data

    def _auth_header(self, scope: str | None, *, refresh: bool = False,
                     extra_scope: str | None = None) -> str | None:
        """The Authorization value for a request needing *scope*; with *refresh*, a new token
        that also covers *extra_scope* (the scope of the 401 challenge that asked for it).
        Tokens are cached by the exact set of scopes they were asked for, never mixed with
        another request's challenge, so concurrent requests cannot get a token short of a scope."""
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = self._credentials()
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
                tok = self._fetch_token(ch, key)
                with self._lock:
                    self._tokens[key] = tok
                    self._tokens[base] = tok   # covers more than the base scope: later requests reuse it
            return f"Bearer {tok.value}"
        return None

    # -- requests ----------------------------------------------------------------
    def request(self, method: str, path: str, *, scope: str | None = None, headers: Mapping[str, str] | None = None,
                stream: bool = False, ok: tuple[int, ...] = (200,), what: str = "", data: bytes | None = None,
                retries: int | None = None) -> requests.Response:
        """One registry request with auth, redirects and retries of temporary failures.

        *data* is the request body (bytes, so it can be sent again after a 401
        or a retry); *retries* overrides ``options.max_retries`` (0 for requests
        that must not be repeated, e.g. one chunk of an upload)."""
        if not self._scheme_checked:
            self._pick_insecure_scheme()
        url = path if "://" in path else self.base + path
        refreshes = 0
        redirect_retried = False

        def attempt() -> requests.Response:
            nonlocal refreshes, redirect_retried
            r = self._send(method, url, scope=scope, headers=headers, refresh=False, data=data)
            while True:
                # a 401 means: learn the challenge and fetch a fresh token. Concurrent requests share the
                # client, so a token can race with another thread's challenge: renew it twice at most.
                while r.status_code == 401 and refreshes < 2:
                    ch = self._learn_challenge(r)
                    r.close()
                    refreshes += 1
                    r = self._send(method, url, scope=scope, headers=headers, refresh=True,
                                   data=data, extra_scope=ch.params.get("scope") if ch else None)
                if r.status_code != 403 or redirect_retried or not _other_host(r.url, url):
                    break
                # the registry redirected to a signed URL that had expired already (clock skew, or
                # a wait in a queue): ask the registry once more for a fresh one
                redirect_retried = True
                log.info("%s: %s: its redirect URL answered HTTP 403; asking the registry for a new one",
                         self.registry, what or method)
                r.close()
                r = self._send(method, url, scope=scope, headers=headers, refresh=False, data=data)
            if r.status_code in ok:
                if not stream:
                    self._body(r, MAX_ANSWER, what or method)
                return r
            err = self._error_from(r, what)
            r.close()
            raise err

        return self.transport.retrying(attempt, retries=retries)

    def retrying(self, operation: Callable[[], T], *, again: str = "retrying") -> T:
        """*operation* (a logical operation of several requests: a blob download, an upload) under the
        retry policy of :meth:`Transport.retrying`: the requests it makes are not retried on their own."""
        return self.transport.retrying(operation, again=again)

    def _pick_insecure_scheme(self) -> None:
        """For an insecure registry: keep HTTPS (unverified) when it answers, else fall back to HTTP."""
        with self._lock:
            if self._scheme_checked:
                return
            try:
                self.transport.send("GET", f"https://{self.host}/v2/", timeout=min(self.options.timeout, 10),
                                    verify=False).close()
            except RegistryError:
                log.info("%s: no HTTPS, using plain HTTP (insecure registry)", self.registry)
                self.scheme = "http"
                self.base = f"http://{self.host}"
            self._scheme_checked = True

    def _learn_challenge(self, r: requests.Response) -> "Challenge | None":
        chs = parse_www_authenticate(r.headers.get("WWW-Authenticate"))
        pick = next((c for c in chs if c.scheme == "bearer"), None) or next((c for c in chs if c.scheme == "basic"), None)
        if pick is not None:
            # realm and service are the registry's; the scope belongs to this one request
            shared = Challenge(pick.scheme, {k: v for k, v in pick.params.items() if k != "scope"})
            with self._lock:
                self._challenge = shared
        return pick

    def _send(self, method: str, url: str, *, scope: str | None, headers: Mapping[str, str] | None,
              refresh: bool, data: bytes | None = None,
              extra_scope: str | None = None) -> requests.Response:
        hdrs = dict(headers or {})
        auth = self._auth_header(scope, refresh=refresh, extra_scope=extra_scope)
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(hdrs)
            if auth and urlsplit(url)[:2] == origin:     # never to another host, nor over a downgraded scheme
                send["Authorization"] = auth
            # always streamed: no body is read unbounded (see _body)
            r = self.transport.send(method, url, headers=send, data=data)
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                nxt = urljoin(url, r.headers["Location"])
                r.close()
                if urlsplit(nxt).scheme not in ("http", "https"):
                    raise RegistryError(f"refusing redirect to {nxt!r}", registry=self.registry)
                if r.status_code == 303:
                    method = "GET"
                    data = None
                url = nxt
                continue
            return r
        raise RegistryError(f"too many redirects for {url}", registry=self.registry)

    def _error_from(self, r: requests.Response, what: str) -> RegistryError:
        codes: list[str] = []
        messages: list[str] = []
        try:
            body = self._body(r, 65536, what or "error answer", cut=True)
            if len(body) < 65536:
                doc = json.loads(body)
                for e in (doc.get("errors") or []) if isinstance(doc, dict) else []:
                    if isinstance(e, dict):
                        codes.append(str(e.get("code", "")))
                        if e.get("message"):
                            messages.append(str(e["message"]))
        except Exception:
            pass
        detail = "; ".join(messages) or r.reason or ""
        subject = f"{what}: " if what else ""
        text = f"{subject}HTTP {r.status_code} {detail}".strip()
        kw = dict(registry=self.registry, status=r.status_code, codes=tuple(codes))
        retry_after = None
        if r.status_code == 429 or r.status_code == 503:
            ra = r.headers.get("Retry-After")
            if ra and ra.strip().isdigit():
                retry_after = float(ra.strip())
        if r.status_code == 401:
            creds = self._credentials()
            if creds:
                return AuthenticationError(f"{subject}authentication failed (HTTP 401) {detail}".strip(), **kw)
            return AccessDenied(f"{subject}access denied (HTTP 401) {detail}".strip(), **kw)
        if r.status_code == 403:
            return AccessDenied(f"{subject}access denied (HTTP 403) {detail}".strip(), **kw)
        if r.status_code == 404 or any(c in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN") for c in codes):
            return NotFoundError(f"{subject}not found {detail}".strip(), **kw)
        if r.status_code == 429:
            return RegistryError(f"{subject}too many requests (HTTP 429)", retry_after=retry_after,
                                 hint="the registry rate-limits you; wait, or log in", **kw)
        return RegistryError(text, retry_after=retry_after, **kw)

    # -- API -----------------------------------------------------------------------
    @staticmethod
    def pull_scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    def ping(self) -> None:
        """GET /v2/ and learn the auth challenge; with credentials, prove they work."""
        r = self.request("GET", "/v2/", ok=(200, 401), what="/v2/")
        if r.status_code == 401:
            self._learn_challenge(r)
            r.close()
            creds = self._credentials()
            if self._challenge and self._challenge.scheme == "bearer":
                self._fetch_token(self._challenge, None)
                return
            if creds and creds.basic:
                r = self.request("GET", "/v2/", what="/v2/")
            else:
                raise AccessDenied("registry wants credentials", registry=self.registry, status=401)
        r.close()

    def get_manifest(self, repository: str, identifier: str) -> Manifest | Index:
        """Fetch a manifest or index by tag or digest; verified against its digest; at most
        :data:`MAX_MANIFEST_SIZE` bytes, within twice the timeout."""
        expected = Digest.parse(identifier) if ":" in identifier and identifier.startswith(("sha256:", "sha512:")) else None
        what = f"manifest {repository}:{identifier}" if expected is None else f"manifest {repository}@{identifier}"
        r = self.request("GET", f"/v2/{repository}/manifests/{identifier}", scope=self.pull_scope(repository),
                         headers={"Accept": ACCEPT_MANIFESTS}, stream=True, what=what)
        try:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                raise ManifestError(f"{what} is too large ({length} bytes, at most {MAX_MANIFEST_SIZE})",
                                    where=self.registry)
            raw = read_document(r, MAX_MANIFEST_SIZE, timeout=self.options.timeout, what=what,
                                registry=self.registry)
            if len(raw) > MAX_MANIFEST_SIZE:
                raise ManifestError(f"{what} is too large (over {MAX_MANIFEST_SIZE} bytes)", where=self.registry)
            if length and length.isdigit() and len(raw) != int(length):
                raise RegistryError(f"{what}: truncated response ({len(raw)} of {length} bytes)",
                                    registry=self.registry, status=599)
        finally:
            r.close()
        header_digest = r.headers.get("Docker-Content-Digest")
        m = parse_manifest(raw, r.headers.get("Content-Type"), expected=expected, where=f"{self.registry}/{repository}")
        if expected is None and header_digest:
            try:
                hd = Digest.parse(header_digest.strip())
            except LayerfsError:
                hd = None
            if hd is not None and hd.algorithm == m.digest.algorithm and hd != m.digest:
                raise ManifestError(f"{what}: Docker-Content-Digest {hd} does not match the content ({m.digest})",
                                    where=self.registry)
        return m

    def open_blob(self, repository: str, desc: Descriptor, *, start: int = 0) -> BlobResponse:
        """Open a blob body at offset *start* (Range), following redirects."""
        if desc.media_type in FOREIGN_LAYER_TYPES and desc.urls:
            raise ForeignLayerError(f"layer {desc.digest.short} is a foreign (non-distributable) layer "
                                    f"served from {desc.urls[0]}", registry=self.registry)
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        r = self.request("GET", f"/v2/{repository}/blobs/{desc.digest}", scope=self.pull_scope(repository),
                         headers=headers, stream=True, ok=(200, 206), what=f"blob {desc.digest.short}")
        if r.status_code == 206:
            cr = r.headers.get("Content-Range", "")
            try:
                unit, _, rest = cr.partition(" ")
                rng, _, total = rest.partition("/")
                first, _, last = rng.partition("-")
                first_i, last_i = int(first), int(last)
                total_i = None if total == "*" else int(total)
            except ValueError:
                r.close()
                raise RegistryError(f"blob {desc.digest.short}: bad Content-Range {cr!r}", registry=self.registry) from None
            if unit != "bytes" or first_i != start or (total_i is not None and total_i != desc.size) \
                    or last_i >= desc.size:
                r.close()
                raise SizeMismatch(f"blob {desc.digest.short}: Content-Range {cr!r} does not match the request "
                                   f"(from {start} of {desc.size})", where=self.registry)
            return BlobResponse(r, start, total_i, self._pace(desc), desc.size)
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) != desc.size:
            r.close()
            raise SizeMismatch(f"blob {desc.digest.short}: registry sends {length} bytes, manifest says {desc.size}",
                               where=self.registry)
        return BlobResponse(r, 0, desc.size, self._pace(desc), desc.size)

    def _pace(self, desc: Descriptor, deadline: float | None = None) -> Pace:
        return Pace(self.options.timeout, what=f"blob {desc.digest.short}", registry=self.registry, deadline=deadline)

    def read_range(self, repository: str, desc: Descriptor, start: int, end: int, *,
                   retries: int | None = None, require_partial: bool = False) -> bytes:
        """Bytes [*start*, *end*) of a blob with one ``Range`` request (for lazy reads; not verified:
        the caller checks what it asked for). A 206 must answer exactly that range (a multipart
        answer is refused); a 200 (a server without ranges) is read up to *end* and cut. An answer
        whose body breaks off (connection lost, or fewer bytes than announced) is asked for again,
        up to *retries* times (``options.max_retries`` by default) with backoff. With *require_partial*, a
        200 answer to a range that is not the whole blob raises :class:`RangeNotHonoured` at once, its body
        unread (a pull-through cache answers a miss so: the caller reads the range elsewhere)."""
        if not 0 <= start < end <= desc.size:
            raise ValueError(f"bad range {start}-{end} of a {desc.size}-byte blob")
        if desc.media_type in FOREIGN_LAYER_TYPES and desc.urls:
            raise ForeignLayerError(f"layer {desc.digest.short} is a foreign (non-distributable) layer",
                                    registry=self.registry)
        return self.transport.retrying(
            lambda: self._read_range_once(repository, desc, start, end, require_partial), retries=retries)

    def _read_range_once(self, repository: str, desc: Descriptor, start: int, end: int,
                         require_partial: bool = False) -> bytes:
        """One :meth:`read_range` request; a body that breaks off (or trickles) is :class:`RegistryUnreachable`."""
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={start}-{end - 1}"}
        key = (repository, str(desc.digest))
        r = self._get_redirected(key, headers, desc)
        if r is None:
            path = f"/v2/{repository}/blobs/{desc.digest}"
            r = self.request("GET", path, scope=self.pull_scope(repository), headers=headers, stream=True,
                             ok=(200, 206), what=f"blob {desc.digest.short}")
            if r.status_code == 206 and _other_host(r.url, self.base + path):
                with self._lock:
                    self._blob_urls[key] = r.url
        try:
            if r.status_code == 206:
                if (r.headers.get("Content-Type") or "").lower().startswith("multipart/"):
                    raise RegistryError(f"blob {desc.digest.short}: multipart answer to a single range",
                                        registry=self.registry)
                cr = r.headers.get("Content-Range", "")
                unit, _, rest = cr.partition(" ")
                rng, _, _total = rest.partition("/")
                first, _, last = rng.partition("-")
                try:
                    ok = unit == "bytes" and int(first) == start and int(last) == end - 1
                except ValueError:
                    ok = False
                if not ok:
                    raise SizeMismatch(f"blob {desc.digest.short}: Content-Range {cr!r} does not answer "
                                       f"bytes={start}-{end - 1}", where=self.registry)
                skip = 0
            elif require_partial and not (start == 0 and end == desc.size):
                raise RangeNotHonoured(f"blob {desc.digest.short}: a Range request was answered with the whole "
                                       f"blob (HTTP {r.status_code})", registry=self.registry)
            else:
                skip = start
            want = end - start
            out = bytearray()
            raw = r.raw
            pace = self._pace(desc)
            while skip:
                b = read_some(raw, min(skip, CHUNK), pace)
                if not b:
                    break
                skip -= len(b)
            while len(out) < want:
                b = read_some(raw, min(want - len(out), CHUNK), pace)
                if not b:
                    break
                out += b
            if len(out) != want:       # the connection ended early: worth asking again
                raise RegistryUnreachable(f"blob {desc.digest.short}: range {start}-{end - 1} ended after "
                                          f"{len(out)} of {want} bytes", registry=self.registry)
            return bytes(out)
        except LayerfsError:
            self._forget_redirect(key, r.url)
            raise
        finally:
            r.close()

    def _get_redirected(self, key: tuple[str, str], headers: Mapping[str, str],
                        desc: Descriptor) -> requests.Response | None:
        """The Range GET sent straight to the blob's remembered redirect URL (another host: no
        ``Authorization``), or None (nothing remembered, or it no longer answers: expired signed URLs
        answer 403; the caller then asks the registry, which redirects to a fresh URL)."""
        with self._lock:
            url = self._blob_urls.get(key)
        if url is None:
            return None
        try:
            r = self.transport.send("GET", url, headers=headers, what="its redirect URL failed")
        except RegistryError as e:
            self._forget_redirect(key, url)
            log.info("%s: blob %s: %s; asking the registry again", self.registry, desc.digest.short, e.message)
            return None
        if r.status_code == 206:
            return r
        r.close()
        self._forget_redirect(key, url)
        log.info("%s: blob %s: its redirect URL answered HTTP %d%s; asking the registry for a new one",
                 self.registry, desc.digest.short, r.status_code,
                 " (expired)" if r.status_code in (401, 403) else "")
        return None

    def _forget_redirect(self, key: tuple[str, str], url: str | None) -> None:
        with self._lock:
            if url is not None and self._blob_urls.get(key) == url:
                del self._blob_urls[key]

    def get_blob_bytes(self, repository: str, desc: Descriptor, limit: int = 64 << 20) -> bytes:
        """Fetch a small blob (config) whole, verified; at most *limit* bytes, within twice the timeout."""
        if desc.size > limit:
            raise ManifestError(f"blob {desc.digest.short} is too large to fetch whole ({desc.size} bytes, "
                                f"at most {limit})", where=self.registry)
        resp = self.open_blob(repository, desc)
        resp.pace = self._pace(desc, deadline=2 * self.options.timeout)
        try:
            data = next(resp.chunks(desc.size + 1), b"")   # more than its size is an error: read no further
        finally:
            resp.close()
        if len(data) != desc.size:
            raise SizeMismatch(f"blob {desc.digest.short} has {'over ' if len(data) > desc.size else ''}"
                               f"{len(data)} bytes, expected {desc.size}", where=self.registry)
        got = Digest.of(data, desc.digest.algorithm)
        if got != desc.digest:
            raise DigestMismatch(f"blob digest is {got}, expected {desc.digest}", where=self.registry)
        return data


    # -- push (distribution spec: blob uploads, cross-repository mounts, manifests) -------
    @staticmethod
    def push_scope(repository: str) -> str:
        return f"repository:{repository}:push,pull"

    def _location(self, r: requests.Response, what: str) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: the registry sent no upload Location (HTTP {r.status_code})",
                                registry=self.registry)
        nxt = urljoin(r.url or self.base + "/", loc)
        if urlsplit(nxt).scheme not in ("http", "https"):
            raise RegistryError(f"{what}: refusing upload location {loc!r}", registry=self.registry)
        return nxt

    def blob_exists(self, repository: str, digest: Digest, *, size: int | None = None) -> bool:
        """``HEAD /v2/<name>/blobs/<digest>``: True when the repository has the blob (of *size*, when given)."""
        what = f"blob {digest.short}"
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=self.push_scope(repository),
                         ok=(200, 404), what=what)
        r.close()
        if r.status_code == 404:
            return False
        length = r.headers.get("Content-Length")
        if size is not None and length and length.isdigit() and int(length) != size:
            raise SizeMismatch(f"{what}: the registry has {length} bytes, expected {size}", where=self.registry)
        return True

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> str | None:
        """Cross-repository mount (``POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>``).

        Returns None when the registry mounted the blob (201); otherwise the
        URL of the upload session it opened instead (202), to upload into."""
        what = f"blob {digest.short} (mount from {from_repository})"
        query = urlencode({"mount": str(digest), "from": from_repository})
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/?{query}",
                         scope=f"{self.push_scope(repository)} {self.pull_scope(from_repository)}",
                         ok=(201, 202), what=what)
        r.close()
        if r.status_code == 201:
            return None
        return self._location(r, what)

    def start_upload(self, repository: str) -> str:
        """Open an upload session (``POST /v2/<name>/blobs/uploads/``); returns its URL."""
        what = f"upload to {repository}"
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/", scope=self.push_scope(repository),
                         ok=(202,), what=what)
        r.close()
        return self._location(r, what)

    def upload_chunk(self, repository: str, location: str, data: bytes, offset: int) -> str:
        """``PATCH`` one chunk at *offset* (``Content-Range: start-end``); returns the session's next URL.

        Not retried here: after a failure the whole blob upload starts over."""
        end = offset + len(data) - 1
        what = f"upload to {repository} (bytes {offset}-{end})"
        r = self.request("PATCH", location, scope=self.push_scope(repository), data=data, retries=0,
                         headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
                         ok=(202, 204), what=what)
        r.close()
        got = r.headers.get("Range")
        if got:
            first, _, last = got.removeprefix("bytes=").partition("-")
            if not (first.strip() == "0" and last.strip().isdigit() and int(last) == end):
                raise RegistryError(f"{what}: the registry has range {got!r}, expected 0-{end}",
                                    registry=self.registry)
        return self._location(r, what) if r.headers.get("Location") else location

    def finish_upload(self, repository: str, location: str, digest: Digest, data: bytes = b"") -> None:
        """Close an upload session with its last bytes (``PUT <location>?digest=``); the registry verifies the digest."""
        sep = "&" if urlsplit(location).query else "?"
        what = f"blob {digest.short}"
        r = self.request("PUT", f"{location}{sep}{urlencode({'digest': str(digest)})}",
                         scope=self.push_scope(repository), data=data, retries=0,
                         headers={"Content-Type": "application/octet-stream"}, ok=(201, 204), what=what)
        r.close()
        got = r.headers.get("Docker-Content-Digest")
        if got and got.strip() != str(digest):
            raise RegistryError(f"{what}: the registry stored it as {got.strip()}", registry=self.registry)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        """``PUT /v2/<name>/manifests/<tag|digest>`` with the exact bytes; returns their digest."""
        return self.put_manifest_ex(repository, reference, raw, media_type)[0]

    def put_manifest_ex(self, repository: str, reference: str, raw: bytes, media_type: str) -> tuple[Digest, str | None]:
        """Like :meth:`put_manifest`; also returns the ``OCI-Subject`` header the registry answered with
        (distribution spec 1.1: set by registries with the referrers API for a manifest with a ``subject``)."""
        digest = Digest.of(raw)
        what = f"manifest {repository}:{reference}"
        r = self.request("PUT", f"/v2/{repository}/manifests/{reference}", scope=self.push_scope(repository),
                         data=raw, headers={"Content-Type": media_type}, ok=(200, 201, 204), what=what)
        r.close()
        got = r.headers.get("Docker-Content-Digest")
        if got and got.strip() != str(digest):
            raise ManifestError(f"{what}: the registry stored it as {got.strip()}, expected {digest}",
                                where=self.registry)
        subject = r.headers.get("OCI-Subject")
        return digest, subject.strip() if subject else None

    def get_referrers(self, repository: str, digest: Digest, *, artifact_type: str | None = None) -> Index | None:
        """``GET /v2/<name>/referrers/<digest>`` (distribution spec 1.1): the image index listing the
        manifests whose ``subject`` is *digest*, or None when the registry has no referrers API
        (404, 405 or 400: the caller then reads the ``<alg>-<hex>`` tag instead)."""
        path = f"/v2/{repository}/referrers/{digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        what = f"referrers of {repository}@{digest.short}"
        r = self.request("GET", path, scope=self.pull_scope(repository), stream=True,
                         headers={"Accept": "application/vnd.oci.image.index.v1+json"},
                         ok=(200, 400, 404, 405), what=what)
        try:
            if r.status_code != 200:
                return None
            raw = read_document(r, MAX_MANIFEST_SIZE, timeout=self.options.timeout, what=what,
                                registry=self.registry)
        finally:
            r.close()
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"{what}: the answer is too large", where=self.registry)
        ct = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        if ct and ct not in ("application/vnd.oci.image.index.v1+json", "application/json"):
            return None          # not the referrers API (e.g. an HTML page of a front end)
        doc = parse_manifest(raw, "application/vnd.oci.image.index.v1+json", where=f"{self.registry}/{repository}")
        if not isinstance(doc, Index):
            raise ManifestError(f"{what}: the answer is not an image index", where=self.registry)
        return doc

class ClientPool:
    """One :class:`RegistryClient` per registry, shared by the requests of one command
    (so its tokens and connections are reused)."""

    def __init__(self, options: RegistryOptions | None = None):
        self.options = options
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def __call__(self, registry: str) -> RegistryClient:
        with self._lock:
            if registry not in self._clients:
                if self.options is None:
                    self.options = RegistryOptions.from_env()
                client = RegistryClient(registry, self.options)
                mirrors = self.options.mirrors
                if mirrors is not None and registry in mirrors.registries():
                    client = MirroredClient(client, mirrors, self._mirror_client)
                self._clients[registry] = client
            return self._clients[registry]

    def _mirror_client(self, mirror) -> RegistryClient:
        """The client of a mirror (a :class:`layerfs.registry.mirrors.Mirror`): no retries, its own insecure flag."""
        key = f"mirror {mirror.host} {mirror.insecure}"
        with self._lock:
            if key not in self._clients:
                insecure = self.options.insecure_registries + ((mirror.host,) if mirror.insecure else ())
                self._clients[key] = RegistryClient(mirror.host, replace(
                    self.options, insecure_registries=insecure, max_retries=0, mirrors=None))
            return self._clients[key]


def _other_host(url: str | None, origin: str) -> bool:
    """True when *url* (where a response came from) is on another host than *origin* (what was asked)."""
    return bool(url) and urlsplit(url).netloc != urlsplit(origin).netloc
