"""``pull`` and ``load``: images into the store, from a registry or from a local archive or layout."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import stat
import sys
import tempfile
from typing import TYPE_CHECKING

from layerfs.cli.display import PullProgress
from layerfs.errors import UsageError
from layerfs.image import Platform, Reference, is_local_source
from layerfs.transfer import LoadOptions, Puller, PullOptions, load

if TYPE_CHECKING:
    from layerfs.cli.main import Context


def add_arguments(command: str, s: argparse.ArgumentParser) -> None:
    if command == "pull":
        s.add_argument("ref", metavar="REF")
        s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
        s.add_argument("-q", "--quiet", action="store_true", help="print only the image reference")
        s.add_argument("--max-concurrent-downloads", type=int, default=6, metavar="N",
                       help="layers downloaded at once (default 6, as skopeo)")
        s.set_defaults(func=cmd_pull)
    elif command == "load":
        s.add_argument("file", nargs="?", metavar="FILE", help="the archive (or OCI layout directory), with or "
                                                               "without a transport: oci:, oci-archive:, "
                                                               "docker-archive:")
        s.add_argument("-i", "--input", metavar="FILE", help="read from FILE instead of standard input")
        s.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform OCI image")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        s.set_defaults(func=cmd_load)


def cmd_pull(ctx: Context) -> int:
    a = ctx.args
    if is_local_source(a.ref):   # oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:TAG]: no registry
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


def _load_stdin(ctx: Context, opts: LoadOptions, progress: PullProgress | None):
    """An archive on standard input: read in place when it is a file, else spooled beside the store first."""
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
