"""Range reads of remote blobs for lazy readers.

A lazy reader runs in the process that serves the mount (the mount daemon is forked from the process
that opened the image), so it reaches the registry through :func:`client_per_process`: a client made
in the calling process. :class:`RemoteBlob` reads byte ranges of one blob with it; a read that fails
raises :class:`LazyReadError` (EIO for that read; the mount goes on)."""
from __future__ import annotations

import errno
import os
import threading
from typing import Callable

from layerfs.errors import ContentError, LayerfsError
from layerfs.image import Descriptor
from layerfs.registry import ClientPool, RegistryClient, RegistryOptions

__all__ = ["READ_RETRIES", "LazyReadError", "RemoteBlob", "client_per_process"]

#: retries of one Range read (each with the client's backoff) before the read fails
READ_RETRIES = 1


class LazyReadError(ContentError):
    """A lazy read could not be served (fetch failed or did not verify): EIO for that read."""
    errno = errno.EIO


def client_per_process(registry: str, options: RegistryOptions | None) -> Callable[[], RegistryClient]:
    """A callable giving the registry client of *registry* for the process that calls it (made on its
    first call there: a forked mount daemon does not share its parent's connections)."""
    state: dict = {}

    def client() -> RegistryClient:
        if state.get("pid") != os.getpid():
            state["pid"] = os.getpid()
            state["client"] = ClientPool(options)(registry)
        return state["client"]
    return client


class RemoteBlob:
    """One blob of a repository, read by Range through ``client()``; counts the bytes it fetched."""

    def __init__(self, client: Callable[[], RegistryClient], repository: str, desc: Descriptor):
        self.client = client
        self.repository = repository
        self.desc = desc
        self.fetched_bytes = 0
        self._lock = threading.Lock()

    def read(self, start: int, end: int, where: str) -> bytes:
        """Bytes [*start*, *end*) of the blob, unverified (the caller checks them); a failure raises
        :class:`LazyReadError` naming *where*."""
        try:
            raw = self.client().read_range(self.repository, self.desc, start, end, retries=READ_RETRIES)
        except LayerfsError as e:
            raise LazyReadError(f"{where}: fetching bytes {start}-{end} failed: {e.message}") from None
        with self._lock:
            self.fetched_bytes += len(raw)
        return raw
