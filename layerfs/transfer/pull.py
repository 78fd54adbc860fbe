"""Pull: reference → registry → verified blobs in the store, tagged.

Layers download in parallel; each one streams through a single pass that
writes the partial file, hashes the compressed bytes (the blob digest) and
decompresses them to hash the uncompressed tar (the ``diff_id``) and learn
its size. A download cut short resumes with ``Range`` from what is on disk.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

from layerfs import libc
from layerfs.errors import (
    ContentError,
    DigestMismatch,
    ForeignLayerError,
    ManifestError,
    PlatformNotFound,
    RegistryError,
    RegistryUnreachable,
    SizeMismatch,
    TarError,
    UnsupportedMediaType,
)
from layerfs.image import (
    CONFIG_TYPES,
    FOREIGN_LAYER_TYPES,
    LAYER_COMPRESSION,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    Reference,
    check_named,
    docker_to_oci,
    iter_layer_compression,
)
from layerfs.index import (CompressedDataError, LayerIndex, LayerIndexer, index_path, layer_facts_from_blob,
    max_layer_size)
from layerfs.registry import MAX_MANIFEST_SIZE, ClientPool, RegistryClient, RegistryOptions
from layerfs.store import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, Ingest, Store, store_error

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the most layers an image may have (container engines stop near 128; kernel overlayfs stacks at most 500)
MAX_LAYERS = 1000


@dataclass(frozen=True, kw_only=True)
class PullOptions:
    platform: Platform | None = None
    max_concurrent_downloads: int = 6   # as skopeo and podman (containers/image); docker's daemon uses 3
    registry: RegistryOptions | None = None
    max_layer_size: int | None = None   # most a layer may inflate to (None: see layerfs.index.max_layer_size)


class ProgressSink(Protocol):
    def __call__(self, layer: str, status: str, current: int | None = None, total: int | None = None) -> None: ...


def no_progress(layer: str, status: str, current: int | None = None, total: int | None = None) -> None:
    pass


def run_all(calls: list[Callable[[], T]], workers: int) -> list[T]:
    """The results of *calls*, run on up to *workers* threads (the blobs of a pull or a push); every
    call finishes before the first failure (in the order of *calls*) is raised."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(call) for call in calls]
        failures = [e for e in (f.exception() for f in futures) if e is not None]
    if failures:
        raise failures[0]
    return [f.result() for f in futures]


@dataclass
class PullResult:
    reference: Reference
    name: str                       # the name tagged in the store
    manifest: Manifest
    repo_digest: Digest             # what `Digest:` prints (index digest for a multi-platform image)
    config: ImageConfig
    updated: bool                   # False: "Image is up to date"
    downloaded_layers: int = 0


# --- the streaming pass ----------------------------------------------------------

_WRITEBACK_STEP = 8 << 20
_DIFF_ID_HINT = "the image config does not describe these layers; ask the image's publisher to fix it"


def check_diff_id(desc: Descriptor, got: Digest | str | None, want: Digest, *, where: str | None,
                  hint: str = _DIFF_ID_HINT) -> None:
    """Layer *desc* is *got* uncompressed: :class:`DigestMismatch` unless that is the image config's *want*."""
    if str(got) != str(want):
        raise DigestMismatch(f"layer {desc.digest.short}: uncompressed content is {got}, the image config says "
                             f"{want}", where=where, hint=hint)


