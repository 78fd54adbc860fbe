"""Build the C extension; all other metadata lives in pyproject.toml.

``layerfs._zran`` (native/zran/, declared in zran.h) does streaming gzip
inflation with zran-style random-access checkpoints; it links against the system zlib
(indexing) and ISA-L's igzip (random reads) (Debian: ``apt-get install
zlib1g-dev libisal-dev`` for the headers).
``layerfs._fuse`` (native/fuse/, declared in fuseloop.h) serves libfuse 3
low-level requests from native threads (``libfuse3-dev``).
"""
import shlex
import subprocess

from setuptools import Extension, setup

ZRAN_SOURCES = [f"native/zran/{name}.c" for name in ("module", "inflater", "outbuf", "igzip", "reader")]
FUSE_SOURCES = [f"native/fuse/{name}.c" for name in ("module", "session", "inode_ops", "file_ops", "reply", "handles")]


def pkg_config(flag: str, package: str, default: list[str]) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return default
    return [w[2:] for w in shlex.split(out)]


setup(
    ext_modules=[
        Extension(
            "layerfs._zran",
            sources=ZRAN_SOURCES,
            depends=["native/zran/zran.h"],
            libraries=["z", "isal"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
        Extension(
            "layerfs._fuse",
            sources=FUSE_SOURCES,
            depends=["native/fuse/fuseloop.h"],
            include_dirs=pkg_config("--cflags-only-I", "fuse3", ["/usr/include/fuse3"]),
            libraries=pkg_config("--libs-only-l", "fuse3", ["fuse3", "pthread"]),
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
    ],
)
