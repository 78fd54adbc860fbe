"""The ``layerfs`` command line.

Errors are mapped to exit codes in one place (:func:`main`): 0 ok, 1 error,
2 usage. Every failure is one line on stderr, never a traceback (``--debug``
shows one).
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from dataclasses import dataclass
from typing import Sequence

from layerfs import __version__
from layerfs.errors import ImageInUse, ImageNotFound, LayerfsError, UsageError
from layerfs.image import Manifest, Platform

log = logging.getLogger("layerfs")


@dataclass
class Context:
    args: argparse.Namespace
    program: bool = False      # main() runs as the program (its caller exits with its code), not in-process

    @property
    def store(self):
        from layerfs.store import Store
        if not hasattr(self, "_store"):
            self._store = Store(self.args.root)
        return self._store

    def registry_options(self, **kw):
        from layerfs.registry import RegistryOptions
        return RegistryOptions.from_env(insecure_registries=tuple(self.args.insecure_registry or ()), **kw)


# --- helpers -------------------------------------------------------------------------

def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on", "t"):
        return True
    if t in ("0", "false", "no", "off", "f"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def _layer_sizes(store, manifest: Manifest) -> list[int]:
    from layerfs.transfer import layer_facts_from_blob
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
    from layerfs.transfer import REPO_DIGEST_ANNOTATION
    return (rec.descriptor.annotations or {}).get(REPO_DIGEST_ANNOTATION) or str(rec.descriptor.digest)


# --- commands ------------------------------------------------------------------------

def cmd_pull(ctx: Context) -> int:
    from layerfs.cli.display import PullProgress
    from layerfs.image import Reference
    from layerfs.transfer import Puller, PullOptions
    from layerfs.transfer import is_source
    a = ctx.args
    if is_source(a.ref):   # oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:TAG]: imported, no registry
        return _pull_source(ctx)
    ref = Reference.parse(a.ref)
    platform = Platform.parse(a.platform) if a.platform else None
    if a.max_concurrent_downloads < 1:
        raise UsageError("--max-concurrent-downloads must be at least 1")
    progress = None if a.quiet else PullProgress(sys.stdout)
    if progress:
        if ref.tag and ref.digest is None and ":" not in a.ref.rsplit("/", 1)[-1]:
            progress.message(f"Using default tag: {ref.tag}")
        ident = ref.tag if ref.digest is None else str(ref.digest)
        progress.message(f"{ident}: Pulling from {ref.repository}")
    opts = PullOptions(platform=platform, max_concurrent_downloads=a.max_concurrent_downloads,
                       registry=ctx.registry_options())
    result = Puller(ctx.store, opts, progress).pull(ref)
    if progress:
        progress.message(f"Digest: {result.repo_digest}")
        shown = ref.familiar()
        if result.updated:
            progress.message(f"Status: Downloaded newer image for {shown}")
        else:
            progress.message(f"Status: Image is up to date for {shown}")
    print(str(ref))
    return 0


def _pull_source(ctx: Context) -> int:
    """``pull`` of a local source (skopeo's transports): imported like ``load``, printed like ``pull``."""
    from layerfs.cli.display import PullProgress
    from layerfs.transfer import LoadOptions, load
    a = ctx.args
    platform = Platform.parse(a.platform) if a.platform else None
    progress = None if a.quiet else PullProgress(sys.stdout)
    result = load(ctx.store, a.ref, LoadOptions(platform=platform, single=True), progress)
    img = result.images[0]
    if progress:
        for name in img.familiar_names:
            progress.message(f"Loaded image: {name}")
    for name in img.names:
        print(name)
    return 0


def cmd_load(ctx: Context) -> int:
    """``docker load``: an archive (docker-archive or OCI, maybe compressed) or an OCI layout into the store."""
    from layerfs.cli.display import PullProgress
    from layerfs.transfer import LoadOptions, load
    a = ctx.args
    if a.input and a.file:
        raise UsageError("give the archive once: -i FILE or FILE")
    opts = LoadOptions(platform=Platform.parse(a.platform) if a.platform else None)
    progress = PullProgress(sys.stdout) if not a.quiet and sys.stdout.isatty() else None
    text = a.input or a.file
    if text:
        result = load(ctx.store, text, opts, progress)
    else:
        result = _load_stdin(ctx, opts, progress)
    for img in result.images:
        for name in img.familiar_names:
            print(f"Loaded image: {name}")
    return 0


def _load_stdin(ctx: Context, opts, progress):
    """An archive on standard input: read in place when it is a file, else spooled beside the store first."""
    import dataclasses
    import os
    import shutil
    import stat
    import tempfile

    from layerfs.transfer import load
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("requested load from stdin, but stdin is empty",
                         hint="use 'layerfs load -i FILE', or redirect the archive: layerfs load < FILE")
    opts = dataclasses.replace(opts, stem=opts.stem or "stdin")
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return load(ctx.store, f"/proc/self/fd/{fd}", opts, progress)
    ctx.store.init()   # a pipe: layers are read at random, so the archive is kept on disk while loading
    with tempfile.NamedTemporaryFile(dir=ctx.store.root / "ingest", prefix="load-", suffix=".tar") as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        tmp.flush()
        if not tmp.tell():
            raise UsageError("requested load from stdin, but stdin is empty",
                             hint="use 'layerfs load -i FILE', or pipe an archive in: cat FILE | layerfs load")
        return load(ctx.store, tmp.name, opts, progress)


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
    from layerfs.cli.display import human_size, since, table
    a = ctx.args
    rows = _image_rows(ctx)
    if a.filter_ref:
        from fnmatch import fnmatch
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
    from layerfs.cli.display import ellipsis, human_size, parse_time, since, table
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
        from layerfs.cli.display import render_template
        for d in docs:
            print(render_template(a.format, d))
        return 0
    print(json.dumps(docs, indent=4))
    return 0


def _index_size(store, digest) -> int | None:
    """Bytes of the layer's index file (TOC + random-access checkpoints), None when not built yet."""
    from layerfs.index import index_path
    try:
        return index_path(store, digest).stat().st_size
    except OSError:
        return None


def _source_manifest(store, rec) -> dict | None:
    """The manifest as the registry served it, when the store keeps an OCI form of it."""
    from layerfs.image import Digest
    from layerfs.transfer import SOURCE_MANIFEST_ANNOTATION
    val = (rec.descriptor.annotations or {}).get(SOURCE_MANIFEST_ANNOTATION)
    if not val:
        return None
    d = Digest.parse(val)
    m = store.manifest(d)
    return {"Digest": str(d), "MediaType": m.media_type, "Size": len(m.raw)}


def cmd_search(ctx: Context) -> int:
    from layerfs.cli.display import ellipsis, table
    from layerfs.registry import search
    a = ctx.args
    if not 1 <= a.limit <= 100:
        raise UsageError(f"--limit {a.limit} is out of range", hint="use a limit between 1 and 100")
    stars_min, official = 0, None
    for f in a.filter or []:
        key, _, val = f.partition("=")
        if key == "stars" and val.isdigit():
            stars_min = int(val)
        elif key == "is-official":
            official = _bool(val)
        else:
            raise UsageError(f"invalid filter {f!r}", hint="filters: stars=N, is-official=true|false")
    results = search(a.term, limit=a.limit, index_url=a.index, options=ctx.registry_options())
    results = [r for r in results if r.stars >= stars_min and (official is None or r.official == official)]
    if a.format == "json":
        for r in results:
            print(json.dumps({"Name": r.name, "Description": r.description, "StarCount": str(r.stars),
                              "IsOfficial": str(r.official).lower()}, separators=(",", ":")))
        return 0
    rows = [["NAME", "DESCRIPTION", "STARS", "OFFICIAL"]]
    for r in results:
        desc = " ".join(r.description.split("\n"))
        rows.append([r.name, desc if a.no_trunc else ellipsis(desc, 45), str(r.stars), "[OK]" if r.official else ""])
    table(rows, sys.stdout)
    return 0


def cmd_rmi(ctx: Context) -> int:
    a = ctx.args
    store = ctx.store
    store.init()
    status = 0
    for text in a.refs:
        try:
            _rmi_one(store, text, a.force, a.no_prune)
        except LayerfsError as e:
            print(f"Error response from layerfs: {e.one_line()}", file=sys.stderr)
            status = 1
    return status


def _rmi_one(store, text: str, force: bool, no_prune: bool) -> None:
    from layerfs.image import Reference
    try:
        ref = Reference.parse(text)
    except LayerfsError:
        ref = None
    rec = store.find(ref) if ref else None
    targets = [rec] if rec else []
    if not targets:
        matches = store.find_by_id(text)
        if not matches:
            raise ImageNotFound(f"no such image: {text}")
        digests = {r.descriptor.digest for r in matches}
        if len(digests) > 1:
            raise ImageNotFound(f"image id {text!r} is ambiguous", hint="give more digits")
        targets = matches
        if len(targets) > 1 and not force:
            raise ImageInUse(f"unable to delete {text} (must be forced) - image is referenced in multiple repositories",
                             hint="remove the tags one by one, or use --force")
    deleted_manifest = targets[0].descriptor.digest
    for t in targets:
        store.untag(t.name)
        r = t.reference
        print(f"Untagged: {r.familiar() if r else t.name}")
    if any(r.descriptor.digest == deleted_manifest for r in store.images()):
        return
    try:
        m = store.manifest(deleted_manifest)
    except LayerfsError:
        m = None
    if not no_prune and isinstance(m, Manifest):
        from layerfs.lazy import served_blobs
        store.gc(candidates={deleted_manifest, m.config.digest, *(l.digest for l in m.layers)},
                 keep=served_blobs(store))
        print(f"Deleted: {m.config.digest}")


def cmd_prune(ctx: Context) -> int:
    from layerfs.cli.display import human_size
    store = ctx.store
    store.init()
    from layerfs.lazy import prune_lazy, served_blobs
    removed, freed = store.gc(keep=served_blobs(store))
    lazy_removed, lazy_freed = prune_lazy(store)
    print(f"Deleted blobs: {removed}")
    if lazy_removed:
        print(f"Deleted lazy caches: {lazy_removed}")
    print(f"Total reclaimed space: {human_size(freed + lazy_freed)}")
    return 0


def cmd_login(ctx: Context) -> int:
    from layerfs.registry import RegistryClient
    from layerfs.registry import Credentials, CredentialStore
    a = ctx.args
    server = _server_name(a.server)
    user = a.username
    password = a.password
    if a.password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        if not user:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    if not user:
        if not sys.stdin.isatty():
            raise UsageError("no username given and no terminal to ask on", hint="use --username/-u")
        user = input("Username: ").strip()
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError("no password given and no terminal to ask on", hint="use --password-stdin")
        password = getpass.getpass("Password: ")
    if not user or not password:
        raise UsageError("username and password must not be empty")
    creds = Credentials(user, password)
    client = RegistryClient(server, ctx.registry_options(credentials=creds))
    client.ping()
    where = CredentialStore().store(server, creds)
    print(f"Login Succeeded (credentials saved to {where})" if a.verbose else "Login Succeeded")
    return 0


def cmd_logout(ctx: Context) -> int:
    from layerfs.registry import CredentialStore
    server = _server_name(ctx.args.server)
    if CredentialStore().erase(server):
        print(f"Removing login credentials for {server}")
    else:
        print(f"Not logged in to {server}")
    return 0


def _server_name(text: str | None) -> str:
    from layerfs.image import DOCKER_HUB
    from layerfs.registry import normalise_key
    if not text:
        return DOCKER_HUB
    return normalise_key(text)


# --- mounts ----------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _lazy_env() -> bool:
    """LAYERFS_LAZY=1: mount images that are not local lazily (as --lazy) instead of pulling them."""
    import os
    raw = os.environ.get("LAYERFS_LAZY", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UsageError(f"LAYERFS_LAZY={raw[:40]!r} is neither 1 nor 0", hint="set LAYERFS_LAZY=1 or unset it")


def _is_local(store, ref_text: str, opts) -> bool:
    """Whether a plain mount of *ref_text* would use a local image (of the wanted platform) or a local
    source (oci:, oci-archive:, docker-archive:) without pulling."""
    from layerfs.image import is_local_source
    if is_local_source(ref_text) or opts.layer is not None:
        return True       # a local source, or --layer (never lazy): the plain mount's business
    try:
        _, manifest = store.resolve(ref_text)
    except ImageNotFound:
        return False
    if opts.platform is not None:
        cfg = store.config(manifest).platform
        return cfg is None or opts.platform.matches(cfg)
    return True


def cmd_mount(ctx: Context) -> int:
    from layerfs.mount import MountOptions, mount_image
    a = ctx.args
    opts = MountOptions(read_only=a.read_only, upper=a.upper, layer=a.layer,
                        platform=Platform.parse(a.platform) if a.platform else None,
                        fuse_options=[o.strip() for opt in a.options or () for o in opt.split(",")],
                        foreground=a.foreground, debug=a.debug, ready_fd=a.ready_fd)
    if a.foreground and not a.debug:
        logging.getLogger("layerfs").setLevel(logging.INFO)

    def pull(ref):  # only when the image is not local: docker run's screen, on stderr
        from layerfs.cli.display import PullProgress
        from layerfs.transfer import Puller, PullOptions
        print(f"Unable to find image '{ref.familiar()}' locally", file=sys.stderr)
        progress = PullProgress(sys.stderr)
        result = Puller(ctx.store, PullOptions(platform=opts.platform, registry=ctx.registry_options()),
                        progress).pull(ref)
        progress.message(f"Digest: {result.repo_digest}")
        progress.message(f"Status: Downloaded newer image for {ref.familiar()}")
        return result

    lazy = a.lazy
    if lazy is None and _lazy_env():
        lazy = not _is_local(ctx.store, a.ref, opts)
        if not lazy and a.prefetch is not None:
            raise UsageError(f"--prefetch: {a.ref} is a local image, there is nothing to fetch",
                             hint="use --lazy to mount it from its registry all the same")
    if a.prefetch is not None and not lazy:
        raise UsageError("--prefetch needs --lazy")
    if lazy:
        from layerfs.mount import mount_lazy
        mount_lazy(ctx.store, a.ref, a.mountpoint, opts, registry_options=ctx.registry_options(),
                   prefetch=a.prefetch or "none")
        return 0
    mount_image(ctx.store, a.ref, a.mountpoint, opts, pull=pull)
    if ctx.program and not a.foreground:
        _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """End the program at once, without the interpreter's teardown (freeing every module and object: 20-35 ms
    of a mount's start-up, with the new daemon busy on the other CPU; more after building a tree). What
    matters of the teardown is done first: the atexit handlers (logging's flush among them) and flushing
    stdout and stderr. Returns (the normal exit follows) while another thread runs, or when a flush fails."""
    import atexit
    import os
    import threading
    if threading.active_count() > 1:
        return
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:
        return
    os._exit(code)


def cmd_convert(ctx: Context) -> int:
    from layerfs.transfer import convert_image
    a = ctx.args
    if not a.estargz:
        from layerfs.errors import UsageError
        raise UsageError("convert needs a target format", hint="use --estargz")
    from layerfs.changes import parse_new_reference
    m = convert_image(ctx.store, a.src, parse_new_reference(a.newref), chunk_size=a.chunk_size)
    print(m.digest)
    return 0


def cmd_umount(ctx: Context) -> int:
    from layerfs.mount import stored_upper_id, umount
    rec = umount(ctx.store, ctx.args.mountpoint, remove_upper=ctx.args.rm)
    if ctx.args.rm and rec is not None and rec.upper and stored_upper_id(ctx.store, rec.upper) is None:
        print(f"layerfs: kept {rec.upper} (given with --upper; only upper directories of the store are removed)",
              file=sys.stderr)
    return 0


def cmd_rm(ctx: Context) -> int:
    from layerfs.mount import remove_upper
    for what in ctx.args.ids:
        remove_upper(ctx.store, what)
        print(what)
    return 0


def cmd_mounts(ctx: Context) -> int:
    from layerfs.mount import mount_states
    a = ctx.args
    listed = mount_states(ctx.store)
    records = [r for r, _ in listed]
    state = {r.mountpoint: s for r, s in listed}
    if a.quiet:
        for r in records:
            print(r.mountpoint)
        return 0
    from layerfs.lazy import forget_stale_status, lazy_status
    forget_stale_status(ctx.store)
    fetched = {r.mountpoint: lazy_status(ctx.store, r) for r in records}
    if a.format == "json":
        from dataclasses import asdict
        for r in records:
            doc = dict(asdict(r), state=state[r.mountpoint])
            if fetched[r.mountpoint] is not None:
                doc["fetched"] = [round(f, 4) for f in fetched[r.mountpoint]]
            print(json.dumps(doc, separators=(",", ":")))
        return 0
    from layerfs.cli.display import table
    lazy = any(v is not None for v in fetched.values())
    rows = [["IMAGE", "MOUNTPOINT", "PID", "STATE", "UPPER"] + (["FETCHED (PER LAYER)"] if lazy else [])]
    for r in records:
        image = r.image if r.layer is None else f"{r.image} (layer {r.layer})"
        row = [image, r.mountpoint, str(r.pid), state[r.mountpoint], r.upper or "<none>"]
        if lazy:
            f = fetched[r.mountpoint]
            row.append(" ".join(f"{int(x * 100)}%" for x in f) if f is not None else "-")
        rows.append(row)
    table(rows, sys.stdout)
    return 0


def cmd_store_serve(ctx: Context) -> int:
    import functools

    from layerfs.mount import MountOptions, mount_service
    from layerfs.mount import STORE_IMAGE_NAME, serve_store
    a = ctx.args
    if a.grace < 0:
        raise UsageError(f"--grace {a.grace:g} is negative")
    fuse_options = [o.strip() for opt in a.options or () for o in opt.split(",")]
    if not any(o.startswith("fsname=") for o in fuse_options):
        fuse_options.append("fsname=layerfs-store")
    opts = MountOptions(read_only=True, fuse_options=fuse_options, foreground=a.foreground, debug=a.debug,
                        ready_fd=a.ready_fd)
    if a.foreground and not a.debug:
        logging.getLogger("layerfs").setLevel(logging.INFO)
    serve_fn = functools.partial(serve_store, ctx.store, registry_options=ctx.registry_options(), grace=a.grace)
    mount_service(serve_fn, a.mountpoint, opts, store=ctx.store, image=STORE_IMAGE_NAME)
    return 0


def cmd_version(ctx: Context) -> int:
    print(f"layerfs {__version__}")
    return 0


# --- changes: diff, commit, export, push ------------------------------------------------

def cmd_diff(ctx: Context) -> int:
    from layerfs.changes import diff
    from layerfs.mount import resolve_target
    a = ctx.args
    target = resolve_target(ctx.store, a.target, image=a.image)
    for change in diff(target.lower_tree(ctx.store), target.scan()):
        print(change)
    return 0


def cmd_commit(ctx: Context) -> int:
    from layerfs.changes import CommitOptions, commit, parse_new_reference
    from layerfs.mount import resolve_target
    a = ctx.args
    ref = parse_new_reference(a.newref)       # a bad NEWREF fails before anything is read
    target = resolve_target(ctx.store, a.target, image=a.image)
    result = commit(ctx.store, target, ref, CommitOptions(message=a.message or "", author=a.author or "",
                                                         changes=tuple(a.change or ())))
    print(result.image_id)
    return 0


def cmd_export(ctx: Context) -> int:
    from layerfs.changes import export_tree, output_file
    from layerfs.mount import export_source
    a = ctx.args
    out = a.output or "-"
    if out == "-" and sys.stdout.isatty():
        raise UsageError("cowardly refusing to write a tar to a terminal", hint="use -o FILE or redirect stdout")
    tree = export_source(ctx.store, a.target, upper=a.upper)
    if out == "-":
        sys.stdout.flush()
        export_tree(tree, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        with output_file(out) as f:
            export_tree(tree, f)
    return 0


class _PushProgress:
    """Docker's push screen: per-layer lines; ``Pushing`` bars only on a terminal."""

    def __init__(self, out):
        from layerfs.cli.display import PullProgress
        self.lines = PullProgress(out)

    def message(self, text: str) -> None:
        self.lines.message(text)

    def __call__(self, layer: str, status: str, current: int | None = None, total: int | None = None) -> None:
        from layerfs.cli.display import human_size, progress_bar
        if status == "Pushing":
            if not self.lines.tty or not total:
                return
            status = f"Pushing {progress_bar(current or 0, total)} {human_size(current or 0)}/{human_size(total)}"
        elif status == "Waiting" and not self.lines.tty:
            return
        self.lines(layer, status)


def cmd_push(ctx: Context) -> int:
    from layerfs.transfer import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_THRESHOLD, Pusher, PushOptions, push_target
    a = ctx.args
    _, _, ref = push_target(ctx.store, a.ref, a.newref)    # errors before any output
    opts = PushOptions(registry=ctx.registry_options(),
                       chunk_threshold=DEFAULT_CHUNK_THRESHOLD if a.chunk_threshold is None else a.chunk_threshold,
                       chunk_size=DEFAULT_CHUNK_SIZE if a.chunk_size is None else a.chunk_size,
                       max_concurrent_uploads=a.max_concurrent_uploads)
    progress = None if a.quiet else _PushProgress(sys.stdout)
    if progress:
        progress.message(f"The push refers to repository [{ref.name}]")
    result = Pusher(ctx.store, opts, progress).push(a.ref, a.newref)
    if progress:
        progress.message(f"{ref.tag or ref.identifier}: digest: {result.digest} size: {result.size}")
    else:
        print(str(result.reference))
    return 0


def cmd_index_push(ctx: Context) -> int:
    from layerfs.transfer import push_index
    a = ctx.args
    say = None if a.quiet else (lambda line: print(line, flush=True))
    result = push_index(ctx.store, a.ref, span=a.span, registry_options=ctx.registry_options(), progress=say)
    if a.quiet:
        print(result.digest)
    else:
        print(f"Published the layer index of {a.ref} ({len(result.layers)} layer(s)): {result.digest}, "
              f"attached to {result.subject} through the {result.via}")
    return 0


def _size_arg(text: str) -> int:
    """A byte count: 1048576, 64k, 16M, 1G (powers of 1024)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in ("k", "m", "g") else t
    if not num.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 1048576, 512k, 16M)")
    return int(num) * mult


def _add_change_commands(sub) -> None:
    s = sub.add_parser("diff", help="list what a mount changed (A added, C changed, D deleted)")
    s.add_argument("target", metavar="MOUNTPOINT|UPPER", help="a layerfs mount, or an upper directory with --image")
    s.add_argument("--image", metavar="REF", help="the image an upper directory (not a mount) sits on")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("commit", help="make a new image from a mount's changes (one layer more)")
    s.add_argument("target", metavar="MOUNTPOINT|UPPER", help="a layerfs mount, or an upper directory with --image")
    s.add_argument("newref", metavar="NEWREF", help="name of the new image, NAME[:TAG]")
    s.add_argument("-m", "--message", help="commit message (the history comment)")
    s.add_argument("-a", "--author", help="author, e.g. 'Jane Doe <jane@example.com>'")
    s.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction to the config: CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, "
                        "ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR (repeatable)")
    s.add_argument("--image", metavar="REF", help="the image an upper directory (not a mount) sits on")
    s.set_defaults(func=cmd_commit)

    s = sub.add_parser("push", help="upload an image to a registry")
    s.add_argument("ref", metavar="REF", help="a local image")
    s.add_argument("newref", nargs="?", metavar="NEWREF", help="push under this name instead (NAME[:TAG])")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the pushed reference")
    s.add_argument("--max-concurrent-uploads", type=int, default=3, metavar="N")
    s.add_argument("--chunk-threshold", type=_size_arg, default=None, metavar="SIZE",
                   help="upload blobs larger than this in chunks (default 64M)")
    s.add_argument("--chunk-size", type=_size_arg, default=None, metavar="SIZE", help="chunk size (default 16M)")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("index", help="publish the layer indexes of an image (for lazy mounts of plain gzip images)")
    isub = s.add_subparsers(dest="index_command", metavar="COMMAND")
    i = isub.add_parser("push", help="publish the layer indexes of a local image to its registry, attached to "
                                     "the image (referrers API, else the sha256-<hex> tag)")
    i.add_argument("ref", metavar="REF", help="a local image, by the name it was pushed or pulled as")
    i.add_argument("--span", type=_size_arg, default=1 << 20, metavar="SIZE",
                   help="uncompressed bytes between checkpoints: about what a lazy read fetches (default 1M)")
    i.add_argument("-q", "--quiet", action="store_true", help="print only the digest of the index artifact")
    i.set_defaults(func=cmd_index_push)

    s = sub.add_parser("export", help="write the merged tree of an image or a mount as one tar")
    s.add_argument("target", metavar="REF|MOUNTPOINT")
    s.add_argument("-o", "--output", metavar="FILE", help="write to FILE ('-' or absent: standard output)")
    s.add_argument("--upper", metavar="DIR", help="an upper directory to apply over the image REF")
    s.set_defaults(func=cmd_export)


# --- parser --------------------------------------------------------------------------

def _add_store_commands(sub) -> None:
    s = sub.add_parser("store", help="serve layers to container engines (containers/storage additional layer store)")
    ssub = s.add_subparsers(dest="store_command", metavar="COMMAND")
    v = ssub.add_parser("serve", help="mount an additional layer store for podman/CRI-O at MOUNTPOINT "
                                      "(storage.conf: additionallayerstores = [\"MOUNTPOINT:ref\"])")
    v.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    v.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    v.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other; nonempty allows a non-empty MOUNTPOINT")
    v.add_argument("--grace", type=float, default=600.0, metavar="SECONDS",
                   help="forget a layer no engine uses after this long (default 600)")
    v.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_store_serve)

    def no_command(ctx: Context) -> int:
        s.print_help(sys.stderr)
        return 2
    s.set_defaults(func=no_command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfs", description="Pull OCI/Docker images and mount them as a union filesystem.")
    p.add_argument("--root", default=None, help="store directory (default /var/lib/layerfs as root, "
                                                "$XDG_DATA_HOME/layerfs otherwise; env LAYERFS_ROOT)")
    p.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]",
                   help="talk plain HTTP to this registry (repeatable; env LAYERFS_INSECURE_REGISTRIES)")
    p.add_argument("-D", "--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--version", action="version", version=f"layerfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("pull", help="download an image into the store (or import oci:DIR[:REF], "
                                    "oci-archive:FILE[:REF], docker-archive:FILE[:TAG])")
    s.add_argument("ref", metavar="REF")
    s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the image reference")
    s.add_argument("--max-concurrent-downloads", type=int, default=6, metavar="N",
                   help="layers downloaded at once (default 6, as skopeo)")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("load", help="load images from a docker save archive or an OCI archive/layout")
    s.add_argument("file", nargs="?", metavar="FILE", help="the archive (or OCI layout directory), with or without "
                                                           "a transport: oci:, oci-archive:, docker-archive:")
    s.add_argument("-i", "--input", metavar="FILE", help="read from FILE instead of standard input")
    s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform OCI image")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_load)

    def images_args(s):
        s.add_argument("filter_ref", nargs="?", metavar="REPOSITORY[:TAG]")
        s.add_argument("-q", "--quiet", action="store_true", help="only image ids")
        s.add_argument("--digests", action="store_true", help="show digests")
        s.add_argument("--no-trunc", action="store_true", help="full image ids")
        s.add_argument("--format", choices=["table", "json"], default=None)
        s.set_defaults(func=cmd_images)

    images_args(sub.add_parser("images", help="list local images"))
    img = sub.add_parser("image", help="image commands (ls)")
    isub = img.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    images_args(isub.add_parser("ls", aliases=["list"], help="list local images"))

    s = sub.add_parser("history", help="show the layers of an image")
    s.add_argument("ref", metavar="REF")
    s.add_argument("--no-trunc", action="store_true")
    s.add_argument("-H", "--human", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="human sizes and dates (default true; -H=false for raw)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("inspect", help="image details as JSON")
    s.add_argument("refs", nargs="+", metavar="REF")
    s.add_argument("-f", "--format", help="Go-template-like field path, e.g. '{{.Id}}' or '{{json .Config}}'")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("search", help="search Docker Hub (or --index) for images")
    s.add_argument("term", metavar="TERM")
    s.add_argument("--limit", type=int, default=25)
    s.add_argument("--no-trunc", action="store_true")
    s.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE")
    s.add_argument("--format", choices=["table", "json"], default=None)
    s.add_argument("--index", default=None, metavar="URL",
                   help="search index URL (default https://index.docker.io; env LAYERFS_SEARCH_INDEX)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("rmi", help="remove images (untag; delete blobs nothing else uses)")
    s.add_argument("refs", nargs="+", metavar="REF")
    s.add_argument("-f", "--force", action="store_true")
    s.add_argument("--no-prune", action="store_true", help="only untag")
    s.set_defaults(func=cmd_rmi)

    s = sub.add_parser("prune", help="delete blobs no image references")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("login", help="log in to a registry")
    s.add_argument("server", nargs="?", metavar="SERVER")
    s.add_argument("-u", "--username")
    s.add_argument("-p", "--password")
    s.add_argument("--password-stdin", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_login)

    s = sub.add_parser("logout", help="log out from a registry")
    s.add_argument("server", nargs="?", metavar="SERVER")
    s.set_defaults(func=cmd_logout)

    s = sub.add_parser("mount", help="mount an image (pulled if absent); returns once the mount answers")
    s.add_argument("ref", metavar="REF")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    s.add_argument("--read-only", action="store_true",
                   help="read-only mount (default: writable, changes go to an upper directory)")
    s.add_argument("--upper", metavar="DIR",
                   help="upper directory for the changes (made if missing; remount with it to see them again); "
                        "default: a new one in the store, kept until 'layerfs umount --rm' or 'layerfs rm ID'")
    s.add_argument("--layer", type=int, metavar="N", help="show the image as it was after its first N layers")
    s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pull when the image is not local")
    s.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other, suid, dev; nonempty allows a non-empty MOUNTPOINT; "
                        "volatile (writable mounts) syncs nothing while mounted, as kernel overlayfs's option; "
                        "index=on keeps the names of a copied-up lower hard-linked file one inode (default "
                        "index=off: they split, as Docker's overlay2)")
    s.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    s.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="mount from the registry without pulling: eStargz layers, and gzip layers whose index "
                        "was published ('layerfs index push'), are fetched as files are read (others are pulled "
                        "whole); env LAYERFS_LAZY=1 does so for images that are not local, --no-lazy pulls them")
    s.add_argument("--prefetch", choices=["none", "landmark", "all"], default=None,
                   help="with --lazy: fetch in the background, at low priority, nothing (default), the files "
                        "before an eStargz layer's .prefetch.landmark, or everything")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("convert", help="write a converted copy of a local image (eStargz layers)")
    s.add_argument("--estargz", action="store_true", help="convert the layers to eStargz (lazily mountable)")
    s.add_argument("--chunk-size", type=_size_arg, default=4 << 20, metavar="SIZE",
                   help="eStargz chunk size of large files (default 4MiB)")
    s.add_argument("src", metavar="SRC")
    s.add_argument("newref", metavar="NEWREF")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("umount", aliases=["unmount"], help="unmount a layerfs mount")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--rm", action="store_true", help="also delete the mount's upper directory (if the store's)")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("rm", help="delete upper directories the store keeps for writable mounts")
    s.add_argument("ids", nargs="+", metavar="ID|UPPER", help="the id (ROOT/uppers/ID) or the upper's path")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("mounts", help="list layerfs mounts: running, or dead (daemon gone; 'umount' cleans up)")
    s.add_argument("-q", "--quiet", action="store_true", help="only mount points")
    s.add_argument("--format", choices=["table", "json"], default=None)
    s.set_defaults(func=cmd_mounts)

    _add_change_commands(sub)
    _add_store_commands(sub)

    s = sub.add_parser("version", help="print the version")
    s.set_defaults(func=cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="layerfs: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    ctx = Context(args, program=argv is None)
    try:
        return args.func(ctx)
    except LayerfsError as e:
        if args.debug:
            log.exception("failed")
        print(f"layerfs: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except PermissionError as e:
        if args.debug:
            log.exception("failed")
        print(f"layerfs: error: {e.filename or ''}: permission denied "
              f"(hint: run as root or choose a store you own with --root)", file=sys.stderr)
        return 1
    except OSError as e:
        if args.debug:
            log.exception("failed")
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"layerfs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            raise
        print(f"layerfs: internal error: {type(e).__name__}: {e} (hint: rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
