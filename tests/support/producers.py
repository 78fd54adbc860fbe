"""Images made and pushed by independent tools: :func:`umoci_image` builds a two-layer OCI layout with
umoci (:data:`UMOCI_EXPECTED` says what it holds), :func:`skopeo_push` pushes a layout with skopeo."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal, Sequence

from prereqs import clean_env, require_binary

from layerfs.image import Digest

UMOCI_TAG = "latest"

#: What the umoci image's final root filesystem holds (after both layers).
UMOCI_EXPECTED: dict[str, Any] = {
    "files": {
        "etc/hello.txt": b"hello from layer 2\n",
        "bin/tool": b"#!/bin/sh\necho tool\n",
        "data/keep.txt": b"kept\n",
        "data/new.txt": b"new in layer 2\n",
        "data/new-hard": b"new in layer 2\n",
    },
    "modes": {"bin/tool": 0o755, "etc/hello.txt": 0o644},
    "symlinks": {"etc/link": "hello.txt", "usr/bin/abs": "/bin/tool"},
    "dirs": ["var/empty"],
    "absent": ["data/old.txt"],
    "hardlinks": [("data/new.txt", "data/new-hard")],
    "env": ["FOO=bar"],
    "cmd": ["/bin/sh"],
    "layers": 2,
}


def _run(args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(list(args), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, env=clean_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                           f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def umoci_image(workdir: str | os.PathLike[str], *, tag: str = UMOCI_TAG) -> Path:
    """Build a two-layer image with umoci; returns the OCI layout directory (image tag *tag*).

    Layer 1: ``etc/hello.txt``, symlink ``etc/link -> hello.txt``, ``bin/tool``
    (0755), ``data/old.txt``, ``data/keep.txt``, empty dir ``var/empty``.
    Layer 2: deletes ``data/old.txt`` (a whiteout), rewrites ``etc/hello.txt``,
    adds ``data/new.txt`` hard-linked as ``data/new-hard`` and an absolute
    symlink ``usr/bin/abs -> /bin/tool``.  Config: Env FOO=bar, Cmd /bin/sh.
    :data:`UMOCI_EXPECTED` describes the result.
    """
    umoci = require_binary("umoci")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    layout, bundle = work / "oci", work / "bundle"
    ref = f"{layout}:{tag}"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    _run([umoci, "init", "--layout", str(layout)])
    _run([umoci, "new", "--image", ref])
    _run([umoci, "unpack", *rootless, "--image", ref, str(bundle)])
    root = bundle / "rootfs"
    for d in ("etc", "bin", "data", "var/empty", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hello.txt").write_bytes(b"hello from umoci\n")
    os.symlink("hello.txt", root / "etc/link")
    (root / "bin/tool").write_bytes(UMOCI_EXPECTED["files"]["bin/tool"])
    os.chmod(root / "bin/tool", 0o755)
    (root / "data/old.txt").write_bytes(b"this file is deleted in layer 2\n")
    (root / "data/keep.txt").write_bytes(UMOCI_EXPECTED["files"]["data/keep.txt"])
    _run([umoci, "repack", "--refresh-bundle", "--image", ref, str(bundle)])

    (root / "data/old.txt").unlink()
    (root / "etc/hello.txt").write_bytes(UMOCI_EXPECTED["files"]["etc/hello.txt"])
    (root / "data/new.txt").write_bytes(UMOCI_EXPECTED["files"]["data/new.txt"])
    os.link(root / "data/new.txt", root / "data/new-hard")
    os.symlink("/bin/tool", root / "usr/bin/abs")
    _run([umoci, "repack", "--refresh-bundle", "--image", ref, str(bundle)])
    _run([umoci, "config", "--image", ref, "--config.env", "FOO=bar", "--config.cmd", "/bin/sh"])
    shutil.rmtree(bundle, ignore_errors=True)
    return layout


def skopeo_push(oci_ref: str | os.PathLike[str], host: str, repo_tag: str, *,
                format: Literal["v2s2", "oci"] | None = None, auth: tuple[str, str] | None = None,
                tag: str = UMOCI_TAG, timeout: float = 120) -> Digest:
    """``skopeo copy oci:... docker://HOST/REPO:TAG`` over plain HTTP; returns the pushed manifest digest.

    *oci_ref* is ``"oci:PATH:TAG"`` or a layout directory (then *tag* is used).
    """
    skopeo = require_binary("skopeo")
    src = str(oci_ref)
    if not src.startswith("oci:"):
        src = f"oci:{src}:{tag}"
    with tempfile.TemporaryDirectory(prefix="layerfs-skopeo-") as tmp:
        digestfile = Path(tmp) / "digest"
        args = [skopeo, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                "--digestfile", str(digestfile)]
        if format is not None:
            args += ["--format", format]
        if auth is not None:
            args += ["--dest-creds", f"{auth[0]}:{auth[1]}"]
        else:
            args += ["--dest-no-creds"]
        args += [src, f"docker://{host}/{repo_tag}"]
        _run(args, timeout=timeout)
        return Digest.parse(digestfile.read_text().strip())
