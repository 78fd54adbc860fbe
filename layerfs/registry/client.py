"""Registry client (OCI distribution spec): manifests, blobs and Range reads, referrers; the push side
(uploads, manifests) is :mod:`layerfs.registry.uploads`, auth and tokens :mod:`layerfs.registry.tokens`,
the HTTP session and retries :mod:`layerfs.registry.transport`.

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
from layerfs.registry.mirrors import MirroredClient
from layerfs.registry.options import RegistryOptions
from layerfs.registry.tokens import Authenticator
from layerfs.registry.transport import (
    CHUNK,
    MAX_ANSWER,
    BlobResponse,
    Pace,
    Transport,
    read_answer,
    read_document,
    read_some,
)
from layerfs.registry.uploads import Uploads

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MANIFEST_SIZE = 4 << 20
MAX_REDIRECTS = 5


class RegistryClient(Uploads):
    """Talks to one registry on behalf of one or more repositories (the push side: :class:`Uploads`)."""

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
        self.auth = Authenticator(registry, self.options, self.transport)
        self._lock = threading.Lock()
        #: (repository, digest) -> the URL on another host that the last Range GET of that blob was
        #: redirected to (a signed storage URL): later ranges go there directly until it stops answering
        self._blob_urls: dict[tuple[str, str], str] = {}

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
                    ch = self.auth.learn(r)
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
                    read_answer(r, MAX_ANSWER, timeout=self.options.timeout, what=what or method,
                                registry=self.registry)
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

    def _send(self, method: str, url: str, *, scope: str | None, headers: Mapping[str, str] | None,
              refresh: bool, data: bytes | None = None,
              extra_scope: str | None = None) -> requests.Response:
        hdrs = dict(headers or {})
        auth = self.auth.header(scope, refresh=refresh, extra_scope=extra_scope)
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(hdrs)
            if auth and urlsplit(url)[:2] == origin:     # never to another host, nor over a downgraded scheme
                send["Authorization"] = auth
            # always streamed: no body is read unbounded (see read_answer)
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
            body = read_answer(r, 65536, timeout=self.options.timeout, what=what or "error answer",
                               registry=self.registry, cut=True)
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
            creds = self.auth.credentials()
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
            self.auth.learn(r)
            r.close()
            creds = self.auth.credentials()
            if self.auth.challenge and self.auth.challenge.scheme == "bearer":
                self.auth.fetch_token(self.auth.challenge, None)
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
