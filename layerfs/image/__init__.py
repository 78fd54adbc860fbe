"""Image references and OCI value types (digests, descriptors, manifests, indexes, configs)."""
