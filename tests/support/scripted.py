"""Scripted HTTP answers (any status, headers and body, slowly if asked: a lying server) and
:class:`ScriptedServer`, another host that answers every request with a script and records what it was
sent.  :class:`ProxiedRequest` is the record of one request, here and in :mod:`faultproxy`."""
from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterable, Mapping, Sequence

from localnet import ServedInThread


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


def send_scripted(handler: BaseHTTPRequestHandler, answer: Scripted, rec: ProxiedRequest,
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


class ScriptedServer(ServedInThread):
    """Another host: an HTTP server on *bind* (default 127.0.0.2, so that a client sees another
    host than the registry's 127.0.0.1) that answers every request with *answer* (a
    :class:`Scripted`, or a function of the :class:`ProxiedRequest` returning one) and records
    every request, headers included, in ``requests``."""

    what = "scripted server"

    def __init__(self, answer: "Scripted | Callable[[ProxiedRequest], Scripted]", *, bind: str = "127.0.0.2"):
        self.answer = answer
        self.bind = bind
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> "ScriptedServer":
        self._stopping.clear()
        self.serve(_make_scripted_handler(self), "scripted-server")
        return self

    def stop(self) -> None:
        self._stopping.set()
        super().stop()



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
            send_scripted(self, answer, rec, server._stopping)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    return Handler
