"""The layerfs command line run in-process by a test, its output taken from pytest's ``capsys``."""
from __future__ import annotations

from typing import Any, Iterable

import pytest

from layerfs.cli.main import main


def run_cli(args: Iterable[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``layerfs ARGS`` (each argument as ``str``): returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
