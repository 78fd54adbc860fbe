"""``commit``: an upper directory over an image becomes a new image, stored and tagged.

:func:`commit` turns the upper directory into one new gzip layer on top of the image
(see :func:`~layerfs.changes.tarwriter.write_layer` for the format), a new config
(``rootfs.diff_ids`` and ``history`` extended, ``docker commit --change`` instructions
applied, see :func:`~layerfs.changes.dockerfile.apply_changes`) and a new OCI manifest,
stored through the store's verified writes, indexed so it mounts at once, and tagged.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from layerfs.changes.dockerfile import apply_changes
from layerfs.changes.target import Target
from layerfs.changes.tarwriter import EMPTY_TAR_DIGEST, LayerResult, write_layer
from layerfs.errors import LayerfsError, UsageError
from layerfs.fs import open_image_tree
from layerfs.image import (OCI_CONFIG, OCI_MANIFEST, Descriptor, Digest, ImageConfig, Manifest, Reference, json_bytes,
    parse_manifest)
from layerfs.store import Store

log = logging.getLogger(__name__)

__all__ = ["CommitOptions", "CommitResult", "commit", "new_config", "parse_new_reference"]


#: config fields that describe how the parent was built, stale on a committed image
_STALE_CONFIG_FIELDS = ("container", "container_config", "docker_version", "id", "parent")
BASE_DIGEST_ANNOTATION = "org.opencontainers.image.base.digest"
BASE_NAME_ANNOTATION = "org.opencontainers.image.base.name"


@dataclass(frozen=True, kw_only=True)
class CommitOptions:
    message: str = ""                 # history comment (-m)
    author: str = ""                  # image author (--author)
    changes: Sequence[str] = ()       # docker commit --change instructions (-c)
    created: str | None = None        # RFC 3339; default: now, or SOURCE_DATE_EPOCH when set


@dataclass(frozen=True)
class CommitResult:
    reference: Reference
    name: str                         # the name tagged in the store
    manifest: Manifest
    image_id: Digest                  # the config digest, what docker commit prints
    layer: LayerResult | None         # None: nothing changed (an empty_layer history entry)


def _now_rfc3339() -> str:
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        return _dt.datetime.fromtimestamp(int(sde), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac_s = f"{frac:09d}".rstrip("0")
    return f"{base}.{frac_s}Z" if frac_s else f"{base}Z"      # Go's RFC3339Nano


def parse_new_reference(text: str | Reference) -> Reference:
    """NEWREF of commit: NAME[:TAG] (``latest`` implied); a digest is refused."""
    ref = text if isinstance(text, Reference) else Reference.parse(text)
    if ref.digest is not None:
        raise UsageError(f"invalid reference {str(text)!r}: cannot tag an image with a digest",
                         hint="use NAME[:TAG]")
    return ref


def _history_upto(history: list, upto: int) -> list:
    """History entries of the first *upto* non-empty layers (and the empty ones before the next)."""
    out, seen = [], 0
    for h in history:
        empty = isinstance(h, Mapping) and bool(h.get("empty_layer"))
        if not empty:
            if seen == upto:
                break
            seen += 1
        out.append(h)
    return out


def new_config(parent: ImageConfig, *, diff_id: Digest | None, created: str, options: CommitOptions,
               upto: int | None = None, nlayers: int | None = None) -> dict:
    """The committed image's config document (parent's, changes applied, one layer and history entry more)."""
    doc = json.loads(parent.raw)
    for k in _STALE_CONFIG_FIELDS:
        doc.pop(k, None)
    parent_cfg = doc.get("config") if isinstance(doc.get("config"), Mapping) else {}
    created_by = " ".join(c for c in parent_cfg.get("Cmd") or [] if isinstance(c, str))
    doc["config"] = apply_changes(parent_cfg, options.changes)
    doc["created"] = created
    if options.author:
        doc["author"] = options.author
    else:
        doc.pop("author", None)
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), Mapping) else {}
    diff_ids = [d for d in rootfs.get("diff_ids") or [] if isinstance(d, str)]
    history = [h for h in doc.get("history") or [] if isinstance(h, Mapping)]
    if upto is not None:
        diff_ids = diff_ids[:upto]
        history = _history_upto(history, upto)
    n = len(diff_ids) if nlayers is None else nlayers
    if not history and n:      # a parent without history: one plain entry per layer keeps rows and layers paired
        history = [{} for _ in range(n)]
    entry: dict = {"created": created, "created_by": created_by}
    if options.author:
        entry["author"] = options.author
    if options.message:
        entry["comment"] = options.message
    if diff_id is None:
        entry["empty_layer"] = True
    else:
        diff_ids.append(str(diff_id))
    history.append(entry)
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    doc["history"] = history
    return doc


def commit(store: Store, target: Target, newref: str | Reference, options: CommitOptions | None = None) -> CommitResult:
    """Commit *target*'s upper directory as a new image tagged *newref* (see the module docs).

    An upper directory without changes adds no layer, only a history entry
    marked ``empty_layer`` (as docker does for an empty diff)."""
    options = options or CommitOptions()
    ref = parse_new_reference(newref)
    store.init()
    base = target.manifest
    parent = store.config(base)
    created = options.created or _now_rfc3339()
    n = len(base.layers) if target.upto is None else min(target.upto, len(base.layers))
    # the changes are checked before anything is written
    new_config(parent, diff_id=None, created=created, options=options, upto=target.upto, nlayers=n)
    scan = target.scan()
    with store.lock("gc", shared=True):     # no prune between storing the blobs and tagging them
        layer = write_layer(store, scan) if scan else None
        if layer is not None and layer.diff_id == EMPTY_TAR_DIGEST:
            layer = None
        doc = new_config(parent, diff_id=layer.diff_id if layer else None, created=created, options=options,
                         upto=target.upto, nlayers=n)
        config_raw = json_bytes(doc)
        config_digest = store.put_blob(config_raw)
        layers = [d.to_json() for d in base.layers[:n]]
        if layer is not None:
            layers.append(layer.descriptor.to_json())
        mdoc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": Descriptor(OCI_CONFIG, config_digest, len(config_raw)).to_json(),
                "layers": layers,
                "annotations": {BASE_DIGEST_ANNOTATION: str(base.digest), BASE_NAME_ANNOTATION: target.image}}
        raw = json_bytes(mdoc)
        manifest = parse_manifest(raw)
        assert isinstance(manifest, Manifest)
        store.put_blob(raw, manifest.digest)
        cfg = ImageConfig.parse(config_raw)
        store.tag(str(ref), Descriptor(OCI_MANIFEST, manifest.digest, len(raw), None, cfg.platform))
    try:    # the merged-tree cache now, so the first mount opens at once
        open_image_tree(store, manifest)
    except LayerfsError as e:
        log.warning("cannot prepare the tree cache of %s: %s", ref.familiar(), e)
    return CommitResult(ref, str(ref), manifest, config_digest, layer)
