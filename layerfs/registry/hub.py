"""``layerfs search``: Docker Hub's v1 search API (``/v1/search?q=&n=``)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from layerfs.errors import ContentError
from layerfs.image import is_local_registry
from layerfs.registry.options import RegistryOptions
from layerfs.registry.transport import get_document

DEFAULT_INDEX = "https://index.docker.io"


@dataclass(frozen=True)
class SearchResult:
    name: str
    description: str
    stars: int
    official: bool
    automated: bool


def search(term: str, *, limit: int = 25, index_url: str | None = None,
           options: RegistryOptions | None = None) -> list[SearchResult]:
    base = (index_url or os.environ.get("LAYERFS_SEARCH_INDEX") or DEFAULT_INDEX).rstrip("/")
    if "://" not in base:
        base = ("http://" if is_local_registry(base) else "https://") + base
    host = urlsplit(base).netloc
    opts = options or RegistryOptions.from_env()
    raw = get_document(f"{base}/v1/search", params={"q": term, "n": limit}, options=opts, what="search")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ContentError("search answer is not JSON", where=host) from None
    items = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ContentError("search answer has no 'results' list", where=host)
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            continue
        stars = it.get("star_count")
        out.append(SearchResult(
            name=it["name"],
            description=str(it.get("description") or ""),
            stars=stars if isinstance(stars, int) and not isinstance(stars, bool) else 0,
            official=bool(it.get("is_official")),
            automated=bool(it.get("is_automated")),
        ))
    return out[:limit]
