"""Thin FUSE adapters over the native libfuse loop."""
