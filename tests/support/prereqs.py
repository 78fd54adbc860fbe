"""Test prerequisites: programs and Python packages a test needs (skip, or fail on CI), and a clean
environment for the programs tests start.

* :func:`missing_prerequisite` skips a test, or fails it when ``CI=true`` (CI must not silently skip);
  :func:`require_binary` / :func:`require_module` call it when a program or package is absent.
* :func:`clean_env` is the environment for a child process: no proxy settings, no ``REGISTRY_*``
  variables (they would reconfigure a registry), loopback exempt from proxies.
"""
from __future__ import annotations

import importlib
import os
import shutil
from typing import Any

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(message: str) -> None:
    """Skip the test, or fail it when running on CI (``CI=true``): CI must not silently skip."""
    if on_ci():
        pytest.fail(f"{message} (CI=true: test prerequisites must be installed, not skipped)", pytrace=False)
    pytest.skip(message)


def require_root(why: str) -> None:
    """Skip/fail (see :func:`missing_prerequisite`) unless running as root; *why* says what needs it."""
    if os.geteuid() != 0:
        missing_prerequisite(f"needs root: {why}")


def require_binary(name: str) -> str:
    """Absolute path of the executable *name* (a name on PATH or a path); skip/fail when absent."""
    path = name if os.path.isabs(name) else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        missing_prerequisite(f"required program {name!r} is not installed")
    return str(path)


def require_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_prerequisite(f"required Python package {name!r} is not installed (pip install {name})")
        raise  # unreachable: missing_prerequisite raises


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env
