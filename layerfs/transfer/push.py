"""Push: a local image → a registry, blob by blob, then its manifest with its exact bytes.

For every layer (in parallel) and then the config:

1. ``HEAD`` the blob in the target repository: there already → ``Layer already exists``.
2. When another repository of the same registry has it (an image in the store
   pulled from or pushed to there), ask for a cross-repository mount
   (``POST …/blobs/uploads/?mount=<digest>&from=<repo>``, token scopes
   ``repository:<name>:push,pull`` and ``repository:<from>:pull``) →
   ``Mounted from <repo>``. A registry that declines opens an upload session
   instead, which step 3 then uses.
3. Upload it from the store, verified while read: monolithic (``POST`` then
   ``PUT ?digest=`` with the bytes) up to ``chunk_threshold``, larger blobs in
   chunks (``PATCH`` with ``Content-Range``, then an empty ``PUT ?digest=``)
   → ``Pushed``.

A temporary failure (connection lost, 429, 5xx) restarts that blob's upload
with a new session after a backoff, as often as pull retries a download.

The manifest goes last, under the tag, as the exact bytes the store holds, so
its digest is what the registry serves: for an image pulled as Docker schema2
those are the registry's original bytes (``io.layerfs.source.manifest``), not
the OCI form the store shows to skopeo and umoci. The pushed name is then
tagged in the store with the digest the registry knows it by.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

from layerfs.errors import AccessDenied, AuthenticationError, UsageError
from layerfs.image import FOREIGN_LAYER_TYPES, Descriptor, Digest, Manifest, Reference
from layerfs.registry import ClientPool, RegistryClient, RegistryOptions
from layerfs.store import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, ImageRecord, Store
from layerfs.transfer.pull import ProgressSink, no_progress, run_all

log = logging.getLogger(__name__)

#: blobs larger than this are uploaded in chunks
DEFAULT_CHUNK_THRESHOLD = 64 << 20
DEFAULT_CHUNK_SIZE = 16 << 20
#: cross-repository mount attempts per blob before uploading it
MAX_MOUNT_SOURCES = 2

# the statuses a push reports per layer (docker's words)
PREPARING = "Preparing"
WAITING = "Waiting"
PUSHING = "Pushing"
PUSHED = "Pushed"
EXISTS = "Layer already exists"
MOUNTED = "Mounted from"          # + " <repo>"
SKIPPED_FOREIGN = "Skipped foreign layer"


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    registry: RegistryOptions | None = None
    chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_concurrent_uploads: int = 3
    cross_repository_mount: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise UsageError(f"push chunk size {self.chunk_size} must be positive")
        if self.chunk_threshold < 0:
            raise UsageError(f"push chunk threshold {self.chunk_threshold} must not be negative")
        if self.max_concurrent_uploads < 1:
            raise UsageError("--max-concurrent-uploads must be at least 1")


@dataclass
class PushResult:
    reference: Reference              # where the image went
    digest: Digest                    # the manifest digest the registry knows
    size: int                         # manifest bytes
    media_type: str
    statuses: dict[str, str] = field(default_factory=dict)   # layer digest → final status


def push_target(store: Store, src: str, dest: str | None) -> tuple[ImageRecord, Manifest, Reference]:
    """The local image *src* and the reference it goes to (*dest*, else its own name)."""
    rec, m = store.resolve(src)
    if dest is not None:
        ref = Reference.parse(dest)
    else:
        ref = None
        try:
            ref = Reference.parse(src)
        except Exception:
            pass
        if ref is None or store.find(ref) is None:
            raise UsageError(f"{src} names an image by id; say where to push it", hint="layerfs push ID NAME[:TAG]")
    if ref.digest is not None and ref.tag is None and dest is not None:
        raise UsageError(f"cannot push to a digest reference {dest!r}", hint="use NAME[:TAG]")
    return rec, m, ref


class Pusher:
    def __init__(self, store: Store, options: PushOptions | None = None, progress: ProgressSink | None = None):
        self.store = store
        self.options = options or PushOptions()
        self.progress = progress or no_progress
        self.client = ClientPool(self.options.registry)

    # -- what to push ------------------------------------------------------------------
    def _manifest_to_push(self, rec: ImageRecord, m: Manifest) -> Manifest:
        """The stored manifest, or the registry's original bytes when the store keeps an OCI form of it."""
        src = (rec.descriptor.annotations or {}).get(SOURCE_MANIFEST_ANNOTATION)
        if src:
            orig = self.store.manifest(Digest.parse(src))
            if isinstance(orig, Manifest) and orig.config.digest == m.config.digest \
                    and [l.digest for l in orig.layers] == [l.digest for l in m.layers]:
                return orig
            log.warning("%s: the kept source manifest %s does not match the image; pushing the stored form",
                        rec.name, src)
        return m

    def _mount_sources(self, ref: Reference, src: ImageRecord) -> dict[Digest, list[str]]:
        """Blob digest → other repositories of the same registry known to hold it (pulled or pushed there)."""
        out: dict[Digest, list[str]] = {}
        records = sorted(self.store.images(), key=lambda r: r.descriptor.digest != src.descriptor.digest)
        for rec in records:
            r = rec.reference
            if r is None or r.registry != ref.registry or r.repository == ref.repository:
                continue
            if REPO_DIGEST_ANNOTATION not in (rec.descriptor.annotations or {}):
                continue      # only tagged locally: the registry may not have it
            try:
                m = self.store.manifest(rec.descriptor.digest)
            except Exception:
                continue
            if not isinstance(m, Manifest):
                continue
            for d in [m.config.digest, *(l.digest for l in m.layers)]:
                repos = out.setdefault(d, [])
                if r.repository not in repos:
                    repos.append(r.repository)
        return out

    # -- pushing -----------------------------------------------------------------------
    def push(self, src: str, dest: str | None = None) -> PushResult:
        self.store.init()
        rec, stored, ref = push_target(self.store, src, dest)
        manifest = self._manifest_to_push(rec, stored)
        client = self.client(ref.registry)
        repo = ref.repository
        sources = self._mount_sources(ref, rec) if self.options.cross_repository_mount else {}
        layers = list(manifest.layers)
        for l in reversed(layers):                       # docker lists the top layer first
            self.progress(l.digest.short, PREPARING)
        for l in reversed(layers[: max(0, len(layers) - self.options.max_concurrent_uploads)]):
            self.progress(l.digest.short, WAITING)
        done = run_all([functools.partial(self._push_blob, client, repo, l, sources.get(l.digest, []), True)
                        for l in reversed(layers)], self.options.max_concurrent_uploads)
        statuses = {str(l.digest): status for l, status in zip(reversed(layers), done)}
        self._push_blob(client, repo, manifest.config, sources.get(manifest.config.digest, []), False)
        identifier = ref.tag or str(manifest.digest)
        digest = client.put_manifest(repo, identifier, manifest.raw, manifest.media_type)
        self._record(rec, ref, digest)
        return PushResult(ref, digest, len(manifest.raw), manifest.media_type, statuses)

    def _record(self, rec: ImageRecord, ref: Reference, digest: Digest) -> None:
        """Tag the pushed name in the store, remembering the digest the registry knows it by."""
        ann = {k: v for k, v in (rec.descriptor.annotations or {}).items()
               if k != "org.opencontainers.image.ref.name"}
        ann[REPO_DIGEST_ANNOTATION] = str(digest)
        d = rec.descriptor
        self.store.tag(str(ref), Descriptor(d.media_type, d.digest, d.size, ann, d.platform))

    def _push_blob(self, client: RegistryClient, repo: str, desc: Descriptor, sources: list[str],
                   show: bool) -> str:
        """One blob, retried on temporary failures; returns its final status."""
        short = desc.digest.short
        report: Callable[..., None] = self.progress if show else (lambda *a, **k: None)
        status = client.retrying(lambda: self._push_blob_once(client, repo, desc, sources, report),
                                 again=f"starting the upload of blob {short} again")
        report(short, status)
        return status

    def _push_blob_once(self, client: RegistryClient, repo: str, desc: Descriptor, sources: list[str],
                        report: Callable[..., None]) -> str:
        d = desc.digest
        if client.blob_exists(repo, d, size=desc.size):
            return EXISTS
        if desc.media_type in FOREIGN_LAYER_TYPES and desc.urls:
            return SKIPPED_FOREIGN
        location = None
        for from_repo in sources[:MAX_MOUNT_SOURCES]:
            try:
                location = client.mount_blob(repo, d, from_repo)
            except (AccessDenied, AuthenticationError) as e:
                log.info("blob %s: no mount from %s (%s); uploading it", d.short, from_repo, e.message)
                continue
            if location is None:
                return f"{MOUNTED} {from_repo}"
            break       # the registry declined and opened an upload session: use it
        if location is None:
            location = client.start_upload(repo)
        size = desc.size
        if size <= self.options.chunk_threshold:
            data = self.store.read_blob(d, size)                # verified
            report(d.short, PUSHING, 0, size)
            client.finish_upload(repo, location, d, data)
            return PUSHED
        with self.store.open_blob(d, size) as f:
            off = 0
            while off < size:
                chunk = f.read(min(self.options.chunk_size, size - off))
                if not chunk:
                    break
                location = client.upload_chunk(repo, location, chunk, off)
                off += len(chunk)
                report(d.short, PUSHING, off, size)
            f.read(1)          # EOF: the verifying reader checks size and digest before the upload is closed
        client.finish_upload(repo, location, d)
        return PUSHED


def push(store: Store, src: str, dest: str | None = None, options: PushOptions | None = None,
         progress: ProgressSink | None = None) -> PushResult:
    return Pusher(store, options, progress).push(src, dest)


__all__ = ["PushOptions", "PushResult", "Pusher", "push", "push_target", "DEFAULT_CHUNK_THRESHOLD",
           "DEFAULT_CHUNK_SIZE"]
