"""HTTP transport for the registry package: the one place that holds a ``requests`` session.

- :class:`Transport`: one registry's session (connection pool, TLS verification, User-Agent),
  :meth:`Transport.send` for one HTTP exchange, and the retry policy: which failures are
  retried (a :class:`RegistryError` that is :attr:`~RegistryError.temporary`: connection
  failures, 429, 5xx), the backoff (exponential with jitter, capped; a ``Retry-After`` is
  honoured up to a minute) and the attempt budget (``options.max_retries``).
  :meth:`Transport.retrying` runs one logical operation under that policy; retries never nest:
  inside another :meth:`~Transport.retrying` on the same thread an operation runs once and its
  failure counts against the outer budget.
- The mapping of ``requests``/``urllib3``/socket exceptions to the :mod:`layerfs.errors` tree
  (:func:`network_error`); nothing outside this package sees those exceptions. Blob bodies
  (:class:`BlobResponse`) raise :class:`RegistryUnreachable` when their connection breaks.
- Pacing of bodies: a blob body that brings less than :data:`MIN_RATE` bytes a second over a
  whole timeout is a broken connection, a document must arrive within twice the timeout
  (:class:`Pace`).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3

from layerfs import __version__
from layerfs.errors import RegistryError, RegistryUnreachable
from layerfs.registry.options import RegistryOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = f"layerfs/{__version__}"
#: a blob body slower than this (bytes per second, over each ``timeout`` window) is given up as broken
MIN_RATE = 1024
#: the most an answer read whole may hold (token, ping, upload answers); manifests: MAX_MANIFEST_SIZE
MAX_ANSWER = 1 << 20
#: bytes read from a body at a time
CHUNK = 1 << 20
#: the longest wait a ``Retry-After`` may ask for
MAX_RETRY_AFTER = 60.0

#: what a request or a body read raises when the connection fails (mapped by :func:`network_error`)
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

SLOW_HINT = "the registry or the network is too slow; try again later, or allow more time with LAYERFS_TIMEOUT"
TLS_HINT = "set LAYERFS_CA_BUNDLE, or use --insecure-registry for a registry you trust"


def exc_line(e: BaseException) -> str:
    """A one-line, human description of a requests/urllib3/socket exception."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "Temporary failure in name resolution", "No route to host", "certificate verify failed",
                   "IncompleteRead", "Connection broken", "Remote end closed connection", "Network is unreachable"):
        if marker in text:
            return marker.lower() if marker[0].isupper() and marker != "IncompleteRead" else marker
    return text.split("\n")[0][:200]


def network_error(e: BaseException, what: str, *, registry: str) -> RegistryError:
    """The layerfs error for a failed connection (one of :data:`NETWORK_ERRORS`), as ``what: detail``:
    a TLS failure is a :class:`RegistryError` with a hint (retrying will not help), anything else
    :class:`RegistryUnreachable` (temporary)."""
    if isinstance(e, requests.exceptions.SSLError):
        return RegistryError(f"{what}: TLS error: {exc_line(e)}", registry=registry, hint=TLS_HINT)
    return RegistryUnreachable(f"{what}: {exc_line(e)}", registry=registry)


