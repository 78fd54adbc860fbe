"""The local OCI image layout: blobs, tags, locks, garbage collection."""
