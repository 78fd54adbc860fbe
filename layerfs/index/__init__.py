"""Per-layer indexes: the tar table of contents and its column format, compressed-blob seek points."""
