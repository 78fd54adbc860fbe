"""Images from local files, named with skopeo's transports, imported into the store.

    load(store, "oci:/srv/layout:1.0")              # an OCI image layout (skopeo, buildah, umoci)
    load(store, "oci-archive:/tmp/img.tar")         # an OCI image layout in a tar
    load(store, "docker-archive:/tmp/app.tar.xz")   # `docker save` output, maybe gzip/xz/zstd-compressed
    load(store, "/tmp/app.tar")                     # no transport: the content decides

**Grammar** (containers/image's, on Linux; the path may not contain ``:``):

* ``oci:PATH[:REF]`` and ``oci-archive:PATH[:REF]`` -- *REF* is an image's
  ``org.opencontainers.image.ref.name`` in the layout's ``index.json``
  (letters and digits joined by ``-._:@+`` or ``--``, ``/`` between
  components), or ``@N``, the N-th (zero-based) entry of ``index.json``.
  Without one, the layout must list exactly one image.
* ``docker-archive:PATH[:REFERENCE|:@N]`` -- *REFERENCE* is a docker
  reference (``alpine:3.20``; no digest), matched against the ``RepoTags``
  of the archive's ``manifest.json``; ``@N`` is its N-th item.

**Reading.** A layout directory is read file by file. An archive is read
without extracting it: a first pass lists its members (and keeps the small
ones: ``index.json``, ``manifest.json``, manifests, configs); layers are then
streamed straight from the archive into the store. Plain tars and
``.tar.xz`` files (through python-xz, which seeks inside multi-block xz
without decompressing from the start) are read at random; ``.tar.gz`` and
``.tar.zst`` cannot seek, so they are read twice, sequentially: once for the
member list, once for the layers, in archive order.

**Trust.** Everything is untrusted input. Every blob is checked against its
digest and size (manifests and configs before anything is written; layers in
the same streaming pass that writes them and builds their layer index,
:class:`layerfs.transfer.pull.LayerWriter`, exactly as ``pull`` does), every layer's
uncompressed digest against the config's ``diff_ids``. Archive members with
absolute names or ``..`` escapes, symlinks pointing outside the archive,
duplicate names, missing files, truncated data and malformed JSON are each
one :class:`~layerfs.errors.LayerfsError` naming the file. Nothing is tagged
unless everything checked out, and blobs written by a failed import are
removed again (those another image uses stay).

**Names.** ``oci:``/``oci-archive:``: the image's ref name when it is a full
reference (has a ``/`` or ``:``, e.g. ``docker.io/library/alpine:3.20`` as
skopeo and nerdctl write it; containerd's ``io.containerd.image.name`` wins),
else ``localhost/<dirname or archive stem>:<ref name or latest>``.
``docker-archive:``: every ``RepoTags`` entry, else
``localhost/<archive stem>:latest``.

**docker-archive layers** become OCI layer blobs: an uncompressed
``layer.tar`` is stored as an OCI ``tar`` layer (digest = sha256 of the tar
= its diff_id), a compressed one as it is (``tar+gzip``/``tar+zstd``). The
config is the archive's config JSON, the manifest an OCI manifest built here.

**Modules.** This one is the load path (open a source, import its plans, tag);
:mod:`~layerfs.transfer.transports` holds the transport strings, errors, options and
results, :mod:`~layerfs.transfer.archive` reads a source's files, and
:mod:`~layerfs.transfer.layouts` turns them into plans of checked images to import.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path

from layerfs.errors import DigestMismatch
from layerfs.image import Descriptor, Digest, is_local_source
from layerfs.index import layer_facts_from_blob
from layerfs.store import Store
from layerfs.transfer.archive import Archive, Files, LayoutDir, Member
from layerfs.transfer.layouts import Plan, plan_docker, plan_oci
from layerfs.transfer.pull import ProgressSink, check_diff_id, ingest_layer, no_progress
from layerfs.transfer.transports import (
    DAMAGED_HINT,
    LoadedImage,
    LoadOptions,
    LoadResult,
    Source,
    SourceError,
    SourceNotFound,
)

log = logging.getLogger(__name__)


# --- importing ---------------------------------------------------------------------------------

def _import(store: Store, files: Files, plans: list[Plan], progress: ProgressSink,
            max_layer_size: int | None = None) -> list[LoadedImage]:
    """Stream the missing layers in, store the small blobs, tag; on failure remove what was written."""
    store.init()
    written: set[Digest] = set()
    try:
        with store.lock("gc", shared=True):   # as pull: blobs not yet tagged are safe from gc
            todo: dict[Digest, tuple[Descriptor, Member, Digest | None]] = {}
            by_member: dict[str, Digest] = {}
            for p in plans:
                for j, (l, m) in enumerate(zip(p.manifest.layers, p.layers)):
                    did = p.diff_ids[j] if p.diff_ids else None
                    if l.digest in todo:
                        continue
                    if store.has_blob(l.digest, l.size):
                        progress(l.digest.short, "Already exists")
                        continue
                    if by_member.setdefault(m.name, l.digest) != l.digest:
                        raise DigestMismatch(f"layer file {m.name} is listed with two different digests "
                                             f"({by_member[m.name]} and {l.digest})", where=files.where,
                                             hint=DAMAGED_HINT)
                    todo[l.digest] = (l, m, did)
            loaded: dict[Digest, bool] = {}
            members = {m.name: m for _, m, _ in todo.values()}
            with contextlib.closing(files.stream(list(members.values()))) as stream:
                for m, chunks in stream:
                    l, _, did = todo[by_member[m.name]]
                    short = l.digest.short
                    progress(short, "Loading layer", 0, l.size)
                    try:
                        info = ingest_layer(store, l, chunks, diff_id=did, where=f"{files.where}: {m.name}",
                                            max_size=max_layer_size)
                    except DigestMismatch as e:
                        e.hint = DAMAGED_HINT
                        raise
                    if info is not None:
                        written.add(l.digest)
                        loaded[l.digest] = True
                    progress(short, "Loaded")
            # layers from before: their facts must be known and agree with the config
            for p in plans:
                for j, l in enumerate(p.manifest.layers):
                    info = store.layer_info(l.digest) or layer_facts_from_blob(store, l)
                    if p.diff_ids:
                        check_diff_id(l, info.get("diff_id"), p.diff_ids[j], where=files.where, hint=DAMAGED_HINT)
            for p in plans:
                for raw, d in p.blobs:
                    if not store.has_blob(d, len(raw)):
                        store.put_blob(raw, d)
                        written.add(d)
            out = []
            for p in plans:
                desc = Descriptor(p.manifest.media_type, p.manifest.digest, len(p.manifest.raw), p.annotations or None,
                                  p.config.platform)
                for name in p.names:
                    store.tag(name, desc)
                out.append(LoadedImage(list(p.names), p.manifest, p.config, p.repo_digest,
                                       sum(1 for l in p.manifest.layers if loaded.pop(l.digest, False))))
            return out
    except BaseException:
        if written:
            try:
                store.gc(candidates=written)
            except Exception as e:   # noqa: BLE001 - the first error is the one reported
                log.warning("cannot remove the blobs of the failed import: %s", e)
        raise


# --- entry point ---------------------------------------------------------------------------------

def _open(src: Source, max_layer_size: int | None = None) -> tuple[Files, str]:
    """The files of *src* and its transport (decided by the content for a bare path)."""
    path = Path(src.path)
    if src.transport == "oci":
        if not path.is_dir():
            if path.exists():
                raise SourceError(f"{path} is not a directory", where=None,
                                  hint="oci: names an OCI layout directory; for an archive use oci-archive:FILE")
            raise SourceNotFound(f"OCI layout {path} does not exist")
        return LayoutDir(path), "oci"
    if src.transport == "" and path.is_dir():
        return LayoutDir(path), "oci"
    if src.transport and path.is_dir():
        raise SourceError(f"{path} is a directory", hint="for an OCI layout directory use oci:DIR")
    archive = Archive(path, max_layer_size)
    if src.transport:
        return archive, src.transport
    if archive.find("manifest.json") is not None:
        return archive, "docker-archive"
    if archive.find("index.json") is not None:
        return archive, "oci-archive"
    archive.close()
    raise SourceError("neither a docker-archive (no manifest.json) nor an OCI archive (no index.json)",
                      where=str(path), hint="docker save and skopeo copy write archives layerfs can load")


def load(store: Store, source: str | os.PathLike[str] | Source, options: LoadOptions | None = None,
         progress: ProgressSink | None = None) -> LoadResult:
    """Import the image(s) of *source* into *store* and tag them.

    *source* is a transport string (``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
    ``docker-archive:FILE[:TAG]``), a :class:`Source`, or a bare path whose
    content decides (a directory is an OCI layout; an archive with
    ``manifest.json`` a docker-archive, one with only ``index.json`` an OCI
    archive). Without a REF/@N, every image of a source holding several is
    imported, unless ``options.single``. Raises one :class:`LayerfsError`
    for anything wrong; nothing is tagged then."""
    opts = options or LoadOptions()
    if isinstance(source, Source):
        src = source
    elif is_local_source(source):
        src = Source.parse(str(source))
    else:
        src = Source("", os.fspath(source))
    files, transport = _open(src, opts.max_layer_size)
    try:
        src = replace(src, transport=transport)
        if transport == "docker-archive":
            plans = plan_docker(files, src, opts)   # type: ignore[arg-type]
        else:
            plans = plan_oci(files, src, opts)
        images = _import(store, files, plans, progress or no_progress, opts.max_layer_size)
    finally:
        files.close()
    for img in images:
        log.info("loaded %s from %s", ", ".join(img.names), src)
    return LoadResult(src, images)
