"""Shared helpers for the layerfs benchmarks (scripts/bench_pull.py, scripts/bench.py).

Nothing here imports layerfs: the benchmarks drive layerfs through its command
line, exactly as a user would, and build/push their images themselves so they
work whatever state the rest of the tree is in.

- image generation: layers are streamed (tar -> gzip -> file) while both the
  compressed digest and the diff_id are computed, so a 450 MB image never sits
  in memory; the result is an OCI image layout (cached in a work directory);
- a throw-away docker-registry (CNCF distribution) on 127.0.0.1, random port,
  generated config, temporary storage, always stopped;
- a minimal registry push (monolithic blob uploads + manifest PUT);
- timing, cache dropping, /proc helpers, mount cleanup, Markdown tables.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY_BIN = "/usr/bin/docker-registry"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1704067200  # 2024-01-01, fixed so generated layers are reproducible


class BenchError(Exception):
    """A benchmark step failed; the message says which."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every ``finally`` (unmount, stop registry) runs."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)


# --- layer / image generation ------------------------------------------------------------

class _HashOut:
    """File-like sink: raw (uncompressed) bytes in, gzip to a file, both digests computed."""

    def __init__(self, path: Path, level: int):
        self.path = path
        self.f = open(path, "wb")
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0: reproducible
        self.diff = hashlib.sha256()
        self.comp = hashlib.sha256()
        self.usize = 0
        self.csize = 0

    def _out(self, b: bytes) -> None:
        if b:
            self.f.write(b)
            self.comp.update(b)
            self.csize += len(b)

    def write(self, b) -> int:
        b = bytes(b)
        self.diff.update(b)
        self.usize += len(b)
        self._out(self.z.compress(b))
        return len(b)

    def close(self) -> None:
        self._out(self.z.flush())
        self.f.close()


@dataclass
class LayerBlob:
    path: Path              # the gzip blob (inside the OCI layout)
    digest: str             # sha256:... of the compressed bytes
    size: int               # compressed size
    diff_id: str            # sha256:... of the uncompressed tar
    usize: int              # uncompressed size
    entries: int            # tar members
    comment: str = ""


class LayerWriter:
    """Streams one gzip layer: ``with LayerWriter(dir, level) as w: w.file(...); ...`` -> ``w.blob``."""

    def __init__(self, directory: Path, level: int = 6, comment: str = ""):
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".layer-", suffix=".tmp")
        os.close(fd)
        self.directory = directory
        self.out = _HashOut(Path(tmp), level)
        self.tar = tarfile.open(fileobj=self.out, mode="w|", format=tarfile.PAX_FORMAT)
        self.entries = 0
        self.comment = comment
        self.blob: LayerBlob | None = None

    def _info(self, path: str, type_: bytes, mode: int, **kw) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path.lstrip("/"))
        ti.type = type_
        ti.mode = mode
        ti.mtime = kw.pop("mtime", MTIME)
        ti.uid = kw.pop("uid", 0)
        ti.gid = kw.pop("gid", 0)
        ti.uname = kw.pop("uname", "root")
        ti.gname = kw.pop("gname", "root")
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def add(self, ti: tarfile.TarInfo, fileobj=None) -> None:
        self.tar.addfile(ti, fileobj)
        self.entries += 1

    def dir(self, path: str, mode: int = 0o755, **kw) -> None:
        self.add(self._info(path, tarfile.DIRTYPE, mode, **kw))

    def file(self, path: str, data: bytes, mode: int = 0o644, **kw) -> None:
        import io
        ti = self._info(path, tarfile.REGTYPE, mode, size=len(data), **kw)
        self.add(ti, io.BytesIO(data))

    def stream_file(self, path: str, size: int, chunks: Iterable[bytes], mode: int = 0o644) -> None:
        """A big file whose content comes from an iterator of chunks totalling *size* bytes."""
        ti = self._info(path, tarfile.REGTYPE, mode, size=size)
        self.add(ti, _ChunkReader(chunks, size))

    def symlink(self, path: str, target: str) -> None:
        self.add(self._info(path, tarfile.SYMTYPE, 0o777, linkname=target))

    def hardlink(self, path: str, target: str) -> None:
        self.add(self._info(path, tarfile.LNKTYPE, 0o644, linkname=target.lstrip("/")))

    def whiteout(self, path: str) -> None:
        d, _, name = path.lstrip("/").rpartition("/")
        self.file((d + "/" if d else "") + ".wh." + name, b"", mode=0o644)

    def opaque(self, directory: str) -> None:
        self.file(directory.strip("/") + "/.wh..wh..opq", b"", mode=0o644)

    def close(self) -> LayerBlob:
        self.tar.close()
        self.out.close()
        digest = "sha256:" + self.out.comp.hexdigest()
        final = self.directory / self.out.comp.hexdigest()
        os.replace(self.out.path, final)
        self.blob = LayerBlob(final, digest, self.out.csize, "sha256:" + self.out.diff.hexdigest(),
                              self.out.usize, self.entries, self.comment)
        return self.blob

    def __enter__(self) -> "LayerWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.tar.close()
            with contextlib.suppress(Exception):
                self.out.f.close()
            with contextlib.suppress(OSError):
                os.unlink(self.out.path)