def _sync_file_range(fd: int, offset: int, length: int) -> None:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start write-back of a range, do not wait.
    A hint only: where it is missing or fails, the final fsync does all the work."""
    f = libc.function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
    if f is not None:
        f(fd, offset, length, 2)   # SYNC_FILE_RANGE_WRITE


@contextlib.contextmanager
def _big_buffers_reused() -> Iterator[None]:
    """Keep freed multi-MiB buffers in the malloc heap while a pull runs.

    A pull allocates and frees a few MiB per chunk (network chunks, inflated
    pieces). glibc serves those with fresh mmaps (and returns trimmed heap
    tops) by default, so every page of them is faulted in and zeroed again:
    about 60k page faults and a tenth of a pull's CPU for 300 MB. Raised
    thresholds let freed buffers be reused; the defaults come back after,
    and the heap is trimmed. At most two malloc arenas serve the pull's threads
    (each thread's own arena kept its own freed buffers: some 20 MB more at peak)."""
    mallopt = libc.function("mallopt", (ctypes.c_int, ctypes.c_int))
    trim = libc.function("malloc_trim", (ctypes.c_size_t,))
    if mallopt is None or trim is None:     # not glibc
        yield
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
    mallopt(M_ARENA_MAX, 2)
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
    mallopt(M_TOP_PAD, 64 << 20)
    try:
        yield
    finally:
        mallopt(M_TOP_PAD, 0)
        mallopt(M_TRIM_THRESHOLD, 128 << 10)
        mallopt(M_MMAP_THRESHOLD, 128 << 10)
        trim(0)


class _Feeder:
    """Feeds a :class:`LayerIndexer` from its own thread behind a small bounded queue.

    The download thread then only receives, writes and hashes the compressed
    bytes, while inflating (C, without the GIL) runs on the other core: one
    big layer no longer bounds the pull to one core. A content error is
    kept (the digest judges first) and later chunks are dropped."""

    _STOP = object()

    def __init__(self, indexer: LayerIndexer):
        self.indexer = indexer
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(8)
        self._thread = threading.Thread(target=self._run, name="layer-inflate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._q.get()
            if chunk is _Feeder._STOP:
                return
            if self.error is None:
                try:
                    self.indexer.feed(chunk)
                except BaseException as e:   # noqa: BLE001 - reported by join()
                    self.error = e

    def feed(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def join(self) -> BaseException | None:
        """Wait until every chunk fed is consumed; the first error, if any."""
        if self._thread.is_alive():
            self._q.put(_Feeder._STOP)
            self._thread.join()
        return self.error


class LayerWriter:
    """The one streaming pass of a layer blob into the store, shared by pull and local imports.

    Each chunk is written to the blob's partial file in ``ingest/``, hashed
    (the blob digest) and fed to a :class:`LayerIndexer` (diff_id, size, TOC
    and checkpoints). :meth:`commit` verifies digest and size and publishes
    the blob (a bad one is discarded, never stored); :meth:`record` saves the
    layer index and the layer's facts (``layer_info``), checking the diff_id
    the image config expects. A tar stream that is broken is judged only
    after the digest: a blob that does not match is a transfer problem, one
    that matches but is not a valid layer is the source's own fault.
    """

    def __init__(self, store: Store, desc: Descriptor, ing: Ingest, *, compression: str | None = None,
                 where: str | None = None, max_size: int | None = None):
        self.store = store
        self.max_size = max_layer_size(desc.size, max_size)
        self.desc = desc
        self.ing = ing
        self.compression = compression if compression is not None else LAYER_COMPRESSION.get(desc.media_type)
        self.where = where or f"layer {desc.digest.short}"
        self.offset = 0
        self.content_error: TarError | ContentError | None = None
        self._file = None
        self.hasher = None
        self.indexer: LayerIndexer | None = None
        self._feeder: _Feeder | None = None

    def start(self, offset: int = 0) -> None:
        """(Re)start at *offset*: bytes already in the partial file are hashed and indexed first (resume)."""
        self._stop_indexer()
        self.content_error = None
        self.hasher = self.desc.digest.hasher()
        self.indexer = LayerIndexer(self.compression, where=f"layer {self.desc.digest.short}",
                                    digest=self.desc.digest, max_size=self.max_size,
                                    spool_dir=self.ing.path.parent)
        self._feeder = _Feeder(self.indexer)
        if offset:
            self.ing.hash_existing(_Tee(self.hasher, self._feeder), offset)
        if self._file is not None:
            self._file.close()
        self._file = self.ing.open(offset)
        self.offset = self._flushed = offset

    def feed(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.desc.size:
            raise SizeMismatch(f"blob {self.desc.digest.short} is larger than its declared {self.desc.size} bytes",
                               where=self.where)
        self._file.write(chunk)
        self.hasher.update(chunk)
        self._feeder.feed(chunk)
        self.offset += len(chunk)
        if self.offset - self._flushed >= _WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the kernel start writing what was written so far (without waiting), so the
        fsync that publishes the blob finds little left to write."""
        self._file.flush()
        _sync_file_range(self._file.fileno(), self._flushed, self.offset - self._flushed)
        self._flushed = self.offset

    def flush(self) -> None:
        self._file.flush()

    def commit(self) -> LayerIndex:
        """Verify the blob (digest, size, then its content) and move it into ``blobs/``."""
        got = self.hasher.hexdigest()
        index = None
        err = self._feeder.join()
        if err is not None:
            if not isinstance(err, (TarError, ContentError)):
                self.indexer.close()
                raise err
            self.content_error = err       # judged after the digest
        if got == self.desc.digest.hex:
            try:
                if self.content_error is None:
                    index = self.indexer.finish()
            except (TarError, ContentError) as e:
                self.content_error = e
            if self.content_error is not None:   # the source's blob itself is broken: keep nothing
                self.ing.discard()
                e = self.content_error
                if isinstance(e, CompressedDataError):   # its hint is for a stored blob
                    e.hint = "the blob matches its digest: the image itself is damaged"
                if self.where not in (e.where or ""):
                    e.where = f"{self.where}: {e.where}" if e.where else self.where
                raise e
        else:
            self.indexer.close()
        try:
            self.ing.commit(got)
        except OSError as e:
            self.ing.discard()
            raise store_error(e, f"blob {self.desc.digest}") from None
        except DigestMismatch as e:
            e.where = self.where
            raise
        assert index is not None
        return index

    def record(self, index: LayerIndex, diff_id: Digest | None = None) -> dict:
        """Save the layer index and the layer's facts; check the diff_id the image config expects."""
        index.save(index_path(self.store, self.desc.digest))
        if diff_id is not None:
            check_diff_id(self.desc, index.diff_id, diff_id, where=self.where)
        info = {"diff_id": str(index.diff_id), "size": index.size, "media_type": self.desc.media_type}
        self.store.set_layer_info(self.desc.digest, info)
        return info

    def stop_threads(self) -> None:
        """Stop the indexing threads (idempotent); the partial file stays for a later resume."""
        self._stop_indexer()

    def _stop_indexer(self) -> None:
        if self._feeder is not None:
            self._feeder.join()
            self._feeder = None
        if self.indexer is not None:
            self.indexer.close()

    def abandon(self) -> None:
        """Give up: stop the indexer and delete the partial file."""
        self._stop_indexer()
        self.ing.discard()


def ingest_layer(store: Store, desc: Descriptor, chunks: Iterable[bytes], *, diff_id: Digest | None = None,
                 where: str | None = None, max_size: int | None = None) -> dict | None:
    """Stream one layer blob from a local source into the store through :class:`LayerWriter`.

    The caller holds the store's ``gc`` lock (shared). Returns the layer's
    facts, or None when the blob was in the store already (the stream is
    then left unread). Nothing is resumed and nothing stays behind on
    failure: the partial file is deleted, a bad blob is never stored.
    """
    with store.ingest(desc.digest, desc.size) as ing:
        if store.has_blob(desc.digest, desc.size):
            return None
        w = LayerWriter(store, desc, ing, where=where, max_size=max_size)
        try:
            w.start(0)
            for chunk in chunks:
                w.feed(chunk)
            if w.offset != desc.size:
                raise SizeMismatch(f"blob {desc.digest.short} has {w.offset} bytes, expected {desc.size}",
                                   where=w.where)
            index = w.commit()
        except OSError as e:
            w.abandon()
            raise store_error(e, f"blob {desc.digest}") from None
        except BaseException:
            w.abandon()
            raise
        return w.record(index, diff_id)


# --- pulling ---------------------------------------------------------------------

class Puller:
    def __init__(self, store: Store, options: PullOptions | None = None, progress: ProgressSink | None = None):
        self.store = store
        self.options = options or PullOptions()
        self.progress = progress or no_progress
        self.client = ClientPool(self.options.registry)

    def resolve(self, ref: Reference) -> tuple[Manifest, Index | None]:
        """Fetch the manifest for *ref*, choosing the platform from an index."""
        client = self.client(ref.registry)
        m = client.get_manifest(ref.repository, ref.identifier)
        index = None
        if isinstance(m, Index):
            index = m
            want = self.options.platform or Platform.host()
            desc = m.select(want)
            if desc is None:
                avail = ", ".join(sorted({str(p) for p in m.platforms()})) or "none"
                raise PlatformNotFound(f"no image for platform {want} in {ref.familiar()}",
                                       where=ref.registry, hint=f"available platforms: {avail}; use --platform")
            if desc.size > MAX_MANIFEST_SIZE:      # refused before it is asked for
                raise ManifestError(f"manifest {ref.repository}@{desc.digest} is too large ({desc.size} bytes, "
                                    f"at most {MAX_MANIFEST_SIZE})", where=ref.registry)
            m = client.get_manifest(ref.repository, str(desc.digest))
            check_named(desc, m, where=ref.registry)
            if isinstance(m, Index):
                raise ManifestError(f"{ref.familiar()}: nested image index for {want} is not supported",
                                    where=ref.registry, hint="an image index may only list image manifests")
        elif self.options.platform is not None:
            pass  # a single-platform image: checked against its config below
        if len(m.layers) > MAX_LAYERS:
            raise ManifestError(f"{ref.familiar()} has {len(m.layers)} layers, more than layerfs takes ({MAX_LAYERS})",
                                where=ref.registry)
        if m.config.media_type not in CONFIG_TYPES:
            raise UnsupportedMediaType(f"{ref.familiar()}: config media type {m.config.media_type!r} is not an image "
                                       f"config", where=ref.registry,
                                       hint="the reference names an artifact or something else, not a container image")
        return m, index

    def pull(self, ref: Reference) -> PullResult:
        max_layer_size(0, self.options.max_layer_size)   # a bad LAYERFS_MAX_LAYER_SIZE fails before anything
        self.store.init()
        with self.store.lock("gc", shared=True), _big_buffers_reused():
            return self._pull(ref)

    def _pull(self, ref: Reference) -> PullResult:
        manifest, index = self.resolve(ref)
        client = self.client(ref.registry)
        repo = ref.repository
        # media types are checked before anything is downloaded
        compressions = iter_layer_compression(manifest.layers, where=ref.registry)
        for l in manifest.layers:
            if l.media_type in FOREIGN_LAYER_TYPES and not self.store.has_blob(l.digest, l.size):
                raise ForeignLayerError(f"layer {l.digest.short} is non-distributable ({l.media_type})"
                                        + (f", served from {l.urls[0]}" if l.urls else ""), registry=ref.registry)
        if self.store.has_blob(manifest.config.digest, manifest.config.size):
            config_raw = self.store.read_blob(manifest.config.digest, manifest.config.size)
        else:
            config_raw = client.get_blob_bytes(repo, manifest.config)
        config = ImageConfig.parse(config_raw, where=f"{ref.registry}/{repo}")
        diff_ids = config.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise ManifestError(f"image config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers",
                                where=f"{ref.registry}/{repo}")
        want = self.options.platform
        if want is not None and index is None and config.platform is not None and not want.matches(config.platform):
            raise PlatformNotFound(f"{ref.familiar()} is for {config.platform}, not {want}", where=ref.registry,
                                   hint="drop --platform or pick an image built for it")

        todo: list[int] = []
        for i, l in enumerate(manifest.layers):
            if self.store.has_blob(l.digest, l.size):
                self.progress(l.digest.short, "Already exists")
            else:
                self.progress(l.digest.short, "Pulling fs layer")
                todo.append(i)
        # biggest first: the pull ends with its longest chain of downloads, and a big layer
        # started last would run alone at the end while the other cores idle
        order = sorted(todo, key=lambda i: -manifest.layers[i].size)
        for i in order[self.options.max_concurrent_downloads:]:
            self.progress(manifest.layers[i].digest.short, "Waiting")

        run_all([functools.partial(self.download_layer, client, repo, manifest.layers[i], compressions[i],
                                   diff_ids[i] if diff_ids else None) for i in order],
                self.options.max_concurrent_downloads)
        # layers present from before: make sure their facts are known and consistent
        for i, l in enumerate(manifest.layers):
            info = self.store.layer_info(l.digest)
            if info is None:
                info = layer_facts_from_blob(self.store, l)
            check_diff_id(l, info.get("diff_id"), diff_ids[i], where=f"{ref.registry}/{repo}")

        self.store.put_blob(config_raw, manifest.config.digest)
        self.store.put_blob(manifest.raw, manifest.digest)
        if index is not None:
            self.store.put_blob(index.raw, index.digest)
        repo_digest = index.digest if index is not None else manifest.digest
        ann = {REPO_DIGEST_ANNOTATION: str(repo_digest)}
        stored = docker_to_oci(manifest)   # skopeo and umoci read only OCI manifests from a layout
        if stored is not manifest:
            self.store.put_blob(stored.raw, stored.digest)
            ann[SOURCE_MANIFEST_ANNOTATION] = str(manifest.digest)
        name = str(ref)
        old = self.store.find(ref)
        desc = Descriptor(stored.media_type, stored.digest, len(stored.raw), ann, config.platform)
        updated = old is None or old.descriptor.digest != stored.digest or bool(todo)
        if old is None or old.descriptor.digest != stored.digest or dict(old.descriptor.annotations or {}) != {
                **ann, "org.opencontainers.image.ref.name": name}:
            self.store.tag(name, desc)
        manifest = stored
        return PullResult(ref, name, manifest, repo_digest, config, updated, len(todo))

    def download_layer(self, client: RegistryClient, repo: str, desc: Descriptor, compression: str | None,
                       diff_id: Digest | None) -> None:
        """Download, verify and index one layer blob into the store (resumable, retried on temporary
        failures); the caller holds the store's ``gc`` lock shared."""
        short = desc.digest.short
        where = f"{client.registry}/{repo}"
        with self.store.ingest(desc.digest, desc.size) as ing:
            if self.store.has_blob(desc.digest, desc.size):  # another process finished it meanwhile
                self.progress(short, "Already exists")
                return
            w = LayerWriter(self.store, desc, ing, compression=compression, where=where,
                            max_size=self.options.max_layer_size)
            offset = ing.offset
            if offset:
                log.info("resuming %s at %d of %d bytes", short, offset, desc.size)
            w.start(offset)
            try:
                self._transfer(client, repo, desc, ing, w, diff_id)
            finally:
                w.stop_threads()   # a partial kept for resume needs no indexer threads

    def _transfer(self, client: RegistryClient, repo: str, desc: Descriptor, ing, w: "LayerWriter",
                  diff_id: Digest | None) -> None:
        short = desc.digest.short

        def attempt() -> None:
            """One GET of the rest of the blob (from what is on disk), into the writer."""
            try:
                resp = client.open_blob(repo, desc, start=w.offset)
                try:
                    if resp.start != w.offset:  # the registry ignored Range: start over
                        w.start(0)
                    for chunk in resp.chunks():
                        w.feed(chunk)
                        self.progress(short, "Downloading", w.offset, desc.size)
                finally:
                    resp.close()
                if w.offset < desc.size:
                    raise RegistryUnreachable(f"blob {short}: response ended after {w.offset} of {desc.size} "
                                              f"bytes", registry=client.registry)
            except RegistryError:
                w.flush()      # what came is kept: a retry (or the next pull) resumes after it
                raise

        try:
            client.retrying(attempt, again=f"resuming blob {short}")
        except OSError as e:
            ing.discard()
            raise store_error(e, f"blob {desc.digest}") from None
        self.progress(short, "Verifying Checksum")
        index = w.commit()
        self.progress(short, "Download complete")
        w.record(index, diff_id)
        self.progress(short, "Pull complete")


class _Tee:
    def __init__(self, *sinks):
        self.sinks = sinks

    def update(self, b: bytes) -> None:
        for s in self.sinks:
            if hasattr(s, "update"):
                s.update(b)
            else:
                s.feed(b)


def pull(store: Store, ref: Reference, options: PullOptions | None = None,
         progress: ProgressSink | None = None) -> PullResult:
    return Puller(store, options, progress).pull(ref)
