"""podman (4.3, with runc) set up for one test or benchmark run: a private storage root and configuration.

:class:`Podman` writes ``storage.conf`` (overlay driver, its own graphroot and runroot; with *store*,
that layer store as an additional layer store, the ``:ref`` kind layerfs serves), ``containers.conf``
(runc, cgroupfs, no default ulimits: containers here cannot call setrlimit, and crun refuses hybrid
cgroups), ``registries.conf`` (the registry at *registry_host*, plain HTTP) and an empty auth file,
all under *work*, and runs podman with an environment that points at them.  ``cleanup()`` removes
containers and images and unmounts what podman left mounted under its directories.

It imports neither pytest nor layerfs, so the benchmarks in scripts/ use it too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PodmanError(RuntimeError):
    pass


class Podman:
    """podman with a private storage root; with *store*, storage.conf lists it as an additional layer store."""

    def __init__(self, work: Path, registry_host: str, store: Path | None = None, *, binary: str = "podman"):
        self.bin = binary
        self.work = work
        for d in ("root", "tmp"):
            (work / d).mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="lfs-podman-", dir="/tmp"))   # podman wants <= 50 characters
        opts = f'[storage.options]\nadditionallayerstores = ["{store}:ref"]\n' if store is not None else ""
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{work / "root"}"\nrunroot = "{self.runroot}"\n{opts}')
        (work / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = []\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
            f'tmp_dir = "{work / "tmp"}"\n')
        (work / "registries.conf").write_text(f'[[registry]]\nlocation = "{registry_host}"\ninsecure = true\n')
        (work / "auth.json").write_text('{"auths": {}}')
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"}
        self.env = {**env, "REGISTRY_AUTH_FILE": str(work / "auth.json"),
                    "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
                    "CONTAINERS_CONF": str(work / "containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"), "TMPDIR": str(work / "tmp")}

    def cmd(self, *args: str) -> list[str]:
        # root and runroot come from storage.conf: with --root podman 4.3 drops its driver options
        return [self.bin, "--runtime", "runc", *args]

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``podman ARGS`` (text output captured); with *check*, a non-zero exit raises :class:`PodmanError`."""
        p = subprocess.run(self.cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return p

    def cleanup(self, timeout: float = 60) -> None:
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af")):
            try:
                self(*args, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                pass
        with open("/proc/self/mountinfo") as f:
            left = [line.split()[4] for line in f
                    if line.split()[4].startswith((str(self.work), str(self.runroot)))]
        for mp in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)
        shutil.rmtree(self.runroot, ignore_errors=True)
