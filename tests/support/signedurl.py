"""Blob storage behind a registry's redirects, as S3/GCS-backed registries have: signed URLs that
expire, served from another port (another host to the client)."""
from __future__ import annotations

import http.client
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, Mapping

from localnet import ServedInThread


class SignedURLServer(ServedInThread):
    """Blob storage behind a registry's redirects (as S3/GCS-backed registries do): ``sign()`` makes a
    URL of this server (another port: another host to the client) for one blob of the registry at
    *target_host*, and the server answers GETs of it, ``Range`` included, from the registry with the
    credential the signed request was made with.  Signed URLs expire: after ``max_uses`` uses (None:
    never), all at once with ``expire_all()``, or at once when issued while ``dead_on_arrival`` > 0;
    an expired one answers 403 with an S3-style XML error.  ``requests`` records (path, headers, status).
    """

    what = "signed URL server"

    def __init__(self, target_host: str, *, max_uses: int | None = None):
        self.target_host = target_host
        self.max_uses = max_uses
        self.dead_on_arrival = 0
        self._lock = threading.Lock()
        self._urls: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, dict[str, str], int]] = []

    def start(self) -> "SignedURLServer":
        self.serve(_make_signed_handler(self), "signed-url-server")
        return self

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