class _ChunkReader:
    """tarfile reads file data with .read(n); feed it from a chunk iterator."""

    def __init__(self, chunks: Iterable[bytes], size: int):
        self.it = iter(chunks)
        self.buf = b""
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.left
        while len(self.buf) < n:
            try:
                self.buf += next(self.it)
            except StopIteration:
                break
        out, self.buf = self.buf[:n], self.buf[n:]
        self.left -= len(out)
        return out


def random_chunks(size: int, seed: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """*size* incompressible, reproducible bytes."""
    rng = random.Random(seed)
    while size > 0:
        n = min(chunk, size)
        yield rng.randbytes(n)
        size -= n


_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there been one all we their has would when if so no what can more out up other "
          "into could them some than then only its time new about two may these first any my now such like our "
          "over man me even most made after also did many before must through years where much your way well "
          "down should because each just those people how too little state good very make world still own see "
          "men work long here get both between life being under never day same another know while last might "
          "layer image registry blob digest manifest config tar gzip mount overlay whiteout opaque union").split()


class TextSource:
    """Compressible English-like text (gzip ~3:1), generated once and sliced at shifting offsets."""

    def __init__(self, seed: int = 7, pool: int = 4 << 20):
        rng = random.Random(seed)
        lines = []
        total = 0
        while total < pool:
            line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + "\n"
            if rng.random() < 0.1:
                line = f"{rng.randint(0, 1 << 30):#x} = {rng.random():.12f};  # {line}"
            lines.append(line)
            total += len(line)
        self.pool = "".join(lines).encode()
        self.rng = random.Random(seed + 1)

    def take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            start = self.rng.randrange(0, len(self.pool) - 1)
            out += self.pool[start:start + (n - len(out))]
        return bytes(out)

    def chunks(self, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        while size > 0:
            n = min(chunk, size)
            yield self.take(n)
            size -= n


@dataclass
class Image:
    """A generated image as an OCI layout on disk (layout/ with index.json, blobs/sha256/...)."""
    layout: Path
    layers: list[LayerBlob]
    config_digest: str
    config_size: int
    manifest_digest: str
    manifest_size: int
    meta: dict = field(default_factory=dict)

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    @property
    def compressed_size(self) -> int:
        return sum(l.size for l in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(l.usize for l in self.layers)

    @property
    def entries(self) -> int:
        return sum(l.entries for l in self.layers)

    def to_json(self) -> dict:
        return {"layers": [{**l.__dict__, "path": str(l.path)} for l in self.layers],
                "config_digest": self.config_digest, "config_size": self.config_size,
                "manifest_digest": self.manifest_digest, "manifest_size": self.manifest_size, "meta": self.meta}

    @classmethod
    def from_json(cls, layout: Path, d: dict) -> "Image":
        layers = [LayerBlob(**{**l, "path": Path(l["path"])}) for l in d["layers"]]
        return cls(layout, layers, d["config_digest"], d["config_size"], d["manifest_digest"], d["manifest_size"],
                   d.get("meta", {}))


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def cached_image(workdir: Path, name: str, spec: dict,
                 build_layers: Callable[[Path], tuple[list[LayerBlob], dict]]) -> Image:
    """Build the image described by *spec* once; later calls with the same spec reuse it.

    ``build_layers(blobdir)`` writes the gzip layers into *blobdir* (with :class:`LayerWriter`)
    and returns them (bottom first) plus free-form metadata kept with the image.
    """
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = workdir / f"image-{name}-{key}"
    done = root / "image.json"
    layout = root / "layout"
    if done.exists():
        try:
            img = Image.from_json(layout, json.loads(done.read_text()))
            if all(l.path.exists() and l.path.stat().st_size == l.size for l in img.layers):
                log(f"using cached image {root}")
                return img
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if root.exists():
        shutil.rmtree(root)
    blobdir = layout / "blobs" / "sha256"
    blobdir.mkdir(parents=True)
    t0 = time.monotonic()
    log(f"generating image {name} in {root} ...")
    layers, meta = build_layers(blobdir)
    config = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"benchlib: {l.comment or 'layer'}"}
                    for l in layers],
    }
    config_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _sha(config_raw), "size": len(config_raw)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": l.digest, "size": l.size} for l in layers],
    }
    manifest_raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    for raw in (config_raw, manifest_raw):
        (blobdir / _sha(raw).split(":")[1]).write_bytes(raw)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": _sha(manifest_raw), "size": len(manifest_raw),
                       "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))
    img = Image(layout, layers, _sha(config_raw), len(config_raw), _sha(manifest_raw), len(manifest_raw), meta)
    done.write_text(json.dumps(img.to_json(), indent=1))
    log(f"generated in {time.monotonic() - t0:.1f} s: {len(layers)} layers, {img.entries} entries, "
        f"{mb(img.uncompressed_size)} uncompressed, {mb(img.compressed_size)} compressed")
    return img


