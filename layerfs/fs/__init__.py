"""The file system views: read-only merged tree, union of layers, writable overlay and its upper format."""
