"""Moving images: pull, push, local transports, eStargz, published layer indexes.

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "EStargzError": "estargz", "EStargzWriter": "estargz", "FOOTER_SIZE": "estargz",
    "TOC_DIGEST_ANNOTATION": "estargz", "TOC_TAR_NAME": "estargz", "UNCOMPRESSED_SIZE_ANNOTATION": "estargz",
    "convert_image": "estargz", "footer_bytes": "estargz", "is_estargz": "estargz", "parse_footer": "estargz",
    "parse_rfc3339_ns": "estargz", "parse_toc_member": "estargz",
    "ARTIFACT_TYPE": "indexpush", "HEAD_DIGEST_ANNOTATION": "indexpush", "HEAD_SIZE_ANNOTATION": "indexpush",
    "INDEX_MEDIA_TYPE": "indexpush", "IndexArtifactError": "indexpush", "LAYER_ANNOTATION": "indexpush",
    "build_index_blob": "indexpush", "find_index": "indexpush", "index_blobs": "indexpush",
    "parse_head": "indexpush", "push_index": "indexpush", "referrers_tag": "indexpush",
    "PullOptions": "pull", "Puller": "pull",
    "check_diff_id": "pull",
    "DEFAULT_CHUNK_SIZE": "push", "DEFAULT_CHUNK_THRESHOLD": "push", "PushOptions": "push", "Pusher": "push",
    "push_target": "push",
    "LoadOptions": "transports", "Source": "transports", "load": "sources",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.transfer.estargz import (  # noqa: F401
        FOOTER_SIZE,
        TOC_DIGEST_ANNOTATION,
        TOC_TAR_NAME,
        UNCOMPRESSED_SIZE_ANNOTATION,
        EStargzError,
        EStargzWriter,
        convert_image,
        footer_bytes,
        is_estargz,
        parse_footer,
        parse_rfc3339_ns,
        parse_toc_member,
    )
    from layerfs.transfer.indexpush import (  # noqa: F401
        ARTIFACT_TYPE,
        HEAD_DIGEST_ANNOTATION,
        HEAD_SIZE_ANNOTATION,
        INDEX_MEDIA_TYPE,
        LAYER_ANNOTATION,
        IndexArtifactError,
        build_index_blob,
        find_index,
        index_blobs,
        parse_head,
        push_index,
        referrers_tag,
    )
    from layerfs.transfer.pull import (  # noqa: F401
        REPO_DIGEST_ANNOTATION,
        SOURCE_MANIFEST_ANNOTATION,
        Puller,
        PullOptions,
        check_diff_id,
        layer_facts_from_blob,
    )
    from layerfs.transfer.push import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_THRESHOLD, Pusher, PushOptions, push_target  # noqa: F401
    from layerfs.transfer.sources import load  # noqa: F401
    from layerfs.transfer.transports import LoadOptions, Source  # noqa: F401
