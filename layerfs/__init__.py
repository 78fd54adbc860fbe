"""layerfs: pull OCI/Docker images and mount them as a lazy union filesystem."""
__version__ = "0.1.0"
