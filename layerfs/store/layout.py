"""The local store: a valid OCI image layout on disk.

    ROOT/oci-layout                  {"imageLayoutVersion": "1.0.0"}
    ROOT/index.json                  tagged manifests (org.opencontainers.image.ref.name)
    ROOT/blobs/sha256/<hex>          immutable, digest-named blobs
    ROOT/ingest/<algo>-<hex>.partial partial downloads (resumable), never inside blobs/
    ROOT/layers/<algo>-<hex>.json    per-layer facts learnt while pulling (diff_id, size)
    ROOT/locks/                      flock files

Every write is temp file + fsync + verify + ``os.replace``; ``index.json`` is
read-modify-written under an exclusive lock, so concurrent pulls are safe.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from layerfs.errors import DigestMismatch, DiskFull, ImageNotFound, SizeMismatch, StoreError
from layerfs.image import (REF_NAME_ANNOTATION, Descriptor, Digest, ImageConfig, Index, Manifest, VerifyingReader,
    parse_manifest)
from layerfs.image import Reference

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
#: index.json annotation holding the digest the registry knows the image by (index digest for multi-platform)
REPO_DIGEST_ANNOTATION = "io.layerfs.repo.digest"
#: index.json annotation: digest of the manifest as the registry served it, when the store keeps an OCI form
SOURCE_MANIFEST_ANNOTATION = "io.layerfs.source.manifest"
_CHUNK = 1 << 20


def default_root() -> Path:
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/layerfs")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "layerfs"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_error(e: OSError, what: str) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left while writing {what}")
    return StoreError(f"cannot write {what}: {e.strerror or e}", hint="check permissions of the store (--root / LAYERFS_ROOT)")


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write *data* to *path* atomically (temp + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise store_error(e, str(path)) from None
    _fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass(frozen=True)
class ImageRecord:
    """One entry of index.json: a name (canonical reference) and its manifest descriptor."""

    name: str
    descriptor: Descriptor

    @property
    def reference(self) -> Reference | None:
        try:
            return Reference.parse(self.name, default_tag=False)
        except Exception:
            return None


class Ingest:
    """A resumable partial blob in ``ingest/``; :meth:`commit` verifies and moves it into ``blobs/``.

    Holds an exclusive lock on the digest, so two processes never write the
    same partial file; the second one finds the finished blob and skips it.
    """

    def __init__(self, store: "Store", digest: Digest, size: int):
        self.store = store
        self.digest = digest
        self.size = size
        self.path = store.root / "ingest" / f"{digest.algorithm}-{digest.hex}.partial"
        self._file = None

    @property
    def offset(self) -> int:
        """Bytes already present from an earlier, interrupted download."""
        try:
            n = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if n > self.size:  # bogus leftovers: start over
            self.path.unlink()
            return 0
        return n

    def open(self, offset: int):
        """Open for writing at *offset* (0 truncates)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "r+b" if offset and self.path.exists() else "wb")
        f.truncate(offset)
        f.seek(offset)
        self._file = f
        return f

    def hash_existing(self, hasher, offset: int) -> None:
        """Feed the first *offset* bytes already on disk into *hasher* (for resume)."""
        with open(self.path, "rb") as f:
            left = offset
            while left:
                b = f.read(min(_CHUNK, left))
                if not b:
                    raise SizeMismatch(f"partial blob {self.digest.short} shrank while resuming")
                hasher.update(b)
                left -= len(b)

    def discard(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def commit(self, hexdigest: str) -> Path:
        """Verify the finished partial file (size and *hexdigest* computed while writing) and publish it."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                f.close()
                raise store_error(e, f"blob {self.digest}") from None
            f.close()
        size = self.path.stat().st_size
        if size != self.size:
            self.discard()
            raise SizeMismatch(f"blob {self.digest.short} has {size} bytes, expected {self.size}")
        if hexdigest != self.digest.hex:
            self.discard()
            raise DigestMismatch(f"blob digest is {self.digest.algorithm}:{hexdigest}, expected {self.digest}")
        dest = self.store.blob_path(self.digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o444)
        os.replace(self.path, dest)
        _fsync_dir(dest.parent)
        return dest


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self._local = threading.Lock()

    # -- layout ------------------------------------------------------------------
    def init(self) -> "Store":
        """Create the layout if missing (idempotent, safe under concurrency)."""
        try:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            for sub in ("ingest", "locks", "layers"):
                (self.root / sub).mkdir(exist_ok=True)
        except OSError as e:
            raise store_error(e, f"store {self.root}") from None
        if not (self.root / "oci-layout").exists() or not (self.root / "index.json").exists():
            with self.lock():
                if not (self.root / "oci-layout").exists():
                    atomic_write(self.root / "oci-layout", json.dumps(OCI_LAYOUT).encode())
                if not (self.root / "index.json").exists():
                    atomic_write(self.root / "index.json", self._index_bytes([]))
        return self

    def lock(self, name: str = "index", *, shared: bool = False):
        return file_lock(self.root / "locks" / f"{name}.lock", shared=shared)

    # -- blobs -------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def read_blob(self, digest: Digest, size: int | None = None) -> bytes:
        """Read a (small) blob whole, verified."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                return VerifyingReader(f, digest, size, where=str(self.root)).read()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store", where=str(self.root),
                             hint="pull the image again") from None

    def open_blob(self, digest: Digest, size: int | None = None) -> VerifyingReader:
        try:
            return VerifyingReader(open(self.blob_path(digest), "rb"), digest, size, where=str(self.root))
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store", where=str(self.root),
                             hint="pull the image again") from None

    def put_blob(self, data: bytes, digest: Digest | None = None) -> Digest:
        """Store a small blob given whole; verified against *digest* when given."""
        got = Digest.of(data, digest.algorithm if digest else "sha256")
        if digest is not None and got != digest:
            raise DigestMismatch(f"blob digest is {got}, expected {digest}")
        if not self.has_blob(got, len(data)):
            atomic_write(self.blob_path(got), data, mode=0o444)
        return got

    @contextlib.contextmanager
    def ingest(self, digest: Digest, size: int) -> Iterator[Ingest]:
        """Exclusive, resumable writer for one blob (see :class:`Ingest`)."""
        with file_lock(self.root / "locks" / f"blob-{digest.algorithm}-{digest.hex}.lock"):
            ing = Ingest(self, digest, size)
            try:
                yield ing
            finally:
                if ing._file is not None:  # interrupted: keep the partial for resume
                    with contextlib.suppress(OSError):
                        ing._file.flush()
                        ing._file.close()
                    ing._file = None

    # -- per-layer facts ---------------------------------------------------------
    def layer_info(self, digest: Digest) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.root / "layers" / f"{digest.algorithm}-{digest.hex}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def set_layer_info(self, digest: Digest, info: dict[str, Any]) -> None:
        atomic_write(self.root / "layers" / f"{digest.algorithm}-{digest.hex}.json",
                     json.dumps(info, sort_keys=True).encode())

    # -- index.json --------------------------------------------------------------
    @staticmethod
    def _index_bytes(manifests: list[dict[str, Any]]) -> bytes:
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
        return json.dumps(doc, indent=2).encode() + b"\n"

    def _read_index(self) -> list[dict[str, Any]]:
        try:
            doc = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as e:
            raise StoreError(f"index.json is corrupt: {e}", where=str(self.root),
                             hint="restore it, or remove it to start an empty store (blobs are kept)") from None
        ms = doc.get("manifests") if isinstance(doc, dict) else None
        return [m for m in ms if isinstance(m, dict)] if isinstance(ms, list) else []

    def images(self) -> list[ImageRecord]:
        out = []
        for m in self._read_index():
            try:
                desc = Descriptor.from_json(m)
            except Exception:
                continue
            name = (desc.annotations or {}).get(REF_NAME_ANNOTATION)
            if name:
                out.append(ImageRecord(name, desc))
        return out

    def tag(self, name: str, descriptor: Descriptor) -> None:
        """Point *name* (a canonical reference string) at *descriptor*, replacing any old entry."""
        ann = dict(descriptor.annotations or {})
        ann[REF_NAME_ANNOTATION] = name
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, ann,
                           descriptor.platform).to_json()
        with self.lock():
            ms = [m for m in self._read_index()
                  if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != name]
            ms.append(entry)
            atomic_write(self.root / "index.json", self._index_bytes(ms))

    def untag(self, name: str) -> bool:
        with self.lock():
            ms = self._read_index()
            keep = [m for m in ms if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != name]
            if len(keep) == len(ms):
                return False
            atomic_write(self.root / "index.json", self._index_bytes(keep))
            return True

    # -- resolving ---------------------------------------------------------------
    def find(self, ref: Reference) -> ImageRecord | None:
        """The record for *ref*: by exact name, or by manifest digest for digest references."""
        images = self.images()
        want = str(ref)
        for rec in images:
            if rec.name == want:
                return rec
        if ref.digest is not None:
            for rec in images:
                r = rec.reference
                if r is not None and r.name == ref.name and rec.descriptor.digest == ref.digest:
                    return rec
        return None

    def find_by_id(self, prefix: str) -> list[ImageRecord]:
        """Records whose image id (config digest) or manifest digest starts with *prefix*."""
        p = prefix.removeprefix("sha256:").lower()
        if len(p) < 4 or any(c not in "0123456789abcdef" for c in p):
            return []
        out = []
        for rec in self.images():
            if rec.descriptor.digest.hex.startswith(p):
                out.append(rec)
                continue
            try:
                m = self.manifest(rec.descriptor.digest)
            except Exception:
                continue
            if isinstance(m, Manifest) and m.config.digest.hex.startswith(p):
                out.append(rec)
        return out

    def manifest(self, digest: Digest) -> Manifest | Index:
        raw = self.read_blob(digest)
        return parse_manifest(raw, expected=digest, where=str(self.root))

    def config(self, manifest: Manifest) -> ImageConfig:
        raw = self.read_blob(manifest.config.digest, manifest.config.size)
        return ImageConfig.parse(raw, where=str(self.root))

    def resolve(self, text_or_ref: str | Reference) -> tuple[ImageRecord, Manifest]:
        """Find a local image by reference, image id or digest; raise ImageNotFound."""
        text = str(text_or_ref)
        ref = None
        if isinstance(text_or_ref, Reference):
            ref = text_or_ref
        else:
            try:
                ref = Reference.parse(text)
            except Exception:
                ref = None
        rec = self.find(ref) if ref is not None else None
        if rec is None:
            matches = self.find_by_id(text)
            ids = {r.descriptor.digest for r in matches}
            if len(ids) > 1:
                raise ImageNotFound(f"image id {text!r} is ambiguous", hint="give more digits")
            rec = matches[0] if matches else None
        if rec is None:
            raise ImageNotFound(f"no such image: {ref.familiar() if ref else text}")
        m = self.manifest(rec.descriptor.digest)
        if isinstance(m, Index):
            raise StoreError(f"{rec.name} is an image index, not an image", hint="pull it with --platform")
        return rec, m

    # -- garbage collection ------------------------------------------------------
    def referenced_blobs(self) -> set[Digest]:
        live: set[Digest] = set()
        todo = [rec.descriptor.digest for rec in self.images()]
        for rec in self.images():
            # the registry's own manifest/index bytes, kept beside the OCI form (see pull)
            for key, val in (rec.descriptor.annotations or {}).items():
                if key.startswith("io.layerfs.") and val.startswith("sha256:"):
                    try:
                        d = Digest.parse(val)
                    except Exception:
                        continue
                    if self.has_blob(d):
                        todo.append(d)
        while todo:
            d = todo.pop()
            if d in live:
                continue
            live.add(d)
            try:
                m = self.manifest(d)
            except Exception:
                continue
            if isinstance(m, Index):
                todo.extend(x.digest for x in m.manifests if self.has_blob(x.digest))
            else:
                live.add(m.config.digest)
                live.update(l.digest for l in m.layers)
        return live

    def gc(self, candidates: set[Digest] | None = None, *, keep: set[Digest] | frozenset = frozenset()) -> tuple[int, int]:
        """Delete blobs (and their side files) that no tagged image references, nor *keep*.

        With *candidates*, only those blobs are considered (``rmi``); without,
        every blob and every abandoned partial download (``prune``).
        Returns (number of blobs removed, bytes freed)."""
        removed = freed = 0
        # pulls hold the "gc" lock shared while their blobs are not yet tagged
        with self.lock("gc"), self.lock():
            live = self.referenced_blobs()
            for algo_dir in (self.root / "blobs").iterdir():
                if not algo_dir.is_dir():
                    continue
                for p in algo_dir.iterdir():
                    try:
                        d = Digest(algo_dir.name, p.name)
                    except Exception:
                        continue
                    if d in live or d in keep or (candidates is not None and d not in candidates):
                        continue
                    with file_lock(self.root / "locks" / f"blob-{d.algorithm}-{d.hex}.lock"):
                        try:
                            size = p.stat().st_size
                            p.unlink()
                        except FileNotFoundError:
                            continue
                    removed += 1
                    freed += size
                    for sub in ("layers", "indexes"):   # facts and layer indexes of the blob
                        for side in (self.root / sub).glob(f"{d.algorithm}-{d.hex}.*"):
                            with contextlib.suppress(OSError):
                                side.unlink()
                    for side in (self.root / "trees").glob(f"{d.algorithm}-{d.hex}*"):   # merged-tree caches
                        with contextlib.suppress(OSError):
                            side.unlink()
            # partial downloads nobody is writing right now
            for p in [] if candidates is not None else (self.root / "ingest").glob("*.partial"):
                algo, _, hexpart = p.name[: -len(".partial")].partition("-")
                lock = self.root / "locks" / f"blob-{algo}-{hexpart}.lock"
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                try:
                    size = p.stat().st_size
                    p.unlink()
                    removed += 1
                    freed += size
                except OSError:
                    pass
                finally:
                    os.close(fd)
        return removed, freed
