"""Background fetch of lazy layers (``layerfs mount --lazy --prefetch MODE``).

A reader that takes part offers ``prefetch_pieces(mode)`` (what is still to fetch), ``prefetch(piece)``
and ``last_demand`` (when a read last fetched); :class:`Prefetcher` works through them."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref

from layerfs.lazy.remote import LazyReadError

log = logging.getLogger(__name__)

__all__ = ["PREFETCH_MODES", "PREFETCH_YIELD", "Prefetcher"]

#: background fetch of a lazy mount: nothing, the files before an eStargz layer's ``.prefetch.landmark``, all
PREFETCH_MODES = ("none", "landmark", "all")
#: the background fetch pauses while reads have fetched something within this many seconds
PREFETCH_YIELD = 0.5


class Prefetcher:
    """Fetches the pieces of lazy layers in the background, at low priority: one at a time, in a thread
    of its own (niced), pausing while reads fetch (within :data:`PREFETCH_YIELD` s). It runs in the mount
    daemon: :meth:`arm` before the daemon is forked starts it there (after a short delay), and only there."""

    def __init__(self, readers: list, mode: str):
        self.readers = [r for r in readers if hasattr(r, "prefetch_pieces")]
        self.mode = mode
        self.done = threading.Event()
        self.errors = 0

    def arm(self) -> None:
        global _AT_FORK
        if not _AT_FORK:
            os.register_at_fork(after_in_child=_start_armed)
            _AT_FORK = True
        _ARMED.add(self)

    def disarm(self) -> None:
        _ARMED.discard(self)

    def start(self, delay: float = 0.0) -> None:
        self.done.clear()
        threading.Thread(target=self._run, args=(delay,), name="layerfs-prefetch", daemon=True).start()

    def _run(self, delay: float) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        if delay:
            time.sleep(delay)
        try:
            for r in self.readers:
                todo = r.prefetch_pieces(self.mode)
                if todo:
                    log.info("prefetch: layer %s, %d pieces", r.desc.digest.short, len(todo))
                for piece in todo:
                    while time.monotonic() - r.last_demand < PREFETCH_YIELD:
                        time.sleep(PREFETCH_YIELD)
                    try:
                        r.prefetch(piece)
                    except LazyReadError as e:
                        self.errors += 1
                        log.info("prefetch: %s", e.message)
                        time.sleep(min(30.0, 0.5 * 2 ** min(self.errors, 6)))
                    except Exception as e:  # never let the background fetch take the daemon down
                        log.warning("prefetch stopped: %s: %s", type(e).__name__, e)
                        return
            log.info("prefetch (%s) done", self.mode)
        finally:
            self.done.set()


_ARMED: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()
_AT_FORK = False


def _start_armed() -> None:
    # in a forked child: the mount daemon to be (or the short-lived process that forks it, which exits
    # before the delay is over)
    for p in list(_ARMED):
        p.start(delay=0.5)
