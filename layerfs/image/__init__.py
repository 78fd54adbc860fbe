"""Image references and OCI value types (digests, descriptors, manifests, indexes, configs).

The names below are this package's public face (see :mod:`layerfs.face`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.face import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "ACCEPT_MANIFESTS": "oci", "CONFIG_TYPES": "oci", "DOCKER_CONFIG": "oci", "DOCKER_LAYER": "oci",
    "DOCKER_LAYER_GZIP": "oci", "DOCKER_LAYER_ZSTD": "oci", "DOCKER_LIST": "oci", "DOCKER_MANIFEST": "oci",
    "Descriptor": "oci", "Digest": "oci", "FOREIGN_LAYER_TYPES": "oci", "ImageConfig": "oci", "Index": "oci",
    "LAYER_COMPRESSION": "oci", "Manifest": "oci", "OCI_CONFIG": "oci", "OCI_EMPTY": "oci", "OCI_INDEX": "oci",
    "OCI_LAYER": "oci", "OCI_LAYER_GZIP": "oci", "OCI_LAYER_ZSTD": "oci", "OCI_MANIFEST": "oci",
    "OPAQUE_WHITEOUT": "oci", "Platform": "oci", "REF_NAME_ANNOTATION": "oci", "VerifyingReader": "oci",
    "WHITEOUT_PREFIX": "oci", "XATTR_PREFIX": "oci", "check_named": "oci", "docker_to_oci": "oci",
    "iter_layer_compression": "oci", "json_bytes": "oci", "parse_manifest": "oci",
    "DOCKER_HUB": "reference", "LOCAL_TRANSPORTS": "reference", "Reference": "reference",
    "is_local_registry": "reference", "is_local_source": "reference",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from layerfs.image.oci import ACCEPT_MANIFESTS, CONFIG_TYPES, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_ZSTD, DOCKER_LIST, DOCKER_MANIFEST, Descriptor, Digest, FOREIGN_LAYER_TYPES, ImageConfig, Index, LAYER_COMPRESSION, Manifest, OCI_CONFIG, OCI_EMPTY, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST, OPAQUE_WHITEOUT, Platform, REF_NAME_ANNOTATION, VerifyingReader, WHITEOUT_PREFIX, XATTR_PREFIX, check_named, docker_to_oci, iter_layer_compression, json_bytes, parse_manifest  # noqa: F401
    from layerfs.image.reference import DOCKER_HUB, LOCAL_TRANSPORTS, Reference, is_local_registry, is_local_source  # noqa: F401
