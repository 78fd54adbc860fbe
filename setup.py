"""Build the C extension; all other metadata lives in pyproject.toml.

``layerfs._zran`` (native/zran.c) does streaming gzip inflation with
zran-style random-access checkpoints; it links against the system zlib
(Debian: ``apt-get install zlib1g-dev`` for the headers).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "layerfs._zran",
            sources=["native/zran.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
    ],
)
