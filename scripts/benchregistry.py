"""A throw-away docker-registry (CNCF distribution) for the layerfs benchmarks: 127.0.0.1, a random
port, a generated config, temporary storage, always stopped; and a minimal push (monolithic blob
uploads, then the manifest PUT) of a :class:`benchimage.Image`.  Nothing here imports layerfs.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchimage import OCI_MANIFEST, Image
from benchlib import BenchError

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry on 127.0.0.1:<random port> with its own config and temp storage.

    Use as a context manager; the process is always stopped and the storage removed.
    """

    def __init__(self, base: Path | None = None, keep_storage: bool = False):
        self.base = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=base))
        self.keep_storage = keep_storage
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Registry":
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise BenchError(f"{REGISTRY_BIN} not found (apt-get install docker-registry)")
        last = ""
        for attempt in range(5):
            self.port = free_port()
            cfg = self.base / "config.yml"
            cfg.write_text(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.base / 'storage'}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
""")
            logf = open(self.base / "registry.log", "ab")
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            logf.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    c.request("GET", "/v2/")
                    if c.getresponse().status == 200:
                        c.close()
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            last = (self.base / "registry.log").read_text(errors="replace")[-500:]
            self._kill()
        raise BenchError(f"docker-registry did not start: {last.strip()}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if not self.keep_storage:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def http_request(host: str, method: str, path: str, body=None, headers: dict | None = None,
                 timeout: float = 300) -> tuple[int, dict, bytes]:
    """One plain-HTTP request to the registry at *host*: (status, headers, body)."""
    h, p = host.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(p), timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def push_image(host: str, repo: str, tag: str, img: Image) -> str:
    """Push an :class:`Image` (blobs streamed from disk); returns the manifest digest."""
    def put_blob(digest: str, path: Path, size: int) -> None:
        st, _, _ = http_request(host, "HEAD", f"/v2/{repo}/blobs/{digest}")
        if st == 200:
            return
        st, hdr, body = http_request(host, "POST", f"/v2/{repo}/blobs/uploads/")
        if st != 202:
            raise BenchError(f"push {host}/{repo}: upload start failed: HTTP {st} {body[:200]!r}")
        loc = hdr["location"]
        if loc.startswith("http"):
            loc = "/" + loc.split("/", 3)[3]
        loc += ("&" if "?" in loc else "?") + "digest=" + digest
        with open(path, "rb") as f:
            st, _, body = http_request(host, "PUT", loc, body=f,
                                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if st != 201:
            raise BenchError(f"push {host}/{repo}: blob {digest[:19]} failed: HTTP {st} {body[:200]!r}")

    for l in img.layers:
        put_blob(l.digest, l.path, l.size)
    put_blob(img.config_digest, img.blob_path(img.config_digest), img.config_size)
    raw = img.blob_path(img.manifest_digest).read_bytes()
    st, _, body = http_request(host, "PUT", f"/v2/{repo}/manifests/{tag}", body=raw,
                        headers={"Content-Type": OCI_MANIFEST})
    if st != 201:
        raise BenchError(f"push {host}/{repo}:{tag}: manifest failed: HTTP {st} {body[:200]!r}")
    return img.manifest_digest
