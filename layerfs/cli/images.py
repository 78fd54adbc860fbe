"""The local images shown: ``images`` (``image ls``), ``history``, ``inspect``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from fnmatch import fnmatch
from typing import TYPE_CHECKING

from layerfs.cli.argtypes import bool_arg
from layerfs.cli.display import ellipsis, human_size, parse_time, render_template, since, table
from layerfs.errors import LayerfsError, UsageError
from layerfs.image import Digest, Manifest
from layerfs.index import index_path
from layerfs.index import layer_facts_from_blob
from layerfs.store import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION

if TYPE_CHECKING:
    from layerfs.cli.main import Context

log = logging.getLogger(__name__)


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "images":
        _images_arguments(s)
    elif command == "image":
        isub = s.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
        _images_arguments(isub.add_parser("ls", aliases=["list"], help="list local images"))
    elif command == "history":
        s.add_argument("ref", metavar="REF")
        s.add_argument("--no-trunc", action="store_true")
        s.add_argument("-H", "--human", type=bool_arg, nargs="?", const=True, default=True, metavar="BOOL",
                       help="human sizes and dates (default true; -H=false for raw)")
        s.add_argument("-q", "--quiet", action="store_true")
        s.set_defaults(func=cmd_history)
    elif command == "inspect":
        s.add_argument("refs", nargs="+", metavar="REF")
        s.add_argument("-f", "--format", help="Go-template-like field path, e.g. '{{.Id}}' or '{{json .Config}}'")
        s.set_defaults(func=cmd_inspect)


def _images_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("filter_ref", nargs="?", metavar="REPOSITORY[:TAG]")
    s.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    s.add_argument("--digests", action="store_true", help="show digests")
    s.add_argument("--no-trunc", action="store_true", help="full image ids")
    s.add_argument("--format", choices=["table", "json"], default=None)
    s.set_defaults(func=cmd_images)


def _layer_sizes(store, manifest: Manifest) -> list[int]:
    sizes = []
    for l in manifest.layers:
        info = store.layer_info(l.digest)
        if info is None and store.has_blob(l.digest, l.size):
            try:
                info = layer_facts_from_blob(store, l)
            except LayerfsError as e:
                log.warning("cannot read layer %s: %s", l.digest.short, e)
        sizes.append(int(info["size"]) if info and isinstance(info.get("size"), int) else l.size)
    return sizes


def _repo_digest(rec) -> str:
    return (rec.descriptor.annotations or {}).get(REPO_DIGEST_ANNOTATION) or str(rec.descriptor.digest)


def _image_rows(ctx: Context):
    """(record, reference, manifest, config, size) for each local image."""
    store = ctx.store
    out = []
    for rec in store.images():
        ref = rec.reference
        try:
            m = store.manifest(rec.descriptor.digest)
            if not isinstance(m, Manifest):
                continue
            cfg = store.config(m)
        except LayerfsError as e:
            log.warning("skipping %s: %s", rec.name, e)
            continue
        out.append((rec, ref, m, cfg, sum(_layer_sizes(store, m))))
    return out


def cmd_images(ctx: Context) -> int:
    a = ctx.args
    rows = _image_rows(ctx)
    if a.filter_ref:
        rows = [r for r in rows if r[1] and (fnmatch(r[1].familiar_name, a.filter_ref)
                                             or fnmatch(r[1].name, a.filter_ref)
                                             or fnmatch(r[1].familiar(), a.filter_ref))]
    rows.sort(key=lambda r: (r[3].created or ""), reverse=True)
    if a.quiet:
        seen = []
        for r in rows:
            iid = r[2].config.digest.hex[:64 if a.no_trunc else 12]
            if iid not in seen:
                seen.append(iid)
        for iid in seen:
            print(iid if not a.no_trunc else "sha256:" + iid)
        return 0
    if a.format == "json":
        for rec, ref, m, cfg, size in rows:
            print(json.dumps({
                "Containers": "N/A", "CreatedAt": cfg.created or "", "CreatedSince": since(cfg.created),
                "Digest": _repo_digest(rec), "ID": m.config.digest.short if not a.no_trunc else str(m.config.digest),
                "Repository": ref.familiar_name if ref else rec.name, "SharedSize": "N/A",
                "Size": human_size(size), "Tag": (ref.tag if ref and ref.tag else "<none>"),
                "UniqueSize": "N/A", "VirtualSize": human_size(size)}, separators=(",", ":")))
        return 0
    if a.format not in (None, "table"):
        raise UsageError(f"unsupported --format {a.format!r}", hint="use 'table' or 'json'")
    header = ["REPOSITORY", "TAG"] + (["DIGEST"] if a.digests else []) + ["IMAGE ID", "CREATED", "SIZE"]
    table_rows = [header]
    for rec, ref, m, cfg, size in rows:
        iid = str(m.config.digest) if a.no_trunc else m.config.digest.short
        row = [ref.familiar_name if ref else rec.name, ref.tag if ref and ref.tag else "<none>"]
        if a.digests:
            row.append(_repo_digest(rec))
        row += [iid, since(cfg.created), human_size(size)]
        table_rows.append(row)
    table(table_rows, sys.stdout)
    return 0


def cmd_history(ctx: Context) -> int:
    a = ctx.args
    rec, m = ctx.store.resolve(a.ref)
    cfg = ctx.store.config(m)
    sizes = _layer_sizes(ctx.store, m)
    hist = cfg.history
    rows = []
    li = 0
    if not hist:  # images without history: one row per layer
        for i, l in enumerate(m.layers):
            rows.append((None, "", sizes[i], ""))
    for h in hist:
        size = 0
        if not h.empty_layer:
            size = sizes[li] if li < len(sizes) else 0
            li += 1
        rows.append((h.created, h.created_by, size, h.comment))
    rows.reverse()
    out = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    for i, (created, created_by, size, comment) in enumerate(rows):
        iid = (str(m.config.digest) if a.no_trunc else m.config.digest.short) if i == 0 else "<missing>"
        if a.human:
            when = since(created)
            sz = human_size(size)
        else:
            d = parse_time(created)
            when = d.isoformat().replace("+00:00", "Z") if d else "N/A"
            sz = str(size)
        by = " ".join(created_by.split("\n")) if not a.no_trunc else created_by
        if not a.no_trunc:
            by = ellipsis(by, 45)
        out.append([iid, when, by, sz, comment])
    if a.quiet:
        print(out[1][0])
        return 0
    table(out, sys.stdout)
    return 0


def cmd_inspect(ctx: Context) -> int:
    a = ctx.args
    store = ctx.store
    docs = []
    for text in a.refs:
        rec, m = store.resolve(text)
        cfg = store.config(m)
        sizes = _layer_sizes(store, m)
        tags, digests = [], []
        for other in store.images():
            if other.descriptor.digest == rec.descriptor.digest and other.reference:
                r = other.reference
                if r.tag:
                    tags.append(r.familiar())
                digests.append(f"{r.familiar_name}@{_repo_digest(other)}")
        layers = []
        for l, size in zip(m.layers, sizes):
            info = store.layer_info(l.digest) or {}
            layers.append({"Digest": str(l.digest), "MediaType": l.media_type, "Size": l.size,
                           "UncompressedSize": size, "DiffID": info.get("diff_id"),
                           "IndexSize": _index_size(store, l.digest)})
        doc = cfg.doc
        docs.append({
            "Id": str(m.config.digest),
            "RepoTags": sorted(set(tags)),
            "RepoDigests": sorted(set(digests)),
            "Created": cfg.created,
            "Author": doc.get("author", ""),
            "Architecture": doc.get("architecture"),
            "Variant": doc.get("variant"),
            "Os": doc.get("os"),
            "Config": doc.get("config") or {},
            "Size": sum(sizes),
            "RootFS": {"Type": "layers", "Layers": [str(d) for d in cfg.diff_ids]},
            "History": doc.get("history") or [],
            "Manifest": {"Digest": str(m.digest), "MediaType": m.media_type, "Size": len(m.raw),
                         "Config": m.config.to_json(), "Annotations": dict(m.annotations or {})},
            "SourceManifest": _source_manifest(store, rec),
            "Layers": layers,
        })
    if a.format:
        for d in docs:
            print(render_template(a.format, d))
        return 0
    print(json.dumps(docs, indent=4))
    return 0


def _index_size(store, digest) -> int | None:
    """Bytes of the layer's index file (TOC + random-access checkpoints), None when not built yet."""
    try:
        return index_path(store, digest).stat().st_size
    except OSError:
        return None


def _source_manifest(store, rec) -> dict | None:
    """The manifest as the registry served it, when the store keeps an OCI form of it."""
    val = (rec.descriptor.annotations or {}).get(SOURCE_MANIFEST_ANNOTATION)
    if not val:
        return None
    d = Digest.parse(val)
    m = store.manifest(d)
    return {"Digest": str(d), "MediaType": m.media_type, "Size": len(m.raw)}