# --- registry --------------------------------------------------------------------------

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


def _http(host: str, method: str, path: str, body=None, headers: dict | None = None,
          timeout: float = 300) -> tuple[int, dict, bytes]:
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
        st, _, _ = _http(host, "HEAD", f"/v2/{repo}/blobs/{digest}")
        if st == 200:
            return
        st, hdr, body = _http(host, "POST", f"/v2/{repo}/blobs/uploads/")
        if st != 202:
            raise BenchError(f"push {host}/{repo}: upload start failed: HTTP {st} {body[:200]!r}")
        loc = hdr["location"]
        if loc.startswith("http"):
            loc = "/" + loc.split("/", 3)[3]
        loc += ("&" if "?" in loc else "?") + "digest=" + digest
        with open(path, "rb") as f:
            st, _, body = _http(host, "PUT", loc, body=f,
                                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if st != 201:
            raise BenchError(f"push {host}/{repo}: blob {digest[:19]} failed: HTTP {st} {body[:200]!r}")

    for l in img.layers:
        put_blob(l.digest, l.path, l.size)
    put_blob(img.config_digest, img.blob_path(img.config_digest), img.config_size)
    raw = img.blob_path(img.manifest_digest).read_bytes()
    st, _, body = _http(host, "PUT", f"/v2/{repo}/manifests/{tag}", body=raw,
                        headers={"Content-Type": OCI_MANIFEST})
    if st != 201:
        raise BenchError(f"push {host}/{repo}:{tag}: manifest failed: HTTP {st} {body[:200]!r}")
    return img.manifest_digest


# --- processes, timing, system -----------------------------------------------------------

def layerfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerfs", *args]


_PYCACHE: Path | None = None


def use_pycache(directory: Path | None) -> str:
    """Let layerfs runs write and reuse byte code under *directory* (PYTHONPYCACHEPREFIX), as an
    installed package would (pip compiles .pyc at install time), even where the environment says
    PYTHONDONTWRITEBYTECODE; then compile layerfs and its FUSE stack once, untimed.
    ``None`` leaves the environment as it is. Returns a line for the report."""
    global _PYCACHE
    _PYCACHE = directory
    if directory is None:
        how = "as the environment has it"
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            how += " (PYTHONDONTWRITEBYTECODE is set: every layerfs start compiles its modules)"
        return f"layerfs byte code: {how}"
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import importlib, pkgutil, layerfs\n"
                    "for m in pkgutil.iter_modules(layerfs.__path__):\n"
                    "    try: importlib.import_module('layerfs.' + m.name)\n"
                    "    except Exception: pass"],
                   env=layerfs_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    return f"layerfs byte code: cached in {directory} (PYTHONPYCACHEPREFIX), like an installed package"


