"""What running lazy servers use, and the pruning of lazy caches no one uses.

A process that serves lazy readers (a lazy mount's daemon, the engine layer store) keeps a
status file, ``ROOT/lazy/mounts/<pid>.json``: its mount point, its layers (digest, kind, cache
directory, pieces) and the stored blobs it reads that no image may tag. ``layerfs mounts`` shows
from it how much of each layer is cached (:func:`lazy_status`); ``layerfs prune`` and ``rmi`` keep
what live servers use (:func:`served_blobs`, :func:`prune_lazy`). A status file whose process is
gone counts for nothing and is dropped when met."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Protocol

from layerfs.errors import LayerfsError
from layerfs.image import Digest
from layerfs.lazy.cachedir import cached_chunks, cached_spans, lazy_root, status_dir, status_path
from layerfs.libc import pid_alive
from layerfs.store import Store, atomic_write

__all__ = ["MountedAt", "drop_lazy_status", "forget_stale_status", "lazy_status", "note_lazy_readers",
           "prune_lazy", "served_blobs"]

#: what a status file's content may be when it is not what this module wrote
_BAD_DOC = (OSError, ValueError, TypeError, KeyError, AttributeError, LayerfsError)


class MountedAt(Protocol):
    """Where a process serves (a :class:`layerfs.mount.MountRecord` is one)."""
    mountpoint: str | os.PathLike[str]
    pid: int


def note_lazy_readers(store: Store, mountpoint: str | os.PathLike[str], pid: int, readers: list, blobs=(), *,
                      prefetch: str = "none") -> None:
    """Record that process *pid* serves *readers* at *mountpoint* (a lazy mount, or a file system of another
    kind, e.g. the layer store) and reads the stored *blobs* (digests) that no image may tag: ``layerfs
    prune`` and ``rmi`` keep both while it runs (:func:`served_blobs`) and ``layerfs mounts`` shows the
    readers (those with no ``status_entry``, layers pulled whole, count as fully cached)."""
    layers = [r.status_entry() if hasattr(r, "status_entry") else {"kind": "pulled"} for r in readers]
    doc = {"mountpoint": str(mountpoint), "pid": pid, "prefetch": prefetch, "layers": layers}
    if blobs:
        doc["blobs"] = [str(d) for d in blobs]
    with contextlib.suppress(OSError, LayerfsError):
        atomic_write(status_path(store, pid), json.dumps(doc).encode())


def drop_lazy_status(store: Store, pid: int) -> None:
    """Forget the status file of process *pid* (written by :func:`note_lazy_readers`)."""
    with contextlib.suppress(OSError):
        status_path(store, pid).unlink()


def _live_status_files(store: Store) -> list[Path]:
    """The status files of running processes; those of processes that are gone are deleted."""
    try:
        files = [p for p in status_dir(store).iterdir() if p.suffix == ".json" and p.stem.isdigit()]
    except OSError:
        return []
    live = []
    for p in files:
        if pid_alive(int(p.stem)):
            live.append(p)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return live


def _live_status(store: Store) -> Iterator[dict]:
    """The status documents of running processes (unreadable ones skipped)."""
    for p in _live_status_files(store):
        try:
            doc = json.loads(p.read_bytes())
        except _BAD_DOC:
            continue
        if isinstance(doc, dict):
            yield doc


def forget_stale_status(store: Store) -> None:
    """Drop the status files of lazy mounts whose process is gone."""
    _live_status_files(store)


def served_blobs(store: Store) -> set[Digest]:
    """The stored blobs running servers read without an image tagging them (see :func:`note_lazy_readers`)."""
    out: set[Digest] = set()
    for doc in _live_status(store):
        with contextlib.suppress(*_BAD_DOC):
            out.update(Digest.parse(d) for d in doc.get("blobs", ()))
    return out


def _cached_fraction(layer: dict) -> float:
    """How much of one layer of a status file is in its cache (1.0 for a layer pulled whole)."""
    kind, n = layer.get("kind"), int(layer.get("pieces") or 0)
    if kind == "gzip":
        have = cached_spans(Path(layer["dir"]))
    elif kind == "estargz":
        have = len(cached_chunks(Path(layer["dir"]), layer.get("toc")))
    else:
        return 1.0
    return min(1.0, have / n) if n else 1.0


def lazy_status(store: Store, record: MountedAt) -> list[float] | None:
    """Per layer, the fraction of a lazy mount's data in the local cache (1.0 for layers pulled whole);
    None when *record* is not a lazy mount."""
    try:
        doc = json.loads(status_path(store, record.pid).read_bytes())
        if doc.get("mountpoint") != str(record.mountpoint):
            return None
        return [_cached_fraction(layer) for layer in doc["layers"]]
    except _BAD_DOC:
        return None


def prune_lazy(store: Store) -> tuple[int, int]:
    """Delete the lazy caches (``ROOT/lazy/<alg>-<hex>``) of layers that neither an image of the store nor
    a running lazy mount uses. Returns (caches removed, bytes freed)."""
    base = lazy_root(store)
    if not base.is_dir():
        return 0, 0
    removed = freed = 0
    with store.lock("gc"):          # lazy mounts being set up hold it shared
        keep = {f"{d.algorithm}-{d.hex}" for d in store.referenced_blobs()}
        for doc in _live_status(store):
            with contextlib.suppress(*_BAD_DOC):
                for layer in doc["layers"]:
                    if layer.get("digest"):
                        d = Digest.parse(layer["digest"])
                        keep.add(f"{d.algorithm}-{d.hex}")
        for d in base.iterdir():
            if d == status_dir(store) or d.name in keep or not d.is_dir() or "-" not in d.name:
                continue
            size = 0
            for f in d.rglob("*"):
                with contextlib.suppress(OSError):
                    if f.is_file():
                        size += f.stat().st_blocks * 512
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            freed += size
    return removed, freed
