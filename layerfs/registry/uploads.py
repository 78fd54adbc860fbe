"""The push side of the distribution API: blob existence, cross-repository mounts, upload sessions
(monolithic or chunked), manifests. :class:`Uploads` is a part of
:class:`layerfs.registry.client.RegistryClient`, whose :meth:`request` it uses."""
from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode, urljoin, urlsplit

from layerfs.errors import ManifestError, RegistryError, SizeMismatch
from layerfs.image import Digest

if TYPE_CHECKING:
    import requests


class Uploads:
    """Blob uploads and manifest pushes of :class:`~layerfs.registry.client.RegistryClient` (which
    provides ``request``, ``registry``, ``base`` and ``pull_scope``)."""

    @staticmethod
    def push_scope(repository: str) -> str:
        return f"repository:{repository}:push,pull"

    def _location(self, r: requests.Response, what: str) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: the registry sent no upload Location (HTTP {r.status_code})",
                                registry=self.registry)
        nxt = urljoin(r.url or self.base + "/", loc)
        if urlsplit(nxt).scheme not in ("http", "https"):
            raise RegistryError(f"{what}: refusing upload location {loc!r}", registry=self.registry)
        return nxt

    def blob_exists(self, repository: str, digest: Digest, *, size: int | None = None) -> bool:
        """``HEAD /v2/<name>/blobs/<digest>``: True when the repository has the blob (of *size*, when given)."""
        what = f"blob {digest.short}"
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=self.push_scope(repository),
                         ok=(200, 404), what=what)
        r.close()
        if r.status_code == 404:
            return False
        length = r.headers.get("Content-Length")
        if size is not None and length and length.isdigit() and int(length) != size:
            raise SizeMismatch(f"{what}: the registry has {length} bytes, expected {size}", where=self.registry)
        return True

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> str | None:
        """Cross-repository mount (``POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>``).

        Returns None when the registry mounted the blob (201); otherwise the
        URL of the upload session it opened instead (202), to upload into."""
        what = f"blob {digest.short} (mount from {from_repository})"
        query = urlencode({"mount": str(digest), "from": from_repository})
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/?{query}",
                         scope=f"{self.push_scope(repository)} {self.pull_scope(from_repository)}",
                         ok=(201, 202), what=what)
        r.close()
        if r.status_code == 201:
            return None
        return self._location(r, what)

    def start_upload(self, repository: str) -> str:
        """Open an upload session (``POST /v2/<name>/blobs/uploads/``); returns its URL."""
        what = f"upload to {repository}"
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/", scope=self.push_scope(repository),
                         ok=(202,), what=what)
        r.close()
        return self._location(r, what)

    def upload_chunk(self, repository: str, location: str, data: bytes, offset: int) -> str:
        """``PATCH`` one chunk at *offset* (``Content-Range: start-end``); returns the session's next URL.

        Not retried here: after a failure the whole blob upload starts over."""
        end = offset + len(data) - 1
        what = f"upload to {repository} (bytes {offset}-{end})"
        r = self.request("PATCH", location, scope=self.push_scope(repository), data=data, retries=0,
                         headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
                         ok=(202, 204), what=what)
        r.close()
        got = r.headers.get("Range")
        if got:
            first, _, last = got.removeprefix("bytes=").partition("-")
            if not (first.strip() == "0" and last.strip().isdigit() and int(last) == end):
                raise RegistryError(f"{what}: the registry has range {got!r}, expected 0-{end}",
                                    registry=self.registry)
        return self._location(r, what) if r.headers.get("Location") else location

    def finish_upload(self, repository: str, location: str, digest: Digest, data: bytes = b"") -> None:
        """Close an upload session with its last bytes (``PUT <location>?digest=``); the registry verifies the digest."""
        sep = "&" if urlsplit(location).query else "?"
        what = f"blob {digest.short}"
        r = self.request("PUT", f"{location}{sep}{urlencode({'digest': str(digest)})}",
                         scope=self.push_scope(repository), data=data, retries=0,
                         headers={"Content-Type": "application/octet-stream"}, ok=(201, 204), what=what)
        r.close()
        got = r.headers.get("Docker-Content-Digest")
        if got and got.strip() != str(digest):
            raise RegistryError(f"{what}: the registry stored it as {got.strip()}", registry=self.registry)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        """``PUT /v2/<name>/manifests/<tag|digest>`` with the exact bytes; returns their digest."""
        return self.put_manifest_ex(repository, reference, raw, media_type)[0]

    def put_manifest_ex(self, repository: str, reference: str, raw: bytes, media_type: str) -> tuple[Digest, str | None]:
        """Like :meth:`put_manifest`; also returns the ``OCI-Subject`` header the registry answered with
        (distribution spec 1.1: set by registries with the referrers API for a manifest with a ``subject``)."""
        digest = Digest.of(raw)
        what = f"manifest {repository}:{reference}"
        r = self.request("PUT", f"/v2/{repository}/manifests/{reference}", scope=self.push_scope(repository),
                         data=raw, headers={"Content-Type": media_type}, ok=(200, 201, 204), what=what)
        r.close()
        got = r.headers.get("Docker-Content-Digest")
        if got and got.strip() != str(digest):
            raise ManifestError(f"{what}: the registry stored it as {got.strip()}, expected {digest}",
                                where=self.registry)
        subject = r.headers.get("OCI-Subject")
        return digest, subject.strip() if subject else None
