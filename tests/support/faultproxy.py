"""A fault-injecting HTTP proxy between a client and a registry: it cuts, throttles, fails, delays, drops
or answers chosen requests itself (with :class:`scripted.Scripted` answers: a lying registry), revokes
tokens, emulates the referrers API and redirects blob GETs to a :class:`signedurl.SignedURLServer`."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from localnet import ServedInThread
from registryclient import parse_challenge
from scripted import ProxiedRequest, Scripted, send_scripted

if TYPE_CHECKING:
    from signedurl import SignedURLServer


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


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, proxy: "FaultProxy"):
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

    def server_close(self) -> None:
        super().server_close()
        self.close_all()

    def close_all(self, timeout: float = 5.0) -> None:
        with self._conn_lock:
            conns, threads = list(self._conns), list(self._conn_threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class FaultProxy(ServedInThread):
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

    what = "proxy"

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

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "FaultProxy":
        if not self.serving:
            self._stopping.clear()
            self.serve(_make_proxy_handler(self), "fault-proxy", server_class=_ProxyServer, proxy=self)
        return self

    def stop(self) -> None:
        self._stopping.set()
        super().stop()

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
                send_scripted(self, answer, rec, proxy._stopping)
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