class Pace:
    """Gives up a body that comes too slowly (a trickle keeps every single read under the timeout):
    one that brings under :data:`MIN_RATE` bytes a second over a whole *window*, or, with a
    *deadline* (seconds), one that is not complete by then. Raises :class:`RegistryUnreachable`."""

    def __init__(self, window: float, *, what: str, registry: str, deadline: float | None = None):
        self.window = window
        self.what = what
        self.registry = registry
        self.started = self.mark = time.monotonic()
        self.deadline = None if deadline is None else self.started + deadline
        self.count = 0

    def tick(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise RegistryUnreachable(f"{self.what}: the registry sent only {self.count} bytes in "
                                      f"{now - self.started:.0f}s", registry=self.registry, hint=SLOW_HINT)
        if now - self.mark >= self.window:
            if self.count < MIN_RATE * (now - self.mark):
                raise RegistryUnreachable(f"{self.what}: the registry sends under {MIN_RATE} bytes/s "
                                          f"({self.count} bytes in {now - self.mark:.0f}s)", registry=self.registry,
                                          hint=SLOW_HINT)
            self.mark, self.count = now, 0


def read_some(raw, size: int, pace: Pace, *, decode: bool = False, failed: str = "connection failed") -> bytes:
    """Up to *size* bytes of a body (fewer only at its end), read as they come so *pace* can judge.
    A connection that fails before any byte is :class:`RegistryUnreachable` (``<pace.what>: <failed>:
    detail``); the bytes before a failure are returned, and the next read meets it again."""
    pieces = []
    got = 0
    try:
        while got < size:
            b = raw.read1(size - got, decode_content=decode)
            if not b:
                break
            pieces.append(b)
            got += len(b)
            pace.tick(len(b))
    except NETWORK_ERRORS as e:
        if not pieces:
            raise network_error(e, f"{pace.what}: {failed}", registry=pace.registry) from None
        # the bytes before the break are good (a resume starts after them); the next read meets it again
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def read_document(r: requests.Response, limit: int, *, timeout: float, what: str, registry: str) -> bytes:
    """Up to *limit* + 1 bytes of a streamed answer that is read whole (a document, an error or token
    answer), decoded, within twice *timeout* (:class:`Pace`); the caller judges more than *limit*.
    A connection that fails is :class:`RegistryUnreachable`."""
    if r.raw is None:
        return b""
    pace = Pace(timeout, what=what, registry=registry, deadline=2 * timeout)
    return read_some(r.raw, limit + 1, pace, decode=True)


def read_answer(r: requests.Response, limit: int, *, timeout: float, what: str, registry: str,
                cut: bool = False) -> bytes:
    """The body of a streamed answer read whole (:func:`read_document`), kept as the answer's content
    (``r.json()`` works; a second call returns it again). More than *limit* bytes is a
    :class:`RegistryError`, or with *cut* the first *limit* bytes."""
    if r._content is not False:          # read already
        return r.content
    data = read_document(r, limit, timeout=timeout, what=what, registry=registry)
    if len(data) > limit:
        if not cut:
            raise RegistryError(f"{what}: the answer is too large (over {limit} bytes)", registry=registry)
        data = data[:limit]
    r._content, r._content_consumed = data, True
    return data


@dataclass
class BlobResponse:
    """An open blob body; iterate :meth:`chunks`, then :meth:`close`."""

    response: requests.Response
    start: int            # offset of the first byte of the body in the blob
    total: int | None
    pace: Pace            # judges the body's pace as it is read
    size: int             # the blob's size (for messages)

    def __post_init__(self) -> None:
        #: offset in the blob of the next byte :meth:`chunks` yields
        self.offset = self.start

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The body, *size* bytes at a time; a connection that breaks is :class:`RegistryUnreachable`
        (``connection lost after N of SIZE bytes``), a body too slow too (:class:`Pace`)."""
        raw = self.response.raw
        while True:
            b = read_some(raw, size, self.pace, failed=f"connection lost after {self.offset} of {self.size} bytes")
            if not b:
                return
            self.offset += len(b)
            yield b

    def close(self) -> None:
        self.response.close()


#: per thread: whether a :meth:`Transport.retrying` operation is running (retries never nest)
_scope = threading.local()


class Transport:
    """One registry's HTTP session and the retry policy of its client."""

    def __init__(self, registry: str, options: RegistryOptions, *, local: bool, insecure: bool):
        self.registry = registry
        self.options = options
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = USER_AGENT
        session.trust_env = not local
        if options.ca_bundle:
            session.verify = options.ca_bundle
        if insecure:   # HTTPS without verification (or plain HTTP): a registry named insecure
            session.verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.session = session

    def send(self, method: str, url: str, *, headers: Mapping[str, str] | None = None, data: bytes | None = None,
             what: str | None = None, timeout: float | None = None, **kw) -> requests.Response:
        """One HTTP exchange, its body streamed (read it with :func:`read_document` or a
        :class:`BlobResponse`), redirects not followed. A failed connection raises
        :func:`network_error` (``what``, by default ``cannot reach <host>``)."""
        try:
            kw.setdefault("verify", self.session.verify)
            return self.session.request(method, url, headers=dict(headers or {}), data=data, stream=True,
                                        allow_redirects=False, timeout=timeout or self.options.timeout, **kw)
        except NETWORK_ERRORS as e:
            raise network_error(e, what or f"cannot reach {urlsplit(url).netloc}", registry=self.registry) from None

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number *attempt* (from 0): the server's ``Retry-After`` (at most
        :data:`MAX_RETRY_AFTER`), else exponential backoff from ``options.backoff_base`` up to
        ``options.backoff_cap``, with jitter (half to all of it)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        d = min(self.options.backoff_cap, self.options.backoff_base * (2 ** attempt))
        return d * (0.5 + random.random() / 2)

    def retrying(self, operation: Callable[[], T], *, retries: int | None = None, again: str = "retrying") -> T:
        """*operation*'s result, calling it again after a temporary :class:`RegistryError`, up to
        *retries* times (``options.max_retries`` by default) with :meth:`delay` between; the last
        error is raised. *again* says in the log what a retry does. Inside another
        :meth:`retrying` on this thread, *operation* runs once: the outer call owns the budget."""
        if getattr(_scope, "active", False):
            return operation()
        budget = self.options.max_retries if retries is None else retries
        _scope.active = True
        try:
            attempt = 0
            while True:
                try:
                    return operation()
                except RegistryError as e:
                    if not e.temporary or attempt >= budget:
                        raise
                    delay = self.delay(attempt, e.retry_after)
                    log.info("%s: %s; %s in %.1fs", self.registry, e.message, again, delay)
                time.sleep(delay)
                attempt += 1
        finally:
            _scope.active = False


def get_document(url: str, *, params: Mapping[str, str | int] | None = None, options: RegistryOptions,
                 what: str, limit: int = MAX_ANSWER) -> bytes:
    """The body of a GET of a small document outside the distribution API (Docker Hub's search):
    read as it comes, at most *limit* bytes, within twice the timeout; redirects are not followed.
    Raises :class:`RegistryUnreachable` or :class:`RegistryError` naming the host."""
    host = urlsplit(url).netloc
    try:
        with requests.Session() as session:
            r = session.get(url, params=params, timeout=options.timeout, headers={"User-Agent": USER_AGENT},
                            verify=options.ca_bundle or True, allow_redirects=False, stream=True)
            try:
                if r.status_code != 200:
                    raise RegistryError(f"{what} failed: HTTP {r.status_code}", registry=host, status=r.status_code)
                data = read_document(r, limit, timeout=options.timeout, what=f"{what} failed", registry=host)
            finally:
                r.close()
    except NETWORK_ERRORS as e:
        raise network_error(e, f"{what} failed: cannot reach {host}", registry=host) from None
    if len(data) > limit:
        raise RegistryError(f"{what} failed: the answer is too large (over {limit} bytes)", registry=host)
    return data
