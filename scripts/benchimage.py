"""Images and archives for the layerfs benchmarks, generated once and cached in a work directory.

Layers are streamed (tar -> gzip -> file) while both the compressed digest and the diff_id are
computed, so a 450 MB image never sits in memory; the result is an OCI image layout
(:func:`cached_image`). :func:`cached_small_archive` is the tar of many small files the write
workloads unpack. Nothing here imports layerfs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from benchlib import log, mb

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1704067200  # 2024-01-01, fixed so generated layers are reproducible


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