def layerfs_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if _PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(_PYCACHE)
    return env


@dataclass
class Run:
    seconds: float
    stdout: str
    stderr: str


def run(cmd: Sequence[str] | str, *, timeout: float = 900, env: dict | None = None, cwd: Path | str | None = None,
        what: str | None = None, shell: bool = False, capture: bool = True) -> Run:
    """Run, time (wall clock), raise BenchError with the tail of stderr on failure or timeout."""
    what = what or (cmd if isinstance(cmd, str) else " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, shell=shell, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, errors="replace")
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s") from None
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        raise BenchError(f"{what}: exit {p.returncode}: {' | '.join(tail) or '(no stderr)'}")
    return Run(dt, p.stdout or "", p.stderr or "")


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return sum(v[:8]), idle


def cpu_busy(interval: float = 0.25) -> float:
    """CPU cores busy (all processes) over *interval* seconds."""
    t0, i0 = _cpu_times()
    time.sleep(interval)
    t1, i1 = _cpu_times()
    return 0.0 if t1 == t0 else (1 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


class QuietGate:
    """Before a timed sample, wait (up to *timeout* s) until the machine is nearly idle, so other
    people's builds and tests on a shared box do not land in one tool's time. Counts the samples
    that had to start anyway."""

    def __init__(self, max_cores: float = 0.35, timeout: float = 30, enabled: bool = True):
        self.max_cores, self.timeout, self.enabled = max_cores, timeout, enabled
        self.samples = 0
        self.noisy = 0
        self.waited = 0.0

    def wait(self) -> None:
        if not self.enabled:
            return
        self.samples += 1
        t0 = time.monotonic()
        while True:
            busy = cpu_busy()
            if busy <= self.max_cores:
                break
            if time.monotonic() - t0 > self.timeout:
                self.noisy += 1
                break
        self.waited += time.monotonic() - t0

    def summary(self) -> str:
        if not self.enabled:
            return "quiet-machine gate off"
        return (f"waited {self.waited:.0f} s in all for an idle machine (<= {self.max_cores} cores busy); "
                f"{self.noisy} of {self.samples} samples started on a busy machine anyway")


def interleaved(runs: int, variants: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, variant) for *runs* rounds of every variant, the order reversed every other round, so that
    neither the first nor the last place of a round is always the same variant's."""
    order = list(variants)
    for r in range(runs):
        for v in (order if r % 2 == 0 else order[::-1]):
            yield r, v


@contextlib.contextmanager
def failure_noted(failures: list[str], r: int, runs: int, variant: str,
                  errors: tuple[type[BaseException], ...] = (BenchError,)) -> Iterator[None]:
    """One run of round *r*: an error of *errors* is logged and noted in *failures*, and the rounds go on."""
    try:
        yield
    except errors as e:
        failures.append(f"run {r + 1} {variant}: {e}")
        log(f"run {r + 1}/{runs} {variant} FAILED: {e}")


def drop_caches() -> None:
    """Write back and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop caches ({e}); cold runs need root") from None


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def mountpoints() -> set[str]:
    """Mount points from /proc/self/mountinfo (never stats a possibly hung FUSE mount)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.add(mp.encode().decode("unicode_escape"))
    return out


def is_mounted(path: Path | str) -> bool:
    return os.path.normpath(os.path.abspath(path)) in mountpoints()  # callers pass resolved paths


def wait_mounted(path: Path | str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None and not is_mounted(path):
            raise BenchError(f"mount of {path}: the mounting process exited ({proc.returncode}) without mounting")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not mounted after {timeout:.0f} s")
        time.sleep(0.002)


def force_unmount(path: Path | str) -> None:
    """Best effort: fusermount3 -u, then umount, then umount -l."""
    path = str(path)
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)


def fs_type(path: Path | str) -> str:
    """File-system type of the mount holding *path* (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, typ = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].encode().decode("unicode_escape")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, typ = mp, right.split()[0]
    return typ


def pids_serving(mountpoint: Path | str, exclude: Iterable[int] = ()) -> list[int]:
    """Processes whose command line names *mountpoint* (the FUSE daemon), oldest first."""
    target = os.path.normpath(os.path.abspath(mountpoint)).encode()  # no realpath: never stat a FUSE mount
    skip = {os.getpid(), *exclude}
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in skip:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(os.path.normpath(a) == target for a in args if a.startswith(b"/")):
            try:
                found.append((os.stat(f"/proc/{d}").st_mtime, int(d)))
            except OSError:
                pass
    return [p for _, p in sorted(found)]


def proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_hwm_kb(pid: int) -> int | None:
    """VmHWM of *pid* plus its descendants (a daemon may fork worker processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo, seen = 0, [pid], set()
    got = False
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        v = proc_status_kb(p, "VmHWM")
        if v is not None:
            total += v
            got = True
        todo.extend(children.get(p, []))
    return total if got else None


def wait_gone(pid: int, timeout: float = 10) -> bool:
    """True once *pid* has exited (or is a zombie), False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def kill_pid(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, 5):
            return


# --- statistics and output -----------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x < 0.1:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    return f"{x:.2f} s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# --- write workloads -------------------------------------------------------------------------

@dataclass
class Archive:
    """A plain (uncompressed) tar of many small files, for an untar workload."""
    path: Path
    files: int
    dirs: int
    file_bytes: int


def cached_small_archive(workdir: Path, files: int, per_dir: int = 200, seed: int = 11) -> Archive:
    """An uncompressed tar of *files* small text files (16..3000 bytes, ``dNNN/fNNNNN.txt``, *per_dir*
    to a directory), written once into *workdir* and reused while its parameters are the same."""
    spec = {"version": 1, "files": files, "per_dir": per_dir, "seed": seed}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = workdir / f"untar-{files}-{key}.tar"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(meta.read_text())
            if path.stat().st_size == d["size"]:
                return Archive(path, d["files"], d["dirs"], d["file_bytes"])
    import io
    rng = random.Random(seed)
    text = TextSource(seed=seed, pool=1 << 20)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".untar-", suffix=".tmp")
    os.close(fd)
    ndirs = total = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            def info(name: str, type_: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
                ti = tarfile.TarInfo(name)
                ti.type, ti.mode, ti.size, ti.mtime = type_, mode, size, MTIME
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                return ti
            for n in range(files):
                if n % per_dir == 0:
                    tar.addfile(info(f"d{n // per_dir:03d}", tarfile.DIRTYPE, 0o755))
                    ndirs += 1
                data = text.take(rng.randint(16, 3000))
                total += len(data)
                tar.addfile(info(f"d{n // per_dir:03d}/f{n:05d}.txt", tarfile.REGTYPE, 0o644, len(data)),
                            io.BytesIO(data))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    meta.write_text(json.dumps({"size": path.stat().st_size, "files": files, "dirs": ndirs, "file_bytes": total}))
    log(f"generated {path} ({files} files, {mb(path.stat().st_size)})")
    return Archive(path, files, ndirs, total)


def tree_counts(root: Path | str) -> tuple[int, int, int]:
    """(regular files, directories below *root*, bytes in the regular files), no symlinks followed."""
    files = dirs = size = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
    return files, dirs, size


def proc_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds used so far by *pid*, all its threads (/proc/PID/stat utime, stime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return int(v[11]) / hz, int(v[12]) / hz


_OUTER = ("layerfs/cli.py", "layerfs/mount.py", "serve_overlay (", "serve (layerfs/fusefs.py")


def _module_of(frame: str) -> str:
    """A coarse owner for a py-spy frame ``func (path/file.py)``: a layerfs file, or other."""
    path = frame.rpartition(" (")[2].rstrip(")")
    if "layerfs/" in path:
        return "layerfs/" + path.rpartition("layerfs/")[2]
    return "other (stdlib ...)"


def pyspy_summary(raw: Path, top: int = 12) -> list[str]:
    """Lines summarising a ``py-spy record --format raw --threads`` file (collapsed stacks), as % of all
    samples: the split between the main thread (the one that started as the main
    program) and the others (worker threads); the samples grouped by the module on top of the stack;
    the functions most often on top of the stack (self); layerfs's own functions by inclusive samples,
    the daemon's start-up chain (cli, mount, serve) left out. Line numbers are dropped."""
    import re
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    mods: dict[str, int] = {}
    main_n = total = 0
    with open(raw, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";") if fr]
            while frames and frames[0].startswith(("process ", "thread ")):
                frames = frames[1:]
            if not frames:
                continue
            total += n
            if frames[0].startswith("_run_module_as_main"):
                main_n += n
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
            m = _module_of(frames[-1])
            mods[m] = mods.get(m, 0) + n
            for fr in set(frames):
                if "layerfs/" in fr and not any(o in fr for o in _OUTER):
                    incl[fr] = incl.get(fr, 0) + n
    if not total:
        return ["(no samples)"]
    pc = lambda c: f"{100 * c / total:5.1f}%"  # noqa: E731
    out = [f"{total} samples: {pc(main_n).strip()} in the main thread, "
           f"{pc(total - main_n).strip()} in worker threads", "by module (top of stack):"]
    out += [f"  {pc(c)}  {m}" for m, c in sorted(mods.items(), key=lambda x: -x[1])[:6]]
    out.append("self (top of stack):")
    out += [f"  {pc(c)}  {fr}" for fr, c in sorted(selfc.items(), key=lambda x: -x[1])[:top]]
    out.append("layerfs functions, inclusive:")
    out += [f"  {pc(c)}  {fr}" for fr, c in sorted(incl.items(), key=lambda x: -x[1])[:top]]
    return out


# --- command lines and outcomes shared by the benchmarks ----------------------------------------------

def add_network_args(ap) -> None:
    """The options of the benchmarks that pull through a throttled link (bench_lazy, bench_engine)."""
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/layerfs-bench"),
                    help="image cache and scratch space (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=None, help="runs per variant (default 3, --quick 1)")
    ap.add_argument("--mbit", type=float, default=None,
                    help="proxy bandwidth, Mbit/s (default 100, --quick 1000; 0: unlimited)")
    ap.add_argument("--quick", action="store_true", help="small image, 1 run, fast link: a smoke test")
    ap.add_argument("--timeout", type=float, default=900, help="per step (s)")
    ap.add_argument("--fail-on-target", action="store_true", help="exit 3 if the target is missed")


def network_settings(args) -> tuple[int, float]:
    """(runs, Mbit/s) from the options :func:`add_network_args` added."""
    runs = args.runs or (1 if args.quick else 3)
    mbit = args.mbit if args.mbit is not None else (1000.0 if args.quick else 100.0)
    return runs, mbit


def exit_status(failures: Sequence[str], verdict: bool | None, fail_on_target: bool) -> int:
    """A benchmark's exit code: 1 when a run failed (listed), 3 when the target is missed and that
    was asked to fail, else 0."""
    if failures:
        print("\nfailures:\n" + "\n".join("- " + f for f in failures))
        return 1
    if fail_on_target and verdict is False:
        return 3
    return 0
