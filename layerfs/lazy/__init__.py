"""Lazy mounts: layers served by Range reads before (or without) a download."""
