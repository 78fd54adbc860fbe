"""Loopback networking for test servers: a free port, a requests session that ignores proxy settings,
and :class:`ServedInThread`, the base of every HTTP server a test runs in a thread."""
from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

import requests

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def new_session() -> requests.Session:
    """A requests session that ignores proxy settings from the environment."""
    s = requests.Session()
    s.trust_env = False
    return s


class ServedInThread:
    """A ThreadingHTTPServer on 127.0.0.1 (or ``bind``) served from a daemon thread: ``start()`` (the
    subclass's, calling :meth:`serve`), ``stop()``, and ``with`` for both; ``port``, ``host`` and ``url``
    once started."""

    #: what the server is called in errors
    what = "server"
    #: the address it listens on
    bind = LOCALHOST
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def serve(self, handler: type, name: str, *,
              server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer, **server_args: Any) -> None:
        """Serve *handler* on a free port of ``bind`` from a thread called *name* (with *server_class*,
        given *server_args*, for a server of its own)."""
        server = server_class((self.bind, 0), handler, **server_args)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=name, daemon=True)
        self._thread.start()

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.what} is not running")
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ServedInThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
